"""The benchmark report's targets and tables, from points of made-up numbers (no server started)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.report import analysis, write
from meshctl.launcher import DEMO_MESH
from orchestrator.spec import load_spec

LOW, HIGH = 1, 32


def point(
    mode: str,
    model: str,
    c: int,
    *,
    config: str = "small",
    rps: float = 1000.0,
    p50: float = 1.0,
    p99: float = 2.0,
    cpu_ms: float = 0.5,
    orchestrator_ms: float | None = None,
    rows_per_call: float | None = None,
    calls: int | None = None,
    cache_hits: int | None = None,
) -> dict[str, Any]:
    """One point row, shaped as `bench.runner.point_row` returns it."""
    return {
        "mode": mode,
        "config": config,
        "model": model,
        "concurrency": c,
        "requests": 1000,
        "rps": rps,
        "p50_ms": p50,
        "p90_ms": (p50 + p99) / 2,
        "p99_ms": p99,
        "errors": 0,
        "wrong": 0,
        "accuracy": 1.0,
        "server_cpu_per_request_s": cpu_ms / 1000.0,
        "orchestrator_cpu_per_request_s": None if orchestrator_ms is None else orchestrator_ms / 1000.0,
        "orchestrator_overhead_ms": None if orchestrator_ms is None else orchestrator_ms / 10,
        "loadgen_cpu_per_request_s": 0.0002,
        "loadgen_cpu_share": 0.2,
        "loadgen_core_utilization": 0.5,
        "machine_busy": 0.9,
        "other_load": 0.01,
        "downstream_calls": calls,
        "rows_per_call": rows_per_call,
        "cache_hits": cache_hits,
        "cache_misses": None if cache_hits is None else 0,
    }


def mesh(model: str, c: int, **figures: Any) -> dict[str, Any]:
    return point("mesh", model, c, calls=3000, **figures)


def whole_run() -> list[dict[str, Any]]:
    """A run where each target is met or missed on purpose (the comments say which and why)."""
    serial, parallel = "digits-serial", "digits-parallel"
    return [
        point("floor", "digits-mlp", 1, p50=0.1),
        point("minimal", serial, 1, p50=0.5, p99=0.7, cpu_ms=0.4, rps=2000),
        point("minimal", serial, 32, p50=8.0, p99=13.0, cpu_ms=0.25, rps=4000),
        point("minimal aio", serial, 1, cpu_ms=0.35),
        point("minimal", parallel, 1, p50=0.5, cpu_ms=0.4),
        point("minimal", parallel, 32, p99=16.0, cpu_ms=0.3, rps=3000),
        # 1: 0.42 / 0.4 = 1.05x the sync server's (met); 1.2x the grpc.aio one's (reference only).
        point("model_a direct", "digits-mlp", 1, p50=0.5, cpu_ms=0.42),
        # 5: serial 3.0x (met), parallel 4.0x (missed); 6: one row per call at c=1 (met).
        mesh(serial, 1, p50=1.5, cpu_ms=3.0, orchestrator_ms=1.4, rows_per_call=1.0),
        mesh(parallel, 1, p50=2.0, cpu_ms=2.6, orchestrator_ms=1.2, rows_per_call=1.0),
        # 2: 0.2 / 0.25 = 0.8x (met; parallel's 1.67x is reference only); 3: 1.5x (met); 4: 0.75x
        # (met); 6: p99 20 / 13 = 1.54x (met).
        mesh(serial, 32, rps=3000, p99=20.0, cpu_ms=0.375, orchestrator_ms=0.2, rows_per_call=4.0),
        # 3: 2.0x (missed); 4: 1.1x (met, and the moonshot); 6: p99 2.5x (missed).
        mesh(parallel, 32, rps=3300, p99=40.0, cpu_ms=0.6, orchestrator_ms=0.5, rows_per_call=5.0),
        # 7: 0.05 ms per branch = 5 % of fanout-1's p50 (met); 8: 0.5 ms per step vs 1.2 x the raw hop
        # (model_a 0.5 - floor 0.1 = 0.4 ms) = 0.48 ms (missed).
        *(point("mesh", f"fanout-{n}", 1, config="growth", p50=1.0 + 0.05 * (n - 1)) for n in (1, 2, 3)),
        *(point("mesh", f"chain-{n}", 1, config="growth", p50=1.0 + 0.5 * (n - 1)) for n in (1, 2, 3)),
        # 9: a hit's p50 1.1x the minimal's (met).
        point("mesh", "digits-serial-cached", 1, config="growth", p50=0.55, cache_hits=100),
        # 10: batching 2.5x (met) on model_a; the graph's 1.0x is reference only.
        point("model_a direct", "digits-mlp", 32, config="large", rps=600),
        point("model_a direct", "digits-mlp", 32, config="large+batching", rps=1500),
        point("mesh", serial, 32, config="large", rps=500),
        point("mesh", serial, 32, config="large+batching", rps=500),
    ]


def by_id(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in analysis.targets(rows, LOW, HIGH)}


def test_each_target_is_judged_on_its_points() -> None:
    targets = by_id(whole_run())
    assert {i: t["met"] for i, t in targets.items()} == {
        1: True,
        2: True,
        3: False,
        4: True,
        5: False,
        6: False,
        7: True,
        8: False,
        9: True,
        10: True,
    }
    node = targets[1]["checks"]
    assert [(c["value"], c["counts"]) for c in node] == [
        (pytest.approx(1.05), True),
        (pytest.approx(0.42 / 0.35), False),
    ]
    orchestrator = targets[2]["checks"]
    assert [(c["model"], c["value"], c["counts"]) for c in orchestrator] == [
        ("digits-serial", pytest.approx(0.8), True),
        ("digits-parallel", pytest.approx(0.5 / 0.3), False),
    ]
    assert [c["value"] for c in targets[3]["checks"]] == [pytest.approx(1.5), pytest.approx(2.0)]
    throughput = targets[4]["checks"]
    assert [c["value"] for c in throughput] == [pytest.approx(0.75), pytest.approx(1.1)]
    assert "moonshot 1.0x not reached" in throughput[0]["text"]
    assert "moonshot 1.0x reached" in throughput[1]["text"]
    assert [c["value"] for c in targets[5]["checks"]] == [pytest.approx(3.0), pytest.approx(4.0)]
    depth = {c["model"]: c for c in targets[6]["checks"]}
    assert depth["digits-serial c=1"]["met"] and depth["digits-parallel c=1"]["met"]
    assert depth["digits-serial p99"]["value"] == pytest.approx(20.0 / 13.0)
    assert not depth["digits-parallel p99"]["met"]
    assert "at 5.00 rows per downstream call" in depth["digits-parallel p99"]["text"]
    assert targets[7]["checks"][0]["value"] == pytest.approx(0.05)
    assert targets[8]["checks"][0]["value"] == pytest.approx(0.5 / 0.4)
    assert [c["counts"] for c in targets[10]["checks"]] == [True, False]


def test_a_lone_request_that_waited_misses_the_depth_target() -> None:
    rows = [mesh("digits-serial", 1, rows_per_call=1.001)]
    depth = by_id(rows)[6]
    assert depth["met"] is False
    assert "3003 rows in 3000 downstream calls" in depth["checks"][0]["text"]


def test_targets_whose_points_did_not_run_say_not_measured() -> None:
    # A partial run: no minimal server, no growth, no large model; only the mesh at c=1.
    targets = by_id([mesh("digits-serial", 1, rows_per_call=1.0)])
    assert [i for i, t in targets.items() if t["met"] is None] == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert all(not targets[i]["checks"] for i in (1, 2, 3, 4, 5, 7, 8, 9, 10))
    # Only a reference measured (the grpc.aio server, not the sync one): still n/a.
    only_aio = [point("model_a direct", "digits-mlp", 1), point("minimal aio", "digits-serial", 1)]
    assert by_id(only_aio)[1]["met"] is None and len(by_id(only_aio)[1]["checks"]) == 1


def test_coalescing_rows_carry_cpu_and_p99_beside_the_minimals() -> None:
    rows = analysis.coalescing(whole_run())
    assert [(r["model"], r["concurrency"]) for r in rows] == [
        ("digits-serial", 1),
        ("digits-parallel", 1),
        ("digits-serial", 32),
        ("digits-parallel", 32),
    ]
    last = rows[-1]
    assert last["rows_per_call"] == 5.0 and last["cpu_per_request_ms"] == pytest.approx(0.6)
    assert last["minimal_p99_ms"] == 16.0 and last["p99_vs_minimal"] == pytest.approx(2.5)


def report_data(rows: list[dict[str, Any]]) -> dict[str, Any]:
    meta = {
        "machine": {"cores": 2, "cpu_model": "test CPU", "kernel": "6.0"},
        "versions": {"python": "3.11"},
        "command": "python -m bench",
        "code": {"commit": "abc", "modified": []},
        "started": "2026-01-01 00:00:00 UTC",
        "elapsed_s": 1.0,
        "settings": {
            "concurrency": [LOW, HIGH],
            "warmup_s": 1.0,
            "duration_s": 1.0,
            "graphs": ["digits-serial", "digits-parallel"],
            "loopback": "127.0.0.1",
        },
    }
    analyzed = analysis.analyze(rows, load_spec(DEMO_MESH), LOW, HIGH)
    return {"meta": meta, "servers": {}, "points": rows, **analyzed, "large_model": None, "profile": None}


def test_the_report_shows_each_target_now_against_its_limit() -> None:
    data = report_data(whole_run())
    markdown = write.markdown(data)
    assert "| # | target | now | limit | verdict |" in markdown
    assert "| vs minimal 1.05x<br>vs minimal aio 1.20x (reference) | <= 1.1x | **met** |" in markdown
    assert "  - MISSED: digits-parallel c=1: mesh 2.000 vs minimal 0.500 ms p50 = 4.00x (<= 3.5x)" in markdown
    assert "| digits-parallel | 32 | 3000 | 5.00 | 0.600 | 40.000 | 16.000 | 2.5x |" in markdown
    console = write.console_summary(data)
    assert any(line.startswith("target 6: MISSED") for line in console)
    assert any(line.startswith("target 1: met") for line in console)


def test_the_report_of_a_partial_run_says_na() -> None:
    data = report_data([mesh("digits-serial", 1, rows_per_call=1.0)])
    markdown = write.markdown(data)
    assert "| 1 | model node" in markdown and "| - | <= 1.1x | n/a |" in markdown
    assert "- **1** n/a: not measured in this run" in markdown
    assert "target 3: n/a" in "\n".join(write.console_summary(data))
