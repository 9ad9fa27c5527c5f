"""Tensor and request parameters of Triton's extensions, the same for gRPC and REST.

    request  timeout                      microseconds: the request's deadline (if sooner)
    input    shared_memory_region, _offset, _byte_size        read the tensor from a region
    output   classification               top-k classes as BYTES "score:index" (class_count)
             shared_memory_region, _offset, _byte_size        write the tensor into a region
    REST     binary_data_size (input), binary_data (output), binary_data_output (request)

Any other parameter is refused with INVALID_ARGUMENT naming it: an extension that is not
served is never silently ignored (e.g. `sequence_id`: sequence batching; `priority`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidInput

Param = bool | int | float | str

SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_SIZE = "shared_memory_byte_size"
CLASSIFICATION = "classification"
BINARY_SIZE = "binary_data_size"
BINARY = "binary_data"
BINARY_OUTPUT = "binary_data_output"
TIMEOUT = "timeout"

_SHM = (SHM_REGION, SHM_OFFSET, SHM_SIZE)
_WHY_NOT = {
    "sequence_id": "sequence batching is not served",
    "sequence_start": "sequence batching is not served",
    "sequence_end": "sequence batching is not served",
    "priority": "request priorities are not served",
}


@dataclass(frozen=True, slots=True)
class Region:
    """Where a tensor lives in shared memory."""

    name: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class OutputOptions:
    class_count: int = 0
    region: Region | None = None
    binary: bool | None = None


def _refuse(where: str, key: str, allowed: Sequence[str]) -> InvalidInput:
    why = _WHY_NOT.get(key, "not a parameter this server knows")
    return InvalidInput(
        f"{where}: parameter '{key}' is not supported ({why}); supported: {', '.join(allowed)}"
    )


def request_deadline(
    params: Mapping[str, Param], deadline: float | None, *, rest: bool = False
) -> float | None:
    """The request's deadline once its parameters are checked: the sooner of `deadline` and `timeout`."""
    allowed = (TIMEOUT, BINARY_OUTPUT) if rest else (TIMEOUT,)
    for key in params:
        if key not in allowed:
            raise _refuse("request", key, allowed)
    if TIMEOUT not in params:
        return deadline
    timeout = _integer("request", TIMEOUT, params[TIMEOUT])
    if timeout <= 0:
        return deadline  # Triton: 0 means no timeout
    mine = time.monotonic() + timeout / 1e6
    return mine if deadline is None else min(deadline, mine)


def input_region(name: str, params: Mapping[str, Param], *, rest: bool = False) -> Region | None:
    """The region an input is read from, if its parameters name one."""
    allowed = (*_SHM, BINARY_SIZE) if rest else _SHM
    for key in params:
        if key not in allowed:
            raise _refuse(f"input '{name}'", key, allowed)
    return _region(f"input '{name}'", params)


def output_options(name: str, params: Mapping[str, Param], *, rest: bool = False) -> OutputOptions:
    allowed = (CLASSIFICATION, *_SHM, BINARY) if rest else (CLASSIFICATION, *_SHM)
    for key in params:
        if key not in allowed:
            raise _refuse(f"output '{name}'", key, allowed)
    count = 0
    if CLASSIFICATION in params:
        count = _integer(f"output '{name}'", CLASSIFICATION, params[CLASSIFICATION])
        if count < 1:
            raise InvalidInput(
                f"output '{name}': parameter '{CLASSIFICATION}' must be at least 1, got {count}"
            )
    binary = params.get(BINARY)
    if binary is not None and not isinstance(binary, bool):
        raise InvalidInput(f"output '{name}': parameter '{BINARY}' must be true or false")
    region = _region(f"output '{name}'", params)
    if region is not None and count:
        raise InvalidInput(f"output '{name}': classification results cannot be written to shared memory")
    return OutputOptions(count, region, binary)


def _region(where: str, params: Mapping[str, Param]) -> Region | None:
    if SHM_REGION not in params:
        extra = [key for key in (SHM_OFFSET, SHM_SIZE) if key in params]
        if extra:
            raise InvalidInput(f"{where}: parameter '{extra[0]}' needs '{SHM_REGION}'")
        return None
    region = params[SHM_REGION]
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{where}: parameter '{SHM_REGION}' must be a region name")
    if SHM_SIZE not in params:
        raise InvalidInput(f"{where}: parameter '{SHM_REGION}' needs '{SHM_SIZE}'")
    offset = _integer(where, SHM_OFFSET, params.get(SHM_OFFSET, 0))
    size = _integer(where, SHM_SIZE, params[SHM_SIZE])
    return Region(region, offset, size)


def _integer(where: str, key: str, value: Param) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{where}: parameter '{key}' must be an integer, got {value!r}")
    return value


def classify(name: str, array: np.ndarray, count: int) -> np.ndarray:
    """Triton's classification extension: the top `count` classes of each row, best first, as
    BYTES "score:index"; [batch, k] for a tensor with a batch dimension, [k] for a vector."""
    if array.dtype.kind not in "iuf" or array.ndim == 0:
        raise InvalidInput(
            f"output '{name}': classification needs a numeric tensor with classes, got {array.dtype}{list(array.shape)}"
        )
    rows = array.reshape(1, -1) if array.ndim == 1 else array.reshape(array.shape[0], -1)
    k = min(count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty(order.shape, dtype=np.object_)
    for r, indexes in enumerate(order):
        out[r] = [f"{float(rows[r, i]):f}:{int(i)}".encode() for i in indexes]
    return out.reshape(k) if array.ndim == 1 else out
