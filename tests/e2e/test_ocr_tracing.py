"""One OCR request with tracing on (the OCR example's mesh, real processes on 127.0.0.1, spans
sent to the tests' own OTLP receiver) is one trace holding a span for every step of the graph
and one on the service that ran it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from bench.ocr import page
from services.common.grpc.client import OipClient
from tests.e2e.ocr_support import EXAMPLE, fetch_models
from tests.e2e.otlp import INTERNAL, SERVER, Receiver, caller_traceparent, receiving, spans_of
from tests.e2e.tutorial import Mesh
from tests.support import stub

#: graph `ocr`'s model steps: (step, service, model), in order.
STEPS = [
    ("pre", "decode", "ocr-decode"),
    ("det", "detect", "ppocr-det"),
    ("lines", "boxes", "ocr-boxes"),
    ("angle", "angle", "ppocr-cls"),
    ("turn", "rotate", "ocr-rotate"),
    ("rec", "recognize", "ppocr-rec"),
    ("text", "ctc", "ocr-ctc"),
]


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Receiver, tuple[str, str], dict[str, object]]]:
    fetch_models()
    with receiving() as (receiver, env):
        running = Mesh(EXAMPLE, env)
        try:
            address = running.ready()
            headers, ids = caller_traceparent(TracerProvider(), "ocr")
            image = page([("Traced through the mesh", 32), ("upside down", 32)], angle=180)
            with stub(address) as oip:
                answer = oip.ModelInfer(
                    OipClient.build_request("ocr", {"image": np.array([image], dtype=object)}),
                    metadata=tuple(headers.items()),
                    timeout=120,
                )
            yield receiver, ids, {k: v.string_param for k, v in answer.parameters.items()}
        finally:
            running.stop()


def test_one_ocr_request_is_one_trace_with_a_span_for_every_step(
    traced: tuple[Receiver, tuple[str, str], dict[str, object]],
) -> None:
    receiver, (trace_id, caller_span), parameters = traced
    assert all(parameters[f"step.{step}"] == "ok" for step, _, _ in STEPS), parameters
    # The orchestrator's request, a span per step, and one per step on the service that ran it.
    spans = spans_of(receiver, trace_id, 1 + 2 * len(STEPS))
    assert len(spans) == 1 + 2 * len(STEPS), sorted((s.service, s.name) for s in spans)
    (root,) = [s for s in spans if s.service == "orchestrator" and s.kind == SERVER]
    assert root.parent == caller_span and root.name == "graph ocr"
    assert {s.name for s in spans if s.parent == root.span_id} == {f"step {step}" for step, _, _ in STEPS}
    for step, service, model in STEPS:
        (span,) = [s for s in spans if s.name == f"step {step}"]
        assert span.kind == INTERNAL
        assert span.attributes["onnxmesh.service"] == service
        assert span.attributes["onnxmesh.model"] == model
        assert span.attributes["onnxmesh.status"] == "ok"
        (served,) = [s for s in spans if s.parent == span.span_id]
        assert (served.service, served.kind, served.name) == (service, SERVER, f"model {model}")
        assert span.start <= served.start <= served.end <= span.end
