"""Raw tensor bytes <-> numpy arrays: the one place both edges (gRPC and REST) decode and encode them.

Raw bytes (row-major) are the fast path and are decoded without copying (`np.frombuffer`).
Every length is checked against shape x datatype *before* the bytes are used, so a malformed
tensor is an InvalidInput that names it, never a crash or a silent reshape. BYTES elements
travel as a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from services.common.errors import InvalidInput
from services.common.types import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, datatype_of

_LEN = struct.Struct("<I")


#: The most elements a tensor's shape may describe (far above any message gRPC accepts).
MAX_ELEMENTS = 2**40


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_header(name: str, datatype: str, shape: Sequence[int]) -> np.dtype:
    """The numpy dtype of a tensor, after checking its datatype and shape are well-formed."""
    dtype = DATATYPE_TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"tensor '{name}': unknown datatype '{datatype}'; expected one of {', '.join(DATATYPE_TO_NUMPY)}"
        )
    if min(shape, default=0) < 0:
        raise InvalidInput(f"tensor '{name}': shape {list(shape)} has a negative dimension")
    # numpy refuses even an empty array whose other dimensions multiply past its index range.
    # (The generator runs only for empty tensors: a plain product is the common case.)
    count = math.prod(shape)
    if count > MAX_ELEMENTS or (count == 0 and math.prod(d for d in shape if d) > MAX_ELEMENTS):
        raise InvalidInput(
            f"tensor '{name}': shape {list(shape)[:8]} is too large (over {MAX_ELEMENTS} elements)"
        )
    return dtype


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """A read-only numpy view of raw tensor bytes, after checking their length."""
    dtype = check_header(name, datatype, shape)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes(name, shape, raw, count)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"tensor '{name}': raw contents hold {len(raw)} bytes but shape {list(shape)} of "
            f"{datatype} needs {expected} bytes"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _decode_bytes(name: str, shape: Sequence[int], raw: bytes, count: int) -> np.ndarray:
    items: list[bytes] = []
    offset, size = 0, len(raw)
    view = memoryview(raw)
    while offset < size:
        if offset + 4 > size:
            raise InvalidInput(f"tensor '{name}': BYTES contents end inside a 4-byte length prefix")
        (length,) = _LEN.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(
                f"tensor '{name}': BYTES element {len(items)} claims {length} bytes but only "
                f"{size - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInput(
            f"tensor '{name}': BYTES contents hold {len(items)} elements but shape {list(shape)} needs {count}"
        )
    out = np.empty(count, dtype=np.object_)
    out[:] = items
    return out.reshape(shape)


def encode_raw(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, row-major bytes) of an array: the raw wire form."""
    # The exact dtypes by lookup (every output of every call); str and bytes arrays by datatype_of.
    datatype = NUMPY_TO_DATATYPE.get(array.dtype) or datatype_of(array)
    shape = list(array.shape)
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return datatype, shape, b"".join(parts)
    # Only a view of other bytes can be those bytes: an array a runtime made costs no call here.
    raw = received_bytes(array) if isinstance(array.base, (bytes, np.ndarray)) else None
    return datatype, shape, raw or np.ascontiguousarray(array).tobytes()


def received_bytes(array: np.ndarray) -> bytes | None:
    """The wire bytes an array was decoded from, if it is an untouched view of all of them.

    `decode_raw` returns `np.frombuffer(raw).reshape(shape)`: forwarding such a tensor to the
    next service can reuse `raw` itself instead of copying it (the orchestrator's hot path).
    """
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, bytes) or len(base) != array.nbytes or not array.flags.c_contiguous:
        return None
    start = np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    return base if array.__array_interface__["data"][0] == start else None
