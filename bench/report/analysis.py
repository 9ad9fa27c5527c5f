"""From the points of one run to what the report states: ratios, cost per hop, batching, targets.

Pure functions over the point rows `bench.runner.point_row` returns (no I/O); a target's checks
carry the sentence the report prints for them.

Hops: the mesh's *extra gRPC calls* per request are the calls the orchestrator makes to the
services, one per model step of the graph (the client's own call to the orchestrator has its
counterpart in the all-in-one mode). The *sequential* hops are those on the latency's critical
path: parallel branches overlap, so they count once per ensemble.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.report.tables import pct
from orchestrator.spec import EnsembleStep, GraphSpec, MeshSpec, ModelStep, SequenceStep, Step, iter_steps

Row = Mapping[str, Any]

FLOOR, ALL_IN_ONE, MINIMAL, MESH, MODEL_A = "floor", "all-in-one", "minimal", "mesh", "model_a direct"
MINIMAL_AIO = "minimal aio"
SMALL, GROWTH, LARGE, LARGE_BATCHING = "small", "growth", "large", "large+batching"
#: The project's targets, against the minimal all-in-one (issue 10; DESIGN.md §5).
EXTRA_CALLS = 3
HOP_SLACK_MS = 0.2
THROUGHPUT_FLOOR = 0.7
P99_CEILING = 2.0
CPU_CEILING = 2.0
STEP_CEILING = 1.2
BRANCH_CEILING = 0.10
CACHE_CEILING = 1.2
BATCHING_GAIN = 2.0
CACHED_GRAPH, CACHED_BASE = "digits-serial-cached", "digits-serial"


def find(rows: Iterable[Row], mode: str, config: str, model: str, concurrency: int) -> Row | None:
    return next(
        (
            r
            for r in rows
            if r["mode"] == mode
            and r["config"] == config
            and r["model"] == model
            and r["concurrency"] == concurrency
        ),
        None,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compare(mesh: Row, other: Row) -> dict[str, float | None]:
    """mesh / other for p50, p99, throughput and server CPU per request."""
    return {
        "p50": _ratio(mesh["p50_ms"], other["p50_ms"]),
        "p99": _ratio(mesh["p99_ms"], other["p99_ms"]),
        "throughput": _ratio(mesh["rps"], other["rps"]),
        "cpu_per_request": _ratio(mesh["server_cpu_per_request_s"], other["server_cpu_per_request_s"]),
    }


def ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """For every mesh point: mesh/all-in-one, mesh/minimal and mesh/floor at the same config, model and
    concurrency.

    A config with no baseline of its own (`large+batching`: batching exists only in the mesh's
    model_a) is compared with its base config's (`large`), and says so in `baseline_config`.
    """
    out = []
    for mesh in (r for r in rows if r["mode"] == MESH):
        model, c = mesh["model"], mesh["concurrency"]
        baseline = mesh["config"]
        if find(rows, ALL_IN_ONE, baseline, model, c) is None:
            baseline = baseline.split("+")[0]
        aio, floor = find(rows, ALL_IN_ONE, baseline, model, c), find(rows, FLOOR, baseline, model, c)
        least = find(rows, MINIMAL, baseline, model, c)
        if aio is None and least is None and floor is None:
            continue  # the growth rows: no baseline runs their graphs
        out.append(
            {
                "config": mesh["config"],
                "baseline_config": baseline,
                "model": model,
                "concurrency": c,
                "mesh_vs_all_in_one": None if aio is None else compare(mesh, aio),
                "mesh_vs_minimal": None if least is None else compare(mesh, least),
                "mesh_vs_floor": None if floor is None else compare(mesh, floor),
            }
        )
    return out


def sequential_calls(step: Step) -> int:
    """Model calls on the critical path of a step (an ensemble's branches overlap)."""
    if isinstance(step, ModelStep):
        return 1
    if isinstance(step, SequenceStep):
        return sum(sequential_calls(s) for s in step.steps)
    if isinstance(step, EnsembleStep):
        return max((sequential_calls(b) for b in step.branches), default=0)
    # Switches, splitters, mirrors: not on the benchmarked graphs; count every call they may make.
    return sum(1 for s in iter_steps((step,)) if isinstance(s, ModelStep))


def hops_of(graph: GraphSpec) -> dict[str, int]:
    """Extra gRPC calls per request in the mesh (all of them, and those on the critical path)."""
    return {
        "extra_calls": sum(1 for _ in graph.model_steps()),
        "sequential": sum(sequential_calls(s) for s in graph.steps),
    }


def hop_costs(rows: Sequence[Row], spec: MeshSpec, config: str = SMALL) -> list[dict[str, Any]]:
    """(mesh p50 - all-in-one p50) per extra call and per sequential hop, with the orchestrator's own time."""
    out = []
    for mesh in (r for r in rows if r["mode"] == MESH and r["config"] == config):
        aio = find(rows, ALL_IN_ONE, config, mesh["model"], mesh["concurrency"])
        graph = spec.graphs.get(mesh["model"])
        if aio is None or graph is None:
            continue
        hops = hops_of(graph)
        added = mesh["p50_ms"] - aio["p50_ms"]
        orchestrator_cpu = mesh["orchestrator_cpu_per_request_s"]
        out.append(
            {
                "model": mesh["model"],
                "concurrency": mesh["concurrency"],
                **hops,
                "mesh_p50_ms": mesh["p50_ms"],
                "all_in_one_p50_ms": aio["p50_ms"],
                "added_p50_ms": added,
                "per_extra_call_ms": added / hops["extra_calls"],
                "per_sequential_hop_ms": added / hops["sequential"],
                "orchestrator_overhead_ms": mesh["orchestrator_overhead_ms"],
                "orchestrator_cpu_per_request_ms": None
                if orchestrator_cpu is None
                else orchestrator_cpu * 1000.0,
            }
        )
    return out


def raw_hop(rows: Sequence[Row]) -> dict[str, Any] | None:
    """One plain gRPC call to model_a (c=1) against the floor's single in-process predict."""
    direct = find(rows, MODEL_A, SMALL, "digits-mlp", 1)
    floor = find(rows, FLOOR, SMALL, "digits-mlp", 1)
    if direct is None or floor is None:
        return None
    return {
        "grpc_p50_ms": direct["p50_ms"],
        "grpc_p99_ms": direct["p99_ms"],
        "floor_p50_ms": floor["p50_ms"],
        "floor_p99_ms": floor["p99_ms"],
        "hop_p50_ms": direct["p50_ms"] - floor["p50_ms"],
        "server_cpu_per_request_ms": direct["server_cpu_per_request_s"] * 1000.0,
        "loadgen_cpu_per_request_ms": (direct["loadgen_cpu_per_request_s"] or 0.0) * 1000.0,
    }


def batching(rows: Sequence[Row], concurrency: int) -> list[dict[str, Any]]:
    """Batching on vs off with the large model at one concurrency: model_a direct, and through the mesh."""
    out = []
    for mode, model in ((MODEL_A, "digits-mlp"), (MESH, "digits-serial")):
        off = find(rows, mode, LARGE, model, concurrency)
        on = find(rows, mode, LARGE_BATCHING, model, concurrency)
        if off is None or on is None:
            continue
        out.append(
            {
                "mode": mode,
                "model": model,
                "concurrency": concurrency,
                "off_rps": off["rps"],
                "on_rps": on["rps"],
                "throughput_ratio": _ratio(on["rps"], off["rps"]),
                "off_p50_ms": off["p50_ms"],
                "on_p50_ms": on["p50_ms"],
                "off_p99_ms": off["p99_ms"],
                "on_p99_ms": on["p99_ms"],
                "off_cpu_per_request_ms": off["server_cpu_per_request_s"] * 1000.0,
                "on_cpu_per_request_ms": on["server_cpu_per_request_s"] * 1000.0,
            }
        )
    return out


def coalescing(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Mean rows per downstream call of every mesh point that counted them (1.0 = nothing stacked)."""
    return [
        {
            "config": r["config"],
            "model": r["model"],
            "concurrency": r["concurrency"],
            "downstream_calls": r["downstream_calls"],
            "rows_per_call": r["rows_per_call"],
        }
        for r in rows
        if r["mode"] == MESH and r.get("rows_per_call") is not None and r["config"] == SMALL
    ]


def grpc_servers(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The sync grpcio server against grpc.aio, the same handlers (bench.targets.minimal and --aio)."""
    out = []
    for aio in (r for r in rows if r["mode"] == MINIMAL_AIO):
        sync = find(rows, MINIMAL, aio["config"], aio["model"], aio["concurrency"])
        if sync is None:
            continue
        out.append(
            {
                "model": aio["model"],
                "concurrency": aio["concurrency"],
                "sync_p50_ms": sync["p50_ms"],
                "aio_p50_ms": aio["p50_ms"],
                "sync_rps": sync["rps"],
                "aio_rps": aio["rps"],
                "sync_cpu_per_request_us": sync["server_cpu_per_request_s"] * 1e6,
                "aio_cpu_per_request_us": aio["server_cpu_per_request_s"] * 1e6,
                "aio_vs_sync_cpu": _ratio(aio["server_cpu_per_request_s"], sync["server_cpu_per_request_s"]),
                "aio_vs_sync_p50": _ratio(aio["p50_ms"], sync["p50_ms"]),
            }
        )
    return out


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than two points)."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def growth(rows: Sequence[Row], concurrency: int) -> dict[str, Any] | None:
    """p50 and CPU per request of chain-n and fanout-n, and what each extra step or branch adds."""
    out: dict[str, Any] = {}
    for shape in ("chain", "fanout"):
        points = sorted(
            (
                (int(r["model"].split("-")[1]), r)
                for r in rows
                if r["config"] == GROWTH
                and r["model"].startswith(f"{shape}-")
                and r["concurrency"] == concurrency
            ),
            key=lambda item: item[0],
        )
        if not points:
            continue
        ns = [float(n) for n, _ in points]
        p50s = [r["p50_ms"] for _, r in points]
        cpus = [r["server_cpu_per_request_s"] * 1000.0 for _, r in points]
        out[shape] = {
            "concurrency": concurrency,
            "rows": [
                {
                    "n": n,
                    "p50_ms": r["p50_ms"],
                    "p99_ms": r["p99_ms"],
                    "cpu_per_request_ms": r["server_cpu_per_request_s"] * 1000.0,
                    "orchestrator_cpu_per_request_ms": (r["orchestrator_cpu_per_request_s"] or 0.0) * 1000.0,
                    "added_p50_ms": None if i == 0 else r["p50_ms"] - points[i - 1][1]["p50_ms"],
                }
                for i, (n, r) in enumerate(points)
            ],
            "p50_ms_per_step": _slope(ns, p50s),
            "cpu_ms_per_step": _slope(ns, cpus),
            "base_p50_ms": p50s[0],
        }
    return out or None


def cache(rows: Sequence[Row], low: int, high: int) -> list[dict[str, Any]]:
    """The cached graph against the same graph uncached (mesh) and the minimal all-in-one."""
    out = []
    for c in sorted({low, high}):
        hit = find(rows, MESH, GROWTH, CACHED_GRAPH, c)
        if hit is None:
            continue
        uncached = find(rows, MESH, SMALL, CACHED_BASE, c)
        least = find(rows, MINIMAL, SMALL, CACHED_BASE, c)
        lookups = (hit.get("cache_hits") or 0) + (hit.get("cache_misses") or 0)
        out.append(
            {
                "concurrency": c,
                "p50_ms": hit["p50_ms"],
                "p99_ms": hit["p99_ms"],
                "rps": hit["rps"],
                "cpu_per_request_ms": hit["server_cpu_per_request_s"] * 1000.0,
                "hit_ratio": None if not lookups else (hit.get("cache_hits") or 0) / lookups,
                "uncached_p50_ms": None if uncached is None else uncached["p50_ms"],
                "minimal_p50_ms": None if least is None else least["p50_ms"],
                "vs_minimal_p50": None if least is None else _ratio(hit["p50_ms"], least["p50_ms"]),
                "vs_uncached_p50": None if uncached is None else _ratio(hit["p50_ms"], uncached["p50_ms"]),
            }
        )
    return out


def _verdict(checks: Sequence[dict[str, Any]]) -> bool | None:
    return None if not checks else all(c["met"] for c in checks)


Check = dict[str, Any]


def targets(
    rows: Sequence[Row],
    spec: MeshSpec,
    low: int,
    high: int,
    batch_rows: Sequence[Mapping[str, Any]],
    grown: Mapping[str, Any] | None = None,
    cached: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Each project target, met or missed, with the numbers it was judged on (at `low` and `high` c).

    Latency and scale targets are against the minimal all-in-one (`bench.targets.minimal`), on every
    benchmarked graph; the hop budget uses the raw hop measured in the same run.
    """
    raw = raw_hop(rows)
    hop = None if raw is None else raw["hop_p50_ms"]
    latency, scale, cpu = _against_minimal(rows, spec, low, high, hop)
    hits = _cache_checks(cached, low)
    batch = _batching_checks(batch_rows)
    return [
        _target(
            1,
            f"c={low}: mesh p50 <= minimal all-in-one p50 + {EXTRA_CALLS} x (raw hop p50 + {HOP_SLACK_MS} ms)",
            latency,
        ),
        _target(
            2,
            f"c={high}: mesh throughput >= {THROUGHPUT_FLOOR}x the minimal all-in-one's and mesh p99 <= "
            f"{P99_CEILING}x its p99",
            scale,
        ),
        _target(3, f"c={high}: mesh CPU s/request <= {CPU_CEILING}x the minimal all-in-one's", cpu),
        _target(
            4, f"each extra serial step adds <= {STEP_CEILING}x a raw hop at p50", _step_checks(grown, hop)
        ),
        _target(5, f"each extra parallel branch adds <= {BRANCH_CEILING:.0%} p50", _branch_checks(grown)),
        _target(6, f"c={low}: a cache hit's p50 <= {CACHE_CEILING}x the minimal all-in-one's p50", hits),
        _target(
            7,
            f"c={high}: batching on vs off >= {BATCHING_GAIN}x throughput (compute-dominant model, "
            "model_a endpoint)",
            batch,
        ),
    ]


def _target(number: int, text: str, checks: list[Check]) -> dict[str, Any]:
    """A target: met when every check that counts is met (None when nothing was measured)."""
    counted = [c for c in checks if c.get("counts", True)]
    return {"id": number, "target": text, "met": _verdict(counted), "checks": checks}


def _against_minimal(
    rows: Sequence[Row], spec: MeshSpec, low: int, high: int, hop: float | None
) -> tuple[list[Check], list[Check], list[Check]]:
    """Targets 1-3, per benchmarked graph: latency at `low`, throughput and p99, CPU at `high`."""
    latency, scale, cpu = [], [], []
    for mesh in (r for r in rows if r["mode"] == MESH and r["config"] == SMALL):
        least = find(rows, MINIMAL, SMALL, mesh["model"], mesh["concurrency"])
        if least is None or mesh["model"] not in spec.graphs:
            continue
        name, c = mesh["model"], mesh["concurrency"]
        if c == low and hop is not None:
            limit = least["p50_ms"] + EXTRA_CALLS * (hop + HOP_SLACK_MS)
            latency.append(
                {
                    "model": name,
                    "met": mesh["p50_ms"] <= limit,
                    "text": f"{name} c={c}: mesh p50 {mesh['p50_ms']:.3f} ms vs limit {limit:.3f} ms "
                    f"(minimal {least['p50_ms']:.3f} + {EXTRA_CALLS} x (raw hop {hop:.3f} + {HOP_SLACK_MS}))",
                }
            )
        if c == high:
            rps, p99 = mesh["rps"] / least["rps"], mesh["p99_ms"] / least["p99_ms"]
            scale.append(
                {
                    "model": name,
                    "met": rps >= THROUGHPUT_FLOOR and p99 <= P99_CEILING,
                    "text": f"{name} c={c}: throughput {mesh['rps']:.0f}/{least['rps']:.0f} req/s = {rps:.2f}x "
                    f"(>= {THROUGHPUT_FLOOR}), p99 {mesh['p99_ms']:.2f}/{least['p99_ms']:.2f} ms = {p99:.2f}x "
                    f"(<= {P99_CEILING})",
                }
            )
            cpu_ratio = mesh["server_cpu_per_request_s"] / least["server_cpu_per_request_s"]
            cpu.append(
                {
                    "model": name,
                    "met": cpu_ratio <= CPU_CEILING,
                    "text": f"{name} c={c}: {mesh['server_cpu_per_request_s'] * 1e3:.3f} vs "
                    f"{least['server_cpu_per_request_s'] * 1e3:.3f} ms CPU/request = {cpu_ratio:.2f}x "
                    f"(<= {CPU_CEILING})",
                }
            )
    return latency, scale, cpu


def _step_checks(grown: Mapping[str, Any] | None, hop: float | None) -> list[Check]:
    """Target 4: the fitted p50 cost of one more serial step, against the raw hop."""
    chain = (grown or {}).get("chain")
    if not chain or chain["p50_ms_per_step"] is None or hop is None:
        return []
    per, limit = chain["p50_ms_per_step"], STEP_CEILING * hop
    added = ", ".join(_signed(r["added_p50_ms"]) for r in chain["rows"][1:])
    return [
        {
            "model": "chain",
            "met": per <= limit,
            "text": f"chain-1..{len(chain['rows'])} c={chain['concurrency']}: {per:.3f} ms p50 per extra step "
            f"(fitted; each: {added}) vs {STEP_CEILING} x raw hop {hop:.3f} = {limit:.3f} ms",
        }
    ]


def _branch_checks(grown: Mapping[str, Any] | None) -> list[Check]:
    """Target 5: the fitted p50 cost of one more parallel branch, as a share of one branch."""
    fan = (grown or {}).get("fanout")
    if not fan or fan["p50_ms_per_step"] is None:
        return []
    per, share = fan["p50_ms_per_step"], fan["p50_ms_per_step"] / fan["base_p50_ms"]
    added = ", ".join(_signed(r["added_p50_ms"]) for r in fan["rows"][1:])
    return [
        {
            "model": "fanout",
            "met": share <= BRANCH_CEILING,
            "text": f"fanout-1..{len(fan['rows'])} c={fan['concurrency']}: {per:.3f} ms p50 per extra branch "
            f"(fitted; each: {added}) = {share:.1%} of fanout-1's {fan['base_p50_ms']:.3f} ms "
            f"(<= {BRANCH_CEILING:.0%})",
        }
    ]


def _cache_checks(cached: Sequence[Mapping[str, Any]], low: int) -> list[Check]:
    """Target 6: a cache hit against the minimal all-in-one (only the `low` row counts)."""
    return [
        {
            "model": CACHED_GRAPH,
            "met": row["vs_minimal_p50"] <= CACHE_CEILING,
            "counts": row["concurrency"] == low,
            "text": f"{CACHED_GRAPH} c={row['concurrency']}: hit p50 {row['p50_ms']:.3f} ms vs minimal "
            f"{row['minimal_p50_ms']:.3f} ms = {row['vs_minimal_p50']:.2f}x (<= {CACHE_CEILING}); hit ratio "
            f"{pct(row['hit_ratio'])}",
        }
        for row in cached
        if row["vs_minimal_p50"] is not None
    ]


def _batching_checks(batch_rows: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Target 7: batching on against off (the model's endpoint counts; the graph's is beside it)."""
    return [
        {
            "model": f"{b['mode']} {b['model']}",
            "met": b["throughput_ratio"] is not None and b["throughput_ratio"] >= BATCHING_GAIN,
            "counts": b["mode"] == MODEL_A,
            "text": f"{b['mode']} {b['model']} c={b['concurrency']}: {b['on_rps']:.0f} vs {b['off_rps']:.0f} "
            f"req/s = {b['throughput_ratio']:.2f}x (>= {BATCHING_GAIN})",
        }
        for b in batch_rows
    ]


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"
