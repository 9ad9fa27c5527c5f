"""The step kinds' structural rules, and that every pass follows the one forwarding rule."""

from __future__ import annotations

from typing import Any, get_args

import pytest
import yaml

from orchestrator.spec import (
    STEP_KINDS,
    MirrorStep,
    SequenceStep,
    SpecError,
    Step,
    forwarded_step,
    kind_of,
    parse_spec,
    storage_name,
    validate_against_signatures,
)
from orchestrator.spec import parse as parse_pass
from orchestrator.spec import scope as scope_pass
from orchestrator.spec import signatures as signature_pass
from services.common.types import ModelSignature, TensorSpec


def test_step_kinds() -> None:
    kinds = get_args(Step)
    assert STEP_KINDS == ("sequence", "ensemble", "switch", "splitter", "mirror")
    assert [kind.kind for kind in kinds] == ["model", *STEP_KINDS]


def test_every_pass_has_a_rule_for_every_step_kind() -> None:
    kinds = set(get_args(Step))
    assert set(parse_pass._PARSERS) == set(STEP_KINDS)
    assert set(scope_pass._CHECKS) == set(scope_pass._EXPORTS) == kinds
    assert set(signature_pass._CHECKS) == kinds


# One graph per forwarding kind: step `fwd` answers with one of `one` (model `wide`) and `two`
# (model `narrow`), and the graph output reads `fwd.y`. The models' `y` differ in width, so the
# served signature tells whose `y` the signature pass followed.

SEQUENCE = """
services: {s: {address: "127.0.0.1:1"}}
graphs:
  g:
    inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
    steps:
      - name: fwd
        sequence:
          steps:
            - {name: one, service: s, model: wide, inputs: {x: request.x}}
            - {name: two, service: s, model: narrow, inputs: {x: request.x}}
    outputs:
      y: fwd.y
"""

MIRROR = """
services: {s: {address: "127.0.0.1:1"}}
graphs:
  g:
    inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
    steps:
      - name: fwd
        mirror:
          primary: {name: one, service: s, model: wide, inputs: {x: request.x}}
          shadow: {name: two, service: s, model: narrow, inputs: {x: request.x}}
          compare: z
    outputs:
      y: fwd.y
"""

WIDTH = {"one": 8, "two": 2}


def _signature(model: str, width: int) -> ModelSignature:
    return ModelSignature(
        model,
        ("1",),
        "onnx",
        (TensorSpec("x", "FP32", (-1, 4)),),
        (TensorSpec("y", "FP32", (-1, width)), TensorSpec("z", "FP32", (-1, 1))),
    )


SIGNATURES = {
    ("s", "wide", ""): _signature("wide", WIDTH["one"]),
    ("s", "narrow", ""): _signature("narrow", WIDTH["two"]),
}


def _listing_outputs(text: str, step: str, outputs: list[str]) -> dict[str, Any]:
    """The spec with explicit ``outputs`` on the model step named ``step``."""
    raw: dict[str, Any] = yaml.safe_load(text)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") == step:
                node["outputs"] = outputs
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(raw)
    return raw


def _assert_every_pass_follows(text: str, kind: str, forwarded: str, other: str) -> None:
    spec = parse_spec(text)
    graph = spec.graphs["g"]
    fwd = next(s for s in graph.all_steps() if s.name == "fwd")
    followed = forwarded_step(fwd)
    assert followed is not None and followed.name == forwarded
    # Where the engine finds fwd's outputs.
    assert storage_name(fwd) == forwarded
    # Reading fwd.y asks the forwarded model, not the other one, for y.
    assert "y" in graph.requested_outputs[forwarded]
    assert "y" not in graph.requested_outputs[other]
    # The scope checks know what fwd produces from the forwarded step alone.
    parse_spec(_listing_outputs(text, other, ["z"]))
    with pytest.raises(SpecError, match=f"{kind} step 'fwd' produces only z, not 'y'"):
        parse_spec(_listing_outputs(text, forwarded, ["z"]))
    # The served signature has the forwarded model's y.
    served = validate_against_signatures(spec, SIGNATURES)["g"]
    assert served.outputs == (TensorSpec("y", "FP32", (-1, WIDTH[forwarded])),)


@pytest.mark.parametrize(
    ("text", "kind", "forwarded", "other"),
    [(SEQUENCE, SequenceStep, "two", "one"), (MIRROR, MirrorStep, "one", "two")],
    ids=["sequence", "mirror"],
)
def test_every_pass_follows_the_one_forwarding_rule(
    monkeypatch: pytest.MonkeyPatch, text: str, kind: type[Step], forwarded: str, other: str
) -> None:
    # As it is: a sequence forwards its last step, a mirror its primary.
    _assert_every_pass_follows(text, kind.kind, forwarded, other)

    # Change the rule in its one place and storage, scope, requested outputs and signatures all
    # follow.
    def forwards_the_other(self: Step) -> Step:
        return next(c for c in self.children() if c.name == other)

    monkeypatch.setattr(kind, "forwards", forwards_the_other)
    _assert_every_pass_follows(text, kind.kind, other, forwarded)


def test_kind_of_names_each_kind() -> None:
    spec = parse_spec(SEQUENCE)
    assert [kind_of(s) for s in spec.graphs["g"].all_steps()] == ["sequence", "model", "model"]
