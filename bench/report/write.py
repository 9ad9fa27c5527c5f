"""Write a run's results: report.json (everything), report.md (for people) and latency_throughput.png."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI

import matplotlib.pyplot as plt

from bench.report import costs
from bench.report.analysis import (
    ALL_IN_ONE,
    FLOOR,
    GROWTH,
    LARGE,
    LARGE_BATCHING,
    MESH,
    MINIMAL,
    MINIMAL_AIO,
    MODEL_A,
    SMALL,
)
from bench.report.tables import ms, num, pct, ratio, table

JSON_NAME, MD_NAME, PNG_NAME = "report.json", "report.md", "latency_throughput.png"
#: A load generator above this share of one core may be limiting the load it offers.
LOADGEN_BUSY = 0.9
#: A point where something else used more than this share of the machine was disturbed.
OTHER_LOAD_LIMIT = 0.15
MODE_ORDER = (FLOOR, ALL_IN_ONE, MINIMAL, MINIMAL_AIO, MESH, MODEL_A)
CONFIG_ORDER = (SMALL, GROWTH, LARGE, LARGE_BATCHING)
COLORS = {
    FLOOR: "tab:green",
    ALL_IN_ONE: "tab:blue",
    MINIMAL: "tab:orange",
    MESH: "tab:red",
    MODEL_A: "tab:purple",
}
STYLES = {SMALL: "-", GROWTH: "-.", LARGE: "--", LARGE_BATCHING: ":"}


def write(data: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """All three files under `out`; their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "md": out / MD_NAME, "png": out / PNG_NAME}
    paths["json"].write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    paths["md"].write_text(markdown(data))
    plot(data["points"], paths["png"])
    return paths


def _sorted(points: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    def key(p: Mapping[str, Any]) -> tuple[int, str, int, int]:
        return (CONFIG_ORDER.index(p["config"]), p["model"], MODE_ORDER.index(p["mode"]), p["concurrency"])

    return sorted(points, key=key)


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**missed**")


# -- sections -------------------------------------------------------------------------------------

POINT_HEADERS = (
    "config",
    "graph / model",
    "mode",
    "c",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "errors",
    "wrong",
    "server CPU ms/req",
    "orch. own ms/req (metric)",
    "orch. CPU ms/req",
    "loadgen CPU ms/req (share)",
    "machine busy",
    "other load",
)


def point_cells(p: Mapping[str, Any]) -> list[str]:
    lg = p["loadgen_cpu_per_request_s"]
    loadgen = "in-process" if lg is None else f"{ms(lg)} ({pct(p['loadgen_cpu_share'])})"
    return [
        p["config"],
        p["model"],
        p["mode"],
        str(p["concurrency"]),
        f"{p['rps']:.0f}",
        num(p["p50_ms"], 3),
        num(p["p90_ms"], 3),
        num(p["p99_ms"], 3),
        str(p["errors"]),
        f"{p['wrong']} ({p['accuracy']:.1%} ok)",
        ms(p["server_cpu_per_request_s"]),
        num(p["orchestrator_overhead_ms"], 3),
        ms(p["orchestrator_cpu_per_request_s"]),
        loadgen,
        pct(p["machine_busy"]),
        pct(p.get("other_load")),
    ]


def _header(data: Mapping[str, Any]) -> list[str]:
    m = data["meta"]
    machine, versions, s = m["machine"], m["versions"], m["settings"]
    return [
        "# onnxmesh benchmark: mesh vs two all-in-one servers vs floor",
        "",
        f"- **Run**: {m['started']}, {m['elapsed_s']:.0f} s in total.",
        f"- **Command**: `{m['command']}` (what `make bench` runs; `make bench ARGS='...'` adds flags).",
        f"- **Code**: commit {m['code']['commit']}"
        + (
            f", with uncommitted changes to {', '.join(m['code']['modified'])}."
            if m["code"]["modified"]
            else ", no uncommitted changes to tracked files."
        ),
        f"- **Machine**: {machine['cores']} cores, {machine['cpu_model']}, Linux {machine['kernel']}. Servers, "
        "load generator and the benchmark driver all share these cores.",
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        f"- **Load**: closed loop, concurrency {s['concurrency']}, {s['warmup_s']:g} s warm-up (not measured) + "
        f"{s['duration_s']:g} s measured per point; one held-out digit per request (batch size 1), round "
        f"robin; loopback {s['loopback']} only. Graphs: {', '.join(s['graphs'])}.",
        "- **Modes**: *floor* = the graph's `predict` calls in one process, N threads, one request per call, no "
        "network, no batching; *all-in-one* = one gRPC server (`bench.targets.all_in_one`) running the same `Engine`, "
        "spec and models in-process, its stages wrapped like the orchestrator's (coalescing of concurrent calls "
        "of a step, same default), no model batching; *minimal* = the all-in-one a user would write by hand "
        "(`bench.targets.minimal`: one synchronous grpcio server, 32 threads, onnxruntime sessions, the graph's steps "
        "as plain function calls, the same OIP request and response, nothing else): the baseline of the "
        "targets; *mesh* = preprocess, model_a, model_b and the orchestrator as separate processes "
        "(`LocalMesh`), each with its defaults.",
        "- **Shared machine**: other work may run beside the benchmark (see *other load* per point); absolute "
        "figures move with it, ratios measured side by side in one run much less.",
        "",
    ]


def _targets(data: Mapping[str, Any]) -> list[str]:
    """The targets table (figure now, limit, verdict), then the measured figures behind each."""
    rows = [
        [
            str(t["id"]),
            t["target"],
            "<br>".join(c["now"] + ("" if c.get("counts", True) else " (reference)") for c in t["checks"])
            or "-",
            t["limit"],
            _verdict(t["met"]),
        ]
        for t in data["targets"]
    ]
    lines = [
        "## Targets",
        "",
        "Ratios against the minimal all-in-one of this run; *n/a* = its points did not run. A *reference* figure "
        "does not count toward the verdict.",
        "",
        table(["#", "target", "now", "limit", "verdict"], rows),
        "",
        "Measured figures:",
        "",
    ]
    for t in data["targets"]:
        lines.append(
            f"- **{t['id']}** {_verdict(t['met'])}" + ("" if t["checks"] else ": not measured in this run")
        )
        lines += [f"  - {line}" for line in check_lines(t)]
    return [*lines, ""]


def check_lines(target: Mapping[str, Any]) -> list[str]:
    """One sentence per check of a target: met or missed, and the figures."""
    return [
        f"{'ok' if c['met'] else 'MISSED'}: {c['text']}" + ("" if c.get("counts", True) else " (reference)")
        for c in target["checks"]
    ]


def _points(data: Mapping[str, Any]) -> list[str]:
    small = [p for p in data["points"] if p["config"] == SMALL]
    return [
        "## Main table (demo digits models)",
        "",
        "Server CPU = utime+stime of every server process of the mode (mesh: preprocess, model_a, model_b, "
        "orchestrator; floor: its own process, which also generates the load). Orchestrator own time = the "
        "`onnxmesh_orchestrator_overhead_seconds` histogram (request time minus time waiting on steps), "
        "sum/count over the window.",
        "",
        table(POINT_HEADERS, (point_cells(p) for p in _sorted(small))),
        "",
    ]


def _ratios(data: Mapping[str, Any]) -> list[str]:
    rows = []
    keys = ("p50", "p99", "throughput", "cpu_per_request")
    for r in data["ratios"]:
        m, a, f = r.get("mesh_vs_minimal") or {}, r["mesh_vs_all_in_one"] or {}, r["mesh_vs_floor"] or {}
        config = (
            r["config"]
            if r["baseline_config"] == r["config"]
            else f"{r['config']} (vs {r['baseline_config']})"
        )
        rows.append(
            [
                config,
                r["model"],
                str(r["concurrency"]),
                *(ratio(m.get(k)) for k in keys),
                *(ratio(a.get(k)) for k in keys),
                *(ratio(f.get(k)) for k in ("p50", "throughput")),
            ]
        )
    headers = ["config", "graph", "c", "mesh/minimal p50", "mesh/minimal p99", "mesh/minimal req/s"]
    headers += ["mesh/minimal CPU/req", "mesh/aio p50", "mesh/aio p99", "mesh/aio req/s", "mesh/aio CPU/req"]
    headers += ["mesh/floor p50", "mesh/floor req/s"]
    return ["## Ratios (same run, same models, same inputs)", "", table(headers, rows), ""]


def _hops(data: Mapping[str, Any]) -> list[str]:
    lines = [
        "## What a hop costs",
        "",
        "An *extra hop* is one extra gRPC call per request: the orchestrator's call to a service, one per "
        "model step (serial: pre, mlp, head = 3; parallel: pre, mlp, logreg = 3). The client's call to the "
        "orchestrator has its twin in the all-in-one mode, so it is not extra. *Sequential* hops are those "
        "on the critical path (parallel: 2, the two branches overlap). Added p50 = mesh p50 - all-in-one p50.",
        "",
        "The orchestrator's *own time* (its overhead metric) is request time minus the time at least one "
        "downstream call was in flight; its client-side gRPC work for those calls (build, serialize, send, "
        "receive, decode) falls inside the calls, so its *CPU per request* (from /proc) is the fuller measure "
        "of what it costs.",
        "",
    ]
    rows = [
        [
            h["model"],
            str(h["concurrency"]),
            str(h["extra_calls"]),
            str(h["sequential"]),
            num(h["mesh_p50_ms"], 3),
            num(h["all_in_one_p50_ms"], 3),
            num(h["added_p50_ms"], 3),
            num(h["per_extra_call_ms"], 3),
            num(h["per_sequential_hop_ms"], 3),
            num(h["orchestrator_overhead_ms"], 3),
            num(h["orchestrator_cpu_per_request_ms"], 3),
        ]
        for h in data["hops"]
    ]
    headers = ["graph", "c", "extra calls", "sequential", "mesh p50", "aio p50", "added ms", "ms/extra call"]
    headers += ["ms/sequential hop", "orch. own ms (metric)", "orch. CPU ms/req"]
    lines += [table(headers, rows), ""]
    raw = data.get("raw_hop")
    if raw:
        lines += [
            f"**One raw gRPC hop** (load generator -> model_a `digits-mlp`, c=1, vs the floor's single in-process "
            f"predict): p50 {raw['grpc_p50_ms']:.3f} ms vs {raw['floor_p50_ms']:.3f} ms, so one hop costs "
            f"**{raw['hop_p50_ms']:.3f} ms** at p50 here (p99 {raw['grpc_p99_ms']:.3f} vs "
            f"{raw['floor_p99_ms']:.3f} ms); CPU per call: {raw['server_cpu_per_request_ms']:.3f} ms in model_a + "
            f"{raw['loadgen_cpu_per_request_ms']:.3f} ms in the client.",
            "",
        ]
    return lines


def _large(data: Mapping[str, Any]) -> list[str]:
    large = data.get("large_model")
    if not large:
        return ["## Large model", "", "Skipped (`--skip-large`).", ""]
    compute = large["compute_ms_per_request"]
    points = [p for p in data["points"] if p["config"] != SMALL]
    lines = [
        "## Large model: the overhead shrinks as the model grows",
        "",
        f"An MLP with hidden layers {large['hidden']} ({large['parameters']:,} parameters), trained at bench time "
        f"on the digits' train split for {large['epochs']} epochs (held-out accuracy {large['heldout_accuracy']:.1%};"
        f" digits-head retrained on its embedding). onnxruntime compute per request, 1 thread: "
        f"{compute['1']:.2f} ms at batch 1, {compute['32']:.3f} ms at batch 32. `large+batching` = model_a with "
        f"`{json.dumps(large['batching_config'])}`.",
        "",
        table(POINT_HEADERS, (point_cells(p) for p in _sorted(points))),
        "",
    ]
    if data["batching"]:
        rows = [
            [
                b["mode"],
                b["model"],
                str(b["concurrency"]),
                f"{b['off_rps']:.0f}",
                f"{b['on_rps']:.0f}",
                ratio(b["throughput_ratio"]),
                f"{num(b['off_p50_ms'])} / {num(b['on_p50_ms'])}",
                f"{num(b['off_p99_ms'])} / {num(b['on_p99_ms'])}",
                f"{num(b['off_cpu_per_request_ms'], 3)} / {num(b['on_cpu_per_request_ms'], 3)}",
            ]
            for b in data["batching"]
        ]
        headers = [
            "endpoint",
            "model",
            "c",
            "off req/s",
            "on req/s",
            "on/off",
            "p50 ms off/on",
            "p99 ms off/on",
        ]
        lines += ["### Batching on vs off", "", table([*headers, "CPU ms/req off/on"], rows), ""]
    return lines


def disturbed_points(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Points during which something else used more than OTHER_LOAD_LIMIT of the machine."""
    return [p for p in _sorted(data["points"]) if (p.get("other_load") or 0.0) > OTHER_LOAD_LIMIT]


def _quality(data: Mapping[str, Any]) -> list[str]:
    """Points that something else on the machine disturbed, and the exact server commands."""
    lines = ["## Run quality and what ran", ""]
    disturbed = disturbed_points(data)
    if disturbed:
        names = ", ".join(
            f"{p['config']} {p['mode']} {p['model']} c={p['concurrency']} ({pct(p['other_load'])})"
            for p in disturbed
        )
        lines.append(
            f"**Disturbed points**: something outside this benchmark used more than {OTHER_LOAD_LIMIT:.0%} of "
            f"the machine during {names}. Their numbers are not comparable with the rest: rerun on a quiet "
            "machine."
        )
    else:
        worst = max((p.get("other_load") or 0.0 for p in data["points"]), default=0.0)
        lines.append(
            f"No point was disturbed: CPU used outside the measured processes stayed at or below {worst:.0%} "
            "of the machine (kernel work for loopback traffic included)."
        )
    lines += ["", "Server processes (default flags unless shown):", ""]
    for name, commands in data.get("servers", {}).items():
        for service, command in commands.items():
            lines.append(f"- {name}, {service}: `{command}`")
    return [*lines, ""]


def _loadgen(data: Mapping[str, Any]) -> list[str]:
    busy = [p for p in data["points"] if (p["loadgen_core_utilization"] or 0.0) >= LOADGEN_BUSY]
    lines = ["## The load generator", ""]
    lines.append(
        "It is one Python process (asyncio, one channel, requests pre-built) on the same cores as the servers; "
        "its CPU is reported apart (ms/request and share of all CPU the point used)."
    )
    if busy:
        worst = max(busy, key=lambda p: p["loadgen_core_utilization"])
        names = ", ".join(
            f"{p['config']} {p['mode']} {p['model']} c={p['concurrency']}" for p in _sorted(busy)
        )
        lines.append(
            f"It was **CPU-bound** (>= {LOADGEN_BUSY:.0%} of one core) at: {names}; up to "
            f"{worst['loadgen_core_utilization']:.0%} of a core and {pct(worst['loadgen_cpu_share'])} of the CPU "
            "used. At those points the offered load is limited by the client as much as by the servers, and "
            "the client takes CPU the servers would otherwise get."
        )
    else:
        lines.append(
            f"It never used {LOADGEN_BUSY:.0%} of a core: the load it offered was not client-limited."
        )
    return [*lines, ""]


def _profile(data: Mapping[str, Any]) -> list[str]:
    prof = data.get("profile")
    if not prof:
        return []
    if "summary" not in prof:
        return ["## Orchestrator profile", "", f"py-spy failed: {prof.get('error')}", ""]
    s = prof["summary"]
    point = prof["point"]

    def rows(key: str) -> list[list[str]]:
        return [[e["name"], str(e["samples"]), f"{e['percent']:.1f}%"] for e in s[key]]

    return [
        "## Orchestrator profile (py-spy)",
        "",
        f"py-spy on the orchestrator (pid {prof['pid']}), {prof['seconds']:g} s per recording, during an extra "
        f"{prof['model']} c={prof['concurrency']} point (kept out of the tables above: sampling slows the "
        f"process; that point ran {point['rps']:.0f} req/s, p50 {num(point['p50_ms'])} ms, orchestrator CPU "
        f"{ms(point['orchestrator_cpu_per_request_s'])} ms/request). Flame graph (Python frames): "
        f"`{prof['svg']}`; native stacks of the thread holding the GIL (`--native --gil`): `{prof['raw']}` "
        f"({s['samples']} samples). Time in grpc's Cython/C core and in system calls made while holding the GIL "
        "shows up as such; C-core threads that never take the GIL are covered by the thread split below.",
        "",
        "### The orchestrator's CPU by thread (from /proc, over both recordings)",
        "",
        table(["threads", "CPU s", "share"], _thread_rows(prof.get("thread_cpu_s", {}))),
        "",
        "### Where the GIL-holding samples were (area of the leaf frame)",
        "",
        table(["area", "samples", "share"], rows("areas")),
        "",
        "### Hottest leaf functions (native included)",
        "",
        table(["function", "samples", "share"], rows("self")),
        "",
        "### Hottest Python functions (innermost Python frame of each sample)",
        "",
        table(["function", "samples", "share"], rows("python")),
        "",
        "### Hottest functions on the stack (total, including callees)",
        "",
        table(["function", "samples", "share"], rows("total")),
        "",
    ]


def _thread_rows(threads: Mapping[str, float]) -> list[list[str]]:
    total = sum(threads.values()) or 1.0
    return [[name, f"{seconds:.2f}", f"{seconds / total:.0%}"] for name, seconds in threads.items()]


def markdown(data: Mapping[str, Any]) -> str:
    sections = [
        _header(data),
        _targets(data),
        _points(data),
        _ratios(data),
        _hops(data),
        costs.grpc_servers(data),
        costs.coalescing(data),
        costs.growth(data),
        costs.cache(data),
        _large(data),
        _loadgen(data),
        _quality(data),
        _profile(data),
        [f"Plot: `{PNG_NAME}` (p50 and p99 latency vs throughput, one line per config/mode/graph).", ""],
    ]
    return "\n".join(line for section in sections for line in section)


def console_summary(data: Mapping[str, Any]) -> list[str]:
    """The ratios, hop costs and targets, for the terminal at the end of a run."""
    lines = [
        "ratios (mesh / minimal | mesh / all-in-one | mesh / floor): p50, p99, throughput, CPU per request"
    ]
    keys = ("p50", "p99", "throughput", "cpu_per_request")
    for r in data["ratios"]:
        m, a, f = r.get("mesh_vs_minimal") or {}, r["mesh_vs_all_in_one"] or {}, r["mesh_vs_floor"] or {}
        lines.append(
            f"  {r['config']:<14} {r['model']:<16} c={r['concurrency']:<3} "
            + " | ".join(" ".join(ratio(d.get(k)) for k in keys) for d in (m, a, f))
        )
    lines += costs.console(data)
    for h in data["hops"]:
        lines.append(
            f"  hop cost {h['model']} c={h['concurrency']}: +{h['added_p50_ms']:.3f} ms p50 over all-in-one = "
            f"{h['per_extra_call_ms']:.3f} ms per extra call ({h['extra_calls']}), "
            f"{h['per_sequential_hop_ms']:.3f} ms per sequential hop ({h['sequential']}); orchestrator own "
            f"{num(h['orchestrator_overhead_ms'], 3)} ms, CPU {num(h['orchestrator_cpu_per_request_ms'], 3)} ms/request"
        )
    disturbed = disturbed_points(data)
    if disturbed:
        lines.append(
            f"  WARNING: {len(disturbed)} point(s) disturbed by other load on the machine (see report.md)"
        )
    raw = data.get("raw_hop")
    if raw:
        lines.append(
            f"  one raw gRPC hop (model_a direct vs in-process predict, c=1): {raw['hop_p50_ms']:.3f} ms p50"
        )
    for b in data["batching"]:
        lines.append(
            f"  batching on/off {b['mode']} {b['model']} c={b['concurrency']}: {ratio(b['throughput_ratio'])} throughput"
        )
    for t in data["targets"]:
        verdict = {None: "n/a", True: "met", False: "MISSED"}[t["met"]]
        lines.append(f"target {t['id']}: {verdict:<6} {t['target']}: {t['limit']}")
        lines += [f"    {line}" for line in check_lines(t)]
    return lines


# -- plot -----------------------------------------------------------------------------------------


def plot(points: Sequence[Mapping[str, Any]], path: Path) -> None:
    """p50 and p99 latency vs throughput, one line per (config, mode, graph) over its concurrencies."""
    series: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for p in _sorted(points):
        series.setdefault((p["config"], p["mode"], p["model"]), []).append(p)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    for ax, key, title in ((axes[0], "p50_ms", "p50"), (axes[1], "p99_ms", "p99")):
        for (config, mode, model), rows in series.items():
            xs = [r["rps"] for r in rows]
            ys = [r[key] for r in rows]
            marker = "o" if model.endswith("serial") else ("s" if model.endswith("parallel") else "^")
            ax.plot(
                xs,
                ys,
                linestyle=STYLES.get(config, "-"),
                marker=marker,
                color=COLORS.get(mode, "gray"),
                label=f"{config} {mode} {model}",
            )
            for r in rows:
                ax.annotate(f"c={r['concurrency']}", (r["rps"], r[key]), fontsize=7, alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s, log)")
        ax.set_ylabel(f"{title} latency (ms, log)")
        ax.set_title(f"{title} latency vs throughput")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)
