"""The tensor codec: every OIP datatype round-trips; malformed bytes are rejected by name."""

from __future__ import annotations

import numpy as np
import pytest

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common import tensors
from services.common.errors import InvalidInput
from services.common.grpc import codec
from services.common.types import DATATYPE_TO_NUMPY, datatype_of

NUMERIC = [d for d in DATATYPE_TO_NUMPY if d != "BYTES"]


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if datatype == "BYTES":
        flat = np.empty(int(np.prod(shape)), dtype=object)
        flat[:] = [f"item-{i}-é".encode() * (i % 3) for i in range(flat.size)]
        return flat.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if dtype.kind == "f":
        return rng.standard_normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_NUMPY))
@pytest.mark.parametrize("shape", [(2, 3), (), (0, 4), (5,)], ids=["2d", "0-d", "empty", "1d"])
def test_raw_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    array = sample(datatype, shape)
    dt, wire_shape, raw = tensors.encode_raw(array)
    assert dt == datatype and wire_shape == list(shape)
    back = tensors.decode_raw("x", dt, wire_shape, raw)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def fill_contents(array: np.ndarray, contents: pb.InferTensorContents) -> str:
    """Typed `contents` from an array, as a client preferring them sends; returns the datatype."""
    datatype = datatype_of(array)
    getattr(contents, codec.CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return datatype


@pytest.mark.parametrize("datatype", [d for d in DATATYPE_TO_NUMPY if d != "FP16"])
def test_typed_contents_round_trip(datatype: str) -> None:
    array = sample(datatype, (3, 2))
    contents = pb.InferTensorContents()
    assert fill_contents(array, contents) == datatype
    back = codec.decode_contents("x", datatype, [3, 2], contents)
    np.testing.assert_array_equal(back, array)


def test_large_tensor_round_trips_without_copy_on_decode() -> None:
    array = np.arange(4 * 1024 * 1024, dtype=np.float32).reshape(1024, 4096)  # 16 MiB
    _, shape, raw = tensors.encode_raw(array)
    back = tensors.decode_raw("big", "FP32", shape, raw)
    np.testing.assert_array_equal(back, array)
    assert not back.flags.owndata  # a view of the received bytes


@pytest.mark.parametrize("delta", [-1, 1])
def test_raw_length_mismatch_names_tensor_and_sizes(delta: int) -> None:
    raw = bytes(4 * 6 + delta)
    with pytest.raises(InvalidInput, match=r"tensor 'features'.*\b2[35] bytes.*needs 24 bytes"):
        tensors.decode_raw("features", "FP32", [2, 3], raw)


def test_bytes_truncated_prefix_and_overrun_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="length prefix"):
        tensors.decode_raw("s", "BYTES", [1], b"\x05\x00")
    with pytest.raises(InvalidInput, match="claims 5 bytes but only 2 remain"):
        tensors.decode_raw("s", "BYTES", [1], b"\x05\x00\x00\x00ab")
    with pytest.raises(InvalidInput, match="hold 1 elements but shape \\[2\\] needs 2"):
        tensors.decode_raw("s", "BYTES", [2], b"\x01\x00\x00\x00a")


def test_unknown_datatype_and_negative_dims_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="unknown datatype 'FLOAT'"):
        tensors.decode_raw("x", "FLOAT", [1], b"\0\0\0\0")
    with pytest.raises(InvalidInput, match="negative dimension"):
        tensors.decode_raw("x", "FP32", [-1, 2], b"")


def test_fp16_has_no_typed_contents() -> None:
    with pytest.raises(InvalidInput, match="FP16 has no typed contents"):
        codec.decode_contents("h", "FP16", [1], pb.InferTensorContents())


def test_typed_count_mismatch() -> None:
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0])
    with pytest.raises(InvalidInput, match="fp32_contents holds 2 elements but shape \\[3\\] needs 3"):
        codec.decode_contents("x", "FP32", [3], contents)


def test_request_mixing_raw_and_typed_is_rejected() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    typed = request.inputs.add(name="b", datatype="FP32", shape=[1])
    typed.contents.fp32_contents.append(1.0)
    request.raw_input_contents.extend([b"\0\0\0\0", b"\0\0\0\0"])
    with pytest.raises(InvalidInput, match="input 'b': both raw_input_contents and typed contents"):
        codec.decode_request_inputs(request)


def test_request_raw_count_must_match_inputs() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0\0\0\0")
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries but the request declares 2"):
        codec.decode_request_inputs(request)


def test_duplicate_input_names_are_rejected() -> None:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(2):
        request.inputs.add(name="a", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="input 'a' appears more than once"):
        codec.decode_request_inputs(request)


def test_untouched_received_tensor_is_forwarded_without_copy() -> None:
    raw = np.arange(12, dtype=np.float32).tobytes()
    view = tensors.decode_raw("x", "FP32", [3, 4], raw)
    assert tensors.encode_raw(view)[2] is raw
    # A slice or a transformed tensor is re-encoded, never forwarded by mistake.
    assert tensors.encode_raw(view[1:])[2] == raw[16:]
    assert tensors.encode_raw(view.T)[2] == np.ascontiguousarray(view.T).tobytes()
    assert tensors.encode_raw(view * 2)[2] == (np.arange(12, dtype=np.float32) * 2).tobytes()
