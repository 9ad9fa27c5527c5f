"""The data plane without a transport: lookup, readiness, validation, metrics, inference.

Graphs are checked here too (the orchestrator serves each graph as a servable with a
signature), and only here: a bad graph input never reaches the engine's stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.graph.engine import Engine
from orchestrator.node import GraphServable
from orchestrator.spec import load_spec, validate_against_signatures
from services.common.dataplane import DataPlane, validate
from services.common.errors import InvalidInput, NotFound, Unavailable
from services.common.observability.metrics import ServerMetrics
from services.common.repository import ModelRepository
from services.common.types import InferRequest, InferResult
from tests.support import run
from tests.unit.fakes import (
    SIGNATURE,
    Double,
    X,
    digits_signatures,
    digits_stages,
    loaded,
    plane,
    requests_counted,
)

GRAPHS = Path(__file__).resolve().parents[2] / "demo" / "mesh.yaml"
IMAGES = np.arange(3 * 64, dtype=np.uint8).reshape(3, 8, 8) % 17


def test_infer_runs_the_latest_version_and_names_who_answered() -> None:
    old, new = Double("1"), Double("2")
    dataplane = loaded(old, new)
    result = run(dataplane.infer(InferRequest("double", {"x": X}, ("y",))))
    assert (result.model_name, result.model_version) == ("double", "2")
    np.testing.assert_array_equal(result.outputs["y"], X * 2)
    assert set(result.outputs) == {"y"} and not old.calls and len(new.calls) == 1
    assert requests_counted(dataplane, "double", "OK", "2") == 1


def test_encode_runs_inside_the_counted_call() -> None:
    dataplane = loaded(Double())
    assert run(dataplane.infer(InferRequest("double", {"x": X}), lambda r: sorted(r.outputs))) == [
        "total",
        "y",
    ]

    def broken(result: InferResult) -> None:
        raise TypeError("no OIP datatype")

    with pytest.raises(TypeError):
        run(dataplane.infer(InferRequest("double", {"x": X}), broken))
    assert requests_counted(dataplane, "double", "OK") == 1
    assert requests_counted(dataplane, "double", "INTERNAL") == 1


def test_unknown_model_or_version_is_not_found_and_counted_as_unknown() -> None:
    dataplane = loaded(Double())
    with pytest.raises(NotFound, match="model 'nope' is not served here; available: double"):
        run(dataplane.infer(InferRequest("nope", {"x": X})))
    with pytest.raises(NotFound, match="has no version '7'; available: 1"):
        run(dataplane.infer(InferRequest("double", {"x": X}, version="7")))
    assert requests_counted(dataplane, "unknown", "NOT_FOUND", "") == 2


def test_a_loading_model_and_a_draining_node_are_unavailable() -> None:
    model = Double()
    dataplane = plane(model)
    with pytest.raises(Unavailable, match="version 1 is still loading"):
        run(dataplane.infer(InferRequest("double", {"x": X})))
    with pytest.raises(Unavailable, match="still loading"):
        dataplane.model_metadata("double")
    assert not dataplane.ready() and not dataplane.model_ready("double")
    run(model.load())
    assert dataplane.ready() and dataplane.model_ready("double")
    dataplane.draining = True  # the drain delay: not ready, but calls are still answered
    assert not dataplane.ready() and not dataplane.model_ready("double")
    run(dataplane.infer(InferRequest("double", {"x": X})))
    assert len(model.calls) == 1
    dataplane.refusing = True  # after it: new calls are refused
    with pytest.raises(Unavailable, match="shutting down; retry on another replica of 'double'"):
        run(dataplane.infer(InferRequest("double", {"x": X})))
    assert len(model.calls) == 1


def test_metadata_names_the_versions() -> None:
    dataplane = loaded(Double("1"), Double("2"))
    meta = dataplane.model_metadata("double")
    assert meta.signature == SIGNATURE and meta.versions == ("1", "2")
    assert dataplane.model_metadata("double", "1").versions == ("1",)
    assert dataplane.server_metadata().name == "onnxmesh-test" and dataplane.live()


@pytest.mark.parametrize(
    ("inputs", "outputs", "fragments"),
    [
        ({}, (), ["model 'double'", "input 'x' is missing", "x FP32[-1, 3]"]),
        ({"x": X, "w": X}, (), ["model 'double' has no input named 'w'", "x FP32[-1, 3]"]),
        ({"x": X.astype(np.float64)}, (), ["input 'x' has datatype FP64, expected FP32"]),
        ({"x": X.reshape(3, 2)}, (), ["input 'x' has shape [3, 2], expected [-1, 3]"]),
        ({"x": X.reshape(6)}, (), ["input 'x' has shape [6], expected [-1, 3]"]),
        ({"x": X.astype(np.complex64)}, (), ["input 'x' has datatype complex64, expected FP32"]),
        ({"x": np.array([["a", "b", "c"]])}, (), ["input 'x' has datatype BYTES, expected FP32"]),
        ({"x": X}, ("logits",), ["model 'double' has no output named 'logits'; outputs: total, y"]),
    ],
)
def test_requests_are_validated_before_the_model_runs(
    inputs: dict[str, np.ndarray], outputs: tuple[str, ...], fragments: list[str]
) -> None:
    model = Double()
    dataplane = loaded(model)
    with pytest.raises(InvalidInput) as info:
        run(dataplane.infer(InferRequest("double", inputs, outputs)))
    for fragment in fragments:
        assert fragment in info.value.message
    assert not model.calls
    assert requests_counted(dataplane, "double", "INVALID_ARGUMENT") == 1


def test_validate_accepts_any_size_where_the_signature_says_minus_one() -> None:
    validate("double", SIGNATURE, {"x": np.zeros((0, 3), np.float32)}, ("y", "total"))
    validate("double", SIGNATURE, {"x": np.zeros((1000, 3), np.float32)}, ())


def test_a_request_refused_at_the_edge_is_counted_and_lookup_errors_come_first() -> None:
    model = Double()
    dataplane = plane(model)
    codec_error = InvalidInput(
        "tensor 'x': raw contents hold 3 bytes but shape [1, 3] of FP32 needs 12 bytes"
    )
    assert isinstance(dataplane.refused("nope", "", codec_error), NotFound)
    assert isinstance(dataplane.refused("double", "", codec_error), Unavailable)  # still loading
    run(model.load())
    assert dataplane.refused("double", "", codec_error) is codec_error
    assert requests_counted(dataplane, "unknown", "NOT_FOUND", "") == 1
    assert requests_counted(dataplane, "double", "UNAVAILABLE") == 1
    assert requests_counted(dataplane, "double", "INVALID_ARGUMENT") == 1


# -- graphs: validated by the data plane, not by the engine ----------------------------------


def graph_plane() -> tuple[DataPlane, dict[str, Any]]:
    spec = load_spec(GRAPHS)
    stages = digits_stages()
    engine = Engine(spec, stages)
    signatures = validate_against_signatures(spec, digits_signatures())
    graphs = [GraphServable(name, signature, engine) for name, signature in signatures.items()]
    return DataPlane(ModelRepository(graphs), ServerMetrics("test")), dict(stages)


def test_a_graph_runs_through_the_data_plane() -> None:
    dataplane, _ = graph_plane()
    result = run(dataplane.infer(InferRequest("digits-serial", {"image": IMAGES})))
    assert (result.model_name, result.model_version) == ("digits-serial", "1")
    assert result.parameters["step.head"] == "ok"


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        ({}, ["model 'digits-serial'", "input 'image' is missing", "image UINT8[-1, 8, 8]"]),
        (
            {"image": IMAGES.astype(np.float32)},
            ["model 'digits-serial'", "input 'image' has datatype FP32, expected UINT8"],
        ),
        (
            {"image": IMAGES.reshape(3, 64)},
            ["model 'digits-serial'", "input 'image' has shape [3, 64], expected [-1, 8, 8]"],
        ),
        (
            {"image": IMAGES, "extra": IMAGES},
            ["model 'digits-serial' has no input named 'extra'", "expected inputs: image UINT8[-1, 8, 8]"],
        ),
    ],
)
def test_inputs_are_checked_against_the_graph(inputs: dict[str, np.ndarray], fragments: list[str]) -> None:
    dataplane, stages = graph_plane()
    with pytest.raises(InvalidInput) as info:
        run(dataplane.infer(InferRequest("digits-serial", inputs)))
    for fragment in fragments:
        assert fragment in info.value.message
    assert all(not s.calls for s in stages.values())
