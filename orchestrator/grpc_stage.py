"""The real Stage: one downstream service over OIP gRPC on a long-lived channel; and the
wrapper that times it for the orchestrator's overhead metric."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping, Sequence

import numpy as np

from orchestrator.stage import Stage
from services.common.client import OipClient
from services.common.errors import MeshError
from services.common.types import InferResult, ModelSignature

#: Per-request list of (start, end) of downstream calls, so the orchestrator can measure its
#: own time: request time minus the time at least one downstream call was in flight.
downstream_spans: contextvars.ContextVar[list[tuple[float, float]] | None] = contextvars.ContextVar(
    "downstream_spans", default=None
)


class GrpcStage:
    """Stage over an OipClient; the target may name many replicas (round robin)."""

    def __init__(self, service: str, client: OipClient) -> None:
        self.service = service
        self.client = client

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
        return await self.client.infer(
            model, inputs, outputs, version=version, timeout=timeout, request_id=request_id
        )

    async def metadata(self, model: str, version: str) -> ModelSignature:
        return await self.client.metadata(model, version)

    async def ready(self, model: str, version: str) -> bool:
        try:
            return await self.client.model_ready(model, version, timeout=2.0)
        except MeshError:
            return False


class TimedStage:
    """The outermost wrapper of a service's stage: records, for the current request, when it
    waited on the step (queued for coalescing included), so the orchestrator can tell its own
    time from the steps'."""

    def __init__(self, inner: Stage) -> None:
        self.inner = inner

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
        started = time.perf_counter()
        try:
            return await self.inner.infer(
                model, version, inputs, outputs, timeout=timeout, request_id=request_id
            )
        finally:
            spans = downstream_spans.get()
            if spans is not None:
                spans.append((started, time.perf_counter()))

    async def metadata(self, model: str, version: str) -> ModelSignature:
        return await self.inner.metadata(model, version)

    async def ready(self, model: str, version: str) -> bool:
        return await self.inner.ready(model, version)


def busy_time(spans: Sequence[tuple[float, float]]) -> float:
    """Total length of the union of intervals (overlapping parallel calls count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total
