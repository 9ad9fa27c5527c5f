"""One captured record, and the tensors of a call the spec's ``capture:`` keeps."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.spec import CaptureSpec
from services.common.observability import tracing


@dataclass(frozen=True)
class Capture:
    """A captured graph request (``step`` "") or model step call, as stored in ``captures``."""

    graph: str
    step: str
    service: str
    model: str
    version: str
    request_id: str
    trace_id: str
    #: Unix seconds at the end of the call.
    captured_at: float
    latency: float
    #: "OK" or the gRPC status name of the failure.
    status_code: str
    #: "input.<name>" / "output.<name>" -> the tensor as nested lists (JSON and Parquet friendly).
    tensors: dict[str, Any]
    #: The tensors exceeded the spec's max_bytes and were left out.
    truncated: bool = False


def captured_tensors(
    spec: CaptureSpec,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, Any], bool]:
    """The tensors ``spec`` keeps of a call, and whether they were left out for exceeding max_bytes.

    Runs on the request path for sampled requests only: it selects and measures; the conversion
    to lists is left to the store, in the writer thread (``as_lists``).
    """
    kept: dict[str, np.ndarray] = {}
    for prefix, tensors, wanted in (("input", inputs, spec.inputs), ("output", outputs or {}, spec.outputs)):
        if wanted:
            for name, value in tensors.items():
                if not spec.tensors or name in spec.tensors:
                    kept[f"{prefix}.{name}"] = value
    if sum(v.nbytes for v in kept.values()) > spec.max_bytes:
        return {}, True
    return dict(kept), False


def as_lists(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """numpy arrays -> nested lists; BYTES elements as text (undecodable bytes replaced)."""
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                value = np.vectorize(_text, otypes=[object])(value) if value.size else value
            value = value.tolist()
        out[name] = value
    return out


def _text(item: Any) -> Any:
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else item


def make_record(
    spec: CaptureSpec,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray] | None,
    *,
    graph: str,
    step: str = "",
    service: str = "",
    model: str = "",
    version: str = "",
    request_id: str = "",
    latency: float,
    status_code: str,
) -> Capture:
    """A record of one call ending now, in the current trace (if any)."""
    tensors, truncated = captured_tensors(spec, inputs, outputs)
    trace_id = (tracing.trace_id() or "") if tracing.enabled else ""
    return Capture(
        graph,
        step,
        service,
        model,
        version,
        request_id,
        trace_id,
        time.time(),
        latency,
        status_code,
        tensors,
        truncated,
    )
