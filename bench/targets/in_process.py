"""`python -m bench.targets.in_process`: the floor, the same model work in one process with no network at all.

    python -m bench.targets.in_process --graph digits-serial --concurrency 8 --duration 4 --warmup 2 --json

N threads in a closed loop call the models' `predict` directly, in the graph's order, on the
same held-out images the load generator sends (one per call, round robin):

- `digits-serial`:   preprocess -> digits-mlp (embedding) -> digits-head -> argmax
- `digits-parallel`: preprocess -> digits-mlp and digits-logreg one after the other -> mean -> argmax
- `digits-mlp`:      one digits-mlp predict on preprocessed features (one model call, the
  reference for what a single gRPC hop adds)

These mirror demo/mesh.yaml. There is no codec, no event loop, no executor hand-off:
whatever the other modes spend above this is the cost of serving. onnxruntime releases the GIL,
so the threads overlap inside the models as a server's inference pool would.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

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
from bench.models import (
    features_of,
    load_models_sync,
    local_repositories,
    model_dirs,
    service_dir,
)
from demo.digits import load_holdout
from services.common.model import Model
from services.common.settings import ServerSettings

#: One request through the models: the input row -> the predicted label.
Pipeline = Callable[[np.ndarray], int]
GRAPHS = ("digits-serial", "digits-parallel", "digits-mlp")


def pipeline(graph: str, models: Mapping[str, Model]) -> tuple[Pipeline, str]:
    """The graph's model calls as one function, and the input it takes ('image' or 'features')."""
    pre, mlp = models["digits-preprocess"], models["digits-mlp"]
    if graph == "digits-serial":
        head = models["digits-head"]

        def serial(image: np.ndarray) -> int:
            features = pre.predict({"image": image}, ())["features"]
            embedding = mlp.predict({"features": features}, ("embedding",))["embedding"]
            probabilities = head.predict({"embedding": embedding}, ("probabilities",))["probabilities"]
            return int(np.argmax(probabilities[0]))

        return serial, "image"
    if graph == "digits-parallel":
        logreg = models["digits-logreg"]

        def parallel(image: np.ndarray) -> int:
            features = pre.predict({"image": image}, ())["features"]
            a = mlp.predict({"features": features}, ("probabilities",))["probabilities"]
            b = logreg.predict({"features": features}, ("probabilities",))["probabilities"]
            return int(np.argmax(((a + b) / 2.0)[0]))

        return parallel, "image"
    if graph == "digits-mlp":

        def single(features: np.ndarray) -> int:
            return int(np.argmax(mlp.predict({"features": features}, ("probabilities",))["probabilities"][0]))

        return single, "features"
    raise ValueError(f"unknown graph '{graph}'; the floor knows {', '.join(GRAPHS)}")


class Floor:
    """N threads calling `run_one` in a closed loop; `run` warms up, measures and summarizes."""

    def __init__(
        self, run_one: Pipeline, rows: Sequence[np.ndarray], labels: Sequence[int], concurrency: int
    ):
        self.run_one = run_one
        self.rows = rows
        self.labels = labels
        self.concurrency = concurrency
        self._next = itertools.count()  # next() on a count is atomic under the GIL
        self._stop = threading.Event()

    def worker(self, samples: Samples) -> None:
        rows, labels, run_one, perf, count = (
            self.rows,
            self.labels,
            self.run_one,
            time.perf_counter,
            len(self.rows),
        )
        while not self._stop.is_set():
            index = next(self._next) % count
            started = perf()
            try:
                label = run_one(rows[index])
            except Exception as exc:
                samples.error(perf(), type(exc).__name__)
                continue
            ended = perf()
            samples.ok(ended, ended - started, label == labels[index])

    def run(self, warmup: float, duration: float, announce: bool) -> tuple[Samples, Window]:
        per_thread = [Samples() for _ in range(self.concurrency)]
        threads = [threading.Thread(target=self.worker, args=(s,), daemon=True) for s in per_thread]
        for thread in threads:
            thread.start()
        try:
            time.sleep(warmup)
            start, cpu_start = time.perf_counter(), time.process_time()
            if announce:
                emit(MEASURING)
            time.sleep(duration)
            end, cpu_end = time.perf_counter(), time.process_time()
            if announce:
                emit(MEASURED)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join()
        samples = Samples()
        for part in per_thread:
            samples.extend(part)
        return samples, Window(start, end, cpu_end - cpu_start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.targets.in_process", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--graph", choices=GRAPHS, default="digits-serial")
    add_run_options(parser, "threads")
    parser.add_argument(
        "--service-dir",
        type=service_dir,
        action="append",
        default=[],
        metavar="SERVICE=PATH",
        help="model directory of one service (repeatable; default: services/<name>/models)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = run_options_problem(args)
    if problem:
        print(f"floor: {problem}", file=sys.stderr)
        return 2
    dirs = model_dirs(dict(args.service_dir))
    # The same model settings as every node's defaults (one onnxruntime thread per session).
    settings = ServerSettings(service="floor")
    with ThreadPoolExecutor(1) as unused:  # Model wants an executor; predict is called directly here
        models = load_models_sync(local_repositories(dirs, settings, unused))
    run_one, kind = pipeline(args.graph, models)
    holdout = load_holdout(args.holdout)
    table = holdout.images if kind == "image" else features_of(holdout.images, dirs["preprocess"])
    rows = [table[i : i + 1] for i in range(len(table))]
    floor = Floor(run_one, rows, [int(v) for v in holdout.labels], args.concurrency)
    samples, window = floor.run(args.warmup, args.duration, announce=args.json)
    result = summarize(samples, window, model=args.graph, concurrency=args.concurrency, driver="floor")
    if args.json:
        emit(str(result.pop("event")), **result)
    else:
        print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
