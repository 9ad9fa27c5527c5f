"""Warm-up samples: what a model runs once before it reports ready (Triton's `model_warmup`).

`config.json` may declare them; without the key a model is warmed up with one row of zeros
per input (each dynamic dim set to 1), and `"warmup": false` (or `[]`) turns warm-up off:

    "warmup": [
      {"name": "one second of audio", "count": 2,
       "inputs": {"audio": {"dims": [1, 16000], "random_data": true},
                  "sr":    {"dims": [1], "values": [16000]},
                  "state": {"dims": [2, 1, 128], "zero_data": true},
                  "frame": {"dims": [1, 512], "input_data_file": "frame.bin"}}}
    ]

`dims` are full shapes (the batch dimension included) and must fit the model's signature;
the datatype is the signature's (`data_type`, if given, must agree: "FP32" or "TYPE_FP32").
An input a sample does not list gets zeros with each dynamic dim set to 1.
`input_data_file` holds the tensor's raw row-major bytes, in `<model>/warmup/` as in Triton.
A sample that does not fit (unknown input, wrong dims, a short file) or that the model
rejects makes the model fail to load with that reason; the node serves its other models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.types import DATATYPE_TO_NUMPY, ModelSignature, TensorSpec

_SOURCES = ("zero_data", "random_data", "input_data_file", "values")


class WarmupError(ValueError):
    """A warm-up sample that is malformed or does not fit the model."""


@dataclass(frozen=True)
class WarmupInput:
    dims: tuple[int, ...]
    #: One of _SOURCES.
    source: str = "zero_data"
    data_type: str = ""
    values: tuple[float, ...] = ()
    path: Path | None = None


@dataclass(frozen=True)
class WarmupSample:
    name: str
    inputs: Mapping[str, WarmupInput]
    count: int = 1


def parse_warmup(data: Any, model_path: Path) -> tuple[WarmupSample, ...] | None:
    """The samples of a config's `warmup` value; None (the default sample) when absent."""
    where = f"{model_path / 'config.json'}: warmup"
    if data is None:
        return None
    if data is False:
        return ()
    if not isinstance(data, list):
        raise ValueError(f"{where} must be a list of samples or false, got {type(data).__name__}")
    samples = []
    for index, sample in enumerate(data):
        if not isinstance(sample, dict) or not isinstance(sample.get("inputs", {}), dict):
            raise ValueError(f"{where}[{index}] must be an object with 'inputs': {{name: {{dims, ...}}}}")
        unknown = sorted(set(sample) - {"name", "count", "inputs", "batch_size"})
        if unknown:
            raise ValueError(f"{where}[{index}]: unknown keys {unknown}; allowed: name, count, inputs")
        name = str(sample.get("name", f"sample {index}"))
        count = sample.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}[{index}] ('{name}'): count must be a positive integer, got {count!r}")
        inputs = {
            tensor: _parse_input(f"{where}[{index}] ('{name}') input '{tensor}'", spec, model_path)
            for tensor, spec in sample.get("inputs", {}).items()
        }
        samples.append(WarmupSample(name, inputs, count))
    return tuple(samples)


def _parse_input(where: str, spec: Any, model_path: Path) -> WarmupInput:
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object with 'dims' and one of {', '.join(_SOURCES)}")
    unknown = sorted(set(spec) - {"dims", "data_type", *_SOURCES})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: dims, data_type, {', '.join(_SOURCES)}")
    dims = spec.get("dims")
    if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise ValueError(f"{where}: dims must be a list of sizes >= 0, got {dims!r}")
    sources = [key for key in _SOURCES if key in spec and spec[key] is not False]
    if len(sources) > 1:
        raise ValueError(f"{where}: give one of {', '.join(_SOURCES)}, not {' and '.join(sources)}")
    source = sources[0] if sources else "zero_data"
    data_type = str(spec.get("data_type", "")).removeprefix("TYPE_").replace("STRING", "BYTES")
    values: tuple[float, ...] = ()
    path = None
    if source == "values":
        raw = spec["values"]
        if not isinstance(raw, list) or not all(isinstance(v, int | float) for v in raw):
            raise ValueError(f"{where}: values must be a list of numbers")
        if len(raw) != math.prod(dims):
            raise ValueError(f"{where}: {len(raw)} values for dims {dims} ({math.prod(dims)} elements)")
        values = tuple(raw)
    elif source == "input_data_file":
        path = model_path / "warmup" / str(spec["input_data_file"])
    return WarmupInput(tuple(dims), source, data_type, values, path)


def default_inputs(signature: ModelSignature) -> dict[str, np.ndarray]:
    """One row of zeros per input, each dynamic dim set to 1."""
    return {spec.name: _zeros(spec) for spec in signature.inputs}


def sample_inputs(sample: WarmupSample, signature: ModelSignature) -> dict[str, np.ndarray]:
    """The tensors of one sample, checked against the signature (WarmupError when they do not fit)."""
    specs = signature.inputs_by_name
    unknown = sorted(set(sample.inputs) - set(specs))
    if unknown:
        raise WarmupError(
            f"warm-up sample '{sample.name}': the model has no input {unknown[0]!r}; "
            f"inputs: {', '.join(specs)}"
        )
    tensors = {}
    for spec in signature.inputs:
        given = sample.inputs.get(spec.name)
        tensors[spec.name] = _zeros(spec) if given is None else _tensor(sample.name, spec, given)
    return tensors


def _zeros(spec: TensorSpec) -> np.ndarray:
    shape = [1 if d == -1 else d for d in spec.shape]
    if spec.datatype == "BYTES":
        return np.full(shape, b"", dtype=np.object_)
    return np.zeros(shape, dtype=DATATYPE_TO_NUMPY[spec.datatype])


def _tensor(sample: str, spec: TensorSpec, given: WarmupInput) -> np.ndarray:
    where = f"warm-up sample '{sample}' input '{spec.name}'"
    if given.data_type and given.data_type != spec.datatype:
        raise WarmupError(f"{where}: data_type {given.data_type}, but the model takes {spec.datatype}")
    if not spec.accepts_shape(given.dims):
        raise WarmupError(f"{where}: dims {list(given.dims)} do not fit {spec.describe()} (-1 = any size)")
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    if spec.datatype == "BYTES":
        if given.source not in ("zero_data", "values"):
            raise WarmupError(f"{where}: BYTES inputs take zero_data or values")
        return np.array([str(v).encode() for v in given.values] or b"", dtype=np.object_).reshape(given.dims)
    if given.source == "values":
        return np.asarray(given.values, dtype=dtype).reshape(given.dims)
    if given.source == "random_data":
        return _random(dtype, given.dims)
    if given.source == "input_data_file":
        assert given.path is not None
        try:
            raw = given.path.read_bytes()
        except OSError as exc:
            raise WarmupError(f"{where}: cannot read {given.path}: {exc.strerror}") from None
        need = math.prod(given.dims) * dtype.itemsize
        if len(raw) != need:
            raise WarmupError(
                f"{where}: {given.path} holds {len(raw)} bytes, dims {list(given.dims)} need {need}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(given.dims)
    return np.zeros(given.dims, dtype=dtype)


def _random(dtype: np.dtype, dims: Sequence[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype.kind == "f":
        return rng.random(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, dims).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, dims, dtype=dtype, endpoint=True)
