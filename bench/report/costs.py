"""The report's sections on what the mesh's own cost depends on: stacking, graph shape, the cache."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.report.analysis import CACHED_BASE, CACHED_GRAPH, P99_CEILING
from bench.report.tables import num, pct, ratio, table


def coalescing(data: Mapping[str, Any]) -> list[str]:
    rows = data.get("coalescing") or []
    if not rows:
        return []
    cells = [
        [
            r["model"],
            str(r["concurrency"]),
            str(r["downstream_calls"]),
            num(r["rows_per_call"]),
            num(r["cpu_per_request_ms"], 3),
            num(r["p99_ms"], 3),
            num(r["minimal_p99_ms"], 3),
            ratio(r["p99_vs_minimal"]),
        ]
        for r in rows
    ]
    return [
        "## Coalescing: rows per downstream call, CPU and p99 by concurrency",
        "",
        "From the orchestrator's `onnxmesh_downstream_call_rows` histogram over each point's window: every call the "
        "orchestrator made to a service, and the rows it carried (one image per request, so 1.0 = nothing "
        "stacked). Each step's in-flight limit adapts to load (`orchestrator/stages/coalescing.py`): deeper "
        "stacks mean fewer calls per request, so less CPU, as long as the wait they add keeps the p99 within "
        f"{P99_CEILING}x the minimal all-in-one's; a lone request (c=1) must never wait (1.0 rows per call).",
        "",
        table(
            [
                "graph",
                "c",
                "downstream calls",
                "mean rows per call",
                "mesh server CPU ms/req",
                "mesh p99 ms",
                "minimal p99 ms",
                "p99 mesh/minimal",
            ],
            cells,
        ),
        "",
    ]


def grpc_servers(data: Mapping[str, Any]) -> list[str]:
    rows = data.get("grpc_servers") or []
    if not rows:
        return []
    cells = [
        [
            r["model"],
            str(r["concurrency"]),
            f"{num(r['sync_p50_ms'], 3)} / {num(r['aio_p50_ms'], 3)}",
            f"{r['sync_rps']:.0f} / {r['aio_rps']:.0f}",
            f"{r['sync_cpu_per_request_us']:.0f} / {r['aio_cpu_per_request_us']:.0f}",
            ratio(r["aio_vs_sync_cpu"]),
        ]
        for r in rows
    ]
    return [
        "## gRPC servers: sync grpcio vs grpc.aio",
        "",
        "The minimal all-in-one's very handlers served by each (`bench.targets.minimal` and `bench.targets.minimal --aio`: models "
        "inline on the handler's thread or on the event loop), so only the server differs. The mesh's nodes "
        "run grpc.aio (`services/common/server.py`).",
        "",
        table(
            [
                "graph",
                "c",
                "p50 ms sync / aio",
                "req/s sync / aio",
                "server CPU us/req sync / aio",
                "aio/sync CPU",
            ],
            cells,
        ),
        "",
    ]


def growth(data: Mapping[str, Any]) -> list[str]:
    grown = data.get("growth")
    if not grown:
        return []
    raw = data.get("raw_hop") or {}
    lines = [
        "## How cost grows: serial steps and parallel branches",
        "",
        "Identity models (`echo-k`: one ONNX Identity node on FP32 [1,64], microseconds of compute), so each row "
        "shows the mesh's own cost: `chain-n` = n steps one after another (services alternating model_a, "
        "model_b), `fanout-n` = one ensemble of n branches, averaged (`bench/targets/growth.py`). Server CPU = all four "
        "processes. *Added* = this row's p50 minus the previous row's; *per step* = the least-squares slope over "
        f"n. One raw hop in the same run: {num(raw.get('hop_p50_ms'), 3)} ms p50.",
        "",
    ]
    for shape, title in (("chain", "serial chain"), ("fanout", "fan-out")):
        part = grown.get(shape)
        if not part:
            continue
        cells = [
            [
                f"{shape}-{r['n']}",
                str(part["concurrency"]),
                num(r["p50_ms"], 3),
                num(r["p99_ms"], 3),
                num(r["added_p50_ms"], 3),
                num(r["cpu_per_request_ms"], 3),
                num(r["orchestrator_cpu_per_request_ms"], 3),
            ]
            for r in part["rows"]
        ]
        lines += [
            f"**{title}**: {num(part['p50_ms_per_step'], 3)} ms p50 and {num(part['cpu_ms_per_step'], 3)} ms "
            "server CPU per extra step.",
            "",
            table(
                ["graph", "c", "p50 ms", "p99 ms", "added p50 ms", "server CPU ms/req", "orch. CPU ms/req"],
                cells,
            ),
            "",
        ]
    return lines


def cache(data: Mapping[str, Any]) -> list[str]:
    rows = data.get("cache") or []
    if not rows:
        return []
    cells = [
        [
            str(r["concurrency"]),
            f"{r['rps']:.0f}",
            num(r["p50_ms"], 3),
            num(r["p99_ms"], 3),
            num(r["cpu_per_request_ms"], 3),
            pct(r["hit_ratio"]),
            num(r["uncached_p50_ms"], 3),
            num(r["minimal_p50_ms"], 3),
            ratio(r["vs_minimal_p50"]),
        ]
        for r in rows
    ]
    return [
        "## Response cache",
        "",
        f"`{CACHED_GRAPH}` = `{CACHED_BASE}` with a whole-graph cache (`cache:` in the spec, local store); the "
        "load generator cycles through the 360 held-out images, so after the warm-up every request is a hit "
        "(hit ratio from `onnxmesh_cache_lookups_total` over the window). A hit makes no downstream call.",
        "",
        table(
            [
                "c",
                "req/s",
                "p50 ms",
                "p99 ms",
                "server CPU ms/req",
                "hit ratio",
                f"{CACHED_BASE} mesh p50",
                "minimal p50",
                "hit p50 / minimal",
            ],
            cells,
        ),
        "",
    ]


def console(data: Mapping[str, Any]) -> list[str]:
    """One line per coalescing point, growth shape and cache point, for the terminal."""
    lines = [
        f"  grpc.aio / sync server c={r['concurrency']}: {ratio(r['aio_vs_sync_cpu'])} CPU per request, "
        f"{ratio(r['aio_vs_sync_p50'])} p50"
        for r in data.get("grpc_servers") or []
    ]
    lines += [
        f"  rows per downstream call {r['model']} c={r['concurrency']}: {num(r['rows_per_call'])}, "
        f"{num(r['cpu_per_request_ms'], 3)} ms CPU/req, p99 {num(r['p99_ms'], 3)} ms = "
        f"{ratio(r['p99_vs_minimal'])} the minimal's"
        for r in data.get("coalescing") or []
    ]
    for shape, part in (data.get("growth") or {}).items():
        lines.append(
            f"  {shape}: +{num(part['p50_ms_per_step'], 3)} ms p50, +{num(part['cpu_ms_per_step'], 3)} ms CPU "
            "per extra step"
        )
    for r in data.get("cache") or []:
        lines.append(
            f"  cache hit c={r['concurrency']}: p50 {num(r['p50_ms'], 3)} ms = {ratio(r['vs_minimal_p50'])} the "
            f"minimal all-in-one's, hit ratio {pct(r['hit_ratio'])}"
        )
    return lines
