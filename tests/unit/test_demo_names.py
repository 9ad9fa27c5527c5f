"""What runs any mesh knows nothing of the digits demo: no demo name in its code, no import of the
demo's modules. The demo lives in demo/mesh.yaml and its model directories (services/preprocess,
services/model_a, services/model_b); the runtimes, the orchestrator and the mesh tooling
(launcher, check, k8s, images) take everything from a mesh file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import ROOT

#: The code that serves, checks, runs, renders and builds any mesh.
GENERIC = sorted(
    {
        *(ROOT / "services/common").rglob("*.py"),
        *(ROOT / "orchestrator").rglob("*.py"),
        *(
            ROOT / "meshctl" / name
            for name in (
                "mesh.py",
                "check.py",
                "k8s.py",
                "images.py",
                "engine.py",
                "launcher.py",
                "run.py",
                "process.py",
                "supervise.py",
            )
        ),
    }
    - {ROOT / "demo/topology.py", ROOT / "demo/digits.py"}
)
DEMO_MODULES = ("demo.topology", "demo.digits")
DEMO_NAMES = re.compile(r"\b(preprocess|model[_-][ab]|digits?)\b", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (prose, not code)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_demo_name_or_module_in_code_that_runs_any_mesh(path: Path) -> None:
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module not in DEMO_MODULES, f"{path}:{node.lineno} imports {node.module}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            match = DEMO_NAMES.search(node.value)
            # Messages may say "letters, digits, ..." of a name's characters; nothing else.
            if match and not re.search(r"letters, digits", node.value):
                pytest.fail(f"{path}:{node.lineno}: the demo's {match[0]!r} in {node.value[:80]!r}")


def test_the_templates_name_no_demo_service() -> None:
    for path in (ROOT / "meshctl/k8s_templates").glob("*.yaml"):
        assert not DEMO_NAMES.search(path.read_text()), path
