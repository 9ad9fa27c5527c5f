"""The transport edge: OIP gRPC requests in, the data plane called, responses out.

Each RPC converts protobuf to plain values (the tensor codec for tensors), calls the node's
`DataPlane`, and converts its answer back; lookup, readiness, validation and metrics are the
data plane's. Errors are mapped to status codes here and nowhere else (`status`): a MeshError
keeps its code (and its message when public); anything else is logged in full and answered
with INTERNAL and a fixed message, so internals never leak to clients.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common import codec
from services.common.dataplane import DataPlane
from services.common.errors import MAX_MESSAGE, InvalidInput, MeshError, bounded
from services.common.logs import request_id_var
from services.common.types import InferRequest, InferResult

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"
#: Routine outcomes, logged at INFO: client mistakes, and load shed on purpose (counted by the
#: requests metric; a WARNING per refused call would add work exactly when there is too much).
_ROUTINE_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"})
REQUEST_ID_HEADER = "x-request-id"
#: Request ids longer than this are cut in the logs (they come from clients).
_MAX_ID = 128

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The request id of a call whose request carries none: the header's, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            return str(value)
    return f"{random.getrandbits(64):016x}"


def status(method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed RPC answers with; logs the failure. Messages are
    bounded (`errors.bounded`): they may echo client input of any size."""
    if isinstance(exc, MeshError):
        code = grpc.StatusCode[exc.code]
        message = bounded(exc.message, MAX_MESSAGE)
        if not exc.public:
            log.error("internal error in %s: %s", method, message)
            return code, INTERNAL_MESSAGE
        # Client mistakes and shed load are routine (INFO); a peer down or a deadline is worth a look.
        level = logging.INFO if exc.code in _ROUTINE_CODES else logging.WARNING
        log.log(level, "%s failed", method, extra={"code": code.name, "error": message})
        return code, message
    log.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


# -- bodies that are not protobuf -------------------------------------------------------------


class Undecodable:
    """What a guarded request deserializer answers for bytes that are not its message: the
    handler then refuses it with INVALID_ARGUMENT, instead of gRPC answering UNKNOWN with the
    decoder's exception and logging a traceback for every such request."""

    __slots__ = ("message", "size")

    def __init__(self, message: str, size: int) -> None:
        self.message = message
        self.size = size

    def error(self) -> InvalidInput:
        return InvalidInput(f"the request body ({self.size} bytes) is not a valid {self.message} message")


def _guard(deserializer: Callable[[bytes], Any] | None, message: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            return Undecodable(message, len(raw))

    return decode


class DecodingGuard:
    """Stands in for the gRPC server while generated code registers a service
    (`add_..._to_server(servicer, DecodingGuard(server))`): every method's request deserializer
    is wrapped by `_guard`; the handlers reach the server with both registrations."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again, guarded, through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        guarded = {
            name: handler._replace(
                request_deserializer=_guard(handler.request_deserializer, name + "Request")
            )
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self._server.add_registered_method_handlers(service, guarded)


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map every error of an RPC to its status code, with the request id in the log context."""

    @wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        token = request_id_var.set(bounded(getattr(request, "id", "") or _request_id(context), _MAX_ID))
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await method(self, request, context)
        except Exception as exc:
            code, message = status(method.__name__, exc)
        finally:
            request_id_var.reset(token)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return wrapper


def infer_response(result: InferResult) -> pb.ModelInferResponse:
    """A ModelInferResponse (raw output contents) from an InferResult; the caller sets its id."""
    response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version)
    params = response.parameters
    for name, value in result.parameters.items():
        # Set in place (no message built and copied per parameter): a graph answers several.
        if isinstance(value, bool):
            params[name].bool_param = value
        elif isinstance(value, int):
            params[name].int64_param = value
        elif isinstance(value, float):
            params[name].double_param = value
        else:
            params[name].string_param = str(value)
    for name, array in result.outputs.items():
        datatype, shape, raw = codec.encode_raw(array)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """GRPCInferenceService over a node's DataPlane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @rpc
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @rpc
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        server = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=server.name, version=server.version, extensions=list(server.extensions)
        )

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        meta = self.dataplane.model_metadata(request.name, request.version)
        sig = meta.signature
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=sig.name,
            versions=list(meta.versions),
            platform=sig.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in sig.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in sig.outputs],
        )

    # The hot path: `rpc`'s work written out, so a call is one frame here rather than two.
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if isinstance(request, Undecodable):
            code, message = status("ModelInfer", request.error())
            await context.abort(code, message)
        request_id = bounded(request.id or _request_id(context), _MAX_ID)
        token = request_id_var.set(request_id)
        try:
            remaining = context.time_remaining()
            try:
                inputs = codec.decode_request_inputs(request)
            except Exception as exc:
                raise self.dataplane.refused(request.model_name, request.model_version, exc) from None
            response: pb.ModelInferResponse = await self.dataplane.infer(
                InferRequest(
                    model=request.model_name,
                    inputs=inputs,
                    outputs=tuple([o.name for o in request.outputs]) if request.outputs else (),
                    version=request.model_version,
                    request_id=request_id,
                    deadline=None if remaining is None else time.monotonic() + remaining,
                ),
                infer_response,
            )
            response.id = request.id
            return response
        except Exception as exc:
            code, message = status("ModelInfer", exc)
        finally:
            request_id_var.reset(token)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")
