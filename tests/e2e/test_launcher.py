"""The local mesh launcher with real processes on 127.0.0.1, free ports, always stopped.

Covers what `make run`, the e2e tests and the benchmark rely on: every node SERVING, a
preprocess -> model_a chain answering correctly, one service stopped while the others keep
serving, replicas, a clean stop with no process left, and a start-up failure that names the
service and stops the rest.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from demo.digits import load_holdout
from demo.topology import MODEL_SERVICES
from meshctl import cli
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from meshctl.process import REPO, MeshStartupError, replica_target
from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from tests.support import kill_group, until

pytestmark = pytest.mark.timeout(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _health(address: str) -> str:
    async def check() -> str:
        async with OipClient(address) as client:
            try:
                return await client.health(timeout=2.0)
            except MeshError as err:
                return err.code

    return asyncio.run(check())


def _classify(mesh: LocalMesh, images: np.ndarray, model_a_target: str | None = None) -> np.ndarray:
    """preprocess -> digits-mlp through OipClient, as the serial graph does it."""

    async def chain() -> np.ndarray:
        async with (
            OipClient(mesh.address("preprocess")) as pre,
            OipClient(model_a_target or mesh.address("model_a")) as model_a,
        ):
            features = await pre.infer("digits-preprocess", {"image": images}, timeout=5.0)
            result = await model_a.infer("digits-mlp", features.outputs, ["probabilities"], timeout=5.0)
        return np.asarray(np.argmax(result.outputs["probabilities"], axis=1))

    return asyncio.run(chain())


@pytest.fixture(scope="module")
def holdout() -> tuple[np.ndarray, np.ndarray]:
    holdout = load_holdout()
    return holdout.images, holdout.labels


@pytest.fixture
def logs() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def mesh(logs: io.StringIO) -> Iterator[LocalMesh]:
    """The three services on free ports, with their logs captured instead of printed."""
    with LocalMesh(ports=EPHEMERAL_PORTS, include_orchestrator=False, grace=2.0, echo=logs) as m:
        yield m
    assert not any(p.running for p in m.spawned)


def test_every_service_is_serving_on_its_bound_port(mesh: LocalMesh) -> None:
    assert [p.service for p in mesh.processes()] == list(MODEL_SERVICES)
    for proc in mesh.processes():
        assert proc.running and proc.port not in (None, 0)
        assert _health(proc.address) == "SERVING", proc


def test_logs_are_streamed_with_the_process_name(mesh: LocalMesh, logs: io.StringIO) -> None:
    text = logs.getvalue()
    for proc in mesh.processes():
        assert f"[{proc.name}] {proc.service} listening on {proc.address}" in text


def test_preprocess_then_model_a_classifies_held_out_digits(
    mesh: LocalMesh, holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = holdout
    assert _classify(mesh, images[:1])[0] == labels[0]
    batch = _classify(mesh, images[:100])
    assert (batch == labels[:100]).mean() >= 0.9


def test_stopping_one_service_leaves_the_others_serving(
    mesh: LocalMesh, holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    model_b = mesh.process("model_b")
    assert mesh.stop_service("model_b") == [0]  # drained and exited cleanly
    assert not _alive(model_b.pid)
    assert _health(model_b.address) == "UNAVAILABLE"
    for service in ("preprocess", "model_a"):
        assert _health(mesh.address(service)) == "SERVING"
    images, labels = holdout
    assert _classify(mesh, images[:1])[0] == labels[0]

    (restarted,) = mesh.restart_service("model_b")
    assert restarted.port == model_b.port and restarted.pid != model_b.pid
    assert _health(mesh.address("model_b")) == "SERVING"


def test_a_killed_service_is_reported_and_can_be_restarted(mesh: LocalMesh) -> None:
    before = mesh.process("model_a")
    assert mesh.kill_service("model_a") == [-signal.SIGKILL]
    assert _health(mesh.address("preprocess")) == "SERVING"
    mesh.restart_service("model_a")
    assert mesh.process("model_a").pid != before.pid
    assert _health(mesh.address("model_a")) == "SERVING"


def test_stop_leaves_no_process_running() -> None:
    mesh = LocalMesh(ports=EPHEMERAL_PORTS, include_orchestrator=False, grace=2.0)
    try:
        mesh.start()
        pids = [p.pid for p in mesh.processes()]
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
    finally:
        codes = mesh.stop()
    assert codes == {"preprocess-1": 0, "model_a-1": 0, "model_b-1": 0}
    assert not any(_alive(pid) for pid in pids)
    assert mesh.processes() == []


def test_startup_failure_names_the_service_and_stops_the_others(tmp_path: Path) -> None:
    mesh = LocalMesh(
        ports=EPHEMERAL_PORTS,
        include_orchestrator=False,
        model_dirs={"model_b": tmp_path / "missing"},
        grace=2.0,
        startup_timeout=30.0,
    )
    started = time.monotonic()
    with pytest.raises(MeshStartupError) as caught:
        mesh.start()
    assert time.monotonic() - started < 30.0
    err = caught.value
    assert err.name == "model_b-1"
    assert "model_b-1 failed to start: exited with code 1" in str(err)
    assert "does not exist" in str(err)  # its own last words, from its stderr
    assert len(mesh.spawned) == 3
    assert not any(_alive(p.pid) for p in mesh.spawned)


def test_a_busy_fixed_port_is_refused_before_starting(tmp_path: Path) -> None:
    with LocalMesh(ports=EPHEMERAL_PORTS, include_orchestrator=False, grace=2.0) as running:
        busy = running.process("model_a").port
        assert busy is not None
        second = LocalMesh(ports={**EPHEMERAL_PORTS, "model_a": busy}, include_orchestrator=False)
        with pytest.raises(MeshStartupError, match=f"port {busy} .* already in use"):
            second.start()
        assert not any(_alive(p.pid) for p in second.spawned)


def test_replicas_run_as_separate_processes(holdout: tuple[np.ndarray, np.ndarray]) -> None:
    with LocalMesh(
        ports=EPHEMERAL_PORTS, replicas={"model_a": 2}, include_orchestrator=False, grace=2.0
    ) as mesh:
        replicas = mesh.processes("model_a")
        assert [p.name for p in replicas] == ["model_a-1", "model_a-2"]
        assert len({p.pid for p in replicas}) == 2 and len({p.port for p in replicas}) == 2
        for proc in replicas:
            assert _health(proc.address) == "SERVING"
        target = mesh.target("model_a")
        assert target == "ipv4:" + ",".join(p.address for p in replicas)
        images, labels = holdout
        assert (_classify(mesh, images[:20], target) == labels[:20]).mean() >= 0.9

        extra = mesh.add_replica("model_a")
        assert extra.name == "model_a-3" and _health(extra.address) == "SERVING"
        mesh.stop_service("model_a", replica=1)
        assert _health(mesh.address("model_a", 2)) == "SERVING"


def test_replica_ports_and_targets_are_planned() -> None:
    assert replica_target("127.0.0.1", [8021]) == "127.0.0.1:8021"
    assert replica_target("127.0.0.1", [8021, 8022]) == "ipv4:127.0.0.1:8021,127.0.0.1:8022"
    with pytest.raises(ValueError, match="8031 is planned for both"):
        LocalMesh(replicas={"model_a": 11})
    with pytest.raises(ValueError, match="unknown service"):
        LocalMesh(replicas={"model_c": 2})


def start_launcher() -> tuple[subprocess.Popen[str], list[str], list[int]]:
    """`python -m meshctl.run` as `make run` runs it, in its own process group, up to its ready
    line: the process, the lines so far and its services' pids. The caller kills the group."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshctl.run", "--no-orchestrator", "--base-port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("onnxmesh ready:"):
                break
        assert lines and lines[-1].startswith("onnxmesh ready:"), "".join(lines)
    except BaseException:
        kill_group(proc)
        raise
    pids = [int(line.split(" pid ")[1]) for line in lines if line.startswith("  ") and " pid " in line]
    return proc, lines, pids


def test_make_run_entry_point_stops_everything_on_sigterm() -> None:
    """`python -m meshctl.run` as `make run` runs it: ready line, then SIGTERM, exit 0, no orphans."""
    proc, lines, pids = start_launcher()
    try:
        assert len(pids) == 3
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        orphans = [pid for pid in pids if _alive(pid)]  # before the cleanup below kills them
    finally:
        kill_group(proc)  # failed or not: the launcher and the services it started
    assert proc.returncode == 0, "".join(lines) + rest
    assert "onnxmesh: stopped cleanly (preprocess-1, model_a-1, model_b-1: drained, exit 0)" in rest
    assert orphans == []


def test_a_launcher_killed_with_sigkill_leaves_no_service_behind() -> None:
    """SIGKILL gives `python -m meshctl.run` no chance to stop its services: they follow it on
    their own (the parent-death signal), drain and exit, freeing their ports."""
    proc, _, pids = start_launcher()
    try:
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
        # Before the cleanup below, which would kill them itself.
        until(lambda: not any(_alive(pid) for pid in pids), "the services to follow their launcher", 30.0)
    finally:
        kill_group(proc)


def test_full_mesh_serves_the_graphs_through_the_orchestrator(
    holdout: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = holdout
    with LocalMesh(ports=EPHEMERAL_PORTS, replicas={"model_a": 2}, grace=2.0) as mesh:
        assert {"digits-serial", "digits-parallel", "digits-cascade"} <= set(mesh.served_graphs())

        async def parallel() -> dict[str, object]:
            async with OipClient(mesh.address("orchestrator")) as client:
                result = await client.infer("digits-parallel", {"image": images[:1]}, timeout=10.0)
            assert int(result.outputs["label"][0]) == labels[0]
            assert result.outputs["probabilities"].shape == (1, 10)
            return dict(result.parameters)

        steps = {k: v for k, v in asyncio.run(parallel()).items() if k.startswith("step.")}
        assert steps and all(v == "ok" for v in steps.values()), steps

        code = cli.main(
            ["predict", "digits-serial", "--target", mesh.address("orchestrator"), "--count", "20"]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "accuracy:" in out

        # model_b down: the parallel graph still answers from model_a and says which branch failed.
        mesh.stop_service("model_b")
        steps = {k: v for k, v in asyncio.run(parallel()).items() if k.startswith("step.")}
        assert any(str(v).startswith("error") for v in steps.values()), steps
