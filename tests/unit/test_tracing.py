"""Tracing without sockets: when it is on, the spans of steps and coalesced calls; when off, nothing.

Spans go to the SDK's in-memory exporter (the test's own provider); `use_provider(None)` turns
tracing off again after each test. The spans across real processes are tests/e2e/test_tracing.py's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from orchestrator.graph.engine import Engine
from orchestrator.spec import parse_spec
from orchestrator.stages.coalescing import CoalescingStage
from services.common.errors import Unavailable
from services.common.grpc import traced
from services.common.grpc.client import OipClient
from services.common.grpc.servicer import InferenceServicer
from services.common.observability import tracing
from services.common.observability.logs import TextFormatter, request_id_var
from services.common.types import InferRequest
from tests.unit.fakes import FakeStage

SPEC = """
services: {s: {address: "127.0.0.1:1"}}
graphs:
  g:
    inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]
    steps:
      - {name: a, service: s, model: m, inputs: {x: request.x}}
      - {name: b, service: s, model: m, inputs: {x: a.y}, dependency: soft, retries: 0}
    outputs: {y: a.y}
"""


def identity(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"]}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)


def test_the_standard_variables_choose_the_exporters() -> None:
    assert tracing.requested_exporters({}) == []
    assert tracing.requested_exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.requested_exporters({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.requested_exporters({"OTEL_TRACES_EXPORTER": "otlp, console"}) == ["otlp", "console"]
    assert tracing.requested_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == ["otlp"]
    assert tracing.requested_exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}) == ["otlp"]
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}
    assert tracing.requested_exporters(disabled) == []
    assert tracing.requested_exporters({"OTEL_TRACES_EXPORTER": "zipkin,console"}) == ["console"]


def test_off_by_default_the_plain_edge_serves() -> None:
    assert tracing.configure("test", environ={}) is False
    assert tracing.enabled is False
    assert traced.servicer_class() is InferenceServicer
    assert traced.client_class() is OipClient


def test_each_step_gets_a_span_with_its_outcome(spans: InMemorySpanExporter) -> None:
    # The second call of `m` (step b, soft) fails with UNAVAILABLE and is not retried.
    calls = {"n": 0}

    def model(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise Unavailable("model_b down")
        return identity(inputs)

    engine = Engine(parse_spec(SPEC), {"s": FakeStage({"m": model})})

    async def run() -> None:
        with tracing.tracer().start_as_current_span("request"):
            result = await engine.run("g", {"x": np.ones((3, 2), np.float32)}, deadline=None)
        assert result.parameters["step.a"] == "ok"
        assert str(result.parameters["step.b"]).startswith("error: UNAVAILABLE")

    asyncio.run(run())
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert set(finished) == {"request", "step a", "step b"}
    a, b, request = finished["step a"], finished["step b"], finished["request"]
    assert a.parent is not None and a.parent.span_id == request.context.span_id
    assert b.parent is not None and b.parent.span_id == request.context.span_id
    assert a.context.trace_id == b.context.trace_id == request.context.trace_id
    assert dict(a.attributes or {}) == {
        "onnxmesh.graph": "g",
        "onnxmesh.step": "a",
        "onnxmesh.service": "s",
        "onnxmesh.model": "m",
        "onnxmesh.rows": 3,
        "onnxmesh.status": "ok",
        "onnxmesh.version": "1",
        "onnxmesh.code": "OK",
    }
    assert a.status.status_code == StatusCode.UNSET
    assert (b.attributes or {})["onnxmesh.code"] == "UNAVAILABLE"
    assert b.status.status_code == StatusCode.ERROR and "model_b down" in (b.status.description or "")


def test_a_coalesced_call_links_to_every_caller(spans: InMemorySpanExporter) -> None:
    fake = FakeStage({"m": identity}, sleep={"m": 0.02})
    stage = CoalescingStage(fake, max_in_flight=1)
    tracer = tracing.tracer()

    async def caller(i: int) -> None:
        with tracer.start_as_current_span(f"caller {i}"):
            request = InferRequest("m", {"x": np.full((1, 2), i, np.float32)}, deadline=time.monotonic() + 5)
            await stage.call(request)

    async def run() -> None:
        first = asyncio.create_task(caller(0))
        await fake.wait_for_calls(1)  # the first call is out; the next four wait for it
        await asyncio.gather(first, *(caller(i) for i in range(1, 5)))

    asyncio.run(run())
    finished = spans.get_finished_spans()
    callers = {s.name: s for s in finished if s.name.startswith("caller")}
    (shared,) = [s for s in finished if s.name == "coalesced m"]
    assert len(fake.calls) == 2
    waiting = [callers[f"caller {i}"] for i in range(1, 5)]
    assert {link.context.span_id for link in shared.links} == {c.context.span_id for c in waiting}
    assert shared.parent is not None and shared.parent.span_id == waiting[0].context.span_id
    assert (shared.attributes or {})["onnxmesh.requests"] == 4
    assert (shared.attributes or {})["onnxmesh.rows"] == 4


def test_text_logs_keep_the_failure_s_fields() -> None:
    formatter = TextFormatter("orchestrator")
    record = logging.LogRecord(
        "orchestrator.graph.engine", logging.WARNING, __file__, 1, "step failed", None, None
    )
    for key, value in {
        "graph": "g",
        "step": "b",
        "code": "UNAVAILABLE",
        "error": "step 'b' (s/m): down",
    }.items():
        setattr(record, key, value)
    token = request_id_var.set("r-1")
    try:
        line = formatter.format(record)
    finally:
        request_id_var.reset(token)
    assert line.endswith(
        "step failed graph=g step=b code=UNAVAILABLE error=\"step 'b' (s/m): down\" [request_id=r-1]"
    )
