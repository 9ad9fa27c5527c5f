"""Payload capture without processes: the spec's ``capture:``, the writer's queue, retention."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from jobs.store import Store
from orchestrator.capture import Capture, CaptureWriter, StoreSink, captured_tensors
from orchestrator.graph.engine import Engine
from orchestrator.spec import CaptureSpec, SpecError, parse_spec
from services.common.errors import InvalidInput
from tests.support import ROOT
from tests.unit.fakes import digits_stages


def spec_with(capture: object, *, step: bool = False) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "demo/mesh.yaml").read_text())
    graph = spec["graphs"]["digits-serial"]
    (graph["steps"][1] if step else graph)["capture"] = capture
    return spec


def test_capture_is_parsed_on_graphs_and_steps() -> None:
    spec = parse_spec(spec_with({"rate": 0.25, "tensors": ["image", "label"], "max_bytes": 4096}))
    assert spec.graphs["digits-serial"].capture == CaptureSpec(0.25, True, True, ("image", "label"), 4096)
    assert parse_spec(spec_with(True)).graphs["digits-serial"].capture == CaptureSpec()
    step = next(parse_spec(spec_with({"outputs": False}, step=True)).graphs["digits-serial"].model_steps())
    assert step.capture is None  # the first step; the second one captures
    steps = list(parse_spec(spec_with({"outputs": False}, step=True)).graphs["digits-serial"].model_steps())
    assert steps[1].capture == CaptureSpec(outputs=False)


@pytest.mark.parametrize(
    ("capture", "message"),
    [
        ({"rate": 1.5}, "rate must be a number from 0 to 1"),
        ({"rate": "all"}, "rate must be a number from 0 to 1"),
        ({"rates": 0.1}, "unknown key 'rates' in capture (did you mean 'rate'?)"),
        ({"inputs": False, "outputs": False}, "capture keeps neither inputs nor outputs"),
        ({"max_bytes": 0}, "max_bytes must be a positive integer"),
        ({"tensors": ["imgae"]}, "unknown tensor(s) imgae"),
        ("yes please", "capture must be a mapping"),
    ],
)
def test_bad_capture_is_refused_naming_the_problem(capture: object, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec_with(capture))
    assert message in str(caught.value)
    assert "digits-serial" in str(caught.value)


def test_tensors_are_selected_and_capped_by_size() -> None:
    image = np.zeros((1, 8, 8), np.uint8)
    probabilities = np.zeros((1, 10), np.float32)
    kept, truncated = captured_tensors(
        CaptureSpec(tensors=("image", "probabilities")), {"image": image}, {"probabilities": probabilities}
    )
    assert set(kept) == {"input.image", "output.probabilities"} and not truncated
    kept, truncated = captured_tensors(CaptureSpec(max_bytes=63), {"image": image}, None)
    assert kept == {} and truncated


def record(i: int) -> Capture:
    return Capture("g", "", "", "g", "", f"r{i}", "", float(i), 0.001, "OK", {"input.x": np.array([i])})


class BlockingSinkFake:
    """A store that blocks until released, recording what it was given."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.written: list[Capture] = []

    def __call__(self, records: Sequence[Capture]) -> None:
        self.release.wait(30)
        self.written.extend(records)


def test_a_full_queue_drops_and_counts_and_close_writes_the_rest() -> None:
    sink, dropped = BlockingSinkFake(), []
    writer = CaptureWriter(sink, capacity=3, batch=2, on_drop=lambda reason, n: dropped.append((reason, n)))
    accepted = sum(writer.offer(record(i)) for i in range(20))  # never blocks
    assert accepted + len(dropped) == 20
    assert accepted <= 3 + 2  # the queue, and at most one batch the thread took
    assert all(reason == "queue_full" for reason, _ in dropped)
    assert writer.pending == accepted
    sink.release.set()
    writer.close()
    assert len(sink.written) == accepted and writer.pending == 0


def test_a_failing_store_counts_its_records_as_dropped() -> None:
    def broken(records: Sequence[Capture]) -> None:
        raise OSError("disk full")

    dropped: list[tuple[str, int]] = []
    writer = CaptureWriter(broken, on_drop=lambda reason, n: dropped.append((reason, n)))
    for i in range(5):
        writer.offer(record(i))
    writer.close()
    assert sum(n for reason, n in dropped if reason == "store") == 5


def test_retention_by_age_and_count(tmp_path: Path) -> None:
    now = [1000.0]
    with Store(str(tmp_path / "s.sqlite"), clock=lambda: now[0]) as store:
        store.write_captures([record(i) for i in range(0, 1000, 100)])  # captured_at 0, 100, ... 900
        assert store.prune_captures(max_age=450) == 6  # captured before 550
        assert [r.captured_at for r in store.read_captures()] == [600.0, 700.0, 800.0, 900.0]
        assert store.prune_captures(max_records=2) == 2
        assert [r.request_id for r in store.read_captures(since=0, until=900)] == ["r800"]
        assert store.count_captures() == 2


def test_the_store_sink_applies_retention_as_it_writes(tmp_path: Path) -> None:
    url = str(tmp_path / "s.sqlite")
    now = [0.0]
    sink = StoreSink(url, max_records=3, clock=lambda: now[0])
    sink([record(i) for i in range(5)])
    with Store(url) as store:
        assert [r.request_id for r in store.read_captures()] == ["r2", "r3", "r4"]
    sink([record(i) for i in range(5, 8)])  # within the minute: kept until the next pruning
    now[0] = 61.0
    sink([record(8)])
    with Store(url) as store:
        assert [r.request_id for r in store.read_captures()] == ["r6", "r7", "r8"]
    sink.close()


def test_the_engine_captures_a_failed_request_with_its_code_and_a_failed_step() -> None:
    spec = spec_with({"rate": 1.0})
    spec["graphs"]["digits-serial"]["steps"][2]["capture"] = True  # the head
    spec["graphs"] = {"digits-serial": spec["graphs"]["digits-serial"]}
    stages = digits_stages()
    stages["model_b"].fail("digits-head", InvalidInput("bad embedding"))
    records: list[Capture] = []
    engine = Engine(parse_spec(spec), stages, on_capture=records.append)
    image = np.zeros((1, 8, 8), np.uint8)
    with pytest.raises(InvalidInput):
        asyncio.run(engine.run("digits-serial", {"image": image}, deadline=None, request_id="q1"))
    assert [(r.step, r.status_code, r.request_id) for r in records] == [
        ("head", "INVALID_ARGUMENT", "q1"),
        ("", "INVALID_ARGUMENT", "q1"),
    ]
    assert set(records[0].tensors) == {"input.embedding"} and set(records[1].tensors) == {"input.image"}
    records.clear()
    result = asyncio.run(engine.run("digits-serial", {"image": image}, deadline=None, request_id="q2"))
    assert [(r.step, r.status_code, r.service, r.model) for r in records] == [
        ("head", "OK", "model_b", "digits-head"),
        ("", "OK", "", "digits-serial"),
    ]
    assert records[1].tensors["output.label"] is result.outputs["label"]  # no copy on the request path
