"""Where the CLI's calls go, and what it says when they fail.

Every address comes from one layout: `--target`, else $ONNXMESH_TARGET, else the local node
serving the name in the mesh file (`--mesh`, else $ONNXMESH_MESH, else ./mesh.yaml, else the demo's), laid
out from `--base-port` (default: the file's). Calls `predict` chains to build a model's
inputs (the upstream steps of a graph, `upstream`) go to $ONNXMESH_SERVICE_<NAME>_ADDRESS, else to the same layout
as the target (its host, and the base its port implies for the service it names).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

from meshctl.launcher import DEMO_MESH
from meshctl.mesh import ORCHESTRATOR, Mesh, MeshFileError, load_mesh
from orchestrator.addresses import address_variable
from orchestrator.spec.steps import GraphSpec, ModelStep, TensorRef
from services.common.errors import DeadlineExceeded, MeshError, Unavailable

TARGET_ENV = "ONNXMESH_TARGET"
MESH_ENV = "ONNXMESH_MESH"
LOCAL_HOST = "127.0.0.1"


#: The mesh file the CLI reads when none is named and the folder it runs in has one.
LOCAL_MESH = Path("mesh.yaml")


def mesh_path() -> Path:
    """The mesh file the CLI lays addresses out from: $ONNXMESH_MESH, else ./mesh.yaml, else the demo's."""
    named = os.environ.get(MESH_ENV)
    if named:
        return Path(named)
    return LOCAL_MESH.resolve() if LOCAL_MESH.is_file() else DEMO_MESH


@functools.cache
def _mesh(path: Path) -> Mesh:
    try:
        return load_mesh(path)
    except MeshFileError as exc:
        raise CliError(f"cannot use the mesh file {path} (--mesh, ${MESH_ENV}):\n{exc}") from None


def current_mesh() -> Mesh:
    return _mesh(mesh_path())


def local_endpoints(base: int | None = None, host: str = LOCAL_HOST) -> dict[str, str]:
    """Each node's address in the local mesh laid out from `base` (the launcher's --base-port)."""
    return {service: f"{host}:{port}" for service, port in current_mesh().ports(base).items()}


def model_services() -> dict[str, str]:
    """Model name -> the service that serves it in the mesh file (graphs are the orchestrator's)."""
    mesh = current_mesh()
    served = {
        model.name: service.name
        for service in mesh.services.values()
        if service.model_dir is not None and service.model_dir.is_dir()
        for model in service.model_dir.iterdir()
        if model.is_dir()
    }
    return served | dict.fromkeys(mesh.graph_names(), ORCHESTRATOR)


def upstream(model: str, name: str) -> tuple[GraphSpec, TensorRef] | None:
    """Where a graph of the mesh file gets input `name` of `model` from (the first that calls it with
    that input): how `predict` makes that input when it calls the model directly."""
    for graph in current_mesh().spec.graphs.values():
        for step in graph.all_steps():
            if isinstance(step, ModelStep) and step.model == model and name in step.inputs:
                return graph, step.inputs[name]
    return None


class CliError(Exception):
    """A problem to report in one line, with exit code 1."""


# -- targets and errors ------------------------------------------------------------------------------


def default_target(name: str, base: int | None = None) -> str:
    """Where `predict NAME` goes without --target: $ONNXMESH_TARGET, else the local service serving NAME."""
    env = os.environ.get(TARGET_ENV)
    if env:
        return check_target(env)
    return local_endpoints(base)[model_services().get(name, ORCHESTRATOR)]


def check_target(target: str) -> str:
    """A gRPC target as given, or CliError when it is a URL (the CLI speaks gRPC, not HTTP)."""
    if "://" in target:
        host = target.split("://", 1)[1].split("/", 1)[0]
        raise CliError(
            f"'{target}' is a URL; give the node's gRPC address as HOST:PORT, e.g. {host or LOCAL_HOST}"
        )
    return target


def layout_near(target: str, name: str, base: int | None) -> dict[str, str]:
    """The local layout a call of `name` at `target` belongs to: --base-port if given, else the
    base that target's port implies for the service serving `name` (its host kept)."""
    host, _, port = target.rpartition(":")
    served_by = model_services()
    if base is None and port.isdigit() and name in served_by:
        mesh = current_mesh()
        implied = int(port) - (mesh.ports()[served_by[name]] - mesh.base_port)
        base = implied if implied > 0 else None
    return local_endpoints(base, host if base is not None and host else LOCAL_HOST)


def service_address(service: str, layout: Mapping[str, str] | None = None) -> str:
    """A service's address for chained calls: the orchestrator's env override, else the layout's."""
    return os.environ.get(address_variable(service)) or (layout or local_endpoints())[service]


#: What gRPC says when no connection could be made (as opposed to a server answering UNAVAILABLE).
_CONNECT_FAILURES = (
    "failed to connect",
    "connection refused",
    "all backends failing",
    "errors resolving",
    "socket closed",
    "handshake failed",
    "http1.x server",
)
_DNS_FAILURES = ("errors resolving", "dns resolution failed", "name resolution", "could not resolve")
MESH_HINT = "is the mesh running? start it with 'make run'"
#: A refused connection: where else the mesh may be.
REFUSED_HINT = f"{MESH_HINT} (or pass --target/--base-port)"
TLS_VARIABLES = "ONNXMESH_TLS_CERT, ONNXMESH_TLS_KEY and ONNXMESH_TLS_CA"


def unreachable(err: MeshError, *, connecting: bool = False) -> bool:
    """True when the call never reached a server; a deadline counts only on a first (connect) call."""
    if isinstance(err, DeadlineExceeded):
        return connecting
    return isinstance(err, Unavailable) and any(s in err.message.lower() for s in _CONNECT_FAILURES)


def detail(err: MeshError) -> str:
    """The error's message, never empty."""
    return err.message.strip() or f"the server gave no detail for {err.code}"


def diagnose(target: str, err: MeshError, hint: str = REFUSED_HINT) -> str | None:
    """Why a connection to `target` failed and what to do, in one line; None when nothing is
    known beyond "it did not answer". gRPC says it in its last error: a refused connection, an
    HTTP/1 server (a REST port), a socket closed during set-up (a TLS server, called in
    plaintext), a TLS handshake that failed (a plaintext server, or the wrong CA)."""
    text = err.message.lower()
    if "connection refused" in text:
        return f"nothing listens on {target} (connection refused): {hint}"
    if "http1.x server" in text or "failed parsing http/2" in text:
        return (
            f"{target} answers HTTP/1.x, not gRPC: that is a REST port (make run serves REST at the gRPC "
            "port + 100); give the gRPC port, e.g. 127.0.0.1:8001"
        )
    if "handshake failed" in text and "wrong_version_number" in text:
        return f"{target} does not speak TLS (handshake refused): the mesh runs without --tls; unset {TLS_VARIABLES}"
    if "handshake failed" in text:
        return (
            f"the TLS handshake with {target} failed: check that ONNXMESH_TLS_CA is the CA that signed the "
            "node's certificate and that ONNXMESH_TLS_CERT/KEY are its pair ('make certs' makes all three)"
        )
    if "socket closed" in text:
        return (
            f"{target} closed the connection during set-up: it likely serves TLS only (make run --tls); "
            f"export {TLS_VARIABLES} as its ready line prints them"
        )
    return None


def explain(target: str, err: MeshError, *, connecting: bool = False, hint: str = REFUSED_HINT) -> str:
    """One line for a failed call; an unreachable target gets its cause and fix when gRPC says it,
    else a hint (a DNS problem, or `hint`: the mesh down)."""
    if any(s in err.message.lower() for s in _DNS_FAILURES):
        host = target.rpartition(":")[0] or target
        return f"cannot resolve '{host}' ({err.code}): check the host name in {target}"
    if unreachable(err, connecting=connecting):
        return diagnose(target, err, hint) or f"cannot reach {target} ({err.code}): {hint}"
    if err.code == "UNAUTHENTICATED":
        return (
            f"{target}: UNAUTHENTICATED: {detail(err)}; export ONNXMESH_TOKEN_FILE=<the token file> "
            "(make run --tls prints it)"
        )
    return f"{target}: {err.code}: {detail(err)}"
