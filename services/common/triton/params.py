"""Tensor and request parameters of Triton's extensions, the same for gRPC and REST.

    request  timeout                      microseconds: the request's deadline (if sooner)
    input    shared_memory_region, _offset, _byte_size        read the tensor from a region
    output   classification               top-k classes as BYTES "score:index" (class_count)
             shared_memory_region, _offset, _byte_size        write the tensor into a region
    REST     binary_data_size (input), binary_data (output), binary_data_output (request)

Triton's rule for any other parameter: accepted and not interpreted (Triton hands it to the
model, KServe ignores it), so stock clients work as they are: perf_analyzer sends
`triton_enable_empty_final_response` on every call, tritonclient `priority` when asked. Each is
counted (`onnxmesh_ignored_parameters_total{parameter}`, names outside `IGNORED` as "other").
Refused with INVALID_ARGUMENT naming it is only what ignoring would answer wrongly: sequence
batching (`sequence_id`, `sequence_start`, `sequence_end`: the model keeps no state between
requests); a bad value of a parameter that is interpreted (a malformed `timeout`, a
shared-memory region that is not registered) is refused as well.
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
#: Not interpreted, and ignoring them would give a wrong answer: refused, with the reason.
_WHY_NOT = {
    "sequence_id": "sequence batching is not served",
    "sequence_start": "sequence batching is not served",
    "sequence_end": "sequence batching is not served",
}
#: Parameters stock clients send that nodes accept without interpreting them, each counted under
#: its own name; any other name is counted as OTHER (clients cannot grow the metric's series).
IGNORED = (
    "triton_enable_empty_final_response",  # perf_analyzer, tritonclient streams: decoupled models only
    "priority",  # tritonclient, perf_analyzer --request-parameter: scheduling order only
    BINARY_OUTPUT,  # tritonclient HTTP's habit, sent over gRPC by ports of it (gRPC is binary)
    BINARY,
    BINARY_SIZE,
    "content_type",  # MLServer's codecs name the tensor's encoding; the datatype already says it
    "headers",  # MLServer and KServe copy HTTP headers into parameters
)
OTHER = "other"


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
    why = _WHY_NOT[key]
    return InvalidInput(
        f"{where}: parameter '{key}' is not supported ({why}); supported: {', '.join(allowed)}"
    )


def _check(where: str, params: Mapping[str, Param], allowed: Sequence[str], ignored: list[str]) -> None:
    """Refuse what must not be ignored; add the rest of what is not `allowed` to `ignored`, by its
    metric label (its name if in IGNORED, else OTHER)."""
    for key in params:
        if key in allowed:
            continue
        if key in _WHY_NOT:
            raise _refuse(where, key, allowed)
        ignored.append(key if key in IGNORED else OTHER)


def request_deadline(
    params: Mapping[str, Param], deadline: float | None, ignored: list[str], *, rest: bool = False
) -> float | None:
    """The request's deadline once its parameters are checked: the sooner of `deadline` and
    `timeout`. Parameters that are not interpreted are added to `ignored` by their metric label
    (as in the others)."""
    allowed = (TIMEOUT, BINARY_OUTPUT) if rest else (TIMEOUT,)
    _check("request", params, allowed, ignored)
    if TIMEOUT not in params:
        return deadline
    timeout = _integer("request", TIMEOUT, params[TIMEOUT])
    if timeout <= 0:
        return deadline  # Triton: 0 means no timeout
    mine = time.monotonic() + timeout / 1e6
    return mine if deadline is None else min(deadline, mine)


def input_region(
    name: str, params: Mapping[str, Param], ignored: list[str], *, rest: bool = False
) -> Region | None:
    """The region an input is read from, if its parameters name one."""
    allowed = (*_SHM, BINARY_SIZE) if rest else _SHM
    _check(f"input '{name}'", params, allowed, ignored)
    return _region(f"input '{name}'", params)


def output_options(
    name: str, params: Mapping[str, Param], ignored: list[str], *, rest: bool = False
) -> OutputOptions:
    allowed = (CLASSIFICATION, *_SHM, BINARY) if rest else (CLASSIFICATION, *_SHM)
    _check(f"output '{name}'", params, allowed, ignored)
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
