"""What the shared server serves: `Servable`s, each one OIP model at one version.

A model service's servables are `Model`s: synchronous, batch-native `predict` over numpy
arrays, run on a worker thread so the event loop never blocks (onnxruntime releases the
GIL). The orchestrator serves its graphs through the same interface, so one data plane
(`services.common.dataplane`: lookup, readiness, validation against `signature`, metrics),
one servicer and one codec serve every node. A servable's `infer` only sees requests the
data plane has already checked against its signature.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from services.common.errors import Unavailable
from services.common.types import InferRequest, InferResult, ModelSignature, rows_of
from services.common.warmup import WarmupError, WarmupSample, default_inputs, sample_inputs


class LoadError(Exception):
    """A servable could not be loaded or warmed up; the message says why (RepositoryIndex shows it)."""


@dataclass(frozen=True)
class DynamicBatching:
    """How a servable joins concurrent requests into one call (Triton's dynamic batching), as
    ModelConfig and ModelStatistics report it."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    #: Calls of the model so far, each a batch of one request or more.
    batches_run: int


class Servable(ABC):
    """One model version served over OIP."""

    name: str
    version: str
    signature: ModelSignature

    @property
    @abstractmethod
    def ready(self) -> bool: ...

    @property
    def loaded(self) -> bool:
        """Whether inference may be attempted; a graph is loaded but not ready while a step is down."""
        return self.ready

    @property
    def reason(self) -> str:
        """Why the servable is not ready, when it knows ("" otherwise)."""
        return ""

    #: Total seconds requests waited for a free inference worker (ModelStatistics' queue time).
    queue_seconds: float = 0.0

    @property
    def dynamic_batching(self) -> DynamicBatching | None:
        """How this servable batches requests; None when each request is a call of its own."""
        return None

    async def load(self) -> None:
        """Load and warm up; readiness turns true only after this returns. Raises LoadError
        (or any exception) when the servable cannot serve."""

    async def close(self) -> None:
        """Release resources at shutdown."""

    @abstractmethod
    async def infer(self, request: InferRequest) -> InferResult:
        """Answer `request`, which the data plane has checked against `signature` (input names,
        datatypes, shapes; outputs known). `request.version` is the one asked for ("" = latest)."""


#: A call whose predict is expected to take less than this runs inline on the event loop: handing
#: a call of microseconds to a worker thread and back costs more than the call itself (a future,
#: two thread wake-ups, an extra turn of the loop). Expected = the warm-up's time per row x rows.
INLINE_BELOW_S = 0.0002


class Model(Servable):
    """A model whose `predict` is synchronous numpy-in, numpy-out, run on a worker thread.

    Subclasses implement `load_sync` (build the session, set `signature`) and `predict`.
    `predict` must be batch-native: the first dimension is the batch, and row i of every
    output belongs to row i of the inputs (batching relies on it). Calls expected to take less
    than INLINE_BELOW_S (timed on the first warm-up sample) run inline instead, never blocking
    the loop for long.

    `warmup` is what `load` runs before the model reports ready: None for the default sample
    (`warmup_inputs`), () for none, or the samples of its config.json (services.common.warmup).
    """

    #: Seconds one row's predict took at warm-up (inf until timed: every call goes to the executor).
    row_seconds = float("inf")

    def __init__(
        self, name: str, version: str, executor: Executor, *, warmup: Sequence[WarmupSample] | None = None
    ) -> None:
        self.name = name
        self.version = version
        self.executor = executor
        self.warmup = warmup
        self.queue_seconds = 0.0
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def loaded(self) -> bool:
        # Asked on every request: read the flag here rather than through `ready`.
        return self._ready

    @abstractmethod
    def load_sync(self) -> None: ...

    @abstractmethod
    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]: ...

    def warmup_inputs(self) -> dict[str, np.ndarray]:
        """The default warm-up sample: one row of zeros per input (dynamic dims as 1); override
        for models that need real data, or declare samples in config.json."""
        return default_inputs(self.signature)

    def _warmup_samples(self) -> list[tuple[str, dict[str, np.ndarray]]]:
        if self.warmup is None:
            return [("default (zeros, dynamic dims 1)", self.warmup_inputs())]
        return [
            (sample.name, sample_inputs(sample, self.signature))
            for sample in self.warmup
            for _ in range(sample.count)
        ]

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self.load_sync)
        except Exception as exc:
            raise LoadError(f"cannot load: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        try:
            samples = self._warmup_samples()
        except WarmupError as exc:
            raise LoadError(str(exc)) from exc
        for sample, inputs in samples:
            try:
                await loop.run_in_executor(self.executor, self.predict, inputs, ())
            except Exception as exc:
                # One line: runtimes' messages span several, and the reason is shown in tables.
                message = " ".join((getattr(exc, "message", None) or str(exc)).split())
                raise LoadError(
                    f"warm-up sample '{sample}' failed: {message} "
                    '(declare warm-up inputs in config.json, or "warmup": false)'
                ) from exc
        if samples:
            self.row_seconds = await loop.run_in_executor(self.executor, self._time_predict, samples[0][1])
        self._ready = True

    def _timed_predict(
        self, started: list[float], inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        started.append(time.perf_counter())
        return self.predict(inputs, outputs)

    def _time_predict(self, inputs: dict[str, np.ndarray]) -> float:
        """The median of a few warm-up predicts, per row of the warm-up inputs."""
        times = []
        for _ in range(5):
            started = time.perf_counter()
            self.predict(inputs, ())
            times.append(time.perf_counter() - started)
        rows = max((len(a) for a in inputs.values() if a.ndim), default=0)
        # Warm-up inputs without rows say nothing about a real call's time: keep the executor.
        return statistics.median(times) / rows if rows else float("inf")

    async def infer(self, request: InferRequest) -> InferResult:
        if not self._ready:
            raise Unavailable(f"model '{self.name}' version {self.version} is not ready")
        rows = rows_of(request.inputs.values())  # batch-native: every input has the rows
        if self.row_seconds * rows < INLINE_BELOW_S:
            started_inline = time.perf_counter()
            outputs = self.predict(request.inputs, request.outputs)
            # A model slower than its warm-up said moves to the executor; one late call does not.
            took = (time.perf_counter() - started_inline) / max(1, rows)
            self.row_seconds += 0.1 * (took - self.row_seconds)
        else:
            loop = asyncio.get_running_loop()
            queued = time.perf_counter()
            started: list[float] = []
            try:
                outputs = await loop.run_in_executor(
                    self.executor, self._timed_predict, started, request.inputs, request.outputs
                )
            finally:
                # Added on the event loop, not in the worker threads, so no update is lost.
                if started:
                    self.queue_seconds += started[0] - queued
        return InferResult(outputs=outputs, model_name=self.name, model_version=self.version)
