"""Server bootstrap shared by every gRPC process: one life cycle (`NodeServer`) for the model
nodes, the orchestrator, the jobs service and its workers, and `MeshServer`, an OIP node on it.

`NodeServer` gives every process the same gRPC server: health, reflection, mTLS and bearer
tokens, server options, a plaintext health port, Prometheus metrics, signals and drain;
a process adds its own services and, optionally, work that runs until SIGTERM.

Life cycle of a node (what Kubernetes probes and the orchestrator rely on):
  1. bind and start; grpc.health.v1 answers NOT_SERVING (the health servicer would start
     as SERVING otherwise);
  2. load and warm up every servable, then flip to SERVING and print a ready line; a model
     that fails to load or warm up is logged and reported UNAVAILABLE with its reason
     (RepositoryIndex, ModelReady false) while the others serve; a node none of whose models
     loaded exits with every reason;
  3. on SIGTERM/SIGINT: NOT_SERVING at once (health, ServerReady, ModelReady) while every call
     is still answered for `drain_delay` seconds, so balancers and clients move away without
     losing one; then new calls get UNAVAILABLE, in-flight calls finish within `grace`
     seconds, and the process exits.

Beside its own services (OIP gRPC with Triton's extensions, on a MeshServer) a process serves
grpc.health.v1, reflection (v1 and v1alpha), Prometheus on `--metrics-port` and, on a
MeshServer, KServe v2 REST on `--http-port`, each on its own port; a port that cannot be bound
stops the process with a message naming it.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.batching import adaptive as batching
from services.common.dataplane import DataPlane
from services.common.errors import MeshError
from services.common.grpc import traced
from services.common.grpc.admission import Admission, LoopLag
from services.common.grpc.reflection import enable_reflection
from services.common.grpc.security import SecurityError, TlsFiles, TokenInterceptor, server_credentials
from services.common.grpc.servicer import EXTENSIONS, DecodingGuard
from services.common.limits import limiter_from_setting
from services.common.model import LoadError
from services.common.observability import tracing
from services.common.observability.logs import configure_logging
from services.common.observability.metrics import NodeMetrics, ServerMetrics
from services.common.repository import ModelRepository
from services.common.rest.server import RestServer
from services.common.settings import LAUNCHER_ENV, ServerSettings

log = logging.getLogger(__name__)

# The installed package's version (pyproject.toml), reported in ServerMetadata and traces.
VERSION = importlib.metadata.version("onnxmesh")
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: Work a process runs once ready, until the event (SIGTERM, SIGINT) is set.
Work = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Channel arguments of every node's server."""
    age_ms = int(settings.max_connection_age * 1000)
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Long-lived clients only re-resolve DNS when a connection drops: ask them to
        # reconnect now and then so new replicas get traffic.
        ("grpc.max_connection_age_ms", age_ms),
        ("grpc.max_connection_age_grace_ms", int(settings.grace * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Off unless asked or needed by the acceptors (`NodeServer.start` checks the port is free
        # first): otherwise a second node silently shares a busy port.
        ("grpc.so_reuseport", 1 if settings.reuse_port or settings.acceptors > 1 else 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class NodeServer:
    """The life cycle of one gRPC process: build, then `start()`, `load()` and `stop()`, or all
    of them with `run_until_signal()`.

    `add_services` adds the process's own services to the server and returns their names (for
    health and reflection); `loader` runs before the process reports SERVING (open a store, load
    graphs) and `closer` after its port closed.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        metrics: NodeMetrics | None = None,
        add_services: Callable[[grpc.aio.Server], list[str]] | None = None,
        loader: Callable[[], Awaitable[None]] | None = None,
        closer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NodeMetrics(settings.service)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self._add_services = add_services
        self._loader = loader
        self._closer = closer
        self._services: list[str] = []
        self._server: grpc.aio.Server | None = None
        self._servers: list[grpc.aio.Server] = []
        self._health_server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._draining = False

    @property
    def draining(self) -> bool:
        """True once `begin_drain` ran: NOT_SERVING, though calls are still answered until `stop`."""
        return self._draining

    def services(self, server: grpc.aio.Server) -> list[str]:
        """Add the process's own services to `server`; their names."""
        return self._add_services(server) if self._add_services is not None else []

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """What every call passes through before its handler: bearer tokens, when asked."""
        return [TokenInterceptor(self.settings.token_file)] if self.settings.token_file else []

    def check_security(self, secured: bool) -> None:
        """Refuse settings that would open a way around TLS and tokens."""

    async def start_more(self) -> None:
        """Open the process's other ports (once gRPC listens)."""

    async def stop_more(self) -> None:
        """Close what `start_more` opened."""

    def refuse(self) -> None:
        """Refuse new calls from now on (in-flight ones finish): the drain delay is over."""

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING); returns the bound port."""
        tls = TlsFiles.of(self.settings.tls_cert, self.settings.tls_key, self.settings.tls_ca)
        self.check_security(tls is not None or self.settings.token_file is not None)
        interceptors = self.interceptors()
        if self.settings.acceptors > 1 and not self.settings.reuse_port:
            _check_free(self.settings.service, self.settings.host, self.settings.port)
        # Acceptors: grpc.aio takes in one call per event-loop turn and server; under overload
        # the rest wait inside gRPC, unseen by admission. Several servers on the port (the
        # kernel spreads connections over them) take in several calls per turn.
        port = self.settings.port
        for _ in range(max(1, self.settings.acceptors)):
            server = grpc.aio.server(
                options=server_options(self.settings),
                maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
                interceptors=interceptors,
            )
            self._services = self.services(server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            enable_reflection([*self._services, HEALTH_SERVICE], server)
            port = self._bind(server, port, tls, "--port")
            self._servers.append(server)
        for service in ("", *self._services):
            await self.health.set(service, NOT_SERVING)
        for server in self._servers:
            await server.start()
        self.port = port
        self._server = self._servers[0]
        try:
            if self.settings.health_port is not None:
                self._health_server = grpc.aio.server(options=server_options(self.settings))
                health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
                self.health_port = self._bind(
                    self._health_server, self.settings.health_port, None, "--health-port"
                )
                await self._health_server.start()
            if self.settings.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
            await self.start_more()
        except OSError:
            await self._close_ports(0)
            raise
        log.info("listening", extra={"address": f"{self.settings.host}:{self.port}"})
        return self.port

    def _bind(self, server: grpc.aio.Server, port: int, tls: TlsFiles | None, flag: str) -> int:
        address = f"{self.settings.host}:{port}"
        try:
            if tls is None:
                return int(server.add_insecure_port(address))
            credentials = server_credentials(tls, require_client_cert=self.settings.tls_require_client_cert)
            return int(server.add_secure_port(address, credentials))
        except RuntimeError as exc:
            raise OSError(
                f"{self.settings.service}: cannot listen on {address}: is another process "
                f"using the port? ({flag} 0 picks a free one)"
            ) from exc

    async def load(self) -> None:
        """Run the loader, then report SERVING."""
        if self._loader is not None:
            await self._loader()
        await self.set_serving(True)
        log.info("ready")

    async def set_serving(self, serving: bool) -> None:
        if self.draining:
            return
        status = SERVING if serving else NOT_SERVING
        for service in ("", *self._services):
            await self.health.set(service, status)
        self.metrics.ready.set(1 if serving else 0)

    async def begin_drain(self) -> None:
        """Report NOT_SERVING so balancers and probes move away."""
        if not self._draining:
            self._draining = True
            self.metrics.ready.set(0)
            await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING (if not yet), refuse new calls, finish in-flight ones within `grace`, stop."""
        if self._server is None or self._stopped.is_set():
            return
        await self.begin_drain()
        self.refuse()
        log.info("draining", extra={"grace_s": self.settings.grace if grace is None else grace})
        await self._close_ports(self.settings.grace if grace is None else grace)
        await self.close()
        log.info("stopped")
        self._stopped.set()

    async def close(self) -> None:
        """Release what the process holds, once its ports are closed."""
        if self._closer is not None:
            await self._closer()

    async def _close_ports(self, grace: float) -> None:
        if self._servers:
            await asyncio.gather(*(server.stop(grace) for server in self._servers), self.stop_more())
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.metrics.stop_http()

    def ports(self) -> dict[str, int | None]:
        """The process's other ports, by the name its announce lines give them."""
        return {"health": self.health_port, "metrics": self.metrics_port}

    async def run_until_signal(
        self, announce: Callable[[str], None] | None = None, *, work: Work | None = None
    ) -> None:
        """Start, load, and serve (running `work`, if any) until SIGTERM or SIGINT, or until
        `work` returns; then drain and return."""
        follow_launcher()
        say = announce or _announce
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        port = await self.start()
        say(f"{self.settings.service} listening on {self.settings.host}:{port}")
        for name, bound in self.ports().items():
            if bound is not None:
                say(f"{self.settings.service} {name} on {self.settings.host}:{bound}")
        load = asyncio.create_task(self.load())
        stop_wait = asyncio.create_task(stop_requested.wait())
        working: asyncio.Task[None] | None = None
        done, _ = await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            if load.exception() is not None:
                await self.stop(0)
                load.result()  # a model that fails to load stops the node with its error
            say(f"{self.settings.service} ready on {self.settings.host}:{port}")
            if work is not None:
                working = asyncio.create_task(work(stop_requested))
            await asyncio.wait(
                {stop_wait, *([working] if working else [])}, return_when=asyncio.FIRST_COMPLETED
            )
            stop_requested.set()
        else:
            load.cancel()
        say(f"{self.settings.service} draining")
        await self.begin_drain()
        try:
            # Keep answering while balancers and clients watching health move away; then refuse.
            await asyncio.sleep(self.settings.drain_delay)
            if working is not None:
                await working
        finally:
            await self.stop()


class MeshServer(NodeServer):
    """One OIP node: build with its repository, then `start()`, `load()`, and `stop()`.

    `dataplane` is the node's core (lookup, readiness, validation, metrics, inference); the
    gRPC servicer is only its transport edge.
    """

    def __init__(
        self,
        settings: ServerSettings,
        repository: ModelRepository,
        *,
        metrics: ServerMetrics | None = None,
        loader: Callable[[], Awaitable[None]] | None = None,
        closer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.metrics: ServerMetrics = metrics or ServerMetrics(settings.service)
        super().__init__(settings, metrics=self.metrics, loader=loader, closer=closer)
        self.repository = repository
        # Observability: spans when OTEL_* asks for them (trace ids then ride on the latency
        # histograms as exemplars), and the batching queues' series.
        if tracing.configure(settings.service, VERSION):
            self.metrics.use_exemplars()
        batching.instrument(repository.all(), self.metrics)
        self.dataplane = DataPlane(
            repository,
            self.metrics,
            server_name=f"onnxmesh-{settings.service}",
            server_version=VERSION,
            extensions=EXTENSIONS,
        )
        self.dataplane.limiter = limiter_from_setting(settings.max_inflight, settings.service)
        self.loop_lag = LoopLag()
        self.metrics.loop_lag.set_function(lambda: self.loop_lag.seconds)
        self.admission: Admission | None = None
        if self.dataplane.limiter is not None and settings.max_loop_lag > 0:
            self.admission = Admission(self.dataplane.limiter, self.loop_lag, max_lag=settings.max_loop_lag)
            refusals = self.metrics.admission_refusals
            self.admission.on_refusal(lambda reason: refusals.labels(reason).inc())
        self.http_port: int | None = None
        self.rest = RestServer(
            self.dataplane, settings.service, max_body_bytes=settings.max_message_bytes, grace=settings.grace
        )

    @property
    def draining(self) -> bool:
        """True once `begin_drain` ran: NOT_SERVING, though calls are still answered until `stop`."""
        return self.dataplane.draining

    def refuse(self) -> None:
        self.dataplane.refusing = True

    def services(self, server: grpc.aio.Server) -> list[str]:
        servicer = traced.servicer_class()(self.dataplane)
        # DecodingGuard: a body that is not protobuf gets INVALID_ARGUMENT, not grpc's UNKNOWN;
        # ModelInfer's front door (`admission`) is checked there, before the body is decoded
        # (after the tokens: an unauthenticated call is refused as such).
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, DecodingGuard(server, self.admission))
        return [INFERENCE_SERVICE]

    def check_security(self, secured: bool) -> None:
        if secured and self.settings.http_port is not None:
            # REST would be a way around TLS and tokens.
            raise SecurityError("--http-port serves plaintext without tokens: turn it off with TLS or tokens")

    async def start_more(self) -> None:
        if self.admission is not None:
            self.loop_lag.start()
        if self.settings.http_port is not None:
            self.http_port = await self.rest.start(
                self.settings.host, self.settings.http_port, reuse_port=self.settings.reuse_port
            )

    async def stop_more(self) -> None:
        await asyncio.gather(self.rest.stop(), self.loop_lag.stop())

    def ports(self) -> dict[str, int | None]:
        return {**super().ports(), "http": self.http_port}

    async def load(self) -> None:
        """Load and warm up every servable, then report SERVING."""
        if self._loader is not None:
            # A node with a loader of its own (the orchestrator) is serving once it has loaded;
            # each model's readiness is still reported by ModelReady.
            await self._loader()
            await self.set_serving(True)
        else:
            servables = self.repository.all()
            outcomes = await asyncio.gather(*(s.load() for s in servables), return_exceptions=True)
            for servable, outcome in zip(servables, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    self._failed(servable.name, servable.version, outcome)
            if not self.repository.all():
                reasons = "; ".join(f"{f.name}/{f.version}: {f.reason}" for f in self.repository.failures())
                raise LoadError(f"no model could be loaded: {reasons or 'the repository is empty'}")
            await self.set_serving(self.repository.ready)
        log.info("ready", extra={"models": [f"{s.name}/{s.version}" for s in self.repository.all()]})

    def _failed(self, name: str, version: str, error: BaseException) -> None:
        if isinstance(error, asyncio.CancelledError):
            raise error
        reason = str(error) if isinstance(error, LoadError) else f"{type(error).__name__}: {error}"
        log.error(
            "model failed to load; serving the others",
            extra={"model": name, "version": version, "reason": reason},
            exc_info=None if isinstance(error, LoadError) else error,
        )
        self.repository.fail(name, version, reason)

    async def begin_drain(self) -> None:
        """Report NOT_SERVING (health, ServerReady, ModelReady) so balancers and probes move
        away; calls are still answered until `stop`."""
        if not self.draining:
            self.dataplane.draining = True
            await super().begin_drain()

    async def close(self) -> None:
        await asyncio.gather(*(servable.close() for servable in self.repository.all()))
        await super().close()
        self.dataplane.shared_memory.close()


_PR_SET_PDEATHSIG = 1


def follow_launcher(environ: Mapping[str, str] = os.environ) -> None:
    """A node started by a launcher gets SIGTERM (and drains) when the launcher dies, even by
    SIGKILL, so that none outlives it (Linux's parent-death signal; elsewhere nothing)."""
    launcher = environ.get(LAUNCHER_ENV)
    if not launcher or sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(launcher):  # it died before the signal was asked for
        sys.exit(f"the launcher (pid {launcher}) is gone")


def run_process(settings: ServerSettings, serve: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """`main()` of a process: logs configured, `serve()` until it returns; a start-up failure
    exits with one line naming the process."""
    configure_logging(settings.service, settings.log_level, settings.log_format)
    try:
        asyncio.run(serve())
    except OSError as exc:
        sys.exit(f"{settings.service}: {exc}")
    except MeshError as exc:
        sys.exit(f"{settings.service}: {exc.message}")


def _check_free(service: str, host: str, port: int) -> None:
    """Refuse a port another process listens on, although the acceptors set SO_REUSEPORT."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: connections of a previous process in TIME_WAIT do not count; a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise OSError(
                f"{service}: cannot listen on {host}:{port}: is another process using the port? "
                "(--port 0 picks a free one)"
            ) from exc


def _announce(line: str) -> None:
    """Lines for people and launchers on stdout; logs go to stderr."""
    print(line, file=sys.stdout, flush=True)
