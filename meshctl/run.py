"""`python -m meshctl.run` (`make run`): the local mesh from a terminal.

Starts every node as its own process (`meshctl.launcher.LocalMesh`), prints one ready line with
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
from meshctl.launcher import (
    BASE_PORT,
    CERTS_DIR,
    DEFAULT_GRAPHS,
    HTTP_OFFSET,
    METRICS_OFFSET,
    STARTUP_TIMEOUT,
    LocalMesh,
    ports_from_base,
)
from meshctl.process import (
    MeshStartupError,
    MeshStopped,
    connect_host,
)
from services.common.topology import (
    DEFAULT_PORTS,
    MODEL_SERVICES,
    ORCHESTRATOR,
    PREPROCESS,
    SERVICES,
    address_variable,
)


def _service_counts(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in SERVICES or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected SERVICE=N with SERVICE one of {', '.join(SERVICES)}")
    return name, int(value)


def _service_path(text: str) -> tuple[str, Path]:
    name, _, value = text.partition("=")
    if name not in SERVICES or not value:
        raise argparse.ArgumentTypeError(f"expected SERVICE=PATH with SERVICE one of {', '.join(SERVICES)}")
    return name, Path(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m meshctl.run",
        description="Run the onnxmesh services and the orchestrator as local processes until Ctrl-C.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address every node listens on (default: %(default)s)"
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=BASE_PORT,
        help="ports are base"
        + ", ".join(f"+{port - BASE_PORT} ({service})" for service, port in DEFAULT_PORTS.items())
        + "; 0 = free ports (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=_service_counts,
        action="append",
        default=[],
        metavar="SERVICE=PORT",
        help="first port of one service, e.g. model_a=9021 (repeatable)",
    )
    parser.add_argument(
        "--replicas",
        type=_service_counts,
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="replicas of one service on consecutive ports, e.g. model_a=2 (repeatable)",
    )
    parser.add_argument(
        "--model-dir",
        type=_service_path,
        action="append",
        default=[],
        metavar="SERVICE=PATH",
        help="model directory of one service (repeatable)",
    )
    parser.add_argument("--graphs", type=Path, default=None, help=f"graph spec (default: {DEFAULT_GRAPHS})")
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
    return LocalMesh(
        host=args.host,
        ports={**ports_from_base(args.base_port), **dict(args.port)},
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
    layout = "" if base_port in (None, BASE_PORT) else f" --base-port {base_port}"
    if mesh.include_orchestrator:
        address = mesh.address(ORCHESTRATOR)
        metrics = [f"{host}:{p.metrics_port}" for p in mesh.processes() if p.metrics_port is not None]
        lines.append(
            f"onnxmesh ready: orchestrator {address} (graphs: {', '.join(graphs) or 'none answered'})"
            + (f"; metrics: {', '.join(metrics)}" if metrics else "")
        )
        target = "" if address == f"127.0.0.1:{DEFAULT_PORTS[ORCHESTRATOR]}" else f" --target {address}"
        example = "digits-parallel" if "digits-parallel" in graphs or not graphs else graphs[0]
        every = layout if layout or not target else ""
        cli = cli_command()
        lines.append(
            f"try: {cli} predict {example}{target}   (also: {cli} models{every}, {cli} health{every})"
        )
        rest = mesh.process(ORCHESTRATOR).http_port
        if rest is not None:
            lines.append(f"     curl {host}:{rest}/v2/models/{example}   (KServe v2 REST)")
    else:
        services = ", ".join(f"{s} {mesh.target(s)}" for s in MODEL_SERVICES)
        lines.append(f"onnxmesh ready: {services} (no orchestrator)")
        # predict sends a model its image through preprocess: say where preprocess is if not at home.
        env = ""
        if mesh.address(PREPROCESS) != f"127.0.0.1:{DEFAULT_PORTS[PREPROCESS]}":
            env = f"{address_variable(PREPROCESS)}={mesh.address(PREPROCESS)} "
        lines.append(
            f"try: {env}{cli_command()} predict digits-mlp --target {mesh.address('model_a')}{layout}"
        )
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


def main(argv: Sequence[str] | None = None) -> int:
    """Start the mesh, print where it listens, and keep it running until Ctrl-C or SIGTERM."""
    args = build_parser().parse_args(argv)
    try:
        mesh = mesh_from_args(args, echo=sys.stdout)
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
