"""One answer per small question about a request, whichever path asks it.

The rows of a request (metrics, statistics, spans, coalescing, the inline fast path) come from
`types.rows_of` for numpy arrays and protobuf tensors alike; a ModelInferRequest becomes an
InferRequest in one place (`servicer.infer_request`), so the fast path and the path of Triton's
extension parameters refuse the same malformed requests.
"""

from __future__ import annotations

import numpy as np
import pytest

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidInput
from services.common.grpc.servicer import infer_request
from services.common.types import rows_of


def test_rows_are_the_first_dimension_of_the_first_input() -> None:
    assert rows_of({"x": np.zeros((3, 2)), "y": np.zeros((5,))}.values()) == 3
    assert rows_of({"x": np.zeros((0, 2))}.values()) == 0


def test_a_request_without_a_batch_dimension_is_one_row() -> None:
    assert rows_of({"x": np.float32(1.0)}.values()) == 1
    assert rows_of({}.values()) == 1


def test_protobuf_tensors_have_the_same_rows() -> None:
    request = pb.ModelInferRequest()
    assert rows_of(request.inputs) == 1
    request.inputs.add(name="x", datatype="FP32", shape=[])
    assert rows_of(request.inputs) == 1
    request.inputs[0].shape.extend([4, 2])
    assert rows_of(request.inputs) == 4


def _raw_and_typed(with_extension_parameter: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    request.raw_input_contents.append(np.float32(1.0).tobytes())
    if with_extension_parameter:
        request.parameters["timeout"].int64_param = 1_000_000
    return request


@pytest.mark.parametrize("extended", [False, True], ids=["fast path", "extension parameters"])
def test_both_paths_refuse_raw_and_typed_contents_together(extended: bool) -> None:
    with pytest.raises(InvalidInput, match="both raw_input_contents and typed contents"):
        infer_request(None, _raw_and_typed(extended), "id", None)  # type: ignore[arg-type]
