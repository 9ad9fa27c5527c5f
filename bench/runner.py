"""Runs benchmark points: one load-driver process against one target, with CPU and metrics around it.

A *target* is what a point measures: the floor (no server; the driver process is the work), the
all-in-one server, the mesh's orchestrator, or one service of the mesh directly. A *point* is one
closed-loop run of `bench.load.loadgen` (or `bench.targets.in_process`) at one concurrency. When the driver prints
its window markers, the runner snapshots /proc CPU of every server process of the target and of
the driver, and scrapes the orchestrator's overhead histogram, so all of them cover the same
window as the requests; and the rows per downstream call and the cache's hits and misses, from the
same scrape.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.load import procstat
from bench.load.measure import MEASURED, MEASURING, RESULT
from demo.topology import ORCHESTRATOR
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from meshctl.process import REPO, ServiceProcess, wait_serving

OVERHEAD_METRIC = "onnxmesh_orchestrator_overhead_seconds"
ROWS_METRIC = "onnxmesh_downstream_call_rows"
CACHE_METRIC = "onnxmesh_cache_lookups"
SCRAPED = (OVERHEAD_METRIC, ROWS_METRIC, CACHE_METRIC)
#: One scrape: (sample name, sorted labels) -> value, for the families in SCRAPED.
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]
#: The keys of the load driver's process and of this (runner) process in CPU snapshots.
DRIVER = "driver"
RUNNER = "runner"
STARTUP_TIMEOUT = 60.0
#: Extra seconds a driver process may take beyond warm-up + duration (start-up, drain, summary).
POINT_SLACK_S = 60.0


@dataclass(frozen=True)
class Timing:
    """Seconds of warm-up (not measured) and of the measured window of every point."""

    warmup: float
    duration: float


@dataclass
class Target:
    """What a point runs against.

    `address` is None for the floor (its driver process does the work). `servers` maps a name to
    the pid of each server process whose CPU the mode pays for. `metrics_url` is the
    orchestrator's /metrics, for its own-time histogram. `service_dirs` tells the floor which
    model directories to load.
    """

    mode: str
    config: str
    address: str | None = None
    servers: dict[str, int] = field(default_factory=dict)
    metrics_url: str | None = None
    orchestrator: str | None = None
    service_dirs: dict[str, Path] = field(default_factory=dict)
    #: The command line of each server process (what exactly was measured).
    commands: dict[str, str] = field(default_factory=dict)


#: Called when the measured window opens (e.g. to start a profiler); returns a finisher.
WindowHook = Callable[[], Callable[[], None]]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (for the orchestrator's metrics endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def scrape(url: str, families: Sequence[str] = SCRAPED) -> Scrape:
    """A node's samples of `families` (histogram sums and counts, counters); by default the
    orchestrator's that the suite reads."""
    with urllib.request.urlopen(url, timeout=5.0) as response:
        text = response.read().decode()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        if family.name not in families:
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count", "_total")):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scraped_delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """What the samples called `name` whose labels include `labels` grew by over the window."""
    wanted = set(labels.items())
    return sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == name and wanted <= set(key[1])
    )


def driver_command(target: Target, model: str, concurrency: int, timing: Timing) -> list[str]:
    """The command line of the load driver of one point."""
    common = ["--concurrency", str(concurrency), "--duration", str(timing.duration)]
    common += ["--warmup", str(timing.warmup), "--json"]
    if target.address is None:
        dirs = [
            arg
            for service, path in target.service_dirs.items()
            for arg in ("--service-dir", f"{service}={path}")
        ]
        return [sys.executable, "-m", "bench.targets.in_process", "--graph", model, *common, *dirs]
    return [sys.executable, "-m", "bench.load.loadgen", "--target", target.address, "--model", model, *common]


@dataclass
class _Window:
    """What the runner saw at the driver's window markers."""

    cpu_before: procstat.CpuSnapshot | None = None
    cpu_after: procstat.CpuSnapshot | None = None
    metrics_before: Scrape = field(default_factory=dict)
    metrics_after: Scrape = field(default_factory=dict)
    result: dict[str, Any] | None = None


def run_point(
    target: Target, model: str, concurrency: int, timing: Timing, *, on_window: WindowHook | None = None
) -> dict[str, Any]:
    """Run one point and return its row (see `point_row`)."""
    command = driver_command(target, model, concurrency, timing)
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
        # A hung driver must not hang the benchmark: kill it once it is clearly overdue.
        watchdog = threading.Timer(timing.warmup + timing.duration + POINT_SLACK_S, proc.kill)
        watchdog.start()
        try:
            seen = _follow(proc, target, on_window)
            code = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        errors = stderr.read()
    if code != 0 or seen.result is None or seen.cpu_before is None or seen.cpu_after is None:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}):\n{errors[-4000:]}")
    return point_row(target, model, concurrency, seen)


def _follow(proc: subprocess.Popen[str], target: Target, on_window: WindowHook | None) -> _Window:
    """Read the driver's JSON lines; snapshot CPU and metrics at its markers."""
    assert proc.stdout is not None
    seen = _Window()
    pids = {**target.servers, DRIVER: proc.pid, RUNNER: os.getpid()}
    finish: Callable[[], None] | None = None
    try:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue  # not part of the protocol (a stray print): ignore it
            event = json.loads(line)
            kind = event.get("event")
            if kind == MEASURING:
                seen.cpu_before = procstat.snapshot(pids)
                if target.metrics_url:
                    seen.metrics_before = scrape(target.metrics_url)
                if on_window is not None:
                    finish = on_window()
            elif kind == MEASURED:
                seen.cpu_after = procstat.snapshot(pids)
                if target.metrics_url:
                    seen.metrics_after = scrape(target.metrics_url)
            elif kind == RESULT:
                seen.result = event
    finally:
        if finish is not None:
            finish()
    return seen


def point_row(target: Target, model: str, concurrency: int, seen: _Window) -> dict[str, Any]:
    """One row of the report: throughput, latency, errors and CPU per request of one point."""
    assert seen.result is not None and seen.cpu_before is not None and seen.cpu_after is not None
    result = seen.result
    cpu = procstat.usage(seen.cpu_before, seen.cpu_after)
    requests = max(1, int(result["requests"]))
    window = float(result["window_s"])
    driver_cpu = cpu.seconds.get(DRIVER, 0.0)
    # The floor's driver *is* the work: it counts as the server, and there is no load generator.
    floor = target.address is None
    server_cpu = driver_cpu if floor else cpu.total(target.servers)
    loadgen_cpu = None if floor else driver_cpu
    latency = result["latency_ms"]
    row: dict[str, Any] = {
        "mode": target.mode,
        "config": target.config,
        "model": model,
        "concurrency": concurrency,
        "window_s": window,
        "requests": int(result["requests"]),
        "rps": float(result["rps"]),
        "p50_ms": latency["p50"],
        "p90_ms": latency["p90"],
        "p99_ms": latency["p99"],
        "mean_ms": latency["mean"],
        "max_ms": latency["max"],
        "errors": int(result["errors"]),
        "error_codes": result["error_codes"],
        "wrong": int(result["wrong"]),
        "accuracy": 1.0 - int(result["wrong"]) / requests,
        "server_cpu_s": server_cpu,
        "server_cpu_per_request_s": server_cpu / requests,
        "server_cpu_by_process_s": {name: cpu.seconds.get(name, 0.0) for name in target.servers},
        "loadgen_cpu_s": loadgen_cpu,
        "loadgen_cpu_per_request_s": None if loadgen_cpu is None else loadgen_cpu / requests,
        "loadgen_cpu_share": None
        if loadgen_cpu is None
        else loadgen_cpu / max(1e-9, loadgen_cpu + server_cpu),
        "loadgen_core_utilization": None if loadgen_cpu is None else loadgen_cpu / window,
        "machine_busy": cpu.machine_busy,
        # The driver is counted once: as the server for the floor, as the load generator otherwise.
        "other_load": other_load(cpu, server_cpu + (loadgen_cpu or 0.0) + cpu.seconds.get(RUNNER, 0.0)),
        "orchestrator_overhead_ms": None,
        "orchestrator_cpu_per_request_s": None,
        "downstream_calls": None,
        "rows_per_call": None,
        "cache_hits": None,
        "cache_misses": None,
    }
    if target.orchestrator is not None and target.orchestrator in target.servers:
        row["orchestrator_cpu_per_request_s"] = cpu.seconds.get(target.orchestrator, 0.0) / requests
    if target.metrics_url:
        row.update(orchestrator_metrics(seen.metrics_before, seen.metrics_after, model))
    return row


def orchestrator_metrics(before: Scrape, after: Scrape, graph: str) -> dict[str, Any]:
    """Own time per request, downstream calls and rows per call, cache hits and misses, over a window."""
    out: dict[str, Any] = {}
    count = scraped_delta(before, after, f"{OVERHEAD_METRIC}_count", graph=graph)
    if count > 0:
        out["orchestrator_overhead_ms"] = (
            scraped_delta(before, after, f"{OVERHEAD_METRIC}_sum", graph=graph) / count * 1000.0
        )
    calls = scraped_delta(before, after, f"{ROWS_METRIC}_count")
    if calls > 0:
        out["downstream_calls"] = int(calls)
        out["rows_per_call"] = scraped_delta(before, after, f"{ROWS_METRIC}_sum") / calls
    hits = scraped_delta(before, after, f"{CACHE_METRIC}_total", cache=graph, result="hit")
    misses = scraped_delta(before, after, f"{CACHE_METRIC}_total", cache=graph, result="miss")
    if hits or misses:
        out["cache_hits"], out["cache_misses"] = int(hits), int(misses)
    return out


def other_load(cpu: procstat.CpuUsage, ours: float) -> float:
    """Share of the machine's CPU used by anything but this point's processes (0..1).

    Other work on the machine (another benchmark, a test run) takes cores from the servers and
    makes the point disagree with the rest of the run. Kernel work for our own loopback traffic
    that runs outside our processes (softirq threads) lands here too, so a few percent is normal.
    """
    if cpu.machine_total_s <= 0:
        return 0.0
    return max(0.0, cpu.machine_busy_s - ours) / cpu.machine_total_s


# -- the targets' processes ---------------------------------------------------------------------


@contextlib.contextmanager
def all_in_one(config: str, dirs: Mapping[str, Path], log_level: str = "WARNING") -> Iterator[Target]:
    """`python -m bench.targets.all_in_one` on a free port, SERVING, stopped on exit."""
    command = [sys.executable, "-m", "bench.targets.all_in_one", "--host", "127.0.0.1", "--port", "0"]
    command += ["--log-level", log_level, "--grace", "1"]
    for service, path in dirs.items():
        command += ["--service-dir", f"{service}={path}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = ServiceProcess("all_in_one", 1, "127.0.0.1", 0, command, env, None)
    try:
        wait_serving([proc], STARTUP_TIMEOUT, threading.Event())
        commands = {"all_in_one": shlex.join(command)}
        yield Target("all-in-one", config, proc.address, {"all_in_one": proc.pid}, commands=commands)
    finally:
        proc.stop(10.0)


@contextlib.contextmanager
def minimal(config: str, *, aio: bool = False) -> Iterator[Target]:
    """`python -m bench.targets.minimal` (the hand-written all-in-one) on a free port, SERVING, stopped on exit.

    `aio`: the same handlers on a grpc.aio server (mode `minimal aio`), to weigh the two servers.
    """
    command = [sys.executable, "-m", "bench.targets.minimal", "--host", "127.0.0.1", "--port", "0"]
    command += ["--aio"] if aio else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = ServiceProcess("minimal", 1, "127.0.0.1", 0, command, env, None)
    try:
        wait_serving([proc], STARTUP_TIMEOUT, threading.Event())
        commands = {"minimal": shlex.join(command)}
        mode = "minimal aio" if aio else "minimal"
        yield Target(mode, config, proc.address, {"minimal": proc.pid}, commands=commands)
    finally:
        proc.stop(10.0)


@contextlib.contextmanager
def local_mesh(
    config: str, dirs: Mapping[str, Path], log_level: str = "WARNING", graphs: Path | None = None
) -> Iterator[tuple[LocalMesh, Target]]:
    """The real services and orchestrator as separate processes on free ports, stopped on exit.

    The orchestrator also serves /metrics on a free port, for its own-time histogram, and
    `graphs` (default: demo/mesh.yaml).
    """
    metrics_port = free_port()
    mesh = LocalMesh(
        ports=EPHEMERAL_PORTS,
        graphs=graphs,
        model_dirs=dict(dirs),
        extra_args={ORCHESTRATOR: ["--metrics-port", str(metrics_port)]},
        log_level=log_level,
        grace=1.0,
    )
    with mesh:
        servers = {p.service: p.pid for p in mesh.processes()}
        yield (
            mesh,
            Target(
                "mesh",
                config,
                mesh.address(ORCHESTRATOR),
                servers,
                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                orchestrator=ORCHESTRATOR,
                commands={p.service: shlex.join(p.command) for p in mesh.processes()},
            ),
        )


def service_target(mesh: LocalMesh, service: str, config: str) -> Target:
    """One service of a running mesh, called directly (no orchestrator): its CPU only."""
    proc = mesh.process(service)
    commands = {service: shlex.join(proc.command)}
    return Target(f"{service} direct", config, proc.address, {service: proc.pid}, commands=commands)
