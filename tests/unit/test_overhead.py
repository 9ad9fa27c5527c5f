"""The orchestrator's own-time metric: request time minus the time spent waiting on steps."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np

from orchestrator.engine import Engine
from orchestrator.grpc_stage import TimedStage, busy_time
from orchestrator.service import Graph
from orchestrator.spec import parse_spec
from services.common.model import InferRequest
from services.common.types import ModelSignature, TensorSpec
from tests.unit.fakes import FakeStage


def test_busy_time_counts_overlapping_calls_once() -> None:
    assert busy_time([]) == 0.0
    assert busy_time([(0.0, 1.0), (2.0, 3.0)]) == 2.0
    assert busy_time([(0.0, 2.0), (1.0, 3.0), (1.5, 1.8)]) == 3.0  # parallel branches overlap


class SeriesDouble:
    """Stands in for a histogram series: keeps what was observed."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


def test_time_waiting_on_steps_is_not_the_orchestrator_s_own() -> None:
    def slow_identity(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}

    spec = parse_spec(
        """
services: {s: {address: "127.0.0.1:1"}}
graphs:
  g:
    inputs: [{name: x, datatype: FP32, shape: [-1]}]
    steps:
      - {name: a, service: s, model: m, inputs: {x: request.x}}
      - {name: b, service: s, model: m, inputs: {x: a.y}}
    outputs: {y: b.y}
"""
    )
    engine = Engine(spec, {"s": TimedStage(FakeStage({"m": slow_identity}, sleep={"m": 0.05}))})
    series = SeriesDouble()
    signature = ModelSignature(
        "g", ("1",), "test", (TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),)
    )
    graph = Graph("g", signature, engine, overhead=series)
    result = asyncio.run(graph.infer(InferRequest({"x": np.ones(2, np.float32)})))
    np.testing.assert_array_equal(result.outputs["y"], [1.0, 1.0])
    # Two sequential 50 ms steps: the own time left over is far below them.
    assert len(series.values) == 1 and 0.0 <= series.values[0] < 0.05
