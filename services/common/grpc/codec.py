"""The protobuf tensor codec: OIP tensor messages <-> numpy arrays.

Raw bytes (`raw_input_contents` / `raw_output_contents`) are the fast path, decoded by
`services.common.tensors` without copying; the typed `contents` fields are the fallback.
Every length is checked against shape x datatype *before* the values are used, so a
malformed tensor is an InvalidInput that names it, never a crash or a silent reshape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidInput
from services.common.tensors import check_header, decode_raw, element_count
from services.common.triton.params import Param

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


def decode_request_inputs(
    request: pb.ModelInferRequest, shared: Sequence[bytes | None] = ()
) -> dict[str, np.ndarray]:
    """Every input of a ModelInferRequest as numpy arrays, raw contents first.

    `shared`: per input, the bytes Triton's shared-memory extension read for it (None for an
    input that travels in the message); () when no input is in shared memory. Raw and typed
    contents must not be mixed in one request; names must be unique; there must be one raw
    entry per input that travels in the message.
    """
    raw = request.raw_input_contents
    inline = len(request.inputs) - (sum(data is not None for data in shared) if shared else 0)
    if raw and len(raw) != inline:
        if shared:
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries but the request has {inline} inputs outside "
                "shared memory; expected one raw entry per such input, in order"
            )
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request declares "
            f"{len(request.inputs)} inputs; expected one raw entry per input, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    raw_index = 0
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidInput(f"input '{tensor.name}' appears more than once")
        shape = list(tensor.shape)
        data = shared[index] if shared else None
        if data is not None:
            inputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, shape, data)
        elif raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(
                    f"input '{tensor.name}': both raw_input_contents and typed contents were sent; "
                    "use one or the other for the whole request"
                )
            inputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, shape, raw[raw_index])
            raw_index += 1
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


def parameter_value(param: pb.InferParameter) -> Param:
    """The value an InferParameter holds ("" when none is set)."""
    choice = param.WhichOneof("parameter_choice")
    return "" if choice is None else getattr(param, choice)


def parameter_values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Param]:
    """The values of a message's `parameters` map, by name."""
    if not parameters:  # most messages have none: no comprehension to run
        return {}
    return {key: parameter_value(value) for key, value in parameters.items()}
