"""The whole benchmark, in one run: which modes, graphs and concurrencies, in what order.

    small models (the demo digits models)
      floor        each graph x each concurrency, plus one digits-mlp predict at c=1
      all-in-one   each graph x each concurrency (the mesh's own parts in one process)
      minimal      each graph x each concurrency (the hand-written server: bench/targets/minimal.py)
      minimal aio  the first graph at the lowest and highest concurrency: the same handlers on
                   grpc.aio instead of the sync server
      mesh         each graph x each concurrency, plus model_a direct at c=1 (one raw hop),
                   plus (--profile) a py-spy'd point of the orchestrator, reported apart
    growth (bench/targets/growth.py; --growth-steps 0 leaves it out)
      mesh         chain-1..N and fanout-1..N of identity models at the lowest concurrency;
                   digits-serial-cached (a whole-graph response cache) at the lowest and highest
    large model (--skip-large leaves it out)
      floor, all-in-one, mesh      digits-serial at the lowest and the highest concurrency
      mesh, batching off / on      model_a direct and digits-serial at the highest concurrency

Modes run one after another, each with only its own processes alive, so no idle mode's
processes share the two cores with the one being measured.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.load.pyspy import BackgroundProfile, summarize_file
from bench.models import DEFAULT_DIRS
from bench.report import analysis
from bench.report.analysis import FLOOR, GROWTH, LARGE, LARGE_BATCHING, SMALL
from bench.runner import Target, Timing, all_in_one, local_mesh, minimal, run_point, service_target
from bench.targets import growth
from bench.targets.large_model import DEFAULT_EPOCHS, DEFAULT_HIDDEN, LargeModel, build_large_model
from demo.digits import load_holdout
from demo.topology import ORCHESTRATOR
from meshctl.launcher import DEMO_MESH as DEFAULT_GRAPHS
from meshctl.process import REPO
from orchestrator.spec import load_spec

GRAPHS = ("digits-serial", "digits-parallel")
PROFILE_SECONDS = 5.0
VERSIONED = (
    "grpcio",
    "protobuf",
    "onnxruntime",
    "numpy",
    "onnx",
    "scikit-learn",
    "prometheus-client",
    "py-spy",
)


@dataclass(frozen=True)
class Options:
    """What to run; see `python -m bench --help`."""

    timing: Timing
    concurrency: tuple[int, ...]
    graphs: tuple[str, ...]
    out: Path
    profile: bool = False
    skip_large: bool = False
    large_hidden: tuple[int, ...] = DEFAULT_HIDDEN
    large_epochs: int = DEFAULT_EPOCHS
    profile_seconds: float = PROFILE_SECONDS
    growth_steps: int = growth.DEFAULT_MAX_STEPS
    command: str = ""

    @property
    def low(self) -> int:
        return min(self.concurrency)

    @property
    def high(self) -> int:
        return max(self.concurrency)


class Suite:
    """Runs the plan of the module docstring; `run` returns everything the report needs."""

    def __init__(self, options: Options, log: Callable[[str], None] = print) -> None:
        self.options = options
        self.log = log
        self.points: list[dict[str, Any]] = []
        self.profile: dict[str, Any] | None = None
        self.large: dict[str, Any] | None = None
        #: "<config> <mode>" -> the command line of each of its server processes.
        self.servers: dict[str, dict[str, str]] = {}

    def point(self, target: Target, model: str, concurrency: int) -> dict[str, Any]:
        self.servers.setdefault(f"{target.config} {target.mode}", target.commands)
        row = run_point(target, model, concurrency, self.options.timing)
        self.points.append(row)
        self.log(line(row))
        return row

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.log(
            f"bench: {len(self.options.graphs)} graph(s) x c={list(self.options.concurrency)}, "
            f"{self.options.timing.warmup:g}s warm-up + {self.options.timing.duration:g}s per point"
        )
        self.run_small()
        if self.options.growth_steps > 0:
            self.run_growth()
        if not self.options.skip_large:
            self.run_large()
        return self.data(time.perf_counter() - started)

    # -- sections ----------------------------------------------------------------------------------

    def run_small(self) -> None:
        o = self.options
        floor = Target(FLOOR, SMALL, service_dirs=dict(DEFAULT_DIRS))
        for graph in o.graphs:
            for c in o.concurrency:
                self.point(floor, graph, c)
        self.point(floor, "digits-mlp", 1)
        with all_in_one(SMALL, DEFAULT_DIRS) as target:
            for graph in o.graphs:
                for c in o.concurrency:
                    self.point(target, graph, c)
        with minimal(SMALL) as target:
            for graph in o.graphs:
                for c in o.concurrency:
                    self.point(target, graph, c)
        # The same handlers on grpc.aio: which server costs less per call (the nodes run grpc.aio).
        with minimal(SMALL, aio=True) as target:
            for c in sorted({o.low, o.high}):
                self.point(target, o.graphs[0], c)
        with local_mesh(SMALL, {}) as (mesh, target):
            for graph in o.graphs:
                for c in o.concurrency:
                    self.point(target, graph, c)
            self.point(service_target(mesh, "model_a", SMALL), "digits-mlp", 1)
            if o.profile:
                self.run_profile(target)

    def run_profile(self, target: Target) -> None:
        """One extra point with py-spy on the orchestrator; its numbers stay out of the main table."""
        o = self.options
        graph = "digits-parallel" if "digits-parallel" in o.graphs else o.graphs[0]
        pid = target.servers[ORCHESTRATOR]
        profiler = BackgroundProfile(pid, o.out, "orchestrator", o.profile_seconds)
        # Both recordings (flame graph, then raw stacks) must fit in the measured window.
        timing = Timing(o.timing.warmup, 2 * o.profile_seconds + 2.0)
        self.log(f"bench: profiling the orchestrator (pid {pid}) on {graph} c={o.high} ...")
        row = run_point(target, graph, o.high, timing, on_window=profiler.start)
        if profiler.error is not None or profiler.recording is None:
            self.log(f"bench: profiling failed: {profiler.error}")
            self.profile = {"error": str(profiler.error), "point": row}
            return
        self.profile = {
            "model": graph,
            "concurrency": o.high,
            "pid": pid,
            "seconds": o.profile_seconds,
            "svg": profiler.recording.svg.name,
            "raw": profiler.recording.raw.name,
            "summary": summarize_file(profiler.recording.raw),
            "thread_cpu_s": profiler.recording.threads,
            "point": row,
        }

    def run_growth(self) -> None:
        """Chains and fan-outs of identity models, and the cached graph, on a mesh of their own."""
        o = self.options
        with tempfile.TemporaryDirectory(prefix="onnxmesh-growth-") as tmp:
            setup = growth.build(Path(tmp), DEFAULT_GRAPHS, o.growth_steps)
            with local_mesh(GROWTH, setup.dirs, graphs=setup.graphs) as (_, target):
                for graph in setup.names:
                    self.point(target, graph, o.low)
                # The highest concurrency first: it fills the cache (360 images) for the lone request.
                for c in sorted({o.low, o.high}, reverse=True):
                    self.point(target, growth.CACHED_GRAPH, c)

    def run_large(self) -> None:
        o = self.options
        with tempfile.TemporaryDirectory(prefix="onnxmesh-bench-") as tmp:
            self.log(f"bench: training the large model {o.large_hidden} ({o.large_epochs} epochs) ...")
            model = build_large_model(Path(tmp), load_holdout(), hidden=o.large_hidden, epochs=o.large_epochs)
            self.large = model.describe()
            self.log(
                f"bench: large model: {model.parameters:,} parameters, held-out accuracy {model.accuracy:.3f}, "
                f"{model.compute_ms[1]:.2f} ms/request at batch 1, {model.compute_ms[32]:.3f} at batch 32"
            )
            self.run_large_modes(model)

    def run_large_modes(self, model: LargeModel) -> None:
        o = self.options
        ends = sorted({o.low, o.high})
        floor = Target(FLOOR, LARGE, service_dirs={**DEFAULT_DIRS, **model.dirs})
        for c in ends:
            self.point(floor, "digits-serial", c)
        with all_in_one(LARGE, model.dirs) as target:
            for c in ends:
                self.point(target, "digits-serial", c)
        with local_mesh(LARGE, model.dirs) as (mesh, target):
            for c in ends:
                self.point(target, "digits-serial", c)
            self.point(service_target(mesh, "model_a", LARGE), "digits-mlp", o.high)
        with local_mesh(LARGE_BATCHING, model.batching_dirs) as (mesh, target):
            self.point(target, "digits-serial", o.high)
            self.point(service_target(mesh, "model_a", LARGE_BATCHING), "digits-mlp", o.high)

    # -- results -----------------------------------------------------------------------------------

    def data(self, elapsed: float) -> dict[str, Any]:
        """Everything report.json holds: meta, points, and the analysis of the points."""
        o = self.options
        return {
            "meta": meta(o, elapsed),
            "servers": self.servers,
            "points": self.points,
            **analysis.analyze(self.points, load_spec(DEFAULT_GRAPHS), o.low, o.high),
            "large_model": self.large,
            "profile": self.profile,
        }


def line(row: dict[str, Any]) -> str:
    """One progress line per point."""
    cpu = row["server_cpu_per_request_s"] * 1000.0
    lg = row["loadgen_cpu_share"]
    share = "" if lg is None else f", loadgen {lg:.0%} of CPU"
    return (
        f"  {row['config']:<14} {row['mode']:<14} {row['model']:<16} c={row['concurrency']:<3} "
        f"{row['rps']:8.0f} req/s  p50 {_ms_text(row['p50_ms'])}  p99 {_ms_text(row['p99_ms'])} ms  "
        f"{cpu:.3f} ms CPU/req{share}  errors {row['errors']}  wrong {row['wrong']}"
    )


def _ms_text(value: float | None) -> str:
    return "      -" if value is None else f"{value:7.3f}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> dict[str, Any]:
    """The commit, and the tracked files changed since (the checkout may be shared and moving)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short=12", "HEAD") or "unknown",
        "modified": [line[3:] for line in changed.splitlines()],
    }


def meta(options: Options, elapsed: float) -> dict[str, Any]:
    """The machine, versions, command and settings of the run."""
    return {
        "machine": {
            "cores": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "kernel": platform.release(),
            "platform": platform.platform(),
        },
        "versions": {"python": sys.version.split()[0], **{p: _version(p) for p in VERSIONED}},
        "command": options.command,
        "code": code_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(time.time() - elapsed)),
        "elapsed_s": elapsed,
        "settings": {
            "warmup_s": options.timing.warmup,
            "duration_s": options.timing.duration,
            "concurrency": list(options.concurrency),
            "graphs": list(options.graphs),
            "skip_large": options.skip_large,
            "growth_steps": options.growth_steps,
            "profile": options.profile,
            "batch_size_per_request": 1,
            "loopback": "127.0.0.1",
        },
    }
