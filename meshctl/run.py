"""`onnxmesh up [MESH]` (`python -m meshctl.run`, `make run`): a mesh file's services, locally.

Starts every node of the mesh file (the digits demo's, demo/mesh.yaml, by default) as its own process (`meshctl.launcher.LocalMesh`), prints one ready line with
where everything listens, restarts a node that exits on its own (unless `--no-restart`), and
stops them all on Ctrl-C or SIGTERM. `--help` lists every option.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from meshctl.certs import make_local
from meshctl.launcher import CERTS_DIR, DEMO_MESH, STARTUP_TIMEOUT, LocalMesh
from meshctl.mesh import HTTP_OFFSET, METRICS_OFFSET, ORCHESTRATOR, MeshFileError, load_mesh
from meshctl.process import (
    MeshStartupError,
    MeshStopped,
    connect_host,
)


def _service_counts(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if not name or not value.isdigit():
        raise argparse.ArgumentTypeError("expected SERVICE=N, e.g. features=2")
    return name, int(value)


def _service_path(text: str) -> tuple[str, Path]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError("expected SERVICE=PATH")
    return name, Path(value)


def build_parser(prog: str = "python -m meshctl.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a mesh file's services and its orchestrator as local processes until Ctrl-C.",
    )
    parser.add_argument(
        "mesh",
        nargs="?",
        type=Path,
        default=DEMO_MESH,
        help="the mesh file (default: the demo's, demo/mesh.yaml)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address every node listens on (default: %(default)s)"
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="lay the ports out around this base instead of the mesh file's: the orchestrator at "
        "base+1, the services at base+11, +21, ...; 0 = free ports",
    )
    parser.add_argument(
        "--port",
        type=_service_counts,
        action="append",
        default=[],
        metavar="SERVICE=PORT",
        help="first port of one service, e.g. features=9021 (repeatable)",
    )
    parser.add_argument(
        "--replicas",
        type=_service_counts,
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="replicas of one service on consecutive ports, e.g. features=2 (repeatable)",
    )
    parser.add_argument(
        "--model-dir",
        type=_service_path,
        action="append",
        default=[],
        metavar="SERVICE=PATH",
        help="model directory of one service (repeatable)",
    )
    parser.add_argument(
        "--graphs", type=Path, default=None, help="graph spec (default: the mesh file's graphs)"
    )
    parser.add_argument("--no-orchestrator", action="store_true", help="start only the services")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help=f"Prometheus /metrics on every node, at its gRPC port + {METRICS_OFFSET}",
    )
    parser.add_argument(
        "--no-http",
        action="store_true",
        help=f"no KServe v2 REST (default: at each gRPC port + {HTTP_OFFSET})",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help=f"mTLS between every node and a bearer token at the orchestrator, from {CERTS_DIR.name}/ "
        "(made by `make certs` if missing); health on plaintext ports, no REST",
    )
    parser.add_argument(
        "--no-restart",
        action="store_true",
        help="leave a node that exits on its own stopped (by default it is restarted, with back-off)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="(default: %(default)s)"
    )
    parser.add_argument("--log-level", default="INFO", help="(default: %(default)s)")
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=STARTUP_TIMEOUT,
        help="seconds per node (default: %(default)s)",
    )
    return parser


def mesh_from_args(args: argparse.Namespace, echo: TextIO | None) -> LocalMesh:
    replicas = dict(args.replicas)
    for service, count in replicas.items():
        if count < 1:
            raise ValueError(f"--replicas {service}={count}: at least 1")
    mesh = load_mesh(args.mesh)
    ports = mesh.ports(args.base_port) if args.base_port is not None else {}
    return LocalMesh(
        mesh,
        host=args.host,
        ports={**ports, **dict(args.port)},
        replicas=replicas,
        include_orchestrator=not args.no_orchestrator,
        http=not args.no_http,
        metrics=args.metrics,
        graphs=args.graphs,
        model_dirs=dict(args.model_dir),
        log_format=args.log_format,
        log_level=args.log_level,
        echo=echo,
        startup_timeout=args.startup_timeout,
        restart=not args.no_restart,
        tls=local_certs() if args.tls else None,
    )


def local_certs(directory: Path = CERTS_DIR) -> Path:
    """`directory` with a local CA, node certificate and token; made now if missing."""
    if not all((directory / name).exists() for name in ("ca.pem", "node.pem", "node-key.pem", "tokens")):
        make_local(directory)
    return directory


def ready_lines(mesh: LocalMesh, graphs: Sequence[str], base_port: int | None = None) -> list[str]:
    """What `make run` prints once everything is SERVING: endpoints, a ready line, and a hint.

    `base_port`: the layout the mesh was started with, for the hint (None: the default).
    """
    default_base = mesh.mesh.base_port
    lines = ["onnxmesh endpoints:"]
    width = max(len(p.name) for p in mesh.processes())
    host = connect_host(mesh.host)
    for p in mesh.processes():
        extra = "".join(
            f"  {label} {host}:{port}"
            for label, port in (("rest", p.http_port), ("metrics", p.metrics_port), ("health", p.health_port))
            if port is not None
        )
        lines.append(f"  {p.name:<{width}}  grpc {p.address:<21}{extra}  pid {p.pid}")
    layout = "" if base_port in (None, default_base) else f" --base-port {base_port}"
    if mesh.mesh.path != DEMO_MESH.resolve():
        layout += f" --mesh {mesh.mesh.path}"
    if mesh.include_orchestrator:
        address = mesh.address(ORCHESTRATOR)
        metrics = [f"{host}:{p.metrics_port}" for p in mesh.processes() if p.metrics_port is not None]
        lines.append(
            f"onnxmesh ready: orchestrator {address} (graphs: {', '.join(graphs) or 'none answered'})"
            + (f"; metrics: {', '.join(metrics)}" if metrics else "")
        )
        target = "" if address == f"127.0.0.1:{mesh.mesh.ports()[ORCHESTRATOR]}" else f" --target {address}"
        example = graphs[0] if graphs else mesh.mesh.graph_names()[0]
        every = layout if layout or not target else ""
        cli = cli_command()
        if mesh.mesh.path == DEMO_MESH.resolve():
            lines.append(
                f"try: {cli} predict {example}{target}   (also: {cli} models{every}, {cli} health{every})"
            )
        else:  # predict sends digits: any other mesh is asked what it serves
            # Free ports (--base-port 0) lay out nothing a flag could name: point at the orchestrator.
            where = f" --target {address}" if base_port == 0 else layout
            lines.append(f"try: {cli} models{where}   (also: {cli} health{where})")
        rest = mesh.process(ORCHESTRATOR).http_port
        if rest is not None:
            lines.append(f"     curl {host}:{rest}/v2/models/{example}   (KServe v2 REST)")
    else:
        services = ", ".join(f"{s} {mesh.target(s)}" for s in mesh.model_services)
        lines.append(f"onnxmesh ready: {services} (no orchestrator)")
        lines.append(f"try: {cli_command()} models{layout}")
    if mesh.tls is not None:
        d = mesh.tls
        lines.append(
            f"mTLS on, token required: export ONNXMESH_TLS_CERT={d}/node.pem ONNXMESH_TLS_KEY={d}/node-key.pem "
            f"ONNXMESH_TLS_CA={d}/ca.pem ONNXMESH_TOKEN_FILE={d}/tokens   (for onnxmesh and bench)"
        )
    lines.append("Ctrl-C stops the mesh.")
    return lines


def cli_command() -> str:
    """How to run the `onnxmesh` command from here: the venv's script (`.venv/bin/onnxmesh` from
    the checkout), which works without activating the venv; `python -m meshctl` without it."""
    script = Path(sys.executable).parent / "onnxmesh"
    if not script.exists():
        return f"{sys.executable} -m meshctl"
    try:
        return str(script.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(script.absolute())


def main(argv: Sequence[str] | None = None, prog: str = "python -m meshctl.run") -> int:
    """Start the mesh, print where it listens, and keep it running until Ctrl-C or SIGTERM."""
    args = build_parser(prog).parse_args(argv)
    try:
        mesh = mesh_from_args(args, echo=sys.stdout)
    except MeshFileError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"onnxmesh: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        # No exception from here: one raised between Popen() and its bookkeeping would orphan a
        # node. start() notices the flag within a poll interval and stops what it started.
        if stopping.is_set():
            mesh.kill()  # a second Ctrl-C: no more waiting for drains
        stopping.set()
        mesh.interrupt()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    names = " ".join(f"{s}x{mesh.replicas[s]}" if mesh.replicas[s] > 1 else s for s in mesh.services)
    print(f"onnxmesh: starting {names} on {args.host}", flush=True)
    code = 0
    try:
        mesh.start()
        graphs = mesh.served_graphs() if mesh.include_orchestrator else []
        print("\n".join(ready_lines(mesh, graphs, args.base_port)), flush=True)
        _watch(mesh, stopping)
    except MeshStopped:
        pass
    except MeshStartupError as exc:
        print(f"onnxmesh: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        stopping.set()
        print("onnxmesh: stopping", flush=True)
        mesh.stop()
        print(stopped_line(mesh.exit_codes), flush=True)
    if code == 0 and any(mesh.exit_codes.values()):
        code = 1
    return code


def stopped_line(codes: Mapping[str, int]) -> str:
    """The last line: whether every node drained and exited 0, else which did not and how."""
    if not codes:
        return "onnxmesh: stopped (nothing was running)"
    unclean = {name: code for name, code in codes.items() if code != 0}
    if not unclean:
        return f"onnxmesh: stopped cleanly ({', '.join(codes)}: drained, exit 0)"
    return "onnxmesh: stopped, not cleanly: " + ", ".join(
        f"{name} {exit_reason(code)}" for name, code in unclean.items()
    )


def exit_reason(code: int) -> str:
    """`exit 3`, or `killed by SIGKILL` for a negative code (Popen's way to say a signal)."""
    if code >= 0:
        return f"exit {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _watch(mesh: LocalMesh, stopping: threading.Event) -> None:
    """Wait for a signal; say so when a node exits on its own (the rest keep serving)."""
    reported: set[int] = set()
    while not stopping.wait(0.5):
        for proc in mesh.processes():
            if not proc.running and proc.pid not in reported:
                reported.add(proc.pid)
                print(f"onnxmesh: {proc.name} exited with code {proc.returncode}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
