"""`python -m meshctl.grpcurl`, grpcurl's calls through reflection, against an in-process node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from meshctl import grpcurl
from services.common.repository import ModelRepository
from services.common.settings import ServerSettings
from tests.support import GatedModelDouble, ServerThread


@pytest.fixture(scope="module")
def node() -> Iterator[ServerThread]:
    with ThreadPoolExecutor(2) as executor:
        model = GatedModelDouble(executor)
        model.load_gate.set()
        settings = ServerSettings(service="test", host="127.0.0.1", port=0, http_port=0, grace=1.0)
        server = ServerThread(ModelRepository([model]), settings)
        try:
            server.start()
            yield server
        finally:
            server.stop()


def test_list_and_unary_calls_as_grpcurl_makes_them(
    node: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert grpcurl.main(["-plaintext", node.address, "list"]) == 0
    services = capsys.readouterr().out.split()
    assert "inference.GRPCInferenceService" in services and "grpc.health.v1.Health" in services
    assert grpcurl.main([node.address, "list", "grpc.health.v1.Health"]) == 0
    assert "grpc.health.v1.Health.Check" in capsys.readouterr().out
    assert (
        grpcurl.main(["-plaintext", "-d", '{"service": ""}', node.address, "grpc.health.v1.Health/Check"])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {"status": "SERVING"}
    body = '{"name": "gated"}'
    assert grpcurl.main(["-d", body, node.address, "inference.GRPCInferenceService/ModelMetadata"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["name"] == "x"


def test_failures_are_one_line(node: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    body = '{"name": "nope"}'
    assert grpcurl.main(["-d", body, node.address, "inference.GRPCInferenceService/ModelMetadata"]) == 1
    assert capsys.readouterr().err.startswith(f"grpcurl: {node.address}: NOT_FOUND: ")
    rest = f"127.0.0.1:{node.server.http_port}"
    assert grpcurl.main([rest, "list"]) == 1
    assert capsys.readouterr().err.startswith(f"grpcurl: {rest} answers HTTP/1.x, not gRPC")
    assert grpcurl.main(["-d", "{nope", node.address, "grpc.health.v1.Health/Check"]) == 2
    assert "grpcurl: " in capsys.readouterr().err
