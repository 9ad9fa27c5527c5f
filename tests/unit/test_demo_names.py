"""What runs any mesh knows nothing of the digits demo: no demo name in its code (as an identifier
or a string), no import of the demo's modules. The demo lives in its own folders: demo/ (its mesh
file, client file, data and names) and its model directories (services/preprocess, services/model_a,
services/model_b); bench/, scripts/ and tests/ are its users. Everything else (the runtimes, the
orchestrator, the mesh tooling, jobs, the image tooling) takes everything from a mesh file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import ROOT

#: The demo's own folders, inside the trees checked below.
DEMO_FOLDERS = tuple(ROOT / "services" / name for name in ("preprocess", "model_a", "model_b"))
#: The code that serves, checks, runs, renders, builds and calls any mesh.
GENERIC = sorted(
    path
    for tree in ("services", "orchestrator", "meshctl", "jobs", "images")
    for path in (ROOT / tree).rglob("*.py")
    if not path.is_relative_to(ROOT / "services") or not any(path.is_relative_to(d) for d in DEMO_FOLDERS)
)
DEMO_PACKAGE = "demo"
DEMO_NAMES = re.compile(r"\b(preprocess|model[_-][ab]|digits?)\b", re.IGNORECASE)
#: An identifier naming the demo: MODEL_A, load_digits, PREPROCESS_PORT, ...
DEMO_IDENTIFIER = re.compile(r"(^|_)(preprocess|model_[ab]|digits?)(_|$)", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (prose, not code)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _identifiers(node: ast.AST) -> list[str]:
    """The names a node defines or uses."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, ast.alias):
        return [node.name, node.asname or ""]
    if isinstance(node, ast.keyword):
        return [node.arg or ""]
    return []


def test_the_checked_trees_are_found() -> None:
    assert ROOT / "meshctl/predict.py" in GENERIC and ROOT / "jobs/cli.py" in GENERIC
    assert ROOT / "images/build.py" in GENERIC and ROOT / "services/common/model.py" in GENERIC
    assert not any(path.is_relative_to(ROOT / "services/preprocess") for path in GENERIC)


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_demo_name_or_module_in_code_that_runs_any_mesh(path: Path) -> None:
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            modules = (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            for module in modules:
                assert module.split(".")[0] != DEMO_PACKAGE, f"{path}:{node.lineno} imports {module}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            match = DEMO_NAMES.search(node.value)
            # Messages may say "letters, digits, ..." of a name's characters; nothing else.
            if match and not re.search(r"letters, digits", node.value):
                pytest.fail(f"{path}:{node.lineno}: the demo's {match[0]!r} in {node.value[:80]!r}")
        for name in _identifiers(node):
            if DEMO_IDENTIFIER.search(name):
                pytest.fail(f"{path}:{getattr(node, 'lineno', '?')}: the demo's name in identifier {name!r}")


def test_the_templates_name_no_demo_service() -> None:
    for path in (ROOT / "meshctl/k8s_templates").glob("*.yaml"):
        assert not DEMO_NAMES.search(path.read_text()), path
