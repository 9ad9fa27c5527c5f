"""Coalescing: concurrent calls of one step become one downstream call (a Stage wrapper).

Every gRPC call costs a few hundred microseconds of CPU on each side, far more than the digits
models' compute. Under load, the orchestrator holds many requests at the same step at once;
sending them as one call with their rows stacked divides that cost by the batch size.

    step calls --> per (model, version, outputs, input layout): at most `LaneLimit` calls
                   running; the rest wait and leave together, as one call, when one returns

A call goes out at once while fewer calls than the limit are running, so a lone request
(concurrency 1) never waits. The limit adapts to load (`LaneLimit`): up to `max_in_flight` while
calls answer as fast as they do unloaded, down to one as their latency grows, so that under load
every caller that arrives while a call runs leaves in the next one. Two more rules apply only to
a loaded lane whose calls already carry several rows (never to one row per call):

- it gathers: its first caller waits for the end of the event loop's turn, so the callers resumed
  in that turn (the rows of one call that returned, moving on together) leave as one call, not
  the first alone and the others after it;
- saturated (HOLD_FROM_ROWS rows per call or more), it holds: once a call returns, its waiting
  callers stay for HOLD_SHARE of a call's recent latency (HOLD_MAX at most). A call costs about
  the same whatever rows it carries, so the callers arriving meanwhile ride along instead of
  paying for another call, and the CPU saved is throughput (a closed loop's latency is its
  concurrency over its throughput).

Stacking, splitting and re-running alone are
`services.common.batching.stacking`'s, shared with the model services' adaptive batching: each caller
gets exactly its rows back; when a coalesced call fails with anything but a shared failure
(UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, CANCELLED: `stacking.SHARED_FAILURES`),
each caller is retried alone, so a bad request fails alone. Each caller keeps its own deadline
while it waits. Graph semantics are untouched: switches, ensembles and aggregations still see
one request's rows at a time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.stages.base import Stage, keeps_deadline
from services.common.batching import stacking
from services.common.errors import DeadlineExceeded, MeshError
from services.common.observability import tracing
from services.common.types import InferRequest, InferResult, ModelSignature, rows_of

log = logging.getLogger(__name__)

#: The most calls of one step in flight before further ones wait to leave stacked (`--coalesce`).
DEFAULT_IN_FLIGHT = 4
#: The most input bytes one stacked call carries: half the 64 MiB gRPC message limit of the
#: channels, leaving room for framing, so that stacking large tensors (pages of an image) never
#: makes a message the channel refuses. A call over it alone still goes alone.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: A saturated lane (loaded, its last call carrying at least HOLD_FROM_ROWS rows) holds its
#: waiting callers for this share of its calls' recent latency (at most HOLD_MAX seconds: a slow
#: model's calls are not worth holding long) before they leave.
HOLD_SHARE = 0.5
HOLD_MAX = 0.005
HOLD_FROM_ROWS = 4
#: on_call(model, rows): one downstream call left carrying `rows` rows (the rows-per-call metric).
CallHook = Callable[[str, int], None]

#: Calls may share a downstream call only if all of this matches: model, version, outputs asked
#: for, and the layout of the inputs.
CallKey = tuple[str, str, tuple[str, ...], stacking.Layout]


@dataclass(eq=False, slots=True)
class _Call:
    request: InferRequest
    rows: int
    #: Its input tensors' bytes.
    nbytes: int
    future: asyncio.Future[InferResult]
    #: The caller's trace context (tracing on), so the call that carries its rows links to it.
    trace: Any = None
    #: Its deadline passed before an answer came.
    expired: bool = False


@dataclass(slots=True)
class _Lane:
    """The calls of one key: how many downstream calls run, and who waits for the next."""

    running: int = 0
    waiting: list[_Call] = field(default_factory=list)
    #: A send of the waiting callers is due (at the end of this turn of the event loop, or when a
    #: hold ends).
    scheduled: bool = False


class CoalescingStage:
    """A Stage that stacks concurrent calls with the same key into one call of `inner`."""

    def __init__(
        self,
        inner: Stage,
        *,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        max_rows: int = 64,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_call: CallHook | None = None,
        adaptive: bool = True,
    ) -> None:
        """`adaptive` False keeps the limit at `max_in_flight`; `on_call` sees every downstream call."""
        if max_in_flight < 1 or max_rows < 1:
            raise ValueError("max_in_flight and max_rows must be at least 1")
        self.inner = inner
        self.keeps_deadline = keeps_deadline(inner)
        self.on_call = on_call
        self.max_in_flight = max_in_flight
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lanes: dict[CallKey, _Lane] = {}
        self._limits = LaneLimits(max_in_flight, adaptive=adaptive, on_call=on_call)
        #: Downstream calls made, and how many callers they answered, with rows or with an error
        #: (for tests and metrics).
        self.calls_sent = 0
        self.callers_served = 0

    async def metadata(self, model: str, version: str) -> ModelSignature:
        return await self.inner.metadata(model, version)

    async def is_ready(self, model: str, version: str) -> bool:
        return await self.inner.is_ready(model, version)

    async def call(self, request: InferRequest) -> InferResult:
        key = _key(request)
        if key is None:
            return await self._send(request)
        lane = self._lanes.setdefault(key, _Lane())
        limit = self._limits.of(key)
        # A loaded lane whose calls carry several rows gathers: its callers wait for the others the
        # event loop resumes in their turn. Any other takes the fast path (a lone request, one row
        # per call, never waits, whatever its latency's jitter says): straight through, timed inline.
        if limit.allows(lane.running) and not lane.waiting and not (limit.loaded and limit.rows > 1):
            limit.rows = rows = rows_of(request.inputs.values())
            lane.running += 1
            self.calls_sent += 1
            self.callers_served += 1
            if self.on_call is not None:
                self.on_call(request.model, rows)
            started = time.monotonic()
            try:
                result = await self.inner.call(request)
            finally:
                self._finished(key, lane)
            limit.observe(time.monotonic() - started)
            return result
        loop = asyncio.get_running_loop()
        call = _Call(
            request,
            rows_of(request.inputs.values()),
            sum(array.nbytes for array in request.inputs.values()),
            loop.create_future(),
            tracing.current() if tracing.enabled else None,
        )
        lane.waiting.append(call)
        if not lane.scheduled and limit.allows(lane.running):
            # A loaded lane with a free slot: the callers the event loop resumes in this same turn
            # (the rows of one call that just returned, moving on together) leave as one call.
            lane.scheduled = True
            loop.call_soon(self._gathered, key, lane)
        # Each caller keeps its own deadline, whatever the shared call is given.
        # (Deadlines are `time.monotonic()` times, the event loop's own clock.)
        expiry = None if request.deadline is None else loop.call_at(request.deadline, _expire, call)
        try:
            return await call.future
        except asyncio.CancelledError:
            # Timed out, or the caller is gone (awaiting cancelled the future): it never leaves.
            if call in lane.waiting:
                lane.waiting.remove(call)
            if call.expired and not _being_cancelled():
                raise DeadlineExceeded(f"{request.model}: no answer before the call's deadline") from None
            raise
        finally:
            if expiry is not None:
                expiry.cancel()

    async def _send(self, request: InferRequest) -> InferResult:
        self.calls_sent += 1
        self.callers_served += 1
        if self.on_call is not None:  # calls that cannot stack skip the limits: count them here
            self.on_call(request.model, rows_of(request.inputs.values()))
        return await self.inner.call(request)

    def _finished(self, key: CallKey, lane: _Lane) -> None:
        """A downstream call of `key` returned: send whoever waits, stacked, in its slot (after a
        hold, on a lane that is saturated)."""
        lane.running -= 1
        if lane.waiting and not lane.scheduled:
            limit = self._limits.of(key)
            if limit.loaded and limit.rows >= HOLD_FROM_ROWS:
                # Saturated: calls answer slowly and already carry many rows. A call costs the
                # same whatever rows it carries, so while a share of its latency passes, the
                # callers arriving meanwhile join this one instead of paying for another.
                lane.scheduled = True
                hold = min(HOLD_SHARE * limit.recent, HOLD_MAX)
                asyncio.get_running_loop().call_later(hold, self._gathered, key, lane)
                return
        self._dispatch(key, lane)

    def _gathered(self, key: CallKey, lane: _Lane) -> None:
        lane.scheduled = False
        self._dispatch(key, lane)

    def _dispatch(self, key: CallKey, lane: _Lane) -> None:
        """Send whoever waits, stacked, in the free slots of the lane's limit."""
        while lane.waiting and self._limits.allows(key, lane.running):
            batch: list[_Call] = []
            rows = nbytes = 0
            while lane.waiting and (
                not batch
                or (
                    rows + lane.waiting[0].rows <= self.max_rows
                    and nbytes + lane.waiting[0].nbytes <= self.max_bytes
                )
            ):
                call = lane.waiting.pop(0)
                batch.append(call)
                rows += call.rows
                nbytes += call.nbytes
            self._limits.of(key).rows = rows
            lane.running += 1
            # A fresh context: the shared call belongs to no single request (its log context included);
            # traced, it gets a span of its own linked to each caller's.
            work = self._send_stacked(key, batch)
            if tracing.enabled:
                work = tracing.coalesced(work, [c.trace for c in batch], key[0], rows)
            task = asyncio.create_task(work, context=contextvars.Context())
            task.add_done_callback(functools.partial(self._stacked_done, key, lane))
        if not lane.running and not lane.waiting and self._lanes.get(key) is lane:
            del self._lanes[key]

    def _stacked_done(self, key: CallKey, lane: _Lane, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("coalesced call of %s failed unexpectedly", key[0], exc_info=task.exception())
        self._finished(key, lane)

    async def _send_stacked(self, key: CallKey, batch: list[_Call]) -> None:
        live = [call for call in batch if not call.future.done()]
        if not live:
            return
        answer = functools.partial(self._answer, live)
        send = functools.partial(self._send_one, key)
        try:
            if len(live) == 1:
                await stacking.run_alone([live[0].request], send, answer)
            else:
                # A shared failure reaches every caller (the engine decides whether to retry);
                # any other, and each caller is answered alone.
                await stacking.run_stacked([call.request for call in live], send, answer)
        except BaseException:
            for call in live:
                _settle(call, MeshError("coalesced call cancelled"))
            raise

    async def _send_one(self, key: CallKey, request: InferRequest) -> InferResult:
        """One downstream call on behalf of waiting callers (stacked or alone); `_answer` counts them."""
        self.calls_sent += 1
        return await self._limits.timed(key, self.inner.call, request)

    def _answer(self, calls: list[_Call], index: int, answer: InferResult | BaseException) -> None:
        self.callers_served += 1
        _settle(calls[index], answer)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _expire(call: _Call) -> None:
    """A waiting caller's deadline passed: it stops waiting (the caller raises DeadlineExceeded)."""
    if not call.future.done():
        call.expired = True
        call.future.cancel()


def _settle(call: _Call, answer: InferResult | BaseException) -> None:
    if call.future.done():
        return
    if isinstance(answer, BaseException):
        call.future.set_exception(answer)
    else:
        call.future.set_result(answer)


def _key(request: InferRequest) -> CallKey | None:
    """The coalescing key, or None for calls that cannot be stacked (scalars, ragged, empty, BYTES)."""
    stackable = stacking.layout(request.inputs, bytes_tensors=False)
    if stackable is None:
        return None
    return (request.model, request.version, request.outputs, stackable[0])


# -- the in-flight limit of each lane, and the rows-per-call metric ----------------------------


class LaneLimit:
    """How many calls of one lane may be in flight before further callers wait to leave stacked.

    A call costs the same few hundred microseconds of CPU on each side whatever rows it carries,
    so the fewer calls carry the load, the less CPU each request costs: under load the limit
    should be one, and every caller that arrives while that call runs leaves in the next. At low
    load stacking saves nothing worth a wait, and more calls may overlap. The signal is each
    call's latency against the lane's unloaded latency (`floor`, a slowly forgetting minimum):

        limit <- clamp(limit * floor / recent + HEADROOM, 1, maximum)

    At the floor the limit grows by HEADROOM per call up to `maximum`; at twice the floor it
    settles at one. `recent` is an exponential average of the last calls' latency.
    """

    HEADROOM = 0.5
    #: Below this the lane is loaded (one call at a time): its callers gather for a loop turn.
    GATHER_BELOW = 2.0
    #: Weight of the newest latency in `recent`.
    SMOOTHING = 0.2
    #: Per call, the floor forgets by this factor: a lane that became slower for good (a
    #: bigger model version, a busier machine) gets a new floor within a few hundred calls.
    FORGET = 1.0005

    def __init__(self, maximum: int, *, adaptive: bool = True) -> None:
        self.maximum = maximum
        self.adaptive = adaptive
        self.value = float(maximum)
        self.floor = float("inf")
        self.recent = 0.0
        #: Calls answer well above the floor (the lane is loaded).
        self.loaded = False
        #: Rows the lane's last call carried.
        self.rows = 0

    def allows(self, running: int) -> bool:
        return running < self.value

    def observe(self, seconds: float) -> None:
        """A call of this lane answered after `seconds`."""
        if not self.adaptive:
            return
        self.floor = min(self.floor * self.FORGET, seconds)
        self.recent = (
            seconds if self.recent == 0.0 else self.recent + self.SMOOTHING * (seconds - self.recent)
        )
        if self.recent > 0.0:
            target = self.value * min(1.0, self.floor / self.recent) + self.HEADROOM
            self.value = min(float(self.maximum), max(1.0, target))
            self.loaded = self.value < self.GATHER_BELOW


class LaneLimits:
    """Every lane's `LaneLimit` (kept while a lane is idle), and the calls' timing and metric."""

    def __init__(self, maximum: int, *, adaptive: bool = True, on_call: CallHook | None = None) -> None:
        self.maximum = maximum
        self.adaptive = adaptive
        self.on_call = on_call
        self._limits: dict[CallKey, LaneLimit] = {}

    def of(self, key: CallKey) -> LaneLimit:
        limit = self._limits.get(key)
        if limit is None:
            limit = self._limits[key] = LaneLimit(self.maximum, adaptive=self.adaptive)
        return limit

    def allows(self, key: CallKey, running: int) -> bool:
        return self.of(key).allows(running)

    async def timed(
        self, key: CallKey, call: Callable[[InferRequest], Awaitable[InferResult]], request: InferRequest
    ) -> InferResult:
        """Make one downstream call; its latency (when it answered) moves the lane's limit."""
        if self.on_call is not None:
            self.on_call(key[0], rows_of(request.inputs.values()))
        started = time.monotonic()
        result = await call(request)
        self.of(key).observe(time.monotonic() - started)
        return result
