"""`python -m bench` end to end on a tiny run: real processes, every report file, the right shape.

No timed assertions: the numbers depend on the machine. What must hold anywhere is that every
mode answered every request correctly (zero errors, labels mostly right), that every ratio the
report promises is there, and that nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from bench.load import procstat
from bench.load.pyspy import parse_collapsed, summarize
from bench.report import analysis
from meshctl.launcher import DEMO_MESH as DEFAULT_GRAPHS
from orchestrator.spec import load_spec
from tests.support import ROOT, kill_group

pytestmark = pytest.mark.timeout(180)

TINY = ["--quick", "--warmup", "0.2", "--duration", "0.3", "--concurrency", "1,2"]
TINY += ["--graphs", "digits-serial", "--skip-large", "--growth-steps", "2"]
TAG_VARIABLE = "ONNXMESH_BENCH_TEST_RUN"
#: floor x2 + floor digits-mlp, all-in-one x2, minimal x2 (and x2 on grpc.aio), mesh x2 + model_a
#: direct; then the growth
#: mesh: chain-1, chain-2, fanout-1, fanout-2 at c=1 and the cached graph at both concurrencies.
EXPECTED_POINTS = {
    ("minimal", "digits-serial", 1),
    ("minimal", "digits-serial", 2),
    ("minimal aio", "digits-serial", 1),
    ("minimal aio", "digits-serial", 2),
    ("mesh", "chain-1", 1),
    ("mesh", "chain-2", 1),
    ("mesh", "fanout-1", 1),
    ("mesh", "fanout-2", 1),
    ("mesh", "digits-serial-cached", 1),
    ("mesh", "digits-serial-cached", 2),
    ("floor", "digits-serial", 1),
    ("floor", "digits-serial", 2),
    ("floor", "digits-mlp", 1),
    ("all-in-one", "digits-serial", 1),
    ("all-in-one", "digits-serial", 2),
    ("mesh", "digits-serial", 1),
    ("mesh", "digits-serial", 2),
    ("model_a direct", "digits-mlp", 1),
}


def _tagged(tag: str) -> set[int]:
    """Pids whose environment holds `tag`: every process the benchmark started inherits it."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    tag = uuid.uuid4().hex
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", *TINY, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, TAG_VARIABLE: tag},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=150)
        leaked = _tagged(tag)
    finally:
        # Passed, failed or timed out: the bench's group, then anything it started elsewhere.
        kill_group(bench)
        for pid in _tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert leaked == set(), "the benchmark left processes running"
    return out, json.loads((out / "report.json").read_text()), stdout


def test_writes_every_report_file(run: tuple[Path, dict[str, Any], str]) -> None:
    out, _, stdout = run
    assert (out / "report.md").stat().st_size > 0
    assert (out / "latency_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratios (mesh / minimal | mesh / all-in-one | mesh / floor)" in stdout


def test_every_point_answered_correctly(run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = run
    points = data["points"]
    assert {(p["mode"], p["model"], p["concurrency"]) for p in points} == EXPECTED_POINTS
    for p in points:
        assert p["errors"] == 0, p
        assert p["requests"] > 0 and p["rps"] > 0
        assert p["accuracy"] > 0.9, p  # the models' held-out accuracy is about 0.96
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"]
        assert p["server_cpu_per_request_s"] > 0
        assert 0 <= p["other_load"] <= 1
        if p["mode"] == "floor":
            assert p["loadgen_cpu_s"] is None
        else:
            assert 0 < p["loadgen_cpu_share"] < 1
    mesh = [p for p in points if p["mode"] == "mesh"]
    assert set(mesh[0]["server_cpu_by_process_s"]) == {"preprocess", "model_a", "model_b", "orchestrator"}
    assert all(p["orchestrator_overhead_ms"] > 0 and p["orchestrator_cpu_per_request_s"] > 0 for p in mesh)
    # Every mesh point counted its downstream calls (the rows-per-call histogram), the cached graph
    # its lookups.
    assert all(p["rows_per_call"] >= 1.0 for p in mesh if p["model"] != "digits-serial-cached")
    cached = [p for p in mesh if p["model"] == "digits-serial-cached"]
    assert all(p["cache_hits"] + p["cache_misses"] > 0 for p in cached)


def test_ratios_hops_and_targets_are_reported(run: tuple[Path, dict[str, Any], str]) -> None:
    out, data, _ = run
    assert set(data) >= {
        "meta",
        "servers",
        "points",
        "ratios",
        "hops",
        "raw_hop",
        "coalescing",
        "grpc_servers",
        "growth",
        "cache",
        "batching",
        "targets",
        "profile",
    }
    assert data["meta"]["machine"]["cores"] >= 1 and data["meta"]["versions"]["grpcio"]
    assert data["meta"]["code"]["commit"]
    assert set(data["servers"]["small mesh"]) == {"preprocess", "model_a", "model_b", "orchestrator"}
    assert set(data["servers"]["growth mesh"]) == {"preprocess", "model_a", "model_b", "orchestrator"}
    assert "bench.targets.all_in_one" in data["servers"]["small all-in-one"]["all_in_one"]
    assert "bench.targets.minimal" in data["servers"]["small minimal"]["minimal"]
    assert len(data["ratios"]) == 2
    for ratio in data["ratios"]:
        for against in ("mesh_vs_minimal", "mesh_vs_all_in_one", "mesh_vs_floor"):
            assert all(v is not None and v > 0 for v in ratio[against].values()), ratio
    assert [(h["concurrency"], h["extra_calls"], h["sequential"]) for h in data["hops"]] == [
        (1, 3, 3),
        (2, 3, 3),
    ]
    assert data["raw_hop"]["hop_p50_ms"] is not None
    assert [(r["concurrency"], r["downstream_calls"] > 0) for r in data["coalescing"]] == [
        (1, True),
        (2, True),
    ]
    assert all(r["cpu_per_request_ms"] > 0 and r["p99_vs_minimal"] > 0 for r in data["coalescing"])
    assert [r["concurrency"] for r in data["grpc_servers"]] == [1, 2]
    assert all(r["aio_vs_sync_cpu"] > 0 for r in data["grpc_servers"])
    for shape in ("chain", "fanout"):
        part = data["growth"][shape]
        assert [r["n"] for r in part["rows"]] == [1, 2] and part["concurrency"] == 1
        assert part["rows"][0]["added_p50_ms"] is None and part["rows"][1]["added_p50_ms"] is not None
        assert part["p50_ms_per_step"] is not None and part["cpu_ms_per_step"] is not None
        assert all(r["cpu_per_request_ms"] > 0 for r in part["rows"])
    assert [r["concurrency"] for r in data["cache"]] == [1, 2]
    for row in data["cache"]:
        assert 0 <= row["hit_ratio"] <= 1 and row["minimal_p50_ms"] > 0 and row["uncached_p50_ms"] > 0
    targets = {t["id"]: t for t in data["targets"]}
    assert sorted(targets) == list(range(1, 11))
    assert all(isinstance(targets[i]["met"], bool) and targets[i]["checks"] for i in range(1, 10))
    assert targets[10]["met"] is None  # no large model in this run
    markdown = (out / "report.md").read_text()
    for heading in (
        "## Targets",
        "## Main table",
        "## Ratios",
        "## What a hop costs",
        "## gRPC servers: sync grpcio vs grpc.aio",
        "## Coalescing: rows per downstream call",
        "## How cost grows: serial steps and parallel branches",
        "## Response cache",
        "## The load generator",
        "## Run quality and what ran",
    ):
        assert heading in markdown
    for mode in ("floor", "all-in-one", "minimal", "mesh"):
        for c in (1, 2):
            assert f"| small | digits-serial | {mode} | {c} |" in markdown


def test_hops_follow_the_graphs() -> None:
    spec = load_spec(DEFAULT_GRAPHS)
    assert analysis.hops_of(spec.graphs["digits-serial"]) == {"extra_calls": 3, "sequential": 3}
    assert analysis.hops_of(spec.graphs["digits-parallel"]) == {"extra_calls": 3, "sequential": 2}


def test_profile_summary_counts_self_and_total() -> None:
    stacks = parse_collapsed(
        [
            "main (a.py:1);Engine.run (orchestrator/graph/engine.py:10);infer (services/common/grpc/client.py:5) 3\n",
            "main (a.py:1);send (services/common/grpc/client.py:9);sendmsg (libc.so.6) 2\n",
            "main (a.py:1);Engine.run (orchestrator/graph/engine.py:12) 1\n",
            "garbage line\n",
        ]
    )
    summary = summarize(stacks)
    assert summary["samples"] == 6
    assert summary["self"][0] == {
        "name": "infer (services/common/grpc/client.py)",
        "samples": 3,
        "percent": 50.0,
    }
    assert {"name": "Engine.run (orchestrator/graph/engine.py)", "samples": 4, "percent": 400 / 6} in summary[
        "total"
    ]
    areas = {a["name"]: a["samples"] for a in summary["areas"]}
    assert areas == {
        "ours: OIP client (services/common/grpc/client.py)": 3,
        "system calls: socket send / recv / write": 2,
        "ours: engine (orchestrator/graph/engine.py)": 1,
    }
    # A native leaf is charged to the Python function that called into it.
    assert {"name": "send (services/common/grpc/client.py)", "samples": 2, "percent": 200 / 6} in summary[
        "python"
    ]


def test_procstat_sees_this_process_work() -> None:
    before = procstat.snapshot({"me": os.getpid()})
    # 0.1 s of CPU by the kernel's precise clock: ten /proc ticks, so the tick counters must move.
    spent = time.process_time()
    while time.process_time() - spent < 0.1:
        sum(i * i for i in range(10_000))
    after = procstat.snapshot({"me": os.getpid()})
    used = procstat.usage(before, after)
    assert used.seconds["me"] > 0 and 0 <= used.machine_busy <= 1  # it did work
    assert procstat.process_cpu_seconds(2**22 + 12345) == 0.0  # no such process
