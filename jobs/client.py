"""Client of the jobs service (proto/jobs/jobs.proto) for the CLI, tests and other services.

Protobuf stops here: callers get `JobInfo` dataclasses, with the answer decoded to numpy
arrays (services.common.grpc.codec) once a job has succeeded. The channel, its security (mTLS,
a bearer token) and the mapping of errors to the MeshError of their status code are those of
every client of the mesh (services.common.grpc.client.GrpcClient).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.jobs import jobs_pb2 as jpb
from proto.gen.jobs import jobs_pb2_grpc as jpb_grpc
from services.common.errors import MeshError
from services.common.grpc import codec
from services.common.grpc.client import GrpcClient, OipClient
from services.common.grpc.security import ClientSecurity
from services.common.settings import MIB

DEFAULT_TARGET = "127.0.0.1:8041"
TARGET_ENV = "ONNXMESH_JOBS_TARGET"


def status_name(status: int) -> str:
    """`queued`, `running`, ... for a proto Status (the store's names)."""
    return str(jpb.Status.Name(status)).lower()


@dataclass(frozen=True)
class JobInfo:
    id: str
    status: str
    model_name: str
    model_version: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    expires_at: float = 0.0
    attempts: int = 0
    error_code: str = ""
    error_message: str = ""
    #: Decoded outputs once SUCCEEDED.
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, str | int | float | bool] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled", "expired")


def job_info(job: jpb.Job) -> JobInfo:
    outputs: dict[str, np.ndarray] = {}
    parameters: dict[str, str | int | float | bool] = {}
    if job.HasField("response"):
        outputs = codec.decode_response_outputs(job.response)
        parameters = codec.parameter_values(job.response.parameters)
    return JobInfo(
        id=job.id,
        status=status_name(job.status),
        model_name=job.model_name,
        model_version=job.model_version,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        expires_at=job.expires_at,
        attempts=job.attempts,
        error_code=job.error_code,
        error_message=job.error_message,
        outputs=outputs,
        parameters=parameters,
    )


class JobsClient(GrpcClient):
    """Async client for one jobs service target (one long-lived channel)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        max_message_bytes: int = 64 * MIB,
        security: ClientSecurity | None = None,
    ) -> None:
        super().__init__(target, max_message_bytes=max_message_bytes, security=security)

    def _stubs(self, channel: grpc.aio.Channel) -> None:
        self._stub = jpb_grpc.JobsStub(channel)

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        *,
        version: str = "",
        ttl: float = 0.0,
        job_timeout: float = 0.0,
        idempotency_key: str = "",
        timeout: float | None = 10.0,
    ) -> JobInfo:
        """Submit one ModelInferRequest built from arrays; the job is persisted when this returns."""
        request = OipClient.build_request(model, inputs, outputs, version=version)
        return await self.submit_request(
            request, ttl=ttl, job_timeout=job_timeout, idempotency_key=idempotency_key, timeout=timeout
        )

    async def submit_request(
        self,
        request: pb.ModelInferRequest,
        *,
        ttl: float = 0.0,
        job_timeout: float = 0.0,
        idempotency_key: str = "",
        timeout: float | None = 10.0,
    ) -> JobInfo:
        message = jpb.SubmitRequest(
            request=request, ttl_seconds=ttl, timeout_seconds=job_timeout, idempotency_key=idempotency_key
        )
        with self.errors:
            job = await self._stub.Submit(message, timeout=timeout, metadata=self._auth)
        return job_info(job)

    async def get(self, job_id: str, *, timeout: float | None = 10.0) -> JobInfo:
        with self.errors:
            return job_info(
                await self._stub.Get(jpb.JobRequest(id=job_id), timeout=timeout, metadata=self._auth)
            )

    async def cancel(self, job_id: str, *, timeout: float | None = 10.0) -> JobInfo:
        with self.errors:
            return job_info(
                await self._stub.Cancel(jpb.JobRequest(id=job_id), timeout=timeout, metadata=self._auth)
            )

    async def watch(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[JobInfo]:
        """The job now and at every change of status, until it is finished."""
        call = self._stub.Watch(jpb.JobRequest(id=job_id), timeout=timeout, metadata=self._auth)
        try:
            with self.errors:
                async for job in call:
                    yield job_info(job)
        finally:
            call.cancel()

    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobInfo:
        """The job once it is finished (Watch until the last update)."""
        last: JobInfo | None = None
        async for info in self.watch(job_id, timeout=timeout):
            last = info
        if last is None:
            raise MeshError(f"the watch of job {job_id} ended without an update")
        return last

    async def list(
        self, statuses: Iterable[str] = (), model: str = "", limit: int = 20, *, timeout: float | None = 10.0
    ) -> tuple[list[JobInfo], dict[str, int]]:
        request = jpb.ListRequest(
            statuses=[jpb.Status.Value(s.upper()) for s in statuses],  # type: ignore[misc]
            model_name=model,
            limit=limit,
        )
        with self.errors:
            response = await self._stub.List(request, timeout=timeout, metadata=self._auth)
        return [job_info(j) for j in response.jobs], dict(response.counts)
