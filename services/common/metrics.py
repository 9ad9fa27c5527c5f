"""Prometheus metrics of one node, on a registry of its own (never the process-global one).

The exposition itself is prometheus_client's; this module only names the series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

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


class ServerMetrics:
    """The series every node exports: requests by model, version and status code; latency; in-flight."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        # process_cpu_seconds_total and friends: the node's whole CPU, beside its own-time metrics.
        ProcessCollector(registry=self.registry)
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
        self.ready = Gauge(
            "onnxmesh_ready", "1 when every model of this node is loaded and warm.", registry=self.registry
        )

    def observe_request(self, model: str, version: str, code: str, seconds: float) -> None:
        """Count one ModelInfer call (label children are looked up once per series)."""
        key = (model, version, code)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (self.requests.labels(*key), self.latency.labels(model))
        series[0].inc()
        series[1].observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on host:port (a daemon thread); returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
