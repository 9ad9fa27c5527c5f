"""Batch serving: the held-out digits through a graph into the store, equal to the online
answers; killed with SIGKILL and resumed (exactly one row per input); failed rows recorded and
retried. Every test runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.batch import BatchConfig, BatchRunner, Summary
from jobs.store import FAILED, OK, Store
from meshctl.launcher import LocalMesh
from services.common.errors import Unavailable
from services.common.grpc.client import OipClient
from tests.jobs.conftest import GRAPH
from tests.jobs.support import HOLDOUT, REPO, holdout, online_answers
from tests.support import free_port, kill_group, until


def run(config: BatchConfig, target: str, db_url: str) -> Summary:
    async def go() -> Summary:
        async with OipClient(target) as client:
            with Store(db_url) as store:
                return await BatchRunner(config, client, store).run()

    return asyncio.run(go())


def stored_answers(db_url: str, dataset: str, graph: str = GRAPH) -> dict[str, tuple[str, object]]:
    with Store(db_url) as store:
        return {p.row_key: (p.status, p.outputs) for p in store.read_predictions(dataset, graph)}


def answers(target: str) -> bool:
    """The graph answers one image (False while a step is UNAVAILABLE)."""
    try:
        online_answers(target, GRAPH, holdout()[0][:1])
    except Unavailable:
        return False
    return True


def test_a_batch_with_the_mesh_down_fails_at_once_and_stores_nothing(tmp_path: Path, db_url: str) -> None:
    images, _ = holdout()
    np.save(tmp_path / "few.npy", images[:8])
    config = BatchConfig(GRAPH, tmp_path / "few.npy", progress="off")
    with pytest.raises(Unavailable, match=r"127\.0\.0\.1"):
        run(config, f"127.0.0.1:{free_port()}", db_url)  # nothing listens there
    assert stored_answers(db_url, "few") == {}


def test_rows_failed_while_a_step_is_down_are_recorded_and_retried(
    tmp_path: Path, mesh: LocalMesh, orchestrator: str, online: tuple[np.ndarray, np.ndarray], db_url: str
) -> None:
    images, _ = holdout()
    images = images[:50].copy()
    images[7, 0, 0] = 17  # a bad row, among good ones
    np.save(tmp_path / "few.npy", images)
    config = BatchConfig(GRAPH, tmp_path / "few.npy", rows_per_request=8, retries=1, progress="off")
    # The orchestrator answers, but the first step of the graph is gone: every row fails.
    assert mesh.stop_service("preprocess") == [0]
    try:
        down = run(config, orchestrator, db_url)
    finally:
        mesh.restart_service("preprocess")  # the session's mesh, as the other tests found it
    # SERVING is the new process's word; the orchestrator's channel to it reconnects on its own
    # back-off timer: the next run is once the graph answers again.
    until(lambda: answers(orchestrator), "the orchestrator to reach preprocess again")
    assert (down.predicted, down.failed) == (0, 50)
    with Store(db_url) as store:
        failed = store.read_predictions("few", GRAPH)
    assert len(failed) == 50 and {(p.status, p.error_code) for p in failed} == {(FAILED, "UNAVAILABLE")}
    up = run(config, orchestrator, db_url)
    assert (up.already_done, up.predicted, up.failed) == (0, 49, 1)
    with Store(db_url) as store:
        by_key = {p.row_key: p for p in store.read_predictions("few", GRAPH)}
    assert by_key["7"].status == FAILED and by_key["7"].error_code == "INVALID_ARGUMENT"
    assert "pixel values must be 0..16" in (by_key["7"].error_message or "")
    row = by_key["8"]
    assert row.status == OK and row.attempts == 2 and row.versions["mlp"] == "1"
    assert row.outputs["label"] == online[0][8]  # type: ignore[index]


def test_batch_over_the_heldout_digits_equals_the_online_answers(
    orchestrator: str, online: tuple[np.ndarray, np.ndarray], db_url: str
) -> None:
    labels, probabilities = online
    path = HOLDOUT
    summary = run(
        BatchConfig(GRAPH, path, rows_per_request=32, concurrency=4, progress="off"), orchestrator, db_url
    )
    assert (summary.total, summary.predicted, summary.failed) == (360, 360, 0)
    with Store(db_url) as store:
        rows = {int(p.row_key): p for p in store.read_predictions("digits-holdout", GRAPH)}
    assert sorted(rows) == list(range(360))
    got_labels = np.array([rows[i].outputs["label"] for i in range(360)])  # type: ignore[index]
    got_probs = np.array([rows[i].outputs["probabilities"] for i in range(360)], np.float32)  # type: ignore[index]
    np.testing.assert_array_equal(got_labels, labels)
    # Rows computed 32 at a time may differ from one-row requests in the last float bits only.
    np.testing.assert_allclose(got_probs, probabilities, rtol=1e-5, atol=1e-7)
    assert {rows[0].versions["mlp"], rows[0].model_version} == {"1"}
    again = run(BatchConfig(GRAPH, path, progress="off"), orchestrator, db_url)
    assert (again.already_done, again.predicted, again.requests) == (360, 0, 0)


def _batch_command(db_url: str, dataset: Path, orchestrator: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs", "batch", GRAPH, str(dataset), "--db", db_url, "--key", "id",
        "--target", orchestrator, "--progress", "plain", *extra,
    ]  # fmt: skip


def test_a_run_killed_midway_resumes_with_exactly_one_row_per_input(
    tmp_path: Path, orchestrator: str, online: tuple[np.ndarray, np.ndarray], db_url: str
) -> None:
    images, _ = holdout()
    repeats = 20
    ids = np.array([f"r{i:05d}" for i in range(len(images) * repeats)])
    dataset = tmp_path / "digits-x20.npz"
    np.savez(dataset, image=np.tile(images, (repeats, 1, 1)), id=ids)
    total = len(ids)
    # A rate limit makes the run last a few seconds, so the kill lands mid-way.
    first = subprocess.Popen(
        _batch_command(db_url, dataset, orchestrator, "--rate", "2500", "--rows-per-request", "16"),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    store = Store(db_url)
    try:

        def written() -> int:
            return store.prediction_counts("digits-x20", GRAPH).get(OK, 0)

        until(lambda: written() >= total // 4 or first.poll() is not None, "a quarter of the rows", 60)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        at_kill = written()
        assert total // 4 <= at_kill < total
        before = {p.row_key: p.predicted_at for p in store.read_predictions("digits-x20", GRAPH)}

        started = time.monotonic()
        second = subprocess.run(
            _batch_command(db_url, dataset, orchestrator, "--rows-per-request", "32"),
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        resume_s = time.monotonic() - started
        assert second.returncode == 0, second.stdout + second.stderr
        done = int(re.search(r"already predicted: (\d+)", second.stdout)[1])  # type: ignore[index]
        now = int(re.search(r"predicted now: +(\d+)", second.stdout)[1])  # type: ignore[index]
        assert (done, now) == (at_kill, total - at_kill), second.stdout
        rows = store.read_predictions("digits-x20", GRAPH)
        assert len(rows) == total and len({p.row_key for p in rows}) == total
        assert {p.status for p in rows} == {OK}
        # Nothing predicted twice: the rows of the killed run were not written again.
        assert all(p.predicted_at == before[p.row_key] for p in rows if p.row_key in before)
        labels = online[0]
        assert all(p.outputs["label"] == labels[int(p.row_key[1:]) % len(images)] for p in rows)  # type: ignore[index]
        print(
            f"\nkilled at {at_kill}/{total} rows; resume predicted {now} rows in {resume_s:.2f} s (incl. start-up)"
        )
    finally:
        kill_group(first)
        store.close()


def test_a_failed_row_is_recorded_and_retried_on_the_next_run(
    tmp_path: Path, orchestrator: str, online: tuple[np.ndarray, np.ndarray], db_url: str
) -> None:
    images, _ = holdout()
    batch = images[:40].copy()
    batch[13, 4, 4] = 17  # out of 0..16: the preprocessor refuses it
    path = tmp_path / "forty.npy"
    np.save(path, batch)
    config = BatchConfig(GRAPH, path, rows_per_request=16, progress="off")
    summary = run(config, orchestrator, db_url)
    assert (summary.predicted, summary.failed) == (39, 1)
    with Store(db_url) as store:
        bad = next(p for p in store.read_predictions("forty", GRAPH) if p.row_key == "13")
    assert bad.status == FAILED and bad.error_code == "INVALID_ARGUMENT"
    assert "13" not in {k for k, (s, _) in stored_answers(db_url, "forty").items() if s == OK}
    assert bad.error_message and "image" in bad.error_message

    batch[13] = images[13]  # the data is fixed upstream; the next scheduled run picks the row up
    np.save(path, batch)
    retried = run(config, orchestrator, db_url)
    assert (retried.already_done, retried.predicted, retried.failed, retried.requests) == (39, 1, 0, 1)
    with Store(db_url) as store:
        fixed = next(p for p in store.read_predictions("forty", GRAPH) if p.row_key == "13")
    assert fixed.status == OK and fixed.attempts == 2 and fixed.outputs["label"] == online[0][13]  # type: ignore[index]
