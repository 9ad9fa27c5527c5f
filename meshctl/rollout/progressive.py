"""`rollout progressive GRAPH STEP`: move a splitter's canary through weights, promoting on evidence.

At each weight of ``steps`` (default 5, 25, 50 %) the canary (the splitter's second branch) is
compared with stable (its first) over the step's window, from the orchestrators' own metrics
(their ``/metrics`` endpoints, summed over replicas; counters read at the start and the end):

- ``errors``:     canary error rate - stable error rate <= ``max_error_increase``
- ``latency``:    canary p99 / stable p99 <= ``max_p99_ratio`` (step latency, answered calls)
- ``agreement``:  with ``mirror`` (GRAPH/STEP of a mirror step shadowing stable with the canary),
                  the share of compared answers that agree >= ``min_agreement``
- ``min-requests``: both branches (and the mirror) reached ``min_requests`` in the window; a
                  window is extended up to ``max_wait`` for them, so a quiet hour never promotes.

All gates pass: the next weight; after the last, the canary gets 100 % (promoted). A gate fails:
the canary goes back to 0 % and the failed gate is named (exit 1). Each step's numbers are printed.

The weights live in the spec: a local file (the orchestrator reloads it) or the graph ConfigMap
(as `rollout canary`). Nothing else is kept: a rerun reads the canary's current weight and resumes
from that step (gating it again), so an interrupted run is resumed by running it again, or ended
with `rollout abort`.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from prometheus_client.parser import text_string_to_metric_families

from meshctl.rollout.cluster import ClusterApi
from meshctl.rollout.commands import edit_splitter
from meshctl.rollout.errors import RolloutError, UsageError
from meshctl.rollout.graphs import Branch, RolloutSettings, check_spec, read_spec_text
from meshctl.rollout.weights import set_splitter_weights, splitter_branches

DEFAULT_STEPS = (5, 25, 50)
STEP_METRIC = "onnxmesh_step_duration_seconds"
MIRROR_METRIC = "onnxmesh_mirror_comparisons_total"


@dataclass(frozen=True)
class Gates:
    max_error_increase: float = 0.01
    max_p99_ratio: float = 1.5
    min_agreement: float = 0.95
    min_requests: int = 50


class WeightStore(Protocol):
    """Where a splitter's weights live: read them, write them."""

    def branches(self) -> list[Branch]: ...

    def set(self, weights: Mapping[str, int]) -> None: ...


class ConfigMapWeights:
    """The graph ConfigMap on Kubernetes, edited as `rollout canary` does (read-modify-replace)."""

    def __init__(self, api: ClusterApi, settings: RolloutSettings, graph: str, step: str) -> None:
        self.api, self.settings, self.graph, self.step = api, settings, graph, step

    def branches(self) -> list[Branch]:
        return splitter_branches(read_spec_text(self.api, self.settings)[1], self.graph, self.step)

    def set(self, weights: Mapping[str, int]) -> None:
        edit_splitter(self.api, self.settings, self.graph, self.step, lambda _: dict(weights))


class SpecFile:
    """The local mesh's spec file; written whole and atomically (the orchestrator reloads it)."""

    def __init__(self, path: Path, graph: str, step: str) -> None:
        self.path, self.graph, self.step = path, graph, step

    def branches(self) -> list[Branch]:
        return splitter_branches(self.path.read_text(), self.graph, self.step)

    def set(self, weights: Mapping[str, int]) -> None:
        text = set_splitter_weights(self.path.read_text(), self.graph, self.step, weights)
        check_spec(text)
        tmp = self.path.with_name(f".{self.path.name}.rollout")
        tmp.write_text(text)
        os.replace(tmp, self.path)


#: (metric sample name, label items) -> value
Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(urls: Sequence[str]) -> dict[Sample, float]:
    """The step and mirror samples of every orchestrator, summed over them (one per replica)."""
    totals: dict[Sample, float] = defaultdict(float)
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError as exc:
            raise RolloutError(f"cannot read the orchestrator's metrics at {url}: {exc}") from None
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(STEP_METRIC) or s.name == MIRROR_METRIC:
                    totals[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return dict(totals)


@dataclass(frozen=True)
class BranchWindow:
    requests: int
    errors: int
    p99: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def _quantile(q: float, buckets: Mapping[float, float]) -> float:
    """histogram_quantile over cumulative bucket counts (upper bound -> count), as Prometheus does."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def branch_window(
    start: Mapping[Sample, float], end: Mapping[Sample, float], graph: str, step: str
) -> BranchWindow:
    """A branch's calls, failures and p99 latency of answered calls between two scrapes."""
    requests = errors = 0.0
    buckets: dict[float, float] = defaultdict(float)
    for (name, items), value in end.items():
        labels = dict(items)
        if labels.get("graph") != graph or labels.get("step") != step:
            continue
        delta = value - start.get((name, items), 0.0)
        if name == STEP_METRIC + "_count":
            requests += delta
            if labels.get("status") != "ok":
                errors += delta
        elif name == STEP_METRIC + "_bucket" and labels.get("status") == "ok":
            buckets[float(labels["le"])] += delta
    return BranchWindow(int(requests), int(errors), _quantile(0.99, buckets))


def mirror_window(start: Mapping[Sample, float], end: Mapping[Sample, float], mirror: str) -> tuple[int, int]:
    """(agreeing, compared) answers of a mirror step (GRAPH/STEP) between two scrapes."""
    graph, _, step = mirror.partition("/")
    agree = compared = 0.0
    for (name, items), value in end.items():
        labels = dict(items)
        if name == MIRROR_METRIC and labels.get("graph") == graph and labels.get("step") == step:
            delta = value - start.get((name, items), 0.0)
            compared += delta
            if labels.get("agree") == "true":
                agree += delta
    return int(agree), int(compared)


@dataclass(frozen=True)
class Verdict:
    stable: BranchWindow
    canary: BranchWindow
    agreement: tuple[int, int] | None
    failed: str | None  # the gate that failed, None = all passed
    reason: str = ""

    def line(self, weight: int) -> str:
        ratio = self.canary.p99 / self.stable.p99 if self.stable.p99 > 0 else float("nan")
        parts = [
            f"canary {weight:>3}%:",
            f"requests stable {self.stable.requests} canary {self.canary.requests}",
            f"errors {100 * self.stable.error_rate:.1f}% / {100 * self.canary.error_rate:.1f}%",
            f"p99 {1000 * self.stable.p99:.1f} / {1000 * self.canary.p99:.1f} ms (x{ratio:.2f})",
        ]
        if self.agreement is not None:
            agree, compared = self.agreement
            parts.append(f"agreement {100 * agree / max(compared, 1):.1f}% of {compared}")
        return "  ".join(parts) + (
            "  PASS" if self.failed is None else f"  FAIL {self.failed}: {self.reason}"
        )


def judge(
    stable: BranchWindow,
    canary: BranchWindow,
    agreement: tuple[int, int] | None,
    gates: Gates,
    *,
    final: bool,
) -> Verdict:
    """The gates, in order; ``final``: the window cannot be extended (min-requests fails now)."""

    def verdict(failed: str | None, reason: str = "") -> Verdict:
        return Verdict(stable, canary, agreement, failed, reason)

    short = [
        what
        for what, count in (
            ("stable", stable.requests),
            ("canary", canary.requests),
            ("mirror", agreement[1] if agreement else gates.min_requests),
        )
        if count < gates.min_requests
    ]
    # Errors are judged as soon as they show: a failing canary is stopped without waiting.
    if (
        canary.requests
        and canary.error_rate - stable.error_rate > gates.max_error_increase
        and (canary.errors >= 5 or not short)
    ):
        return verdict(
            "errors",
            f"canary error rate {100 * canary.error_rate:.1f}% vs stable {100 * stable.error_rate:.1f}% "
            f"(allowed +{100 * gates.max_error_increase:.1f} points)",
        )
    if agreement is not None and agreement[1] >= gates.min_requests:
        share = agreement[0] / agreement[1]
        if share < gates.min_agreement:
            return verdict(
                "agreement",
                f"canary agrees with stable on {100 * share:.1f}% of {agreement[1]} mirrored requests "
                f"(needs {100 * gates.min_agreement:.0f}%)",
            )
    if short:
        if final:
            return verdict("min-requests", f"fewer than {gates.min_requests} requests for {', '.join(short)}")
        return verdict("pending")
    if stable.p99 > 0 and canary.p99 / stable.p99 > gates.max_p99_ratio:
        return verdict(
            "latency",
            f"canary p99 {1000 * canary.p99:.1f} ms is x{canary.p99 / stable.p99:.2f} stable's "
            f"(allowed x{gates.max_p99_ratio:g})",
        )
    return verdict(None)


def run_progressive(
    weights: WeightStore,
    read_metrics: Callable[[], Mapping[Sample, float]],
    graph: str,
    step: str,
    *,
    steps: Sequence[int] = DEFAULT_STEPS,
    window: float = 60.0,
    max_wait: float = 600.0,
    poll: float = 1.0,
    gates: Gates = Gates(),
    mirror: str | None = None,
    out: TextIO,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """The whole progressive rollout; 0 promoted, 1 aborted (the canary back at 0 %)."""
    branches = weights.branches()
    if len(branches) != 2:
        raise UsageError(
            f"{graph}/{step}: a progressive rollout needs a splitter of two branches (stable, canary)"
        )
    stable, canary = branches[0].name, branches[1].name
    if sorted(steps) != list(steps) or not all(0 < s < 100 for s in steps):
        raise UsageError(f"--steps must rise strictly between 0 and 100, got {list(steps)}")
    total = sum(b.weight for b in branches)
    current = round(100 * branches[1].weight / total) if total else 0
    if current >= 100:
        print(f"{graph}/{step}: {canary} already has 100%; nothing to do.", file=out)
        return 0
    read_metrics()  # unreachable metrics fail here, before any weight moves
    todo = [s for s in steps if s >= current]
    if current > 0:
        print(
            f"{graph}/{step}: {canary} is at {current}%: resuming from {todo[0] if todo else 100}%.", file=out
        )
    for weight in todo:
        weights.set({stable: 100 - weight, canary: weight})
        start, started = read_metrics(), clock()
        while True:
            sleep(poll)
            end = read_metrics()
            agreement = mirror_window(start, end, mirror) if mirror else None
            elapsed = clock() - started
            verdict = judge(
                branch_window(start, end, graph, stable),
                branch_window(start, end, graph, canary),
                agreement,
                gates,
                final=elapsed >= max_wait,
            )
            done = elapsed >= window or elapsed >= max_wait
            if verdict.failed == "latency" and not done:
                continue  # a p99 is judged over the whole window, never on its first calls
            if verdict.failed not in ("pending", None) or (verdict.failed is None and done):
                break
        print(verdict.line(weight), file=out)
        if verdict.failed is not None:
            weights.set({stable: 100, canary: 0})
            print(
                f"{graph}/{step}: aborted at {weight}%: gate {verdict.failed} failed; {canary} is back at 0%.",
                file=out,
            )
            return 1
    weights.set({stable: 0, canary: 100})
    print(f"{graph}/{step}: promoted: {canary} has 100%.", file=out)
    return 0
