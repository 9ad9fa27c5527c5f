"""`onnxmesh predict`: inputs through a graph or a model, the answer printed with its probabilities
and per-step statuses, or accuracy and latency over many rows.

The inputs: `--input NAME=FILE.npy` (any mesh), else what the mesh's client file selects
(meshctl/client.py; the demo's sends held-out digits). A model whose inputs another model makes
(as a graph's step does) gets them made the same way: the graph's upstream steps are called first.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from meshctl.client import ClientError, Samples, load_client
from meshctl.targets import (
    CliError,
    check_target,
    current_mesh,
    default_target,
    explain,
    layout_near,
    service_address,
    upstream,
)
from orchestrator.spec.steps import REQUEST, GraphSpec, ModelStep, TensorRef
from services.common.errors import MeshError, NotFound
from services.common.grpc.client import OipClient
from services.common.types import InferResult, ModelSignature

# -- inputs --------------------------------------------------------------------------------------------


def parse_input(text: str) -> tuple[str, Path]:
    """`NAME=FILE.npy` of `--input`."""
    name, sep, file = text.partition("=")
    if not sep or not name or not file:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, Path(file)


def given_inputs(pairs: Sequence[tuple[str, Path]]) -> Samples:
    """One request of the `--input` arrays, as they are (their first axis is the batch)."""
    inputs = {}
    for name, path in pairs:
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CliError(f"--input {name}={path}: cannot read a .npy array: {exc}") from None
    return Samples(inputs, None, [", ".join(f"{name}={path}" for name, path in pairs)])


def select_samples(args: argparse.Namespace) -> Samples:
    """The rows to send: `--input`, else the mesh's client file's choice."""
    if args.input:
        return given_inputs(args.input)
    try:
        client = load_client(current_mesh())
    except ClientError as exc:
        raise CliError(str(exc)) from None
    if client is None:
        raise CliError(
            f"{current_mesh().path} names no client file: give the inputs with --input NAME=FILE.npy"
        )
    return client.select(args)


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
    """Builds a model's inputs from the rows: the rows themselves, or what upstream models make of them.

    Calling a model directly works like the graphs do: an input a graph's step feeds it from another
    model step is made by calling that step's model first (targets.upstream). One client per address.
    """

    def __init__(self, timeout: float, layout: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        self.layout = layout
        self.chain: list[str] = []
        self._clients: dict[str, OipClient] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def build(self, sig: ModelSignature, rows: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        self.chain = []
        return {spec.name: await self._tensor(sig.name, spec.name, rows) for spec in sig.inputs}

    async def _tensor(self, model: str, name: str, rows: Mapping[str, NDArray[Any]]) -> NDArray[Any]:
        if name in rows:
            return rows[name]
        found = upstream(model, name)
        if found is None:
            raise CliError(f"no input '{name}' for {model}: give it with --input {name}=FILE.npy")
        return await self._made(*found, rows)

    async def _made(self, graph: GraphSpec, ref: TensorRef, rows: Mapping[str, NDArray[Any]]) -> NDArray[Any]:
        """The tensor `ref` of `graph`: a request input from the rows, or a model step's output."""
        if ref.step == REQUEST:
            if ref.tensor not in rows:
                raise CliError(f"no input '{ref.tensor}' (graph {graph.name}): give it with --input")
            return rows[ref.tensor]
        step = next((s for s in graph.all_steps() if s.name == ref.step), None)
        if not isinstance(step, ModelStep):
            raise CliError(
                f"'{ref.tensor}' of {graph.name} comes from step {ref.step}, not a model: use --input"
            )
        inputs = {name: await self._made(graph, source, rows) for name, source in step.inputs.items()}
        address = service_address(step.service, self.layout)
        self.chain.append(f"{step.model} @ {address}")
        client = self._clients.setdefault(address, OipClient(address))
        try:
            result = await client.infer(step.model, inputs, [ref.tensor], timeout=self.timeout)
        except MeshError as err:
            raise CliError(
                f"input '{ref.tensor}' from {step.model}: {explain(address, err, connecting=True)}"
            ) from None
        return result.outputs[ref.tensor]


async def _predict_one(
    client: OipClient,
    sig: ModelSignature,
    inputs: Inputs,
    rows: Mapping[str, NDArray[Any]],
    args: argparse.Namespace,
) -> tuple[InferResult, float]:
    tensors = await inputs.build(sig, rows)
    started = time.perf_counter()
    result = await client.infer(args.name, tensors, version=args.version, timeout=args.timeout)
    return result, time.perf_counter() - started


async def run_predict(args: argparse.Namespace) -> int:
    if args.name is None:  # no client file names a default: the mesh's first graph
        args.name = current_mesh().graph_names()[0]
    target = check_target(args.target) if args.target else default_target(args.name, args.base_port)
    samples = select_samples(args)
    inputs = Inputs(args.timeout, layout_near(target, args.name, args.base_port))
    async with OipClient(target) as client:
        try:
            sig = await client.metadata(args.name, args.version, timeout=args.connect_timeout)
        except NotFound as err:
            raise CliError(f"{target} does not serve '{args.name}': {err.message}") from None
        except MeshError as err:
            raise CliError(explain(target, err, connecting=True)) from None
        try:
            if len(samples.description) <= 1 or samples.labels is None:
                return await _predict_single(client, sig, inputs, samples, target, args)
            return await _predict_many(client, sig, inputs, samples, target, args)
        finally:
            await inputs.close()


async def _predict_single(
    client: OipClient,
    sig: ModelSignature,
    inputs: Inputs,
    samples: Samples,
    target: str,
    args: argparse.Namespace,
) -> int:
    try:
        result, seconds = await _predict_one(client, sig, inputs, samples.inputs, args)
    except MeshError as err:
        raise CliError(explain(target, err)) from None
    version = result.model_version or "-"
    print(f"{result.model_name or args.name} (version {version}) @ {target}  {seconds * 1000:.1f} ms")
    if inputs.chain:
        print(f"  inputs made by: {' -> '.join(inputs.chain)}")
    truth = f" (true label {int(samples.labels[0])})" if samples.labels is not None else ""
    print(f"  {next(iter(samples.inputs), 'input')}:         {samples.description[0]}{truth}")
    labels = predicted_labels(result)
    if labels is not None:
        verdict = ""
        if samples.labels is not None:
            verdict = "  correct" if labels[0] == samples.labels[0] else "  WRONG"
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
    samples: Samples,
    target: str,
    args: argparse.Namespace,
) -> int:
    """One request per labelled row, in order; accuracy, latency, errors and how each step fared."""
    correct, latencies, errors = 0, [], Counter[str]()
    steps: dict[str, Counter[str]] = {}
    assert samples.labels is not None  # run_predict sends labelled rows only here
    for i in range(len(samples)):
        try:
            result, seconds = await _predict_one(client, sig, inputs, samples.rows(i, i + 1), args)
        except MeshError as err:
            errors[explain(target, err)] += 1
            continue
        latencies.append(seconds)
        labels = predicted_labels(result)
        correct += int(labels is not None and labels[0] == samples.labels[i])
        for step, status in response_details(result.parameters, "step.").items():
            steps.setdefault(step, Counter())[step_outcome(status)] += 1
    answered = len(latencies)
    print(f"{args.name} @ {target}: {len(samples)} requests ({samples.description[0]} onwards)")
    if answered:
        ms = np.asarray(latencies) * 1000
        print(f"  accuracy: {correct}/{answered} = {correct / answered:.1%}")
        print(f"  latency:  p50 {np.percentile(ms, 50):.1f} ms  p99 {np.percentile(ms, 99):.1f} ms")
    for step, counts in sorted(steps.items()):
        print(f"  step {step}: " + ", ".join(f"{outcome} {n}" for outcome, n in counts.most_common()))
    for message, n in errors.most_common():
        print(f"  failed {n}x: {message}")
    return 1 if errors else 0
