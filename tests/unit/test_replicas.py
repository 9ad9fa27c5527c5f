"""Replica sets: picking, fail-over, hedging within the budget, ejection and its back-off.

Replicas are fakes at the `Replica` seam (named as such); the clock of ejections is a FakeClock,
so back-off periods are exact; hedge delays are real but tiny.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from orchestrator.stages.replicas import OutlierPolicy, ReplicaSet, parse_target
from orchestrator.stages.retry_budget import RetryBudget
from services.common.errors import InvalidInput, MeshError, Unavailable
from services.common.types import InferRequest, InferResult, ModelSignature
from tests.support import run
from tests.unit.fakes import FakeClock

REQUEST = InferRequest("m", {"x": np.zeros((1, 4), np.float32)})
POLICY = OutlierPolicy(min_hedge_delay=0.01, max_hedge_delay=0.01)


class FakeReplica:
    """A replica whose calls do what `behave` says: answer, raise, or hang until cancelled."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.behave: Callable[[], Awaitable[None]] = _answer
        self.reachable = True
        self.calls = 0
        self.called = asyncio.Event()
        self.cancelled = 0
        self.closed = False

    async def call(self, request: InferRequest) -> InferResult:
        self.calls += 1
        self.called.set()
        try:
            await self.behave()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return InferResult({"y": np.ones(1)}, model_name=request.model, model_version=self.address)

    async def metadata(self, model: str, version: str) -> ModelSignature:
        await self.behave()
        return ModelSignature(model, ("1",), "fake", (), ())

    async def is_ready(self, model: str, version: str) -> bool:
        return self.reachable

    async def close(self) -> None:
        self.closed = True


async def _answer() -> None:
    return None


async def _hang() -> None:
    await asyncio.Event().wait()


def _raise(error: MeshError) -> Callable[[], Awaitable[None]]:
    async def behave() -> None:
        raise error

    return behave


def replica_set(
    n: int = 2, *, budget: RetryBudget | None = None, clock: FakeClock | None = None
) -> tuple[ReplicaSet, dict[str, FakeReplica]]:
    fakes: dict[str, FakeReplica] = {}

    def connect(address: str) -> FakeReplica:
        fakes[address] = FakeReplica(address)
        return fakes[address]

    target = "ipv4:" + ",".join(f"10.0.0.{i}:1" for i in range(1, n + 1))
    replicas = ReplicaSet(
        target,
        connect,
        service="s",
        budget=budget,
        policy=POLICY,
        clock=clock or FakeClock(),
        rng=random.Random(0),
    )
    return replicas, fakes


def calls(replicas: ReplicaSet, n: int) -> list[InferResult]:
    async def main() -> list[InferResult]:
        return [await replicas.call(REQUEST) for _ in range(n)]

    return asyncio.run(main())


def test_targets_are_split_into_replicas() -> None:
    assert parse_target("ipv4:127.0.0.1:1,127.0.0.1:2") == (["ipv4:127.0.0.1:1", "ipv4:127.0.0.1:2"], None)
    assert parse_target("ipv6:[::1]:1") == (["ipv6:[::1]:1"], None)
    assert parse_target("dns:///model-a.onnxmesh.svc:8021") == ([], "model-a.onnxmesh.svc:8021")
    assert parse_target("127.0.0.1:8021") == (["127.0.0.1:8021"], None)


def test_a_dns_name_is_resolved_to_one_replica_per_address() -> None:
    replicas = ReplicaSet("dns:///localhost:8021", FakeReplica)
    run(replicas.call(REQUEST))
    assert "ipv4:127.0.0.1:8021" in replicas.addresses


def test_calls_spread_over_every_replica() -> None:
    replicas, fakes = replica_set(3)
    calls(replicas, 60)
    assert all(f.calls >= 10 for f in fakes.values()), {a: f.calls for a, f in fakes.items()}


def test_unavailable_fails_over_to_another_replica_at_once() -> None:
    replicas, fakes = replica_set()
    down = fakes["ipv4:10.0.0.1:1"]
    down.behave = _raise(Unavailable("connection refused"))
    answers = calls(replicas, 20)
    assert {a.model_version for a in answers} == {"ipv4:10.0.0.2:1"}
    assert replicas.failovers >= 1
    # Two failures in a row eject it: it is then left out of the pick.
    assert replicas.ejected() == ["ipv4:10.0.0.1:1"] and down.calls == 2


def test_a_hung_replica_is_hedged_around_then_ejected() -> None:
    replicas, fakes = replica_set()
    hung = fakes["ipv4:10.0.0.1:1"]
    hung.behave = _hang
    answers = calls(replicas, 20)
    assert {a.model_version for a in answers} == {"ipv4:10.0.0.2:1"}
    assert hung.calls == 2 and hung.cancelled == 2  # hedged twice, the losers cancelled
    assert replicas.hedges == 2 and replicas.ejected() == ["ipv4:10.0.0.1:1"]


def test_hedges_are_paid_from_the_budget_and_stop_when_it_is_empty() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, clock=clock)  # nothing to spend
    replicas, fakes = replica_set(budget=budget, clock=clock)
    slow = fakes["ipv4:10.0.0.1:1"]

    async def late() -> None:
        await asyncio.sleep(0.05)  # a slow replica: injected latency, not a wait

    slow.behave = late
    calls(replicas, 10)
    assert replicas.hedges == 0 and slow.cancelled == 0  # it was waited for, never hedged
    assert replicas.ejected() == []


def test_a_service_slow_on_every_replica_ejects_none() -> None:
    replicas, fakes = replica_set()

    async def late() -> None:
        await asyncio.sleep(0.03)  # a slow replica: injected latency, not a wait

    for fake in fakes.values():
        fake.behave = late
    calls(replicas, 10)
    assert replicas.ejected() == []


def test_at_most_half_are_ejected_and_a_lone_replica_never() -> None:
    replicas, fakes = replica_set()
    for fake in fakes.values():
        fake.behave = _raise(Unavailable("down"))
    for _ in range(6):
        with pytest.raises(Unavailable):
            run(replicas.call(REQUEST))
    assert len(replicas.ejected()) == 1
    lone, fakes = replica_set(1)
    fakes["ipv4:10.0.0.1:1"].behave = _raise(Unavailable("down"))
    for _ in range(4):
        with pytest.raises(Unavailable):
            run(lone.call(REQUEST))
    assert lone.ejected() == []


def test_an_ejected_replica_comes_back_after_its_back_off_and_doubles_it_on_relapse() -> None:
    clock = FakeClock()
    replicas, fakes = replica_set(clock=clock)
    flaky = fakes["ipv4:10.0.0.1:1"]
    flaky.behave = _raise(Unavailable("down"))
    calls(replicas, 10)
    assert replicas.ejected() == [flaky.address]
    clock.advance(POLICY.base_ejection + 0.01)
    assert replicas.ejected() == []
    calls(replicas, 10)  # on probation: its first failure ejects it again, for twice as long
    assert replicas.ejected() == [flaky.address]
    clock.advance(POLICY.base_ejection + 0.01)
    assert replicas.ejected() == [flaky.address]
    clock.advance(POLICY.base_ejection)
    flaky.behave = _answer
    calls(replicas, 20)
    assert replicas.ejected() == [] and flaky.calls > 3


def test_an_unreachable_replica_is_not_picked() -> None:
    replicas, fakes = replica_set()
    fakes["ipv4:10.0.0.1:1"].reachable = False
    answers = calls(replicas, 20)
    assert {a.model_version for a in answers} == {"ipv4:10.0.0.2:1"}


def test_a_lone_draining_replica_is_called_through_its_draining_client_until_another_serves() -> None:
    draining: dict[str, FakeReplica] = {}

    def connect_draining(address: str) -> FakeReplica:
        draining[address] = FakeReplica(address + " (draining)")
        return draining[address]

    lone = FakeReplica("ipv4:10.0.0.1:1")
    replicas = ReplicaSet("ipv4:10.0.0.1:1", lambda _: lone, connect_draining=connect_draining)
    assert {a.model_version for a in calls(replicas, 3)} == {"ipv4:10.0.0.1:1"}
    assert draining == {}  # serving: no second client
    lone.reachable = False  # NOT_SERVING: it drains
    assert {a.model_version for a in calls(replicas, 3)} == {"ipv4:10.0.0.1:1 (draining)"}
    lone.reachable = True
    assert {a.model_version for a in calls(replicas, 3)} == {"ipv4:10.0.0.1:1"}


def test_a_replica_that_starts_draining_has_the_name_resolved_again_at_once() -> None:
    answers = [["ipv4:10.0.0.1:1"], ["ipv4:10.0.0.2:1"]]  # a rolling update: the new pod replaces the old
    asked: list[str] = []

    async def resolver(name: str) -> list[str]:
        asked.append(name)
        return answers[min(len(asked), len(answers)) - 1]

    fakes: dict[str, FakeReplica] = {}

    def connect(address: str) -> FakeReplica:
        fakes[address] = FakeReplica(address)
        return fakes[address]

    replicas = ReplicaSet(
        "dns:///model-a:8021", connect, resolver=resolver, connect_draining=FakeReplica, clock=FakeClock()
    )

    async def main() -> list[InferResult]:
        out = [await replicas.call(REQUEST)]
        fakes["ipv4:10.0.0.1:1"].reachable = False  # SIGTERM: NOT_SERVING
        out.append(await replicas.call(REQUEST))  # still answered (by the draining replica)
        for _ in range(3):
            await asyncio.sleep(0)  # the resolution started by the change runs
        out.append(await replicas.call(REQUEST))
        return out

    first, during, after = (a.model_version for a in asyncio.run(main()))
    # The fake clock never moved: the 10 s refresh was not due, the change alone resolved again.
    assert asked == ["model-a:8021", "model-a:8021"]
    assert (first, during, after) == ("ipv4:10.0.0.1:1", "ipv4:10.0.0.1:1", "ipv4:10.0.0.2:1")


def test_client_errors_are_the_callers_and_never_retried() -> None:
    replicas, fakes = replica_set()
    for fake in fakes.values():
        fake.behave = _raise(InvalidInput("bad tensor"))
    with pytest.raises(InvalidInput):
        run(replicas.call(REQUEST))
    assert sum(f.calls for f in fakes.values()) == 1 and replicas.ejected() == []


def test_cancelling_a_call_cancels_every_attempt() -> None:
    replicas, fakes = replica_set()
    for fake in fakes.values():
        fake.behave = _hang

    async def main() -> None:
        task = asyncio.ensure_future(replicas.call(REQUEST))
        # the first attempt and its hedge
        await asyncio.wait_for(asyncio.gather(*(f.called.wait() for f in fakes.values())), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sum(f.cancelled for f in fakes.values()) == 2


def test_metadata_and_readiness_ask_the_replicas() -> None:
    replicas, fakes = replica_set()
    fakes["ipv4:10.0.0.1:1"].behave = _raise(Unavailable("down"))

    async def main() -> tuple[ModelSignature, bool]:
        return await replicas.metadata("m", ""), await replicas.is_ready("m", "")

    signature, ready = asyncio.run(main())
    assert signature.name == "m" and ready
