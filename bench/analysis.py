"""From the points of one run to what the report states: ratios, cost per hop, batching, targets.

Pure functions over the point rows `bench.runner.point_row` returns; no I/O.

Hops: the mesh's *extra gRPC calls* per request are the calls the orchestrator makes to the
services, one per model step of the graph (the client's own call to the orchestrator has its
counterpart in the all-in-one mode). The *sequential* hops are those on the latency's critical
path: parallel branches overlap, so they count once per ensemble.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from orchestrator.spec import EnsembleStep, GraphSpec, MeshSpec, ModelStep, SequenceStep, Step, iter_steps

Row = Mapping[str, Any]

FLOOR, ALL_IN_ONE, MESH, MODEL_A = "floor", "all-in-one", "mesh", "model_a direct"
SMALL, LARGE, LARGE_BATCHING = "small", "large", "large+batching"
#: The project's targets (DESIGN.md §5 and the benchmark brief).
HOP_BUDGET_MS = 0.7
THROUGHPUT_FLOOR = 0.8
P99_CEILING = 2.0
CPU_CEILING = 2.0
BATCHING_GAIN = 2.0


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
    """For every mesh point: mesh/all-in-one and mesh/floor at the same config, model and concurrency.

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
        out.append(
            {
                "config": mesh["config"],
                "baseline_config": baseline,
                "model": model,
                "concurrency": c,
                "mesh_vs_all_in_one": None if aio is None else compare(mesh, aio),
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


def _verdict(checks: Sequence[dict[str, Any]]) -> bool | None:
    return None if not checks else all(c["met"] for c in checks)


def targets(
    rows: Sequence[Row], spec: MeshSpec, low: int, high: int, batch_rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each project target, met or missed, with the numbers it was judged on (at `low` and `high` c)."""
    latency, scale, cpu = [], [], []
    for mesh in (r for r in rows if r["mode"] == MESH and r["config"] == SMALL):
        aio = find(rows, ALL_IN_ONE, SMALL, mesh["model"], mesh["concurrency"])
        graph = spec.graphs.get(mesh["model"])
        if aio is None or graph is None:
            continue
        name, c = mesh["model"], mesh["concurrency"]
        if c == low:
            hops = hops_of(graph)
            limit = aio["p50_ms"] + HOP_BUDGET_MS * hops["extra_calls"]
            per_sequential = (mesh["p50_ms"] - aio["p50_ms"]) / hops["sequential"]
            latency.append(
                {
                    "model": name,
                    "met": mesh["p50_ms"] <= limit,
                    "text": f"{name} c={c}: mesh p50 {mesh['p50_ms']:.3f} ms vs limit {limit:.3f} ms "
                    f"(all-in-one {aio['p50_ms']:.3f} + {HOP_BUDGET_MS} x {hops['extra_calls']} extra calls); "
                    f"{per_sequential:.3f} ms per sequential hop ({hops['sequential']})",
                }
            )
        if c == high:
            rps, p99 = mesh["rps"] / aio["rps"], mesh["p99_ms"] / aio["p99_ms"]
            scale.append(
                {
                    "model": name,
                    "met": rps >= THROUGHPUT_FLOOR and p99 <= P99_CEILING,
                    "text": f"{name} c={c}: throughput {mesh['rps']:.0f}/{aio['rps']:.0f} req/s = {rps:.2f}x "
                    f"(>= {THROUGHPUT_FLOOR}), p99 {mesh['p99_ms']:.2f}/{aio['p99_ms']:.2f} ms = {p99:.2f}x "
                    f"(<= {P99_CEILING})",
                }
            )
            ratio = mesh["server_cpu_per_request_s"] / aio["server_cpu_per_request_s"]
            cpu.append(
                {
                    "model": name,
                    "met": ratio <= CPU_CEILING,
                    "text": f"{name} c={c}: {mesh['server_cpu_per_request_s'] * 1e3:.3f} vs "
                    f"{aio['server_cpu_per_request_s'] * 1e3:.3f} ms CPU/request = {ratio:.2f}x (<= {CPU_CEILING})",
                }
            )
    batch = [
        {
            "model": f"{b['mode']} {b['model']}",
            # The target is about the model's endpoint; the graph's ratio is reported beside it.
            "met": b["throughput_ratio"] is not None and b["throughput_ratio"] >= BATCHING_GAIN,
            "counts": b["mode"] == MODEL_A,
            "text": f"{b['mode']} {b['model']} c={b['concurrency']}: {b['on_rps']:.0f} vs {b['off_rps']:.0f} "
            f"req/s = {b['throughput_ratio']:.2f}x (>= {BATCHING_GAIN})",
        }
        for b in batch_rows
    ]
    return [
        {
            "id": 1,
            "target": f"c={low}: mesh p50 <= all-in-one p50 + {HOP_BUDGET_MS} ms per extra hop",
            "met": _verdict(latency),
            "checks": latency,
        },
        {
            "id": 2,
            "target": f"c={high}: mesh throughput >= {THROUGHPUT_FLOOR}x all-in-one and mesh p99 <= "
            f"{P99_CEILING}x all-in-one p99",
            "met": _verdict(scale),
            "checks": scale,
        },
        {
            "id": 3,
            "target": f"c={high}: mesh CPU s/request <= {CPU_CEILING}x all-in-one",
            "met": _verdict(cpu),
            "checks": cpu,
        },
        {
            "id": 4,
            "target": f"c={high}: batching on vs off >= {BATCHING_GAIN}x throughput (compute-dominant model, "
            "model_a endpoint)",
            "met": _verdict([b for b in batch if b["counts"]]),
            "checks": batch,
        },
    ]
