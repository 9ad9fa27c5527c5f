"""From the points of one run to what the report states: ratios, cost per hop, batching, targets.

Pure functions over the point rows `bench.runner.point_row` returns (no I/O); a target's checks
carry the sentence the report prints for them.

Hops: the mesh's *extra gRPC calls* per request are the calls the orchestrator makes to the
services, one per model step of the graph (the client's own call to the orchestrator has its
counterpart in the all-in-one mode). The *sequential* hops are those on the latency's critical
path: parallel branches overlap, so they count once per ensemble.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from bench.report.tables import pct
from orchestrator.spec import EnsembleStep, GraphSpec, MeshSpec, ModelStep, SequenceStep, Step, iter_steps

Row = Mapping[str, Any]

FLOOR, ALL_IN_ONE, MINIMAL, MESH, MODEL_A = "floor", "all-in-one", "minimal", "mesh", "model_a direct"
MINIMAL_AIO = "minimal aio"
SMALL, GROWTH, LARGE, LARGE_BATCHING = "small", "growth", "large", "large+batching"
#: The project's targets: ratios against the minimal all-in-one of the same run.
NODE_CPU_CEILING = 1.1  # a model node's CPU per call / the minimal server's per request, c=1
ORCHESTRATOR_CPU_CEILING = 1.0  # the orchestrator's CPU per request / the whole minimal server's
CPU_CEILING = 1.6
THROUGHPUT_FLOOR, THROUGHPUT_MOONSHOT = 0.7, 1.0
P50_CEILING = 3.5
P99_CEILING = 2.0
BRANCH_CEILING = 0.10
STEP_CEILING = 1.2
CACHE_CEILING = 1.2
BATCHING_GAIN = 2.0
#: The graph of the single-graph targets (model node, orchestrator) and of the cached graph.
BASE_GRAPH = "digits-serial"
CACHED_GRAPH, CACHED_BASE = "digits-serial-cached", BASE_GRAPH


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
    """Per mesh point that counted its downstream calls: mean rows per call (1.0 = nothing stacked),
    with the CPU and p99 it bought, beside the minimal all-in-one's p99 at the same concurrency."""
    out = []
    for r in rows:
        if r["mode"] != MESH or r["config"] != SMALL or r.get("rows_per_call") is None:
            continue
        least = find(rows, MINIMAL, SMALL, r["model"], r["concurrency"])
        minimal_p99 = None if least is None else least["p99_ms"]
        out.append(
            {
                "config": r["config"],
                "model": r["model"],
                "concurrency": r["concurrency"],
                "downstream_calls": r["downstream_calls"],
                "rows_per_call": r["rows_per_call"],
                "cpu_per_request_ms": r["server_cpu_per_request_s"] * 1000.0,
                "p99_ms": r["p99_ms"],
                "minimal_p99_ms": minimal_p99,
                "p99_vs_minimal": _ratio(r["p99_ms"], minimal_p99),
            }
        )
    return out


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


Check = dict[str, Any]


def analyze(rows: Sequence[Row], spec: MeshSpec, low: int, high: int) -> dict[str, Any]:
    """Everything a report derives from the points of one run (`low`, `high`: its concurrencies)."""
    return {
        "ratios": ratios(rows),
        "hops": hop_costs(rows, spec),
        "raw_hop": raw_hop(rows),
        "coalescing": coalescing(rows),
        "grpc_servers": grpc_servers(rows),
        "growth": growth(rows, low),
        "cache": cache(rows, low, high),
        "batching": batching(rows, high),
        "targets": targets(rows, low, high),
    }


def targets(rows: Sequence[Row], low: int, high: int) -> list[dict[str, Any]]:
    """Each project target, met or missed, with the figures it was judged on.

    Ratios against the minimal all-in-one (`bench.targets.minimal`) of the same run, per benchmarked
    graph, at the lowest (`low`) and highest (`high`) concurrency run. A target whose points did
    not run (a partial run: `--graphs`, `--skip-large`, `--growth-steps 0`) has no checks: n/a.
    """
    raw = raw_hop(rows)
    grown = growth(rows, low)
    return [
        _target(
            1,
            f"model node: server CPU per call (model_a direct, c=1) vs the minimal server's per request "
            f"({BASE_GRAPH}, c=1)",
            f"<= {NODE_CPU_CEILING}x",
            _node_cpu_checks(rows),
        ),
        _target(
            2,
            f"orchestrator CPU per request vs the whole minimal server's ({BASE_GRAPH}, c={high})",
            f"<= {ORCHESTRATOR_CPU_CEILING}x",
            _orchestrator_checks(rows, high),
        ),
        _target(
            3,
            f"mesh server CPU per request vs the minimal's (c={high})",
            f"<= {CPU_CEILING}x",
            _per_graph(
                rows,
                high,
                "server_cpu_per_request_s",
                "ms CPU per request",
                ("<=", CPU_CEILING),
                scale=1000.0,
            ),
        ),
        _target(
            4,
            f"mesh throughput vs the minimal's (c={high})",
            f">= {THROUGHPUT_FLOOR}x (moonshot {THROUGHPUT_MOONSHOT}x)",
            _throughput_checks(rows, high),
        ),
        _target(
            5,
            f"mesh p50 vs the minimal's (c={low})",
            f"<= {P50_CEILING}x",
            _per_graph(rows, low, "p50_ms", "ms p50", ("<=", P50_CEILING)),
        ),
        _target(
            6,
            f"coalescing as deep as keeps the mesh's p99 within {P99_CEILING}x the minimal's (c={high}); "
            "a lone request never waits (c=1)",
            f"p99 <= {P99_CEILING}x; exactly 1.0 rows per call at c=1",
            _coalescing_checks(coalescing(rows), high),
        ),
        _target(
            7,
            f"each extra parallel branch adds to p50 (c={low})",
            f"<= {BRANCH_CEILING:.0%}",
            _branch_checks(grown),
        ),
        _target(
            8,
            f"each extra serial step adds to p50 (c={low}), against one raw hop",
            f"<= {STEP_CEILING}x a raw hop",
            _step_checks(grown, None if raw is None else raw["hop_p50_ms"]),
        ),
        _target(
            9,
            f"a cache hit's p50 vs the minimal's (c={low})",
            f"<= {CACHE_CEILING}x",
            _cache_checks(cache(rows, low, high), low),
        ),
        _target(
            10,
            f"batching on vs off, throughput (compute-dominant model, model_a endpoint, c={high})",
            f">= {BATCHING_GAIN}x",
            _batching_checks(batching(rows, high)),
        ),
    ]


def _target(number: int, text: str, limit: str, checks: list[Check]) -> dict[str, Any]:
    """A target: met when every check that counts is met (None when nothing that counts was measured)."""
    counted = [c for c in checks if c.get("counts", True)]
    met = None if not counted else all(c["met"] for c in counted)
    return {"id": number, "target": text, "limit": limit, "met": met, "checks": checks}


def _figure(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"


def _compare(
    label: str,
    subject: str,
    sides: tuple[str, str],
    a: float | None,
    b: float | None,
    unit: str,
    bound: tuple[str, float],
    counts: bool = True,
) -> list[Check]:
    """One check on a / b against `bound` ("<=" or ">=", limit; [] when a side was not measured).

    `label` names the check in the targets table, `subject` and `sides` in its sentence.
    """
    x = _ratio(a, b)
    if a is None or b is None or x is None:
        return []
    op, limit = bound
    met = x <= limit if op == "<=" else x >= limit
    return [
        {
            "model": label,
            "value": x,
            "met": met,
            "counts": counts,
            "now": f"{label} {x:.2f}x",
            "text": f"{subject}: {sides[0]} {_figure(a)} vs {sides[1]} {_figure(b)} {unit} = {x:.2f}x ({op} {limit}x)",
        }
    ]


def _ms(row: Row | None, key: str) -> float | None:
    """A per-request figure of a point in seconds, in milliseconds (None when not measured)."""
    value = None if row is None else row[key]
    return None if value is None else value * 1000.0


def _pairs(rows: Sequence[Row], concurrency: int) -> Iterator[tuple[Row, Row]]:
    """(mesh, minimal) points of the demo models at one concurrency, one pair per benchmarked graph."""
    for mesh in rows:
        if mesh["mode"] == MESH and mesh["config"] == SMALL and mesh["concurrency"] == concurrency:
            least = find(rows, MINIMAL, SMALL, mesh["model"], concurrency)
            if least is not None:
                yield mesh, least


def _per_graph(
    rows: Sequence[Row],
    concurrency: int,
    key: str,
    unit: str,
    bound: tuple[str, float],
    scale: float = 1.0,
) -> list[Check]:
    """Targets 3-5: the mesh's figure over the minimal's, per graph (times `scale` in the sentence)."""
    return [
        check
        for mesh, least in _pairs(rows, concurrency)
        for check in _compare(
            mesh["model"],
            f"{mesh['model']} c={concurrency}",
            ("mesh", "minimal"),
            None if mesh[key] is None else mesh[key] * scale,
            None if least[key] is None else least[key] * scale,
            unit,
            bound,
        )
    ]


def _node_cpu_checks(rows: Sequence[Row]) -> list[Check]:
    """Target 1: one call to model_a against one request to the minimal server, both at c=1; against
    the same handlers on grpc.aio for reference (the transport the nodes run)."""
    node = find(rows, MODEL_A, SMALL, "digits-mlp", 1)
    checks = []
    for mode in (MINIMAL, MINIMAL_AIO):
        least = find(rows, mode, SMALL, BASE_GRAPH, 1)
        checks += _compare(
            f"vs {mode}",
            "c=1",
            ("model_a direct", f"{mode} {BASE_GRAPH}"),
            _ms(node, "server_cpu_per_request_s"),
            _ms(least, "server_cpu_per_request_s"),
            "ms CPU (per call vs per request)",
            ("<=", NODE_CPU_CEILING),
            counts=mode == MINIMAL,
        )
    return checks


def _orchestrator_checks(rows: Sequence[Row], high: int) -> list[Check]:
    """Target 2: the orchestrator alone against the whole minimal server (other graphs for reference)."""
    return [
        check
        for mesh, least in _pairs(rows, high)
        for check in _compare(
            mesh["model"],
            f"{mesh['model']} c={high}",
            ("orchestrator", "whole minimal server"),
            _ms(mesh, "orchestrator_cpu_per_request_s"),
            _ms(least, "server_cpu_per_request_s"),
            "ms CPU per request",
            ("<=", ORCHESTRATOR_CPU_CEILING),
            counts=mesh["model"] == BASE_GRAPH,
        )
    ]


def _throughput_checks(rows: Sequence[Row], high: int) -> list[Check]:
    """Target 4: the mesh's throughput over the minimal's, with how far from the moonshot."""
    checks = _per_graph(rows, high, "rps", "req/s", (">=", THROUGHPUT_FLOOR))
    for check in checks:
        reached = "reached" if check["value"] >= THROUGHPUT_MOONSHOT else "not reached"
        check["text"] += f"; moonshot {THROUGHPUT_MOONSHOT}x {reached}"
    return checks


def _coalescing_checks(coalesced: Sequence[Mapping[str, Any]], high: int) -> list[Check]:
    """Target 6: at the highest concurrency the p99 the stacking leaves against the minimal's; at c=1
    exactly one row per downstream call (no lone request waited to be stacked)."""
    checks: list[Check] = []
    for r in coalesced:
        name, c = r["model"], r["concurrency"]
        if c == high:
            for check in _compare(
                f"{name} p99",
                f"{name} c={c}",
                ("mesh", "minimal"),
                r["p99_ms"],
                r["minimal_p99_ms"],
                "ms p99",
                ("<=", P99_CEILING),
            ):
                check["text"] += f", at {r['rows_per_call']:.2f} rows per downstream call"
                checks.append(check)
        if c == 1:
            per, calls = r["rows_per_call"], r["downstream_calls"]
            checks.append(
                {
                    "model": f"{name} c=1",
                    "value": per,
                    "met": per == 1.0,
                    "now": f"{name} c=1 {per:.2f} rows/call",
                    "text": f"{name} c=1: {round(per * calls)} rows in {calls} downstream calls = {per:.3f} "
                    "per call (exactly 1.0: a lone request never waits)",
                }
            )
    return checks


def _step_checks(grown: Mapping[str, Any] | None, hop: float | None) -> list[Check]:
    """Target 8: the fitted p50 cost of one more serial step, against the raw hop."""
    chain = (grown or {}).get("chain")
    if not chain or chain["p50_ms_per_step"] is None or hop is None or hop <= 0:
        return []
    per, limit = chain["p50_ms_per_step"], STEP_CEILING * hop
    added = ", ".join(_signed(r["added_p50_ms"]) for r in chain["rows"][1:])
    return [
        {
            "model": "chain",
            "value": per / hop,
            "met": per <= limit,
            "now": f"{per:.3f} ms/step = {per / hop:.2f}x hop",
            "text": f"chain-1..{len(chain['rows'])} c={chain['concurrency']}: {per:.3f} ms p50 per extra step "
            f"(fitted; each: {added}) vs {STEP_CEILING} x raw hop {hop:.3f} = {limit:.3f} ms",
        }
    ]


def _branch_checks(grown: Mapping[str, Any] | None) -> list[Check]:
    """Target 7: the fitted p50 cost of one more parallel branch, as a share of one branch."""
    fan = (grown or {}).get("fanout")
    if not fan or fan["p50_ms_per_step"] is None or not fan["base_p50_ms"]:
        return []
    per, share = fan["p50_ms_per_step"], fan["p50_ms_per_step"] / fan["base_p50_ms"]
    added = ", ".join(_signed(r["added_p50_ms"]) for r in fan["rows"][1:])
    return [
        {
            "model": "fanout",
            "value": share,
            "met": share <= BRANCH_CEILING,
            "now": f"{share:+.1%} per branch",
            "text": f"fanout-1..{len(fan['rows'])} c={fan['concurrency']}: {per:.3f} ms p50 per extra branch "
            f"(fitted; each: {added}) = {share:.1%} of fanout-1's {fan['base_p50_ms']:.3f} ms "
            f"(<= {BRANCH_CEILING:.0%})",
        }
    ]


def _cache_checks(cached: Sequence[Mapping[str, Any]], low: int) -> list[Check]:
    """Target 9: a cache hit against the minimal all-in-one (only the `low` row counts)."""
    return [
        {
            "model": CACHED_GRAPH,
            "value": row["vs_minimal_p50"],
            "met": row["vs_minimal_p50"] <= CACHE_CEILING,
            "counts": row["concurrency"] == low,
            "now": f"c={row['concurrency']} {row['vs_minimal_p50']:.2f}x",
            "text": f"{CACHED_GRAPH} c={row['concurrency']}: hit p50 {row['p50_ms']:.3f} ms vs minimal "
            f"{row['minimal_p50_ms']:.3f} ms = {row['vs_minimal_p50']:.2f}x (<= {CACHE_CEILING}x); hit ratio "
            f"{pct(row['hit_ratio'])}",
        }
        for row in cached
        if row["vs_minimal_p50"] is not None
    ]


def _batching_checks(batch_rows: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Target 10: batching on against off (the model's endpoint counts; the graph's is beside it)."""
    return [
        {
            "model": f"{b['mode']} {b['model']}",
            "value": b["throughput_ratio"],
            "met": b["throughput_ratio"] >= BATCHING_GAIN,
            "counts": b["mode"] == MODEL_A,
            "now": f"{b['mode']} {b['throughput_ratio']:.2f}x",
            "text": f"{b['mode']} {b['model']} c={b['concurrency']}: {b['on_rps']:.0f} vs {b['off_rps']:.0f} "
            f"req/s = {b['throughput_ratio']:.2f}x (>= {BATCHING_GAIN}x)",
        }
        for b in batch_rows
        if b["throughput_ratio"] is not None
    ]


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"
