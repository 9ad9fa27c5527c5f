"""Plain data shared by every node: OIP datatypes, tensor specs and model signatures.

No protobuf here: protobuf types stop at the transport edge (servicer and client).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

#: OIP datatype name -> numpy dtype. BYTES tensors are numpy object arrays of `bytes`.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array (str/bytes arrays are BYTES)."""
    if array.dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_DATATYPE[array.dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no OIP datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, OIP datatype, shape with -1 for any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want == -1 or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    def describe(self) -> str:
        return f"{self.datatype}{list(self.shape)}"


@dataclass(frozen=True)
class ModelSignature:
    """What ModelMetadata answers: a model's name, versions, platform, inputs and outputs."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    # Looked up on every request: built once per signature, not per call.
    @cached_property
    def inputs_by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.inputs}

    @cached_property
    def outputs_by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.outputs}

    def input(self, name: str) -> TensorSpec | None:
        return self.inputs_by_name.get(name)

    def output(self, name: str) -> TensorSpec | None:
        return self.outputs_by_name.get(name)


@dataclass
class InferResult:
    """A model's answer: output tensors plus response parameters (e.g. per-branch status)."""

    outputs: dict[str, np.ndarray]
    model_name: str = ""
    model_version: str = ""
    parameters: dict[str, str | int | float | bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One inference call, the same value at every layer: the servicer hands it to a servable,
    the orchestrator's engine to a stage, a stage to the client that puts it on the wire."""

    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...] = ()
    #: "" = the service's default version.
    version: str = ""
    request_id: str = ""
    #: Absolute ``time.monotonic()`` time the caller stops waiting; None = no deadline.
    deadline: float | None = None


def rows_of(inputs: Iterable[Any]) -> int:
    """The rows of a request, as Triton counts inferences: the first dimension of its first
    input (numpy arrays or protobuf tensors: anything with a `shape`); 1 for a request without
    a batch dimension (a scalar first input, or no input at all)."""
    for tensor in inputs:
        shape = tensor.shape
        return int(shape[0]) if len(shape) else 1
    return 1
