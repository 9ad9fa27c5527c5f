"""KServe v2 REST (transport edge): the same data plane as gRPC, over HTTP/JSON, on its own port.

    GET  /v2/health/live | /v2/health/ready            200, or 400 when not (the protocol's rule)
    GET  /v2                                           server metadata (name, version, extensions)
    GET  /v2/models/{name}[/versions/{v}]              model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready        200, or 400 when not ready
    POST /v2/models/{name}[/versions/{v}]/infer        JSON tensors, or the binary-data extension
  Triton's extensions, as its HTTP API spells them:
    GET  /v2/models/{name}[/versions/{v}]/config       ModelConfig as JSON
    GET  /v2/models[/{name}[/versions/{v}]]/stats      ModelStatistics as JSON
    POST /v2/repository/index                          RepositoryIndex
    GET  /v2/systemsharedmemory[/region/{r}]/status, POST .../region/{r}/register | unregister

Errors answer `{"error": message}` with the HTTP status of the error's code (INVALID_ARGUMENT
400, NOT_FOUND 404, UNAVAILABLE 503, ...): the same message gRPC sends. Inference runs through
`DataPlane.infer`, so REST requests are validated, counted in the metrics and statistics,
and refused once the node refuses calls (after its drain delay) exactly as gRPC ones are. The
server is aiohttp, on the node's event loop beside grpc.aio.

Binary data (Triton's extension): the body is the JSON header followed by raw tensor bytes;
the header `Inference-Header-Content-Length` gives the JSON's length; an input's bytes are
announced by its `binary_data_size` parameter, in input order. Outputs come back binary when
asked (`binary_data` on the output, or `binary_data_output` on the request).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format

from services.common import tensors
from services.common.dataplane import DataPlane
from services.common.errors import INTERNAL_MESSAGE, InvalidInput, MeshError
from services.common.grpc import triton
from services.common.observability.logs import REQUEST_ID_HEADER, request_id_var
from services.common.triton import params
from services.common.types import DATATYPE_TO_NUMPY, InferRequest, InferResult

log = logging.getLogger(__name__)


class ClientMistakes(logging.Filter):
    """aiohttp logs a request it cannot parse as an ERROR with a traceback; that is the client's
    mistake (most often a gRPC client on the REST port: its HTTP/2 preface starts `PRI *`), so it
    becomes one INFO line saying so, throttled like every failed call (`logs.Throttle`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            http2 = "PRI" in str(error)
            record.msg = (
                "refused an HTTP/2 (gRPC?) connection: this port serves KServe v2 REST over HTTP/1.1"
                if http2
                else "refused a request that is not valid HTTP/1.1"
            )
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.code = "INVALID_ARGUMENT"
        return True


_client_mistakes = ClientMistakes()

HEADER_LENGTH = "Inference-Header-Content-Length"
#: HTTP status of each error code.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: BaseException) -> web.Response:
    """The HTTP answer to a failed request; unexpected errors are logged and never leaked."""
    if isinstance(exc, MeshError) and exc.public:
        status = HTTP_STATUS.get(exc.code, 500)
        level = logging.INFO if status < 500 else logging.WARNING
        log.log(level, "REST request failed", extra={"code": exc.code, "error": exc.message})
        return web.json_response({"error": exc.message}, status=status)
    log.error("unexpected error in a REST request", exc_info=exc)
    return web.json_response({"error": INTERNAL_MESSAGE}, status=500)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request_id_var.set(request.headers.get(REQUEST_ID_HEADER, ""))
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return web.json_response(
                {"error": f"no such endpoint: {request.method} {request.path}"}, status=404
            )
        if exc.status == 405:
            return web.json_response(
                {"error": f"{request.method} is not allowed on {request.path}"}, status=405
            )
        if exc.status == 413:
            return web.json_response({"error": f"request body too large: {exc.text}"}, status=413)
        raise
    except Exception as exc:
        return error_response(exc)
    finally:
        request_id_var.reset(token)


def _ok(flag: bool) -> web.Response:
    return web.Response(status=200 if flag else 400)


def _message(message: Any) -> web.Response:
    return web.json_response(json_format.MessageToDict(message, preserving_proto_field_name=True))


class RestServer:
    """The REST edge of one node: `start(host, port)` then `stop()`."""

    def __init__(
        self, dataplane: DataPlane, service: str, *, max_body_bytes: int, grace: float = 10.0
    ) -> None:
        """`grace`: seconds in-flight requests may take to finish at `stop()`."""
        self.dataplane = dataplane
        self.service = service
        self.grace = grace
        self.app = web.Application(middlewares=[_errors], client_max_size=max_body_bytes)
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        get, post = web.get, web.post
        self.app.add_routes(
            [
                get("/v2/health/live", self.live),
                get("/v2/health/ready", self.ready),
                get("/v2", self.server_metadata),
                get("/v2/models/stats", self.stats),
                post("/v2/repository/index", self.index),
                get("/v2/systemsharedmemory/status", self.shm_status),
                get("/v2/systemsharedmemory/region/{region}/status", self.shm_status),
                post("/v2/systemsharedmemory/region/{region}/register", self.shm_register),
                post("/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister),
                post("/v2/systemsharedmemory/unregister", self.shm_unregister),
            ]
        )
        for base in (model, version):
            self.app.add_routes(
                [
                    get(base, self.model_metadata),
                    get(base + "/ready", self.model_ready),
                    get(base + "/config", self.config),
                    get(base + "/stats", self.stats),
                    post(base + "/infer", self.infer),
                ]
            )
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        server_log = logging.getLogger("aiohttp.server")
        if _client_mistakes not in server_log.filters:
            server_log.addFilter(_client_mistakes)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=self.grace)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                f"{self.service}: cannot serve REST on {host}:{port}: {exc.strerror}"
                + (" (another process has it; --http-port 0 picks a free one)" if port else ""),
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- health and metadata -------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return _ok(self.dataplane.live())

    async def ready(self, request: web.Request) -> web.Response:
        return _ok(self.dataplane.ready())

    async def server_metadata(self, request: web.Request) -> web.Response:
        server = self.dataplane.server_metadata()
        return web.json_response(
            {"name": server.name, "version": server.version, "extensions": list(server.extensions)}
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        meta = self.dataplane.model_metadata(name, version)
        sig = meta.signature

        def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

        return web.json_response(
            {
                "name": sig.name,
                "versions": list(meta.versions),
                "platform": sig.platform,
                "inputs": tensors(sig.inputs),
                "outputs": tensors(sig.outputs),
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        return _ok(self.dataplane.model_ready(*_model(request)))

    async def config(self, request: web.Request) -> web.Response:
        return _message(triton.model_config(self.dataplane.model_description(*_model(request))))

    async def stats(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("name", ""), request.match_info.get("version", "")
        return _message(triton.model_statistics(self.dataplane.model_statistics(name, version)))

    async def index(self, request: web.Request) -> web.Response:
        body = await _json(request) if request.can_read_body else {}
        ready = bool(body.get("ready", False))
        entries = self.dataplane.repository_index(ready)
        return web.json_response(
            [{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in entries]
        )

    # -- system shared memory --------------------------------------------------------------

    async def shm_status(self, request: web.Request) -> web.Response:
        regions = self.dataplane.shared_memory.status(request.match_info.get("region", ""))
        return web.json_response(
            [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions]
        )

    async def shm_register(self, request: web.Request) -> web.Response:
        body = await _json(request)
        try:
            key, offset, size = str(body["key"]), int(body.get("offset", 0)), int(body["byte_size"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInput('register takes {"key": str, "offset": int, "byte_size": int}') from None
        self.dataplane.shared_memory.register(request.match_info["region"], key, offset, size)
        return web.json_response({})

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self.dataplane.shared_memory.unregister(request.match_info.get("region", ""))
        return web.json_response({})

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await request.read()
        try:
            infer, options, binary_output = self._decode(request, body, name, version)
        except Exception as exc:
            raise self.dataplane.refused(name, version, exc) from None
        answer: web.Response = await self.dataplane.infer(
            infer, lambda result: self._encode(result, options, binary_output, infer.request_id)
        )
        return answer

    def _decode(
        self, request: web.Request, body: bytes, name: str, version: str
    ) -> tuple[InferRequest, dict[str, params.OutputOptions], bool]:
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise InvalidInput(
                    f"{HEADER_LENGTH} {header_length!r} must be the JSON header's length, at most {len(body)} bytes"
                )
            header, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
        else:
            header, binary = body, memoryview(b"")
        document = _parse_json(header)
        given = _mapping(document.get("parameters", {}), "request parameters")
        ignored: list[str] = []
        deadline = params.request_deadline(given, None, ignored, rest=True)
        binary_output = bool(given.get(params.BINARY_OUTPUT, False))
        tensors = document.get("inputs")
        if not isinstance(tensors, list) or not tensors:
            raise InvalidInput("the request needs 'inputs': a list of {name, shape, datatype, data}")
        inputs: dict[str, np.ndarray] = {}
        offset = 0
        for tensor in tensors:
            array, used = self._input(tensor, binary[offset:], ignored)
            offset += used
            if array[0] in inputs:
                raise InvalidInput(f"input '{array[0]}' appears more than once")
            inputs[array[0]] = array[1]
        if offset != len(binary):
            raise InvalidInput(
                f"the body holds {len(binary) - offset} bytes after the JSON header that no input's "
                "binary_data_size accounts for"
            )
        outputs = document.get("outputs", [])
        if not isinstance(outputs, list):
            raise InvalidInput("'outputs' must be a list of {name, parameters}")
        options: dict[str, params.OutputOptions] = {}
        for output in outputs:
            out = _mapping(output, "an output")
            out_name = out.get("name")
            if not isinstance(out_name, str):
                raise InvalidInput("every requested output needs a 'name'")
            out_params = _mapping(out.get("parameters", {}), f"output '{out_name}' parameters")
            options[out_name] = params.output_options(out_name, out_params, ignored, rest=True)
        if ignored:
            self.dataplane.metrics.ignored_parameters(ignored)
        request_id = str(document.get("id", "")) or request.headers.get(REQUEST_ID_HEADER, "")
        infer = InferRequest(
            model=name,
            inputs=inputs,
            outputs=tuple(options),
            version=version,
            request_id=request_id,
            deadline=deadline,
        )
        return infer, options, binary_output

    def _input(
        self, tensor: Any, binary: memoryview, ignored: list[str]
    ) -> tuple[tuple[str, np.ndarray], int]:
        spec = _mapping(tensor, "an input")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput("every input needs a 'name' and a 'datatype'")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(f"input '{name}': 'shape' must be a list of integers")
        given = _mapping(spec.get("parameters", {}), f"input '{name}' parameters")
        region = params.input_region(name, given, ignored, rest=True)
        if region is not None:
            data = self.dataplane.shared_memory.read(region.name, region.offset, region.byte_size, name)
            return (name, tensors.decode_raw(name, datatype, shape, data)), 0
        if params.BINARY_SIZE in given:
            size = given[params.BINARY_SIZE]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size > len(binary):
                raise InvalidInput(
                    f"input '{name}': binary_data_size {size!r} but {len(binary)} bytes of binary data remain"
                )
            return (name, tensors.decode_raw(name, datatype, shape, bytes(binary[:size]))), size
        if "data" not in spec:
            raise InvalidInput(
                f"input '{name}' has no 'data' (nor binary_data_size, nor a shared-memory region)"
            )
        return (name, json_tensor(name, datatype, shape, spec["data"])), 0

    def _encode(
        self,
        result: InferResult,
        options: Mapping[str, params.OutputOptions],
        binary_output: bool,
        request_id: str,
    ) -> web.Response:
        outputs: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        for name, array in result.outputs.items():
            option = options.get(name, params.OutputOptions())
            if option.class_count:
                array = params.classify(name, array, option.class_count)
            datatype, shape, raw = tensors.encode_raw(array)
            entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
            if option.region is not None:
                region = option.region
                self.dataplane.shared_memory.write(region.name, region.offset, region.byte_size, raw, name)
                entry["parameters"] = {params.SHM_REGION: region.name, params.SHM_SIZE: len(raw)}
            elif option.binary if option.binary is not None else binary_output:
                entry["parameters"] = {params.BINARY_SIZE: len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = _json_data(array)
            outputs.append(entry)
        document: dict[str, Any] = {
            "model_name": result.model_name,
            "model_version": result.model_version,
            "outputs": outputs,
        }
        if request_id:
            document["id"] = request_id
        if result.parameters:
            document["parameters"] = dict(result.parameters)
        header = json.dumps(document, separators=(",", ":")).encode()
        if not chunks:
            return web.Response(body=header, content_type="application/json")
        return web.Response(
            body=b"".join([header, *chunks]),
            headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
        )


def json_tensor(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """A numpy array from a JSON tensor's `data` (flat or nested, row-major), checked like raw bytes:
    the element count against the shape, and every value against the datatype."""
    dtype = tensors.check_header(name, datatype, shape)
    count = math.prod(shape)
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a list of values")
    if datatype == "BYTES":
        flat = _flatten(name, data)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"input '{name}': BYTES data must be strings")
        values = np.empty(len(flat), dtype=np.object_)
        values[:] = [v.encode() for v in flat]
    else:
        probe = np.asarray(data)
        if probe.dtype == np.object_ or probe.dtype.kind not in "biuf":
            raise InvalidInput(f"input '{name}': 'data' must be numbers (a flat or evenly nested list)")
        if probe.dtype.kind == "f" and dtype.kind in "biu":
            raise InvalidInput(f"input '{name}': {datatype} data must be integers, got fractional numbers")
        if probe.dtype.kind in "iu" and dtype.kind == "b":
            raise InvalidInput(f"input '{name}': BOOL data must be true or false")
        try:
            values = np.array(data, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(-1)
        except (OverflowError, ValueError) as exc:
            raise InvalidInput(f"input '{name}': a value does not fit {datatype}: {exc}") from None
    if values.size != count:
        raise InvalidInput(
            f"input '{name}': 'data' holds {values.size} values but shape {list(shape)} needs {count}"
        )
    return values.reshape(shape)


def _flatten(name: str, data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_data(array: np.ndarray) -> list[Any]:
    if array.dtype == np.object_:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    return _mapping(document, "the request body")


async def _json(request: web.Request) -> dict[str, Any]:
    body = await request.read()
    return _parse_json(body) if body.strip() else {}


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value
