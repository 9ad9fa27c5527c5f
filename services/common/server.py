"""Server bootstrap shared by every node: one gRPC server with OIP, health, reflection, metrics.

Life cycle of a node (what Kubernetes probes and the orchestrator rely on):
  1. bind and start; grpc.health.v1 answers NOT_SERVING (the health servicer would start
     as SERVING otherwise);
  2. load and warm up every servable, then flip to SERVING and print a ready line;
  3. on SIGTERM/SIGINT: NOT_SERVING at once, new calls get UNAVAILABLE, in-flight calls
     finish within `grace` seconds, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.dataplane import DataPlane
from services.common.limits import limiter_from_setting
from services.common.metrics import ServerMetrics
from services.common.repository import ModelRepository
from services.common.servicer import DecodingGuard, InferenceServicer
from services.common.settings import ServerSettings

log = logging.getLogger(__name__)

VERSION = "0.1.0"
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
        # Off unless asked: otherwise a second node silently shares a busy port.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class MeshServer:
    """One node: build with its repository, then `start()`, `load()`, and `stop()`.

    `dataplane` is the node's core (lookup, readiness, validation, metrics, inference); the
    gRPC servicer is only its transport edge.
    """

    def __init__(
        self,
        settings: ServerSettings,
        repository: ModelRepository,
        *,
        metrics: ServerMetrics | None = None,
        add_services: Callable[[grpc.aio.Server], list[str]] | None = None,
        loader: Callable[[], Awaitable[None]] | None = None,
        closer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = metrics or ServerMetrics(settings.service)
        self.dataplane = DataPlane(
            repository, self.metrics, server_name=f"onnxmesh-{settings.service}", server_version=VERSION
        )
        self.dataplane.limiter = limiter_from_setting(settings.max_inflight, settings.service)
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._add_services = add_services
        self._loader = loader
        self._closer = closer
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    @property
    def draining(self) -> bool:
        """True once `begin_drain` ran: NOT_SERVING, and new inference calls get UNAVAILABLE."""
        return self.dataplane.draining

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING); returns the bound port."""
        server = grpc.aio.server(
            options=server_options(self.settings),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane), DecodingGuard(server)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if self._add_services is not None:
            names += self._add_services(server)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, NOT_SERVING)
        try:
            self.port = server.add_insecure_port(self.settings.address)
        except RuntimeError as exc:
            raise OSError(
                f"cannot listen on {self.settings.address}: is another process using the port? "
                "(--port 0 picks a free one)"
            ) from exc
        await server.start()
        self._server = server
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
        log.info("listening", extra={"address": f"{self.settings.host}:{self.port}"})
        return self.port

    async def load(self) -> None:
        """Load and warm up every servable, then report SERVING."""
        if self._loader is not None:
            # A node with a loader of its own (the orchestrator) is serving once it has loaded;
            # each model's readiness is still reported by ModelReady.
            await self._loader()
            await self.set_serving(True)
        else:
            await asyncio.gather(*(servable.load() for servable in self.repository.all()))
            await self.set_serving(self.repository.ready)
        log.info("ready", extra={"models": [f"{s.name}/{s.version}" for s in self.repository.all()]})

    async def set_serving(self, serving: bool) -> None:
        if self.draining:
            return
        status = SERVING if serving else NOT_SERVING
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, status)
        self.metrics.ready.set(1 if serving else 0)

    async def begin_drain(self) -> None:
        """Report NOT_SERVING (health and ServerReady) so balancers and probes move away."""
        if not self.draining:
            self.dataplane.draining = True
            self.metrics.ready.set(0)
            await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING now, finish in-flight calls within `grace`, then stop."""
        if self._server is None or self._stopped.is_set():
            return
        await self.begin_drain()
        log.info("draining", extra={"grace_s": self.settings.grace if grace is None else grace})
        await self._server.stop(self.settings.grace if grace is None else grace)
        await asyncio.gather(*(servable.close() for servable in self.repository.all()))
        if self._closer is not None:
            await self._closer()
        log.info("stopped")
        self._stopped.set()

    async def run_until_signal(self, announce: Callable[[str], None] | None = None) -> None:
        """Start, load, and serve until SIGTERM or SIGINT; then drain and return."""
        say = announce or _announce
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        port = await self.start()
        say(f"{self.settings.service} listening on {self.settings.host}:{port}")
        if self.metrics_port is not None:
            say(f"{self.settings.service} metrics on {self.settings.host}:{self.metrics_port}")
        load = asyncio.create_task(self.load())
        stop_wait = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            if load.exception() is not None:
                await self.stop(0)
                load.result()  # a model that fails to load stops the node with its error
            say(f"{self.settings.service} ready on {self.settings.host}:{port}")
            await stop_wait
        else:
            load.cancel()
        say(f"{self.settings.service} draining")
        await self.begin_drain()
        # Keep answering while clients watching health move away, then close the port.
        await asyncio.sleep(self.settings.drain_delay)
        await self.stop()


def _announce(line: str) -> None:
    """Lines for people and launchers on stdout; logs go to stderr."""
    print(line, file=sys.stdout, flush=True)
