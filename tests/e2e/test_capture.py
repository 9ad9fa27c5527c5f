"""Payload capture end to end: real processes on 127.0.0.1, records read back from the store.

Every node runs as its own process (LocalMesh); the fixtures always stop them.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from demo import digits
from jobs import cli as jobs_cli
from jobs.store import Store
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from tests.e2e.capture_support import count, send
from tests.support import ROOT, metric_total, until

HOLDOUT = digits.load_holdout()
SAMPLED_RATE = 0.3
#: The small queue of the second mesh: a blocked store fills it at once.
SMALL_QUEUE = 4


def capture_spec(path: Path) -> Path:
    spec = yaml.safe_load((ROOT / "demo/mesh.yaml").read_text())
    graphs = spec["graphs"]
    graphs["digits-serial"]["capture"] = {"rate": 1.0}
    for step in graphs["digits-serial"]["steps"]:
        if step["name"] == "mlp":  # one step's answers, not what it was sent
            step["capture"] = {"rate": 1.0, "inputs": False, "tensors": ["embedding"]}
    graphs["digits-parallel"]["capture"] = {"rate": SAMPLED_RATE, "outputs": False}
    path.write_text(yaml.safe_dump(spec))
    return path


def start_mesh(tmp: Path, **env: str) -> LocalMesh:
    return LocalMesh(
        ports=EPHEMERAL_PORTS,
        graphs=capture_spec(tmp / "graphs.yaml"),
        extra_args={"orchestrator": ["--metrics-port", "0"]},
        env={"ONNXMESH_CAPTURE_DB": str(tmp / "captures.sqlite"), **env},
    ).start()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, Path]]:
    tmp = tmp_path_factory.mktemp("capture")
    running = start_mesh(tmp)
    try:
        yield running, tmp / "captures.sqlite"
    finally:
        running.stop()


def test_records_equal_what_the_client_sent_and_received(mesh: tuple[LocalMesh, Path]) -> None:
    running, db = mesh
    images = list(HOLDOUT.images[:40])
    answers = send(running.address("orchestrator"), "digits-serial", images)
    until(lambda: count(db, "digits-serial") >= 40, "the graph's records", timeout=30)
    until(lambda: count(db, "digits-serial", "mlp") >= 40, "the step's records", timeout=30)
    with Store(str(db)) as store:
        records = {r.request_id: r for r in store.read_captures(graph="digits-serial", step="")}
        steps = store.read_captures(graph="digits-serial", step="mlp")
    assert sorted(records) == sorted(f"r{i}" for i in range(40))
    for i, (image, answer) in enumerate(zip(images, answers, strict=True)):
        record = records[f"r{i}"]
        assert (record.status_code, record.model, record.step) == ("OK", "digits-serial", "")
        assert record.latency > 0 and not record.truncated
        np.testing.assert_array_equal(np.asarray(record.tensors["input.image"]), image[None])
        np.testing.assert_array_equal(np.asarray(record.tensors["output.label"]), answer["label"])
        np.testing.assert_allclose(
            np.asarray(record.tensors["output.probabilities"]), answer["probabilities"], rtol=1e-6
        )
    for step in steps:  # only what the step's capture asked for
        assert set(step.tensors) == {"output.embedding"}
        assert (step.service, step.model, step.version) == ("model_a", "digits-mlp", "1")


def test_the_sampled_share_is_within_binomial_bounds(mesh: tuple[LocalMesh, Path]) -> None:
    running, db = mesh
    n = 400
    images = [HOLDOUT.images[i % len(HOLDOUT.images)] for i in range(n)]
    send(running.address("orchestrator"), "digits-parallel", images, concurrency=16)
    port = running.process("orchestrator").metrics_port
    assert port is not None
    # Every record accepted has been written before the count is read.
    until(lambda: metric_total(port, "onnxmesh_capture_pending") == 0, "the writer to catch up", timeout=30)
    captured = count(db, "digits-parallel")
    sigma = math.sqrt(n * SAMPLED_RATE * (1 - SAMPLED_RATE))
    # 5 sigma: a false failure about once in 3.5 million runs.
    assert abs(captured - n * SAMPLED_RATE) <= 5 * sigma, captured
    assert metric_total(port, "onnxmesh_capture_dropped_total") == 0


def test_export_to_parquet_reads_back(mesh: tuple[LocalMesh, Path], tmp_path: Path) -> None:
    running, db = mesh
    images = list(HOLDOUT.images[100:110])
    send(running.address("orchestrator"), "digits-serial", images, prefix="export")
    until(lambda: count(db, "digits-serial") >= 50, "the graph's records", timeout=30)
    out = tmp_path / "window.parquet"
    code = jobs_cli.main(
        ["capture", "export", "--db", str(db), "--graph", "digits-serial", "--step", "", "--out", str(out)]
    )
    assert code == 0
    table = pq.read_table(out)
    assert {"graph", "request_id", "trace_id", "captured_at", "latency", "status_code"} <= set(
        table.column_names
    )
    assert {"input.image", "output.label", "output.probabilities"} <= set(table.column_names)
    rows = table.to_pylist()
    assert len(rows) == count(db, "digits-serial")
    exported = {row["request_id"]: row for row in rows}
    for i, image in enumerate(images):
        np.testing.assert_array_equal(np.asarray(exported[f"export{i}"]["input.image"]), image[None])


def test_a_full_queue_drops_and_counts_without_failing_requests_and_a_kill_loses_only_the_queue(
    tmp_path: Path,
) -> None:
    running = start_mesh(tmp_path, ONNXMESH_CAPTURE_QUEUE=str(SMALL_QUEUE))
    db = tmp_path / "captures.sqlite"
    try:
        address = running.address("orchestrator")
        port = running.process("orchestrator").metrics_port
        assert port is not None
        send(address, "digits-serial", list(HOLDOUT.images[:2]), concurrency=1)  # creates the schema
        until(lambda: count(db, "digits-serial") == 2, "the first records", timeout=30)
        # Another writer holds the database: the capture writer blocks and its queue fills.
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            answers = send(address, "digits-serial", list(HOLDOUT.images[:60]), concurrency=4)
            assert len(answers) == 60  # every request answered, none failed
            dropped = metric_total(port, "onnxmesh_capture_dropped_total", reason="queue_full")
            # At most the queue and one batch taken from it (2 records per request: graph and step).
            assert dropped >= 2 * 60 - 2 * SMALL_QUEUE
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        # Now a steady stream, then the orchestrator is killed: only queued records may be lost.
        sent = 30
        send(address, "digits-serial", list(HOLDOUT.images[:sent]), concurrency=1)
        before = count(db, "digits-serial")
        offered_after = 2 * sent  # graph and step records of the stream
        dropped_total = metric_total(port, "onnxmesh_capture_dropped_total")
        running.kill_service("orchestrator")
    finally:
        running.stop()
    stored = count(db, "digits-serial") + count(db, "digits-serial", "mlp")
    assert before <= count(db, "digits-serial")
    expected = 2 * 2 + 2 * 60 + offered_after - dropped_total
    assert expected - 2 * SMALL_QUEUE <= stored <= expected
