"""The transport edge: OIP gRPC requests in, the data plane called, responses out.

Each RPC converts protobuf to plain values (the tensor codec for tensors), calls the node's
`DataPlane`, and converts its answer back; lookup, readiness, validation and metrics are the
data plane's. Errors are mapped to status codes here and nowhere else (`status`): a MeshError
keeps its code (and its message when public); anything else is logged in full and answered
with INTERNAL and a fixed message, so internals never leak to clients.

Triton's extensions of the service are served too: ModelConfig, ModelStatistics,
RepositoryIndex, ModelStreamInfer, the classification and system shared-memory extensions
(tensor parameters, `services.common.triton.params`). What is not served answers with a code
and a message saying so (`REFUSED`), never "Method not found".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import wraps
from typing import Any, TypeVar

import grpc

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common import tensors
from services.common.dataplane import DataPlane
from services.common.errors import (
    INTERNAL_MESSAGE,
    MAX_MESSAGE,
    InvalidInput,
    MeshError,
    from_status,
    truncate,
)
from services.common.grpc import codec, triton
from services.common.grpc.admission import Admission, Refused
from services.common.observability.logs import REQUEST_ID_HEADER, request_id_var
from services.common.triton import params
from services.common.types import InferRequest, InferResult

log = logging.getLogger(__name__)

#: Requests of one ModelStreamInfer stream running at once; the stream waits beyond that.
STREAM_IN_FLIGHT = 64
#: Triton's RPCs this node answers with a refusal: (status name, message).
REFUSED = {
    "RepositoryModelLoad": (
        "FAILED_PRECONDITION",
        "model control is off: a node serves the models of its model directory from start-up; "
        "to change them, roll out a new version (RepositoryIndex lists what is served)",
    ),
    "TraceSetting": ("UNIMPLEMENTED", "TraceSetting is not served by onnxmesh nodes"),
    "LogSettings": ("UNIMPLEMENTED", "LogSettings is not served: start the node with --log-level"),
}
REFUSED["RepositoryModelUnload"] = REFUSED["RepositoryModelLoad"]
#: Routine outcomes, logged at INFO: client mistakes, and load shed on purpose (counted by the
#: requests metric; a WARNING per refused call would add work exactly when there is too much).
_ROUTINE_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"})
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


def status(method: str, exc: BaseException, **context: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed RPC answers with; logs the failure with its code,
    its reason and `context` (e.g. the model or graph called). Messages are bounded
    (`errors.truncate`): they may echo client input of any size."""
    if isinstance(exc, MeshError):
        code = grpc.StatusCode[exc.code]
        message = truncate(exc.message, MAX_MESSAGE)
        if not exc.public:
            log.error("internal error in %s: %s", method, message, extra={"code": code.name, **context})
            return code, INTERNAL_MESSAGE
        # Client mistakes and shed load are routine (INFO); a peer down or a deadline is worth a look.
        level = logging.INFO if exc.code in _ROUTINE_CODES else logging.WARNING
        log.log(level, "%s failed", method, extra={"code": code.name, "error": message, **context})
        return code, message
    log.error("unexpected error in %s", method, exc_info=exc, extra={"code": "INTERNAL", **context})
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


def _guard(
    deserializer: Callable[[bytes], Any] | None, message: str, admission: Admission | None = None
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    if admission is not None:
        reason, refuse = admission.reason, admission.refuse

        def admit(raw: bytes) -> Any:
            # The front door (`admission`): a refused call's body is never decoded.
            why = reason()
            if why is not None:
                return refuse(why)
            try:
                return deserializer(raw)
            except Exception:
                return Undecodable(message, len(raw))

        return admit

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            return Undecodable(message, len(raw))

    return decode


class DecodingGuard:
    """Stands in for the gRPC server while generated code registers a service
    (`add_..._to_server(servicer, DecodingGuard(server, admission))`): every method's request
    deserializer is wrapped by `_guard`, ModelInfer's with the front door's check when the node
    has one; the handlers reach the server with both registrations."""

    def __init__(self, server: grpc.aio.Server, admission: Admission | None = None) -> None:
        self._server = server
        self._admission = admission

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again, guarded, through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        guarded = {
            name: handler._replace(
                request_deserializer=_guard(
                    handler.request_deserializer,
                    name + "Request",
                    self._admission if name == "ModelInfer" else None,
                )
            )
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self._server.add_registered_method_handlers(service, guarded)


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map every error of an RPC to its status code, with the request id in the log context."""

    @wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        token = request_id_var.set(truncate(getattr(request, "id", "") or _request_id(context), _MAX_ID))
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
    wire = response.parameters
    for name, value in result.parameters.items():
        # Set in place (no message built and copied per parameter): a graph answers several.
        if isinstance(value, bool):
            wire[name].bool_param = value
        elif isinstance(value, int):
            wire[name].int64_param = value
        elif isinstance(value, float):
            wire[name].double_param = value
        else:
            wire[name].string_param = str(value)
    for name, array in result.outputs.items():
        datatype, shape, raw = tensors.encode_raw(array)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


def uses_extensions(request: pb.ModelInferRequest) -> bool:
    """True when any parameter is set: the request needs Triton's extensions, not the fast path."""
    if request.parameters:
        return True
    for tensor in request.inputs:
        if tensor.parameters:
            return True
    for output in request.outputs:  # noqa: SIM110 - not any() over a generator: no call per tensor
        if output.parameters:
            return True
    return False


def infer_request(
    dataplane: DataPlane, request: pb.ModelInferRequest, request_id: str, deadline: float | None
) -> tuple[InferRequest, dict[str, params.OutputOptions] | None]:
    """The one InferRequest of a ModelInferRequest; with parameters (shared-memory inputs,
    classification and shared-memory outputs, a timeout; others counted and ignored, or refused:
    `triton.params`), the output options by name too (None on the fast path, which has none)."""
    options = None
    shared: list[bytes | None] = []
    if uses_extensions(request):
        ignored: list[str] = []
        deadline = params.request_deadline(codec.parameter_values(request.parameters), deadline, ignored)
        for tensor in request.inputs:
            region = params.input_region(tensor.name, codec.parameter_values(tensor.parameters), ignored)
            shared.append(
                None
                if region is None
                else dataplane.shared_memory.read(region.name, region.offset, region.byte_size, tensor.name)
            )
        options = {
            o.name: params.output_options(o.name, codec.parameter_values(o.parameters), ignored)
            for o in request.outputs
        }
        if ignored:
            dataplane.metrics.ignored_parameters(ignored)
    infer = InferRequest(
        model=request.model_name,
        inputs=codec.decode_request_inputs(request, shared),
        outputs=tuple([o.name for o in request.outputs]) if request.outputs else (),
        version=request.model_version,
        request_id=request_id,
        deadline=deadline,
    )
    return infer, options


def extended_response(
    dataplane: DataPlane, options: Mapping[str, params.OutputOptions], result: InferResult
) -> pb.ModelInferResponse:
    """infer_response, with classification applied and shared-memory outputs written to their
    region (their entry in raw_output_contents is empty, so positions still match)."""
    for name, option in options.items():
        if option.class_count:
            result.outputs[name] = params.classify(name, result.outputs[name], option.class_count)
    response = infer_response(result)
    for index, tensor in enumerate(response.outputs):
        region = options[tensor.name].region if tensor.name in options else None
        if region is None:
            continue
        data = response.raw_output_contents[index]
        dataplane.shared_memory.write(region.name, region.offset, region.byte_size, data, tensor.name)
        response.raw_output_contents[index] = b""
        tensor.parameters[params.SHM_REGION].string_param = region.name
        tensor.parameters[params.SHM_SIZE].int64_param = len(data)
        if region.offset:
            tensor.parameters[params.SHM_OFFSET].int64_param = region.offset
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """GRPCInferenceService over a node's DataPlane, Triton's extensions included."""

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
        if not isinstance(request, pb.ModelInferRequest):  # refused at the door, or not protobuf
            if isinstance(request, Refused):
                await request.answer(context)
            code, message = status("ModelInfer", request.error())
            await context.abort(code, message)
        request_id = request.id or _request_id(context)
        if len(request_id) > _MAX_ID:
            request_id = truncate(request_id, _MAX_ID)
        token = request_id_var.set(request_id)
        try:
            remaining = context.time_remaining()
            response = await self.infer(
                request, request_id, None if remaining is None else time.monotonic() + remaining
            )
            response.id = request.id
            return response
        except Exception as exc:
            code, message = status("ModelInfer", exc, model=request.model_name[:128])
        finally:
            request_id_var.reset(token)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    def infer(
        self, request: pb.ModelInferRequest, request_id: str, deadline: float | None
    ) -> Awaitable[pb.ModelInferResponse]:
        """One ModelInferRequest (a call, or one request of a stream), fast path or extended: its
        InferRequest built (or refused) now, the data plane's answer to await (not a coroutine
        of its own: one frame less on the hot path)."""
        try:
            infer, options = infer_request(self.dataplane, request, request_id, deadline)
        except Exception as exc:
            raise self.dataplane.refused(request.model_name, request.model_version, exc) from None
        if options is None:
            return self.dataplane.infer(infer, infer_response)
        return self.dataplane.infer(infer, functools.partial(extended_response, self.dataplane, options))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's stream: every request runs as it arrives (up to STREAM_IN_FLIGHT at once) and
        is answered when done, with its id; a failed request is answered with `error_message`
        ("CODE: message") and the stream goes on."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            request_id = request.id or f"{random.getrandbits(64):016x}"
            token = request_id_var.set(request_id)
            try:
                response = await self.infer(request, request_id, deadline)
                response.id = request.id
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                code, message = status("ModelStreamInfer", exc)
                failed = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                answers.put_nowait(
                    pb.ModelStreamInferResponse(
                        error_message=f"{code.name}: {message}", infer_response=failed
                    )
                )
            finally:
                request_id_var.reset(token)
                slots.release()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # a broken request stream ends the call with its error
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        description = self.dataplane.model_description(request.name, request.version)
        return pb.ModelConfigResponse(config=triton.model_config(description))

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return triton.model_statistics(self.dataplane.model_statistics(request.name, request.version))

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            raise InvalidInput(
                f"repository '{request.repository_name}' is not known: a node has one repository (leave it empty)"
            )
        return triton.repository_index(self.dataplane.repository_index(request.ready))

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        raise from_status(*REFUSED["RepositoryModelLoad"])

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        raise from_status(*REFUSED["RepositoryModelUnload"])

    @rpc
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        return triton.shm_status(self.dataplane.shared_memory.status(request.name))

    @rpc
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.dataplane.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.dataplane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise from_status("NOT_FOUND", f"CUDA shared-memory region '{request.name}' is not registered")
        return pb.CudaSharedMemoryStatusResponse()  # none can be: there is no CUDA device

    @rpc
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise InvalidInput(
            f"device_id {request.device_id}: CUDA shared memory is not served (onnxmesh nodes run on CPU); "
            "use system shared memory (SystemSharedMemoryRegister)"
        )

    @rpc
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # nothing is ever registered

    @rpc
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        raise from_status(*REFUSED["TraceSetting"])

    @rpc
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        raise from_status(*REFUSED["LogSettings"])


#: What ServerMetadata lists: Triton's names of the extensions every node serves.
EXTENSIONS = (
    "classification",
    "model_configuration",
    "statistics",
    "system_shared_memory",
    "binary_tensor_data",
)
