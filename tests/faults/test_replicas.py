"""One of two model_a replicas killed, drained or frozen under load: no request fails.

Each scenario runs closed-loop load on digits-serial through the orchestrator (c=8, a 5 s client
deadline), breaks model_a-1 or model_a-2 mid-way, and prints sent / failed by code / p50 / p99
before, during and after. What is asserted is correctness only: no failed request, no wrong
answer, requests kept completing during the fault, and the mechanism that saved them at work.
"""

from __future__ import annotations

import io
import signal

import pytest

from meshctl.launcher import LocalMesh
from tests.faults.conftest import IMAGES
from tests.faults.load import Load, Phase
from tests.support import metric_total, until

pytestmark = pytest.mark.timeout(120)

PER_PHASE = 500
CONCURRENCY = 8


def load(mesh: LocalMesh, labels: dict[str, list[int]]) -> Load:
    return Load(
        mesh.address("orchestrator"),
        "digits-serial",
        IMAGES,
        concurrency=CONCURRENCY,
        timeout=5.0,
        expected=labels["digits-serial"],
    )


def assert_clean(phases: list[Phase]) -> None:
    """No failure, no wrong answer, and real traffic in every phase: each phase waited for
    PER_PHASE calls to complete after its mark, of which at most CONCURRENCY started before it."""
    assert [phase.name for phase in phases] == ["before", "during", "after"]
    for phase in phases:
        assert phase.sent >= PER_PHASE - CONCURRENCY, phase
        assert phase.failed == {} and phase.wrong == 0, phase


def replica_events(mesh: LocalMesh, event: str) -> float:
    port = mesh.process("orchestrator").metrics_port
    assert port is not None
    return metric_total(port, "onnxmesh_replica_events_total", service="model_a", event=event)


def test_a_frozen_replica_is_ejected_and_hedged_around(mesh: LocalMesh, labels: dict[str, list[int]]) -> None:
    frozen = mesh.process("model_a", 2)
    ejected_before = replica_events(mesh, "ejected")
    with load(mesh, labels) as running:
        running.wait_for(PER_PHASE)
        running.mark("during")
        frozen.signal(signal.SIGSTOP)
        try:
            during = running.wait_for(PER_PHASE, timeout=30.0)
        finally:
            frozen.signal(signal.SIGCONT)
        running.mark("after")
        running.wait_for(PER_PHASE)
    phases = running.report("model_a-2 frozen (SIGSTOP) under load")
    assert_clean(phases)
    assert during >= PER_PHASE  # requests kept completing while it was frozen
    assert replica_events(mesh, "ejected") > ejected_before


def test_a_killed_replica_fails_over_and_is_restarted(
    mesh: LocalMesh, labels: dict[str, list[int]], logs: io.StringIO
) -> None:
    victim = mesh.process("model_a", 1)
    restarter = mesh.restarter
    assert restarter is not None
    restarts = len(restarter.restarts)
    with load(mesh, labels) as running:
        running.wait_for(PER_PHASE)
        running.mark("during")
        victim.signal(signal.SIGKILL)
        running.wait_for(PER_PHASE)
        # The launcher restarts it, as a Deployment would: wait for that, then for more answers.
        until(lambda: len(restarter.restarts) > restarts, "the launcher to restart model_a-1", 60.0)
        running.mark("after")
        running.wait_for(PER_PHASE)
    phases = running.report("model_a-1 killed (SIGKILL) under load, restarted by the launcher")
    assert_clean(phases)
    restart = restarter.restarts[restarts]
    assert restart.name == "model_a-1" and restart.exit_code == -signal.SIGKILL and restart.pid is not None
    assert mesh.process("model_a", 1).pid == restart.pid != victim.pid
    assert "model_a-1 exited unexpectedly with code -9; restarting in" in logs.getvalue()


def test_a_drained_replica_costs_no_request(mesh: LocalMesh, labels: dict[str, list[int]]) -> None:
    with load(mesh, labels) as running:
        running.wait_for(PER_PHASE)
        running.mark("during")
        codes = mesh.stop_service("model_a", 2)  # SIGTERM: NOT_SERVING, drain, exit
        running.wait_for(PER_PHASE)
        mesh.restart_service("model_a", 2)
        running.mark("after")
        running.wait_for(PER_PHASE)
    phases = running.report("model_a-2 drained (SIGTERM) under load, then started again")
    assert codes == [0]
    assert_clean(phases)
