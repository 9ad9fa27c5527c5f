"""The batch and asynchronous subcommands: `batch`, `submit`, `result`, `jobs`.

    batch GRAPH DATASET [--db URL] [--rows-per-request R] [--concurrency C] [--rate ROWS/S] ...
    submit [GRAPH] [--index N] [--count K | --input NAME=FILE.npy ...] [--ttl S]   -> job ids
    result ID [--wait] [--timeout S]
    jobs [--status S ...] [--model GRAPH] [--limit N] [--cancel ID]
    capture export|prune ...   (payload capture records: jobs/capture_cli.py)

`register(subparsers)` adds them to any argparse parser (the `onnxmesh` CLI); each sets
`jobs_command`, and `run(args)` executes it and returns the exit code. `python -m jobs` is the
same commands standalone. Exit codes: 0 done; 1 an error (one line on stderr, no traceback);
2 `batch` finished with failed rows (recorded, retried next run), a job FAILED / CANCELLED /
EXPIRED, or `jobs --cancel` of a job that had already finished; 3 `result` without --wait on a
job not finished yet.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs import capture_cli
from jobs.batch import BatchConfig, run_batch
from jobs.client import DEFAULT_TARGET as DEFAULT_JOBS_TARGET
from jobs.client import TARGET_ENV as JOBS_TARGET_ENV
from jobs.client import JobInfo, JobsClient
from jobs.datasets import DatasetError, check_file
from jobs.store import DB_ENV, STATUSES, Store, default_url, redact
from meshctl.client import ClientError, load_client
from meshctl.targets import MESH_ENV, REFUSED_HINT, current_mesh, explain
from meshctl.targets import CliError as MeshCliError
from services.common.errors import MeshError, NotFound
from services.common.grpc.client import OipClient
from services.common.grpc.security import SecurityError
from services.common.settings import non_negative_int, positive_int

REPO = Path(__file__).resolve().parent.parent
ORCHESTRATOR_ENV = "ONNXMESH_TARGET"
DEFAULT_ORCHESTRATOR = "127.0.0.1:8001"
COMMANDS = ("batch", "submit", "result", "jobs", "capture")


class CliError(Exception):
    """A problem to report in one line, with exit code 1."""


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    return name, value


def _jobs_target(args: argparse.Namespace) -> str:
    return str(args.jobs_target or os.environ.get(JOBS_TARGET_ENV) or DEFAULT_JOBS_TARGET)


#: What to do when the jobs service does not answer.
JOBS_HINT = (
    "is the jobs service running? start it with '.venv/bin/python -m jobs.service' (docs/serving-modes.md)"
)


def _explain(target: str, err: MeshError, hint: str = JOBS_HINT) -> str:
    return explain(target, err, connecting=True, hint=hint)


# -- batch ---------------------------------------------------------------------------------------


async def _batch(args: argparse.Namespace) -> int:
    target = args.target or os.environ.get(ORCHESTRATOR_ENV) or DEFAULT_ORCHESTRATOR
    try:
        check_file(args.dataset)  # before the store and the orchestrator: a typo says so first
    except DatasetError as exc:
        raise CliError(str(exc)) from None
    config = BatchConfig(
        graph=args.graph,
        path=args.dataset,
        dataset_name=args.dataset_name,
        key=args.key,
        mapping=dict(args.input or []),
        version=args.version,
        outputs=tuple(args.output or ()),
        rows_per_request=args.rows_per_request,
        concurrency=args.concurrency,
        rate=args.rate,
        timeout=args.timeout,
        retries=args.retries,
        progress=args.progress,
    )
    db = args.db or default_url()
    try:
        store = await asyncio.to_thread(Store, db)
    except MeshError as err:
        raise CliError(f"database {redact(db)}: {err.message}") from None
    try:
        async with OipClient(target) as client:
            try:
                summary = await run_batch(config, client, store)
            except DatasetError as exc:
                raise CliError(str(exc)) from None
            except MeshError as err:
                raise CliError(_explain(target, err, REFUSED_HINT)) from None
    finally:
        store.close()
    for line in summary.lines():
        print(line)
    print(f"  store:             {redact(store.url)} (table predictions, dataset '{summary.dataset}')")
    if summary.interrupted:
        return 130
    return 2 if summary.failed else 0


# -- submit / result / jobs ------------------------------------------------------------------------


def _submit_inputs(args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """One input dict per job: `--input NAME=FILE.npy` (one job), else the mesh's sample rows (its
    client file, meshctl/client.py; the demo's: held-out digits), one job per row."""
    if args.input:
        tensors = {}
        for name, path in args.input:
            try:
                tensors[name] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CliError(f"{path}: cannot read a .npy array: {exc}") from None
        return [tensors]
    try:
        client = load_client(current_mesh())
        if client is None:
            raise ClientError(f"{current_mesh().path} names no client file: give --input NAME=FILE.npy")
        samples = client.samples()
    except (ClientError, MeshCliError) as exc:
        raise CliError(str(exc)) from None
    rows = [(args.index + i) % len(samples) for i in range(args.count)]
    return [samples.rows(row, row + 1) for row in rows]


async def _submit(args: argparse.Namespace) -> int:
    if args.mesh is not None:
        os.environ[MESH_ENV] = str(args.mesh)
    graph = args.graph or _default_graph()
    target = _jobs_target(args)
    async with JobsClient(target) as client:
        for inputs in _submit_inputs(args):
            try:
                job = await client.submit(
                    graph, inputs, version=args.version, ttl=args.ttl, job_timeout=args.job_timeout
                )
            except MeshError as err:
                raise CliError(_explain(target, err)) from None
            print(job.id)
    return 0


def _default_graph() -> str:
    """The mesh's client file's graph, else the mesh's first graph."""
    try:
        client = load_client(current_mesh())
        return client.DEFAULT_NAME if client else current_mesh().graph_names()[0]
    except (ClientError, MeshCliError) as exc:
        raise CliError(str(exc)) from None


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def print_job(job: JobInfo) -> None:
    print(f"job {job.id}: {job.status.upper()}  {job.model_name} (version {job.model_version or '-'})")
    print(
        f"  created {_when(job.created_at)}  started {_when(job.started_at)}  finished {_when(job.finished_at)}"
        f"  attempts {job.attempts}  kept until {_when(job.expires_at)}"
    )
    if job.error_code:
        print(f"  error:         {job.error_code}: {job.error_message}")
    labels = job.outputs.get("label")
    if labels is not None:
        print(f"  label:         {' '.join(str(int(v)) for v in np.asarray(labels).reshape(-1)[:32])}")
    probabilities = job.outputs.get("probabilities")
    if probabilities is not None and probabilities.ndim == 2:
        row = probabilities[0]
        top = int(np.argmax(row))
        cells = [f"{i}:{p:.2f}" + ("*" if i == top else "") for i, p in enumerate(row.tolist())]
        print(f"  probabilities: {' '.join(cells)}")
    for name, array in job.outputs.items():
        if name not in ("label", "probabilities"):
            print(f"  {name}: {array.dtype}{list(array.shape)}")
    steps = {k[5:]: v for k, v in sorted(job.parameters.items()) if k.startswith("step.")}
    versions = {k[8:]: v for k, v in sorted(job.parameters.items()) if k.startswith("version.")}
    if steps:
        print("  steps:         " + "  ".join(f"{k}={v}" for k, v in steps.items()))
    if versions:
        print("  versions:      " + "  ".join(f"{k}={v}" for k, v in versions.items()))


async def _result(args: argparse.Namespace) -> int:
    target = _jobs_target(args)
    async with JobsClient(target) as client:
        try:
            job = await (client.wait(args.id, timeout=args.timeout) if args.wait else client.get(args.id))
        except NotFound as err:
            raise CliError(err.message) from None
        except MeshError as err:
            raise CliError(_explain(target, err)) from None
    print_job(job)
    if not job.finished:
        return 3
    return 0 if job.status == "succeeded" else 2


async def _cancel(client: JobsClient, ids: Sequence[str]) -> int:
    """Cancel each job; one that had already finished says so (exit 2: not every job was cancelled)."""
    code = 0
    for job_id in ids:
        try:
            job = await client.cancel(job_id)
        except NotFound as err:
            raise CliError(err.message) from None
        if job.status == "cancelled":
            print(f"{job.id}: cancelled")
        else:
            print(
                f"{job.id}: not cancelled: it had already finished ({job.status} at {_when(job.finished_at)})"
            )
            code = 2
    return code


async def _jobs(args: argparse.Namespace) -> int:
    target = _jobs_target(args)
    async with JobsClient(target) as client:
        try:
            if args.cancel:
                return await _cancel(client, args.cancel)
            jobs, counts = await client.list(args.status or (), args.model, args.limit)
        except MeshError as err:
            raise CliError(_explain(target, err)) from None
    print("jobs: " + (", ".join(f"{s} {counts[s]}" for s in STATUSES if s in counts) or "none"))
    for job in jobs:
        error = f"  {job.error_code}" if job.error_code else ""
        print(
            f"  {job.id}  {job.status:<9}  {job.model_name:<18} {_when(job.created_at)}  attempts {job.attempts}{error}"
        )
    return 0


# -- wiring ----------------------------------------------------------------------------------------


Handler = Callable[[argparse.Namespace], Any]


def register(subparsers: Any) -> None:
    """Add `batch`, `submit`, `result` and `jobs` to an argparse subparsers object."""
    batch = subparsers.add_parser(
        "batch",
        help="predict a dataset through a graph into a database (resumable)",
        description="Send every row of a dataset not yet predicted through a graph over OIP and write the "
        "predictions (row key, outputs, model versions, time) into the store's `predictions` table.",
    )
    batch.add_argument("graph", help="graph or model served by the target")
    batch.add_argument(
        "dataset", type=Path, help=".npy, .npz, .csv or .parquet file, or a folder of PNG/JPEG files"
    )
    batch.add_argument("--db", help=f"SQLAlchemy URL or SQLite path (env {DB_ENV}; default {default_url()})")
    batch.add_argument("--dataset-name", help="the `dataset` column (default: the file name without suffix)")
    batch.add_argument("--key", help="array or column holding each row's key (default: the row number)")
    batch.add_argument(
        "--input",
        type=_assignment,
        action="append",
        metavar="INPUT=FIELD",
        help="which array/column feeds an input",
    )
    batch.add_argument("--output", action="append", metavar="NAME", help="outputs to keep (default: all)")
    batch.add_argument("--version", default="", help="model version to ask for (default: the served one)")
    batch.add_argument(
        "--rows-per-request", type=positive_int, default=128, help="rows in one ModelInfer (default 128)"
    )
    batch.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight (default 4)")
    batch.add_argument(
        "--rate", type=float, help="most rows per second, to spare online traffic (default: no limit)"
    )
    batch.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    batch.add_argument(
        "--retries", type=non_negative_int, default=3, help="retries of UNAVAILABLE etc. (default 3)"
    )
    batch.add_argument(
        "--progress", choices=("auto", "bar", "plain", "off"), default="auto", help="progress display"
    )
    batch.add_argument(
        "--target", help=f"orchestrator (env {ORCHESTRATOR_ENV}; default {DEFAULT_ORCHESTRATOR})"
    )
    batch.set_defaults(jobs_command=_batch)

    submit = subparsers.add_parser("submit", help="submit asynchronous jobs; prints one job id per line")
    submit.add_argument(
        "graph", nargs="?", default=None, help="graph or model (default: the mesh's client file's)"
    )
    submit.add_argument("--index", type=non_negative_int, default=0, help="first sample row (default 0)")
    submit.add_argument("--count", type=positive_int, default=1, help="submit K jobs, one sample row each")
    submit.add_argument(
        "--input",
        type=_assignment,
        action="append",
        metavar="NAME=FILE.npy",
        help="one job with these input arrays",
    )
    submit.add_argument(
        "--mesh",
        type=Path,
        default=None,
        help="the mesh file of its samples (default: $ONNXMESH_MESH, else the demo's)",
    )
    submit.add_argument("--version", default="", help="model version to ask for")
    submit.add_argument("--ttl", type=float, default=0.0, help="seconds the job and its result are kept")
    submit.add_argument("--job-timeout", type=float, default=0.0, help="seconds one attempt may take")
    _jobs_target_option(submit)
    submit.set_defaults(jobs_command=_submit)

    result = subparsers.add_parser("result", help="status and answer of a job")
    result.add_argument("id", help="job id (from submit)")
    result.add_argument(
        "--wait", action="store_true", help="wait until the job is finished (streams its status)"
    )
    result.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S seconds")
    _jobs_target_option(result)
    result.set_defaults(jobs_command=_result)

    capture_cli.register(subparsers)
    jobs = subparsers.add_parser("jobs", help="recent jobs and counts per status; --cancel ID")
    jobs.add_argument("--status", action="append", choices=STATUSES, help="only jobs in this status")
    jobs.add_argument("--model", default="", help="only jobs of this graph")
    jobs.add_argument("--limit", type=positive_int, default=20, help="how many (default 20)")
    jobs.add_argument("--cancel", action="append", metavar="ID", help="cancel a queued or running job")
    _jobs_target_option(jobs)
    jobs.set_defaults(jobs_command=_jobs)


def _jobs_target_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jobs-target", help=f"the jobs service (env {JOBS_TARGET_ENV}; default {DEFAULT_JOBS_TARGET})"
    )


def run(args: argparse.Namespace, prog: str = "onnxmesh") -> int:
    """Execute the subcommand `register` set up; the exit code."""
    handler: Handler = args.jobs_command
    try:
        return int(asyncio.run(handler(args)))
    except (CliError, SecurityError, capture_cli.CaptureCliError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except MeshError as exc:  # the store: unreachable database, ...
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser(prog: str = "python -m jobs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Batch and asynchronous serving.")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs") -> int:
    """`python -m jobs ...`, and `onnxmesh batch|submit|result|jobs ...` (meshctl.cli hands over)."""
    args = build_parser(prog).parse_args(argv)
    return run(args, prog="jobs" if prog == "python -m jobs" else prog)
