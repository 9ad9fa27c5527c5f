"""The layout of the code: what may import what, and what each install and image gets.

`orchestrator/` is the graph node and `services/` the model services with their shared runtime;
operator tooling lives in `meshctl/`, batch and asynchronous serving in `jobs/`. grpc is spoken
only at the transport edge: in the runtime, its `grpc/` and `rest/` folders and `server.py`, the
composition root; the core around them imports neither grpc nor protobuf. The Kubernetes client is an optional extra (`onnxmesh[k8s]`) that
only the rollout commands use, so the images of the nodes never carry it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "orchestrator", "meshctl", "jobs", "bench", "scripts")
#: The one folder that talks to a real cluster.
KUBERNETES_CLIENT_HOME = "meshctl/rollout/"
RUNTIME = "services/common/"
#: The runtime's transport edge: the only places in services/ that speak gRPC or protobuf.
RUNTIME_EDGE = ("services/common/grpc/", "services/common/rest/", "services/common/server.py")
#: The runtime's mains: they build a node from the edge and the core, so they may import both.
RUNTIME_MAINS = {"services/common/model_node.py"}
#: The wire outside the runtime: the jobs service's own gRPC API, and bench's load generators
#: that measure the wire itself. Everything else sees numpy arrays, plain dataclasses and the
#: error tree (docs/architecture.md).
WIRE_OUTSIDE_THE_RUNTIME = {
    "bench/load/loadgen.py",
    "bench/targets/minimal.py",
    "meshctl/grpcurl.py",
    "jobs/client.py",
    "jobs/service.py",
    "jobs/worker.py",
}
#: The modules that carry the wire: gRPC itself and its health/reflection services, protobuf and
#: the generated stubs.
WIRE = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "proto")


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, wherever in the file (lazy imports included)."""
    modules: set[str] = set()
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


def within(module: str, packages: Sequence[str]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def speaks_the_wire(module: str) -> bool:
    return within(module, WIRE)


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_only_rollout_imports_the_kubernetes_client() -> None:
    users = {
        relative(path)
        for path in sources(*PACKAGES)
        if any(top_level(m) == "kubernetes" for m in imported_modules(path))
    }
    assert users and all(user.startswith(KUBERNETES_CLIENT_HOME) for user in users), sorted(users)


def test_grpc_and_protobuf_only_at_the_edge() -> None:
    users = {
        relative(path)
        for path in sources(*PACKAGES)
        if any(speaks_the_wire(m) for m in imported_modules(path))
    }
    in_runtime = {user for user in users if user.startswith(RUNTIME)}
    assert all(user.startswith(RUNTIME_EDGE) for user in in_runtime), sorted(in_runtime)
    assert users - in_runtime == WIRE_OUTSIDE_THE_RUNTIME


def test_the_runtime_core_imports_neither_the_wire_nor_the_edge() -> None:
    edge_modules = [edge.removesuffix(".py").rstrip("/").replace("/", ".") for edge in RUNTIME_EDGE]
    core = [
        path
        for path in sources("services/common")
        if not relative(path).startswith(RUNTIME_EDGE) and relative(path) not in RUNTIME_MAINS
    ]
    assert len(core) > 10  # the rule checks something
    for path in core:
        wrong = {m for m in imported_modules(path) if speaks_the_wire(m) or within(m, edge_modules)}
        assert not wrong, f"{relative(path)} imports {sorted(wrong)}"


def test_services_never_import_the_graph_node_nor_the_tooling() -> None:
    for path in sources("services"):
        above = {m for m in imported_modules(path) if top_level(m) in ("orchestrator", "meshctl", "jobs")}
        assert not above, f"{relative(path)} imports {sorted(above)}"


#: Payload capture writes into the store the batch jobs use (imported only when a spec captures).
SHARED_STORE = {"orchestrator/capture/writer.py": {"jobs.store"}}


def test_the_graph_node_and_the_services_do_not_depend_on_the_tooling() -> None:
    for path in sources("orchestrator", "services"):
        tooling = {
            m for m in imported_modules(path) if top_level(m) in ("meshctl", "jobs", "bench", "scripts")
        } - SHARED_STORE.get(relative(path), set())
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
