"""A jobs worker: claims jobs from the store and runs each through the orchestrator over OIP.

    store.claim (lease) --> ModelInfer at the orchestrator (the job's own request, as online)
        ^   renew leases every lease/3 while running          |
        +-- complete(response) | fail(code) | release(retry) <+

Workers scale apart from the online orchestrators (`python -m jobs.worker`, its own
Deployment, health on its own port). A worker that dies (SIGKILL, OOM, node loss) stops
renewing; once its lease expires any worker claims the job again, and the lease token makes
the first one's late writes match nothing, so every job completes exactly once. A job whose
workers keep dying fails after `max_attempts` claims instead of taking every worker down.
UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried with backoff; any other
error fails the job with the orchestrator's code and message. While no orchestrator can be
reached (down, restarting, every replica draining) a job is not attempted: it waits in the queue,
retried with backoff (0.5 s doubling to 30 s), until the orchestrator is back or the job's ttl
runs out (EXPIRED, its last error kept). A job cancelled while running
has its call cancelled at the next lease renewal. On SIGTERM the worker stops claiming,
finishes what it holds within `grace` and puts back what it could not finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

from jobs.service import maintain_forever
from jobs.store import Claim, Store, default_url, redact
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from services.common.grpc.security import TlsFiles, environ_security
from services.common.server import NodeServer, run_process
from services.common.settings import ServerSettings, add_option, server_parser, settings_from_args

log = logging.getLogger("jobs.worker")

DEFAULT_HEALTH_PORT = 8051
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
IDLE_POLL_MIN, IDLE_POLL_MAX = 0.01, 0.25
MAX_WAITING = 100_000


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        store: Store,
        orchestrator: OipClient,
        *,
        name: str | None = None,
        concurrency: int = 8,
        lease: float = 15.0,
        grace: float = 10.0,
    ) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.name = name or worker_id()
        self.concurrency = max(1, concurrency)
        self.lease = lease
        self.grace = grace
        self._running: dict[str, tuple[Claim, asyncio.Task[None]]] = {}
        #: Job id -> how many times in a row it found no orchestrator (its backoff).
        self._waits: dict[str, int] = {}
        self.completed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until `stop` is set; then finish or put back what is held."""
        poll = IDLE_POLL_MIN
        last_renew = time.monotonic()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                free = self.concurrency - len(self._running)
                claims = await self._claim(free) if free > 0 else []
                for claim in claims:
                    task = asyncio.create_task(self._run_job(claim))
                    self._running[claim.id] = (claim, task)
                    task.add_done_callback(functools.partial(self._forget, claim.id))
                if time.monotonic() - last_renew >= self.lease / 3:
                    await self._renew()
                    last_renew = time.monotonic()
                if claims and len(self._running) < self.concurrency:
                    poll = IDLE_POLL_MIN
                    continue  # there may be more: claim again at once
                # Full or idle: wait for a free slot, a stop, the next renewal or the next poll.
                idle = not claims and len(self._running) < self.concurrency
                timeout = min(poll, self.lease / 3) if idle else self.lease / 3
                waiters: set[asyncio.Future[object]] = {stopping, *self._tasks()}  # type: ignore[arg-type]
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                poll = min(poll * 2, IDLE_POLL_MAX) if idle else IDLE_POLL_MIN
        finally:
            stopping.cancel()
        await self._shutdown()

    def _forget(self, job_id: str, _task: object) -> None:
        self._running.pop(job_id, None)

    def _tasks(self) -> set[asyncio.Task[None]]:
        return {t for _, t in self._running.values()}

    async def _claim(self, limit: int) -> list[Claim]:
        try:
            return await asyncio.to_thread(self.store.claim, self.name, limit, self.lease)
        except MeshError as err:
            log.warning("cannot claim jobs: %s", err.message)
            return []

    async def _renew(self) -> None:
        if not self._running:
            return
        claims = [c for c, _ in self._running.values()]
        try:
            held = await asyncio.to_thread(self.store.renew, claims, self.lease)
        except MeshError as err:
            log.warning("cannot renew leases: %s", err.message)
            return
        for claim in claims:
            if claim.id not in held and claim.id in self._running:
                # Cancelled (or, after a stall, claimed by another worker): stop the call.
                log.info("lost job", extra={"job": claim.id})
                self._running[claim.id][1].cancel()

    async def _run_job(self, claim: Claim) -> None:
        request = pb.ModelInferRequest.FromString(claim.request)
        request_id = request.id or claim.id
        try:
            # Undecoded: the stored answer is byte for byte what ModelInfer returned.
            response = await self.orchestrator.model_infer(
                request, timeout=claim.timeout, request_id=request_id
            )
        except MeshError as err:
            await self._failed(claim, err)
            return
        except asyncio.CancelledError:
            return  # lost, or shutting down (the shutdown releases it)
        stored = await self._store_write(
            self.store.complete, claim, response.SerializeToString(), response.model_version
        )
        self._waits.pop(claim.id, None)
        if stored:
            self.completed += 1
        log.info("job done", extra={"job": claim.id, "stored": stored, "attempt": claim.attempts})

    async def _failed(self, claim: Claim, err: MeshError) -> None:
        message = err.message if err.public else "internal error (see the orchestrator's log)"
        if err.code == "UNAVAILABLE" and not self.orchestrator.reachable:
            if len(self._waits) > MAX_WAITING:  # jobs that expired while waiting never come back
                self._waits.clear()
            waits = self._waits[claim.id] = self._waits.get(claim.id, 0) + 1
            backoff = min(30.0, 0.5 * 2 ** (waits - 1))
            error = (err.code, f"waiting for the orchestrator ({message})")
            await self._store_write(self.store.release, claim, retry_in=backoff, error=error, attempted=False)
            log.info(
                "orchestrator unreachable: job waits",
                extra={"job": claim.id, "code": err.code, "in_s": backoff},
            )
            return
        self._waits.pop(claim.id, None)
        if err.code in RETRYABLE and claim.attempts < self.store.max_attempts:
            backoff = min(30.0, 0.5 * 2 ** (claim.attempts - 1))
            await self._store_write(self.store.release, claim, retry_in=backoff, error=(err.code, message))
            log.info("job retried", extra={"job": claim.id, "code": err.code, "in_s": backoff})
        else:
            await self._store_write(self.store.fail, claim, err.code, message)
            log.info("job failed", extra={"job": claim.id, "code": err.code})

    async def _store_write(self, method: object, *args: object, **kwargs: object) -> bool:
        try:
            return bool(await asyncio.to_thread(method, *args, **kwargs))  # type: ignore[arg-type]
        except MeshError as err:
            # The lease runs out and another worker takes the job: nothing is lost.
            log.warning("cannot record a job's outcome: %s", err.message)
            return False

    async def _shutdown(self) -> None:
        tasks = self._tasks()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.grace)
            for claim, task in list(self._running.values()):
                if task in pending:
                    task.cancel()
                    await self._store_write(self.store.release, claim)
            with contextlib.suppress(Exception):
                await asyncio.gather(*pending, return_exceptions=True)


def build_parser() -> argparse.ArgumentParser:
    parser = server_parser(
        "jobs-worker",
        port=DEFAULT_HEALTH_PORT,
        serves_models=False,
        defaults={"drain_delay": 0.0},
        prog="python -m jobs.worker",
        description="Run queued jobs through the orchestrator's graphs (its port serves health and reflection).",
    )
    add_option(parser, "jobs-db", str, default_url(), "store: SQLAlchemy URL or SQLite file path")
    add_option(
        parser, "target", str, "127.0.0.1:8001", "the orchestrator (dns:///name:port for all replicas)"
    )
    add_option(parser, "concurrency", int, 8, "jobs run at once")
    add_option(
        parser,
        "lease",
        float,
        15.0,
        "seconds a claim lasts without renewal (a dead worker's jobs wait this long)",
    )
    add_option(parser, "max-attempts", int, 3, "claims of a job before it fails")
    add_option(parser, "maintain-interval", float, 5.0, "seconds between expiry/purge passes")
    return parser


async def serve(settings: ServerSettings, args: argparse.Namespace) -> None:
    store = Store(args.jobs_db, max_attempts=args.max_attempts, create=False)
    # The orchestrator is called with this process's own certificate (mTLS) and, from
    # ONNXMESH_TOKEN_FILE, a token, as every client of the mesh.
    tls = TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)
    security = replace(environ_security(os.environ), tls=tls, ca=None) if tls is not None else None
    orchestrator = OipClient(args.target, health_checked=True, security=security)
    worker = Worker(store, orchestrator, concurrency=args.concurrency, lease=args.lease, grace=settings.grace)

    async def prepare() -> None:
        await asyncio.to_thread(store.create_schema)
        log.info(
            "worker ready", extra={"db": redact(store.url), "worker": worker.name, "target": args.target}
        )

    async def work(stop: asyncio.Event) -> None:
        maintenance = asyncio.create_task(maintain_forever(store, args.maintain_interval, stop))
        try:
            await worker.run(stop)
        finally:
            stop.set()
            await maintenance

    try:
        await NodeServer(settings, loader=prepare).run_until_signal(work=work)
    finally:
        await orchestrator.close()
        store.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = settings_from_args("jobs-worker", args)
    run_process(settings, lambda: serve(settings, args))


if __name__ == "__main__":
    main()
