"""The protobuf tensor codec: OIP tensor messages <-> numpy arrays.

Raw bytes (`raw_input_contents` / `raw_output_contents`) are the fast path, decoded by
`services.common.tensors` without copying; the typed `contents` fields are the fallback.
Every length is checked against shape x datatype *before* the values are used, so a
malformed tensor is an InvalidInput that names it, never a crash or a silent reshape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidInput
from services.common.tensors import check_header, decode_raw, element_count
from services.common.types import datatype_of

#: Which typed `contents` field carries each datatype. FP16 has none: it must be raw.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_contents(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    """A numpy array from the typed `contents` field, after checking the element count."""
    dtype = check_header(name, datatype, shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"tensor '{name}': {datatype} has no typed contents field; send it as raw bytes")
    values: Any = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(
            f"tensor '{name}': {field} holds {len(values)} elements but shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        out[:] = list(values)
        return out.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def encode_contents(array: np.ndarray, contents: pb.InferTensorContents) -> str:
    """Fill typed `contents` from an array (for clients that prefer them); returns the datatype."""
    datatype = datatype_of(array)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"{datatype} has no typed contents field; send it as raw bytes")
    flat = array.reshape(-1)
    if datatype == "BYTES":
        getattr(contents, field).extend(x.encode() if isinstance(x, str) else bytes(x) for x in flat)
    else:
        getattr(contents, field).extend(flat.tolist())
    return datatype


def decode_request_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input of a ModelInferRequest as numpy arrays, raw contents first.

    Raw and typed contents must not be mixed in one request; names must be unique.
    """
    raw = request.raw_input_contents
    inputs: dict[str, np.ndarray] = {}
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request declares "
            f"{len(request.inputs)} inputs; expected one raw entry per input, in order"
        )
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidInput(f"input '{tensor.name}' appears more than once")
        shape = list(tensor.shape)
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(
                    f"input '{tensor.name}': both raw_input_contents and typed contents were sent; "
                    "use one or the other for the whole request"
                )
            inputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            inputs[tensor.name] = decode_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return inputs


def decode_response_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of a ModelInferResponse as numpy arrays (raw first, typed as fallback)."""
    raw = response.raw_output_contents
    outputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if index < len(raw):
            outputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            outputs[tensor.name] = decode_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return outputs
