"""Adaptive batching as a wrapper around a `Model`: many small calls, one `predict` each batch.

    callers --infer()--> bounded queue (rows) --batcher task--> predict(stacked rows)
                                                                      | on the executor
    callers <--own rows, own outputs-- split by row ranges <----------+

The batcher takes the oldest waiting request, then keeps collecting requests of the same
layout (input names, dtypes and non-batch dimensions: `stacking.layout`) until the batch
holds `max_batch_size` rows or `max_queue_delay_ms` has passed since that first request
arrived. Up to `max_concurrent_batches` batches run at once, so the next batch forms while
the previous one runs (onnxruntime releases the GIL).

The model's `predict` is untouched: it is batch-native already (row i of every output belongs
to row i of the inputs), which is all this wrapper relies on. Stacking, splitting and
re-running alone are `services.common.batching.stacking`'s, shared with the orchestrator's coalescing.
What each caller sees:

- exactly its own rows, and only the outputs it asked for (empty = all);
- its own error: when a batched `predict` raises (anything but a failure shared by the whole
  batch, `stacking.SHARED_FAILURES`), every request of that batch is run alone, so one bad
  request fails alone while its batch-mates succeed;
- DeadlineExceeded without running when its deadline passed while it waited;
- ResourceExhausted at once when more than `max_queue_size` rows are already waiting
  (shed load rather than let latency grow without end).

Models whose inputs have a fixed first dimension are never batched: the wrapper then passes
each request straight to the inner model (decided in `load()`, once the signature is known).

Observed (`instrument`, on the node's registry): rows per `predict` call, each request's time
in the queue, and the rows waiting; with tracing on, each request's span gets its time in the
queue and in compute, and the size of the batch that answered it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.common.batching import stacking
from services.common.errors import DeadlineExceeded, MeshError, ResourceExhausted, Unavailable
from services.common.model import DynamicBatching, Model, Servable
from services.common.observability import tracing
from services.common.observability.metrics import ServerMetrics
from services.common.repository import ModelConfig
from services.common.types import InferRequest, InferResult, ModelSignature, rows_of

log = logging.getLogger(__name__)

#: What must match for two requests to share a batch: their inputs' names, dtypes and
#: dimensions after the first (`stacking.layout`).
BatchKey = stacking.Layout


@dataclass(eq=False, slots=True)
class _Waiting:
    """One caller's request while it waits in the queue or runs in a batch."""

    request: InferRequest
    rows: int
    key: BatchKey
    future: asyncio.Future[InferResult]
    arrived: float
    #: Still counted in the queue's row total; whoever clears it (the batcher taking it,
    #: or the caller leaving) subtracts its rows, so they are subtracted exactly once.
    queued: bool = True
    #: When its batch started and it was answered (monotonic), and that batch's size.
    started: float = 0.0
    finished: float = 0.0
    batch_rows: int = 0
    batch_requests: int = 0


@dataclass(slots=True)
class _Batch:
    items: list[_Waiting] = field(default_factory=list)
    rows: int = 0


class BatchingModel(Servable):
    """Serves `model` with adaptive batching; see the module docstring for the behaviour.

    Counters (read them, never write): `batches_run` and `rows_run` count the inner
    `predict` calls this wrapper made that returned, and the rows they carried (a request
    re-run alone after a failed batch counts as a batch of its own); `requests_run` counts
    the requests answered by them; `failed_batches` counts batched calls that raised and
    were split up.
    In pass-through mode (`batching` is False) none of them moves.
    """

    def __init__(self, model: Model, config: ModelConfig, *, max_concurrent_batches: int = 2) -> None:
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be at least 1, got {max_concurrent_batches}")
        self.inner = model
        self.name = model.name
        self.version = model.version
        self.max_batch_size = config.max_batch_size
        self.max_queue_delay = config.max_queue_delay_ms / 1000.0
        self.max_queue_size = config.max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self.batches_run = 0
        self.rows_run = 0
        self.requests_run = 0
        self.failed_batches = 0
        self._batching = False
        self._closed = False
        self._input_names: frozenset[str] = frozenset()
        # Requests by batch key, each deque in arrival order; a key is dropped when empty.
        self._queues: dict[BatchKey, deque[_Waiting]] = {}
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        # The node's series of this model (`instrument`): rows per predict, time in the queue.
        self._rows_series: Any = None
        self._queue_series: Any = None

    def instrument(self, metrics: ServerMetrics) -> None:
        """Report this model's batches and queue on `metrics` (the node's registry)."""
        series = metrics.batching
        self._rows_series = series.rows.labels(self.name, self.version)
        self._queue_series = series.queue_time.labels(self.name, self.version)
        series.queue_rows.labels(self.name, self.version).set_function(lambda: self._queued_rows)

    # -- delegated to the inner model ---------------------------------------------------

    @property
    def signature(self) -> ModelSignature:
        return self.inner.signature

    @signature.setter
    def signature(self, value: ModelSignature) -> None:
        self.inner.signature = value

    @property
    def ready(self) -> bool:
        return self.inner.ready and not self._closed

    # -- what tests, metrics and benchmarks may read --------------------------------------

    @property
    def batching(self) -> bool:
        """True once loaded with batching on; False in pass-through mode."""
        return self._batching

    @property
    def dynamic_batching(self) -> DynamicBatching | None:
        if not self._batching:
            return None
        return DynamicBatching(
            self.max_batch_size, int(self.max_queue_delay * 1e6), self.max_queue_size, self.batches_run
        )

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (not counting batches being formed or running)."""
        return self._queued_rows

    # -- life cycle -----------------------------------------------------------------------

    async def load(self) -> None:
        """Load the inner model, then start the batcher unless the model cannot be batched."""
        await self.inner.load()
        if self.max_batch_size <= 1:
            log.info(
                "batching off for %s/%s: max_batch_size %d", self.name, self.version, self.max_batch_size
            )
            return
        fixed = [spec for spec in self.signature.inputs if not spec.shape or spec.shape[0] != -1]
        if fixed:
            # Rows of different requests cannot be stacked into a dimension of fixed size.
            log.warning(
                "batching off for %s/%s: input '%s' has a fixed first dimension %s; requests run one by one",
                self.name,
                self.version,
                fixed[0].name,
                list(fixed[0].shape),
            )
            return
        self._input_names = frozenset(spec.name for spec in self.signature.inputs)
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_concurrent_batches)
        self._batcher = asyncio.create_task(self._batch_forever(), name=f"batcher-{self.name}")
        self._batching = True

    async def close(self) -> None:
        """Stop forming batches, fail whatever still waits, let running batches finish."""
        self._closed = True
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
            self._batcher = None
        for queue in self._queues.values():
            for item in queue:
                self._fail(item, self._shutting_down())
        self._queues.clear()
        self._queued_rows = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await self.inner.close()

    # -- the caller's side ----------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResult:
        if not self._batching:
            if self._closed:
                raise self._shutting_down()
            return await self.inner.infer(request)
        if self._closed:
            raise self._shutting_down()
        now = time.monotonic()
        if request.deadline is not None and request.deadline <= now:
            raise self._expired()
        stackable = stacking.layout(request.inputs)
        if stackable is None or request.inputs.keys() != self._input_names:
            # Not something a batch can carry (missing or unknown inputs, scalars, ragged or
            # empty first dims): the inner model answers or rejects it on its own.
            return await self.inner.infer(request)
        key, rows = stackable
        if self._queued_rows and self._queued_rows + rows > self.max_queue_size:
            # An empty queue admits any request, so one larger than the bound still runs.
            raise ResourceExhausted(
                f"model '{self.name}' version {self.version}: the batching queue is full "
                f"({self._queued_rows} rows waiting, max_queue_size {self.max_queue_size}); "
                "retry later or on another replica"
            )
        item = _Waiting(request, rows, key, asyncio.get_running_loop().create_future(), now)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(item)
        self._queued_rows += rows
        assert self._arrived is not None
        self._arrived.set()
        try:
            result = await item.future
        except asyncio.CancelledError:
            # The caller is gone: free its place now; the batcher skips the cancelled future.
            item.future.cancel()
            self._unqueue(item)
            raise
        if tracing.enabled:
            tracing.batch_attributes(
                item.started - item.arrived,
                item.finished - item.started,
                item.batch_rows,
                item.batch_requests,
            )
        return result

    # -- the batcher ----------------------------------------------------------------------

    async def _batch_forever(self) -> None:
        assert self._slots is not None
        while True:
            # Take a slot before forming: while every slot is busy, requests pile up in the
            # queue and the next batch takes them all at once instead of closing early.
            await self._slots.acquire()
            try:
                batch = await self._form_batch()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception:
                # A dead batcher would leave every later caller hanging: log and go on.
                log.exception("forming a batch of %s/%s failed", self.name, self.version)
                self._slots.release()
                continue
            task = asyncio.create_task(self._run_batch(batch.items))
            self._running.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        assert self._slots is not None
        self._slots.release()

    async def _form_batch(self) -> _Batch:
        assert self._arrived is not None
        batch = _Batch()
        try:
            first = self._take_oldest()
            while first is None:
                self._arrived.clear()
                await self._arrived.wait()
                first = self._take_oldest()
            batch.items.append(first)
            batch.rows = first.rows
            closes_at = first.arrived + self.max_queue_delay
            while batch.rows < self.max_batch_size:
                item = self._take_fitting(first.key, self.max_batch_size - batch.rows)
                if isinstance(item, _Full):
                    break
                if item is None:
                    if time.monotonic() >= closes_at:
                        break
                    self._arrived.clear()
                    try:
                        async with asyncio.timeout(closes_at - time.monotonic()):
                            await self._arrived.wait()
                    except TimeoutError:
                        pass
                    continue
                batch.items.append(item)
                batch.rows += item.rows
        except BaseException as exc:
            # Cancelled at close (or a bug): the requests taken so far must not wait forever.
            error = self._shutting_down() if isinstance(exc, asyncio.CancelledError) else self._internal()
            for item in batch.items:
                self._fail(item, error)
            raise
        return batch

    def _take_oldest(self) -> _Waiting | None:
        """The live request that arrived first, across keys; None when nothing waits."""
        while self._queues:
            if len(self._queues) == 1:
                key = next(iter(self._queues))
            else:
                key = min(self._queues, key=lambda k: self._queues[k][0].arrived)
            queue = self._queues[key]
            item = queue.popleft()
            if not queue:
                del self._queues[key]
            if self._claim(item):
                return item
        return None

    def _take_fitting(self, key: BatchKey, room: int) -> _Waiting | _Full | None:
        """The next live request of `key` if it fits in `room` rows; _FULL if it does not;
        None when no request of `key` waits."""
        queue = self._queues.get(key)
        while queue:
            head = queue[0]
            if head.rows > room and not head.future.done():
                # Keep arrival order within a key: the batch closes rather than skip ahead.
                return _FULL
            queue.popleft()
            if not queue:
                del self._queues[key]
            if self._claim(head):
                return head
        return None

    def _claim(self, item: _Waiting) -> bool:
        """Take `item` out of the queue's count; True if it should run."""
        self._unqueue(item)
        if item.future.done():  # cancelled by its caller
            return False
        if item.request.deadline is not None and item.request.deadline <= time.monotonic():
            self._fail(item, self._expired())
            return False
        return True

    def _unqueue(self, item: _Waiting) -> None:
        if item.queued:
            item.queued = False
            self._queued_rows -= item.rows

    async def _run_batch(self, items: list[_Waiting]) -> None:
        try:
            now = time.monotonic()
            live: list[_Waiting] = []
            for item in items:
                # Callers may have left, or run out of time, while the batch was forming.
                if item.future.done():
                    continue
                if item.request.deadline is not None and item.request.deadline <= now:
                    self._fail(item, self._expired())
                    continue
                live.append(item)
            batch_rows = sum(item.rows for item in live)
            for item in live:
                item.started, item.batch_rows, item.batch_requests = now, batch_rows, len(live)
                if self._queue_series is not None:
                    self._queue_series.observe(now - item.arrived)
            if len(live) == 1:
                await self._run_alone(live[0])
            elif live:
                await self._run_together(live)
        except Exception:
            log.exception("batch of %s/%s failed unexpectedly", self.name, self.version)
        finally:
            # Nobody may wait forever, whatever went wrong above.
            for item in items:
                if not item.future.done():
                    self._fail(item, self._internal())

    async def _run_together(self, live: list[_Waiting]) -> None:
        outcome = await stacking.run_stacked(
            [item.request for item in live], self._predict, functools.partial(self._answer, live)
        )
        if outcome.misaligned is not None:
            log.warning(
                "output '%s' of %s/%s has not one row per input row; ran the batch one by one",
                outcome.misaligned,
                self.name,
                self.version,
            )
        elif not outcome.together:
            # Which request broke the batch was unknown: each ran alone, so only it failed.
            self.failed_batches += 1
            log.info(
                "batch of %d requests to %s/%s failed (%s); ran them one by one",
                len(live),
                self.name,
                self.version,
                type(outcome.error).__name__,
            )

    async def _run_alone(self, item: _Waiting) -> None:
        await stacking.run_alone([item.request], self._predict, functools.partial(self._answer, [item]))

    async def _predict(self, request: InferRequest) -> InferResult:
        """One call of the inner model's `predict` on the executor (a batch, or one request)."""
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(
            self.inner.executor, self.inner.predict, request.inputs, request.outputs
        )
        self.batches_run += 1
        rows = rows_of(request.inputs.values())
        self.rows_run += rows
        if self._rows_series is not None:
            self._rows_series.observe(rows)
        return InferResult(outputs, model_name=self.name, model_version=self.version)

    def _answer(self, items: list[_Waiting], index: int, answer: InferResult | BaseException) -> None:
        item = items[index]
        if item.future.done():
            return
        if isinstance(answer, InferResult):
            self.requests_run += 1
            item.finished = time.monotonic()
            item.future.set_result(answer)
        else:
            item.future.set_exception(answer)

    @staticmethod
    def _fail(item: _Waiting, error: BaseException) -> None:
        if not item.future.done():
            item.future.set_exception(error)

    def _expired(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"model '{self.name}' version {self.version}: the deadline passed while the request waited for a batch"
        )

    def _internal(self) -> MeshError:
        # Not public: the client gets the fixed INTERNAL message; the log has the details.
        return MeshError(f"batch of model '{self.name}' version {self.version} ended without an answer")

    def _shutting_down(self) -> Unavailable:
        return Unavailable(f"model '{self.name}' version {self.version} is shutting down; retry elsewhere")


class _Full:
    """`_take_fitting`'s answer when the next request of the key does not fit the batch."""


_FULL = _Full()


def instrument(servables: Iterable[Servable], metrics: ServerMetrics) -> None:
    """Report the batches and queues of every batching servable among `servables` on `metrics`."""
    for servable in servables:
        if isinstance(servable, BatchingModel):
            servable.instrument(metrics)
