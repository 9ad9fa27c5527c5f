"""The whole mesh on mTLS with a token (what `make run ARGS=--tls` starts), as real processes."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo import digits
from meshctl import certs
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from services.common.grpc.security import UNAUTHENTICATED_MESSAGE, ClientSecurity, TlsFiles

GRAPHS = ("digits-serial", "digits-parallel", "digits-cascade")


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    certs.make_local(directory)
    return directory


@pytest.fixture(scope="module")
def logs() -> io.StringIO:
    return io.StringIO()


@pytest.fixture(scope="module")
def mesh(tls_dir: Path, logs: io.StringIO) -> Iterator[LocalMesh]:
    with LocalMesh(ports=EPHEMERAL_PORTS, tls=tls_dir, echo=logs) as running:
        yield running


def _call(address: str, security: ClientSecurity, graph: str = "digits-parallel") -> dict[str, np.ndarray]:
    holdout = digits.load_holdout()

    async def run() -> dict[str, np.ndarray]:
        async with OipClient(address, security=security) as client:
            result = await client.infer(graph, {"image": holdout.images[:4]}, timeout=20)
        return result.outputs

    return asyncio.run(run())


def test_every_graph_answers_over_mtls_with_the_token(mesh: LocalMesh) -> None:
    holdout = digits.load_holdout()
    for graph in GRAPHS:
        outputs = _call(mesh.address("orchestrator"), mesh.client_security, graph)
        assert outputs["label"].shape[0] == 4
        assert int((outputs["label"] == holdout.labels[:4]).sum()) >= 3  # the demo models are ~95% accurate


def test_strangers_are_refused(mesh: LocalMesh, tls_dir: Path, tmp_path: Path) -> None:
    orchestrator = mesh.address("orchestrator")
    good = mesh.client_security
    with pytest.raises(MeshError) as no_token:
        _call(orchestrator, ClientSecurity(good.tls))
    assert no_token.value.code == "UNAUTHENTICATED" and no_token.value.message == UNAUTHENTICATED_MESSAGE
    with pytest.raises(MeshError) as plaintext:
        _call(orchestrator, ClientSecurity(token=good.token))
    assert plaintext.value.code == "UNAVAILABLE"
    # A certificate of another CA does not reach a model directly, with or without a token.
    other = certs.make_ca(tmp_path, "other")
    foreign = certs.issue(tmp_path, other, "foreign")
    with pytest.raises(MeshError) as stranger:
        _call(
            mesh.address("model_a"), ClientSecurity(TlsFiles(foreign.cert, foreign.key, tls_dir / "ca.pem"))
        )
    assert stranger.value.code == "UNAVAILABLE"


def test_health_is_plaintext_on_its_own_port(mesh: LocalMesh) -> None:
    for proc in mesh.processes():
        assert proc.health_port is not None and proc.http_port is None
        with grpc.insecure_channel(f"127.0.0.1:{proc.health_port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_no_log_line_holds_a_token_a_key_or_a_stack_trace(
    mesh: LocalMesh, tls_dir: Path, logs: io.StringIO
) -> None:
    with pytest.raises(MeshError):  # a refusal, so the refusal's log line is there too
        _call(mesh.address("orchestrator"), ClientSecurity(mesh.client_security.tls, token="not-the-token"))
    text = logs.getvalue()
    assert "unauthenticated call refused" in text
    token = (tls_dir / "tokens").read_text().strip()
    key_body = (tls_dir / "node-key.pem").read_text().splitlines()[1]
    assert token not in text and key_body not in text and "Traceback" not in text
