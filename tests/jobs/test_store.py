"""The store on both backends (a SQLite file and a real PostgreSQL server): predictions written
once, jobs persisted and bounded, leases that expire and fence, cancellation, TTL."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from jobs.store import (
    CANCELLED,
    EXPIRED,
    FAILED,
    OK,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Prediction,
    Store,
    normalize_url,
)
from services.common.errors import NotFound, ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_urls() -> None:
    assert normalize_url("/tmp/x.sqlite") == "sqlite:////tmp/x.sqlite"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"


def test_a_prediction_is_written_once_and_a_failed_one_is_replaced(db_url: str) -> None:
    with Store(db_url) as store:
        written = store.write_predictions(
            [
                Prediction("d", "g", "1", OK, {"label": 1}, model_version="1", versions={"mlp": "1"}),
                Prediction(
                    "d", "g", "2", FAILED, None, error_code="INVALID_ARGUMENT", error_message="bad pixel"
                ),
            ]
        )
        assert written == 2
        assert store.done_keys("d", "g") == {"1"}
        # A second run predicts the failed row; the ok row (raced by another run) is kept as it was.
        store.write_predictions(
            [Prediction("d", "g", "1", OK, {"label": 9}), Prediction("d", "g", "2", OK, {"label": 2})]
        )
        rows = {p.row_key: p for p in store.read_predictions("d", "g")}
        assert (
            rows["1"].outputs == {"label": 1}
            and rows["1"].attempts == 1
            and rows["1"].versions == {"mlp": "1"}
        )
        assert rows["2"].status == OK and rows["2"].outputs == {"label": 2} and rows["2"].attempts == 2
        assert rows["2"].predicted_at is not None
        assert store.prediction_counts("d", "g") == {OK: 2}
        assert store.done_keys("d", "other-graph") == set()


def test_jobs_are_persisted_bounded_and_idempotent(db_url: str) -> None:
    with Store(db_url, max_unfinished=3) as store:
        first = store.submit("digits-serial", b"request", ttl=60, timeout=5, idempotency_key="k1")
        again = store.submit("digits-serial", b"other", ttl=60, timeout=5, idempotency_key="k1")
        assert again.id == first.id and again.request == b"request"
        store.submit("digits-serial", b"r", ttl=60, timeout=5)
        store.submit("digits-serial", b"r", ttl=60, timeout=5)
        with pytest.raises(ResourceExhausted, match="full: 3 jobs"):
            store.submit("digits-serial", b"r", ttl=60, timeout=5)
    # A new process (a new engine) sees every accepted job.
    with Store(db_url) as reopened:
        assert reopened.get(first.id).status == QUEUED
        jobs, counts = reopened.list_jobs()
        assert counts == {QUEUED: 3} and len(jobs) == 3
        with pytest.raises(NotFound):
            reopened.get("no-such-id")


def test_an_expired_lease_is_claimed_again_and_fences_the_first_worker(db_url: str) -> None:
    clock = Clock()
    with Store(db_url, clock=clock, max_attempts=3) as store:
        job = store.submit("g", b"r", ttl=600, timeout=5)
        (first,) = store.claim("w1", 10, lease=10)
        assert store.claim("w2", 10, lease=10) == []  # held
        clock.now += 5
        assert store.renew([first], lease=10) == {job.id}
        clock.now += 11  # w1 died: no renewal
        (second,) = store.claim("w2", 10, lease=10)
        assert second.id == job.id and second.attempts == 2
        assert store.complete(first, b"late answer") is False  # w1 came back too late
        assert store.renew([first], lease=10) == set()
        assert store.complete(second, b"answer", model_version="1") is True
        assert store.complete(second, b"answer") is False
        done = store.get(job.id)
        assert (done.status, done.response, done.completions, done.worker) == (SUCCEEDED, b"answer", 1, "w2")


def test_a_job_whose_workers_keep_dying_fails(db_url: str) -> None:
    clock = Clock()
    with Store(db_url, clock=clock, max_attempts=2) as store:
        job = store.submit("g", b"r", ttl=600, timeout=5)
        for _ in range(2):
            assert len(store.claim("w", 1, lease=1)) == 1
            clock.now += 2
        assert store.claim("w", 1, lease=1) == []
        assert store.maintain().lost == 1
        failed = store.get(job.id)
        assert failed.status == FAILED and failed.error_code == "ABORTED"


def test_release_retry_and_shutdown(db_url: str) -> None:
    clock = Clock()
    with Store(db_url, clock=clock) as store:
        job = store.submit("g", b"r", ttl=600, timeout=5)
        (claim,) = store.claim("w", 1, lease=10)
        assert store.release(claim, retry_in=3, error=("UNAVAILABLE", "down"))
        assert store.claim("w", 1, lease=10) == []  # not due yet
        clock.now += 3
        (claim,) = store.claim("w", 1, lease=10)
        assert claim.attempts == 2
        assert store.release(claim)  # a worker shutting down gives the attempt back
        assert store.get(job.id).attempts == 1


def test_cancel_ttl_expiry_and_purge(db_url: str) -> None:
    clock = Clock()
    with Store(db_url, clock=clock) as store:
        queued = store.submit("g", b"r", ttl=100, timeout=5)
        running = store.submit("g", b"r", ttl=100, timeout=5)
        never_run = store.submit("g", b"r", ttl=10, timeout=5)
        clock.now += 1
        claims = {c.id: c for c in store.claim("w", 2, lease=30)}
        assert set(claims) == {queued.id, running.id}  # oldest first
        store.complete(claims[queued.id], b"answer")
        assert store.cancel(running.id).status == CANCELLED
        assert store.complete(claims[running.id], b"answer") is False  # the result is discarded
        assert store.cancel(queued.id).status == SUCCEEDED  # finished jobs stay as they are
        clock.now += 10
        assert store.maintain().expired == 1
        assert store.get(never_run.id).status == EXPIRED
        clock.now += 200
        assert store.maintain().purged == 3
        for job in (queued, running, never_run):
            with pytest.raises(NotFound):
                store.get(job.id)


def test_concurrent_claimers_never_share_a_job(db_url: str) -> None:
    with Store(db_url) as store:
        for _ in range(200):
            store.submit("g", b"r", ttl=600, timeout=5)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        with Store(db_url, create=False) as own:  # its own engine, like another process
            while True:
                claims = own.claim(name, 7, lease=60)
                if not claims:
                    return
                for claim in claims:
                    assert own.complete(claim, b"x")
                with lock:
                    claimed.extend(c.id for c in claims)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(claimed) == 200 and max(Counter(claimed).values()) == 1
    with Store(db_url) as store:
        assert store.list_jobs()[1] == {SUCCEEDED: 200}
        assert RUNNING not in store.list_jobs()[1]
