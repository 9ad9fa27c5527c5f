"""Load shedding: the fixed and adaptive limits, the data plane refusing above them, and calls
counted by how they really ended (a client that went away vs a deadline that passed)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.common.errors import ResourceExhausted, truncate
from services.common.limits import AdaptiveLimit, ConcurrencyLimiter, FixedLimit, limiter_from_setting
from services.common.observability.logs import TextFormatter
from services.common.types import InferRequest, InferResult
from tests.unit.fakes import Double, FakeClock, X, loaded, requests_counted


def test_a_fixed_limit_admits_that_many_and_refuses_the_rest() -> None:
    limiter = ConcurrencyLimiter(FixedLimit(2), node="model_a")
    assert [limiter.try_acquire() for _ in range(3)] == [True, True, False]
    limiter.release(0.01, True)
    assert limiter.try_acquire() and limiter.refused == 1
    message = limiter.refusal("digits-mlp").message
    assert "model_a is overloaded (2 inference calls in flight, limit 2)" in message


def test_the_adaptive_limit_shrinks_when_latency_queues_and_grows_back_when_it_does_not() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(initial=100, min_limit=4, max_limit=200, clock=clock)
    for _ in range(50):
        limit.sample(0.002, in_flight=100)  # the baseline
    calm = limit.limit
    for _ in range(200):
        limit.sample(0.100, in_flight=calm)  # 50x the baseline: queueing
    assert limit.limit == 4  # down to the floor, never below
    for _ in range(400):
        limit.sample(0.002, in_flight=limit.limit)
    assert limit.limit > 50


def test_an_unused_limit_does_not_grow() -> None:
    limit = AdaptiveLimit(initial=40, min_limit=4, max_limit=1000, clock=FakeClock())
    for _ in range(500):
        limit.sample(0.002, in_flight=1)
    assert limit.limit == 40


def test_the_setting_picks_the_limiter() -> None:
    assert limiter_from_setting("off", "n") is None
    adaptive = limiter_from_setting("adaptive", "n")
    assert adaptive is not None and adaptive.limit >= 32
    fixed = limiter_from_setting("12", "n")
    assert fixed is not None and fixed.limit == 12
    with pytest.raises(ValueError, match="--max-inflight"):
        limiter_from_setting("lots", "n")


class Slow(Double):
    async def infer(self, request: InferRequest) -> InferResult:
        await asyncio.sleep(0.05)  # a slow model: the latency it injects, not a wait
        return await super().infer(request)


def test_the_data_plane_refuses_above_the_limit_at_once_and_counts_it() -> None:
    model = Slow()
    dataplane = loaded(model)
    dataplane.limiter = ConcurrencyLimiter(FixedLimit(2), node="test")

    async def main() -> list[object]:
        calls = [dataplane.infer(InferRequest("double", {"x": X})) for _ in range(5)]
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(main())
    refused = [a for a in answers if isinstance(a, ResourceExhausted)]
    assert len(refused) == 3 and len(model.calls) == 2
    assert requests_counted(dataplane, "double", "RESOURCE_EXHAUSTED") == 3
    assert dataplane.limiter.in_flight == 0


class Hung(Double):
    """A model still running: it answers only by being cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = asyncio.Event()

    async def infer(self, request: InferRequest) -> InferResult:
        self.calls.append(request)
        self.inside.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_cancelled_and_deadline_exceeded_calls_are_counted_apart() -> None:
    model = Hung()
    dataplane = loaded(model)

    async def cancel(deadline: float | None) -> None:
        model.inside = asyncio.Event()  # one per run: each asyncio.run has its own loop
        task = asyncio.ensure_future(dataplane.infer(InferRequest("double", {"x": X}, deadline=deadline)))
        await model.inside.wait()  # the call is inside the model
        if deadline is not None:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        task.cancel()  # what gRPC does when the client leaves, or when its deadline passes
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel(None))
    asyncio.run(cancel(time.monotonic() + 0.02))
    assert requests_counted(dataplane, "double", "CANCELLED") == 1
    assert requests_counted(dataplane, "double", "DEADLINE_EXCEEDED") == 1
    assert requests_counted(dataplane, "double", "OK") == 0


def test_client_input_is_bounded_in_messages() -> None:
    assert truncate("x" * 10) == "x" * 10
    cut = truncate("x" * 10_000)
    assert len(cut) < 250 and cut.endswith("...(10000 characters)")


def test_text_logs_carry_the_code_and_the_error() -> None:
    record = logging.LogRecord(
        "services.common.grpc.servicer", logging.INFO, "", 0, "ModelInfer failed", None, None
    )
    record.code = "INVALID_ARGUMENT"
    record.error = "tensor 'image': pixel values must be 0..16"
    line = TextFormatter("model_a").format(record)
    assert line.endswith(
        "ModelInfer failed code=INVALID_ARGUMENT error=\"tensor 'image': pixel values must be 0..16\""
    )
