"""Admission at the front door: overload refused before a call is decoded or its handler runs.

    call arrives --> interceptor (the method's name only; the body not yet read, not decoded)
                       | in flight >= the limit, or the event loop lags more than `max_lag`
                       |     (with at least `floor` in flight)
                       |-- yes --> RESOURCE_EXHAUSTED, no deserializer, no handler
                       v no
                     decode, the data plane (whose limiter still holds the limit exactly)

Under overload the wait is not in a handler: it is in gRPC's queue and the event loop, before
any handler runs, so a limit on running handlers (`limits`) cannot see it, and a refusal it
makes arrives only after that whole wait. The loop's lag (how late a timer fires) is that wait,
measured: while it is above `max_lag`, new inference calls are refused at once, which takes the
work off the loop until the wait is short again. `floor` calls are always admitted, so a busy
machine's scheduling noise never turns a light load away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.common.limits import ConcurrencyLimiter

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class LoopLag:
    """How late the running event loop fires a timer of `interval` seconds: every callback on
    the loop waits about as long. Rises at once with a late timer, halves with each timely one."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.seconds = 0.0
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
            start = loop.time()
            await asyncio.sleep(self.interval)
            late = loop.time() - start - self.interval
            self.seconds = max(late, self.seconds / 2)


class Admission(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses ModelInfer calls at the front door while the node is overloaded (see the module)."""

    def __init__(self, limiter: ConcurrencyLimiter, lag: LoopLag, *, max_lag: float, floor: int = 16) -> None:
        self.limiter = limiter
        self.lag = lag
        self.max_lag = max_lag
        self.floor = floor
        #: Calls refused here, by reason (for tests and metrics).
        self.refused = {"limit": 0, "lag": 0}
        self._on_refusal: Callable[[str], None] | None = None

    def on_refusal(self, hook: Callable[[str], None]) -> None:
        self._on_refusal = hook

    def reason(self) -> str | None:
        """Why a call arriving now is refused ("limit" or "lag"), or None to admit it."""
        in_flight = self.limiter.in_flight
        if in_flight >= self.limiter.limit:
            return "limit"
        if self.lag.seconds > self.max_lag and in_flight >= self.floor:
            return "lag"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method == MODEL_INFER:
            reason = self.reason()
            if reason is not None:
                return self._refusal(reason)
        return await continuation(details)

    def _refusal(self, reason: str) -> grpc.RpcMethodHandler:
        self.refused[reason] += 1
        self.limiter.refused += 1
        if self._on_refusal is not None:
            self._on_refusal(reason)
        limiter = self.limiter
        message = (
            f"{limiter.node} is overloaded ({limiter.in_flight} inference calls in flight, limit "
            f"{limiter.limit}; event loop {1000 * self.lag.seconds:.0f} ms behind): the call was not "
            "run: retry later or on another replica"
        )

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        # No deserializer: the body of a refused call is never decoded.
        return grpc.unary_unary_rpc_method_handler(refuse)
