"""Draining under load, with the orchestrator's replica set over real model_a processes.

One replica: SIGTERM makes it NOT_SERVING for its drain delay before its port closes; with no
other replica to go to, calls keep going to it (through a client that ignores its health) until
then. A replacement under the same name: the drain makes the set resolve the name again at once,
and traffic moves to the new replica before the old one closes.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from orchestrator.stages.replicas import ReplicaSet
from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from services.common.types import InferRequest, InferResult, ModelSignature
from tests.support import ROOT

DRAIN_DELAY = 1.5
X = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)


@dataclass
class Outcome:
    start: float
    end: float
    code: str
    detail: str = ""
    replica: str = ""


class Node:
    """A model_a process on a free port, stopped (killed if need be) at the end."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.common.model_node", "--name", "model_a"),
                *("--model-dir", str(ROOT / "services/model_a/models"), "--port", "0", "--grace", "2"),
                *("--drain-delay", str(DRAIN_DELAY), "--log-level", "WARNING"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        listening, ready = self.proc.stdout.readline(), self.proc.stdout.readline()
        assert "listening on" in listening and "ready on" in ready, (listening, ready)
        self.address = "ipv4:" + ready.split()[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()


class Named:
    """A real client of one replica whose answers say which replica gave them."""

    def __init__(self, client: OipClient, address: str) -> None:
        self.client = client
        self.address = address

    async def call(self, request: InferRequest) -> InferResult:
        result = await self.client.call(request)
        result.parameters["replica"] = self.address
        return result

    async def metadata(self, model: str, version: str) -> ModelSignature:
        return await self.client.metadata(model, version)

    async def is_ready(self, model: str, version: str) -> bool:
        return await self.client.is_ready(model, version)

    @property
    def reachable(self) -> bool:
        return self.client.reachable

    async def close(self) -> None:
        await self.client.close()


def named(address: str, *, health_checked: bool) -> Named:
    return Named(OipClient(address, health_checked=health_checked), address)


async def drive(replicas: ReplicaSet, old: Node, concurrency: int = 4) -> tuple[list[Outcome], float]:
    """Calls from `concurrency` clients; SIGTERM to `old` after 50 answers; returns the outcomes
    and when the signal was sent, once `old` has exited and 20 more calls were made."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    recorded = asyncio.Condition()

    async def record(outcome: Outcome) -> None:
        async with recorded:
            outcomes.append(outcome)
            recorded.notify_all()

    async def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            request = InferRequest("digits-mlp", {"features": X}, deadline=start + 5.0)
            try:
                result = await replicas.call(request)
            except MeshError as err:
                await record(Outcome(start, time.monotonic(), err.code, err.message))
                await asyncio.sleep(0.005)  # poll interval: a failing client does not spin
                continue
            await record(Outcome(start, time.monotonic(), "OK", replica=str(result.parameters["replica"])))

    async def answered(count: int) -> None:
        async with recorded:
            await recorded.wait_for(lambda: len(outcomes) >= count)

    clients = [asyncio.create_task(client()) for _ in range(concurrency)]
    await answered(50)
    signalled = time.monotonic()
    old.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(old.proc.wait, 30)
    await answered(len(outcomes) + 20)
    stop.set()
    await asyncio.gather(*clients)
    await replicas.close()
    return outcomes, signalled


def test_a_lone_replica_is_called_until_it_closes(nodes: list[Node]) -> None:
    nodes.append(Node())
    (node,) = nodes

    async def run() -> tuple[list[Outcome], float]:
        replicas = ReplicaSet(  # on the loop its channels will use
            node.address,
            functools.partial(named, health_checked=True),
            connect_draining=functools.partial(named, health_checked=False),
        )
        return await drive(replicas, node)

    outcomes, signalled = asyncio.run(run())
    assert node.proc.returncode == 0
    # Calls that started during the drain delay (a margin for the signal to land and the port to
    # close): none failed.
    during = [o for o in outcomes if signalled <= o.start < signalled + DRAIN_DELAY - 0.3]
    assert len(during) >= 10
    assert [(o.code, o.detail) for o in during if o.code != "OK"] == []


def test_a_replacement_under_the_same_name_gets_traffic_before_the_old_one_closes(
    nodes: list[Node],
) -> None:
    nodes.extend([Node(), Node()])
    old, new = nodes
    # What the name resolves to: the old replica at first; the new one has appeared by the time
    # the old one drains (as a rolling update's Service does), which the set learns only by
    # resolving again: its own refresh is far away.
    answers = [old.address]

    async def resolver(name: str) -> list[str]:
        return list(answers)

    replicas = ReplicaSet(
        "dns:///model-a.test:8021",
        functools.partial(named, health_checked=True),
        connect_draining=functools.partial(named, health_checked=False),
        resolver=resolver,
        resolve_interval=3600.0,
    )

    async def run() -> tuple[list[Outcome], float]:
        await replicas.call(InferRequest("digits-mlp", {"features": X}))  # resolved: the old one only
        answers[:] = [new.address]
        return await drive(replicas, old)

    outcomes, signalled = asyncio.run(run())
    closed_by = signalled + DRAIN_DELAY
    moved = [o for o in outcomes if o.replica == new.address and o.end < closed_by]
    assert moved, "no call reached the new replica before the old one closed"
    assert [(o.code, o.detail) for o in outcomes if o.code != "OK"] == []
