"""`rollout progressive` without processes: the gates' arithmetic and the step loop, over a fake
weight store and fake metrics (named so; the real thing runs in tests/e2e/test_progressive.py)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import pytest

from meshctl.rollout.graphs import Branch, RolloutSettings
from meshctl.rollout.progressive import (
    STEP_METRIC,
    BranchWindow,
    ConfigMapWeights,
    Gates,
    Sample,
    WeightStore,
    branch_window,
    judge,
    run_progressive,
)
from tests.unit.rollout_fakes import changed_lines, mesh_cluster, weights_in

GATES = Gates(max_error_increase=0.01, max_p99_ratio=1.5, min_agreement=0.95, min_requests=50)


def window(requests: int, errors: int = 0, p99: float = 0.010) -> BranchWindow:
    return BranchWindow(requests, errors, p99)


@pytest.mark.parametrize(
    ("stable", "canary", "agreement", "final", "failed"),
    [
        (window(500), window(100), (100, 100), False, None),
        (window(500, 5), window(100, 20), None, False, "errors"),  # 20% vs 1%
        (window(500), window(100, p99=0.020), None, False, "latency"),  # x2
        (window(500), window(100), (80, 100), False, "agreement"),
        (window(500), window(10), None, False, "pending"),  # too few canary calls: wait
        (window(500), window(10), None, True, "min-requests"),  # and never enough
        (window(500), window(100), (10, 10), True, "min-requests"),  # too few mirrored
    ],
)
def test_the_gates(
    stable: BranchWindow,
    canary: BranchWindow,
    agreement: tuple[int, int] | None,
    final: bool,
    failed: str | None,
) -> None:
    assert judge(stable, canary, agreement, GATES, final=final).failed == failed


def histogram(step: str, ok: Mapping[float, int], failed: int = 0) -> dict[Sample, float]:
    """Cumulative buckets of answered calls and the count of every call, as the orchestrator exports."""
    out: dict[Sample, float] = {}
    base = (("graph", "g"), ("step", step))
    for le, count in ok.items():
        out[(STEP_METRIC + "_bucket", (*base, ("le", str(le)), ("status", "ok")))] = count
    out[(STEP_METRIC + "_count", (*base, ("status", "ok")))] = max(ok.values())
    out[(STEP_METRIC + "_count", (*base, ("status", "error")))] = failed
    return out


def test_a_branch_window_is_the_difference_of_two_scrapes() -> None:
    start = histogram("canary", {0.01: 10, 0.1: 10, float("inf"): 10}, failed=1)
    end = histogram("canary", {0.01: 10, 0.1: 110, float("inf"): 110}, failed=6)
    got = branch_window(start, end, "g", "canary")
    assert (got.requests, got.errors) == (105, 5)
    assert 0.01 < got.p99 <= 0.1  # every new answered call fell in (0.01, 0.1]


class WeightsFake:
    def __init__(self, canary: int) -> None:
        self.weights = {"stable": 100 - canary, "canary": canary}
        self.history: list[int] = []

    def branches(self) -> list[Branch]:
        return [Branch(name, weight, None) for name, weight in self.weights.items()]

    def set(self, weights: Mapping[str, int]) -> None:
        self.weights = dict(weights)
        self.history.append(self.weights["canary"])


class TrafficFake:
    """Metrics that grow by `per_read` calls on each branch at each scrape; the canary fails `bad` of them."""

    def __init__(self, per_read: int = 100, bad: int = 0) -> None:
        self.reads, self.per_read, self.bad = 0, per_read, bad

    def __call__(self) -> dict[Sample, float]:
        self.reads += 1
        n = self.reads * self.per_read
        return {
            **histogram("stable", {0.01: n, float("inf"): n}),
            **histogram("canary", {0.01: n, float("inf"): n}, failed=self.reads * self.bad),
        }


class ClockFake:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def rollout(
    weights: WeightStore, traffic: Callable[[], dict[Sample, float]], step: str = "s"
) -> tuple[int, str]:
    """One progressive rollout of graph g's `step` on a fake clock: (exit code, what it printed)."""
    out, clock = io.StringIO(), ClockFake()
    code = run_progressive(
        weights,
        traffic,
        "g",
        step,
        window=10,
        max_wait=60,
        poll=5,
        gates=GATES,
        out=out,
        clock=clock,
        sleep=clock.sleep,
    )
    return code, out.getvalue()


def test_an_equal_canary_walks_every_step_then_is_promoted() -> None:
    weights = WeightsFake(0)
    code, out = rollout(weights, TrafficFake())
    assert code == 0 and weights.history == [5, 25, 50, 100]
    assert out.count("PASS") == 3


def test_a_failing_canary_goes_back_to_zero_naming_the_gate() -> None:
    weights = WeightsFake(0)
    code, out = rollout(weights, TrafficFake(bad=30))
    assert code == 1 and weights.history == [5, 0]
    assert "aborted at 5%: gate errors failed" in out


def test_a_rerun_resumes_from_the_current_weight() -> None:
    weights = WeightsFake(25)
    code, out = rollout(weights, TrafficFake())
    assert code == 0 and weights.history == [25, 50, 100]
    assert "resuming from 25%" in out


def test_on_kubernetes_the_weights_move_in_the_configmap_keeping_the_rest_of_the_text() -> None:
    cluster = mesh_cluster()
    before = cluster.graphs_text()
    weights = ConfigMapWeights(cluster, RolloutSettings(), "digits-parallel", "mlp")
    assert [b.weight for b in weights.branches()] == list(weights_in(before).values())
    stable, canary = weights_in(before)
    code, out = rollout_with(weights, TrafficFake(), stable, canary)
    assert code == 0, out
    after = cluster.graphs_text()
    assert weights_in(after) == {stable: 0, canary: 100}
    assert len(changed_lines(before, after)) == 4  # two weight lines, removed and added


def rollout_with(weights: WeightStore, traffic: TrafficFake, stable: str, canary: str) -> tuple[int, str]:
    """As `rollout`, with the metrics of the splitter's own branch names."""

    def renamed() -> dict[Sample, float]:
        names = {"stable": stable, "canary": canary}
        return {
            (name, tuple((k, names.get(v, v) if k == "step" else v) for k, v in items)): value
            for (name, items), value in traffic().items()
        }

    return rollout(weights, renamed, step="mlp")
