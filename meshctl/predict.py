"""`onnxmesh predict`: held-out digits or an image file through a graph or a model, the answer
printed with its probabilities and per-step statuses, or accuracy and latency over many."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demo.digits import IMAGE_SHAPE, PIXEL_MAX, load_holdout
from meshctl.targets import (
    PRODUCERS,
    CliError,
    check_target,
    default_target,
    explain,
    layout_near,
    service_address,
)
from services.common.errors import MeshError, NotFound
from services.common.grpc.client import OipClient
from services.common.types import InferResult, ModelSignature

DEFAULT_GRAPH = "digits-parallel"


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


async def run_predict(args: argparse.Namespace) -> int:
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
