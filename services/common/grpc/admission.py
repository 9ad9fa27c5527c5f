"""Admission at the front door: overload refused before a call is decoded or its handler runs.

    ModelInfer arrives --> its request deserializer (`servicer.DecodingGuard`), body not yet decoded
                             | in flight >= the limit, or the event loop lags more than `max_lag`
                             |     (with at least `floor` in flight)
                             |-- yes --> a `Refused` marker, the body never decoded; the handler
                             |           answers RESOURCE_EXHAUSTED at once
                             v no
                           decode, the data plane (whose limiter still holds the limit exactly)

Under overload the wait is not in a handler: it is in gRPC's queue and the event loop, before
any handler runs, so a limit on running handlers (`limits`) cannot see it, and a refusal it
makes arrives only after that whole wait. The loop's lag (how late a timer fires) is that wait,
measured: while it is above `max_lag`, new inference calls are refused at once, which takes the
work off the loop until the wait is short again. `floor` calls are always admitted, so a busy
machine's scheduling noise never turns a light load away (and below half the floor the lag is
measured only now and then: `LoopLag`).

The check rides on the deserializer every call already goes through, not on a server
interceptor: with any interceptor grpc.aio runs an interceptor pipeline for every call, so a
node without bearer tokens has none at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from services.common.limits import ConcurrencyLimiter


class LoopLag:
    """How late the running event loop fires a timer of `interval` seconds: every callback on
    the loop waits about as long. Rises at once with a late timer, halves with each timely one.

    While `busy()` is false (the lag decides nothing then) the timer ticks every `idle_interval`
    instead, still measuring: an idle node does not wake up 500 times a second.
    """

    def __init__(self, interval: float = 0.002, idle_interval: float = 0.05) -> None:
        self.interval = interval
        self.idle_interval = idle_interval
        self.seconds = 0.0
        self.busy: Callable[[], bool] = lambda: True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            interval = self.interval if self.busy() else max(self.interval, self.idle_interval)
            start = loop.time()
            await asyncio.sleep(interval)
            late = loop.time() - start - interval
            self.seconds = max(late, self.seconds / 2)


class Refused:
    """What the ModelInfer deserializer answers for a call refused at the door (its body unread)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    async def answer(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Refuse the call (no log line: one per refused call would add work exactly when there
        is too much; `onnxmesh_admission_refusals` counts them)."""
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.message)


class Admission:
    """Refuses ModelInfer calls at the front door while the node is overloaded (see the module)."""

    def __init__(self, limiter: ConcurrencyLimiter, lag: LoopLag, *, max_lag: float, floor: int = 16) -> None:
        self.limiter = limiter
        self.lag = lag
        self.max_lag = max_lag
        self.floor = floor
        #: Calls refused here, by reason (for tests and metrics).
        self.refused = {"limit": 0, "lag": 0}
        self._on_refusal: Callable[[str], None] | None = None
        # The lag counts from `floor` calls in flight: watched closely from half of it, so that
        # the measure is current when it starts to count.
        lag.busy = lambda: 2 * limiter.in_flight >= self.floor

    def on_refusal(self, hook: Callable[[str], None]) -> None:
        self._on_refusal = hook

    def reason(self) -> str | None:
        """Why a call arriving now is refused ("limit" or "lag"), or None to admit it."""
        limiter = self.limiter
        in_flight = limiter.in_flight
        if in_flight >= limiter.policy.limit:
            return "limit"
        if self.lag.seconds > self.max_lag and in_flight >= self.floor:
            return "lag"
        return None

    def refuse(self, reason: str) -> Refused:
        """Count a call refused for `reason`; what its handler answers it with."""
        self.refused[reason] += 1
        limiter = self.limiter
        limiter.refused += 1
        if self._on_refusal is not None:
            self._on_refusal(reason)
        return Refused(
            f"{limiter.node} is overloaded ({limiter.in_flight} inference calls in flight, limit "
            f"{limiter.limit}; event loop {1000 * self.lag.seconds:.0f} ms behind): the call was not "
            "run: retry later or on another replica"
        )
