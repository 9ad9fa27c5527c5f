"""Asynchronous serving with real processes: the jobs service, workers, the mesh. 1000 jobs
submitted under load with a worker SIGKILLed mid-way all complete exactly once; a full queue
refuses with RESOURCE_EXHAUSTED; accepted jobs survive a crash of the service; cancel, watch and
the CLI. Every test runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from jobs import service as jobs_service
from jobs.client import JobsClient
from jobs.store import RUNNING, SUCCEEDED, JobRecord, Store
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import NotFound, ResourceExhausted
from services.common.grpc import codec
from services.common.grpc.client import OipClient
from tests.jobs.conftest import GRAPH
from tests.jobs.support import REPO, Node, holdout
from tests.support import free_port, until

JOBS = 1000


@contextmanager
def nodes(*started: Node) -> Iterator[list[Node]]:
    """Every node stopped at the end, whatever happened."""
    running = list(started)
    try:
        yield running
    finally:
        for node in running:
            node.stop(10)


def service(db_url: str, orchestrator: str, *args: str) -> Node:
    return Node(
        "jobs.service",
        ["--jobs-db", db_url, "--target", orchestrator, "--grace", "2", "--drain-delay", "0", *args],
    )


def worker(db_url: str, orchestrator: str, *args: str) -> Node:
    return Node("jobs.worker", ["--jobs-db", db_url, "--target", orchestrator, "--grace", "2", *args])


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def label_of(record: JobRecord) -> int:
    assert record.response is not None
    return int(codec.decode_response_outputs(pb.ModelInferResponse.FromString(record.response))["label"][0])


def test_a_thousand_jobs_under_load_with_a_worker_killed_all_complete_exactly_once(
    orchestrator: str, online: tuple[np.ndarray, np.ndarray], db_url: str
) -> None:
    images, _ = holdout()
    lease = 1.5
    worker_args = ("--lease", str(lease), "--concurrency", "16", "--maintain-interval", "0.5")
    svc = service(db_url, orchestrator, "--max-jobs", str(JOBS))
    pool = [worker(db_url, orchestrator, *worker_args) for _ in range(2)]
    with nodes(svc, *pool), Store(db_url) as store:
        svc.wait_ready()
        for w in pool:
            w.wait_ready()
        submitted: dict[str, int] = {}
        submit_s: list[float] = []

        def submit_all() -> None:
            async def go() -> None:
                async with JobsClient(svc.address) as client:
                    sem = asyncio.Semaphore(32)

                    async def one(i: int) -> None:
                        async with sem:
                            job = await client.submit(GRAPH, {"image": images[i % 360 : i % 360 + 1]})
                        submitted[job.id] = i % 360

                    started = time.monotonic()
                    await asyncio.gather(*(one(i) for i in range(JOBS)))
                    submit_s.append(time.monotonic() - started)

            asyncio.run(go())

        started = time.monotonic()
        submitter = threading.Thread(target=submit_all)
        submitter.start()
        try:

            def succeeded() -> int:
                return store.list_jobs(limit=1)[1].get(SUCCEEDED, 0)

            until(lambda: succeeded() >= JOBS // 5, "a fifth of the jobs to succeed", 60)
            victim = pool[0]
            marker = f"-{victim.pid}-"
            held: list[str] = []
            for _ in range(200):  # freeze it while it holds claimed jobs, then kill it
                victim.signal(signal.SIGSTOP)
                # Read only once it is stopped: a commit of its own cannot land after our read.
                until(lambda: stopped(victim.pid), "the worker to stop", 10)
                running = store.list_jobs([RUNNING], limit=JOBS)[0]
                held = [j.id for j in running if j.worker and marker in j.worker]
                if held:
                    break
                victim.signal(signal.SIGCONT)
                before = succeeded()
                until(lambda: succeeded() > before, "more jobs to succeed", 10)  # noqa: B023 - polled at once
            assert held, "the worker never held a job when frozen"
            killed_at = time.monotonic()
            victim.kill()
        finally:
            submitter.join(60)
        assert len(submitted) == JOBS

        def finished() -> bool:
            counts = store.list_jobs(limit=1)[1]
            return sum(n for s, n in counts.items() if s not in ("queued", "running")) == JOBS

        until(finished, "every job to finish", 90)
        total_s = time.monotonic() - started
        records = [store.get(job_id) for job_id in submitted]
        assert {r.status for r in records} == {SUCCEEDED}
        assert {r.completions for r in records} == {1}
        reclaimed = [store.get(job_id) for job_id in held]
        killed_wall = time.time() - (time.monotonic() - killed_at)
        # A COMMIT the frozen worker had already sent can still land at the PostgreSQL server
        # after we read: such a job is done by the victim itself, before its death. Every other
        # held job must have been taken up again by another worker.
        taken_up = [r for r in reclaimed if r.attempts >= 2 and r.worker and marker not in r.worker]
        own = [
            r for r in reclaimed if r.worker and marker in r.worker and (r.finished_at or 0) <= killed_wall
        ]
        assert len(taken_up) + len(own) == len(held) and taken_up, [(r.attempts, r.worker) for r in reclaimed]
        assert all(label_of(r) == online[0][submitted[r.id]] for r in records)
        recovered = max(r.finished_at or 0 for r in reclaimed) - (
            time.time() - (time.monotonic() - killed_at)
        )
        print(
            f"\n{JOBS} jobs: submitted in {submit_s[0]:.2f} s ({JOBS / submit_s[0]:.0f} jobs/s), all done in "
            f"{total_s:.2f} s; worker killed holding {len(held)} jobs, {len(taken_up)} taken up again and done "
            f"{recovered:.2f} s after the kill (lease {lease} s)"
        )


def test_a_full_queue_refuses_and_accepted_jobs_survive_a_crash_of_the_service(
    orchestrator: str, online: tuple[np.ndarray, np.ndarray], db_url: str
) -> None:
    images, _ = holdout()
    first = service(db_url, orchestrator, "--max-jobs", "5")
    with nodes(first) as running:
        first.wait_ready()

        async def fill() -> list[str]:
            async with JobsClient(first.address) as client:
                ids = [(await client.submit(GRAPH, {"image": images[i : i + 1]})).id for i in range(5)]
                with pytest.raises(ResourceExhausted, match="queue is full"):
                    await client.submit(GRAPH, {"image": images[5:6]})
                with pytest.raises(NotFound):
                    await client.submit("no-such-graph", {"image": images[:1]})
                return ids

        ids = asyncio.run(fill())
        first.kill()  # a crash right after accepting: the jobs are in the store already
        second = service(db_url, orchestrator, "--max-jobs", "5")
        running.append(second)
        second.wait_ready()

        async def check_queued_and_cancel() -> None:
            async with JobsClient(second.address) as client:
                assert [(await client.get(i)).status for i in ids] == ["queued"] * 5
                assert (await client.cancel(ids[0])).status == "cancelled"

        asyncio.run(check_queued_and_cancel())
        pool = worker(db_url, orchestrator)
        running.append(pool)
        pool.wait_ready()

        async def watch_all() -> list[list[str]]:
            async with JobsClient(second.address) as client:

                async def statuses(job_id: str) -> list[str]:
                    return [info.status async for info in client.watch(job_id, timeout=30)]

                seen = await asyncio.gather(*(statuses(i) for i in ids[1:]))
                for i, job_id in enumerate(ids[1:], start=1):
                    job = await client.get(job_id)
                    assert job.status == "succeeded" and int(job.outputs["label"][0]) == online[0][i]
                    assert job.parameters["step.mlp"] == "ok"
                return seen

        for statuses in asyncio.run(watch_all()):
            assert statuses[-1] == "succeeded" and statuses == sorted(
                statuses, key=["queued", "running", "succeeded"].index
            )

        cli = [sys.executable, "-m", "jobs"]
        target = ["--jobs-target", second.address]
        sub = subprocess.run(
            [*cli, "submit", GRAPH, "--index", "7", *target],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
        assert sub.returncode == 0, sub.stderr
        job_id = sub.stdout.strip()
        res = subprocess.run(
            [*cli, "result", job_id, "--wait", "--timeout", "30", *target],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SUCCEEDED" in res.stdout and f"label:         {online[0][7]}" in res.stdout
        listing = subprocess.run(
            [*cli, "jobs", *target], capture_output=True, text=True, timeout=30, cwd=REPO, check=False
        )
        assert "succeeded 5, cancelled 1" in listing.stdout, listing.stdout
        missing = subprocess.run(
            [*cli, "result", "nope", *target],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
        assert missing.returncode == 1 and "no job 'nope'" in missing.stderr
        # Cancelling a job that already succeeded says so, and that nothing was cancelled.
        late = subprocess.run(
            [*cli, "jobs", "--cancel", job_id, *target], capture_output=True, text=True, timeout=30, cwd=REPO
        )
        assert late.returncode == 2, late.stdout + late.stderr
        assert f"{job_id}: not cancelled: it had already finished (succeeded at " in late.stdout
        # A typo'd graph is refused at submit, naming what is served.
        typo = subprocess.run(
            [*cli, "submit", GRAPH[:-1], *target], capture_output=True, text=True, timeout=30, cwd=REPO
        )
        assert typo.returncode == 1 and not typo.stdout, typo.stdout
        assert "NOT_FOUND" in typo.stderr and "available: " in typo.stderr and GRAPH in typo.stderr, (
            typo.stderr
        )


def test_the_service_checks_graph_names_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNXMESH_TARGET", raising=False)
    assert jobs_service.build_parser().parse_args([]).target == "127.0.0.1:8001"


def test_a_job_waits_with_backoff_while_no_orchestrator_answers(db_url: str) -> None:
    images, _ = holdout()
    with Store(db_url) as store:
        request = OipClient.build_request(GRAPH, {"image": images[:1]}).SerializeToString()
        job = store.submit(GRAPH, request, ttl=600, timeout=5)
        nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
        with nodes(worker(db_url, nowhere)) as (pool,):
            pool.wait_ready()

            def waited_long() -> bool:
                found = (re.search(r"job waits .*in_s=([0-9.]+)", line) for line in list(pool.lines))
                return any(m is not None and float(m[1]) >= 2.0 for m in found)

            until(waited_long, "a third wait of the job, 2 s long", 60)
            record = store.get(job.id)
        assert record.status == "queued" and record.attempts == 0, record
        assert (record.error_message or "").startswith("waiting for the orchestrator ("), record.error_message
