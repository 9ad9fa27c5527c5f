"""Any ONNX model, served by onnxruntime, with its OIP signature read from the graph."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from services.common.errors import InvalidInput
from services.common.model import Model
from services.common.types import DATATYPE_TO_NUMPY, ModelSignature, TensorSpec
from services.common.warmup import WarmupSample

#: onnxruntime's type strings -> OIP datatypes.
ONNX_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(arg: Any, path: Path) -> TensorSpec:
    datatype = ONNX_TO_DATATYPE.get(arg.type)
    if datatype is None:
        raise ValueError(f"{path}: tensor '{arg.name}' has type {arg.type}, which OIP cannot carry")
    # Symbolic ("batch") or unknown (None) dimensions are dynamic: -1 in OIP metadata.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxModel(Model):
    """One version of an ONNX model file; inputs/outputs come from the ONNX graph itself."""

    platform = "onnxruntime_onnx"

    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        executor: Executor,
        *,
        threads: int = 1,
        warmup: Sequence[WarmupSample] | None = None,
    ) -> None:
        super().__init__(name, version, executor, warmup=warmup)
        self.path = path
        self.threads = threads
        self._session: ort.InferenceSession | None = None
        self._all_outputs: list[str] = []
        self._string_inputs: frozenset[str] = frozenset()
        #: Output name -> its spec, when every input and output has a dynamic first (batch) dim.
        self._batch_outputs: dict[str, TensorSpec] = {}

    def load_sync(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = tuple(_spec(arg, self.path) for arg in session.get_inputs())
        outputs = tuple(_spec(arg, self.path) for arg in session.get_outputs())
        self.signature = ModelSignature(self.name, (self.version,), self.platform, inputs, outputs)
        self._all_outputs = [spec.name for spec in outputs]
        self._string_inputs = frozenset(spec.name for spec in inputs if spec.datatype == "BYTES")
        if all(spec.shape[:1] == (-1,) for spec in inputs + outputs):
            self._batch_outputs = {spec.name: spec for spec in outputs}
        self._session = session

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        assert self._session is not None, "predict before load"
        names = list(outputs) or self._all_outputs
        if self._batch_outputs and inputs:
            # No rows in, no rows out: onnxruntime fails on many graphs given an empty batch (a
            # Reshape of zero elements), and a step upstream may well find nothing (no text boxes).
            # (A loop, not all() over a generator: this runs on every call.)
            for array in inputs.values():
                if not array.ndim or array.shape[0]:
                    break
            else:
                return {name: _empty(self._batch_outputs[name]) for name in names}
        feed = dict(inputs)
        for name in self._string_inputs:
            # OIP BYTES arrive as bytes objects; onnxruntime string tensors want str.
            feed[name] = np.vectorize(_to_str, otypes=[object])(feed[name])
        try:
            results = self._session.run(names, feed)
        except (
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.Fail,
        ) as exc:
            # Shapes that pass metadata checks can still be wrong for the graph (e.g. a Reshape).
            raise InvalidInput(f"model '{self.name}' rejected the input: {exc}") from exc
        return dict(zip(names, results, strict=True))


def _empty(spec: TensorSpec) -> np.ndarray:
    """Zero rows of an output; its other dynamic dimensions are 0 as well."""
    return np.zeros((0, *(max(d, 0) for d in spec.shape[1:])), dtype=DATATYPE_TO_NUMPY[spec.datatype])


def _to_str(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
