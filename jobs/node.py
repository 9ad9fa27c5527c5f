"""The life cycle shared by the jobs service and the workers (the pattern of services/common/server.py).

  1. bind and start; grpc.health.v1 answers NOT_SERVING;
  2. open the store (create the schema), then SERVING and a `<name> ready on HOST:PORT` line;
  3. run the node's work until SIGTERM/SIGINT; then NOT_SERVING at once, keep answering for
     `drain_delay` (so balancers move away), stop the work and finish in-flight calls within `grace`.

Lines for launchers on stdout (`<name> listening on HOST:PORT` first, so port 0 works); logs on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.errors import MeshError
from services.common.observability.logs import configure_logging
from services.common.settings import MIB

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def announce(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


class Node:
    """One gRPC server with health and reflection, plus whatever services `add_services` adds."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        grace: float = 10.0,
        drain_delay: float = 0.5,
        max_message_mb: int = 64,
        add_services: Callable[[grpc.aio.Server], list[str]] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.requested_port = port
        self.port = 0
        self.grace = grace
        self.drain_delay = drain_delay
        self.health = HealthServicer()
        self._max_bytes = max_message_mb * MIB
        self._add_services = add_services
        self._service_names: list[str] = []
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", self._max_bytes),
                ("grpc.max_receive_message_length", self._max_bytes),
                ("grpc.max_connection_age_ms", 300_000),
                ("grpc.max_connection_age_grace_ms", int(self.grace * 1000)),
                ("grpc.so_reuseport", 0),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._service_names = self._add_services(server) if self._add_services else []
        names = [HEALTH_SERVICE, *self._service_names]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        await self.set_serving(False)
        try:
            self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}: is the port in use?") from exc
        await server.start()
        self._server = server
        return self.port

    async def set_serving(self, serving: bool) -> None:
        for service in ("", *self._service_names):
            await self.health.set(service, SERVING if serving else NOT_SERVING)

    async def run(
        self,
        prepare: Callable[[], Awaitable[None]],
        work: Callable[[asyncio.Event], Awaitable[None]],
    ) -> None:
        """Start, `prepare()` (then SERVING), `work(stop)` until a signal sets `stop`; then drain."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        port = await self.start()
        announce(f"{self.name} listening on {self.host}:{port}")
        try:
            await prepare()
            await self.set_serving(True)
            announce(f"{self.name} ready on {self.host}:{port}")
            log.info("ready", extra={"address": f"{self.host}:{port}"})
            await work(stop)
        finally:
            announce(f"{self.name} draining")
            await self.health.enter_graceful_shutdown()
            if stop.is_set():
                await asyncio.sleep(self.drain_delay)
            if self._server is not None:
                await self._server.stop(self.grace)
            log.info("stopped")


def run_main(
    name: str,
    parser: argparse.ArgumentParser,
    serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    argv: Sequence[str] | None,
) -> None:
    """`main()` of a jobs node: parse, log, serve until a signal; a start-up failure in one line."""
    args = parser.parse_args(argv)
    configure_logging(name, args.log_level.upper(), args.log_format)
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        sys.exit(f"{name}: {exc}")
    except MeshError as exc:
        sys.exit(f"{name}: {exc.message}")
