"""Prometheus metrics of one node, on a registry of its own (never the process-global one).

The exposition itself is prometheus_client's (OpenMetrics too, for a scraper that asks for it:
with tracing on, latency observations carry the trace id as an exemplar); this module only names
the series and serves them on `/metrics` alone (any other path is 404, so a probe aimed at the
port by mistake fails). docs/observability.md lists them all, with the dashboard built on them.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from services.common.observability import tracing

METRICS_PATH = "/metrics"

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.0,
    2.5,
    5.0,
)

#: Rows per model call or downstream call: powers of two up to well past any max_batch_size.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Time in a batching queue: from a fraction of max_queue_delay_ms to a queue that backs up.
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 1.0)

ObserveRequest = Callable[[str, str, str, float], None]


class NodeMetrics:
    """The series of every gRPC process (a node, the jobs service, a worker): its process and
    whether it serves; served on `/metrics` by `serve_http`."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        # process_cpu_seconds_total and friends: the node's whole CPU, beside its own-time metrics.
        ProcessCollector(registry=self.registry)
        self.ready = Gauge(
            "onnxmesh_ready",
            "1 when this process serves (on a model node: every model loaded and warm).",
            registry=self.registry,
        )
        self._http: ThreadingWSGIServer | None = None

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on host:port (a daemon thread); returns the bound port.

        Raises OSError naming the port and the node when it cannot bind.
        """
        app = _only_metrics(make_wsgi_app(self.registry))
        server_class = _server_class(host)
        try:
            server = make_server(host, port, app, server_class, handler_class=_Quiet)
        except OSError as exc:
            raise OSError(
                f"{self.service}: cannot serve metrics on {host}:{port}: {exc.strerror}"
                + (" (another process has it; --metrics-port 0 picks a free one)" if port else ""),
            ) from None
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()


class ServerMetrics(NodeMetrics):
    """The series every OIP node exports: requests by model, version and status code; latency; in-flight."""

    def __init__(self, service: str) -> None:
        super().__init__(service)
        self.requests = Counter(
            "onnxmesh_requests",
            "ModelInfer calls by model, version and gRPC status code.",
            ["model", "version", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "onnxmesh_request_duration_seconds",
            "ModelInfer latency seen by this node, from model lookup to response encoded.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "onnxmesh_inflight_requests", "ModelInfer calls in progress.", registry=self.registry
        )
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.batching = BatchingMetrics(self.registry)
        self._ignored = Counter(
            "onnxmesh_ignored_parameters",
            "Request, input and output parameters accepted without being interpreted, by name "
            "(names outside the known list as 'other').",
            ["parameter"],
            registry=self.registry,
        )
        self.admission_refusals = Counter(
            "onnxmesh_admission_refusals",
            "ModelInfer calls refused before they were decoded: over the in-flight limit ('limit') "
            "or while the event loop lagged ('lag').",
            ["reason"],
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "onnxmesh_event_loop_lag_seconds",
            "How late the event loop fires a timer: how long a call arriving now waits before its "
            "handler runs (front-door admission refuses above --max-loop-lag).",
            registry=self.registry,
        )
        #: Count one ModelInfer call: model, version, status code, seconds.
        self.observe_request: ObserveRequest = self._observe_request

    def ignored_parameters(self, labels: Iterable[str]) -> None:
        """Count parameters a request carried that this node does not interpret, by label
        (`triton.params` bounds them: known names, else "other")."""
        for label in labels:
            self._ignored.labels(label).inc()

    def use_exemplars(self) -> None:
        """From now on each latency observation carries the current trace id (tracing is on)."""
        self.observe_request = self._observe_request_with_exemplar

    def _series_of(self, model: str, version: str, code: str) -> tuple[Any, Any]:
        key = (model, version, code)
        series = self._series.get(key)
        if series is None:  # label children are looked up once per series
            series = self._series[key] = (self.requests.labels(*key), self.latency.labels(model))
        return series

    def _observe_request(self, model: str, version: str, code: str, seconds: float) -> None:
        series = self._series.get((model, version, code)) or self._series_of(model, version, code)
        series[0].inc()
        series[1].observe(seconds)

    def _observe_request_with_exemplar(self, model: str, version: str, code: str, seconds: float) -> None:
        series = self._series_of(model, version, code)
        series[0].inc()
        series[1].observe(seconds, tracing.exemplar())


Environ = dict[str, Any]
StartResponse = Callable[..., Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]


def _only_metrics(app: App) -> App:
    def only(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: metrics are on {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return only


def _server_class(host: str) -> type[ThreadingWSGIServer]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingWSGIServer):
        address_family = family

    return Server


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class BatchingMetrics:
    """The adaptive batching queues of a node (`services.common.batching.adaptive`), by model and version.

    Registered on every node, so the series exist (empty) where nothing batches.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.rows = Histogram(
            "onnxmesh_batch_rows",
            "Rows per call of a batched model's predict (the batch size).",
            labels,
            buckets=ROW_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "onnxmesh_batch_queue_duration_seconds",
            "Time a request waited in the batching queue until its batch started.",
            labels,
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.queue_rows = Gauge(
            "onnxmesh_batch_queue_rows",
            "Rows waiting in the batching queue (the queue depth).",
            labels,
            registry=registry,
        )
