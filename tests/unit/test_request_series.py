"""`RequestSeries` counts every inference call in plain numbers; what a scraper reads must be what
prometheus_client's own Counter and Histogram would expose for the same calls, in both formats."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from services.common.observability.metrics import LATENCY_BUCKETS, RequestSeries

#: (model, version, code, seconds): bounds exactly, between bounds, past the last, and zero.
CALLS = [
    ("a", "1", "OK", 0.0005),
    ("a", "1", "OK", 0.0007),
    ("a", "1", "INVALID_ARGUMENT", 0.0),
    ("b", "", "OK", 7.0),
    ("a", "2", "OK", 0.002),
    ("b", "", "OK", 0.064),
]


def _without_created_times(text: bytes) -> str:
    """The exposition with the `_created` timestamps (when each series began) left out."""
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text.decode())


def test_the_exposition_is_prometheus_clients_own() -> None:
    reference = CollectorRegistry(auto_describe=True)
    requests = Counter(
        "onnxmesh_requests",
        "ModelInfer calls by model, version and gRPC status code.",
        ["model", "version", "code"],
        registry=reference,
    )
    latency = Histogram(
        "onnxmesh_request_duration_seconds",
        "ModelInfer latency seen by this node, from model lookup to response encoded.",
        ["model"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    ours = CollectorRegistry(auto_describe=True)
    series = RequestSeries(ours)
    for model, version, code, seconds in CALLS:
        requests.labels(model, version, code).inc()
        latency.labels(model).observe(seconds)
        series.observe(model, version, code, seconds)
    for exposition in (generate_latest, openmetrics):
        assert _without_created_times(exposition(ours)) == _without_created_times(exposition(reference))
    assert ours.get_sample_value("onnxmesh_requests_total", {"model": "a", "version": "1", "code": "OK"}) == 2
    assert ours.get_sample_value("onnxmesh_request_duration_seconds_count", {"model": "b"}) == 2


def test_an_empty_node_exposes_the_families_without_samples() -> None:
    registry = CollectorRegistry(auto_describe=True)
    RequestSeries(registry)
    text = generate_latest(registry).decode()
    assert "# TYPE onnxmesh_requests_total counter" in text
    assert "# TYPE onnxmesh_request_duration_seconds histogram" in text
    assert "onnxmesh_requests_total{" not in text
