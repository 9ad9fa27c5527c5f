"""The job and prediction store: one SQLAlchemy schema, SQLite by default, PostgreSQL for replicas.

    predictions   one row per (dataset, graph, row key): written by `batch`, read by anyone
    jobs          one row per asynchronous job: written by the jobs service, claimed by workers
    captures      one row per captured request or step call: written by the orchestrator off the
                  request path (orchestrator/capture.py), read by `onnxmesh capture` and drift

Any SQLAlchemy URL works; a bare path means a SQLite file. SQLite (WAL, every transaction
`BEGIN IMMEDIATE`, so writers queue on its one lock instead of failing) serves one machine;
PostgreSQL serves several service and worker replicas.

Claiming is one statement on both:

    UPDATE jobs SET status='running', worker=:w, lease_token=:t, lease_expires_at=now+lease, ...
    WHERE id IN (SELECT id FROM jobs WHERE <claimable> ORDER BY created_at LIMIT :n
                 FOR UPDATE SKIP LOCKED)
    RETURNING ...

where <claimable> is "queued and due" or "running with an expired lease" (its worker died).
On PostgreSQL SKIP LOCKED lets every worker claim at once without waiting on the others; on
SQLite the statement runs under the database's write lock. Every later write of a worker (renew,
complete, fail, release) names the lease token it got: once a lease expired and another worker
claimed the job, the first one's writes match no row, so a job completes exactly once.

A job is committed before its id is returned (`submit`), and the number of unfinished jobs is
bounded: a full queue raises ResourceExhausted. Finished jobs are kept `ttl` seconds, then
`maintain()` deletes them; a queued job not started within its ttl becomes EXPIRED.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from orchestrator.capture.record import Capture, as_lists
from services.common.errors import MeshError, NotFound, ResourceExhausted, Unavailable

DB_ENV = "ONNXMESH_JOBS_DB"
DEFAULT_DB = "sqlite:///onnxmesh-jobs.sqlite"

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "expired",
)
UNFINISHED = (QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED, EXPIRED)
STATUSES = (*UNFINISHED, *FINISHED)

OK = "ok"  # a prediction row's status; the other is FAILED

# One advisory lock key per purpose (PostgreSQL): schema creation, the queue bound.
_LOCK_SCHEMA, _LOCK_SUBMIT = 0x6F6E6E01, 0x6F6E6E02

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("dataset", String(200), primary_key=True),
    Column("graph", String(200), primary_key=True),
    Column("row_key", String(200), primary_key=True),
    Column("status", String(16), nullable=False),
    # Output name -> this row's values (nested lists), e.g. {"label": 3, "probabilities": [...]}.
    Column("outputs", JSON, nullable=True),
    Column("model_version", String(64), nullable=False, default=""),
    # The graph's `version.<step>` answer parameters: which version of each model answered.
    Column("versions", JSON, nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("attempts", Integer, nullable=False, default=1),
    Column("predicted_at", DateTime(timezone=True), nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("model_name", String(200), nullable=False),
    Column("model_version", String(64), nullable=False, default=""),
    Column("status", String(16), nullable=False),
    Column("request", LargeBinary, nullable=False),
    Column("response", LargeBinary, nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    #: Successful completions; the fencing keeps it at most 1 (tests check it).
    Column("completions", Integer, nullable=False, default=0),
    Column("timeout", Float, nullable=False),
    Column("ttl", Float, nullable=False),
    Column("worker", String(100), nullable=True),
    Column("lease_token", String(32), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    # Unix times in seconds.
    Column("available_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("expires_at", Float, nullable=False),
    Index("jobs_claim", "status", "available_at"),
    Index("jobs_expiry", "expires_at"),
)


captures = Table(
    "captures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("graph", String(200), nullable=False),
    Column("step", String(200), nullable=False, default=""),  # "" = the whole graph
    Column("service", String(200), nullable=False, default=""),
    Column("model", String(200), nullable=False, default=""),
    Column("version", String(64), nullable=False, default=""),
    Column("request_id", String(200), nullable=False, default=""),
    Column("trace_id", String(32), nullable=False, default=""),
    Column("captured_at", Float, nullable=False),  # Unix seconds
    Column("latency", Float, nullable=False),  # seconds
    Column("status_code", String(32), nullable=False),  # "OK" or the gRPC status name
    # True when the tensors were left out because they exceeded the spec's max_bytes.
    Column("truncated", Integer, nullable=False, default=0),
    # "input.<name>" / "output.<name>" -> the tensor as nested lists.
    Column("tensors", JSON, nullable=False),
    Index("captures_time", "captured_at"),
)


def normalize_url(url: str) -> str:
    """A SQLAlchemy URL from what a user types: a bare path is a SQLite file; PostgreSQL uses psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def default_url(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get(DB_ENV) or DEFAULT_DB


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


@dataclass(frozen=True)
class Prediction:
    """One row of `predictions`."""

    dataset: str
    graph: str
    row_key: str
    status: str
    outputs: dict[str, Any] | None
    model_version: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 1
    predicted_at: datetime | None = None


@dataclass(frozen=True)
class JobRecord:
    """One row of `jobs` (request and response as serialized ModelInferRequest/Response)."""

    id: str
    model_name: str
    status: str
    request: bytes
    response: bytes | None
    model_version: str
    error_code: str | None
    error_message: str | None
    attempts: int
    completions: int
    timeout: float
    ttl: float
    worker: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Claim:
    """A job a worker holds until `lease_expires_at`, proved by `token`."""

    id: str
    model_name: str
    request: bytes
    timeout: float
    attempts: int
    token: str
    lease_expires_at: float


@dataclass(frozen=True)
class Maintenance:
    expired: int = 0
    lost: int = 0
    purged: int = 0


def _store_errors(exc: SQLAlchemyError, url: str) -> MeshError:
    if isinstance(exc, OperationalError):
        return Unavailable(f"job store {redact(url)} unavailable: {exc.orig or exc}")
    err = MeshError(f"job store {redact(url)}: {exc}")
    return err


class Store:
    """Both tables over one SQLAlchemy engine; every method is one short transaction (thread-safe).

    The methods are synchronous: asyncio callers run them with `asyncio.to_thread`.
    `clock` (Unix seconds) is injectable so that leases and TTLs are tested without waiting.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        max_unfinished: int = 10_000,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.time,
        create: bool = True,
    ) -> None:
        self.url = normalize_url(url or default_url())
        self.max_unfinished = max_unfinished
        self.max_attempts = max_attempts
        self.clock = clock
        self.engine = _engine(self.url)
        self.dialect = self.engine.dialect.name
        if create:
            self.create_schema()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction, with database errors mapped to the mesh's (UNAVAILABLE when unreachable)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise _store_errors(exc, self.url) from exc

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only transaction: on SQLite a plain BEGIN, which never waits for the writer (WAL)."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(onnxmesh_read_only=True)
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise _store_errors(exc, self.url) from exc

    def create_schema(self) -> None:
        with self.transaction() as conn:
            if self.dialect == "postgresql":  # several replicas may start at once
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_SCHEMA})
            metadata.create_all(conn, checkfirst=True)

    # -- captures (payload capture) ---------------------------------------------------------------

    def write_captures(self, rows: Sequence[Capture]) -> None:
        """Insert captured records in one transaction."""
        if not rows:
            return
        with self.transaction() as conn:
            conn.execute(insert(captures), [_capture_values(r) for r in rows])

    def read_captures(
        self,
        since: float = 0.0,
        until: float = float("inf"),
        graph: str | None = None,
        step: str | None = None,
    ) -> list[Capture]:
        """Records captured in [since, until), oldest first; optionally of one graph (and step)."""
        query = select(captures).where(captures.c.captured_at >= since)
        if until != float("inf"):
            query = query.where(captures.c.captured_at < until)
        if graph is not None:
            query = query.where(captures.c.graph == graph)
        if step is not None:
            query = query.where(captures.c.step == step)
        with self.reading() as conn:
            rows = conn.execute(query.order_by(captures.c.captured_at, captures.c.id)).all()
        return [_capture(r) for r in rows]

    def latest_captures(self, graph: str, limit: int, step: str = "") -> list[Capture]:
        """The newest `limit` records of a graph (its own by default, else one step's), oldest first."""
        query = (
            select(captures)
            .where(captures.c.graph == graph, captures.c.step == step)
            .order_by(captures.c.id.desc())
            .limit(limit)
        )
        with self.reading() as conn:
            rows = conn.execute(query).all()
        return [_capture(r) for r in reversed(rows)]

    def count_captures(self) -> int:
        with self.reading() as conn:
            return int(conn.execute(select(func.count()).select_from(captures)).scalar_one())

    def prune_captures(self, *, max_age: float | None = None, max_records: int | None = None) -> int:
        """Retention: delete records older than `max_age` seconds, then all but the newest
        `max_records`. Returns how many were deleted."""
        deleted = 0
        with self.transaction() as conn:
            if max_age is not None:
                deleted += conn.execute(
                    delete(captures).where(captures.c.captured_at < self.clock() - max_age)
                ).rowcount
            if max_records is not None:
                newest = select(captures.c.id).order_by(captures.c.id.desc()).limit(max_records)
                keep = select(newest.subquery().c.id)
                deleted += conn.execute(delete(captures).where(captures.c.id.not_in(keep))).rowcount
        return deleted

    # -- predictions (batch) -----------------------------------------------------------------------

    def done_keys(self, dataset: str, graph: str) -> set[str]:
        """Row keys already predicted (status ok) for a dataset through a graph."""
        query = select(predictions.c.row_key).where(
            predictions.c.dataset == dataset, predictions.c.graph == graph, predictions.c.status == OK
        )
        with self.reading() as conn:
            return {row[0] for row in conn.execute(query)}

    def write_predictions(self, rows: Sequence[Prediction]) -> int:
        """Insert rows, or overwrite failed ones; a row already `ok` is never written again.

        Returns how many rows were written (an ok row predicted twice by racing runs counts once).
        """
        if not rows:
            return 0
        now = datetime.now(UTC)
        values = [
            {
                "dataset": r.dataset,
                "graph": r.graph,
                "row_key": r.row_key,
                "status": r.status,
                "outputs": r.outputs,
                "model_version": r.model_version,
                "versions": dict(r.versions),
                "error_code": r.error_code,
                "error_message": r.error_message,
                "attempts": 1,
                "predicted_at": r.predicted_at or now,
            }
            for r in rows
        ]
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        if self.dialect not in ("postgresql", "sqlite"):
            raise MeshError(f"the prediction store supports SQLite and PostgreSQL, not {self.dialect}")
        stmt = dialect_insert(predictions)
        updated: dict[str, Any] = {
            name: stmt.excluded[name]
            for name in (
                "status",
                "outputs",
                "model_version",
                "versions",
                "error_code",
                "error_message",
                "predicted_at",
            )
        }
        updated["attempts"] = predictions.c.attempts + 1
        upsert = stmt.on_conflict_do_update(
            index_elements=["dataset", "graph", "row_key"],
            set_=updated,
            where=predictions.c.status != OK,
        ).returning(predictions.c.row_key)
        with self.transaction() as conn:
            # RETURNING, because executemany rowcounts are not reliable across drivers.
            return len(conn.execute(upsert, values).all())

    def prediction_counts(self, dataset: str, graph: str) -> dict[str, int]:
        query = (
            select(predictions.c.status, func.count())
            .where(predictions.c.dataset == dataset, predictions.c.graph == graph)
            .group_by(predictions.c.status)
        )
        with self.reading() as conn:
            return {str(status): int(n) for status, n in conn.execute(query)}

    def read_predictions(self, dataset: str, graph: str) -> list[Prediction]:
        query = (
            select(predictions)
            .where(predictions.c.dataset == dataset, predictions.c.graph == graph)
            .order_by(predictions.c.row_key)
        )
        with self.reading() as conn:
            return [
                Prediction(
                    dataset=r.dataset,
                    graph=r.graph,
                    row_key=r.row_key,
                    status=r.status,
                    outputs=r.outputs,
                    model_version=r.model_version,
                    versions=dict(r.versions or {}),
                    error_code=r.error_code,
                    error_message=r.error_message,
                    attempts=r.attempts,
                    predicted_at=r.predicted_at,
                )
                for r in conn.execute(query)
            ]

    # -- jobs (asynchronous) -----------------------------------------------------------------------

    def submit(
        self,
        model_name: str,
        request: bytes,
        *,
        ttl: float,
        timeout: float,
        idempotency_key: str | None = None,
    ) -> JobRecord:
        """Persist a queued job (committed when this returns); ResourceExhausted when the queue is full.

        With an `idempotency_key` already used, the existing job is returned instead.
        """
        now = self.clock()
        job_id = uuid.uuid4().hex
        values = {
            "id": job_id,
            "idempotency_key": idempotency_key or None,
            "model_name": model_name,
            "model_version": "",
            "status": QUEUED,
            "request": request,
            "attempts": 0,
            "completions": 0,
            "timeout": timeout,
            "ttl": ttl,
            "available_at": now,
            "created_at": now,
            "expires_at": now + ttl,
        }
        try:
            with self.transaction() as conn:
                if idempotency_key:
                    existing = conn.execute(
                        select(jobs).where(jobs.c.idempotency_key == idempotency_key)
                    ).first()
                    if existing is not None:
                        return _job(existing)
                if self.dialect == "postgresql":
                    # Serializes the count and the insert, so replicas never overshoot the bound.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_SUBMIT})
                unfinished = conn.execute(
                    select(func.count()).select_from(jobs).where(jobs.c.status.in_(UNFINISHED))
                ).scalar_one()
                if unfinished >= self.max_unfinished:
                    raise ResourceExhausted(
                        f"the job queue is full: {unfinished} jobs are queued or running "
                        f"(at most {self.max_unfinished}); retry later"
                    )
                conn.execute(insert(jobs).values(values))
        except MeshError as err:
            if isinstance(err.__cause__, IntegrityError) and idempotency_key:
                # Another replica inserted the same key between our lookup and our insert.
                found = self.find_by_key(idempotency_key)
                if found is not None:
                    return found
            raise
        return self.get(job_id)

    def find_by_key(self, idempotency_key: str) -> JobRecord | None:
        with self.reading() as conn:
            row = conn.execute(select(jobs).where(jobs.c.idempotency_key == idempotency_key)).first()
        return None if row is None else _job(row)

    def get(self, job_id: str) -> JobRecord:
        with self.reading() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"no job '{job_id}' (unknown id, or finished longer ago than its ttl)")
        return _job(row)

    def list_jobs(
        self, statuses: Iterable[str] = (), model_name: str = "", limit: int = 20
    ) -> tuple[list[JobRecord], dict[str, int]]:
        """The newest jobs (responses left out) and the number of jobs per status."""
        columns = [c for c in jobs.c if c.name not in ("request", "response")]
        query = select(*columns).order_by(jobs.c.created_at.desc()).limit(limit)
        wanted = list(statuses)
        if wanted:
            query = query.where(jobs.c.status.in_(wanted))
        if model_name:
            query = query.where(jobs.c.model_name == model_name)
        counts = select(jobs.c.status, func.count()).group_by(jobs.c.status)
        with self.reading() as conn:
            rows = [_job(r, with_payload=False) for r in conn.execute(query)]
            totals = {str(status): int(n) for status, n in conn.execute(counts)}
        return rows, totals

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (a running job's result is then discarded)."""
        now = self.clock()
        with self.transaction() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.in_(UNFINISHED))
                .values(
                    status=CANCELLED,
                    finished_at=now,
                    expires_at=now + jobs.c.ttl,
                    lease_token=None,
                    lease_expires_at=None,
                )
            )
        return self.get(job_id)

    def _claimable(self, now: float) -> Any:
        return or_(
            and_(jobs.c.status == QUEUED, jobs.c.available_at <= now, jobs.c.expires_at > now),
            and_(
                jobs.c.status == RUNNING,
                jobs.c.lease_expires_at < now,
                jobs.c.attempts < self.max_attempts,
            ),
        )

    def claim(self, worker: str, limit: int, lease: float) -> list[Claim]:
        """Take up to `limit` due jobs (queued, or abandoned by a worker whose lease expired)."""
        if limit <= 0:
            return []
        now = self.clock()
        token = uuid.uuid4().hex
        candidates = (
            select(jobs.c.id)
            .where(self._claimable(now))
            .order_by(jobs.c.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(jobs)
            .where(jobs.c.id.in_(candidates.scalar_subquery()))
            .values(
                status=RUNNING,
                worker=worker,
                lease_token=token,
                lease_expires_at=now + lease,
                attempts=jobs.c.attempts + 1,
                started_at=now,
            )
            .returning(jobs.c.id, jobs.c.model_name, jobs.c.request, jobs.c.timeout, jobs.c.attempts)
        )
        with self.transaction() as conn:
            rows = conn.execute(stmt).all()
        return [
            Claim(r.id, r.model_name, bytes(r.request), r.timeout, r.attempts, token, now + lease)
            for r in rows
        ]

    def renew(self, claims: Iterable[Claim], lease: float) -> set[str]:
        """Extend the leases a worker still holds; returns the ids it still holds."""
        held: set[str] = set()
        now = self.clock()
        by_token: dict[str, list[str]] = {}
        for c in claims:
            by_token.setdefault(c.token, []).append(c.id)
        with self.transaction() as conn:
            for token, ids in by_token.items():
                rows = conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(ids), jobs.c.lease_token == token, jobs.c.status == RUNNING)
                    .values(lease_expires_at=now + lease)
                    .returning(jobs.c.id)
                ).all()
                held.update(r.id for r in rows)
        return held

    def _finish(self, claim: Claim, values: dict[str, Any]) -> bool:
        stmt = (
            update(jobs)
            .where(jobs.c.id == claim.id, jobs.c.lease_token == claim.token, jobs.c.status == RUNNING)
            .values(lease_token=None, lease_expires_at=None, **values)
        )
        with self.transaction() as conn:
            return conn.execute(stmt).rowcount == 1

    def complete(self, claim: Claim, response: bytes, model_version: str = "") -> bool:
        """Store the answer; False when the claim was lost (lease expired and taken, or cancelled)."""
        now = self.clock()
        return self._finish(
            claim,
            {
                "status": SUCCEEDED,
                "response": response,
                "model_version": model_version,
                "finished_at": now,
                "expires_at": now + jobs.c.ttl,
                "completions": jobs.c.completions + 1,
            },
        )

    def fail(self, claim: Claim, code: str, message: str) -> bool:
        now = self.clock()
        return self._finish(
            claim,
            {
                "status": FAILED,
                "error_code": code,
                "error_message": message,
                "finished_at": now,
                "expires_at": now + jobs.c.ttl,
            },
        )

    def release(
        self,
        claim: Claim,
        *,
        retry_in: float = 0.0,
        error: tuple[str, str] | None = None,
        attempted: bool = True,
    ) -> bool:
        """Put a claimed job back in the queue: a retryable error (counts as an attempt unless
        `attempted` is False: the orchestrator was never reached) or a worker shutting down
        (`error` None: the attempt is given back)."""
        values: dict[str, Any] = {"status": QUEUED, "worker": None, "available_at": self.clock() + retry_in}
        if error is None or not attempted:
            values["attempts"] = jobs.c.attempts - 1
        if error is not None:
            values["error_code"], values["error_message"] = error
        return self._finish(claim, values)

    def maintain(self) -> Maintenance:
        """Expire queued jobs past their ttl, fail jobs whose workers kept dying, delete old jobs."""
        now = self.clock()
        with self.transaction() as conn:
            expired = conn.execute(
                update(jobs)
                .where(jobs.c.status == QUEUED, jobs.c.expires_at <= now)
                .values(status=EXPIRED, finished_at=now, expires_at=now + jobs.c.ttl)
            ).rowcount
            lost = conn.execute(
                update(jobs)
                .where(
                    jobs.c.status == RUNNING,
                    jobs.c.lease_expires_at < now,
                    jobs.c.attempts >= self.max_attempts,
                )
                .values(
                    status=FAILED,
                    error_code="ABORTED",
                    error_message=f"the job's worker was lost {self.max_attempts} times",
                    finished_at=now,
                    expires_at=now + jobs.c.ttl,
                    lease_token=None,
                    lease_expires_at=None,
                )
            ).rowcount
            purged = conn.execute(
                delete(jobs).where(jobs.c.status.in_(FINISHED), jobs.c.expires_at <= now)
            ).rowcount
        return Maintenance(expired=expired, lost=lost, purged=purged)


def _capture(r: Any) -> Capture:
    return Capture(
        r.graph,
        r.step,
        r.service,
        r.model,
        r.version,
        r.request_id,
        r.trace_id,
        r.captured_at,
        r.latency,
        r.status_code,
        dict(r.tensors),
        bool(r.truncated),
    )


def _capture_values(r: Capture) -> dict[str, Any]:
    return {
        "graph": r.graph,
        "step": r.step,
        "service": r.service,
        "model": r.model,
        "version": r.version,
        "request_id": r.request_id,
        "trace_id": r.trace_id,
        "captured_at": r.captured_at,
        "latency": r.latency,
        "status_code": r.status_code,
        "truncated": int(r.truncated),
        # Off the request path (the capture writer's thread): arrays become lists here.
        "tensors": as_lists(r.tensors),
    }


def _job(row: Any, *, with_payload: bool = True) -> JobRecord:
    return JobRecord(
        id=row.id,
        model_name=row.model_name,
        status=row.status,
        request=bytes(row.request) if with_payload else b"",
        response=bytes(row.response) if with_payload and row.response is not None else None,
        model_version=row.model_version or "",
        error_code=row.error_code,
        error_message=row.error_message,
        attempts=row.attempts,
        completions=row.completions,
        timeout=row.timeout,
        ttl=row.ttl,
        worker=row.worker,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        expires_at=row.expires_at,
    )


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: a connection the server dropped (restart, failover) is replaced, not used.
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30.0})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (the driver's would be DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer; NORMAL is durable across a process crash.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout): a deferred
        # transaction that reads and then writes can fail with "database is locked" instead.
        read_only = conn.get_execution_options().get("onnxmesh_read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
