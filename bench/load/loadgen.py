"""`python -m bench.load.loadgen`: a closed-loop OIP load generator for any endpoint.

    python -m bench.load.loadgen --target 127.0.0.1:8001 --model digits-serial \\
        --concurrency 32 --duration 4 --warmup 2 --json

N workers on one asyncio event loop share one long-lived `OipClient` channel; each sends a
request, waits for the answer, and sends the next (closed loop). Requests are held-out digits
sent round robin, one image per request, built once before the run so the loop only sends and
receives. Every answer's label is checked against the held-out label (a sanity check: a fast
wrong answer is not a result).

What is sent follows the model's metadata: an `image` input gets the raw UINT8 [1,8,8] image; a
`features` input (e.g. model_a's `digits-mlp`) gets the preprocessed FP32 [1,64] row. Only one
output is asked for: `label` when the model has it, else `probabilities`, else (an identity-like
model, `bench.targets.growth`'s echo graphs) its only output, which must answer the input back.

It runs in a process of its own so that its CPU can be measured apart from the servers'; it
shares the machine's cores with them, so the driver reports its CPU share too.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.load.measure import (
    MEASURED,
    MEASURING,
    Samples,
    Window,
    add_run_options,
    describe,
    emit,
    run_options_problem,
    summarize,
)
from bench.models import features_of
from demo.digits import Holdout, load_holdout
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from services.common.types import ModelSignature

#: After a failed call, wait this long before the next: a dead endpoint must not spin a core.
ERROR_PAUSE_S = 0.001


def build_requests(
    model: str, signature: ModelSignature, holdout: Holdout, preprocess_dir: Path | None
) -> tuple[list[pb.ModelInferRequest], str, np.ndarray]:
    """One prebuilt request per held-out image, the output they ask for, and the rows they send."""
    names = [spec.name for spec in signature.inputs]
    if names == ["image"]:
        rows = holdout.images
    elif names == ["features"]:
        rows = features_of(holdout.images, preprocess_dir)
    else:
        raise ValueError(f"model '{model}' takes {names}; the load generator sends 'image' or 'features'")
    output = next((o for o in ("label", "probabilities") if signature.output(o) is not None), None)
    if output is None and len(signature.outputs) == 1:
        output = signature.outputs[0].name  # an echo: checked against the input
    if output is None:
        raise ValueError(f"model '{model}' answers neither 'label' nor 'probabilities' nor one echo output")
    requests = [
        OipClient.build_request(model, {names[0]: rows[i : i + 1]}, [output]) for i in range(len(rows))
    ]
    return requests, output, rows


def answer_check(output: str, labels: Sequence[int], rows: np.ndarray) -> Callable[[int, np.ndarray], bool]:
    """Whether the answer to request `index` is right: its label, or (an echo) its own input row."""
    if output == "label":
        return lambda index, array: int(array[0]) == labels[index]
    if output == "probabilities":
        return lambda index, array: int(np.argmax(array[0])) == labels[index]
    return lambda index, array: bool(np.allclose(array, rows[index : index + 1], rtol=1e-6, atol=1e-6))


class LoadGenerator:
    """N closed-loop workers over one client; `run` warms up, measures and summarizes."""

    def __init__(
        self,
        client: OipClient,
        requests: Sequence[pb.ModelInferRequest],
        check: Callable[[int, np.ndarray], bool],
        output: str,
        *,
        concurrency: int,
        timeout: float,
    ) -> None:
        self.client = client
        self.requests = requests
        self.check = check
        self.output = output
        self.concurrency = concurrency
        self.timeout = timeout
        self.samples = Samples()
        self._next = itertools.count()
        self._stop = False

    async def worker(self) -> None:
        # Locals: this loop is the load generator's whole CPU cost per request.
        requests, check, output, samples = self.requests, self.check, self.output, self.samples
        infer, timeout, perf, count = (
            self.client.infer_request,
            self.timeout,
            time.perf_counter,
            len(requests),
        )
        while not self._stop:
            index = next(self._next) % count
            started = perf()
            try:
                result = await infer(requests[index], timeout=timeout)
            except MeshError as err:
                samples.error(perf(), err.code)
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            ended = perf()
            samples.ok(ended, ended - started, check(index, result.outputs[output]))

    async def run(self, warmup: float, duration: float, announce: bool) -> Window:
        """Run the workers through warm-up and the measured window; the window."""
        workers = [asyncio.create_task(self.worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.sleep(warmup)
            start, cpu_start = time.perf_counter(), time.process_time()
            if announce:
                emit(MEASURING)
            await asyncio.sleep(duration)
            end, cpu_end = time.perf_counter(), time.process_time()
            if announce:
                emit(MEASURED)
            self._stop = True
            # In-flight calls finish (bounded by their timeout); they fall outside the window.
            await asyncio.wait(workers, timeout=self.timeout + 1.0)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return Window(start, end, cpu_end - cpu_start)


async def run(args: argparse.Namespace) -> dict[str, object]:
    holdout = load_holdout(args.holdout)
    async with OipClient(args.target) as client:
        signature = await client.metadata(args.model, timeout=10.0)
        requests, output, rows = build_requests(args.model, signature, holdout, args.preprocess_dir)
        check = answer_check(output, [int(v) for v in holdout.labels], rows)
        generator = LoadGenerator(
            client, requests, check, output, concurrency=args.concurrency, timeout=args.timeout
        )
        window = await generator.run(args.warmup, args.duration, announce=args.json)
    return summarize(
        generator.samples,
        window,
        target=args.target,
        model=args.model,
        concurrency=args.concurrency,
        driver="loadgen",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="OIP endpoint, HOST:PORT (any gRPC target)")
    parser.add_argument("--model", required=True, help="model or graph name")
    add_run_options(parser, "workers")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s (default: 10)")
    parser.add_argument(
        "--preprocess-dir",
        type=Path,
        default=None,
        help="stats for 'features' inputs (default: the service's)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = run_options_problem(args)
    if problem:
        print(f"loadgen: {problem}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run(args))
    except (MeshError, ValueError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    if args.json:
        emit(str(result.pop("event")), **result)
    else:
        print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
