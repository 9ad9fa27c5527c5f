"""An OTLP/gRPC trace receiver of the tests' own (a real gRPC server implementing
opentelemetry-proto's TraceService, as a collector does), and a caller's traceparent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.propagate import inject
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import set_span_in_context

from tests.support import until

SERVER, INTERNAL = 2, 1  # opentelemetry-proto's Span.SpanKind


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    start: int
    end: int
    attributes: dict[str, Any]
    status: int


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    received.append(
                        Span(
                            service=resource["service.name"],
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent=span.parent_span_id.hex(),
                            start=span.start_time_unix_nano,
                            end=span.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status=span.status.code,
                        )
                    )
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@contextmanager
def receiving() -> Iterator[tuple[Receiver, dict[str, str]]]:
    """A receiver on a free port and the OTEL_* variables that send a process's spans to it."""
    receiver = Receiver()
    executor = ThreadPoolExecutor(4)
    server = grpc.server(executor)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    try:
        yield receiver, env
    finally:
        server.stop(0)
        executor.shutdown()


def spans_of(receiver: Receiver, trace_id: str, count: int) -> list[Span]:
    """The spans of one trace, once all `count` of them have arrived."""
    return until(lambda: found if len(found := receiver.trace(trace_id)) >= count else None, f"{count} spans")


def caller_traceparent(caller: TracerProvider, name: str) -> tuple[dict[str, str], tuple[str, str]]:
    """A client span of the test's own, as W3C headers (the standard propagator writes them)."""
    span = caller.get_tracer("test").start_span(name)
    headers: dict[str, str] = {}
    inject(headers, context=set_span_in_context(span))
    span.end()
    context = span.get_span_context()
    return headers, (f"{context.trace_id:032x}", f"{context.span_id:016x}")
