"""The graph spec: parsing, precise errors for bad specs, and checks against model signatures."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.spec import (
    GRAPH_PLATFORM,
    EnsembleStep,
    MeshSpec,
    ModelStep,
    SpecError,
    SwitchStep,
    TensorRef,
    load_spec,
    parse_spec,
    validate_against_signatures,
)
from services.common.types import ModelSignature, TensorSpec
from tests.unit.fakes import DIGITS_SIGNATURES, digits_signatures

GRAPHS = Path(__file__).resolve().parents[2] / "demo" / "mesh.yaml"

EXAMPLE = """
services:
  preprocess: {address: "127.0.0.1:8011"}
  model_a: {address: "127.0.0.1:8021"}
  model_b: {address: "dns:///model-b:8031"}
defaults: {timeout: 10.0, retries: 2}
graphs:
  digits-parallel:
    timeout: 5.0
    inputs: [{name: image, datatype: UINT8, shape: [-1, 8, 8]}]
    steps:
      - name: pre
        service: preprocess
        model: digits-preprocess
        inputs: {image: request.image}
      - name: vote
        ensemble:
          quorum: 1
          aggregate: {method: mean, tensor: probabilities}
          branches:
            - {name: mlp, service: model_a, model: digits-mlp, inputs: {features: pre.features}}
            - {name: logreg, service: model_b, model: digits-logreg, inputs: {features: pre.features}, dependency: soft}
    outputs:
      probabilities: vote.probabilities
      label: argmax(vote.probabilities)
"""


def example() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(EXAMPLE)
    return loaded


def graph(spec: dict[str, Any]) -> dict[str, Any]:
    g: dict[str, Any] = spec["graphs"]["digits-parallel"]
    return g


def steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    s: list[dict[str, Any]] = graph(spec)["steps"]
    return s


def branch(spec: dict[str, Any], i: int) -> dict[str, Any]:
    b: dict[str, Any] = steps(spec)[1]["ensemble"]["branches"][i]
    return b


def error_of(mutate: Callable[[dict[str, Any]], object]) -> str:
    spec = copy.deepcopy(example())
    mutate(spec)
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Parsing


def test_the_example_parses_into_frozen_dataclasses() -> None:
    spec = parse_spec(EXAMPLE)
    assert spec.services["model_b"].address == "dns:///model-b:8031"
    g = spec.graphs["digits-parallel"]
    assert g.timeout == 5.0
    assert g.inputs == (TensorSpec("image", "UINT8", (-1, 8, 8)),)
    pre, vote = g.steps
    assert isinstance(pre, ModelStep) and isinstance(vote, EnsembleStep)
    assert pre.inputs == {"image": TensorRef("request", "image")}
    assert (pre.timeout, pre.retries, pre.dependency, pre.version) == (10.0, 2, "hard", "")
    assert vote.quorum == 1 and vote.aggregate.method == "mean"
    assert [b.dependency for b in vote.branches] == ["hard", "soft"]
    assert g.outputs["label"].argmax and g.outputs["label"].alternatives == (
        TensorRef("vote", "probabilities"),
    )
    with pytest.raises(AttributeError):
        pre.name = "other"  # type: ignore[misc]


def test_outputs_to_request_are_computed_once_from_what_is_read() -> None:
    g = parse_spec(EXAMPLE).graphs["digits-parallel"]
    assert dict(g.requested_outputs) == {
        "pre": ("features",),
        "mlp": ("probabilities",),
        "logreg": ("probabilities",),
    }


def test_explicit_outputs_are_requested_as_listed() -> None:
    spec = example()
    branch(spec, 0)["outputs"] = ["probabilities", "embedding"]
    g = parse_spec(spec).graphs["digits-parallel"]
    assert g.requested_outputs["mlp"] == ("probabilities", "embedding")


def test_model_keys_and_hard_model_keys() -> None:
    spec = parse_spec(EXAMPLE)
    assert spec.model_keys() == (
        ("preprocess", "digits-preprocess", ""),
        ("model_a", "digits-mlp", ""),
        ("model_b", "digits-logreg", ""),
    )
    # The soft branch doesn't decide whether the graph can answer.
    assert spec.hard_model_keys("digits-parallel") == {
        ("preprocess", "digits-preprocess", ""),
        ("model_a", "digits-mlp", ""),
    }


def test_numeric_versions_are_read_as_strings() -> None:
    spec = example()
    branch(spec, 0)["version"] = 3
    assert ("model_a", "digits-mlp", "3") in parse_spec(spec).model_keys()


def test_load_spec_reads_a_file_and_names_it_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "graphs.yaml"
    path.write_text(
        EXAMPLE.replace("model: digits-preprocess", "model: digits-preprocess\n        sevice: x")
    )
    with pytest.raises(SpecError, match=str(path)):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "missing.yaml")


def test_yaml_syntax_errors_are_spec_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec("graphs: [unclosed")
    path = tmp_path / "graphs.yaml"
    path.write_text("graphs: [unclosed")
    with pytest.raises(SpecError) as bad:
        load_spec(path)
    assert f'in "{path}", line 1' in str(bad.value) and "<unicode string>" not in str(bad.value)


def test_every_problem_is_reported_in_one_pass(tmp_path: Path) -> None:
    """Three typos in three places: three lines, not three edit-and-wait cycles."""
    spec = example()
    graph = spec["graphs"]["digits-parallel"]
    graph["timeout"] = -1
    graph["steps"][0]["modle"] = "digits-preprocess"
    graph["steps"][1]["ensemble"]["branches"][1]["dependency"] = "sfot"
    spec["graphs"]["second"] = copy.deepcopy(graph)
    spec["graphs"]["second"]["steps"][1]["ensemble"]["branches"][0]["service"] = "model_c"
    with pytest.raises(SpecError) as bad:
        parse_spec(spec)
    problems = bad.value.problems
    assert len(problems) == 7, problems
    assert str(bad.value).startswith("7 problems:\n  - graph 'digits-parallel' at timeout: timeout must be")
    assert any("unknown key 'modle'" in p for p in problems)
    assert any("bad dependency 'sfot'" in p for p in problems)
    assert any(p.startswith("graph 'second'") and "model_c" in p for p in problems)
    path = tmp_path / "graphs.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as from_file:
        load_spec(path)
    assert all(p.startswith(f"{path}: graph ") for p in from_file.value.problems)


def test_a_long_list_of_problems_is_bounded() -> None:
    spec = example()
    steps = spec["graphs"]["digits-parallel"]["steps"]
    steps += [{"name": f"s{i}", "service": "model_a", "modle": "x"} for i in range(40)]
    with pytest.raises(SpecError) as bad:
        parse_spec(spec)
    assert len(bad.value.problems) == 40
    lines = str(bad.value).splitlines()
    assert lines[0] == "40 problems:" and lines[-1] == "  ... and 20 more" and len(lines) == 22


# ---------------------------------------------------------------------------------------------
# Each bad spec, its precise message


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        target: Any = spec
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()
G = ["graphs", "digits-parallel"]
VOTE = [*G, "steps", 1, "ensemble"]
MLP = [*VOTE, "branches", 0]


BAD_SPECS: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    (
        "unknown service",
        _set([*MLP, "service"], "model_c"),
        [
            "graph 'digits-parallel' at steps[1].ensemble.branches[0].service (step 'mlp')",
            "unknown service 'model_c'; services in the spec: model_a, model_b, preprocess",
        ],
    ),
    (
        "unknown step in a reference",
        _set([*MLP, "inputs", "features"], "prep.features"),
        [
            "(step 'mlp')",
            "input 'features' reads 'prep.features': unknown step 'prep'; readable here: request, pre",
        ],
    ),
    (
        "unknown graph input",
        _set([*G, "steps", 0, "inputs", "image"], "request.img"),
        ["graph has no input 'img'; graph inputs: image"],
    ),
    (
        "tensor an ensemble does not produce",
        _set([*G, "outputs", "probabilities"], "vote.embedding"),
        [
            "at outputs.probabilities",
            "graph output 'probabilities' reads 'vote.embedding': ensemble step 'vote' produces only "
            "probabilities, not 'embedding'",
        ],
    ),
    (
        "forward reference",
        _set([*G, "steps", 0, "inputs", "image"], "mlp.probabilities"),
        ["(step 'pre')", "step 'mlp' runs later (a forward reference, which would be a cycle)"],
    ),
    (
        "self reference",
        _set([*G, "steps", 0, "inputs", "image"], "pre.features"),
        ["input 'image' reads 'pre.features', its own step's output (a cycle)"],
    ),
    (
        "reading a parallel sibling",
        _set([*VOTE, "branches", 1, "inputs", "features"], "mlp.embedding"),
        ["(step 'logreg')", "step 'mlp' runs in parallel with this one (branches of ensemble 'vote')"],
    ),
    (
        "reading the enclosing step",
        _set([*MLP, "inputs", "features"], "vote.probabilities"),
        ["step 'vote' encloses this step, so reading it would be a cycle"],
    ),
    (
        "duplicate step name",
        _set([*MLP, "name"], "pre"),
        [
            "at steps[1].ensemble.branches[0] (step 'pre')",
            "duplicate step name 'pre', already used at steps[0]; step names must be unique in a graph",
        ],
    ),
    (
        "reserved step name",
        _set([*MLP, "name"], "request"),
        ["'request' is reserved for the graph inputs"],
    ),
    (
        "bad aggregator",
        _set([*VOTE, "aggregate", "method"], "avg"),
        [
            "at steps[1].ensemble.aggregate.method (step 'vote')",
            "unknown aggregator 'avg'; expected one of: mean, weighted_mean, majority_vote, concat, "
            "max_confidence",
        ],
    ),
    (
        "weighted_mean without weights",
        _set([*VOTE, "aggregate", "method"], "weighted_mean"),
        ["weighted_mean needs 'weights': a weight for each branch (mlp, logreg)"],
    ),
    (
        "weights missing for a branch",
        _set(
            [*VOTE, "aggregate"],
            {"method": "weighted_mean", "tensor": "probabilities", "weights": {"mlp": 2}},
        ),
        ["weights missing for branch(es): logreg"],
    ),
    (
        "weights for an unknown branch",
        _set(
            [*VOTE, "aggregate"],
            {
                "method": "weighted_mean",
                "tensor": "probabilities",
                "weights": {"mlp": 2, "logreg": 1, "svm": 1},
            },
        ),
        ["weights given for unknown branch(es): svm; branches: mlp, logreg"],
    ),
    (
        "negative weight",
        _set(
            [*VOTE, "aggregate"],
            {"method": "weighted_mean", "tensor": "probabilities", "weights": {"mlp": 2, "logreg": -1}},
        ),
        ["a weight must be a non-negative number, got -1"],
    ),
    (
        "weights on another aggregator",
        _set([*VOTE, "aggregate", "weights"], {"mlp": 1, "logreg": 1}),
        ["weights apply only to weighted_mean, not to 'mean'"],
    ),
    (
        "quorum above the branches",
        _set([*VOTE, "quorum"], 3),
        ["at steps[1].ensemble.quorum (step 'vote')", "quorum 3 is more than the 2 branches of the ensemble"],
    ),
    ("quorum below one", _set([*VOTE, "quorum"], 0), ["quorum must be at least 1, got 0"]),
    ("quorum not an integer", _set([*VOTE, "quorum"], "all"), ["quorum must be an integer, got 'all'"]),
    (
        "bad dependency",
        _set([*MLP, "dependency"], "optional"),
        [
            "at steps[1].ensemble.branches[0].dependency (step 'mlp')",
            "bad dependency 'optional'; expected 'hard' or 'soft'",
        ],
    ),
    (
        "typo in a key",
        _set([*MLP, "sevice"], "model_a"),
        [
            "(step 'mlp')",
            "unknown key 'sevice' in a model step (did you mean 'service'?); allowed keys: name, service, model, "
            "version, inputs, outputs, timeout, retries, cache, capture, dependency",
        ],
    ),
    (
        "typo in a top-level key",
        _set(["grpahs"], {}),
        [
            "unknown key 'grpahs' in the spec (did you mean 'graphs'?); allowed keys: services, defaults, graphs"
        ],
    ),
    (
        "typo in an ensemble key",
        _set([*VOTE, "qorum"], 1),
        [
            "unknown key 'qorum' in an ensemble (did you mean 'quorum'?); allowed keys: branches, aggregate, quorum"
        ],
    ),
    (
        "missing required key",
        _set([*MLP, "model"], _DELETE),
        ["(step 'mlp')", "a model step is missing the required key 'model'"],
    ),
    (
        "missing step name",
        _set([*MLP, "name"], _DELETE),
        ["at steps[1].ensemble.branches[0]", "the step has no 'name'"],
    ),
    (
        "a step without a kind",
        _set([*G, "steps", 1], {"name": "vote", "dependency": "soft"}),
        ["the step has no kind; expected 'service' and 'model' (a model step) or one of sequence, ensemble"],
    ),
    (
        "a step with two kinds",
        _set([*G, "steps", 1, "switch"], {}),
        ["a step has exactly one kind, this one has ensemble and switch"],
    ),
    (
        "empty graph",
        _set([*G, "steps"], []),
        ["graph 'digits-parallel': the graph has no steps; expected a non-empty list under 'steps'"],
    ),
    (
        "graph outputs missing",
        _set([*G, "outputs"], _DELETE),
        ["graph 'digits-parallel': the graph outputs are missing; expected a non-empty 'outputs'"],
    ),
    (
        "graph inputs missing",
        _set([*G, "inputs"], _DELETE),
        ["the graph inputs are missing"],
    ),
    (
        "no graphs",
        _set(["graphs"], {}),
        ["graphs: graphs is empty"],
    ),
    (
        "zero timeout",
        _set([*MLP, "timeout"], 0),
        [
            "at steps[1].ensemble.branches[0].timeout (step 'mlp')",
            "timeout must be a positive number of seconds, got 0",
        ],
    ),
    (
        "timeout as a string",
        _set([*G, "timeout"], "5s"),
        ["graph 'digits-parallel' at timeout: timeout must be a positive number of seconds, got '5s'"],
    ),
    ("negative retries", _set([*MLP, "retries"], -1), ["retries must be an integer from 0 to 10, got -1"]),
    (
        "too many retries",
        _set(["defaults", "retries"], 50),
        ["defaults.retries: retries must be an integer from 0 to 10"],
    ),
    (
        "fractional retries",
        _set([*MLP, "retries"], 1.5),
        ["retries must be an integer from 0 to 10, got 1.5"],
    ),
    (
        "bad reference syntax",
        _set([*MLP, "inputs", "features"], "pre features"),
        ["input 'features': bad reference 'pre features'; expected '<step>.<tensor>' or 'request.<input>'"],
    ),
    (
        "bad datatype",
        _set([*G, "inputs", 0, "datatype"], "FLOAT32"),
        ["at inputs[0].datatype: unknown datatype 'FLOAT32'; expected one of: BOOL, UINT8"],
    ),
    (
        "unread graph input",
        lambda spec: graph(spec)["inputs"].append({"name": "mask", "datatype": "BOOL", "shape": [-1]}),
        ["graph input 'mask' is declared but nothing reads 'request.mask'"],
    ),
    (
        "service without address",
        _set(["services", "model_a"], {"adress": "x"}),
        [
            "services.model_a: unknown key 'adress' in a service (did you mean 'address'?); allowed keys: address"
        ],
    ),
    (
        "unquoted YAML boolean as a name",
        _set([*MLP, "name"], False),
        ["got False (YAML reads yes/no/on/off as booleans: quote it)"],
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_specs_say_where_what_and_what_was_expected(
    mutate: Callable[[dict[str, Any]], None], expected: list[str]
) -> None:
    message = error_of(mutate)
    for part in expected:
        assert part in message


def test_the_spec_must_be_a_mapping() -> None:
    with pytest.raises(
        SpecError, match="the spec must be a mapping with keys services, defaults, graphs; got a list"
    ):
        parse_spec("- a\n- b\n")


# Composite steps (switch, splitter, mirror) on a small spec of their own.

CASCADE = """
services:
  a: {address: "127.0.0.1:1"}
  b: {address: "127.0.0.1:2"}
graphs:
  g:
    inputs: [{name: x, datatype: FP32, shape: [-1, 64]}]
    steps:
      - {name: first, service: a, model: digits-mlp, inputs: {features: request.x}}
      - name: check
        switch:
          condition: "max(first.probabilities) < 0.9"
          then:
            - {name: second, service: b, model: digits-logreg, inputs: {features: request.x}}
          outputs:
            probabilities: second.probabilities|first.probabilities
    outputs:
      probabilities: check.probabilities
"""


def cascade_error(old: str, new: str) -> str:
    text = CASCADE.replace(old, new)
    assert text != CASCADE
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    return str(info.value)


def test_the_cascade_parses() -> None:
    g = parse_spec(CASCADE).graphs["g"]
    check = g.steps[1]
    assert isinstance(check, SwitchStep)
    assert (check.condition.fn, check.condition.op, check.condition.value) == ("max", "<", 0.9)
    assert check.condition.ref == TensorRef("first", "probabilities")
    assert check.outputs["probabilities"].alternatives == (
        TensorRef("second", "probabilities"),
        TensorRef("first", "probabilities"),
    )
    assert g.requested_outputs == {"first": ("probabilities",), "second": ("probabilities",)}


@pytest.mark.parametrize(
    "condition",
    [
        "max(first.probabilities) << 0.9",
        "median(first.probabilities) < 0.9",
        "max first.probabilities < 0.9",
        "max(first.probabilities) < high",
    ],
)
def test_bad_condition_syntax(condition: str) -> None:
    message = cascade_error('"max(first.probabilities) < 0.9"', f'"{condition}"')
    assert "graph 'g' at steps[1].switch.condition (step 'check'): bad condition" in message
    if "high" in condition:
        assert "'high' is not a number" in message
    else:
        assert "expected '<fn>(<step>.<tensor>) <op> <number>' with fn one of max, min, mean" in message


def test_steps_inside_a_switch_are_read_through_its_outputs() -> None:
    message = cascade_error("probabilities: check.probabilities", "probabilities: second.probabilities")
    assert (
        "graph output 'probabilities' cannot read 'second.probabilities': step 'second' is inside switch "
        in message
    )
    assert "read it through the switch's outputs ('check.<output>')" in message


def test_a_switch_output_needs_a_value_whichever_branch_runs() -> None:
    message = cascade_error("second.probabilities|first.probabilities", "second.probabilities")
    assert (
        "output 'probabilities' = 'second.probabilities' has no value when the 'else' branch runs" in message
    )


def test_a_switch_output_not_declared_is_unknown() -> None:
    message = cascade_error("probabilities: check.probabilities", "probabilities: check.label")
    assert "switch step 'check' produces only probabilities, not 'label'" in message


SPLIT = """
services:
  a: {address: "127.0.0.1:1"}
graphs:
  g:
    inputs: [{name: x, datatype: FP32, shape: [-1, 64]}]
    steps:
      - name: mlp
        splitter:
          branches:
            - {weight: 90, name: stable, service: a, model: digits-mlp, inputs: {features: request.x}}
            - {weight: 10, name: canary, service: a, model: digits-mlp, version: "2", inputs: {features: request.x}}
      - name: m
        mirror:
          primary: {name: head, service: a, model: digits-head, inputs: {embedding: mlp.embedding}}
          shadow: {name: head2, service: a, model: digits-head, version: "2", inputs: {embedding: mlp.embedding}}
          compare: probabilities
    outputs:
      probabilities: m.probabilities
"""


def split_error(old: str, new: str) -> str:
    text = SPLIT.replace(old, new)
    assert text != SPLIT
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    return str(info.value)


def test_splitter_and_mirror_parse() -> None:
    spec = parse_spec(SPLIT)
    assert spec.graphs["g"].requested_outputs == {
        "stable": ("embedding",),
        "canary": ("embedding",),
        "head": ("probabilities",),
        "head2": ("probabilities",),
    }
    # The shadow isn't needed to answer; both splitter branches may be chosen.
    assert spec.hard_model_keys("g") == {
        ("a", "digits-mlp", ""),
        ("a", "digits-mlp", "2"),
        ("a", "digits-head", ""),
    }


def test_splitter_weights_must_be_non_negative_integers_with_one_positive() -> None:
    assert "weight must be a non-negative integer, got -5" in split_error("weight: 10,", "weight: -5,")
    assert "weight must be a non-negative integer, got 0.5" in split_error("weight: 10,", "weight: 0.5,")
    parse_spec(SPLIT.replace("weight: 90,", "weight: 0,"))  # one branch at 0 is fine
    text = SPLIT.replace("weight: 90,", "weight: 0,").replace("weight: 10,", "weight: 0,")
    with pytest.raises(SpecError, match="every splitter weight is 0; at least one must be positive"):
        parse_spec(text)


def test_splitter_branches_are_read_by_the_splitters_name() -> None:
    message = split_error("mlp.embedding}}\n          shadow", "stable.embedding}}\n          shadow")
    assert (
        "step 'stable' is a branch of splitter 'mlp', which runs one branch per request; read 'mlp.<tensor>'"
        in message
    )


def test_shadow_outputs_cannot_be_read() -> None:
    message = split_error("probabilities: m.probabilities", "probabilities: head2.probabilities")
    assert "step 'head2' is the shadow of mirror 'm', whose outputs are compared and dropped" in message


def test_dependency_is_the_enclosing_splitters() -> None:
    message = split_error("weight: 10, name: canary,", "weight: 10, dependency: soft, name: canary,")
    assert "'dependency' cannot be set here: the enclosing splitter or mirror's dependency applies" in message


# ---------------------------------------------------------------------------------------------
# Against the models' signatures


def test_the_default_graphs_parse_and_validate() -> None:
    spec = load_spec(GRAPHS)
    assert set(spec.graphs) == {"digits-serial", "digits-parallel", "digits-cascade"}
    signatures = validate_against_signatures(spec, digits_signatures())
    for name, sig in signatures.items():
        assert sig.name == name
        assert sig.platform == GRAPH_PLATFORM
        assert sig.inputs == (TensorSpec("image", "UINT8", (-1, 8, 8)),)
        assert sig.outputs == (
            TensorSpec("probabilities", "FP32", (-1, 10)),
            TensorSpec("label", "INT64", (-1,)),
        )


def test_the_example_validates_and_its_signature_is_computed() -> None:
    sigs = validate_against_signatures(parse_spec(EXAMPLE), digits_signatures())
    assert sigs["digits-parallel"].outputs == (
        TensorSpec("probabilities", "FP32", (-1, 10)),
        TensorSpec("label", "INT64", (-1,)),
    )


def signature_error(spec: MeshSpec, signatures: dict[tuple[str, str, str], ModelSignature]) -> str:
    with pytest.raises(SpecError) as info:
        validate_against_signatures(spec, signatures)
    return str(info.value)


def with_model(name: str, **changes: Any) -> dict[tuple[str, str, str], ModelSignature]:
    signatures = digits_signatures()
    for key, sig in signatures.items():
        if key[1] == name:
            signatures[key] = dataclasses.replace(sig, **changes)
    return signatures


def test_datatype_mismatch() -> None:
    signatures = with_model("digits-logreg", inputs=(TensorSpec("features", "FP64", (-1, 64)),))
    message = signature_error(parse_spec(EXAMPLE), signatures)
    assert "graph 'digits-parallel' at steps[1].ensemble.branches[1].inputs (step 'logreg')" in message
    assert (
        "input 'features' of model 'digits-logreg' of service 'model_b' expects FP64[-1, 64], but 'pre.features' is FP32[-1, 64]"
        in message
    )


def test_shape_mismatch() -> None:
    signatures = with_model("digits-mlp", inputs=(TensorSpec("features", "FP32", (-1, 32)),))
    message = signature_error(parse_spec(EXAMPLE), signatures)
    assert "expects FP32[-1, 32], but 'pre.features' is FP32[-1, 64]" in message


def test_rank_mismatch_with_the_graph_inputs() -> None:
    text = EXAMPLE.replace("shape: [-1, 8, 8]", "shape: [-1, 64]")
    message = signature_error(parse_spec(text), digits_signatures())
    assert "(step 'pre')" in message
    assert "expects UINT8[-1, 8, 8], but graph input 'image' is declared UINT8[-1, 64]" in message


def test_minus_one_matches_any_size() -> None:
    signatures = with_model("digits-mlp", inputs=(TensorSpec("features", "FP32", (4, -1)),))
    validate_against_signatures(parse_spec(EXAMPLE), signatures)


def test_an_unconnected_model_input() -> None:
    signatures = with_model(
        "digits-mlp", inputs=(TensorSpec("features", "FP32", (-1, 64)), TensorSpec("mask", "BOOL", (-1,)))
    )
    message = signature_error(parse_spec(EXAMPLE), signatures)
    assert "model 'digits-mlp' of service 'model_a' input 'mask' (BOOL[-1]) is not connected" in message


def test_an_input_the_model_does_not_have() -> None:
    text = EXAMPLE.replace("inputs: {features: pre.features}}", "inputs: {feature: pre.features}}", 1)
    message = signature_error(parse_spec(text), digits_signatures())
    assert "model 'digits-mlp' of service 'model_a' has no input 'feature'; its inputs: features" in message


def test_an_output_the_model_does_not_have() -> None:
    text = EXAMPLE.replace("pre.features}}", "pre.feature}}", 1)
    message = signature_error(parse_spec(text), digits_signatures())
    assert "graph 'digits-parallel' at steps[0] (step 'pre')" in message
    assert (
        "model 'digits-preprocess' of service 'preprocess' has no output 'feature' (read later as "
        "'pre.feature'); its outputs: features"
    ) in message


def test_a_missing_signature() -> None:
    signatures = digits_signatures()
    del signatures[("model_b", "digits-logreg", "")]
    message = signature_error(parse_spec(EXAMPLE), signatures)
    assert "no signature for model 'digits-logreg' of service 'model_b'" in message


def test_an_aggregate_over_different_shapes() -> None:
    signatures = with_model("digits-logreg", outputs=(TensorSpec("probabilities", "FP32", (-1, 9)),))
    message = signature_error(parse_spec(EXAMPLE), signatures)
    assert "at steps[1].ensemble.aggregate (step 'vote'): mean: branches disagree on the shape" in message


def aggregate_signature(method: str, quorum: str = "quorum: 1") -> tuple[TensorSpec, ...]:
    text = EXAMPLE.replace("method: mean", f"method: {method}").replace("quorum: 1", quorum)
    if method == "majority_vote":
        text = text.replace("label: argmax(vote.probabilities)", "label: vote.label")
    return validate_against_signatures(parse_spec(text), digits_signatures())["digits-parallel"].outputs


def test_signatures_of_aggregated_outputs() -> None:
    label = TensorSpec("label", "INT64", (-1,))
    assert aggregate_signature("max_confidence") == (TensorSpec("probabilities", "FP32", (-1, 10)), label)
    assert aggregate_signature("majority_vote") == (TensorSpec("probabilities", "FP32", (-1, 10)), label)
    # concat sums the last axis only when every branch always takes part.
    fixed = (
        EXAMPLE.replace("quorum: 1", "")
        .replace(", dependency: soft", "")
        .replace("method: mean", "method: concat")
    )
    outputs = validate_against_signatures(parse_spec(fixed), digits_signatures())["digits-parallel"].outputs
    assert outputs[0] == TensorSpec("probabilities", "FP32", (-1, 20))
    assert aggregate_signature("concat")[0] == TensorSpec("probabilities", "FP32", (-1, -1))


def test_switch_alternatives_must_agree() -> None:
    signatures = {
        ("a", "digits-mlp", ""): DIGITS_SIGNATURES["digits-mlp"],
        ("b", "digits-logreg", ""): ModelSignature(
            "digits-logreg",
            ("1",),
            "onnx",
            (TensorSpec("features", "FP32", (-1, 64)),),
            (TensorSpec("probabilities", "FP64", (-1, 10)),),
        ),
    }
    message = signature_error(parse_spec(CASCADE), signatures)
    assert (
        "the alternatives disagree: 'second.probabilities' is FP64[-1, 10] but 'first.probabilities' is FP32[-1, 10]"
        in message
    )


def test_splitter_and_mirror_signatures() -> None:
    signatures = {
        (svc, model, version): DIGITS_SIGNATURES[model]
        for svc, model, version in parse_spec(SPLIT).model_keys()
    }
    sig = validate_against_signatures(parse_spec(SPLIT), signatures)["g"]
    assert sig.outputs == (TensorSpec("probabilities", "FP32", (-1, 10)),)
