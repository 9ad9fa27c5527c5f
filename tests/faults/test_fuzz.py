"""Property-based fuzzing (hypothesis) of the two parsers that take outside input: the tensor
codec (every ModelInferRequest a client can send) and the graph spec loader (every YAML an
operator can write). Whatever comes in, the answer is a value or the error made for it
(InvalidInput, SpecError): never another exception, which would be an INTERNAL error or a crash.
Bounded: a fixed number of examples, no deadline per example (the machine is shared).
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orchestrator.spec import SpecError, parse_spec
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidInput
from services.common.grpc import codec
from services.common.tensors import decode_raw, encode_raw
from services.common.types import DATATYPE_TO_NUMPY

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

DATATYPES = st.sampled_from([*DATATYPE_TO_NUMPY, "FP8", "", "int32", "STRING"])
SHAPES = st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4)
NAMES = st.text(max_size=12)
BIG = st.integers(min_value=-(2**70), max_value=2**70)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    """One input tensor declared anyhow, with raw bytes or typed contents of any kind."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(NAMES), datatype=draw(DATATYPES), shape=draw(SHAPES)
    )
    if draw(st.booleans()):
        return tensor, draw(st.binary(max_size=64))
    contents = tensor.contents
    kind = draw(st.sampled_from(["bool", "int", "int64", "uint", "uint64", "fp32", "fp64", "bytes", "none"]))
    count = draw(st.integers(min_value=0, max_value=8))
    ints = st.lists(BIG, min_size=count, max_size=count)
    if kind == "bool":
        contents.bool_contents.extend(draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    elif kind in ("int", "int64", "uint", "uint64"):
        low, high = {"int": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}.get(kind, (0, 2**32 - 1))
        if kind == "uint64":
            high = 2**64 - 1
        values = [min(high, max(low, v)) for v in draw(ints)]
        getattr(contents, f"{kind}_contents").extend(values)
    elif kind in ("fp32", "fp64"):
        floats = st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == "fp32" else 64)
        getattr(contents, f"{kind}_contents").extend(draw(st.lists(floats, min_size=count, max_size=count)))
    elif kind == "bytes":
        contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count)))
    return tensor, None


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(NAMES))
    drawn = draw(st.lists(tensors(), max_size=3))
    raws = [raw for _, raw in drawn if raw is not None]
    for tensor, _ in drawn:
        request.inputs.append(tensor)
    as_raw: bool = draw(st.booleans())
    if raws and as_raw:
        request.raw_input_contents.extend(raws)
    return request


@FUZZ
@given(requests())
def test_the_codec_answers_any_request_with_arrays_or_invalid_input(request: pb.ModelInferRequest) -> None:
    try:
        inputs = codec.decode_request_inputs(request)
    except InvalidInput as err:
        assert err.public and err.message
        return
    declared = {t.name: t for t in request.inputs}
    assert inputs.keys() == declared.keys()
    for name, array in inputs.items():
        assert list(array.shape) == list(declared[name].shape)


@FUZZ
@given(
    hnp.arrays(
        dtype=st.sampled_from([d for name, d in DATATYPE_TO_NUMPY.items() if name != "BYTES"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    )
)
def test_raw_tensors_round_trip_bit_for_bit(array: np.ndarray) -> None:
    datatype, shape, raw = encode_raw(array)
    back = decode_raw("t", datatype, shape, raw)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # the same bits, NaN payloads included


# -- the spec loader ---------------------------------------------------------------------------

WORDS = st.sampled_from(
    [
        "services", "address", "defaults", "timeout", "retries", "graphs", "inputs", "outputs", "steps",
        "name", "service", "model", "version", "dependency", "soft", "hard", "ensemble", "branches",
        "aggregate", "method", "tensor", "mean", "quorum", "switch", "condition", "then", "else",
        "splitter", "weight", "mirror", "primary", "shadow", "compare", "sequence", "datatype", "shape",
        "request.image", "pre.features", "argmax(vote.probabilities)", "max(mlp.probabilities) < 0.9",
    ]
)  # fmt: skip
SCALARS = st.one_of(
    WORDS, st.text(string.printable, max_size=10), st.integers(-5, 100), st.floats(allow_nan=True), st.booleans(),
    st.none(),
)  # fmt: skip
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(WORDS, st.text(max_size=6)), inner, max_size=5)
    ),
    max_leaves=40,
)


def valid_spec() -> dict[str, Any]:
    return {
        "services": {"s": {"address": "127.0.0.1:1"}},
        "graphs": {
            "g": {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "steps": [{"name": "a", "service": "s", "model": "m", "inputs": {"x": "request.x"}}],
                "outputs": {"y": "a.y"},
            }
        },
    }


@FUZZ
@given(DOCUMENTS)
def test_the_spec_loader_answers_any_document_with_a_spec_or_spec_error(document: Any) -> None:
    try:
        parse_spec(yaml.safe_dump(document))
    except SpecError as err:
        assert str(err)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with one value somewhere replaced by anything."""
    spec = valid_spec()
    node: Any = spec
    path = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6))
    for step in path:
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
            if not isinstance(node[key], (dict, list)) or step == path[-1]:
                node[key] = draw(DOCUMENTS)
                return spec
            node = node[key]
        elif isinstance(node, list) and node:
            index = step % len(node)
            if not isinstance(node[index], (dict, list)) or step == path[-1]:
                node[index] = draw(DOCUMENTS)
                return spec
            node = node[index]
    return spec


@FUZZ
@given(mutated_specs())
def test_the_spec_loader_answers_any_near_valid_spec_with_a_spec_or_spec_error(spec: dict[str, Any]) -> None:
    try:
        parse_spec(spec)
    except SpecError as err:
        assert str(err)
