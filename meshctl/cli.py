"""`onnxmesh`: call the mesh from a terminal (predict, models, health, rollout, batch and jobs).

    onnxmesh predict [digits-parallel] [--index N | --image FILE] [--count K] [--target HOST:PORT]
    onnxmesh models  [--target HOST:PORT ...] [--model NAME ...]
    onnxmesh health  [--target HOST:PORT ...] [--service NAME]
    (each also takes --base-port N: the local mesh's layout, as `make run ARGS=--base-port N`)
    onnxmesh rollout SUBCOMMAND ... (Kubernetes: meshctl.rollout, with the k8s extra)
    onnxmesh batch|submit|result|jobs ... (batch and asynchronous serving: jobs.cli, jobs extra)

Every call goes through the shared OipClient with short timeouts. When nothing answers, the
CLI says so in one line and exits 1 (never a traceback): start the mesh with `make run`.
Every address comes from one layout: `--target`, else $ONNXMESH_TARGET, else the local node
serving the name at `--base-port` (default 8000). Calls `predict` chains to build a model's
inputs (preprocess, model_a) go to $ONNXMESH_SERVICE_<NAME>_ADDRESS, else to the same layout
as the target (its host, and the base its port implies for the service it names).
`main()` returns the exit code; the console script passes it to sys.exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from meshctl.launcher import BASE_PORT, ports_from_base, probe_models
from services.common.client import OipClient
from services.common.digits import IMAGE_SHAPE, PIXEL_MAX, load_holdout
from services.common.errors import DeadlineExceeded, MeshError, NotFound, Unavailable
from services.common.index_client import repository_index
from services.common.topology import (
    DEFAULT_GRAPH_NAMES,
    DEFAULT_PORTS,
    MODEL_A,
    ORCHESTRATOR,
    PREPROCESS,
    SERVICE_MODELS,
    address_variable,
)
from services.common.types import InferResult, ModelSignature

DEFAULT_GRAPH = "digits-parallel"
ROLLOUT = "rollout"
#: Batch and asynchronous serving (jobs.cli, with the jobs extra): handed over unparsed, like rollout.
JOB_COMMANDS = {
    "batch": "run a graph over a dataset, predictions into a database",
    "submit": "submit asynchronous jobs; prints their ids",
    "result": "status and answer of an asynchronous job",
    "jobs": "recent asynchronous jobs; --cancel ID",
}
JOBS_EXTRA = "pip install 'onnxmesh[jobs]'"
TARGET_ENV = "ONNXMESH_TARGET"
LOCAL_HOST = "127.0.0.1"


def local_endpoints(base: int | None = None, host: str = LOCAL_HOST) -> dict[str, str]:
    """Each node's address in a local mesh laid out from `base` (the launcher's --base-port)."""
    ports = ports_from_base(BASE_PORT if base is None else base)
    return {service: f"{host}:{port}" for service, port in ports.items()}


#: Each local endpoint `health` and `models` look at when no --target is given.
LOCAL_ENDPOINTS = local_endpoints()
#: Model name -> the service that serves it in the local mesh (graphs are the orchestrator's).
MODEL_SERVICE = {model: service for service, models in SERVICE_MODELS.items() for model in models} | {
    graph: ORCHESTRATOR for graph in DEFAULT_GRAPH_NAMES
}
#: How `predict` builds an input other than the image when it calls a model directly:
#: input name -> (model that outputs it, that model's input, service serving it).
PRODUCERS = {
    "features": ("digits-preprocess", "image", PREPROCESS),
    "embedding": ("digits-mlp", "features", MODEL_A),
}


class CliError(Exception):
    """A problem to report in one line, with exit code 1."""


# -- targets and errors ------------------------------------------------------------------------------


def default_target(name: str, base: int | None = None) -> str:
    """Where `predict NAME` goes without --target: $ONNXMESH_TARGET, else the local service serving NAME."""
    env = os.environ.get(TARGET_ENV)
    if env:
        return check_target(env)
    return local_endpoints(base)[MODEL_SERVICE.get(name, ORCHESTRATOR)]


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
    if base is None and port.isdigit() and name in MODEL_SERVICE:
        implied = int(port) - (DEFAULT_PORTS[MODEL_SERVICE[name]] - BASE_PORT)
        base = implied if implied > 0 else None
    return local_endpoints(base, host if base is not None and host else LOCAL_HOST)


def service_address(service: str, layout: Mapping[str, str] | None = None) -> str:
    """A service's address for chained calls: the orchestrator's env override, else the layout's."""
    return os.environ.get(address_variable(service)) or (layout or LOCAL_ENDPOINTS)[service]


#: What gRPC says when no connection could be made (as opposed to a server answering UNAVAILABLE).
_CONNECT_FAILURES = ("failed to connect", "connection refused", "all backends failing", "errors resolving")
_DNS_FAILURES = ("errors resolving", "dns resolution failed", "name resolution", "could not resolve")
MESH_HINT = "is the mesh running? start it with 'make run'"


def unreachable(err: MeshError, *, connecting: bool = False) -> bool:
    """True when the call never reached a server; a deadline counts only on a first (connect) call."""
    if isinstance(err, DeadlineExceeded):
        return connecting
    return isinstance(err, Unavailable) and any(s in err.message.lower() for s in _CONNECT_FAILURES)


def detail(err: MeshError) -> str:
    """The error's message, never empty."""
    return err.message.strip() or f"the server gave no detail for {err.code}"


def explain(target: str, err: MeshError, *, connecting: bool = False) -> str:
    """One line for a failed call; an unreachable target gets a hint (a DNS problem, or the mesh down)."""
    if any(s in err.message.lower() for s in _DNS_FAILURES):
        host = target.rpartition(":")[0] or target
        return f"cannot resolve '{host}' ({err.code}): check the host name in {target}"
    if unreachable(err, connecting=connecting):
        return f"cannot reach {target} ({err.code}): {MESH_HINT}"
    return f"{target}: {err.code}: {detail(err)}"


# -- images --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """Images to send, with their true labels when they come from the held-out set."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64] | None
    description: list[str]


def load_image(path: Path) -> NDArray[np.uint8]:
    """One 8x8 image from a `.npy` file (8x8, 1x8x8 or 64 values) or a text/CSV file of 64 integers 0..16."""
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: cannot read an image: {exc}") from None
    values = np.asarray(values)
    if values.size != 64:
        raise CliError(f"{path}: expected 64 pixel values (an 8x8 image), found {values.size}")
    if (
        values.dtype.kind not in "biuf"
        or not np.all(np.isfinite(values))
        or np.any(values != np.round(values))
    ):
        raise CliError(f"{path}: expected integer pixel values 0..{PIXEL_MAX}")
    if values.min() < 0 or values.max() > PIXEL_MAX:
        raise CliError(
            f"{path}: pixel values must be 0..{PIXEL_MAX}, found {values.min():g}..{values.max():g}"
        )
    return values.reshape(IMAGE_SHAPE).astype(np.uint8)


def select_digits(args: argparse.Namespace) -> Digits:
    if args.image is not None:
        image = load_image(args.image)
        return Digits(image[None], None, [str(args.image)])
    try:
        holdout = load_holdout(args.data)
    except (OSError, KeyError, ValueError) as exc:
        raise CliError(
            f"{args.data or 'the held-out digits'}: cannot read the held-out digits: {exc}"
        ) from None
    images, labels = holdout.images, holdout.labels
    if args.index >= len(images):
        raise CliError(
            f"--index {args.index} is out of range: the held-out set has {len(images)} images (0..{len(images) - 1})"
        )
    if args.count > len(images):
        raise CliError(f"--count {args.count} is more than the {len(images)} held-out images")
    rows = [(args.index + i) % len(images) for i in range(args.count)]  # wraps around the set
    return Digits(images[rows], labels[rows], [f"held-out #{row}" for row in rows])


# -- output formatting ---------------------------------------------------------------------------------


def format_probabilities(probabilities: NDArray[Any]) -> str:
    """`0:.00 1:.00 ... 3:.97 ...` with the top class marked."""
    top = int(np.argmax(probabilities))
    cells = [f"{i}:{p:.2f}" + ("*" if i == top else "") for i, p in enumerate(probabilities.tolist())]
    return " ".join(cells)


def response_details(parameters: Mapping[str, object], prefix: str) -> dict[str, str]:
    """`step.<name>` / `version.<name>` parameters of a graph's answer, keyed by name."""
    return {k[len(prefix) :]: str(v) for k, v in sorted(parameters.items()) if k.startswith(prefix)}


def step_outcome(status: str) -> str:
    """`ok`, `error`, `timeout`, `skipped`: the first word of a `step.<name>` value."""
    return status.split(":", 1)[0].strip()


def predicted_labels(result: InferResult) -> NDArray[np.int64] | None:
    if "label" in result.outputs:
        return np.asarray(result.outputs["label"], np.int64).reshape(-1)
    if "probabilities" in result.outputs:
        return np.asarray(np.argmax(result.outputs["probabilities"], axis=1), np.int64)
    return None


def describe_signature(sig: ModelSignature) -> str:
    def tensors(specs: Sequence[Any]) -> str:
        return ", ".join(f"{t.name} {t.describe()}" for t in specs)

    return (
        f"{sig.name}  versions: {', '.join(sig.versions) or '-'}  platform: {sig.platform or '-'}\n"
        f"    inputs:  {tensors(sig.inputs)}\n    outputs: {tensors(sig.outputs)}"
    )


# -- predict -------------------------------------------------------------------------------------------


class Inputs:
    """Builds a model's inputs from images: the image itself, or what an upstream model makes of it.

    Calling a model directly (e.g. digits-mlp takes `features`) then works like the graphs do:
    the image goes through the producers in PRODUCERS first. One client per upstream address.
    """

    def __init__(self, timeout: float, layout: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        self.layout = layout
        self.chain: list[str] = []
        self._clients: dict[str, OipClient] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def build(self, sig: ModelSignature, images: NDArray[np.uint8]) -> dict[str, NDArray[Any]]:
        self.chain = []
        return {spec.name: await self._tensor(spec.name, images, ()) for spec in sig.inputs}

    async def _tensor(self, name: str, images: NDArray[np.uint8], seen: tuple[str, ...]) -> NDArray[Any]:
        if name == "image":
            return images
        if name not in PRODUCERS or name in seen:
            raise CliError(f"predict can only send an image; it does not know how to make input '{name}'")
        model, model_input, service = PRODUCERS[name]
        upstream = await self._tensor(model_input, images, (*seen, name))
        address = service_address(service, self.layout)
        self.chain.append(f"{model} @ {address}")
        client = self._clients.setdefault(address, OipClient(address))
        try:
            result = await client.infer(model, {model_input: upstream}, [name], timeout=self.timeout)
        except MeshError as err:
            raise CliError(f"input '{name}' from {model}: {explain(address, err, connecting=True)}") from None
        return result.outputs[name]


async def _predict_one(
    client: OipClient,
    sig: ModelSignature,
    inputs: Inputs,
    images: NDArray[np.uint8],
    args: argparse.Namespace,
) -> tuple[InferResult, float]:
    tensors = await inputs.build(sig, images)
    started = time.perf_counter()
    result = await client.infer(args.name, tensors, version=args.version, timeout=args.timeout)
    return result, time.perf_counter() - started


async def _predict(args: argparse.Namespace) -> int:
    target = check_target(args.target) if args.target else default_target(args.name, args.base_port)
    digits = select_digits(args)
    inputs = Inputs(args.timeout, layout_near(target, args.name, args.base_port))
    async with OipClient(target) as client:
        try:
            sig = await client.metadata(args.name, args.version, timeout=args.connect_timeout)
        except NotFound as err:
            raise CliError(f"{target} does not serve '{args.name}': {err.message}") from None
        except MeshError as err:
            raise CliError(explain(target, err, connecting=True)) from None
        try:
            if args.count == 1:
                return await _predict_single(client, sig, inputs, digits, target, args)
            return await _predict_many(client, sig, inputs, digits, target, args)
        finally:
            await inputs.close()


async def _predict_single(
    client: OipClient,
    sig: ModelSignature,
    inputs: Inputs,
    digits: Digits,
    target: str,
    args: argparse.Namespace,
) -> int:
    try:
        result, seconds = await _predict_one(client, sig, inputs, digits.images, args)
    except MeshError as err:
        raise CliError(explain(target, err)) from None
    version = result.model_version or "-"
    print(f"{result.model_name or args.name} (version {version}) @ {target}  {seconds * 1000:.1f} ms")
    if inputs.chain:
        print(f"  inputs made by: {' -> '.join(inputs.chain)}")
    truth = f" (true label {int(digits.labels[0])})" if digits.labels is not None else ""
    print(f"  image:         {digits.description[0]}{truth}")
    labels = predicted_labels(result)
    if labels is not None:
        verdict = ""
        if digits.labels is not None:
            verdict = "  correct" if labels[0] == digits.labels[0] else "  WRONG"
        print(f"  predicted:     {int(labels[0])}{verdict}")
    if "probabilities" in result.outputs:
        print(f"  probabilities: {format_probabilities(result.outputs['probabilities'][0])}")
    for name, array in result.outputs.items():
        if name not in ("label", "probabilities"):
            head = " ".join(f"{v:.3g}" for v in np.asarray(array).reshape(-1)[:8].tolist())
            print(f"  {name}: {array.dtype}{list(array.shape)} [{head} ...]")
    _print_details(result.parameters)
    return 0


def _print_details(parameters: Mapping[str, object]) -> None:
    steps = response_details(parameters, "step.")
    versions = response_details(parameters, "version.")
    if steps:
        print("  steps:         " + "  ".join(f"{k}={v}" for k, v in steps.items()))
    if versions:
        print("  versions:      " + "  ".join(f"{k}={v}" for k, v in versions.items()))


async def _predict_many(
    client: OipClient,
    sig: ModelSignature,
    inputs: Inputs,
    digits: Digits,
    target: str,
    args: argparse.Namespace,
) -> int:
    """One request per image, in order; accuracy, latency, errors and how each step fared."""
    correct, latencies, errors = 0, [], Counter[str]()
    steps: dict[str, Counter[str]] = {}
    assert digits.labels is not None  # --count needs held-out digits (checked by the parser)
    for i in range(len(digits.images)):
        try:
            result, seconds = await _predict_one(client, sig, inputs, digits.images[i : i + 1], args)
        except MeshError as err:
            errors[explain(target, err)] += 1
            continue
        latencies.append(seconds)
        labels = predicted_labels(result)
        correct += int(labels is not None and labels[0] == digits.labels[i])
        for step, status in response_details(result.parameters, "step.").items():
            steps.setdefault(step, Counter())[step_outcome(status)] += 1
    answered = len(latencies)
    print(f"{args.name} @ {target}: {len(digits.images)} requests ({digits.description[0]} onwards)")
    if answered:
        ms = np.asarray(latencies) * 1000
        print(f"  accuracy: {correct}/{answered} = {correct / answered:.1%}")
        print(f"  latency:  p50 {np.percentile(ms, 50):.1f} ms  p99 {np.percentile(ms, 99):.1f} ms")
    for step, counts in sorted(steps.items()):
        print(f"  step {step}: " + ", ".join(f"{outcome} {n}" for outcome, n in counts.most_common()))
    for message, n in errors.most_common():
        print(f"  failed {n}x: {message}")
    return 1 if errors else 0


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
            index = await repository_index(target, timeout=args.timeout)
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

    async def check(target: str) -> str:
        async with OipClient(target) as client:
            try:
                return await client.health(args.service, timeout=args.timeout)
            except MeshError as err:
                if unreachable(err, connecting=True):
                    return f"UNREACHABLE ({err.code})"
                if isinstance(err, NotFound) and not err.message.strip():
                    return f"NOT_FOUND: no health status for service '{args.service}' ({HEALTH_SERVICES})"
                return f"{err.code}: {detail(err)}"

    statuses = await asyncio.gather(*(check(target) for target in targets.values()))
    for label, status in zip(targets, statuses, strict=True):
        print(f"{label:<{width}}  {status}")
    if any(status.startswith("UNREACHABLE") for status in statuses):
        print(f"onnxmesh: some endpoints cannot be reached: {MESH_HINT}", file=sys.stderr)
    return 0 if all(status == "SERVING" for status in statuses) else 1


HEALTH_SERVICES = "every node has '' (the whole node) and 'inference.GRPCInferenceService'"


# -- parser and main -----------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `onnxmesh` parser. `rollout` takes its arguments unparsed: meshctl.rollout parses them."""
    parser = argparse.ArgumentParser(prog="onnxmesh", description="Call the onnxmesh inference mesh.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="classify a digit with a graph or a model")
    predict.add_argument(
        "name", nargs="?", default=DEFAULT_GRAPH, help="graph or model (default: %(default)s)"
    )
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--index", type=_non_negative, default=0, help="held-out digit to send (default: 0)")
    source.add_argument(
        "--image", type=Path, help=f".npy (8x8) or text/CSV file of 64 integers 0..{PIXEL_MAX}"
    )
    predict.add_argument("--count", type=_positive, default=1, help="send K consecutive held-out digits")
    predict.add_argument("--version", default="", help="model version (default: the server's choice)")
    predict.add_argument(
        "--data",
        type=Path,
        default=None,
        help="held-out digits (.npz; default: the ones shipped with onnxmesh)",
    )
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


def _add_target(parser: argparse.ArgumentParser, help: str, *, repeat: bool = False) -> None:
    parser.add_argument("--target", action="append" if repeat else "store", help=help)
    parser.add_argument(
        "--base-port",
        type=_positive,
        default=None,
        help=f"the local mesh's base port, as given to the launcher (default: {BASE_PORT})",
    )


def _add_timeouts(parser: argparse.ArgumentParser, *, call: float) -> None:
    parser.add_argument("--timeout", type=float, default=call, help="seconds per call (default: %(default)s)")
    parser.add_argument(
        "--connect-timeout", type=float, default=3.0, help="seconds for the first call (default: %(default)s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `onnxmesh` console script; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != ROLLOUT and args.command not in JOB_COMMANDS and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "predict":
            if args.image is not None and args.count > 1:
                raise CliError("--count sends held-out digits; it cannot be used with --image")
            return asyncio.run(_predict(args))
        if args.command == "models":
            return asyncio.run(_models(args))
        if args.command == "health":
            return asyncio.run(_health(args))
        if args.command == ROLLOUT:
            return _rollout(rest)
        if args.command in JOB_COMMANDS:
            return _jobs([args.command, *rest])
        raise CliError(f"unknown command {args.command}")
    except CliError as exc:
        print(f"onnxmesh: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `onnxmesh ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not fail again, and stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


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
