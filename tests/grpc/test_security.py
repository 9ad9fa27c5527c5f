"""mTLS, certificate rotation, bearer tokens and the plaintext health port, on real servers.

Certificates come from meshctl.certs (the system's openssl), made fresh in a temporary directory.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshctl import certs
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.errors import MeshError
from services.common.grpc import security
from services.common.grpc.client import OipClient
from services.common.grpc.security import ClientSecurity, SecurityError, TlsFiles
from services.common.model import Model
from services.common.repository import ModelRepository
from services.common.settings import ServerSettings
from tests.support import ServerThread

SIGNATURE_IN = "x"


class DoublingModelDouble(Model):
    """A test double: y = 2x."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        from services.common.types import ModelSignature, TensorSpec

        super().__init__("double", "1", executor)
        self.signature = ModelSignature(
            "double", ("1",), "test", (TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),)
        )

    def load_sync(self) -> None:
        pass

    def warmup_inputs(self) -> dict[str, np.ndarray]:
        return {}

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2} if inputs else {}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, certs.KeyPair]:
    d = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(d)
    other = certs.make_ca(d, "other")
    return {
        "ca": ca,
        "node": certs.issue(d, ca, "node"),
        "spare": certs.issue(d, ca, "spare"),
        "foreign": certs.issue(d, other, "foreign"),
        "expired": certs.issue(d, ca, "expired", expired=True),
    }


def _files(pair: certs.KeyPair, ca: certs.KeyPair) -> TlsFiles:
    return TlsFiles(pair.cert, pair.key, ca.cert)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def _server(executor: ThreadPoolExecutor, **settings: object) -> ServerThread:
    base = ServerSettings(service="test", host="127.0.0.1", port=0, grace=2.0)
    server = ServerThread(ModelRepository([DoublingModelDouble(executor)]), replace(base, **settings))  # type: ignore[arg-type]
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def mtls_server(
    executor: ThreadPoolExecutor, pki: dict[str, certs.KeyPair], tmp_path: Path
) -> Iterator[tuple[ServerThread, TlsFiles]]:
    # A copy the rotation test may overwrite.
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    shutil.copy(pki["node"].cert, cert)
    shutil.copy(pki["node"].key, key)
    server = _server(executor, tls_cert=cert, tls_key=key, tls_ca=pki["ca"].cert, health_port=0)
    try:
        yield server, TlsFiles(cert, key, pki["ca"].cert)
    finally:
        server.stop()


def _infer(address: str, client_security: ClientSecurity | None, calls: int = 1) -> list[float]:
    async def run() -> list[float]:
        async with OipClient(address, security=client_security) as client:
            out: list[float] = []
            for i in range(calls):
                result = await client.infer("double", {"x": np.array([i], dtype=np.float32)}, timeout=10)
                out.append(float(result.outputs["y"][0]))
            return out

    return asyncio.run(run())


def _refused(address: str, client_security: ClientSecurity | None) -> MeshError:
    with pytest.raises(MeshError) as info:
        _infer(address, client_security)
    return info.value


def test_mtls_answers_a_client_with_a_certificate_of_the_ca(
    mtls_server: tuple[ServerThread, TlsFiles], pki: dict[str, certs.KeyPair]
) -> None:
    server, _ = mtls_server
    assert _infer(server.address, ClientSecurity(_files(pki["spare"], pki["ca"])), calls=3) == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("client", ["plaintext", "no certificate", "another CA", "expired"])
def test_mtls_refuses_strangers(
    mtls_server: tuple[ServerThread, TlsFiles], pki: dict[str, certs.KeyPair], client: str, tmp_path: Path
) -> None:
    server, _ = mtls_server
    if client == "plaintext":
        sec = None
    elif client == "no certificate":
        # The CA to trust the server, but nothing to present.
        trust_only = grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert.read_bytes())
        with grpc.secure_channel(server.address, trust_only) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        return
    elif client == "another CA":
        sec = ClientSecurity(TlsFiles(pki["foreign"].cert, pki["foreign"].key, pki["ca"].cert))
    else:
        sec = ClientSecurity(_files(pki["expired"], pki["ca"]))
    assert _refused(server.address, sec).code == "UNAVAILABLE"


def test_the_client_verifies_the_server(
    executor: ThreadPoolExecutor, pki: dict[str, certs.KeyPair], tmp_path: Path
) -> None:
    expired = _server(
        executor, tls_cert=pki["expired"].cert, tls_key=pki["expired"].key, tls_ca=pki["ca"].cert
    )
    foreign = _server(executor, tls_cert=pki["foreign"].cert, tls_key=pki["foreign"].key)
    good = _server(executor, tls_cert=pki["node"].cert, tls_key=pki["node"].key, tls_ca=pki["ca"].cert)
    mine = _files(pki["spare"], pki["ca"])
    try:
        assert _refused(expired.address, ClientSecurity(mine)).code == "UNAVAILABLE"
        assert _refused(foreign.address, ClientSecurity(mine)).code == "UNAVAILABLE"
        # The name checked is the one asked for: a certificate for other names is refused.
        assert _refused(good.address, ClientSecurity(mine, server_name="db.example")).code == "UNAVAILABLE"
        assert _infer(good.address, ClientSecurity(mine, server_name="model-a")) == [0.0]
        # The CA alone: a server that wants no client certificate answers it.
        lenient = _server(
            executor,
            tls_cert=pki["node"].cert,
            tls_key=pki["node"].key,
            tls_ca=pki["ca"].cert,
            tls_require_client_cert=False,
        )
        try:
            assert _infer(lenient.address, ClientSecurity(ca=pki["ca"].cert)) == [0.0]
            assert _refused(good.address, ClientSecurity(ca=pki["ca"].cert)).code == "UNAVAILABLE"
        finally:
            lenient.stop()
    finally:
        for server in (expired, foreign, good):
            server.stop()


def _served_serial(port: int, ca: Path, pair: certs.KeyPair) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(pair.cert), str(pair.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return int(tls.getpeercert()["serialNumber"], 16)  # type: ignore[index,arg-type]


def _serial(cert: Path) -> int:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-serial", "-in", str(cert)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().partition("=")[2], 16)


def _replace(src: certs.KeyPair, cert: Path, key: Path) -> None:
    """Swap in new files the way a Secret update does: whole files, renamed into place."""
    for source, target in ((src.key, key), (src.cert, cert)):
        shutil.copy(source, target.with_suffix(".new"))
        os.replace(target.with_suffix(".new"), target)


def test_certificates_rotated_under_load_fail_no_request(
    mtls_server: tuple[ServerThread, TlsFiles], pki: dict[str, certs.KeyPair], tmp_path: Path
) -> None:
    server, files = mtls_server
    ca = pki["ca"]
    d = tmp_path / "fresh"
    fresh_server = certs.issue(d, ca, "server2")
    # The client's own files rotate too.
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    shutil.copy(pki["spare"].cert, client_cert)
    shutil.copy(pki["spare"].key, client_key)
    client_files = TlsFiles(client_cert, client_key, ca.cert)
    fresh_client = certs.issue(d, ca, "client2")
    old_serial = _served_serial(server.server.port, ca.cert, pki["spare"])
    new_serial = _serial(fresh_server.cert)

    async def load() -> tuple[int, list[BaseException]]:
        stop = asyncio.Event()
        failures: list[BaseException] = []
        done = 0
        goal = 50
        reached = asyncio.Event()

        def count() -> None:
            nonlocal done
            done += 1
            if done >= goal:
                reached.set()

        async def worker(client: OipClient) -> None:
            while not stop.is_set():
                try:
                    await client.infer("double", {"x": np.ones(2, dtype=np.float32)}, timeout=10)
                    count()
                except MeshError as err:
                    failures.append(err)

        async def reconnecting() -> None:
            # New channels (new handshakes) all the time, so the rotation is on the path.
            while not stop.is_set():
                async with OipClient(server.address, security=ClientSecurity(client_files)) as fresh:
                    try:
                        await fresh.infer("double", {"x": np.ones(1, dtype=np.float32)}, timeout=10)
                        count()
                    except MeshError as err:
                        failures.append(err)

        long_lived = OipClient(server.address, security=ClientSecurity(client_files))
        tasks = [asyncio.create_task(worker(long_lived)) for _ in range(4)]
        tasks += [asyncio.create_task(reconnecting()) for _ in range(2)]
        try:
            await asyncio.wait_for(reached.wait(), 60)
            _replace(fresh_server, files.cert, files.key)
            _replace(fresh_client, client_cert, client_key)
            # Wait on the condition: a new handshake sees the new certificate.
            for _ in range(1000):
                serial = await asyncio.to_thread(_served_serial, server.server.port, ca.cert, pki["spare"])
                if serial == new_serial:
                    break
                await asyncio.sleep(0.01)  # the poll interval: until the new certificate is served
            assert serial == new_serial != old_serial
            # Then as many calls again on the new certificates (a failure shows below).
            goal = done + 100
            reached.clear()
            await asyncio.wait_for(reached.wait(), 60)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await long_lived.close()
        return done, failures

    done, failures = asyncio.run(load())
    assert failures == [] and done >= 150


def _token_server(executor: ThreadPoolExecutor, tmp_path: Path) -> tuple[ServerThread, list[str]]:
    token_file = tmp_path / "tokens"
    tokens = certs.write_tokens(token_file, 2)
    return _server(executor, token_file=token_file), tokens


def test_tokens_missing_wrong_and_right(
    executor: ThreadPoolExecutor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    compared: list[int] = []
    real = hmac.compare_digest  # what the token check calls

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    caplog.set_level(logging.DEBUG)
    server, tokens = _token_server(executor, tmp_path)
    # Differs from the token in its first character, whatever the token starts with.
    wrong = ("x" if tokens[0][0] != "x" else "y") + tokens[0][1:]
    try:
        for token in (None, wrong, "", tokens[0][:-1]):
            err = _refused(server.address, ClientSecurity(token=token))
            assert err.code == "UNAUTHENTICATED"
            assert err.message == security.UNAUTHENTICATED_MESSAGE
        # A scheme other than Bearer is refused too.
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                    pb.ServerLiveRequest(), metadata=(("authorization", f"Basic {tokens[0]}"),), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health needs no token.
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        compared.clear()
        assert _infer(server.address, ClientSecurity(token=tokens[1]), calls=2) == [0.0, 2.0]
        assert _infer(server.address, ClientSecurity(token=tokens[0])) == [0.0]
        # Every accepted token is compared, in constant time, whichever matches.
        assert compared and len(compared) % len(tokens) == 0
    finally:
        server.stop()
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "unauthenticated call refused" in text
    for token in (*tokens, wrong):
        assert token not in text
    assert "Traceback" not in text


def test_the_health_port_serves_health_only(mtls_server: tuple[ServerThread, TlsFiles]) -> None:
    server, _ = mtls_server
    assert server.server.health_port not in (None, server.server.port)
    with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                pb.ModelInferRequest(model_name="double"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_unusable_settings_are_refused_with_the_path_only(
    executor: ThreadPoolExecutor, pki: dict[str, certs.KeyPair], tmp_path: Path
) -> None:
    with pytest.raises(SecurityError, match="go together"):
        TlsFiles.of(pki["node"].cert, None, None)
    with pytest.raises(SecurityError, match="needs --tls-cert"):
        TlsFiles.of(None, None, pki["ca"].cert)
    missing = tmp_path / "absent-key.pem"
    with pytest.raises(SecurityError) as info:
        _server(executor, tls_cert=pki["node"].cert, tls_key=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(SecurityError, match="plaintext"):
        _server(executor, tls_cert=pki["node"].cert, tls_key=pki["node"].key, http_port=0)
    # A key passed where the certificate goes: the message names the file, never its contents.
    with pytest.raises(SecurityError, match="holds no PEM certificate") as swapped:
        _server(executor, tls_cert=pki["node"].key, tls_key=pki["node"].key)
    key_text = pki["node"].key.read_text()
    assert str(pki["node"].key) in str(swapped.value)
    assert "PRIVATE" in key_text and key_text.splitlines()[1] not in repr(swapped.value)
    # And a certificate where the key goes.
    with pytest.raises(SecurityError, match="holds no PEM private key"):
        _server(executor, tls_cert=pki["node"].cert, tls_key=pki["node"].cert)
