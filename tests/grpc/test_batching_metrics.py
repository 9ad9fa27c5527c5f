"""The batching series of a real in-process node move by exactly the traffic sent.

A gated model holds its first batch while three more requests (1, 2 and 3 rows) wait, so the
queue depth is known (6 rows) while they wait and the batches are known once the gate opens
(one row, then the six together). Read from the node's own /metrics, as Prometheus reads them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.common.batching.adaptive import BatchingModel
from services.common.grpc.client import OipClient
from services.common.model import Model
from services.common.repository import ModelConfig, ModelRepository
from services.common.server import MeshServer
from services.common.settings import ServerSettings
from services.common.types import ModelSignature, TensorSpec
from tests.support import metric_total, until_async

TIMEOUT = 30.0


class GatedDouble(Model):
    """Test double: y = 2x over FP32[-1, 2]; `predict` waits while the gate is shut."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        super().__init__("double", "1", executor)
        self.open = threading.Event()
        self.open.set()
        self.entered = 0

    def load_sync(self) -> None:
        spec = (TensorSpec("x", "FP32", (-1, 2)),)
        self.signature = ModelSignature(
            self.name, ("1",), "python", spec, (TensorSpec("y", "FP32", (-1, 2)),)
        )

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.entered += 1
        if not self.open.wait(TIMEOUT):
            raise TimeoutError("the test never opened the gate")
        return {"y": inputs["x"] * 2}


def test_batch_size_queue_time_and_depth_follow_the_traffic() -> None:
    executor = ThreadPoolExecutor(2)
    inner = GatedDouble(executor)
    model = BatchingModel(
        inner, ModelConfig(max_batch_size=32, max_queue_delay_ms=1.0), max_concurrent_batches=1
    )
    settings = ServerSettings(service="test", host="127.0.0.1", port=0, metrics_port=0)
    server = MeshServer(settings, ModelRepository([model]))

    def metric(sample: str, **labels: str) -> float:
        assert server.metrics_port is not None
        return metric_total(server.metrics_port, sample, model="double", version="1", **labels)

    async def main() -> None:
        port = await server.start()
        await server.load()
        inner.entered = 0  # the warm-up went through predict too
        try:
            async with OipClient(f"127.0.0.1:{port}") as client:

                async def send(rows: int) -> None:
                    await client.infer("double", {"x": np.ones((rows, 2), np.float32)}, timeout=TIMEOUT)

                inner.open.clear()
                blocker = asyncio.create_task(send(1))
                await until_async(lambda: inner.entered == 1)  # the first batch is inside predict
                waiting = [asyncio.create_task(send(rows)) for rows in (1, 2, 3)]
                await until_async(lambda: model.queued_rows == 6)
                assert metric("onnxmesh_batch_queue_rows") == 6
                assert metric("onnxmesh_batch_rows_count") == 0  # nothing has returned yet
                inner.open.set()
                await asyncio.wait_for(asyncio.gather(blocker, *waiting), TIMEOUT)
            # Read before the server stops: its metrics port closes with it.
            # Two predict calls: the blocker alone, then the three waiting requests' six rows together.
            assert (metric("onnxmesh_batch_rows_count"), metric("onnxmesh_batch_rows_sum")) == (2, 7)
            assert metric("onnxmesh_batch_rows_bucket", le="1.0") == 1
            assert metric("onnxmesh_batch_rows_bucket", le="4.0") == 1
            assert metric("onnxmesh_batch_rows_bucket", le="8.0") == 2
            assert metric("onnxmesh_batch_queue_duration_seconds_count") == 4  # one per request
            assert metric("onnxmesh_batch_queue_rows") == 0
            assert metric("onnxmesh_requests_total", code="OK") == 4
        finally:
            inner.open.set()
            await server.stop(0)

    try:
        asyncio.run(main())
    finally:
        executor.shutdown(wait=True)
