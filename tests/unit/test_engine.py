"""The execution engine against FakeStages: semantics, deadlines, retries, failures, cancellation."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.graph.aggregators import AGGREGATORS
from orchestrator.graph.engine import Engine, deadline_margin
from orchestrator.graph.plan import SHADOW_STATUS, compare_outputs
from orchestrator.spec import load_spec, parse_spec
from orchestrator.stages.base import Stage
from orchestrator.stages.retry_budget import RetryBudget
from services.common.errors import (
    DeadlineExceeded,
    InvalidInput,
    MeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from tests.support import run
from tests.unit.fakes import (
    FakeClock,
    FakeStage,
    constant,
    digits_stages,
    fake_logreg,
    fake_mlp,
    fake_preprocess,
    rows,
)

GRAPHS = Path(__file__).resolve().parents[2] / "demo" / "mesh.yaml"
IMAGES = np.arange(3 * 64, dtype=np.uint8).reshape(3, 8, 8) % 17


def default_engine(stages: Mapping[str, Stage], **kwargs: Any) -> Engine:
    return Engine(load_spec(GRAPHS), stages, **kwargs)


HEADER = """
services:
  s: {address: "127.0.0.1:1"}
  t: {address: "127.0.0.1:2"}
defaults: {timeout: 5.0, retries: 2}
graphs:
"""


def engine_for(graph_yaml: str, stages: Mapping[str, Stage], **kwargs: Any) -> Engine:
    """An engine over one graph `g` whose body is given (indented under `g:`)."""
    text = HEADER + "  g:\n" + "\n".join("    " + line for line in graph_yaml.strip("\n").splitlines())
    return Engine(parse_spec(text), stages, **kwargs)


X = np.ones((2, 4), dtype=np.float32)


def go(engine: Engine, deadline: float | None = None, **inputs: np.ndarray) -> Any:
    return run(engine.run("g", inputs or {"x": X}, deadline=deadline, request_id="r1"))


# ---------------------------------------------------------------------------------------------
# The default graphs


def test_serial_chains_the_steps_and_asks_each_only_for_what_is_read() -> None:
    stages = digits_stages()
    result = run(default_engine(stages).run("digits-serial", {"image": IMAGES}, deadline=None))
    features = fake_preprocess({"image": IMAGES})["features"]
    expected = fake_mlp({"features": features})["embedding"]
    np.testing.assert_allclose(
        result.outputs["probabilities"],
        stages["model_b"].models["digits-head"]({"embedding": expected})["probabilities"],
    )
    assert result.outputs["label"].dtype == np.int64
    np.testing.assert_array_equal(result.outputs["label"], result.outputs["probabilities"].argmax(axis=1))
    assert result.parameters == {
        "graph": "digits-serial",
        "step.pre": "ok",
        "version.pre": "1",
        "step.mlp": "ok",
        "version.mlp": "1",
        "step.head": "ok",
        "version.head": "1",
    }
    # Outputs subset: the MLP is asked for its embedding only, the others for what is read.
    assert [c.outputs for c in stages["model_a"].calls] == [("embedding",)]
    assert [c.outputs for c in stages["preprocess"].calls] == [("features",)]
    assert [c.outputs for c in stages["model_b"].calls] == [("probabilities",)]


def test_tensors_are_forwarded_without_copies() -> None:
    stages = digits_stages()
    produced: dict[str, np.ndarray] = {}

    def preprocess(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        produced.update(fake_preprocess(inputs))
        return produced

    stages["preprocess"].models["digits-preprocess"] = preprocess
    run(default_engine(stages).run("digits-parallel", {"image": IMAGES}, deadline=None))
    assert stages["preprocess"].calls[0].inputs["image"] is IMAGES
    assert stages["model_a"].calls[0].inputs["features"] is produced["features"]
    assert stages["model_b"].calls[0].inputs["features"] is produced["features"]


def test_parallel_averages_both_models_and_takes_the_argmax() -> None:
    stages = digits_stages()
    result = run(default_engine(stages).run("digits-parallel", {"image": IMAGES}, deadline=None))
    features = fake_preprocess({"image": IMAGES})["features"]
    mean = (
        fake_mlp({"features": features})["probabilities"]
        + fake_logreg({"features": features})["probabilities"]
    ) / 2
    np.testing.assert_allclose(result.outputs["probabilities"], mean, rtol=1e-6)
    np.testing.assert_array_equal(result.outputs["label"], mean.argmax(axis=1))
    assert result.parameters["step.mlp"] == "ok"
    assert result.parameters["step.logreg"] == "ok"


def test_parallel_soft_branch_failure_is_reported_and_the_other_answers() -> None:
    stages = digits_stages()
    stages["model_b"].fail("digits-logreg", InvalidInput("bad features"))
    result = run(default_engine(stages).run("digits-parallel", {"image": IMAGES}, deadline=None))
    features = fake_preprocess({"image": IMAGES})["features"]
    np.testing.assert_allclose(
        result.outputs["probabilities"], fake_mlp({"features": features})["probabilities"]
    )
    assert result.parameters["step.logreg"] == "error: INVALID_ARGUMENT bad features"
    assert "version.logreg" not in result.parameters


def confident_or_not(confident: bool) -> dict[str, FakeStage]:
    stages = digits_stages()
    top = 0.95 if confident else 0.6
    mlp = constant([top, 1 - top] + [0.0] * 8)
    stages["model_a"].models["digits-mlp"] = lambda inputs: {
        **mlp(inputs),
        "embedding": np.zeros((3, 32), np.float32),
    }
    stages["model_b"].models["digits-logreg"] = constant([0.0, 1.0] + [0.0] * 8)
    return stages


def test_cascade_when_sure_skips_the_second_opinion() -> None:
    stages = confident_or_not(True)
    result = run(default_engine(stages).run("digits-cascade", {"image": IMAGES}, deadline=None))
    np.testing.assert_allclose(result.outputs["probabilities"][0, :2], [0.95, 0.05])
    np.testing.assert_array_equal(result.outputs["label"], [0, 0, 0])
    assert result.parameters["step.logreg"] == (
        "skipped: switch 'unsure' took its 'else' branch (max(mlp.probabilities) < 0.9 is false)"
    )
    assert stages["model_b"].calls == []
    assert len(stages["model_a"].calls) == 1


def test_cascade_when_unsure_asks_model_b() -> None:
    stages = confident_or_not(False)
    result = run(default_engine(stages).run("digits-cascade", {"image": IMAGES}, deadline=None))
    np.testing.assert_allclose(result.outputs["probabilities"][0, :2], [0.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(result.outputs["label"], [1, 1, 1])
    assert result.parameters["step.logreg"] == "ok"


def test_cascade_falls_back_to_the_first_answer_when_the_soft_second_opinion_fails() -> None:
    stages = confident_or_not(False)
    stages["model_b"].fail("digits-logreg", Unavailable("down"), Unavailable("down"), Unavailable("down"))
    result = run(
        default_engine(stages, rng=random.Random(1)).run("digits-cascade", {"image": IMAGES}, deadline=None)
    )
    np.testing.assert_allclose(result.outputs["probabilities"][0, :2], [0.6, 0.4], rtol=1e-6)
    assert result.parameters["step.logreg"] == "error: UNAVAILABLE down (after 3 attempts)"


def test_switch_condition_holds_if_any_row_does() -> None:
    stages = {"s": FakeStage({"m": rows([0.95, 0.05], [0.5, 0.5]), "n": rows([0.0, 1.0], [0.0, 1.0])})}
    graph = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}}
  - name: sw
    switch:
      condition: "max(a.probabilities) < 0.9"
      then: [{name: b, service: s, model: n, inputs: {x: request.x}}]
      outputs: {p: b.probabilities|a.probabilities}
outputs: {p: sw.p}
"""
    result = go(engine_for(graph, stages))
    np.testing.assert_array_equal(result.outputs["p"], [[0.0, 1.0], [0.0, 1.0]])


def test_switch_condition_on_an_empty_batch_is_false() -> None:
    # A step upstream that finds nothing (no text boxes on a page) answers zero rows.
    stages = {"s": FakeStage({"m": lambda i: {"scores": np.zeros((0, 3), np.float32)}, "n": constant([1.0])})}
    graph = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}}
  - name: sw
    switch:
      condition: "max(a.scores) > 0"
      then: [{name: b, service: s, model: n, inputs: {x: request.x}}]
      outputs: {p: b.scores|a.scores}
outputs: {p: sw.p}
"""
    result = go(engine_for(graph, stages))
    assert result.outputs["p"].shape == (0, 3)
    assert result.parameters["step.b"].startswith("skipped: switch 'sw' took its 'else' branch")


def test_nesting_ensemble_inside_sequence_inside_switch() -> None:
    stages = {
        "s": FakeStage(
            {"gate": constant([0.2, 0.8]), "one": constant([1.0, 0.0]), "two": constant([0.0, 1.0])}
        ),
        "t": FakeStage({"three": constant([0.5, 0.5]), "prep": lambda i: {"y": i["x"] * 2}}),
    }
    graph = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: gate, service: s, model: gate, inputs: {x: request.x}}
  - name: sw
    switch:
      condition: "max(gate.probabilities) >= 0.8"
      then:
        - name: seq
          sequence:
            steps:
              - {name: prep, service: t, model: prep, inputs: {x: request.x}}
              - name: ens
                ensemble:
                  aggregate: {method: mean, tensor: probabilities}
                  branches:
                    - {name: one, service: s, model: one, inputs: {x: prep.y}}
                    - {name: two, service: s, model: two, inputs: {x: prep.y}}
      else:
        - {name: three, service: t, model: three, inputs: {x: request.x}}
      outputs: {p: seq.probabilities|three.probabilities}
outputs: {p: sw.p, label: argmax(sw.p)}
"""
    result = go(engine_for(graph, stages))
    np.testing.assert_allclose(result.outputs["p"], [[0.5, 0.5], [0.5, 0.5]])
    assert result.parameters["step.three"].startswith("skipped: switch 'sw' took its 'then' branch")
    assert result.parameters["step.one"] == result.parameters["step.two"] == "ok"
    # The branches read prep's output: x * 2, and only what the ensemble aggregates is requested.
    np.testing.assert_array_equal(stages["s"].calls_to("one")[0].inputs["x"], X * 2)
    assert stages["s"].calls_to("one")[0].outputs == ("probabilities",)
    np.testing.assert_array_equal(result.outputs["label"], [0, 0])


# ---------------------------------------------------------------------------------------------
# Aggregators


def ensemble_graph(aggregate: str, branches: int = 3, extra: str = "") -> str:
    lines = [
        "inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]",
        "steps:",
        "  - name: e",
        "    ensemble:",
        f"      aggregate: {aggregate}",
        *([f"      {extra}"] if extra else []),
        "      branches:",
        *[
            f"        - {{name: b{i}, service: s, model: m{i}, inputs: {{x: request.x}}}}"
            for i in range(branches)
        ],
        "outputs: {p: e.probabilities}",
    ]
    return "\n".join(lines)


THREE = {
    "m0": rows([0.7, 0.2, 0.1], [0.1, 0.3, 0.6]),
    "m1": rows([0.5, 0.4, 0.1], [0.2, 0.6, 0.2]),
    "m2": rows([0.1, 0.8, 0.1], [0.3, 0.3, 0.4]),
}
A = np.array(
    [
        [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
        [[0.5, 0.4, 0.1], [0.2, 0.6, 0.2]],
        [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
    ]
)


def test_mean() -> None:
    result = go(
        engine_for(ensemble_graph("{method: mean, tensor: probabilities}"), {"s": FakeStage(dict(THREE))})
    )
    np.testing.assert_allclose(result.outputs["p"], A.mean(axis=0), rtol=1e-6)
    assert result.outputs["p"].dtype == np.float32


def test_weighted_mean() -> None:
    agg = "{method: weighted_mean, tensor: probabilities, weights: {b0: 2, b1: 1, b2: 1}}"
    result = go(engine_for(ensemble_graph(agg), {"s": FakeStage(dict(THREE))}))
    np.testing.assert_allclose(result.outputs["p"], (2 * A[0] + A[1] + A[2]) / 4, rtol=1e-6)


def test_weighted_mean_renormalises_over_the_branches_that_answered() -> None:
    agg = "{method: weighted_mean, tensor: probabilities, weights: {b0: 2, b1: 1, b2: 1}}"
    stage = FakeStage(dict(THREE)).fail("m0", Unavailable("gone"))
    graph = ensemble_graph(agg, extra="quorum: 2").replace(
        "{name: b0, service: s, model: m0, inputs: {x: request.x}}",
        "{name: b0, service: s, model: m0, inputs: {x: request.x}, dependency: soft, retries: 0}",
    )
    result = go(engine_for(graph, {"s": stage}))
    np.testing.assert_allclose(result.outputs["p"], (A[1] + A[2]) / 2, rtol=1e-6)


def test_majority_vote_counts_votes_and_breaks_ties_to_the_lowest_label() -> None:
    graph = ensemble_graph("{method: majority_vote, tensor: probabilities}").replace(
        "outputs: {p: e.probabilities}", "outputs: {p: e.probabilities, label: e.label}"
    )
    result = go(engine_for(graph, {"s": FakeStage(dict(THREE))}))
    # row 0 votes 0, 0, 1 -> 0; row 1 votes 2, 1, 2 -> 2
    np.testing.assert_array_equal(result.outputs["label"], [0, 2])
    assert result.outputs["label"].dtype == np.int64
    np.testing.assert_allclose(result.outputs["p"], [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], rtol=1e-6)
    # A tie between labels 2 and 0 goes to 0.
    tie = AGGREGATORS["majority_vote"].combine(
        "p", [np.array([[0.1, 0.2, 0.7]]), np.array([[0.9, 0.0, 0.1]])], []
    )
    np.testing.assert_array_equal(tie["label"], [0])
    np.testing.assert_allclose(tie["probabilities"], [[0.5, 0.0, 0.5]])


def test_concat_joins_the_last_axis_in_branch_order() -> None:
    result = go(
        engine_for(ensemble_graph("{method: concat, tensor: probabilities}"), {"s": FakeStage(dict(THREE))})
    )
    np.testing.assert_allclose(result.outputs["p"], np.concatenate(list(A), axis=-1), rtol=1e-6)
    assert result.outputs["p"].shape == (2, 9)


def test_max_confidence_picks_per_row_the_most_confident_branch() -> None:
    result = go(
        engine_for(
            ensemble_graph("{method: max_confidence, tensor: probabilities}"), {"s": FakeStage(dict(THREE))}
        )
    )
    # row 0: maxima 0.7, 0.5, 0.8 -> branch 2; row 1: 0.6, 0.6, 0.4 -> tie, the earlier branch 0
    np.testing.assert_allclose(result.outputs["p"], [A[2, 0], A[0, 1]], rtol=1e-6)


def test_aggregator_shape_mismatch_is_an_internal_error_naming_the_ensemble() -> None:
    stages = {"s": FakeStage({"m0": rows([0.5, 0.5]), "m1": rows([0.2, 0.3, 0.5]), "m2": rows([1.0, 0.0])})}
    with pytest.raises(MeshError, match=r"ensemble 'e' \(mean\): branches answered with different shapes"):
        go(engine_for(ensemble_graph("{method: mean, tensor: probabilities}"), stages))


# ---------------------------------------------------------------------------------------------
# Quorum


def soft_branches_graph(quorum: int | None) -> str:
    graph = ensemble_graph(
        "{method: mean, tensor: probabilities}", extra=f"quorum: {quorum}" if quorum else ""
    )
    for i in range(3):
        graph = graph.replace(
            f"model: m{i}, inputs: {{x: request.x}}}}",
            f"model: m{i}, inputs: {{x: request.x}}, dependency: soft}}",
        )
    return graph


def test_quorum_met_aggregates_the_successful_branches() -> None:
    stage = FakeStage(dict(THREE)).fail("m1", InvalidInput("nope"))
    result = go(engine_for(soft_branches_graph(2), {"s": stage}))
    np.testing.assert_allclose(result.outputs["p"], (A[0] + A[2]) / 2, rtol=1e-6)
    assert result.parameters["step.b1"] == "error: INVALID_ARGUMENT nope"


def test_quorum_not_met_fails_with_the_branch_errors_code() -> None:
    stage = FakeStage(dict(THREE)).fail("m1", InvalidInput("nope")).fail("m2", InvalidInput("nope"))
    with pytest.raises(InvalidInput) as info:
        go(engine_for(soft_branches_graph(2), {"s": stage}))
    assert "ensemble 'e': quorum not met (1 of 3 branches succeeded, 2 needed)" in str(info.value)
    assert "step 'b1' (s/m1): INVALID_ARGUMENT: nope" in str(info.value)


def test_default_quorum_needs_one_success_when_every_branch_is_soft() -> None:
    stage = FakeStage(dict(THREE))
    for i in range(3):
        stage.fail(f"m{i}", InvalidInput("nope"))
    with pytest.raises(InvalidInput, match="quorum not met"):
        go(engine_for(soft_branches_graph(None), {"s": stage}))


def test_a_hard_branch_failing_fails_the_ensemble_regardless_of_quorum() -> None:
    stage = FakeStage(dict(THREE)).fail("m0", InvalidInput("nope"))
    with pytest.raises(InvalidInput, match=r"^step 'b0' \(s/m0\): INVALID_ARGUMENT: nope$"):
        go(
            engine_for(
                ensemble_graph("{method: mean, tensor: probabilities}", extra="quorum: 1"), {"s": stage}
            )
        )


def test_a_hard_branch_failing_cancels_its_siblings() -> None:
    stage = FakeStage(dict(THREE)).hang("m1").hang("m2")
    stage.sleep["m0"] = 0.01  # let the siblings start first
    stage.fail("m0", ResourceExhausted("queue full"))
    with pytest.raises(ResourceExhausted, match="step 'b0'"):
        go(engine_for(ensemble_graph("{method: mean, tensor: probabilities}"), {"s": stage}))
    assert [c.cancelled for c in stage.calls_to("m1") + stage.calls_to("m2")] == [True, True]


# ---------------------------------------------------------------------------------------------
# Deadlines


CHAIN = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}, timeout: 4.0}
  - {name: b, service: s, model: m, inputs: {x: a.x}, timeout: 4.0}
  - {name: c, service: s, model: m, inputs: {x: b.x}, timeout: 4.0}
  - {name: d, service: s, model: m, inputs: {x: c.x}, timeout: 4.0}
outputs: {x: d.x}
"""


def echo(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"x": inputs["x"]}


def test_each_step_gets_the_smaller_of_its_timeout_and_what_remains() -> None:
    clock = FakeClock()
    stage = FakeStage({"m": echo}, clock=clock, takes={"m": 3.0})
    start = clock()
    result = go(engine_for(CHAIN, {"s": stage}, clock=clock), deadline=start + 10.0)
    assert result.outputs["x"] is X
    timeouts = [c.timeout for c in stage.calls]
    margin = deadline_margin(10.0)
    assert timeouts == pytest.approx([4.0, 4.0, 4.0 - margin, 1.0 - margin])
    for call in stage.calls:
        assert call.at is not None
        assert call.timeout <= 4.0
        assert call.timeout <= start + 10.0 - call.at


def test_the_graph_timeout_is_the_budget_when_the_client_sends_no_deadline() -> None:
    clock = FakeClock()
    stage = FakeStage({"m": echo}, clock=clock)
    go(engine_for("timeout: 1.5\n" + CHAIN, {"s": stage}, clock=clock))
    assert stage.calls[0].timeout == pytest.approx(1.5 - deadline_margin(1.5))


def test_a_step_with_no_time_left_is_not_called_and_named() -> None:
    clock = FakeClock()
    stage = FakeStage({"m": echo}, clock=clock, takes={"m": 3.0})
    with pytest.raises(DeadlineExceeded) as info:
        go(engine_for(CHAIN, {"s": stage}, clock=clock), deadline=clock() + 6.0)
    assert str(info.value) == "step 'c' (s/m) exceeded the deadline before it could be called"
    assert len(stage.calls) == 2


def test_a_hard_step_running_out_raises_deadline_exceeded_naming_it() -> None:
    stage = FakeStage({"m": echo}).hang("m")
    with pytest.raises(DeadlineExceeded, match=r"^step 'a' \(s/m\) exceeded its timeout of 0.05s$"):
        go(engine_for(CHAIN.replace("timeout: 4.0}", "timeout: 0.05}", 1), {"s": stage}))
    assert stage.calls[0].cancelled


def test_a_step_cut_by_the_request_deadline_says_so() -> None:
    stage = FakeStage({"m": echo}).hang("m")
    engine = engine_for(CHAIN, {"s": stage})
    with pytest.raises(DeadlineExceeded, match=r"^step 'a' \(s/m\) exceeded the deadline$"):
        go(engine, deadline=time.monotonic() + 0.05)


def test_a_stage_that_keeps_its_deadline_runs_without_a_timer_and_its_timeout_reads_the_same() -> None:
    # A gRPC stage fails with DEADLINE_EXCEEDED at the deadline it was given: the engine arms no
    # timer of its own around it, and the answer reads as if the engine's timer had fired.
    clock = FakeClock()
    stage = FakeStage({"m": echo}, clock=clock, takes={"m": 0.5})
    stage.keeps_deadline = True  # type: ignore[attr-defined]
    stage.fail("m", DeadlineExceeded("Deadline Exceeded"))
    engine = engine_for(CHAIN.replace("timeout: 4.0}", "timeout: 0.5}", 1), {"s": stage}, clock=clock)
    with pytest.raises(DeadlineExceeded, match=r"^step 'a' \(s/m\) exceeded its timeout of 0.5s$"):
        go(engine)


def test_a_downstream_deadline_exceeded_keeps_its_code_and_names_the_step() -> None:
    stage = FakeStage({"m": echo}).fail("m", DeadlineExceeded("Deadline Exceeded"))
    with pytest.raises(
        DeadlineExceeded, match=r"^step 'a' \(s/m\) exceeded its timeout of 4s: Deadline Exceeded$"
    ):
        go(engine_for(CHAIN, {"s": stage}))


def test_a_soft_step_running_out_is_reported_as_timeout() -> None:
    stages = {"s": FakeStage({"m": echo}), "t": FakeStage({"slow": echo}).hang("slow")}
    graph = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: slow, service: t, model: slow, inputs: {x: request.x}, timeout: 0.05, dependency: soft}
  - {name: fast, service: s, model: m, inputs: {x: request.x}}
outputs: {x: fast.x}
"""
    result = go(engine_for(graph, stages))
    assert result.parameters["step.slow"] == "timeout: exceeded its timeout of 0.05s"
    assert result.parameters["step.fast"] == "ok"


def test_a_hung_soft_branch_is_cut_with_the_margin_left_for_the_answer() -> None:
    stages = digits_stages()
    stages["model_b"].hang("digits-logreg")
    deadline = 0.3
    started = time.monotonic()
    result = run(
        default_engine(stages).run("digits-parallel", {"image": IMAGES}, deadline=started + deadline)
    )
    assert result.parameters["step.logreg"] == "timeout: exceeded the deadline"
    (call,) = stages["model_b"].calls_to("digits-logreg")
    # The engine's contract, not a wall-clock bound (a stall of a loaded machine must not fail
    # it): the hung call was cut with the margin kept back for the answer.
    assert call.cancelled and call.timeout <= deadline - deadline_margin(deadline) + 0.01


def test_the_margin_scales_with_the_budget_within_bounds() -> None:
    assert deadline_margin(0.01) == 0.005
    assert deadline_margin(1.0) == pytest.approx(0.15)
    assert deadline_margin(60.0) == 0.25


# ---------------------------------------------------------------------------------------------
# Retries


ONE = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}}
outputs: {x: a.x}
"""


def test_unavailable_is_retried_and_the_second_attempt_answers() -> None:
    stage = FakeStage({"m": echo}).fail("m", Unavailable("connection refused"))
    result = go(engine_for(ONE, {"s": stage}, rng=random.Random(0)))
    assert len(stage.calls) == 2
    assert result.parameters["step.a"] == "ok"
    assert stage.calls[1].timeout <= 5.0


def test_retries_stop_after_the_configured_number() -> None:
    stage = FakeStage({"m": echo}).fail("m", *[Unavailable("down")] * 5)
    with pytest.raises(Unavailable, match=r"^step 'a' \(s/m\): UNAVAILABLE \(after 3 attempts\): down$"):
        go(engine_for(ONE, {"s": stage}, rng=random.Random(0)))
    assert len(stage.calls) == 3


def test_invalid_argument_is_never_retried_and_keeps_its_code() -> None:
    stage = FakeStage({"m": echo}).fail("m", InvalidInput("expected FP32[-1, 4]"))
    with pytest.raises(InvalidInput, match=r"^step 'a' \(s/m\): INVALID_ARGUMENT: expected FP32\[-1, 4\]$"):
        go(engine_for(ONE, {"s": stage}))
    assert len(stage.calls) == 1


def test_an_empty_retry_budget_stops_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, clock=clock)
    stage = FakeStage({"m": echo}).fail("m", Unavailable("down"))
    with pytest.raises(Unavailable, match=r"^step 'a' \(s/m\): UNAVAILABLE: down$"):
        go(engine_for(ONE, {"s": stage}, retry_budget=budget, clock=clock))
    assert len(stage.calls) == 1


def test_retry_budget_deposits_per_request_and_refills_over_time() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=1.0, capacity=3.0, clock=clock)
    assert budget.try_spend()  # one second of reserve to start with
    assert not budget.try_spend()
    budget.deposit()
    assert not budget.try_spend()  # 0.5 tokens
    budget.deposit()
    assert budget.try_spend()  # 1.0
    clock.advance(10.0)  # refills, but only up to the capacity
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_retries_do_not_go_past_the_deadline() -> None:
    clock = FakeClock()
    stage = FakeStage({"m": echo}, clock=clock, takes={"m": 0.999}).fail("m", Unavailable("down"))
    with pytest.raises(Unavailable):
        go(engine_for(ONE, {"s": stage}, clock=clock), deadline=clock() + 1.0)
    assert len(stage.calls) == 1


# ---------------------------------------------------------------------------------------------
# Soft and hard failures


def test_hard_failure_raises_the_downstream_class_naming_the_step() -> None:
    stages = digits_stages()
    stages["model_b"].fail("digits-head", ResourceExhausted("too many requests"))
    with pytest.raises(ResourceExhausted) as info:
        run(default_engine(stages).run("digits-serial", {"image": IMAGES}, deadline=None))
    assert str(info.value) == "step 'head' (model_b/digits-head): RESOURCE_EXHAUSTED: too many requests"
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_codes_without_a_class_pass_through() -> None:

    from services.common.errors import from_status

    stage = FakeStage({"m": echo}).fail("m", from_status("FAILED_PRECONDITION", "not loaded"))
    with pytest.raises(MeshError) as info:
        go(engine_for(ONE, {"s": stage}))
    assert info.value.code == "FAILED_PRECONDITION"
    assert info.value.public
    assert str(info.value) == "step 'a' (s/m): FAILED_PRECONDITION: not loaded"


def test_unexpected_exceptions_propagate_unchanged() -> None:
    boom = ZeroDivisionError("bug")
    stage = FakeStage({"m": echo}).fail("m", boom)
    with pytest.raises(ZeroDivisionError) as info:
        go(engine_for(ONE, {"s": stage}))
    assert info.value is boom


def test_steps_after_a_failed_soft_step_that_need_it_are_skipped() -> None:
    stages = {"s": FakeStage({"m": echo}).fail("m", Unavailable("down"))}
    graph = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}, dependency: soft, retries: 0}
  - {name: b, service: s, model: m, inputs: {x: a.x}, dependency: soft}
  - {name: c, service: s, model: m, inputs: {x: request.x}}
outputs: {x: c.x}
"""
    result = go(engine_for(graph, stages))
    assert result.parameters["step.a"] == "error: UNAVAILABLE down"
    assert result.parameters["step.b"] == "skipped: input 'x' needs 'a.x', which is unavailable"
    assert result.parameters["step.c"] == "ok"


def test_a_hard_step_needing_a_failed_soft_step_fails_with_its_cause() -> None:
    stages = {"s": FakeStage({"m": echo}).fail("m", Unavailable("down"))}
    graph = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}, dependency: soft, retries: 0}
  - {name: b, service: s, model: m, inputs: {x: a.x}}
outputs: {x: b.x}
"""
    with pytest.raises(Unavailable) as info:
        go(engine_for(graph, stages))
    assert str(info.value) == "step 'b' (s/m) needs 'a.x': step 'a' (s/m): UNAVAILABLE: down"


def test_non_public_downstream_messages_stay_out_of_the_parameters() -> None:
    stages = {"s": FakeStage({"m": echo}).fail("m", MeshError("secret stack trace"))}
    graph = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}, dependency: soft}
  - {name: b, service: s, model: m, inputs: {x: request.x}}
outputs: {x: b.x}
"""
    result = go(engine_for(graph, stages))
    assert result.parameters["step.a"] == "error: INTERNAL internal error"


# ---------------------------------------------------------------------------------------------
# Cancellation


def test_cancelling_run_cancels_every_in_flight_call() -> None:
    stage = FakeStage(dict(THREE)).hang("m0").hang("m1").hang("m2")

    async def scenario() -> None:
        engine = engine_for(ensemble_graph("{method: mean, tensor: probabilities}"), {"s": stage})
        task = asyncio.create_task(engine.run("g", {"x": X}, deadline=None))
        await stage.wait_for_calls(3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(asyncio.all_tasks()) == 1  # only this one: no orphans

    run(scenario())
    assert [c.cancelled for c in stage.calls] == [True, True, True]


def test_cancelling_run_cancels_the_shadow_too() -> None:
    stages = {"s": FakeStage({"p": echo}).hang("p"), "t": FakeStage({"q": echo}).hang("q")}

    async def scenario() -> None:
        engine = engine_for(MIRROR, stages)
        task = asyncio.create_task(engine.run("g", {"x": X}, deadline=None))
        await stages["s"].wait_for_calls(1)
        await stages["t"].wait_for_calls(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(asyncio.all_tasks()) == 1

    run(scenario())
    assert stages["s"].calls[0].cancelled and stages["t"].calls[0].cancelled


# ---------------------------------------------------------------------------------------------
# Splitter


SPLITTER = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - name: split
    splitter:
      branches:
        - {weight: 90, name: stable, service: s, model: m, version: "1", inputs: {x: request.x}}
        - {weight: 10, name: canary, service: s, model: m, version: "2", inputs: {x: request.x}}
        - {weight: 0, name: dark, service: s, model: m, version: "3", inputs: {x: request.x}}
outputs: {x: split.x}
"""


def test_splitter_sends_each_request_to_one_branch_by_weight() -> None:
    stage = FakeStage({"m": echo})
    engine = engine_for(SPLITTER, {"s": stage}, rng=random.Random(42))

    async def many() -> list[dict[str, Any]]:
        return [dict((await engine.run("g", {"x": X}, deadline=None)).parameters) for _ in range(2000)]

    params = run(many())
    assert len(stage.calls) == 2000
    versions = [c.version for c in stage.calls]
    assert versions.count("3") == 0
    assert 0.07 < versions.count("2") / 2000 < 0.13
    canary = next(p for p in params if p["step.canary"] == "ok")
    assert canary["step.stable"] == "skipped: not chosen by splitter"
    assert canary["step.dark"] == "skipped: not chosen by splitter"
    assert canary["version.canary"] == "2"


def test_splitter_choices_are_reproducible_with_a_seeded_rng() -> None:
    def choices(seed: int) -> list[str]:
        stage = FakeStage({"m": echo})
        engine = engine_for(SPLITTER, {"s": stage}, rng=random.Random(seed))
        for _ in range(50):
            go(engine)
        return [c.version for c in stage.calls]

    assert choices(7) == choices(7)


# ---------------------------------------------------------------------------------------------
# Mirror


MIRROR = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - name: m
    mirror:
      primary: {name: main, service: s, model: p, inputs: {x: request.x}}
      shadow: {name: candidate, service: t, model: q, inputs: {x: request.x}}
      compare: x
outputs: {x: m.x}
"""


def test_mirror_answers_with_the_primary_and_reports_the_comparison() -> None:
    seen: list[tuple[str, str, bool, float]] = []
    stages = {
        "s": FakeStage({"p": lambda i: {"x": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}}),
        "t": FakeStage({"q": lambda i: {"x": np.array([[0.7, 0.3], [0.6, 0.4]], np.float32)}}),
    }

    async def scenario() -> Any:
        engine = engine_for(MIRROR, stages, on_mirror=lambda *a: seen.append(a))
        result = await engine.run("g", {"x": X}, deadline=None)
        await engine.drain()
        return result

    result = run(scenario())
    np.testing.assert_allclose(result.outputs["x"], [[0.9, 0.1], [0.2, 0.8]])
    assert result.parameters["step.main"] == "ok"
    assert result.parameters["step.candidate"] == SHADOW_STATUS
    assert len(seen) == 1
    graph, step, agree, diff = seen[0]
    assert (graph, step, agree) == ("g", "m", False)
    assert diff == pytest.approx(0.4)
    assert stages["t"].calls[0].outputs == ("x",)


def test_a_failing_shadow_never_reaches_the_client() -> None:
    seen: list[Any] = []
    stages = {
        "s": FakeStage({"p": echo}),
        "t": FakeStage({"q": echo}).fail("q", InvalidInput("broken canary")),
    }

    async def scenario() -> Any:
        engine = engine_for(MIRROR, stages, on_mirror=lambda *a: seen.append(a))
        result = await engine.run("g", {"x": X}, deadline=None)
        await engine.drain()
        return result

    result = run(scenario())
    assert result.outputs["x"] is X
    assert seen == []


def test_the_answer_does_not_wait_for_the_shadow_and_aclose_cancels_it() -> None:
    stages = {"s": FakeStage({"p": echo}), "t": FakeStage({"q": echo}).hang("q")}

    async def scenario() -> None:
        engine = engine_for(MIRROR, stages)
        result = await asyncio.wait_for(engine.run("g", {"x": X}, deadline=None), timeout=5.0)
        assert result.outputs["x"] is X
        await engine.aclose()
        assert len(asyncio.all_tasks()) == 1

    run(scenario())
    assert stages["t"].calls[0].cancelled


def test_the_shadow_is_bounded_by_the_request_deadline() -> None:
    stages = {"s": FakeStage({"p": echo}), "t": FakeStage({"q": echo}).hang("q")}

    async def scenario() -> None:
        engine = engine_for(MIRROR, stages)
        await engine.run("g", {"x": X}, deadline=time.monotonic() + 0.1)
        await asyncio.wait_for(engine.drain(), timeout=5.0)

    run(scenario())
    assert stages["t"].calls[0].cancelled


def test_compare_outputs() -> None:
    a = np.array([[0.9, 0.1], [0.3, 0.7]])
    assert compare_outputs(a, a) == (True, 0.0)
    agree, diff = compare_outputs(a, a + np.array([[0.0, 0.9], [0.0, 0.0]]))
    assert not agree and diff == pytest.approx(0.9)
    assert compare_outputs(a, a[:1]) == (False, float("inf"))


# ---------------------------------------------------------------------------------------------
# Requests, hooks


def test_unknown_graph_is_not_found() -> None:
    with pytest.raises(
        NotFound, match="unknown graph 'nope'; graphs: digits-serial, digits-parallel, digits-cascade"
    ):
        run(default_engine(digits_stages()).run("nope", {"image": IMAGES}, deadline=None))


def test_on_step_reports_every_attempted_step() -> None:
    seen: list[tuple[Any, ...]] = []
    stages = digits_stages()
    stages["model_b"].fail("digits-logreg", InvalidInput("x"))
    engine = default_engine(stages, on_step=lambda *a: seen.append(a))
    run(engine.run("digits-parallel", {"image": IMAGES}, deadline=None))
    statuses = sorted((s[1], s[2], s[3], s[4], s[5]) for s in seen)
    assert statuses == [
        ("logreg", "model_b", "digits-logreg", "", "error"),
        ("mlp", "model_a", "digits-mlp", "1", "ok"),
        ("pre", "preprocess", "digits-preprocess", "1", "ok"),
    ]
    assert all(s[0] == "digits-parallel" and s[6] >= 0 for s in seen)


def test_a_failing_hook_does_not_fail_the_request() -> None:
    def hook(*args: Any) -> None:
        raise RuntimeError("metrics down")

    result = run(
        default_engine(digits_stages(), on_step=hook).run("digits-serial", {"image": IMAGES}, deadline=None)
    )
    assert result.parameters["step.head"] == "ok"


def test_the_request_id_reaches_every_stage() -> None:
    stages = digits_stages()
    run(default_engine(stages).run("digits-serial", {"image": IMAGES}, deadline=None, request_id="req-7"))
    assert {c.request_id for s in stages.values() for c in s.calls} == {"req-7"}


def test_engine_needs_a_stage_for_every_service() -> None:
    with pytest.raises(ValueError, match="no Stage for service"):
        Engine(load_spec(GRAPHS), {"preprocess": FakeStage({})})
