"""OpenTelemetry tracing of a node: off unless the standard OTEL_* variables turn it on.

One request of `digits-serial`, as the spans of its trace (W3C `traceparent` between processes):

    caller's span (its traceparent is honoured: the trace continues)
    └── orchestrator  SERVER  graph digits-serial       the graph request: code, rows, request id
        ├──           step pre                          graph, step, service, model, version,
        │   └── preprocess  SERVER  model digits-preprocess      status (as in the response), code
        ├──           step mlp
        │   └── model_a     SERVER  model digits-mlp    rows; batched: queue and compute seconds,
        └──           step head                         the batch's rows and requests
            └── model_b     SERVER  model digits-head

A node's SERVER span is its request (named by the graph or model once the data plane found it,
`inference.GRPCInferenceService/ModelInfer` until then); a step span is the client side of its
downstream calls (each attempt's SERVER span is its child); a coalesced call gets a span of its
own, linked to every caller's. Spans are few on purpose: each costs tens of microseconds in
the Python SDK, and its export as much again.

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
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from services.common.errors import MeshError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from services.common.model import Servable
    from services.common.types import InferRequest

log = logging.getLogger(__name__)

#: True once `configure` (or `use_provider`) turned tracing on. Hot paths read it, once.
enabled = False
_tracer: Tracer | None = None

INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"
_RPC = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer"}
EXPORTERS = ("otlp", "console")
#: Codes that are the server's fault (OpenTelemetry's gRPC conventions): the others (a bad
#: input, an unknown model) leave a server span's status unset. Other spans: any non-OK.
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
    if provider is not None:
        _api.load()
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
    context: Context = _api.propagate.extract({key: value for key, value in metadata or ()})
    return context


def inject() -> list[tuple[str, str]]:
    """The current context as gRPC metadata for an outgoing call."""
    carrier: dict[str, str] = {}
    _api.propagate.inject(carrier)
    return list(carrier.items())


def current() -> Context:
    """The current context, to hand to work that runs elsewhere (a coalesced call)."""
    context: Context = _api.context.get_current()
    return context


def trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None outside a sampled span."""
    context = _api.trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid and context.trace_flags.sampled else None


def exemplar() -> dict[str, str] | None:
    """An exemplar for a Prometheus observation made inside a span: its trace id."""
    found = trace_id()
    return None if found is None else {"trace_id": found}


# -- spans ------------------------------------------------------------------------------------

Attributes = Mapping[str, str | int | float | bool]


def start(
    name: str,
    attributes: Attributes,
    *,
    parent: Context | None = None,
    server: bool = False,
    links: Sequence[Any] = (),
) -> tuple[Span, object]:
    """Start a span and make it current; hand both back to `finish` (a `with` costs more)."""
    kind = _api.SpanKind.SERVER if server else _api.SpanKind.INTERNAL
    started = tracer().start_span(name, parent, kind, attributes, links or None)
    return started, _api.context.attach(_api.trace.set_span_in_context(started))


def finish(
    span: Span,
    token: object,
    code: str,
    message: str = "",
    *,
    server: bool,
    attributes: Attributes | None = None,
) -> None:
    """Record the outcome (a gRPC status name) and end the span started by `start`.

    Errors get the ERROR status with the message; on a server span only the server's own
    (OpenTelemetry's gRPC conventions: a caller's bad input is not the server's error).
    """
    _api.context.detach(token)
    span.set_attributes({**attributes, "onnxmesh.code": code} if attributes else {"onnxmesh.code": code})
    if code != "OK" and (not server or code in _SERVER_ERRORS):
        span.set_status(_api.Status(_api.StatusCode.ERROR, f"{code}: {message}"[:512]))
    span.end()


def server_start(metadata: Iterable[tuple[str, str]] | None, rows: int) -> tuple[Span, object]:
    """The SERVER span of one ModelInfer call, child of the caller's span when it sent one."""
    return start(INFER_SPAN, {**_RPC, "onnxmesh.rows": rows}, parent=extract(metadata), server=True)


def annotate(servable: Servable, request: InferRequest) -> None:
    """Name the current (server) span after the servable the data plane found: `graph <name>`
    on the orchestrator (a servable with `span_name = "graph"`), `model <name>` elsewhere."""
    span = _api.trace.get_current_span()
    kind = getattr(servable, "span_name", "model")
    span.update_name(f"{kind} {servable.name}")
    attributes: dict[str, str] = {f"onnxmesh.{kind}": servable.name, "onnxmesh.version": servable.version}
    if request.request_id:
        attributes["onnxmesh.request_id"] = request.request_id
    span.set_attributes(attributes)


def batch_attributes(queued: float, computed: float, batch_rows: int, batch_requests: int) -> None:
    """A batched request's wait and its batch, on the current (server) span."""
    _api.trace.get_current_span().set_attributes(
        {
            "onnxmesh.queue_seconds": queued,
            "onnxmesh.compute_seconds": computed,
            "onnxmesh.batch.rows": batch_rows,
            "onnxmesh.batch.requests": batch_requests,
        }
    )


async def coalesced(work: Any, parents: Sequence[Context | None], model: str, rows: int) -> None:
    """Run `work` (a coalesced downstream call) in a span of its own: the child of the first
    caller's span, linked to every caller's, so each caller's trace leads to it."""
    links = []
    for parent in parents:
        if parent is not None:
            context = _api.trace.get_current_span(parent).get_span_context()
            if context.is_valid:
                links.append(_api.trace.Link(context))
    attributes: Attributes = {
        "onnxmesh.model": model,
        "onnxmesh.rows": rows,
        "onnxmesh.requests": len(parents),
    }
    first = next((p for p in parents if p is not None), None)
    span, token = start(f"coalesced {model}", attributes, parent=first, links=links)
    code = "OK"
    try:
        await work
    except BaseException as exc:
        code = exc.code if isinstance(exc, MeshError) else "CANCELLED" if _cancelled(exc) else "INTERNAL"
        raise
    finally:
        finish(span, token, code, server=False)


def outcome(exc: BaseException) -> tuple[str, str]:
    """The status name and the reason a span records for an exception."""
    if isinstance(exc, MeshError):
        return exc.code, exc.message if exc.public else "internal error"
    if _cancelled(exc):
        return "CANCELLED", "the caller went away"
    return "INTERNAL", type(exc).__name__


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)


class _Api:
    """The OpenTelemetry modules, imported once tracing is on (never while it is off)."""

    def load(self) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.context, self.propagate, self.trace = context, propagate, trace
        self.SpanKind, self.Status, self.StatusCode = SpanKind, Status, StatusCode

    context: Any
    propagate: Any
    trace: Any
    SpanKind: Any
    Status: Any
    StatusCode: Any


_api = _Api()
