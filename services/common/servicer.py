"""The transport edge: OIP gRPC requests in, servables called, responses out.

Each RPC converts protobuf to plain data, calls the repository's servable, and converts
back. Errors are mapped to status codes here and nowhere else: a MeshError keeps its code
(and its message when public); anything else is logged in full and answered with INTERNAL
and a fixed message, so internals never leak to clients.
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
from services.common.errors import MeshError, Unavailable
from services.common.logs import request_id_var
from services.common.metrics import ServerMetrics
from services.common.repository import ModelRepository
from services.common.types import InferRequest

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"
_CLIENT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND"})
REQUEST_ID_HEADER = "x-request-id"

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _request_id(request: object, context: grpc.aio.ServicerContext) -> str:
    request_id = getattr(request, "id", "")
    if not request_id:
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_HEADER:
                return str(value)
    return request_id or f"{random.getrandbits(64):016x}"


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map every error of an RPC to its status code, with the request id in the log context."""

    @wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        token = request_id_var.set(_request_id(request, context))
        try:
            return await method(self, request, context)
        except MeshError as err:
            code, message = grpc.StatusCode[err.code], (err.message if err.public else INTERNAL_MESSAGE)
            if not err.public:
                log.error("internal error in %s: %s", method.__name__, err.message)
            else:
                # Client mistakes are routine (INFO); a peer down or a deadline is worth a look.
                level = logging.INFO if err.code in _CLIENT_CODES else logging.WARNING
                log.log(level, "%s failed", method.__name__, extra={"code": code.name, "error": err.message})
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
        finally:
            request_id_var.reset(token)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _parameter(value: str | int | float | bool) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """GRPCInferenceService over a ModelRepository."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        *,
        server_name: str,
        server_version: str,
        is_draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.server_name = server_name
        self.server_version = server_version
        self.is_draining = is_draining

    @rpc
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repository.ready and not self.is_draining())

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        servable = self.repository.get(request.name, request.version)
        return pb.ModelReadyResponse(ready=servable.ready and not self.is_draining())

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=[])

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        servable = self.repository.get(request.name, request.version)
        if not servable.loaded:
            raise Unavailable(f"model '{servable.name}' is still loading")
        sig = servable.signature
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=servable.name,
            versions=[request.version] if request.version else self.repository.versions(servable.name),
            platform=sig.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in sig.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in sig.outputs],
        )

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        # Series are labelled by served models only: unknown names must not grow the registry.
        model, version, code = "unknown", "", "OK"
        self.metrics.inflight.inc()
        try:
            servable = self.repository.get(request.model_name, request.model_version)
            model, version = servable.name, servable.version
            if self.is_draining():
                raise Unavailable(f"server is shutting down; retry on another replica of '{model}'")
            if not servable.loaded:
                raise Unavailable(f"model '{model}' version {servable.version} is still loading")
            headers: dict[str, tuple[str, list[int]]] = {}
            for tensor in request.inputs:
                headers[tensor.name] = (tensor.datatype, list(tensor.shape))
            outputs = tuple(o.name for o in request.outputs)
            servable.validate(headers, outputs)
            remaining = context.time_remaining()
            result = await servable.infer(
                InferRequest(
                    model=servable.name,
                    inputs=codec.decode_request_inputs(request),
                    version=servable.version,
                    outputs=outputs,
                    request_id=request_id_var.get(),
                    deadline=None if remaining is None else time.monotonic() + remaining,
                )
            )
            response = pb.ModelInferResponse(
                model_name=result.model_name or servable.name,
                model_version=result.model_version or servable.version,
                id=request.id,
            )
            for name, value in result.parameters.items():
                response.parameters[name].CopyFrom(_parameter(value))
            for name, array in result.outputs.items():
                datatype, shape, raw = codec.encode_raw(array)
                response.outputs.add(name=name, datatype=datatype, shape=shape)
                response.raw_output_contents.append(raw)
            return response
        except MeshError as err:
            code = err.code
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.observe_request(model, version, code, time.perf_counter() - started)
