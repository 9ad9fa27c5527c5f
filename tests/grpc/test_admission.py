"""Admission at the front door over real gRPC (in-process server on 127.0.0.1:0): a call over the
limit, or while the event loop lags, is refused before it is decoded; the rest are served; the
acceptors share one port and a second node cannot join it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.grpc.admission import LoopLag
from services.common.grpc.client import OipClient
from services.common.model_node import build_repository
from services.common.repository import ModelRepository
from services.common.server import MeshServer
from services.common.settings import ServerSettings
from tests.support import ROOT, ServerThread, stub


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ThreadPoolExecutor(2) as executor:
        settings = ServerSettings(
            service="model_b", model_dir=ROOT / "services/model_b/models", max_inflight="4"
        )
        running = ServerThread(build_repository(settings, executor), settings)
        try:
            running.start()
            yield running
        finally:
            running.stop()


def _request() -> pb.ModelInferRequest:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    return OipClient.build_request("digits-logreg", {"features": x})


def _refusals(server: ServerThread, reason: str) -> float:
    registry = server.server.metrics.registry
    return registry.get_sample_value("onnxmesh_admission_refusals_total", {"reason": reason}) or 0.0


def test_calls_over_the_limit_are_refused_at_the_door_and_the_rest_served(server: ServerThread) -> None:
    admission = server.server.admission
    assert admission is not None
    limiter = admission.limiter
    with stub(f"127.0.0.1:{server.server.port}") as api:
        api.ModelInfer(_request(), timeout=10)  # served
        limiter.in_flight += limiter.limit  # the node is full (stands in for calls running)
        try:
            with pytest.raises(grpc.RpcError) as info:
                # Not even a valid body: a refused call is never decoded.
                api.ModelInfer.with_call(_request(), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "model_b is overloaded" in info.value.details()
            assert "retry later or on another replica" in info.value.details()
        finally:
            limiter.in_flight -= limiter.limit
        api.ModelInfer(_request(), timeout=10)  # served again
    assert _refusals(server, "limit") == 1 and admission.refused == {"limit": 1, "lag": 0}


def test_a_lagging_loop_refuses_above_the_floor_only(server: ServerThread) -> None:
    admission = server.server.admission
    assert admission is not None
    admission.max_lag = 0.0  # every lag is too much: the decision rests on the floor alone
    admission.lag.seconds = 1.0
    admission.lag.interval = 3600.0  # the watcher does not overwrite the lag set above
    assert admission.reason() is None  # nothing in flight: below the floor
    admission.limiter.in_flight += admission.floor
    try:
        assert admission.reason() in ("lag", "limit")
    finally:
        admission.limiter.in_flight -= admission.floor


def test_the_loop_lag_is_how_late_a_timer_fires() -> None:
    async def main() -> float:
        lag = LoopLag(interval=0.001)
        lag.start()
        seen = 0.0
        for _ in range(5):
            time.sleep(0.05)  # noqa: ASYNC251 - the point: the loop blocked, the watcher's timer fires late
            for _ in range(3):  # a few loop turns: the watcher runs
                await asyncio.sleep(0)
                seen = max(seen, lag.seconds)
        await lag.stop()
        return seen

    assert asyncio.run(main()) >= 0.02


def test_acceptors_share_the_port_and_a_second_node_cannot() -> None:
    async def main() -> str:
        first = MeshServer(ServerSettings(service="first", acceptors=4), ModelRepository())
        port = await first.start()
        try:
            second = MeshServer(ServerSettings(service="second", port=port), ModelRepository())
            with pytest.raises(OSError) as info:
                await second.start()
            return str(info.value)
        finally:
            await first.stop(0)

    assert "second: cannot listen on 127.0.0.1:" in asyncio.run(main())
