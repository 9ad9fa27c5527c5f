"""The test suite's own habits: no test module imports another (shared helpers live in
tests/support.py, or a folder's conftest.py or support module), and none defines its own copy of
the shared `run` or `until`."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

TESTS = ROOT / "tests"
SHARED = {"until", "wait_until", "until_async", "free_port", "kill_group"}


def suite_modules() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_test_module_imports_another() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported(path) if m.rsplit(".", 1)[-1].startswith("test_")
        )
        for path in suite_modules()
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}
    assert len(offenders) > 50  # the walk found the suite


def is_coroutine_runner(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A `run(coro)` of its own (other `run`s are fixtures and commands with that name)."""
    return node.name == "run" and [a.arg for a in node.args.args] == ["coro"]


def test_the_shared_helpers_are_defined_once() -> None:
    copies = {
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
        for path in TESTS.rglob("*.py")
        if path.name != "support.py" or path.parent != TESTS
        for node in ast.parse(path.read_text(), str(path)).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (node.name in SHARED or is_coroutine_runner(node))
    }
    assert copies == set()
