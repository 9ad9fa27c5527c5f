"""The batch runner: a dataset through a graph over OIP, predictions into the store.

    dataset --chunks--> rows not yet predicted --requests of R rows, C in flight--> orchestrator
                                                                                     |
    store.predictions  <--one transaction per request: row key, outputs, versions----+

The same ModelInfer call as online serving, so a batch prediction equals the online one.
Several requests in flight with a few rows each keep the orchestrator's coalescing busy
without one huge message.

Resumable and idempotent: a run first reads which keys are already `ok` and sends only the
others; each answer is committed at once, so a run killed at any point (SIGKILL included)
loses at most the requests in flight, and the next run predicts exactly what is missing.
A row that fails is written as `failed` with its status code and message and is sent again
on the next run. A request that fails for a reason of its rows (INVALID_ARGUMENT) is split in
halves until the failing rows are alone, so one bad row does not fail its neighbours; one that
fails for a reason of the mesh (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) is retried
with backoff, then recorded as failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from jobs.datasets import Chunk, Dataset, open_dataset
from jobs.progress import Progress
from jobs.store import FAILED, OK, Prediction, Store
from services.common.errors import DeadlineExceeded, MeshError, ResourceExhausted, Unavailable
from services.common.types import InferRequest, InferResult, ModelSignature, TensorSpec

log = logging.getLogger(__name__)

#: Codes that say the mesh (not the rows) had a problem: worth a retry.
RETRYABLE = (Unavailable, DeadlineExceeded, ResourceExhausted)
READ_CHUNK_ROWS = 4096


class InferClient(Protocol):
    """What the runner needs of services.common.grpc.client.OipClient (a fake in unit tests)."""

    async def metadata(
        self, model: str, version: str = "", *, timeout: float | None = 5.0
    ) -> ModelSignature: ...

    async def call(self, request: InferRequest) -> InferResult: ...


@dataclass(frozen=True)
class BatchConfig:
    graph: str
    path: Path
    #: The `dataset` column; default: the file's name without suffix.
    dataset_name: str | None = None
    key: str | None = None
    #: Graph input -> array or column name in the file.
    mapping: Mapping[str, str] = field(default_factory=dict)
    version: str = ""
    outputs: tuple[str, ...] = ()
    rows_per_request: int = 128
    concurrency: int = 4
    #: Most rows per second sent (None = as fast as the mesh answers): spare the online traffic.
    rate: float | None = None
    timeout: float = 30.0
    retries: int = 3
    progress: str = "auto"


@dataclass
class Summary:
    dataset: str
    graph: str
    total: int = 0
    already_done: int = 0
    predicted: int = 0
    failed: int = 0
    requests: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return (self.predicted + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        head = f"batch {self.graph} over {self.dataset}: {self.total} rows"
        if self.interrupted:
            head += " (interrupted: run again to finish)"
        lines = [
            head,
            f"  already predicted: {self.already_done}",
            f"  predicted now:     {self.predicted} in {self.requests} requests, {self.seconds:.2f} s, "
            f"{self.rows_per_second:.0f} rows/s",
            f"  failed:            {self.failed}"
            + (" (recorded; retried on the next run)" if self.failed else ""),
        ]
        lines += [f"    {n} x {message}" for message, n in sorted(self.errors.items(), key=lambda kv: -kv[1])]
        return lines


def rows_first(inputs: Sequence[TensorSpec]) -> bool:
    """Whether a request to a graph with these inputs may carry several dataset rows."""
    return all(spec.shape and spec.shape[0] == -1 for spec in inputs)


def one_row_specs(inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The inputs as a dataset of whole requests sees them: a row axis before each shape."""
    return [replace(spec, shape=(-1, *spec.shape)) for spec in inputs]


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def json_ready(array: np.ndarray) -> object:
    """An output as nested lists; BYTES elements as text (UTF-8, undecodable bytes replaced)."""
    array = np.asarray(array)
    if array.dtype.kind in "OS":
        return np.asarray(np.frompyfunc(_text, 1, 1)(array), dtype=object).tolist()
    return array.tolist()


def split_rows(result: InferResult, rows: int) -> list[dict[str, object]]:
    """Each row's outputs as JSON-ready values; every output must have one entry per row."""
    per_row: list[dict[str, object]] = [{} for _ in range(rows)]
    for name, array in result.outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise MeshError(
                f"output '{name}' has shape {list(array.shape)}, not one entry per row for {rows} rows; "
                "a graph whose inputs have a fixed first dimension gets one request per row"
            )
        for i in range(rows):
            per_row[i][name] = json_ready(array[i])
    return per_row


def whole_row(result: InferResult) -> dict[str, object]:
    """One request's outputs, whole, as JSON-ready values (one dataset row = one request)."""
    return {name: json_ready(array) for name, array in result.outputs.items()}


def versions_of(result: InferResult) -> dict[str, str]:
    return {k[len("version.") :]: str(v) for k, v in result.parameters.items() if k.startswith("version.")}


class BatchRunner:
    """One run of a dataset through a graph. `run()` returns the summary; `stop()` ends it early
    (requests in flight finish and are written)."""

    def __init__(self, config: BatchConfig, client: InferClient, store: Store) -> None:
        self.config = config
        self.client = client
        self.store = store
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(max(1, config.concurrency))
        self._sent_rows = 0
        self._started = 0.0
        self._rows_first = True

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> Summary:
        config = self.config
        signature = await self.client.metadata(config.graph, config.version, timeout=10.0)
        self._rows_first = rows_first(signature.inputs)
        specs = signature.inputs if self._rows_first else one_row_specs(signature.inputs)
        dataset: Dataset = open_dataset(config.path, specs, key=config.key, mapping=config.mapping)
        per_request = config.rows_per_request if self._rows_first else 1
        name = config.dataset_name or dataset.name
        summary = Summary(dataset=name, graph=config.graph)
        done = await asyncio.to_thread(self.store.done_keys, name, config.graph)
        total = dataset.rows
        progress = Progress(
            f"batch {config.graph}",
            None if total is None else max(total - len(done), 0),
            mode=config.progress,
        )
        self._started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        try:
            for chunk in dataset.chunks(READ_CHUNK_ROWS):
                summary.total += len(chunk)
                todo = [i for i, key in enumerate(chunk.keys) if key not in done]
                summary.already_done += len(chunk) - len(todo)
                for start in range(0, len(todo), per_request):
                    if self._stopping.is_set():
                        break
                    await self._slots.acquire()
                    if self._stopping.is_set():
                        self._slots.release()
                        break
                    rows = chunk.take(todo[start : start + per_request])
                    await self._pace(len(rows))
                    task = asyncio.create_task(self._send(name, rows, summary, progress))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if self._stopping.is_set():
                    summary.interrupted = True
                    break
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            progress.close()
        summary.seconds = time.monotonic() - self._started
        return summary

    async def _pace(self, rows: int) -> None:
        """Hold back so that at most `rate` rows per second leave (no-op without a rate)."""
        rate = self.config.rate
        self._sent_rows += rows
        if rate:
            due = self._started + (self._sent_rows - rows) / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _send(self, dataset: str, rows: Chunk, summary: Summary, progress: Progress) -> None:
        try:
            predictions = await self._predict(dataset, rows, summary)
            await asyncio.to_thread(self.store.write_predictions, predictions)
            failed = sum(1 for p in predictions if p.status == FAILED)
            summary.predicted += len(predictions) - failed
            summary.failed += failed
            for p in predictions:
                if p.status == FAILED:
                    message = f"{p.error_code}: {p.error_message}"
                    summary.errors[message] = summary.errors.get(message, 0) + 1
            progress.update(len(predictions), failed)
        finally:
            self._slots.release()

    async def _predict(self, dataset: str, rows: Chunk, summary: Summary) -> list[Prediction]:
        config = self.config
        attempt = 0
        while True:
            summary.requests += 1
            try:
                inputs = rows.inputs if self._rows_first else {n: a[0] for n, a in rows.inputs.items()}
                result = await self.client.call(
                    InferRequest(
                        config.graph,
                        inputs,
                        tuple(config.outputs),
                        config.version,
                        request_id=f"batch-{dataset}-{rows.keys[0]}"[:128],
                        deadline=time.monotonic() + config.timeout,
                    )
                )
                outputs = split_rows(result, len(rows)) if self._rows_first else [whole_row(result)]
            except MeshError as err:
                if isinstance(err, RETRYABLE) and attempt < config.retries and not self._stopping.is_set():
                    attempt += 1
                    # Full jitter: replicas coming back are not hit by every runner at once.
                    await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))
                    continue
                if not isinstance(err, RETRYABLE) and len(rows) > 1:
                    half = len(rows) // 2
                    first = await self._predict(dataset, rows.take(slice(0, half)), summary)
                    second = await self._predict(dataset, rows.take(slice(half, len(rows))), summary)
                    return first + second
                message = err.message if err.public else "internal error (see the orchestrator's log)"
                return [
                    Prediction(
                        dataset, config.graph, key, FAILED, None, error_code=err.code, error_message=message
                    )
                    for key in rows.keys
                ]
            versions = versions_of(result)
            return [
                Prediction(
                    dataset,
                    config.graph,
                    key,
                    OK,
                    values,
                    model_version=result.model_version,
                    versions=versions,
                )
                for key, values in zip(rows.keys, outputs, strict=True)
            ]


async def run_batch(
    config: BatchConfig, client: InferClient, store: Store, *, handle_signals: bool = True
) -> Summary:
    """Run once; SIGTERM/SIGINT stop sending (in-flight answers are still written)."""
    runner = BatchRunner(config, client, store)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, runner.stop)
    try:
        return await runner.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


__all__ = ["BatchConfig", "BatchRunner", "Summary", "rows_first", "run_batch", "split_rows", "whole_row"]
