"""The layout of the code: what may import what, and what each install and image gets.

`orchestrator/` is the graph node and `services/` the model services with their shared runtime;
operator tooling lives in `meshctl/`, batch and asynchronous serving in `jobs/`. grpc is spoken
only at the transport edge. The Kubernetes client is an optional extra (`onnxmesh[k8s]`) that
only the rollout commands use, so the images of the nodes never carry it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "orchestrator", "meshctl", "jobs", "bench", "scripts")
#: The one module that talks to a real cluster.
KUBERNETES_CLIENT_USER = "meshctl/rollout/cluster.py"
#: The transport edge: the only modules that speak gRPC. Everything else sees numpy arrays, plain
#: dataclasses and the error tree (docs/architecture.md).
GRPC_EDGE = {
    "bench/minimal.py",
    "services/common/grpc/client.py",
    "services/common/grpc/reflection.py",
    "services/common/grpc/security.py",
    "services/common/grpc/servicer.py",
    "services/common/server.py",
    "services/common/grpc/traced.py",
    "jobs/client.py",
    "jobs/node.py",
    "jobs/service.py",
    "jobs/worker.py",
}


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, wherever in the file (lazy imports included)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py") if "gen" not in p.parts)


def top_level(module: str) -> str:
    return module.split(".", 1)[0]


def test_only_the_cluster_seam_imports_the_kubernetes_client() -> None:
    users = {
        str(path.relative_to(REPO))
        for path in sources(*PACKAGES)
        if any(top_level(m) == "kubernetes" for m in imported_modules(path))
    }
    assert users == {KUBERNETES_CLIENT_USER}


def test_only_the_transport_edge_imports_grpc() -> None:
    users = {
        str(path.relative_to(REPO))
        for path in sources(*PACKAGES)
        if any(top_level(m) == "grpc" for m in imported_modules(path))
    }
    assert users == GRPC_EDGE


def test_the_graph_node_and_the_services_do_not_depend_on_the_tooling() -> None:
    for path in sources("orchestrator", "services"):
        tooling = {
            m for m in imported_modules(path) if top_level(m) in ("meshctl", "jobs", "bench", "scripts")
        }
        assert not tooling, f"{path.relative_to(REPO)} imports {sorted(tooling)}"


def test_the_cli_imports_rollout_only_for_the_rollout_command() -> None:
    check = (
        "import sys, meshctl.cli\n"
        "assert 'meshctl.rollout' not in sys.modules, 'meshctl.cli imports meshctl.rollout'\n"
        "import meshctl.rollout\n"
        "assert 'kubernetes' not in sys.modules, 'meshctl.rollout imports kubernetes before a cluster is used'\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_kubernetes_is_an_optional_extra_that_dev_includes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("kubernetes")]
    extras = project["optional-dependencies"]
    assert [d for d in extras["k8s"] if d.startswith("kubernetes")] == ["kubernetes==37.0.2"]
    dev_extras = {
        extra
        for d in extras["dev"]
        if d.startswith(f"{project['name']}[")
        for extra in d.split("[", 1)[1].rstrip("]").split(",")
    }
    assert "k8s" in dev_extras
