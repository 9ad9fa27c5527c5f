"""What a closed-loop run measures, and how it tells the benchmark driver about it.

Both load drivers (the gRPC load generator and the in-process floor) run the same protocol:
warm up for `warmup` seconds, measure for `duration` seconds, stop. With `--json` they print
one JSON object per line on stdout:

    {"event": "measuring", ...}   the measured window starts now
    {"event": "measured", ...}    it ends now
    {"event": "result", ...}      the summary (`summarize`)

The driver snapshots the servers' CPU and metrics when it reads each marker, so CPU and
requests are counted over the same window. A request counts in the window when it *completes*
inside it: throughput is completions per second, latencies are those completions' latencies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MEASURING = "measuring"
MEASURED = "measured"
RESULT = "result"
#: Latency percentiles every result reports, in milliseconds.
PERCENTILES = (50, 90, 99)


@dataclass
class Samples:
    """Completed requests of one worker (or one event loop): end times, latencies, outcomes.

    Plain lists appended on the hot path; nothing is computed until `summarize`.
    """

    ends: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    error_ends: list[float] = field(default_factory=list)
    error_codes: list[str] = field(default_factory=list)

    def ok(self, end: float, latency: float, correct: bool) -> None:
        self.ends.append(end)
        self.latencies.append(latency)
        self.correct.append(correct)

    def error(self, end: float, code: str) -> None:
        self.error_ends.append(end)
        self.error_codes.append(code)

    def extend(self, other: Samples) -> None:
        self.ends += other.ends
        self.latencies += other.latencies
        self.correct += other.correct
        self.error_ends += other.error_ends
        self.error_codes += other.error_codes


@dataclass(frozen=True)
class Window:
    """The measured window, in `time.perf_counter()` seconds, and the driver's CPU over it."""

    start: float
    end: float
    cpu_s: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def summarize(samples: Samples, window: Window, **about: Any) -> dict[str, Any]:
    """The result object of a run: rates, latency percentiles (ms), errors and wrong labels."""
    ends = np.asarray(samples.ends)
    inside = (ends >= window.start) & (ends <= window.end)
    latencies = np.asarray(samples.latencies)[inside] * 1000.0
    correct = np.asarray(samples.correct, dtype=bool)[inside]
    codes = Counter(
        code
        for end, code in zip(samples.error_ends, samples.error_codes, strict=True)
        if window.start <= end <= window.end
    )
    count = int(inside.sum())
    latency = {f"p{p}": float(np.percentile(latencies, p)) if count else None for p in PERCENTILES}
    latency["mean"] = float(latencies.mean()) if count else None
    latency["max"] = float(latencies.max()) if count else None
    return {
        "event": RESULT,
        **about,
        "window_s": window.seconds,
        "requests": count,
        "rps": count / window.seconds if window.seconds > 0 else 0.0,
        "latency_ms": latency,
        "errors": sum(codes.values()),
        "error_codes": dict(codes),
        "wrong": int(count - correct.sum()),
        "driver_cpu_s": window.cpu_s,
    }


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed at once (the driver acts on it when it arrives)."""
    sys.stdout.write(json.dumps({"event": event, "t": time.perf_counter(), **fields}) + "\n")
    sys.stdout.flush()


def describe(result: dict[str, Any]) -> str:
    """A one-line human summary of a result (without `--json`)."""
    lat = result["latency_ms"]

    def ms(key: str) -> str:
        value = lat.get(key)
        return "-" if value is None else f"{value:.2f}"

    return (
        f"{result.get('model', '?')} c={result.get('concurrency', '?')}: {result['rps']:.0f} req/s, "
        f"p50 {ms('p50')} ms, p90 {ms('p90')} ms, p99 {ms('p99')} ms, {result['requests']} requests, "
        f"{result['errors']} errors, {result['wrong']} wrong labels, own CPU {result['driver_cpu_s']:.2f} s"
    )


def add_run_options(parser: argparse.ArgumentParser, workers: str) -> None:
    """The options every load driver shares: the closed loop, its window, the data, --json."""
    parser.add_argument("--concurrency", type=int, default=1, help=f"closed-loop {workers} (default: 1)")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds (default: 4)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default: 2)")
    parser.add_argument(
        "--holdout",
        type=Path,
        default=None,
        help="held-out digits (.npz; default: the ones shipped with onnxmesh)",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines: window markers, then the result")


def run_options_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the shared options, if anything."""
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0:
        return "--concurrency >= 1, --duration > 0 and --warmup >= 0 please"
    return None
