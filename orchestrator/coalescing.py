"""Coalescing: concurrent calls of one step become one downstream call (a Stage wrapper).

Every gRPC call costs a few hundred microseconds of CPU on each side, far more than the digits
models' compute. Under load, the orchestrator holds many requests at the same step at once;
sending them as one call with their rows stacked divides that cost by the batch size.

    step calls --> per (model, version, outputs, input layout): at most `max_in_flight` calls
                   running; the rest wait and leave together, as one call, when one returns

No timer: a call goes out at once while fewer than `max_in_flight` are running, so a lone
request (concurrency 1) never waits. Each caller gets exactly its rows back and keeps its own
timeout; when a coalesced call fails with anything but UNAVAILABLE or DEADLINE_EXCEEDED, each
caller is retried alone, so a bad request fails alone. Graph semantics are untouched: switches,
ensembles and aggregations still see one request's rows at a time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from orchestrator.stage import Stage
from services.common.errors import DeadlineExceeded, MeshError
from services.common.types import InferResult, ModelSignature

log = logging.getLogger(__name__)

#: Calls of one step in flight before further ones wait to leave stacked (`--coalesce`).
DEFAULT_IN_FLIGHT = 2

#: Calls may share a downstream call only if all of this matches.
CallKey = tuple[str, str, tuple[str, ...], tuple[tuple[str, np.dtype, tuple[int, ...]], ...]]

#: Failures that are about the downstream service, not about one request's rows: every caller
#: gets them as they are (the engine decides whether to retry).
_SHARED_FAILURES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED")


@dataclass(eq=False, slots=True)
class _Call:
    inputs: Mapping[str, np.ndarray]
    rows: int
    timeout: float
    request_id: str
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

    async def ready(self, model: str, version: str) -> bool:
        return await self.inner.ready(model, version)

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float,
        request_id: str,
    ) -> InferResult:
        key = _key(model, version, inputs, outputs)
        if key is None:
            return await self._send(model, version, inputs, outputs, timeout, request_id)
        lane = self._lanes.setdefault(key, _Lane())
        if lane.running < self.max_in_flight and not lane.waiting:
            lane.running += 1
            try:
                return await self._send(model, version, inputs, outputs, timeout, request_id)
            finally:
                self._finished(key, lane)
        call = _Call(inputs, _rows(inputs), timeout, request_id, asyncio.get_running_loop().create_future())
        lane.waiting.append(call)
        try:
            # Each caller keeps its own budget, whatever the shared call is given.
            async with asyncio.timeout(timeout):
                return await asyncio.shield(call.future)
        except TimeoutError:
            call.future.cancel()  # if it has not left yet, it never will
            raise DeadlineExceeded(f"{model}: no answer within {timeout:.3f}s") from None
        except asyncio.CancelledError:
            call.future.cancel()  # the caller is gone: drop it from the next call
            if call in lane.waiting:
                lane.waiting.remove(call)
            raise

    async def _send(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        timeout: float,
        request_id: str,
    ) -> InferResult:
        self.calls_sent += 1
        self.callers_served += 1
        return await self.inner.infer(model, version, inputs, outputs, timeout=timeout, request_id=request_id)

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
            # A fresh context: the shared call belongs to no single request's accounting.
            task = asyncio.create_task(self._send_stacked(key, batch), context=contextvars.Context())
            task.add_done_callback(functools.partial(self._stacked_done, key, lane))
        if not lane.running and not lane.waiting:
            self._lanes.pop(key, None)

    def _stacked_done(self, key: CallKey, lane: _Lane, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("coalesced call of %s failed unexpectedly", key[0], exc_info=task.exception())
        self._finished(key, lane)

    async def _send_stacked(self, key: CallKey, batch: list[_Call]) -> None:
        model, version, outputs, _ = key
        live = [call for call in batch if not call.future.done()]
        if not live:
            return
        if len(live) == 1:
            await self._answer_alone(key, live[0])
            return
        names = list(live[0].inputs)
        stacked = {name: np.concatenate([call.inputs[name] for call in live]) for name in names}
        request_id = ",".join(call.request_id for call in live if call.request_id)[:256]
        self.calls_sent += 1
        try:
            result = await self.inner.infer(
                model,
                version,
                stacked,
                outputs,
                timeout=max(call.timeout for call in live),
                request_id=request_id,
            )
        except MeshError as err:
            if err.code in _SHARED_FAILURES:
                for call in live:
                    _settle(call, error=err)
                return
            # One request's rows may have broken the call: answer each alone.
            await asyncio.gather(*(self._answer_alone(key, call) for call in live))
            return
        except BaseException as exc:
            for call in live:
                _settle(
                    call, error=exc if isinstance(exc, Exception) else MeshError("coalesced call cancelled")
                )
            raise
        total = sum(call.rows for call in live)
        if any(array.ndim == 0 or array.shape[0] != total for array in result.outputs.values()):
            await asyncio.gather(*(self._answer_alone(key, call) for call in live))
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

    async def _answer_alone(self, key: CallKey, call: _Call) -> None:
        model, version, outputs, _ = key
        try:
            result = await self._send(model, version, call.inputs, outputs, call.timeout, call.request_id)
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


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(inputs.values())).shape[0])


def _key(
    model: str, version: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
) -> CallKey | None:
    """The coalescing key, or None for calls that cannot be stacked (scalars, ragged, empty)."""
    layout = []
    rows = -1
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0 or array.dtype == np.object_:
            return None
        if rows == -1:
            rows = array.shape[0]
        if array.shape[0] != rows or rows == 0:
            return None
        layout.append((name, array.dtype, tuple(array.shape[1:])))
    if rows <= 0:
        return None
    return (model, version, tuple(outputs), tuple(layout))
