"""Traces, metrics and logs of real requests across the four real processes of a local mesh.

The test runs an OTLP/gRPC receiver of its own (a real gRPC server implementing
opentelemetry-proto's TraceService, as a collector does) and starts the mesh with the standard
variables pointing at it (and the console exporter as well). It then sends known traffic, each
request carrying a caller's `traceparent`, and checks: one trace per request across all four
nodes with the right parent links, the step names, the parallel branches overlapping in time,
the batching model's queue and compute spans, trace ids as exemplars on the latency buckets,
every metric moved by exactly the traffic sent, and the failure's log line (text format) with
its code, reason, graph, step, request and trace ids. Waits are on conditions (spans received,
log lines seen), each bounded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from demo.digits import load_holdout
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from services.common.grpc.client import OipClient
from tests.e2e import otlp
from tests.e2e.otlp import INTERNAL, SERVER, Receiver, Span, caller_traceparent
from tests.support import ROOT, expressions, selectors, stub, tool, until

NODES = ("orchestrator", "preprocess", "model_a", "model_b")
#: graph -> its model steps: (step, service, model)
STEPS = {
    "digits-serial": [
        ("pre", "preprocess", "digits-preprocess"),
        ("mlp", "model_a", "digits-mlp"),
        ("head", "model_b", "digits-head"),
    ],
    "digits-parallel": [
        ("pre", "preprocess", "digits-preprocess"),
        ("mlp", "model_a", "digits-mlp"),
        ("logreg", "model_b", "digits-logreg"),
    ],
}


@dataclass
class Run:
    mesh: LocalMesh
    receiver: Receiver
    console: list[str]
    #: graph -> (the caller's trace id, the caller's span id)
    traces: dict[str, tuple[str, str]]
    failed_trace: tuple[str, str]
    before: dict[str, str]
    after: dict[str, str]


def scrape(port: int, *, openmetrics: bool = False) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if openmetrics:
        request.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


def scrape_all(mesh: LocalMesh) -> dict[str, str]:
    out = {}
    for node in NODES:
        port = mesh.process(node).metrics_port
        assert port is not None, node
        out[node] = scrape(port)
    return out


def value(text: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    receiver = Receiver()
    executor = ThreadPoolExecutor(4)
    server = grpc.server(executor)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # model_a batches here (max_batch_size 8), so its spans show the queue and the compute.
    models = tmp_path_factory.mktemp("model_a")
    shutil.copytree(ROOT / "services/model_a/models", models, dirs_exist_ok=True)
    config = models / "digits-mlp/config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_batch_size": 8}))
    console: list[str] = []
    lock = threading.Lock()

    class Echo:
        def write(self, text: str) -> int:
            with lock:
                console.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    env = {
        "OTEL_TRACES_EXPORTER": "otlp,console",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    mesh = LocalMesh(
        ports=EPHEMERAL_PORTS,
        env=env,
        model_dirs={"model_a": models},
        extra_args={node: ["--metrics-port", "0"] for node in NODES},
        log_format="text",
        echo=Echo(),  # type: ignore[arg-type]
    )
    caller = TracerProvider()
    image = load_holdout().images[:1]
    try:
        with mesh:
            before = scrape_all(mesh)
            traces = {}
            with stub(mesh.address("orchestrator")) as oip:
                for graph in STEPS:
                    headers, ids = caller_traceparent(caller, graph)
                    oip.ModelInfer(
                        OipClient.build_request(graph, {"image": image}), metadata=tuple(headers.items())
                    )
                    traces[graph] = ids
                # A pixel out of range: valid for the graph, refused by the preprocess step.
                headers, failed = caller_traceparent(caller, "bad")
                bad = OipClient.build_request("digits-serial", {"image": np.full((1, 8, 8), 17, np.uint8)})
                with pytest.raises(grpc.RpcError) as info:
                    oip.ModelInfer(bad, metadata=tuple(headers.items()))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            after = scrape_all(mesh)
            yield Run(mesh, receiver, console, traces, failed, before, after)
    finally:
        server.stop(0)
        executor.shutdown()


def spans_of(run: Run, trace_id: str, count: int) -> list[Span]:
    return otlp.spans_of(run.receiver, trace_id, count)


def only(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent == parent.span_id]


@pytest.mark.parametrize("graph", list(STEPS))
def test_one_trace_crosses_every_node_with_the_right_parents(run: Run, graph: str) -> None:
    trace_id, caller_span = run.traces[graph]
    # The orchestrator's request and its three steps; one request span on each model node.
    spans = spans_of(run, trace_id, 7)
    assert len(spans) == 7, [(s.service, s.name) for s in spans]
    assert {s.service for s in spans} == set(NODES)
    root = only(spans, service="orchestrator", kind=SERVER)
    assert root.parent == caller_span  # the caller's trace continues
    assert root.name == f"graph {graph}"
    assert root.attributes["rpc.method"] == "ModelInfer" and root.attributes["rpc.grpc.status_code"] == 0
    assert root.attributes["onnxmesh.graph"] == graph and root.attributes["onnxmesh.rows"] == 1
    steps = children(spans, root)
    assert sorted(s.name for s in steps) == sorted(f"step {name}" for name, _, _ in STEPS[graph])
    for name, service, model in STEPS[graph]:
        step = only(steps, name=f"step {name}")
        assert step.kind == INTERNAL
        assert step.attributes["onnxmesh.graph"] == graph
        assert step.attributes["onnxmesh.service"] == service
        assert step.attributes["onnxmesh.model"] == model
        assert step.attributes["onnxmesh.version"] == "1"
        assert step.attributes["onnxmesh.status"] == "ok"
        assert step.attributes["onnxmesh.rows"] == 1
        (served,) = children(spans, step)
        assert (served.service, served.kind, served.name) == (service, SERVER, f"model {model}")
        assert served.attributes["onnxmesh.model"] == model and served.attributes["onnxmesh.rows"] == 1
        assert served.attributes["onnxmesh.code"] == "OK"
        assert step.start <= served.start <= served.end <= step.end
    # Nothing else is traced: no health, reflection or metadata call appears.
    assert all(s.name.startswith(("graph ", "step ", "model ")) for s in spans)


def test_the_parallel_branches_overlap_in_time(run: Run) -> None:
    spans = spans_of(run, run.traces["digits-parallel"][0], 7)
    mlp, logreg = only(spans, name="step mlp"), only(spans, name="step logreg")
    assert mlp.start < logreg.end and logreg.start < mlp.end
    serial = spans_of(run, run.traces["digits-serial"][0], 7)
    pre, mlp = only(serial, name="step pre"), only(serial, name="step mlp")
    assert pre.end <= mlp.start  # a sequence runs one step after the other


def test_the_batching_model_shows_its_queue_and_compute(run: Run) -> None:
    spans = spans_of(run, run.traces["digits-serial"][0], 7)
    served = only(spans, name="model digits-mlp")
    queued, computed = (
        served.attributes["onnxmesh.queue_seconds"],
        served.attributes["onnxmesh.compute_seconds"],
    )
    # Inside the span (its clock is the wall clock, the queue's the monotonic one: 1 ms of slack).
    assert queued >= 0 and computed > 0
    assert queued + computed <= (served.end - served.start) / 1e9 + 0.001
    assert served.attributes["onnxmesh.batch.rows"] == 1
    assert served.attributes["onnxmesh.batch.requests"] == 1
    assert "onnxmesh.batch.rows" not in only(spans, name="model digits-head").attributes  # not batched


def test_a_failed_request_is_traced_with_its_code(run: Run) -> None:
    trace_id, _ = run.failed_trace
    spans = spans_of(run, trace_id, 3)  # the orchestrator's request and step pre; preprocess's
    assert len(spans) == 3
    root = only(spans, service="orchestrator", kind=SERVER)
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert root.attributes["onnxmesh.code"] == "INVALID_ARGUMENT"
    step = only(spans, name="step pre")
    assert step.attributes["onnxmesh.code"] == "INVALID_ARGUMENT"
    assert step.attributes["onnxmesh.status"].startswith("error: INVALID_ARGUMENT")
    assert step.status == 2  # ERROR: the step failed the request
    served = only(spans, service="preprocess")
    assert served.attributes["onnxmesh.code"] == "INVALID_ARGUMENT"
    assert served.status == 0  # a caller's bad input is not the server's error


def test_the_console_exporter_prints_the_same_spans(run: Run) -> None:
    trace_id, _ = run.traces["digits-serial"]

    def printed() -> list[dict[str, Any]]:
        found = []
        for line in list(run.console):
            node, _, text = line.partition(" ")
            if node == "[orchestrator-1]" and text.startswith("{") and trace_id in text:
                found.append(json.loads(text))
        return found

    spans = until(lambda: found if len(found := printed()) >= 4 else None, "the orchestrator's console spans")
    assert {s["name"] for s in spans} == {"graph digits-serial", "step pre", "step mlp", "step head"}


def test_latency_buckets_carry_trace_ids_as_exemplars(run: Run) -> None:
    ours = {trace_id for trace_id, _ in run.traces.values()}
    port = run.mesh.process("orchestrator").metrics_port
    assert port is not None
    exemplars: dict[str, set[str]] = {}
    for family in openmetrics_families(scrape(port, openmetrics=True)):
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplars.setdefault(family.name, set()).add(sample.exemplar.labels["trace_id"])
    assert exemplars["onnxmesh_request_duration_seconds"] & ours
    assert exemplars["onnxmesh_step_duration_seconds"] & ours


def test_metrics_move_by_exactly_the_traffic_sent(run: Run) -> None:
    def moved(node: str, sample: str, **labels: str) -> float:
        return value(run.after[node], sample, **labels) - value(run.before[node], sample, **labels)

    requests = "onnxmesh_requests_total"
    assert moved("orchestrator", requests, model="digits-serial", code="OK") == 1
    assert moved("orchestrator", requests, model="digits-parallel", code="OK") == 1
    assert moved("orchestrator", requests, model="digits-serial", code="INVALID_ARGUMENT") == 1
    assert moved("preprocess", requests, model="digits-preprocess", code="OK") == 2
    assert moved("preprocess", requests, model="digits-preprocess", code="INVALID_ARGUMENT") == 1
    assert moved("model_a", requests, model="digits-mlp", code="OK") == 2
    # One row per downstream call (no concurrency, nothing coalesced).
    rows = "onnxmesh_downstream_call_rows"
    for service, model, calls in (
        ("preprocess", "digits-preprocess", 3),
        ("model_a", "digits-mlp", 2),
        ("model_b", "digits-head", 1),
        ("model_b", "digits-logreg", 1),
    ):
        assert moved("orchestrator", f"{rows}_count", service=service, model=model) == calls
        assert moved("orchestrator", f"{rows}_sum", service=service, model=model) == calls
    steps = "onnxmesh_step_duration_seconds_count"
    assert moved("orchestrator", steps, graph="digits-serial", step="pre", status="error") == 1
    assert moved("orchestrator", steps, graph="digits-serial", step="head", status="ok") == 1
    # model_a's batching: two batches of one row, two requests queued, nothing waiting now.
    assert moved("model_a", "onnxmesh_batch_rows_count", model="digits-mlp", version="1") == 2
    assert moved("model_a", "onnxmesh_batch_rows_sum", model="digits-mlp", version="1") == 2
    assert moved("model_a", "onnxmesh_batch_queue_duration_seconds_count", model="digits-mlp") == 2
    assert value(run.after["model_a"], "onnxmesh_batch_queue_rows", model="digits-mlp") == 0


def test_the_failure_is_logged_with_code_reason_graph_step_and_ids(run: Run) -> None:
    trace_id, _ = run.failed_trace
    orchestrator = run.mesh.process("orchestrator")

    def line(start: str) -> str | None:
        return next(
            (entry for entry in list(orchestrator.tail) if start in entry and trace_id in entry), None
        )

    step = until(lambda: line("step failed"), "the failed step's log line")
    assert "graph=digits-serial" in step and "step=pre" in step and "code=INVALID_ARGUMENT" in step
    assert "pixel values must be 0..16" in step and "[request_id=" in step
    answer = until(lambda: line("ModelInfer failed"), "the failed call's log line")
    assert "code=INVALID_ARGUMENT" in answer and "model=digits-serial" in answer and "step 'pre'" in answer


def test_the_exposition_passes_promtool(run: Run, tmp_path: Path) -> None:
    promtool = tool("promtool", "make promtool")
    for node, text in run.after.items():
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, (node, checked.stdout, checked.stderr)


def test_the_dashboard_and_alerts_query_what_the_nodes_export(run: Run) -> None:
    exported: dict[str, set[str]] = {}  # series name -> every label name seen on it
    for text in run.after.values():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                exported.setdefault(sample.name, set()).update(sample.labels)
    # What Prometheus adds when it scrapes a pod (the PodMonitor's targets).
    scraped = {"namespace", "pod", "container", "job", "instance"}
    # Series a node exports only once its spec declares the feature; their labels here, and
    # their export is asserted where the feature runs (tests/e2e/test_drift.py reads this gauge).
    for name, labels in {"onnxmesh_drift_psi": {"graph", "tensor"}}.items():
        assert name not in exported, f"{name} is exported without drift declared: move it back"
        exported[name] = labels
    for where, expr in expressions():
        for name, labels in selectors(expr):
            assert name in exported, f"{where}: no node exports {name}"
            assert labels <= exported[name] | scraped, (
                f"{where}: {name} has no label {labels - exported[name]}"
            )


def test_health_and_reflection_are_never_traced(run: Run) -> None:
    # The orchestrator watches every service's health (grpc.health.v1 Watch) and the launcher
    # checked each node's: the mesh got ready with tracing on, and none of it made a span.
    for node in NODES:
        assert run.mesh.process(node).ready_line_seen
    with run.receiver.lock:
        names = {span.name for span in run.receiver.spans}
    assert names and all(name.startswith(("graph ", "step ", "model ", "coalesced ")) for name in names), (
        names
    )
