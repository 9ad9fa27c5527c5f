"""`onnxmesh`: call the mesh from a terminal (predict, models, health, rollout, batch and jobs).

    onnxmesh predict [GRAPH] [--input NAME=FILE.npy ...] [--target HOST:PORT] (+ the mesh's client file's options)
    onnxmesh models  [--target HOST:PORT ...] [--model NAME ...]
    onnxmesh health  [--target HOST:PORT ...] [--service NAME]
    (each also takes --base-port N: the local mesh's layout, as `make run ARGS=--base-port N`)
    onnxmesh up [MESH] [--base-port N ...]  run a mesh file's services and orchestrator locally (meshctl.run)
    onnxmesh check MESH  the mesh file, its model directories and graphs, without starting anything
    onnxmesh k8s MESH --out DIR  a kustomize base for the mesh (meshctl/k8s.py)
    onnxmesh images MESH  one image per service of the mesh (meshctl/images.py)
    onnxmesh rollout SUBCOMMAND ... (Kubernetes: meshctl.rollout, with the k8s extra)
    onnxmesh batch|submit|result|jobs ... (batch and asynchronous serving: jobs.cli, jobs extra)
    onnxmesh capture export|prune ... (payload capture records: jobs.capture_cli, jobs extra)

Every call goes through the shared OipClient with short timeouts. When nothing answers, the
CLI says so in one line and exits 1 (never a traceback): start the mesh with `make run`.
Where calls go (one layout for every address): meshctl/targets.py; predict: meshctl/predict.py.
`main()` returns the exit code; the console script passes it to sys.exit.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from meshctl.client import ClientError, MeshClient, load_client
from meshctl.launcher import probe_models
from meshctl.predict import describe_signature, parse_input, run_predict
from meshctl.targets import (
    MESH_ENV,
    TARGET_ENV,
    CliError,
    check_target,
    current_mesh,
    detail,
    explain,
    local_endpoints,
    unreachable,
)
from services.common.errors import MeshError, NotFound
from services.common.grpc.client import OipClient
from services.common.grpc.security import SecurityError
from services.common.settings import positive_int
from services.common.types import ModelSignature

ROLLOUT = "rollout"
#: Run a mesh locally: meshctl.run parses its arguments.
UP = "up"
#: Batch and asynchronous serving (jobs.cli, with the jobs extra): handed over unparsed, like rollout.
JOB_COMMANDS = {
    "batch": "run a graph over a dataset, predictions into a database",
    "submit": "submit asynchronous jobs; prints their ids",
    "result": "status and answer of an asynchronous job",
    "jobs": "recent asynchronous jobs; --cancel ID",
    "capture": "export (Parquet) or prune payload capture records",
}
JOBS_EXTRA = "pip install 'onnxmesh[jobs]'"
# -- models and health ---------------------------------------------------------------------------------


def _targets(args: argparse.Namespace) -> dict[str, str]:
    """label -> target: the --target flags, else $ONNXMESH_TARGET, else every endpoint of the local layout."""
    if args.target:
        return {target: check_target(target) for target in args.target}
    env = os.environ.get(TARGET_ENV)
    if env:
        return {env: check_target(env)}
    return {f"{service} {addr}": addr for service, addr in local_endpoints(args.base_port).items()}


async def _models(args: argparse.Namespace) -> int:
    """Each target's server name, what its RepositoryIndex lists (state and reason of each
    model version) and the signatures of the models that serve.

    Exit 1 when a target cannot be reached, or when a name asked for with --model is served by none.
    """
    targets = _targets(args)
    unreachable_targets, found = 0, set[str]()
    for label, target in targets.items():
        async with OipClient(target) as client:
            try:
                server, version = await client.server_metadata(timeout=args.timeout)
            except MeshError as err:
                print(f"{label}: {explain(target, err, connecting=True)}")
                unreachable_targets += 1
                continue
        print(f"{label}: server {server} {version}")
        try:
            async with OipClient(target) as client:
                index = await client.repository_index(timeout=args.timeout)
        except MeshError as err:
            print(f"  RepositoryIndex failed: {explain(target, err)}")
            continue
        served = [e.name for e in index if args.model is None or e.name in args.model]
        answers = await probe_models(target, dict.fromkeys(served), timeout=args.timeout)
        for entry in index:
            if args.model is not None and entry.name not in args.model:
                continue
            answer = answers.get(entry.name)
            if entry.state == "READY" and isinstance(answer, ModelSignature):
                found.add(entry.name)
                print("  " + describe_signature(answer).replace("\n", "\n  "))
            else:
                print(
                    f"  {entry.name}  version {entry.version}: {entry.state}"
                    + (f" ({entry.reason})" if entry.reason else "")
                )
        for name in args.model or ():
            if name not in answers and len(targets) == 1:  # asked for by name: say it is missing
                print(f"  {name}: not served here")
        if not index:
            print("  (no models)")
    missing = [name for name in args.model or () if name not in found]
    if missing and len(targets) > 1:
        print(f"not served by any endpoint: {', '.join(missing)}")
    return 1 if unreachable_targets or missing else 0


async def _health(args: argparse.Namespace) -> int:
    targets = _targets(args)
    width = max(len(label) for label in targets)

    why: dict[str, str] = {}  # the first unreachable target's cause and fix

    async def check(target: str) -> str:
        async with OipClient(target) as client:
            try:
                return await client.health(args.service, timeout=args.timeout)
            except MeshError as err:
                if unreachable(err, connecting=True):
                    why.setdefault("line", explain(target, err, connecting=True))
                    return f"UNREACHABLE ({err.code})"
                if isinstance(err, NotFound) and not err.message.strip():
                    return f"NOT_FOUND: no health status for service '{args.service}' ({HEALTH_SERVICES})"
                return f"{err.code}: {detail(err)}"

    statuses = await asyncio.gather(*(check(target) for target in targets.values()))
    for label, status in zip(targets, statuses, strict=True):
        print(f"{label:<{width}}  {status}")
    if any(status.startswith("UNREACHABLE") for status in statuses):
        print(f"onnxmesh: some endpoints cannot be reached; {why['line']}", file=sys.stderr)
    return 0 if all(status == "SERVING" for status in statuses) else 1


HEALTH_SERVICES = "every node has '' (the whole node) and 'inference.GRPCInferenceService'"


# -- parser and main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `onnxmesh` parser. `rollout` takes its arguments unparsed: meshctl.rollout parses them."""
    parser = argparse.ArgumentParser(prog="onnxmesh", description="Call the onnxmesh inference mesh.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="send inputs through a graph or a model")
    client = _mesh_client()
    predict.add_argument(
        "name",
        nargs="?",
        default=client.DEFAULT_NAME if client else None,
        help="graph or model (default: %(default)s; without a client file, the mesh's first graph)",
    )
    predict.add_argument(
        "--input",
        type=parse_input,
        action="append",
        metavar="NAME=FILE.npy",
        help="an input as a .npy array, batch first (repeatable; default: what the mesh's client file sends)",
    )
    predict.add_argument("--version", default="", help="model version (default: the server's choice)")
    if client is not None:
        client.add_arguments(predict)  # the mesh's own options, e.g. which sample to send
    _add_target(predict, "HOST:PORT (default: $ONNXMESH_TARGET, else the local node serving NAME)")
    _add_timeouts(predict, call=10.0)

    models = commands.add_parser("models", help="what each endpoint serves, with signatures")
    _add_target(models, "HOST:PORT (repeatable; default: every local node)", repeat=True)
    models.add_argument("--model", action="append", help="name to look up (repeatable; default: known names)")
    _add_timeouts(models, call=3.0)

    health = commands.add_parser("health", help="grpc.health.v1 status of each endpoint")
    _add_target(health, "HOST:PORT (repeatable; default: every local node)", repeat=True)
    health.add_argument("--service", default="", help="health service name (default: the whole server)")
    _add_timeouts(health, call=2.0)

    commands.add_parser(UP, help="run a mesh file locally until Ctrl-C (onnxmesh up --help)", add_help=False)
    check = commands.add_parser(
        "check", help="check a mesh file, every model directory and every graph, starting nothing"
    )
    check.add_argument("mesh", type=Path, help="the mesh file (YAML)")

    k8s = commands.add_parser("k8s", help="render a mesh file as a kustomize base")
    k8s.add_argument("mesh", type=Path, help="the mesh file (YAML)")
    k8s.add_argument("--out", type=Path, required=True, help="directory to write the base into")

    images = commands.add_parser("images", help="build one image per service of a mesh file")
    images.add_argument("mesh", type=Path, help="the mesh file (YAML)")
    images.add_argument(
        "--engine", choices=("auto", "docker", "podman"), default="auto", help="(default: %(default)s)"
    )
    images.add_argument(
        "--ca-bundle", type=Path, default=None, help="CA bundle the build trusts for PyPI (a build secret)"
    )

    # Only this command needs meshctl.rollout (and the Kubernetes client, an optional extra), so it
    # is imported when the command runs, and parses everything after `rollout` itself.
    commands.add_parser(
        ROLLOUT,
        help="per-model rollouts and canary weights on Kubernetes (onnxmesh rollout --help)",
        add_help=False,
    )
    for name, help in JOB_COMMANDS.items():
        commands.add_parser(name, help=f"{help} (onnxmesh {name} --help)", add_help=False)
    return parser


def _mesh_client() -> MeshClient | None:
    """The current mesh's client file, for predict's options; None when it has none or fails to
    load (predict then says why when it runs)."""
    try:
        return load_client(current_mesh())
    except (CliError, ClientError):
        return None


_MESH_OPTION = argparse.ArgumentParser(add_help=False)
_MESH_OPTION.add_argument("--mesh", type=Path, default=None)


def _add_target(parser: argparse.ArgumentParser, help: str, *, repeat: bool = False) -> None:
    parser.add_argument("--target", action="append" if repeat else "store", help=help)
    parser.add_argument(
        "--mesh",
        type=Path,
        default=None,
        help=f"the local mesh's file, for its endpoints (default: ${MESH_ENV}, else ./mesh.yaml, else the demo's)",
    )
    parser.add_argument(
        "--base-port",
        type=positive_int,
        default=None,
        help="the local mesh's base port, as given to the launcher (default: the mesh file's)",
    )


def _add_timeouts(parser: argparse.ArgumentParser, *, call: float) -> None:
    parser.add_argument("--timeout", type=float, default=call, help="seconds per call (default: %(default)s)")
    parser.add_argument(
        "--connect-timeout", type=float, default=3.0, help="seconds for the first call (default: %(default)s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `onnxmesh` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("predict", "models", "health"):
        # The mesh file every address of this run comes from, and predict's options (its client file).
        named, _ = _MESH_OPTION.parse_known_args(argv[1:])
        if named.mesh is not None:
            os.environ[MESH_ENV] = str(named.mesh)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in (ROLLOUT, UP) and args.command not in JOB_COMMANDS and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "predict":
            return asyncio.run(run_predict(args))
        if args.command == "models":
            return asyncio.run(_models(args))
        if args.command == "health":
            return asyncio.run(_health(args))
        if args.command == UP:
            from meshctl import run

            return run.main(rest, prog=f"onnxmesh {UP}")
        if args.command == "images":
            return _images(args.mesh, args.engine, args.ca_bundle)
        if args.command == "k8s":
            return _k8s(args.mesh, args.out)
        if args.command == "check":
            return _check(args.mesh)
        if args.command == ROLLOUT:
            return _rollout(rest)
        if args.command in JOB_COMMANDS:
            return _jobs([args.command, *rest])
        raise CliError(f"unknown command {args.command}")
    except (CliError, SecurityError) as exc:
        print(f"onnxmesh: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `onnxmesh ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not fail again, and stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _check(path: Path) -> int:
    """Exit 0 when the mesh file, every model and every graph are fine; else list every problem."""
    from meshctl.check import check_models
    from meshctl.mesh import MeshFileError, load_mesh

    try:
        mesh = load_mesh(path)
    except MeshFileError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        print(f"onnxmesh check: {len(exc.problems)} problem(s) in {path}", file=sys.stderr)
        return 1
    print(f"{path}: {len(mesh.services)} service(s), {len(mesh.spec.graphs)} graph(s)")
    report = check_models(mesh)
    if report.problems:
        print("\n".join(report.problems), file=sys.stderr)
        print(f"onnxmesh check: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print("ok")
    return 0


def _images(path: Path, engine: str, ca_bundle: Path | None) -> int:
    import subprocess

    from meshctl import images
    from meshctl.engine import EngineUnavailable
    from meshctl.mesh import MeshFileError, load_mesh

    try:
        # Progress on stderr; stdout lists the images built, one per line.
        say = functools.partial(print, file=sys.stderr, flush=True)
        built = images.build(load_mesh(path), engine_name=engine, ca_bundle=ca_bundle, log=say)
    except MeshFileError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except EngineUnavailable as exc:
        print(f"onnxmesh images: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"onnxmesh images: the build failed:\n{(exc.stderr or '')[-3000:]}", file=sys.stderr)
        return 1
    print("\n".join(built))
    return 0


def _k8s(path: Path, out: Path) -> int:
    from meshctl import k8s
    from meshctl.mesh import MeshFileError, load_mesh

    try:
        mesh = load_mesh(path)
    except MeshFileError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    for written in k8s.write(mesh, out):
        print(written)
    print(f"apply with: kubectl apply -k {out}")
    return 0


def _rollout(argv: Sequence[str]) -> int:
    from meshctl import rollout

    return rollout.main(argv, prog=f"onnxmesh {ROLLOUT}")


def _jobs(argv: Sequence[str]) -> int:
    try:
        from jobs import cli as jobs_cli
    except ModuleNotFoundError as exc:  # the jobs extra (SQLAlchemy, ...) is not installed
        print(f"onnxmesh {argv[0]}: needs {exc.name}: {JOBS_EXTRA}", file=sys.stderr)
        return 2
    return jobs_cli.main(argv, prog="onnxmesh")


if __name__ == "__main__":
    sys.exit(main())
