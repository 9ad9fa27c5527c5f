"""The one OIP client of onnxmesh: the orchestrator's stages, the CLI, benchmarks and tests.

One long-lived `grpc.aio` channel per target. Targets may be `host:port`, `dns:///name:port`
(every address the name resolves to is used, round robin: a Kubernetes headless Service) or
`ipv4:a:p,b:q` (a static list of local replicas). Errors come back as the MeshError of the
status code, so callers never see grpc exceptions.

`GrpcClient` is what every client of the mesh shares, whatever its service (OIP here, the jobs
API in jobs/client.py): the channel options, TLS and a bearer token (a new channel when the
files rotate) and the one mapping of a failed call to a MeshError (`with self.errors:`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Self

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common import tensors
from services.common.dataplane import IndexEntry
from services.common.errors import DeadlineExceeded, MeshError, from_status
from services.common.grpc import codec
from services.common.grpc.security import ClientSecurity, environ_security
from services.common.observability.logs import REQUEST_ID_HEADER
from services.common.settings import MIB
from services.common.types import InferRequest, InferResult, ModelSignature, TensorSpec


def service_config(health_checked: bool) -> str:
    config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_checked:
        # Watch grpc.health.v1 on every replica: one that reports NOT_SERVING (loading, or
        # draining after SIGTERM) leaves the round robin at once, before its port closes.
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def channel_options(
    max_message_bytes: int = 64 * MIB, *, health_checked: bool = False
) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", service_config(health_checked)),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Transparent retries need the whole request buffered; the 256 KiB default would
        # silently disable them for large tensors.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class RpcErrors:
    """The one mapping of a failed call to a MeshError: `with client.errors: await stub.X(...)`.

    A class (not a generator-based context manager) so that a call costs no allocation.
    """

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = target

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, err: BaseException | None, trace: object) -> None:
        if isinstance(err, grpc.aio.AioRpcError):
            raise error_of(err, self.target) from err


class GrpcClient:
    """One long-lived channel to a target of the mesh (possibly many replicas behind it)."""

    def __init__(
        self,
        target: str,
        *,
        max_message_bytes: int = 64 * MIB,
        health_checked: bool = False,
        security: ClientSecurity | None = None,
    ) -> None:
        """`health_checked`: only send calls to replicas whose health reports SERVING (for the
        orchestrator's long-lived channels; tools that check health themselves leave it off).
        `security`: TLS files and a bearer token; by default those of ONNXMESH_TLS_CERT/KEY/CA,
        ONNXMESH_TLS_SERVER_NAME and ONNXMESH_TOKEN_FILE (unset: plaintext, no token), so every
        tool reaches a secured mesh the same way. When the files change, the next call opens a
        new channel and the old one finishes its calls."""
        self.target = target
        self.errors = RpcErrors(target)
        self._security = (security or environ_security(os.environ)).copy()
        self._options = channel_options(max_message_bytes, health_checked=health_checked)
        self._auth = self._security.metadata
        self._retired: set[asyncio.Task[None]] = set()
        self._open()

    def _open(self) -> None:
        credentials = self._security.channel_credentials()
        #: Files that may rotate (`_refresh`); plaintext has none, so a call checks nothing.
        self._tls = credentials is not None
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=self._options)
        else:
            options = self._options + self._security.options()
            self.channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        self._stubs(self.channel)

    def _stubs(self, channel: grpc.aio.Channel) -> None:
        """Make this client's stubs on a new channel."""

    def _refresh(self) -> None:
        """New credentials when the TLS files changed (rotation); the old channel drains."""
        if self._security.changed():
            old = self.channel
            self._open()
            task = asyncio.get_running_loop().create_task(old.close(grace=30.0))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        await self.channel.close()
        for task in list(self._retired):
            task.cancel()

    @property
    def reachable(self) -> bool:
        """False while the channel is in TRANSIENT_FAILURE: refused, or (health-checked) every
        replica behind it reports NOT_SERVING. Asks an idle channel to connect."""
        return self.channel.get_state(try_to_connect=True) is not grpc.ChannelConnectivity.TRANSIENT_FAILURE

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class OipClient(GrpcClient):
    """Async client for one OIP endpoint (possibly many replicas behind one target)."""

    #: Every call carries `request.deadline` as its gRPC deadline: it answers, or fails with
    #: DEADLINE_EXCEEDED, by then (the orchestrator arms no timer of its own around it).
    keeps_deadline = True

    def _stubs(self, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    @staticmethod
    def build_request(
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        *,
        version: str = "",
        request_id: str = "",
    ) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, array in inputs.items():
            datatype, shape, raw = tensors.encode_raw(array)
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
        for name in outputs:
            request.outputs.add(name=name)
        return request

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        *,
        version: str = "",
        timeout: float | None = None,
        request_id: str = "",
    ) -> InferResult:
        """One ModelInfer call, for tools and tests; `timeout` in seconds (None = no deadline)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self.call(InferRequest(model, inputs, tuple(outputs), version, request_id, deadline))

    async def call(self, request: InferRequest) -> InferResult:
        """One request value, one RPC: the Stage protocol, the orchestrator's hot path."""
        message = self.build_request(
            request.model,
            request.inputs,
            request.outputs,
            version=request.version,
            request_id=request.request_id,
        )
        timeout = None if request.deadline is None else request.deadline - time.monotonic()
        return self._result(await self.model_infer(message, timeout=timeout))

    async def infer_request(
        self, message: pb.ModelInferRequest, *, timeout: float | None = None
    ) -> InferResult:
        """One RPC of a ready-made message (the load generator prebuilds them)."""
        return self._result(await self.model_infer(message, timeout=timeout))

    @staticmethod
    def _result(response: pb.ModelInferResponse) -> InferResult:
        return InferResult(
            outputs=codec.decode_response_outputs(response),
            model_name=response.model_name,
            model_version=response.model_version,
            # Most responses carry none: no call for them (the orchestrator's hot path).
            parameters=codec.parameter_values(response.parameters) if response.parameters else {},
        )

    async def model_infer(
        self, message: pb.ModelInferRequest, *, timeout: float | None = None, request_id: str = ""
    ) -> pb.ModelInferResponse:
        """One ModelInfer RPC, its response undecoded (the jobs worker stores it as it came);
        `request_id` for the logs, by default the message's id."""
        if self._tls:
            self._refresh()
        request_id = request_id or message.id
        metadata = ((REQUEST_ID_HEADER, request_id), *self._auth) if request_id else self._auth
        # `self.errors` written out: the orchestrator's hot path, two calls fewer per call.
        try:
            response: pb.ModelInferResponse = await self._stub.ModelInfer(
                message, timeout=timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as err:
            raise error_of(err, self.target) from err
        return response

    async def metadata(self, model: str, version: str = "", *, timeout: float | None = 5.0) -> ModelSignature:
        with self.errors:
            response = await self._stub.ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version), timeout=timeout, metadata=self._auth
            )
        return ModelSignature(
            name=response.name,
            versions=tuple(response.versions),
            platform=response.platform,
            inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in response.inputs),
            outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in response.outputs),
        )

    async def is_ready(self, model: str, version: str = "") -> bool:
        """ModelReady, with False for a service that does not answer within 2 s (the Stage protocol)."""
        try:
            return await self.model_ready(model, version, timeout=2.0)
        except MeshError:
            return False

    async def model_ready(self, model: str, version: str = "", *, timeout: float | None = 5.0) -> bool:
        with self.errors:
            response = await self._stub.ModelReady(
                pb.ModelReadyRequest(name=model, version=version), timeout=timeout, metadata=self._auth
            )
        return bool(response.ready)

    async def server_metadata(self, *, timeout: float | None = 5.0) -> tuple[str, str]:
        with self.errors:
            response = await self._stub.ServerMetadata(
                pb.ServerMetadataRequest(), timeout=timeout, metadata=self._auth
            )
        return response.name, response.version

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The grpc.health.v1 status name (SERVING, NOT_SERVING, ...)."""
        with self.errors:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def repository_index(self, *, timeout: float | None = 5.0) -> list[IndexEntry]:
        """Every model version the node has, ready or not, with its state and reason."""
        with self.errors:
            response = await self._stub.RepositoryIndex(
                pb.RepositoryIndexRequest(), timeout=timeout, metadata=self._auth
            )
        return [IndexEntry(m.name, m.version, m.state, m.reason) for m in response.models]


def error_of(err: grpc.aio.AioRpcError, target: str) -> MeshError:
    """The MeshError for a failed call to `target` (any of the mesh's gRPC services), keeping the
    status code and the server's message; a bare deadline or an unreachable peer names the target."""
    code, details = err.code().name, err.details() or ""
    if code == "DEADLINE_EXCEEDED" and not details.strip():
        return DeadlineExceeded(f"{target}: deadline exceeded")
    if code == "UNAVAILABLE":
        return from_status(code, f"{target} unavailable: {details}")
    return from_status(code, details)
