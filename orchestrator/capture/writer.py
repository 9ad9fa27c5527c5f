"""The bounded queue between the request path and the capture store, drained by one thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.capture.record import Capture

logger = logging.getLogger(__name__)

#: Records waiting to be written; past it records are dropped (and counted).
DEFAULT_CAPACITY = 10_000
#: Records written per transaction.
DEFAULT_BATCH = 256


class CaptureWriter:
    """``offer`` never blocks: a record is queued, or dropped and counted when the queue is full.

    One daemon thread takes what is queued, up to ``batch`` records at a time, and hands them to
    ``write`` (one store transaction). A failed write is logged and its records counted as dropped
    (reason ``store``): capture never fails a request, and a store that is down does not grow
    memory past ``capacity``. ``close`` writes what is still queued; a killed process loses at
    most the records in the queue and the batch being written.
    """

    def __init__(
        self,
        write: Callable[[Sequence[Capture]], None],
        *,
        capacity: int = DEFAULT_CAPACITY,
        batch: int = DEFAULT_BATCH,
        on_drop: Callable[[str, int], None] | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self._write = write
        self._batch = batch
        self._queue: queue.Queue[Capture | None] = queue.Queue(maxsize=capacity)
        self._on_drop = on_drop
        self._on_written = on_written
        # Each counter has one writer (the event loop, the writer thread): no lock needed.
        self._accepted = 0
        self._finished = 0
        self._thread = threading.Thread(target=self._drain, name="capture-writer", daemon=True)
        self._thread.start()

    def offer(self, record: Capture) -> bool:
        """Queue a record for writing; False (and counted as dropped) when the queue is full."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped("queue_full", 1)
            return False
        self._accepted += 1
        return True

    @property
    def pending(self) -> int:
        """Records accepted and not yet written (or dropped by a failed write)."""
        return self._accepted - self._finished

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread (waits at most ``timeout`` seconds)."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            logger.warning("capture queue still full at shutdown; its records are lost")
            return
        self._thread.join(timeout)

    def _drain(self) -> None:
        while True:
            first = self._queue.get()
            batch = [] if first is None else [first]
            stop = first is None
            while not stop and len(batch) < self._batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._flush(batch)
            if stop:
                return

    def _flush(self, batch: list[Capture]) -> None:
        try:
            self._write(batch)
        except Exception:
            logger.exception("capture write failed", extra={"records": len(batch)})
            self._dropped("store", len(batch))
        else:
            if self._on_written is not None:
                self._on_written(len(batch))
        finally:
            self._finished += len(batch)

    def _dropped(self, reason: str, count: int) -> None:
        if self._on_drop is not None:
            try:
                self._on_drop(reason, count)
            except Exception:
                logger.exception("capture on_drop hook failed")


#: Where the orchestrator writes its captures: a SQLAlchemy URL or a SQLite path. Unset: the job
#: store's own ($ONNXMESH_JOBS_DB, else its SQLite default).
CAPTURE_DB_ENV = "ONNXMESH_CAPTURE_DB"
#: The writer's queue capacity (records).
CAPTURE_QUEUE_ENV = "ONNXMESH_CAPTURE_QUEUE"
#: Retention applied by the writer (at most once a minute): records older than this many seconds,
#: then all but the newest this many records, are deleted. Unset: kept (`onnxmesh capture prune`).
CAPTURE_MAX_AGE_ENV = "ONNXMESH_CAPTURE_MAX_AGE"
CAPTURE_MAX_RECORDS_ENV = "ONNXMESH_CAPTURE_MAX_RECORDS"
RETENTION_EVERY = 60.0


def open_store(url: str | None) -> Any:
    """The job store at ``url`` (None: its default). It needs the jobs extra (SQLAlchemy,
    psycopg): imported only when a spec captures."""
    from jobs.store import Store  # the one place the graph node uses the jobs package

    return Store(url)


class StoreSink:
    """``write`` for CaptureWriter: the job store's ``captures`` table, opened on the first write
    (in the writer thread: connecting never holds up the event loop)."""

    def __init__(
        self,
        url: str | None,
        *,
        max_age: float | None = None,
        max_records: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.max_age, self.max_records = max_age, max_records
        self._clock = clock
        self._store: Any = None
        self._pruned = float("-inf")

    def __call__(self, records: Sequence[Capture]) -> None:
        if self._store is None:
            self._store = open_store(self.url)
        self._store.write_captures(records)
        retention = self.max_age is not None or self.max_records is not None
        if retention and self._clock() - self._pruned >= RETENTION_EVERY:
            self._pruned = self._clock()
            self._store.prune_captures(max_age=self.max_age, max_records=self.max_records)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
