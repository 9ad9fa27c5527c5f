"""The jobs service: asynchronous inference beside OIP (`python -m jobs.service`, port 8041).

    client --Submit(ModelInferRequest)--> jobs service --commit--> store.jobs --claim--> workers
           <-- Job{id, QUEUED} ----------      (after the commit)                       |
    client --Get/Watch(id)--------------> jobs service <-- read ------ store <--result--+

Submit answers only after the job is committed, so an accepted job survives a crash of this
process; a full queue answers RESOURCE_EXHAUSTED. The service never runs inference itself:
workers (`python -m jobs.worker`, their own Deployment) call the orchestrator's graphs over OIP,
so several service replicas and several workers can share one PostgreSQL store. Every flag can
also be set as ONNXMESH_<FLAG>.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from jobs.client import status_name
from jobs.store import FINISHED, STATUSES, JobRecord, Store, default_url, redact
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.jobs import jobs_pb2 as jpb
from proto.gen.jobs import jobs_pb2_grpc as jpb_grpc
from services.common.errors import InvalidInput, MeshError, NotFound
from services.common.grpc import codec
from services.common.grpc.client import OipClient
from services.common.grpc.servicer import rpc
from services.common.server import NodeServer, run_process
from services.common.settings import ServerSettings, add_option, server_parser, settings_from_args

log = logging.getLogger("jobs.service")

DEFAULT_PORT = 8041
JOBS_SERVICE = jpb.DESCRIPTOR.services_by_name["Jobs"].full_name
#: Watch polls the store this often at first, backing off to WATCH_POLL_MAX while nothing changes.
WATCH_POLL_MIN, WATCH_POLL_MAX = 0.02, 0.5


def job_message(record: JobRecord) -> jpb.Job:
    job = jpb.Job(
        id=record.id,
        status=jpb.Status.Value(record.status.upper()),  # type: ignore[arg-type]
        model_name=record.model_name,
        model_version=record.model_version,
        created_at=record.created_at,
        started_at=record.started_at or 0.0,
        finished_at=record.finished_at or 0.0,
        expires_at=record.expires_at,
        attempts=record.attempts,
        error_code=record.error_code or "",
        error_message=record.error_message or "",
    )
    if record.response is not None:
        job.response.ParseFromString(record.response)
    return job


class JobsServicer(jpb_grpc.JobsServicer):  # type: ignore[misc]
    """The Jobs RPCs over a Store (each store call runs in a thread: it blocks)."""

    def __init__(
        self,
        store: Store,
        *,
        default_ttl: float,
        default_timeout: float,
        orchestrator: OipClient | None = None,
    ) -> None:
        self.store = store
        self.default_ttl = default_ttl
        self.default_timeout = default_timeout
        self.orchestrator = orchestrator
        self._known_models: set[str] = set()

    async def _check_model(self, request: pb.ModelInferRequest) -> None:
        """With an orchestrator to ask: an unknown graph is refused at once, not after queueing."""
        key = f"{request.model_name}/{request.model_version}"
        if self.orchestrator is None or key in self._known_models:
            return
        try:
            await self.orchestrator.metadata(request.model_name, request.model_version, timeout=5.0)
        except NotFound:
            raise
        except MeshError as err:  # the orchestrator being down must not stop submissions
            log.warning("cannot check model %s: %s", key, err.message, extra={"code": err.code})
            return
        self._known_models.add(key)

    @rpc
    async def Submit(self, request: jpb.SubmitRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        infer = request.request
        if not infer.model_name:
            raise InvalidInput("request.model_name is empty: name the graph or model to run")
        codec.decode_request_inputs(infer)  # malformed tensors are refused now, naming the tensor
        if request.ttl_seconds < 0 or request.timeout_seconds < 0:
            raise InvalidInput("ttl_seconds and timeout_seconds must not be negative")
        await self._check_model(infer)
        record = await asyncio.to_thread(
            self.store.submit,
            infer.model_name,
            infer.SerializeToString(),
            ttl=request.ttl_seconds or self.default_ttl,
            timeout=request.timeout_seconds or self.default_timeout,
            idempotency_key=request.idempotency_key or None,
        )
        log.info("submitted", extra={"job": record.id, "model": record.model_name})
        return job_message(record)

    @rpc
    async def Get(self, request: jpb.JobRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        return job_message(await asyncio.to_thread(self.store.get, request.id))

    @rpc
    async def Cancel(self, request: jpb.JobRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        record = await asyncio.to_thread(self.store.cancel, request.id)
        log.info("cancel", extra={"job": record.id, "status": record.status})
        return job_message(record)

    @rpc
    async def List(self, request: jpb.ListRequest, context: grpc.aio.ServicerContext) -> jpb.ListResponse:
        statuses = [status_name(s) for s in request.statuses]
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise InvalidInput(f"unknown statuses {unknown}")
        records, counts = await asyncio.to_thread(
            self.store.list_jobs, statuses, request.model_name, request.limit or 20
        )
        return jpb.ListResponse(jobs=[job_message(r) for r in records], counts=counts)

    async def Watch(
        self, request: jpb.JobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jpb.Job]:
        # A stream cannot use the unary `rpc` wrapper: map errors here, the same way.
        poll, last = WATCH_POLL_MIN, ""
        while True:
            try:
                record = await asyncio.to_thread(self.store.get, request.id)
            except MeshError as err:
                await context.abort(
                    grpc.StatusCode[err.code], err.message if err.public else "internal error"
                )
                return
            if record.status != last:
                last, poll = record.status, WATCH_POLL_MIN
                yield job_message(record)
            if record.status in FINISHED:
                return
            await asyncio.sleep(poll)
            poll = min(poll * 2, WATCH_POLL_MAX)


async def maintain_forever(store: Store, interval: float, stop: asyncio.Event) -> None:
    """Expire, fail lost and purge old jobs every `interval` seconds until `stop`."""
    while not stop.is_set():
        try:
            done = await asyncio.to_thread(store.maintain)
            if done.expired or done.lost or done.purged:
                log.info(
                    "maintenance", extra={"expired": done.expired, "lost": done.lost, "purged": done.purged}
                )
        except MeshError as err:
            log.warning("maintenance failed: %s", err.message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def build_parser() -> argparse.ArgumentParser:
    parser = server_parser(
        "jobs",
        port=DEFAULT_PORT,
        serves_models=False,
        prog="python -m jobs.service",
        description="Asynchronous inference: accept jobs (persisted before their id is returned) for workers to run.",
    )
    add_option(parser, "jobs-db", str, default_url(), "store: SQLAlchemy URL or SQLite file path")
    add_option(
        parser, "max-jobs", int, 10_000, "most unfinished (queued + running) jobs; then RESOURCE_EXHAUSTED"
    )
    add_option(
        parser,
        "ttl",
        float,
        86_400.0,
        "seconds a job and its result are kept (a request may ask for less or more)",
    )
    add_option(
        parser, "job-timeout", float, 30.0, "seconds one attempt may take at the orchestrator, by default"
    )
    add_option(
        parser,
        "target",
        str,
        "127.0.0.1:8001",
        "orchestrator to check graph names against at submit: an unknown one is NOT_FOUND at once "
        "('' = do not check)",
    )
    add_option(parser, "maintain-interval", float, 5.0, "seconds between expiry/purge passes")
    return parser


async def serve(settings: ServerSettings, args: argparse.Namespace) -> None:
    store = Store(args.jobs_db, max_unfinished=args.max_jobs, create=False)
    orchestrator = OipClient(args.target) if args.target else None
    servicer = JobsServicer(
        store, default_ttl=args.ttl, default_timeout=args.job_timeout, orchestrator=orchestrator
    )

    def add_services(server: grpc.aio.Server) -> list[str]:
        jpb_grpc.add_JobsServicer_to_server(servicer, server)
        return [JOBS_SERVICE]

    async def prepare() -> None:
        await asyncio.to_thread(store.create_schema)
        log.info("store ready", extra={"db": redact(store.url)})

    node = NodeServer(settings, add_services=add_services, loader=prepare)
    try:
        await node.run_until_signal(work=lambda stop: maintain_forever(store, args.maintain_interval, stop))
    finally:
        if orchestrator is not None:
            await orchestrator.close()
        store.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = settings_from_args("jobs", args)
    run_process(settings, lambda: serve(settings, args))


if __name__ == "__main__":
    main()
