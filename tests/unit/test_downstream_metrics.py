"""The orchestrator's rows-per-downstream-call hook: told of every call that leaves, with its rows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import numpy as np

from orchestrator.stages.coalescing import CoalescingStage
from services.common.types import InferRequest
from tests.unit.fakes import FakeStage


def identity(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"]}


def test_every_downstream_call_reports_its_rows() -> None:
    fake = FakeStage({"m": identity}, sleep={"m": 0.02})
    seen: list[tuple[str, int]] = []
    stage = CoalescingStage(fake, max_in_flight=1, on_call=lambda model, rows: seen.append((model, rows)))

    async def call(rows: int) -> None:
        request = InferRequest("m", {"x": np.ones((rows, 2), np.float32)}, deadline=time.monotonic() + 5)
        await stage.call(request)

    async def run() -> None:
        first = asyncio.create_task(call(1))
        await fake.wait_for_calls(1)  # out at once; the next three wait and leave together
        await asyncio.gather(first, call(2), call(3), call(4))
        await call(5)  # alone again
        # Not stackable (a scalar input): straight through, one call of one row (a request
        # without a batch dimension is one inference, as everywhere: types.rows_of).
        await stage.call(InferRequest("m", {"x": np.array(1.0, np.float32)}))

    asyncio.run(run())
    assert seen == [("m", 1), ("m", 9), ("m", 5), ("m", 1)]
    assert len(fake.calls) == 4
