"""Prometheus metrics of one node, on a registry of its own (never the process-global one).

The exposition itself is prometheus_client's (OpenMetrics too, for a scraper that asks for it:
with tracing on, latency observations carry the trace id as an exemplar); this module names the
series, counts the two every inference call updates in plain numbers (`RequestSeries`), and serves
them on `/metrics` alone (any other path is 404, so a probe aimed at the port by mistake fails).
docs/observability.md lists them all, with the dashboard built on them.
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
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
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

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
        #: onnxmesh_requests_total and onnxmesh_request_duration_seconds (`RequestSeries`).
        self.requests = RequestSeries(self.registry)
        self.inflight = Gauge(
            "onnxmesh_inflight_requests", "ModelInfer calls in progress.", registry=self.registry
        )
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
        self.observe_request: ObserveRequest = self.requests.observe

    def ignored_parameters(self, labels: Iterable[str]) -> None:
        """Count parameters a request carried that this node does not interpret, by label
        (`triton.params` bounds them: known names, else "other")."""
        for label in labels:
            self._ignored.labels(label).inc()

    def use_exemplars(self) -> None:
        """From now on each latency observation carries the current trace id (tracing is on)."""
        self.observe_request = self.requests.observe_with_exemplar


class _Latency:
    """One model's latency histogram: observations per bucket (not cumulative; the last is +Inf)."""

    __slots__ = ("buckets", "created", "exemplars", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.exemplars: list[Exemplar | None] = [None] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.created = time.time()


class _Requests:
    """One (model, version, code) series: its count, and its model's latency."""

    __slots__ = ("count", "created", "latency")

    def __init__(self, latency: _Latency) -> None:
        self.count = 0
        self.created = time.time()
        self.latency = latency


class RequestSeries(Collector):
    """`onnxmesh_requests_total{model,version,code}` and `onnxmesh_request_duration_seconds{model}`,
    counted in plain numbers and turned into Prometheus samples when scraped.

    Every inference call is counted here: a Counter's inc() and a Histogram's observe() cost
    about ten Python calls and three lock acquisitions per call; this costs one call. Observations
    come from the node's event loop thread only; a scrape (another thread) reads them as they
    are, each histogram's count being the sum of its buckets. The exposition is
    prometheus_client's, as for every other series (`_created` samples and, with tracing on,
    trace ids as exemplars on the latency buckets included).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._series: dict[tuple[str, str, str], _Requests] = {}
        self._latency: dict[str, _Latency] = {}
        registry.register(self)

    def _series_of(self, model: str, version: str, code: str) -> _Requests:
        latency = self._latency.get(model)
        if latency is None:
            latency = self._latency[model] = _Latency()
        series = self._series[(model, version, code)] = _Requests(latency)
        return series

    def observe(self, model: str, version: str, code: str, seconds: float) -> None:
        """Count one call and its latency."""
        series = self._series.get((model, version, code)) or self._series_of(model, version, code)
        series.count += 1
        latency = series.latency
        # A bucket's bound is inclusive (le): the first bound >= seconds.
        latency.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency.sum += seconds

    def observe_with_exemplar(self, model: str, version: str, code: str, seconds: float) -> None:
        """`observe`, the current trace id kept as its bucket's exemplar."""
        self.observe(model, version, code, seconds)
        labels = tracing.exemplar()
        if labels:
            latency = self._latency[model]
            latency.exemplars[bisect_left(LATENCY_BUCKETS, seconds)] = Exemplar(labels, seconds, time.time())

    def describe(self) -> Iterator[Metric]:
        yield from self._families({}, {})

    def collect(self) -> Iterator[Metric]:
        yield from self._families(dict(self._series), dict(self._latency))

    @staticmethod
    def _families(
        series: dict[tuple[str, str, str], _Requests], latencies: dict[str, _Latency]
    ) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "onnxmesh_requests",
            "ModelInfer calls by model, version and gRPC status code.",
            labels=["model", "version", "code"],
        )
        for key, one in series.items():
            requests.add_metric(key, one.count, created=one.created)
        yield requests
        name = "onnxmesh_request_duration_seconds"
        latency = HistogramMetricFamily(
            name,
            "ModelInfer latency seen by this node, from model lookup to response encoded.",
            labels=["model"],
        )
        bounds = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]
        for model, histogram in latencies.items():
            cumulative, buckets = 0, []
            for bound, count, exemplar in zip(bounds, histogram.buckets, histogram.exemplars, strict=True):
                cumulative += count
                buckets.append((bound, cumulative) if exemplar is None else (bound, cumulative, exemplar))
            latency.add_metric([model], buckets, histogram.sum)
            latency.samples.append(Sample(f"{name}_created", {"model": model}, histogram.created))
        yield latency


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
