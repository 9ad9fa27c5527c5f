"""The jobs service and its workers under mTLS and bearer tokens, as every other node of the mesh.

Both run as real processes (`python -m jobs.service`, `python -m jobs.worker`) on 127.0.0.1 with
the same flags as the nodes (--tls-cert/--tls-key/--tls-ca, --token-file, --metrics-port): a caller
without a certificate is refused at the handshake, one without a token gets UNAUTHENTICATED, one
with both is served. Certificates come from meshctl.certs, made fresh in a temporary directory.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobs.client import JobsClient
from meshctl import certs
from services.common.errors import MeshError
from services.common.grpc.security import ClientSecurity, TlsFiles
from tests.jobs.support import Node


class Secrets:
    """A CA, a node certificate (server and client) and a token file."""

    def __init__(self, directory: Path) -> None:
        self.ca = certs.make_ca(directory)
        self.node = certs.issue(directory, self.ca, "node")
        self.token_file = directory / "tokens"
        self.token = certs.write_tokens(self.token_file)[0]

    @property
    def flags(self) -> list[str]:
        return [
            *("--tls-cert", str(self.node.cert), "--tls-key", str(self.node.key)),
            *("--tls-ca", str(self.ca.cert), "--token-file", str(self.token_file)),
        ]

    def client(self, *, certificate: bool, token: bool) -> ClientSecurity:
        tls = TlsFiles(self.node.cert, self.node.key, self.ca.cert) if certificate else None
        return ClientSecurity(tls, self.token if token else None, ca=None if certificate else self.ca.cert)

    def channel(self, address: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            self.ca.cert.read_bytes(), self.node.key.read_bytes(), self.node.cert.read_bytes()
        )
        return grpc.secure_channel(address, credentials)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    return Secrets(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def jobs_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("store") / "jobs.sqlite")


@pytest.fixture(scope="module")
def service(secrets: Secrets, jobs_db: str) -> Iterator[Node]:
    node = Node("jobs.service", ["--jobs-db", jobs_db, *secrets.flags])
    try:
        yield node.wait_ready()
    finally:
        node.stop()


@pytest.fixture(scope="module")
def worker(secrets: Secrets, jobs_db: str, service: Node) -> Iterator[Node]:
    # Its orchestrator is never reached: the store holds no job.
    args = ["--jobs-db", jobs_db, "--target", "127.0.0.1:1", "--metrics-port", "0", *secrets.flags]
    node = Node("jobs.worker", args)
    try:
        yield node.wait_ready()
    finally:
        node.stop()


def _list(address: str, security: ClientSecurity) -> int:
    async def run() -> int:
        async with JobsClient(address, security=security) as client:
            jobs, _ = await client.list(timeout=10.0)
            return len(jobs)

    return asyncio.run(run())


def test_the_jobs_service_refuses_a_caller_without_a_certificate(secrets: Secrets, service: Node) -> None:
    with pytest.raises(MeshError) as refused:
        _list(service.address, secrets.client(certificate=False, token=True))
    assert refused.value.code == "UNAVAILABLE"


def test_the_jobs_service_refuses_a_caller_without_a_token(secrets: Secrets, service: Node) -> None:
    with pytest.raises(MeshError) as refused:
        _list(service.address, secrets.client(certificate=True, token=False))
    assert refused.value.code == "UNAUTHENTICATED"


def test_the_jobs_service_serves_a_caller_with_a_certificate_and_a_token(
    secrets: Secrets, service: Node
) -> None:
    assert _list(service.address, secrets.client(certificate=True, token=True)) == 0


def _services(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10
    )
    return [s.name for answer in answers for s in answer.list_services_response.service]


def test_a_worker_refuses_a_caller_without_a_certificate(worker: Node) -> None:
    with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_worker_answers_health_to_a_certificate_and_the_rest_only_with_a_token(
    secrets: Secrets, worker: Node
) -> None:
    with secrets.channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            _services(channel, ())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "grpc.health.v1.Health" in _services(channel, (("authorization", f"Bearer {secrets.token}"),))


def test_a_worker_exports_its_metrics(worker: Node) -> None:
    address = next(line.split()[-1] for line in worker.lines if " metrics on " in line)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    assert "onnxmesh_ready 1.0" in exposition
    assert "process_cpu_seconds_total" in exposition
