"""Coalescing: concurrent calls of one step become one downstream call (a Stage wrapper).

Every gRPC call costs a few hundred microseconds of CPU on each side, far more than the digits
models' compute. Under load, the orchestrator holds many requests at the same step at once;
sending them as one call with their rows stacked divides that cost by the batch size.

    step calls --> per (model, version, outputs, input layout): at most `max_in_flight` calls
                   running; the rest wait and leave together, as one call, when one returns

No timer: a call goes out at once while fewer than `max_in_flight` are running, so a lone
request (concurrency 1) never waits. Each caller gets exactly its rows back and keeps its own
deadline; when a coalesced call fails with anything but UNAVAILABLE or DEADLINE_EXCEEDED, each
caller is retried alone, so a bad request fails alone. Graph semantics are untouched: switches,
ensembles and aggregations still see one request's rows at a time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from orchestrator.stage import Stage
from services.common.errors import Cancelled, DeadlineExceeded, MeshError, ResourceExhausted, Unavailable
from services.common.types import InferRequest, InferResult, ModelSignature

log = logging.getLogger(__name__)

#: Calls of one step in flight before further ones wait to leave stacked (`--coalesce`).
DEFAULT_IN_FLIGHT = 2

#: Calls may share a downstream call only if all of this matches.
CallKey = tuple[str, str, tuple[str, ...], tuple[tuple[str, np.dtype, tuple[int, ...]], ...]]

#: Failures that are about the downstream service, not about one request's rows: every caller
#: gets them as they are (the engine decides whether to retry).
_SHARED_FAILURES = (Unavailable, DeadlineExceeded, ResourceExhausted, Cancelled)


@dataclass(eq=False, slots=True)
class _Call:
    request: InferRequest
    rows: int
    future: asyncio.Future[InferResult]


@dataclass(slots=True)
class _Lane:
    """The calls of one key: how many downstream calls run, and who waits for the next."""

    running: int = 0
    waiting: list[_Call] = field(default_factory=list)


class CoalescingStage:
    """A Stage that stacks concurrent calls with the same key into one call of `inner`."""

    def __init__(self, inner: Stage, *, max_in_flight: int = DEFAULT_IN_FLIGHT, max_rows: int = 64) -> None:
        if max_in_flight < 1 or max_rows < 1:
            raise ValueError("max_in_flight and max_rows must be at least 1")
        self.inner = inner
        self.max_in_flight = max_in_flight
        self.max_rows = max_rows
        self._lanes: dict[CallKey, _Lane] = {}
        #: Downstream calls made, and how many callers they answered (for tests and metrics).
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
        if lane.running < self.max_in_flight and not lane.waiting:
            lane.running += 1
            try:
                return await self._send(request)
            finally:
                self._finished(key, lane)
        call = _Call(request, _rows(request), asyncio.get_running_loop().create_future())
        lane.waiting.append(call)
        left = None if request.deadline is None else request.deadline - time.monotonic()
        try:
            # Each caller keeps its own deadline, whatever the shared call is given.
            async with asyncio.timeout(left):
                return await asyncio.shield(call.future)
        except TimeoutError:
            call.future.cancel()  # if it has not left yet, it never will
            raise DeadlineExceeded(f"{request.model}: no answer within {left:.3f}s") from None
        except asyncio.CancelledError:
            call.future.cancel()  # the caller is gone: drop it from the next call
            if call in lane.waiting:
                lane.waiting.remove(call)
            raise

    async def _send(self, request: InferRequest) -> InferResult:
        self.calls_sent += 1
        self.callers_served += 1
        return await self.inner.call(request)

    def _finished(self, key: CallKey, lane: _Lane) -> None:
        """A downstream call of `key` returned: send whoever waits, stacked, in its slot."""
        lane.running -= 1
        while lane.waiting and lane.running < self.max_in_flight:
            batch: list[_Call] = []
            rows = 0
            while lane.waiting and (not batch or rows + lane.waiting[0].rows <= self.max_rows):
                call = lane.waiting.pop(0)
                batch.append(call)
                rows += call.rows
            lane.running += 1
            # A fresh context: the shared call belongs to no single request (its log context included).
            task = asyncio.create_task(self._send_stacked(batch), context=contextvars.Context())
            task.add_done_callback(functools.partial(self._stacked_done, key, lane))
        if not lane.running and not lane.waiting:
            self._lanes.pop(key, None)

    def _stacked_done(self, key: CallKey, lane: _Lane, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("coalesced call of %s failed unexpectedly", key[0], exc_info=task.exception())
        self._finished(key, lane)

    async def _send_stacked(self, batch: list[_Call]) -> None:
        live = [call for call in batch if not call.future.done()]
        if not live:
            return
        if len(live) == 1:
            await self._answer_alone(live[0])
            return
        first = live[0].request
        deadlines = [call.request.deadline for call in live]
        stacked = InferRequest(
            model=first.model,
            inputs={
                name: np.concatenate([call.request.inputs[name] for call in live]) for name in first.inputs
            },
            outputs=first.outputs,
            version=first.version,
            request_id=",".join(call.request.request_id for call in live if call.request.request_id)[:256],
            deadline=None if None in deadlines else max(d for d in deadlines if d is not None),
        )
        self.calls_sent += 1
        try:
            result = await self.inner.call(stacked)
        except _SHARED_FAILURES as err:
            for call in live:
                _settle(call, error=err)
            return
        except MeshError:
            # One request's rows may have broken the call: answer each alone.
            await asyncio.gather(*(self._answer_alone(call) for call in live))
            return
        except BaseException as exc:
            for call in live:
                _settle(
                    call, error=exc if isinstance(exc, Exception) else MeshError("coalesced call cancelled")
                )
            raise
        total = sum(call.rows for call in live)
        if any(array.ndim == 0 or array.shape[0] != total for array in result.outputs.values()):
            await asyncio.gather(*(self._answer_alone(call) for call in live))
            return
        self.callers_served += len(live)
        start = 0
        for call in live:
            stop = start + call.rows
            rows = {name: array[start:stop] for name, array in result.outputs.items()}
            _settle(
                call,
                result=InferResult(rows, result.model_name, result.model_version, dict(result.parameters)),
            )
            start = stop

    async def _answer_alone(self, call: _Call) -> None:
        try:
            result = await self._send(call.request)
        except Exception as exc:
            _settle(call, error=exc)
        else:
            _settle(call, result=result)


def _settle(call: _Call, *, result: InferResult | None = None, error: BaseException | None = None) -> None:
    if call.future.done():
        return
    if error is not None:
        call.future.set_exception(error)
    else:
        assert result is not None
        call.future.set_result(result)


def _rows(request: InferRequest) -> int:
    return int(next(iter(request.inputs.values())).shape[0])


def _key(request: InferRequest) -> CallKey | None:
    """The coalescing key, or None for calls that cannot be stacked (scalars, ragged, empty)."""
    layout = []
    rows = -1
    for name in sorted(request.inputs):
        array = request.inputs[name]
        if array.ndim == 0 or array.dtype == np.object_:
            return None
        if rows == -1:
            rows = array.shape[0]
        if array.shape[0] != rows or rows == 0:
            return None
        layout.append((name, array.dtype, tuple(array.shape[1:])))
    if rows <= 0:
        return None
    return (request.model, request.version, request.outputs, tuple(layout))
