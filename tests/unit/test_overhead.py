"""The orchestrator's own-time metric: request time minus the time spent waiting on steps."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
import pytest

from orchestrator.graph.engine import Engine, busy_time
from orchestrator.spec import parse_spec
from tests.unit.fakes import FakeClock, FakeStage


def test_busy_time_counts_overlapping_calls_once() -> None:
    assert busy_time([]) == 0.0
    assert busy_time([(0.0, 1.0), (2.0, 3.0)]) == 2.0
    assert busy_time([(0.0, 2.0), (1.0, 3.0), (1.5, 1.8)]) == 3.0  # parallel branches overlap


def test_time_waiting_on_steps_is_not_the_engine_s_own() -> None:
    def identity(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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
    clock = FakeClock()
    observed: list[tuple[str, float]] = []
    stage = FakeStage({"m": identity}, clock=clock, takes={"m": 0.05})
    engine = Engine(spec, {"s": stage}, clock=clock, on_request=lambda g, s: observed.append((g, s)))
    result = asyncio.run(engine.run("g", {"x": np.ones(2, np.float32)}, deadline=None))
    np.testing.assert_array_equal(result.outputs["y"], [1.0, 1.0])
    # Two sequential steps of 50 ms each on the clock, and nothing else moved it: the engine's own
    # time is exactly zero (it would be 0.1 if the steps' time were not taken out).
    assert clock.now == pytest.approx(1000.1)
    assert observed == [("g", 0.0)]
