"""Health follows the model life cycle: NOT_SERVING until loaded, SERVING, NOT_SERVING while draining."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshctl.targets import explain
from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from services.common.repository import ModelRepository
from services.common.settings import ServerSettings
from tests.support import GatedModelDouble, ServerThread


def health_status(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def test_not_serving_until_loaded_then_serving_then_draining() -> None:
    with ThreadPoolExecutor(2) as executor:
        model = GatedModelDouble(executor)
        server = ServerThread(ModelRepository([model]))
        try:
            server.start(load=False)
            loading = server.submit(server.server.load)
            assert health_status(server.address) == "NOT_SERVING"
            model.load_gate.set()
            loading.result(20)
            assert health_status(server.address) == "SERVING"

            async def call() -> np.ndarray:
                async with OipClient(server.address) as client:
                    result = await client.infer("gated", {"x": np.arange(3, dtype=np.float32)}, timeout=20)
                return result.outputs["y"]

            in_flight = server.submit(call)
            assert model.predict_started.wait(20)
            server.call(server.server.begin_drain)  # the first thing SIGTERM does
            assert health_status(server.address) == "NOT_SERVING"
            stopping = server.submit(lambda: server.server.stop(10.0))  # then drain in-flight calls
            model.predict_gate.set()
            np.testing.assert_array_equal(
                in_flight.result(20), [0.0, 2.0, 4.0]
            )  # the in-flight call completes
            stopping.result(20)
        finally:
            model.load_gate.set()
            model.predict_gate.set()
            server.stop()


def test_a_grpc_client_on_the_rest_port_is_told_so_and_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ThreadPoolExecutor(2) as executor:
        model = GatedModelDouble(executor)
        model.load_gate.set()
        settings = ServerSettings(service="test", host="127.0.0.1", port=0, http_port=0, grace=2.0)
        server = ServerThread(ModelRepository([model]), settings)
        try:
            server.start()
            rest = f"127.0.0.1:{server.server.http_port}"

            async def health() -> MeshError:
                async with OipClient(rest) as client:
                    try:
                        await client.health(timeout=5)
                    except MeshError as err:
                        return err
                raise AssertionError("a gRPC call on the REST port succeeded")

            with caplog.at_level(logging.INFO):
                err = asyncio.run(health())
        finally:
            server.stop()
    assert explain(rest, err, connecting=True).startswith(f"{rest} answers HTTP/1.x, not gRPC")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    refused = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert refused and refused[0].getMessage().startswith("refused an HTTP/2 (gRPC?) connection")
    assert all(r.exc_info is None for r in refused)
