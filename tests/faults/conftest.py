"""One mesh for the whole fault suite: real processes on 127.0.0.1, two model_a replicas, the
launcher restarting what exits on its own. Each scenario leaves it as it found it (a frozen node
thawed, a stopped one started again), and the fixture always stops every process."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from demo import digits
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from tests.faults.load import FIGURES, reference_labels

#: The images every scenario sends, and the label the calm mesh answers for each.
IMAGES = digits.load_holdout().images[:64]


@pytest.fixture(scope="package")
def logs() -> io.StringIO:
    return io.StringIO()


@pytest.fixture(scope="package")
def mesh(logs: io.StringIO) -> Iterator[LocalMesh]:
    with LocalMesh(
        ports=EPHEMERAL_PORTS,
        replicas={"model_a": 2},
        grace=2.0,
        echo=logs,
        restart=True,
        log_level="WARNING",
        extra_args={"orchestrator": ["--metrics-port", "0"]},
    ) as running:
        yield running
    assert not any(p.running for p in running.spawned)


@pytest.fixture(scope="package")
def labels(mesh: LocalMesh) -> dict[str, list[int]]:
    target = mesh.address("orchestrator")
    return {g: reference_labels(target, g, IMAGES) for g in ("digits-serial", "digits-parallel")}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures of every scenario that ran (sent, failed by code, p50/p99 per phase)."""
    if FIGURES:
        terminalreporter.section("fault suite figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
