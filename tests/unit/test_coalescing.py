"""Coalescing at the orchestrator: concurrent calls of a step share one downstream call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import numpy as np
import pytest

from orchestrator.stages import coalescing
from orchestrator.stages.coalescing import CoalescingStage, LaneLimit
from services.common.errors import DeadlineExceeded, InvalidInput, Unavailable
from services.common.types import InferRequest
from tests.unit.fakes import FakeStage


def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"]
    if (x < 0).any():
        raise InvalidInput("negative rows are not allowed")
    return {"y": x * 2, "z": x + 1}


def rows(value: float, n: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((n, 3), value, dtype=np.float32)}


async def call(
    stage: CoalescingStage, inputs: dict[str, np.ndarray], timeout: float = 5.0
) -> dict[str, np.ndarray]:
    request = InferRequest("m", inputs, ("y",), request_id="r", deadline=time.monotonic() + timeout)
    result = await stage.call(request)
    return result.outputs


def test_a_lone_call_goes_out_at_once() -> None:
    fake = FakeStage({"m": double})
    stage = CoalescingStage(fake, max_in_flight=1)
    out = asyncio.run(call(stage, rows(1.0)))
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0))
    assert len(fake.calls) == 1


def test_concurrent_callers_share_calls_and_each_gets_its_own_rows() -> None:
    fake = FakeStage({"m": double}, sleep={"m": 0.01})
    stage = CoalescingStage(fake, max_in_flight=1)

    async def many() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(call(stage, rows(float(i), n=1 + i % 3)) for i in range(30)))

    answers = asyncio.run(many())
    for i, out in enumerate(answers):
        np.testing.assert_array_equal(out["y"], np.full((1 + i % 3, 3), 2.0 * i))
        assert set(out) == {"y"}
    assert len(fake.calls) < 30 / 2  # really coalesced
    assert stage.callers_served == 30


def test_one_bad_caller_fails_alone() -> None:
    fake = FakeStage({"m": double}, sleep={"m": 0.01})
    stage = CoalescingStage(fake, max_in_flight=1)

    async def scenario() -> list[object]:
        first = asyncio.create_task(call(stage, rows(1.0)))
        await fake.wait_for_calls(1)  # the others queue behind it and leave together
        rest = [call(stage, rows(2.0)), call(stage, rows(-1.0)), call(stage, rows(3.0))]
        return [await first, *await asyncio.gather(*rest, return_exceptions=True)]

    _, good, bad, other = asyncio.run(scenario())
    assert isinstance(bad, InvalidInput) and "negative" in bad.message
    np.testing.assert_array_equal(good["y"], np.full((1, 3), 4.0))  # type: ignore[index]
    np.testing.assert_array_equal(other["y"], np.full((1, 3), 6.0))  # type: ignore[index]


def test_a_stacked_call_carries_at_most_max_bytes_of_inputs() -> None:
    # Large tensors (pages of an image) must not stack into a message the channel refuses.
    fake = FakeStage({"m": double}, sleep={"m": 0.01})
    one = rows(1.0)["x"].nbytes
    stage = CoalescingStage(fake, max_in_flight=1, adaptive=False, max_bytes=2 * one)

    async def scenario() -> list[dict[str, np.ndarray]]:
        first = asyncio.create_task(call(stage, rows(0.0)))
        await fake.wait_for_calls(1)  # the five others queue behind it
        return [await first, *await asyncio.gather(*(call(stage, rows(float(i))) for i in range(1, 6)))]

    answers = asyncio.run(scenario())
    for i, out in enumerate(answers):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0 * i))
    sizes = [len(c.inputs["x"]) for c in fake.calls]
    assert max(sizes) == 2 and sum(sizes) == 6  # stacked, never past two rows' bytes


def test_a_service_failure_reaches_every_caller_of_the_shared_call() -> None:
    fake = FakeStage({"m": double}, sleep={"m": 0.01})
    stage = CoalescingStage(fake, max_in_flight=1)

    async def scenario() -> list[object]:
        first = asyncio.create_task(call(stage, rows(1.0)))
        await fake.wait_for_calls(1)
        fake.fail("m", Unavailable("replica gone"), Unavailable("replica gone"))
        return await asyncio.gather(
            first, call(stage, rows(2.0)), call(stage, rows(3.0)), return_exceptions=True
        )

    answers = asyncio.run(scenario())
    assert all(isinstance(a, Unavailable) for a in answers)
    assert len(fake.calls) == 2  # the shared call was not split up and retried one by one


def test_each_waiting_caller_keeps_its_own_timeout() -> None:
    fake = FakeStage({"m": double}, sleep={"m": 0.3})
    stage = CoalescingStage(fake, max_in_flight=1)

    async def scenario() -> object:
        first = asyncio.create_task(call(stage, rows(1.0)))
        await fake.wait_for_calls(1)
        try:
            return await call(stage, rows(2.0), timeout=0.05)
        except DeadlineExceeded as err:
            return err
        finally:
            await first

    assert isinstance(asyncio.run(scenario()), DeadlineExceeded)


def test_cancelled_waiter_is_dropped_from_the_next_call() -> None:
    fake = FakeStage({"m": double}, sleep={"m": 0.05})
    stage = CoalescingStage(fake, max_in_flight=1)

    async def scenario() -> None:
        first = asyncio.create_task(call(stage, rows(1.0)))
        await fake.wait_for_calls(1)
        gone = asyncio.create_task(call(stage, rows(7.0)))
        stays = asyncio.create_task(call(stage, rows(2.0)))
        await asyncio.sleep(0)  # one loop turn: both callers reach the queue
        gone.cancel()
        await first
        out = await stays
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 4.0))
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(scenario())
    assert all(7.0 not in c.inputs["x"] for c in fake.calls)


def test_calls_with_different_layouts_never_share() -> None:
    fake = FakeStage({"m": double}, sleep={"m": 0.01})
    stage = CoalescingStage(fake, max_in_flight=1)

    async def scenario() -> None:
        first = asyncio.create_task(call(stage, rows(1.0)))
        await fake.wait_for_calls(1)
        wide = {"x": np.ones((1, 5), np.float32)}
        await asyncio.gather(call(stage, rows(2.0)), call(stage, wide), first)

    asyncio.run(scenario())
    assert all(len({c.inputs["x"].shape[1]}) == 1 for c in fake.calls)
    assert len(fake.calls) == 3


def test_the_limit_grows_to_its_maximum_at_the_unloaded_latency_and_falls_to_one_under_load() -> None:
    limit = LaneLimit(8)
    for _ in range(50):
        limit.observe(0.001)
    assert limit.value == 8.0
    for _ in range(50):
        limit.observe(0.004)  # four times the unloaded latency: calls queue somewhere
    assert limit.value == 1.0 and limit.loaded
    assert limit.allows(0) and not limit.allows(1)
    for _ in range(50):
        limit.observe(0.001)
    assert limit.value == 8.0


def test_a_loaded_lane_sends_the_callers_of_one_loop_turn_as_one_call() -> None:
    # The rows of a call that returned move on together: on a loaded lane the first of them
    # must not leave alone with the others in a second call behind it.
    fake = FakeStage({"m": double})
    stage = CoalescingStage(fake, max_in_flight=4)

    async def wave() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(call(stage, rows(float(i))) for i in range(4)))

    asyncio.run(wave())
    assert len(fake.calls) == 4  # unloaded: each goes at once, up to the limit
    fake.calls.clear()
    limit = next(iter(stage._limits._limits.values()))
    for _ in range(50):
        limit.observe(0.004)
    assert limit.loaded

    async def lone() -> dict[str, np.ndarray]:
        # Loaded by latency alone, one row per call (a lone request's jitter): straight through.
        task = asyncio.create_task(call(stage, rows(9.0)))
        await asyncio.sleep(0)  # one loop turn: the task's first step ran
        assert len(fake.calls) == 1  # it reached the service in that step, without a turn's wait
        return await task

    np.testing.assert_array_equal(asyncio.run(lone())["y"], np.full((1, 3), 18.0))
    fake.calls.clear()
    limit.rows = 3  # loaded, and its calls carry several rows: it gathers
    answers = asyncio.run(wave())
    assert len(fake.calls) == 1 and len(fake.calls[0].inputs["x"]) == 4
    for i, out in enumerate(answers):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0 * i))


def test_a_saturated_lane_holds_its_callers_so_that_later_ones_join_the_same_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hold long enough that a stalled machine cannot end it before the late callers arrive.
    monkeypatch.setattr(coalescing, "HOLD_MAX", 10.0)
    fake = FakeStage({"m": double}, sleep={"m": 0.02})
    stage = CoalescingStage(fake, max_in_flight=1)

    async def scenario() -> None:
        await call(stage, rows(0.0))  # the lane's limit exists, its floor that of a fast call
        limit = next(iter(stage._limits._limits.values()))
        for _ in range(50):
            limit.observe(2.0)  # saturated: calls answer far slower than unloaded,
        limit.rows = 4  # and carry many rows
        first = asyncio.gather(*(call(stage, rows(1.0)) for _ in range(4)))
        await fake.wait_for_calls(2)  # the four left together: 4 rows, enough to hold
        early = [asyncio.create_task(call(stage, rows(2.0))) for _ in range(2)]
        await first  # the call returned: the two that waited for it are held, not sent
        assert len(fake.calls) == 2
        late = [asyncio.create_task(call(stage, rows(3.0))) for _ in range(2)]
        await asyncio.gather(*early, *late)

    asyncio.run(scenario())
    assert [len(c.inputs["x"]) for c in fake.calls] == [1, 4, 4]  # the held and the late: one call


def test_a_fixed_limit_does_not_adapt() -> None:
    limit = LaneLimit(3, adaptive=False)
    for seconds in (0.001, 0.1, 0.1, 0.1):
        limit.observe(seconds)
    assert limit.value == 3.0


def test_under_load_every_caller_gets_exactly_its_rows_and_the_metric_sees_every_row() -> None:
    fake = FakeStage({"m": double}, sleep={"m": 0.005})
    sent: list[tuple[str, int]] = []
    stage = CoalescingStage(fake, max_in_flight=4, on_call=lambda model, n: sent.append((model, n)))

    async def many() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(call(stage, rows(float(i), n=1 + i % 4)) for i in range(60)))

    answers = asyncio.run(many())
    for i, out in enumerate(answers):
        np.testing.assert_array_equal(out["y"], np.full((1 + i % 4, 3), 2.0 * i))
    assert sum(n for _, n in sent) == sum(1 + i % 4 for i in range(60))
    assert {model for model, _ in sent} == {"m"}
    assert len(sent) == len(fake.calls) < 60 / 2  # stacked
    assert max(n for _, n in sent) > 4
