"""The traced transport edge: the servicer and the client, with spans around ModelInfer only.

Chosen once, when tracing is on (`services.common.tracing`): the server builds a
`TracedInferenceServicer` instead of the plain one, and the orchestrator's channels are
`TracedOipClient`s. With tracing off neither exists, so the plain hot path is untouched. The
other methods (health, reflection, metadata, readiness) are inherited as they are: never traced.
"""

from __future__ import annotations

from typing import Any

import grpc

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common import tracing
from services.common.client import OipClient
from services.common.servicer import InferenceServicer


def _rows(message: Any) -> int:
    inputs = message.inputs
    return int(inputs[0].shape[0]) if inputs and inputs[0].shape else 0


class TracedInferenceServicer(InferenceServicer):
    """ModelInfer inside a SERVER span that continues the caller's trace (its `traceparent`)."""

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        with tracing.server_span(
            context.invocation_metadata(), request.model_name, request.model_version
        ) as span:
            span.set_attribute("onnxmesh.rows", _rows(request))
            try:
                response: pb.ModelInferResponse = await super().ModelInfer(request, context)
            except BaseException:
                # Aborted: the servicer has set the status it answers with.
                code = context.code()
                name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                span.set_attribute(
                    "rpc.grpc.status_code", code.value[0] if isinstance(code, grpc.StatusCode) else 2
                )
                tracing.set_code(span, name, str(context.details() or ""), server=True)
                raise
            span.set_attribute("rpc.grpc.status_code", 0)
            tracing.set_code(span, "OK", server=True)
            return response


class _TracedStub:
    """The inference stub of one client, with a CLIENT span and the trace context on ModelInfer."""

    def __init__(self, stub: Any, target: str) -> None:
        self._stub = stub
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    async def ModelInfer(self, message: Any, *, timeout: float | None = None, metadata: Any = None) -> Any:
        with tracing.client_span(self._target, message.model_name, message.model_version) as (span, headers):
            span.set_attribute("onnxmesh.rows", _rows(message))
            try:
                response = await self._stub.ModelInfer(
                    message, timeout=timeout, metadata=(*(metadata or ()), *headers)
                )
            except grpc.aio.AioRpcError as err:
                span.set_attribute("rpc.grpc.status_code", err.code().value[0])
                tracing.set_code(span, err.code().name, err.details() or "", server=False)
                raise
            span.set_attribute("rpc.grpc.status_code", 0)
            tracing.set_code(span, "OK", server=False)
            if response.model_version:
                span.set_attribute("onnxmesh.version", response.model_version)
            return response


class TracedOipClient(OipClient):
    """An OipClient whose ModelInfer calls carry the current trace (W3C `traceparent`)."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = _TracedStub(self._stub, target)


def servicer_class() -> type[InferenceServicer]:
    """The servicer a node builds: traced when tracing is on."""
    return TracedInferenceServicer if tracing.enabled else InferenceServicer


def client_class() -> type[OipClient]:
    """The client the orchestrator's channels use: traced when tracing is on."""
    return TracedOipClient if tracing.enabled else OipClient
