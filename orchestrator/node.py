"""The orchestrator node: graphs from the spec, served as OIP models through the shared runtime.

Start-up: the spec is checked statically (a bad spec exits with its error); the node binds
and answers NOT_SERVING while it waits for every service to answer ModelMetadata; the spec
is then checked against those signatures (a mismatch exits with its error) and each graph is
served as a model. The spec file is watched: a valid new spec replaces the old one atomically
(in-flight requests finish on the old one); an invalid one is logged and ignored.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from orchestrator.addresses import address_variable
from orchestrator.capture import (
    CAPTURE_DB_ENV,
    CAPTURE_MAX_AGE_ENV,
    CAPTURE_MAX_RECORDS_ENV,
    CAPTURE_QUEUE_ENV,
    Capture,
    CaptureWriter,
    StoreSink,
)
from orchestrator.capture.drift import DriftMonitor
from orchestrator.capture.writer import open_store
from orchestrator.graph.engine import Engine
from orchestrator.spec import MeshSpec, SpecError, parse_spec, validate_against_signatures
from orchestrator.stages.base import Stage, keeps_deadline
from orchestrator.stages.cache import ResponseCaches
from orchestrator.stages.coalescing import DEFAULT_IN_FLIGHT, CoalescingStage
from orchestrator.stages.replicas import ReplicaSet
from orchestrator.stages.retry_budget import RetryBudget
from services.common.errors import MeshError, Unavailable
from services.common.grpc import traced
from services.common.grpc.security import ClientSecurity
from services.common.model import Servable
from services.common.observability import tracing
from services.common.observability.metrics import LATENCY_BUCKETS, ROW_BUCKETS, ServerMetrics
from services.common.repository import ModelRepository
from services.common.types import InferRequest, InferResult, ModelSignature

log = logging.getLogger(__name__)

ModelKey = tuple[str, str, str]  # (service, model, version)
#: Seconds between two drift evaluations (each reads the watched tensors' windows from the store).
DRIFT_INTERVAL_ENV = "ONNXMESH_DRIFT_INTERVAL"


def service_addresses(spec: MeshSpec, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Each service's address from the spec, overridden by ONNXMESH_SERVICE_<NAME>_ADDRESS."""
    out = {}
    for name, service in spec.services.items():
        address = environ.get(address_variable(name), service.address)
        if not address:
            raise SpecError(
                f"service {name!r} has no address: the mesh's launcher sets {address_variable(name)} "
                "(`onnxmesh up`, or the rendered Kubernetes manifests)"
            )
        out[name] = address
    return out


def _number(text: str | None, kind: Callable[[str], Any]) -> Any:
    """An optional numeric setting from the environment (None when unset or empty)."""
    return kind(text) if text else None


class OrchestratorMetrics:
    """Series of the orchestrator on top of every node's: per step, its own overhead, shadows."""

    def __init__(self, base: ServerMetrics) -> None:
        registry = base.registry
        self.steps = Histogram(
            "onnxmesh_step_duration_seconds",
            "Downstream step latency by graph, step, service, model, version and status.",
            ["graph", "step", "service", "model", "version", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "onnxmesh_orchestrator_overhead_seconds",
            "The orchestrator's own time per request: request time minus time waiting on steps.",
            ["graph"],
            buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
            registry=registry,
        )
        self.mirror = Counter(
            "onnxmesh_mirror_comparisons",
            "Shadow answers compared with the primary's, by graph, step and agreement.",
            ["graph", "step", "agree"],
            registry=registry,
        )
        self.replica_events = Counter(
            "onnxmesh_replica_events",
            "Hedged and failed-over calls, ejections and restorations, by service and replica.",
            ["service", "replica", "event"],
            registry=registry,
        )
        self.reloads = Counter(
            "onnxmesh_spec_reloads", "Graph spec reload attempts by result.", ["result"], registry=registry
        )
        self.downstream_rows = Histogram(
            "onnxmesh_downstream_call_rows",
            "Rows per call to a service (coalesced calls carry several requests' rows), by service and model.",
            ["service", "model"],
            buckets=ROW_BUCKETS,
            registry=registry,
        )
        self.cache_lookups = Counter(
            "onnxmesh_cache_lookups",
            "Response cache lookups by cache (graph, or graph/step) and result (hit, miss).",
            ["cache", "result"],
            registry=registry,
        )
        self.captured = Counter(
            "onnxmesh_capture_records", "Captured records written to the store.", registry=registry
        )
        self.capture_dropped = Counter(
            "onnxmesh_capture_dropped",
            "Captured records dropped, by reason: queue_full (the writer is behind), store (a write failed).",
            ["reason"],
            registry=registry,
        )
        for reason in ("queue_full", "store"):  # known reasons start at 0, so rate() sees the first drop
            self.capture_dropped.labels(reason=reason)
        self.capture_pending = Gauge(
            "onnxmesh_capture_pending",
            "Captured records accepted and not yet written: the writer's backlog.",
            registry=registry,
        )
        self.drift = Gauge(
            "onnxmesh_drift_psi",
            "Population stability index of a graph tensor's newest captured values against its reference.",
            ["graph", "tensor"],
            registry=registry,
        )


class GraphServable(Servable):
    """One graph of a spec, served as an OIP model by the engine of its spec generation.

    In-flight requests finish on the engine they started with, whatever a reload does meanwhile.
    `ready` tells whether every hard step is ready.
    """

    #: Its request's span is `graph <name>` (a model's is `model <name>`).
    span_name = "graph"

    def __init__(
        self,
        name: str,
        signature: ModelSignature,
        engine: Engine,
        *,
        ready: Callable[[], bool] = lambda: True,
        reason: Callable[[], str] = lambda: "",
    ) -> None:
        self.name = name
        self.version = "1"
        self.signature = signature
        self.engine = engine
        self._ready = ready
        self._reason = reason

    @property
    def ready(self) -> bool:
        return self._ready()

    @property
    def reason(self) -> str:
        """Which hard steps' models are not ready (RepositoryIndex shows it)."""
        return self._reason()

    @property
    def loaded(self) -> bool:
        # Requests still run when a step is down: soft steps degrade, hard ones fail naming the step.
        return True

    async def infer(self, request: InferRequest) -> InferResult:
        result = await self.engine.run(
            self.name, dict(request.inputs), deadline=request.deadline, request_id=request.request_id
        )
        if request.outputs:
            result.outputs = {name: result.outputs[name] for name in request.outputs}
        result.model_name, result.model_version = self.name, self.version
        return result


class PendingGraph(Servable):
    """A graph of the spec before the services have answered: known, but still loading, so that a
    client calling a starting orchestrator gets UNAVAILABLE (retry) rather than NOT_FOUND."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "1"
        self.signature = ModelSignature(name, ("1",), "onnxmesh-graph", (), ())

    @property
    def ready(self) -> bool:
        return False

    async def infer(self, request: InferRequest) -> InferResult:
        raise Unavailable(f"graph '{self.name}' is still loading")


@dataclass
class SpecGeneration:
    """One consistent generation of the spec: its engine and graph servables."""

    spec: MeshSpec
    digest: str
    engine: Engine
    graphs: list[GraphServable]
    hard_models: dict[str, set[ModelKey]]


class Orchestrator:
    """Owns the spec, the long-lived clients (one per replica), the engine and readiness."""

    def __init__(
        self,
        spec_path: Path,
        repository: ModelRepository,
        metrics: ServerMetrics,
        *,
        reload_interval: float = 2.0,
        coalesce_in_flight: int = DEFAULT_IN_FLIGHT,
        environ: Mapping[str, str] = os.environ,
        client_security: ClientSecurity | None = None,
    ) -> None:
        """`coalesce_in_flight`: downstream calls per step that may run at once before further
        calls of that step wait and leave stacked as one (0 = never stack). `client_security`:
        the TLS files the orchestrator presents to the services (mTLS), None = plaintext."""
        self.client_security = client_security
        self.spec_path = spec_path
        self.repository = repository
        self.metrics = OrchestratorMetrics(metrics)
        self.reload_interval = reload_interval
        self.environ = environ
        self.coalesce_in_flight = coalesce_in_flight
        #: One replica set per address (one client per replica), shared by the services there.
        self.replica_sets: dict[str, ReplicaSet] = {}
        #: Pays for every retry, fail-over and hedge of this orchestrator, across spec reloads.
        self.budget = RetryBudget()
        self._stages: dict[tuple[str, str], Stage] = {}
        self._step_series: dict[tuple[str, ...], Any] = {}
        self._overhead_series: dict[str, Any] = {}
        self._downstream_series: dict[tuple[str, str], Any] = {}
        self.current: SpecGeneration | None = None
        self.model_ready: dict[ModelKey, bool] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Made when a spec first captures (watches drift); kept across reloads.
        self.capture: CaptureWriter | None = None
        self.drift: DriftMonitor | None = None
        text = spec_path.read_text()
        # A bad spec fails here, before anything starts.
        self.pending_spec = parse_spec(text, origin=str(spec_path))
        self.pending_digest = hashlib.sha256(text.encode()).hexdigest()
        repository.replace(PendingGraph(name) for name in self.pending_spec.graphs)

    def graph_ready(self, graph: str) -> bool:
        if self.current is None:
            return False
        return all(self.model_ready.get(key, False) for key in self.current.hard_models.get(graph, ()))

    def graph_reason(self, graph: str) -> str:
        if self.current is None:
            return "the graph spec is not loaded yet"
        down = sorted(
            key for key in self.current.hard_models.get(graph, ()) if not self.model_ready.get(key, False)
        )
        return "not ready: " + ", ".join("/".join(k for k in key if k) for key in down) if down else ""

    def stages(self, spec: MeshSpec) -> dict[str, Stage]:
        """One stage per service, kept across reloads: a replica set per address (a long-lived,
        health-checked channel per replica, and one that ignores health for its drain), under
        coalescing."""
        stages: dict[str, Stage] = {}
        for service, address in service_addresses(spec, self.environ).items():
            stage = self._stages.get((service, address))
            if stage is None:
                if address not in self.replica_sets:
                    client = traced.client_class()
                    self.replica_sets[address] = ReplicaSet(
                        address,
                        functools.partial(client, health_checked=True, security=self.client_security),
                        # A draining replica, when no other serves, is still called: until it closes.
                        connect_draining=functools.partial(client, security=self.client_security),
                        service=service,
                        budget=self.budget,
                        on_event=self._on_replica_event,
                        keeps_deadline=keeps_deadline(client),
                    )
                stage = self.replica_sets[address]
                if self.coalesce_in_flight > 0:
                    on_call = functools.partial(self._on_downstream_call, service)
                    stage = CoalescingStage(stage, max_in_flight=self.coalesce_in_flight, on_call=on_call)
                self._stages[(service, address)] = stage
            stages[service] = stage
        return stages

    async def signatures(self, spec: MeshSpec, stages: Mapping[str, Stage]) -> dict[ModelKey, ModelSignature]:
        keys = sorted(spec.model_keys())
        found = await asyncio.gather(*(stages[svc].metadata(model, ver) for svc, model, ver in keys))
        return dict(zip(keys, found, strict=True))

    def build(
        self, spec: MeshSpec, digest: str, signatures: Mapping[ModelKey, ModelSignature]
    ) -> SpecGeneration:
        graph_signatures = validate_against_signatures(spec, signatures)
        stages = self.stages(spec)
        caches = ResponseCaches(spec, stages, on_lookup=self._on_cache_lookup, environ=self.environ)
        engine = Engine(
            spec,
            stages,
            retry_budget=self.budget,
            on_step=self._on_step,
            on_mirror=self._on_mirror,
            on_request=self._on_request,
            caches=caches,
            on_capture=self._capture_writer(spec),
        )
        graphs = [
            GraphServable(
                name,
                sig,
                engine,
                ready=functools.partial(self.graph_ready, name),
                reason=functools.partial(self.graph_reason, name),
            )
            for name, sig in graph_signatures.items()
        ]
        return SpecGeneration(spec, digest, engine, graphs, {g: spec.hard_model_keys(g) for g in spec.graphs})

    async def load(self) -> None:
        """Wait for every service's metadata, check the spec against it, then serve the graphs."""
        spec = self.pending_spec
        stages = self.stages(spec)
        delay = 0.2
        while True:
            try:
                signatures = await self.signatures(spec, stages)
                break
            except MeshError as err:
                log.warning("waiting for services: %s", err.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.activate(self.build(spec, self.pending_digest, signatures))
        await self.refresh_readiness()
        self._tasks = [asyncio.create_task(self._watch_readiness()), asyncio.create_task(self._watch_spec())]

    def activate(self, loaded: SpecGeneration) -> None:
        self.current = loaded
        if self.drift is None and any(g.drift for g in loaded.spec.graphs.values()):
            self.drift = DriftMonitor(
                self._open_capture_store,
                lambda: self.current.spec if self.current is not None else None,
                self.spec_path.parent,
                lambda graph, tensor, value: self.metrics.drift.labels(graph, tensor).set(value),
                interval=float(self.environ.get(DRIFT_INTERVAL_ENV, "15")),
            ).start()
        self.repository.replace([*loaded.graphs])
        log.info("graphs active", extra={"graphs": sorted(loaded.spec.graphs), "digest": loaded.digest[:12]})

    async def refresh_readiness(self) -> None:
        if self.current is None:
            return
        stages = self.stages(self.current.spec)
        keys = sorted(self.current.spec.model_keys())
        states = await asyncio.gather(*(stages[svc].is_ready(model, ver) for svc, model, ver in keys))
        self.model_ready = dict(zip(keys, states, strict=True))

    async def _watch_readiness(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.refresh_readiness()
            except Exception:
                log.exception("readiness refresh failed")

    async def _watch_spec(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        """Apply a changed spec file if it is valid; keep the running one otherwise."""
        try:
            text = self.spec_path.read_text()
        except OSError as exc:
            log.error("cannot read graph spec %s: %s; keeping the running spec", self.spec_path, exc)
            return False
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self.current is not None and digest == self.current.digest:
            return False
        try:
            spec = parse_spec(text, origin=str(self.spec_path))
            loaded = self.build(spec, digest, await self.signatures(spec, self.stages(spec)))
        except (SpecError, MeshError) as exc:
            self.metrics.reloads.labels("rejected").inc()
            log.error("rejected new graph spec: %s; keeping the running spec", exc)
            if self.current is not None:
                self.current.digest = digest  # don't retry the same bad file every interval
            return False
        self.activate(loaded)
        self.metrics.reloads.labels("applied").inc()
        await self.refresh_readiness()
        return True

    async def close(self) -> None:
        if self.current is not None:
            await self.current.engine.aclose()  # shadows still running have no one to report to
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(replicas.close() for replicas in self.replica_sets.values()))
        if self.drift is not None:
            await asyncio.to_thread(self.drift.close)
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)

    def _capture_writer(self, spec: MeshSpec) -> Callable[[Capture], bool] | None:
        captures = any(
            g.capture is not None or any(s.capture is not None for s in g.model_steps())
            for g in spec.graphs.values()
        )
        if not captures:
            return None
        if self.capture is None:
            capacity = int(self.environ.get(CAPTURE_QUEUE_ENV, "10000"))
            self.capture = CaptureWriter(
                StoreSink(
                    self.environ.get(CAPTURE_DB_ENV) or None,
                    max_age=_number(self.environ.get(CAPTURE_MAX_AGE_ENV), float),
                    max_records=_number(self.environ.get(CAPTURE_MAX_RECORDS_ENV), int),
                ),
                capacity=capacity,
                on_drop=lambda reason, n: self.metrics.capture_dropped.labels(reason).inc(n),
                on_written=self.metrics.captured.inc,
            )
            writer = self.capture
            self.metrics.capture_pending.set_function(lambda: writer.pending)
        return self.capture.offer

    def _open_capture_store(self) -> Any:
        return open_store(self.environ.get(CAPTURE_DB_ENV) or None)

    def _on_step(
        self, graph: str, step: str, service: str, model: str, version: str, status: str, seconds: float
    ) -> None:
        key = (graph, step, service, model, version, status)
        child = self._step_series.get(key)
        if child is None:  # labels() costs a lock and a lookup: once per series, not per call
            child = self._step_series[key] = self.metrics.steps.labels(*key)
        child.observe(seconds, tracing.exemplar() if tracing.enabled else None)

    def _on_downstream_call(self, service: str, model: str, rows: int) -> None:
        series = self._downstream_series.get((service, model))
        if series is None:
            series = self._downstream_series[(service, model)] = self.metrics.downstream_rows.labels(
                service, model
            )
        series.observe(rows)

    def _on_request(self, graph: str, seconds: float) -> None:
        series = self._overhead_series.get(graph)
        if series is None:
            series = self._overhead_series[graph] = self.metrics.overhead.labels(graph)
        series.observe(seconds)

    def _on_cache_lookup(self, cache: str, result: str) -> None:
        self.metrics.cache_lookups.labels(cache, result).inc()

    def _on_replica_event(self, service: str, replica: str, event: str) -> None:
        self.metrics.replica_events.labels(service, replica, event).inc()

    def _on_mirror(self, graph: str, step: str, agree: bool, max_abs_diff: float) -> None:
        self.metrics.mirror.labels(graph, step, str(agree).lower()).inc()
