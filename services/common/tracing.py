"""OpenTelemetry tracing of a node: off unless the standard OTEL_* variables turn it on.

One request of `digits-serial`, as the spans of its trace (W3C `traceparent` between processes):

    caller's span (its traceparent is honoured: the trace continues)
    └── orchestrator  SERVER   inference.GRPCInferenceService/ModelInfer   status code, rows
        └──           graph digits-serial                                   the graph request
            ├──       step pre                                              graph, step, service,
            │   └──   CLIENT   inference.GRPCInferenceService/ModelInfer    model, version, status
            │         └── preprocess  SERVER  .../ModelInfer
            │             └──         model digits-preprocess              rows; batched models add
            ├──       step mlp ...                                          queue and compute spans
            └──       step head ...

Only ModelInfer is traced: health, reflection and metadata calls never are (OpenTelemetry's
stock grpc.aio server instrumentation, applied to every method, breaks the streaming
Health/Watch, so the mesh would never become ready). The spans are written at the edges the
mesh already has (`tracing_edge`: servicer and client), in the data plane, the engine's step
calls, batching and coalescing.

Tracing is on when `OTEL_TRACES_EXPORTER` names `otlp` and/or `console`, or when an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`);
`OTEL_SDK_DISABLED=true` or `none` keeps it off. Everything else (`OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_PROPAGATORS`) is the SDK's own. Off, the hot path pays one check of `enabled` and
creates no span; the OpenTelemetry packages (the `otel` extra) are not even imported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from services.common.errors import MeshError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from services.common.model import Servable
    from services.common.types import InferRequest, InferResult

log = logging.getLogger(__name__)

#: True once `configure` (or `use_provider`) turned tracing on. Hot paths read it, once.
enabled = False
_tracer: Tracer | None = None

INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"
_RPC = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer"}
EXPORTERS = ("otlp", "console")
#: Server-side codes that are the server's fault (OpenTelemetry's gRPC conventions); the
#: others (a bad input, an unknown model) leave a server span unset. Client spans: any non-OK.
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


# -- set-up -----------------------------------------------------------------------------------


def requested_exporters(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The span exporters the environment asks for ([] = tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    unknown = [n for n in names if n not in (*EXPORTERS, "none")]
    if unknown:
        log.warning(
            "OTEL_TRACES_EXPORTER: unknown exporter(s) %s ignored; known: otlp, console, none", unknown
        )
    return [n for n in dict.fromkeys(names) if n in EXPORTERS]


def configure(service: str, version: str = "", environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on for this process if the environment asks for it; True if it is on.

    `service` names the node (`service.name`, unless OTEL_SERVICE_NAME says otherwise).
    Called once per process by the server; later calls change nothing.
    """
    if enabled:
        return True
    exporters = requested_exporters(environ)
    if not exporters:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning(
            "tracing is asked for (%s) but OpenTelemetry is not installed: pip install 'onnxmesh[otel]'",
            ", ".join(exporters),
        )
        return False
    attributes: dict[str, str] = {"service.namespace": "onnxmesh", "service.version": version}
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        if name == "console":
            # One span per line on stdout (beside the node's few announcement lines).
            exporter: Any = ConsoleSpanExporter(out=sys.stdout, formatter=_one_line)
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, TLS: OTEL_EXPORTER_OTLP_*
        provider.add_span_processor(BatchSpanProcessor(exporter))
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    use_provider(provider)
    _add_ids_to_log_records()
    log.info("tracing on", extra={"exporters": exporters})
    return True


def use_provider(provider: TracerProvider | None) -> None:
    """Trace with `provider` (tests: an in-memory exporter); None turns tracing off again."""
    global enabled, _tracer
    _tracer = None if provider is None else provider.get_tracer("onnxmesh")
    enabled = provider is not None


def _one_line(span: Any) -> str:
    return str(span.to_json(indent=None)) + "\n"


def _add_ids_to_log_records() -> None:
    """Every log line written inside a span carries its `trace_id` and `span_id` (both formats)."""
    from opentelemetry import trace

    previous = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        entry = previous(*args, **kwargs)
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry.trace_id = trace.format_trace_id(context.trace_id)
            entry.span_id = trace.format_span_id(context.span_id)
        return entry

    logging.setLogRecordFactory(record)


def tracer() -> Tracer:
    if _tracer is None:
        raise RuntimeError("tracing is off")
    return _tracer


# -- propagation and ids ----------------------------------------------------------------------


def extract(metadata: Iterable[tuple[str, str]] | None) -> Context:
    """The caller's context from gRPC metadata (`traceparent`, `tracestate`, baggage)."""
    from opentelemetry import propagate

    return propagate.extract({key: value for key, value in metadata or ()})


def inject() -> list[tuple[str, str]]:
    """The current context as gRPC metadata for an outgoing call."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def current() -> Context:
    """The current context, to hand to work that runs elsewhere (a coalesced call)."""
    from opentelemetry import context

    return context.get_current()


def trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None outside a sampled span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return (
        trace.format_trace_id(context.trace_id) if context.is_valid and context.trace_flags.sampled else None
    )


def exemplar() -> dict[str, str] | None:
    """An exemplar for a Prometheus observation made inside a span: its trace id."""
    found = trace_id()
    return None if found is None else {"trace_id": found}


def rows_of(inputs: Mapping[str, Any]) -> int:
    """The rows of a request: the first dimension of its first input (0 when it has none)."""
    for array in inputs.values():
        shape = getattr(array, "shape", ())
        return int(shape[0]) if shape else 0
    return 0


# -- spans ------------------------------------------------------------------------------------


@contextmanager
def span(name: str, attributes: Mapping[str, str | int | float | bool]) -> Iterator[Span]:
    """An INTERNAL span, current inside the block; the block sets its outcome (`set_code`)."""
    from opentelemetry import trace

    started = tracer().start_span(name, attributes=attributes)
    with trace.use_span(started, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        yield started


def set_code(span: Span, code: str, message: str = "", *, server: bool) -> None:
    """Record a call's gRPC status (name) on its span; errors get the ERROR status and the message."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("onnxmesh.code", code)
    if code == "OK":
        return
    if not server or code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"[:512]))


@contextmanager
def server_span(metadata: Iterable[tuple[str, str]] | None, model: str, version: str) -> Iterator[Span]:
    """The SERVER span of one ModelInfer call, child of the caller's span when it sent one."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    attributes: dict[str, str] = {**_RPC, "onnxmesh.model": model}
    if version:
        attributes["onnxmesh.version"] = version
    span = tracer().start_span(INFER_SPAN, extract(metadata), SpanKind.SERVER, attributes)
    with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        yield span


@contextmanager
def client_span(target: str, model: str, version: str) -> Iterator[tuple[Span, list[tuple[str, str]]]]:
    """The CLIENT span of one outgoing ModelInfer call, and the metadata that carries it."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    attributes: dict[str, str] = {**_RPC, "server.address": target, "onnxmesh.model": model}
    if version:
        attributes["onnxmesh.version"] = version
    span = tracer().start_span(INFER_SPAN, kind=SpanKind.CLIENT, attributes=attributes)
    with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        yield span, inject()


async def traced_infer(servable: Servable, request: InferRequest) -> InferResult:
    """`servable.infer(request)` inside its span: `graph <name>` on the orchestrator (a servable
    with `span_name = "graph"`), `model <name>` on a model node."""
    kind = getattr(servable, "span_name", "model")
    attributes: dict[str, str | int] = {
        f"onnxmesh.{kind}": servable.name,
        "onnxmesh.version": servable.version,
        "onnxmesh.rows": rows_of(request.inputs),
    }
    if request.request_id:
        attributes["onnxmesh.request_id"] = request.request_id
    with span(f"{kind} {servable.name}", attributes) as current:
        try:
            result = await servable.infer(request)
        except asyncio.CancelledError:
            set_code(current, "CANCELLED", "the caller went away", server=True)
            raise
        except Exception as exc:
            set_code(current, exc.code if isinstance(exc, MeshError) else "INTERNAL", str(exc), server=True)
            raise
        set_code(current, "OK", server=True)
        return result


def batch_spans(
    arrived: float, started: float, finished: float, rows: int, batch_rows: int, batch_requests: int
) -> None:
    """`queue` and `compute` children of the current span, for a request a batch answered.

    Times are `time.monotonic()` seconds: `arrived` in the queue, its batch `started`, its
    answer `finished`. The batch is shared, so its size goes on the compute span.
    """
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return
    offset = time.time_ns() - time.monotonic_ns()

    def ns(t: float) -> int:
        return int(t * 1e9) + offset

    span.set_attribute("onnxmesh.queue_seconds", max(0.0, started - arrived))
    span.set_attribute("onnxmesh.batch.rows", batch_rows)
    own = tracer()
    own.start_span("queue", start_time=ns(arrived), attributes={"onnxmesh.rows": rows}).end(ns(started))
    compute = own.start_span(
        "compute",
        start_time=ns(started),
        attributes={"onnxmesh.batch.rows": batch_rows, "onnxmesh.batch.requests": batch_requests},
    )
    compute.end(ns(finished))


async def coalesced(work: Any, parents: Sequence[Context | None], model: str, rows: int) -> None:
    """Run `work` (a coalesced downstream call) in a span of its own: the child of the first
    caller's span, linked to every caller's, so each caller's trace leads to it."""
    from opentelemetry import trace

    links = []
    for parent in parents:
        context = trace.get_current_span(parent).get_span_context() if parent is not None else None
        if context is not None and context.is_valid:
            links.append(trace.Link(context))
    span = tracer().start_span(
        f"coalesced {model}",
        context=next((p for p in parents if p is not None), None),
        attributes={"onnxmesh.model": model, "onnxmesh.rows": rows, "onnxmesh.requests": len(parents)},
        links=links,
    )
    with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        await work
