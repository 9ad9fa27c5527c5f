"""The traced transport edge: the servicer and the client, with spans around ModelInfer only.

Chosen once, when tracing is on (`services.common.observability.tracing`): the server builds a
`TracedInferenceServicer` instead of the plain one, and the orchestrator's channels are
`TracedOipClient`s. With tracing off neither exists, so the plain hot path is untouched. The
other methods (health, reflection, metadata, readiness) are inherited as they are: never traced.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.grpc.client import OipClient
from services.common.grpc.servicer import InferenceServicer
from services.common.observability import tracing
from services.common.types import rows_of


class TracedInferenceServicer(InferenceServicer):
    """ModelInfer inside a SERVER span that continues the caller's trace (its `traceparent`)."""

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if not isinstance(request, pb.ModelInferRequest):  # refused at the door, or not protobuf: no span
            return await super().ModelInfer(request, context)
        span, token = tracing.server_start(context.invocation_metadata(), rows_of(request.inputs))
        code, status, message = "OK", 0, ""
        try:
            response: pb.ModelInferResponse = await super().ModelInfer(request, context)
        except asyncio.CancelledError:
            code, status, message = "CANCELLED", 1, "the caller went away"
            raise
        except BaseException:
            # Aborted: the servicer has set the status it answers with.
            answered = context.code()
            if isinstance(answered, grpc.StatusCode):
                code, status = answered.name, answered.value[0]
            else:
                code, status = "UNKNOWN", 2
            message = str(context.details() or "")
            raise
        finally:
            tracing.finish(
                span, token, code, message, server=True, attributes={"rpc.grpc.status_code": status}
            )
        return response


class _TracedStub:
    """The inference stub of one client, whose ModelInfer calls carry the current trace context."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def ModelInfer(self, message: Any, *, timeout: float | None = None, metadata: Any = None) -> Any:
        return self._stub.ModelInfer(
            message, timeout=timeout, metadata=(*(metadata or ()), *tracing.inject())
        )


class TracedOipClient(OipClient):
    """An OipClient whose ModelInfer calls carry the current trace (W3C `traceparent`): the
    server's span becomes a child of the caller's (an orchestrator step's)."""

    def _open(self) -> None:  # also after a certificate rotation opens a new channel
        super()._open()
        self._stub = _TracedStub(self._stub)


def servicer_class() -> type[InferenceServicer]:
    """The servicer a node builds: traced when tracing is on."""
    return TracedInferenceServicer if tracing.enabled else InferenceServicer


def client_class() -> type[OipClient]:
    """The client the orchestrator's channels use: traced when tracing is on."""
    return TracedOipClient if tracing.enabled else OipClient
