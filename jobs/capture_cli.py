"""`onnxmesh capture export|prune`: the payload capture records in the job store.

    capture export --out FILE.parquet [--since WHEN] [--until WHEN] [--graph G] [--step S] [--db URL]
    capture prune [--max-age AGE] [--max-records N] [--db URL]
    capture reference --tensor T --out REF.json (--graph G [--since WHEN] [--until WHEN] | --values FILE.npy)
    capture drift --graph G --tensor T --reference REF.json [--window N]

WHEN is an ISO 8601 time (2026-12-07T18:00:00Z) or an age such as 30m, 12h, 7d (that long ago);
AGE is an age. The Parquet file has one row per record: its metadata columns (graph, step,
service, model, version, request_id, trace_id, captured_at, latency, status_code, truncated),
then one column per captured tensor ("input.<name>" / "output.<name>", nested lists; null in
records that lack it).

`reference` writes a drift reference (orchestrator/capture/drift.py) from a captured window or a
file of values such as the training split's; `drift` prints the PSI of the newest `--window`
records against one, as the orchestrator's gauge computes it.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from jobs.store import DB_ENV, Store, default_url, redact
from orchestrator.capture.drift import Reference, psi, values_of

_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
METADATA = (
    "graph",
    "step",
    "service",
    "model",
    "version",
    "request_id",
    "trace_id",
    "captured_at",
    "latency",
    "status_code",
    "truncated",
)


class CaptureCliError(Exception):
    """A problem reported in one line."""


def age(text: str) -> float:
    """'30m' -> 1800.0 seconds."""
    match = _AGE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected an age such as 90s, 30m, 12h or 7d, got {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def when(text: str) -> float:
    """An ISO 8601 time or an age ago -> Unix seconds."""
    try:
        return time.time() - age(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time (2026-12-07T18:00:00Z) or an age (30m, 12h, 7d), got {text!r}"
        ) from None
    return parsed.timestamp()


def export(store: Store, out: Path, since: float, until: float, graph: str | None, step: str | None) -> int:
    """Write the records of the window to Parquet; the number of records."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise CaptureCliError("exporting to Parquet needs pyarrow: pip install 'onnxmesh[parquet]'") from None
    records = store.read_captures(since, until, graph, step)
    names = sorted({name for r in records for name in r.tensors})
    rows: list[dict[str, Any]] = []
    for r in records:
        row: dict[str, Any] = {key: getattr(r, key) for key in METADATA}
        row.update({name: r.tensors.get(name) for name in names})
        rows.append(row)
    columns = [*METADATA, *names]
    table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.null()) for c in columns})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.select(columns), out)
    return len(records)


async def _export(args: argparse.Namespace) -> int:
    with Store(args.db) as store:
        count = export(store, args.out, args.since, args.until, args.graph, args.step)
    print(f"{count} records from {redact(store.url)} -> {args.out}")
    return 0


async def _prune(args: argparse.Namespace) -> int:
    if args.max_age is None and args.max_records is None:
        raise CaptureCliError("say what to keep: --max-age AGE and/or --max-records N")
    with Store(args.db) as store:
        deleted = store.prune_captures(max_age=args.max_age, max_records=args.max_records)
        left = store.count_captures()
    print(f"deleted {deleted} records; {left} kept")
    return 0


async def _reference(args: argparse.Namespace) -> int:
    if (args.graph is None) == (args.values is None):
        raise CaptureCliError("build the reference from --graph (captured records) or --values FILE.npy")
    if args.values is not None:
        try:
            values = np.load(args.values, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CaptureCliError(f"cannot read {args.values}: {exc}") from None
        source = str(args.values)
    else:
        with Store(args.db) as store:
            records = store.read_captures(args.since, args.until, args.graph, "")
        values = values_of(records, args.tensor)
        source = f"{len(records)} records of {args.graph}"
    try:
        reference = Reference.of(args.tensor, values)
    except ValueError as exc:
        raise CaptureCliError(str(exc)) from None
    args.out.write_text(reference.to_json() + "\n")
    print(
        f"{args.tensor}: {reference.kind} reference of {np.asarray(values).size} values from {source} -> {args.out}"
    )
    return 0


async def _drift(args: argparse.Namespace) -> int:
    try:
        reference = Reference.load(args.reference)
    except (OSError, ValueError, KeyError) as exc:
        raise CaptureCliError(f"cannot read the reference {args.reference}: {exc}") from None
    with Store(args.db) as store:
        records = store.latest_captures(args.graph, args.window)
    values = values_of(records, args.tensor)
    if not values.size:
        raise CaptureCliError(f"no captured records of {args.graph} hold {args.tensor}")
    print(
        f"{args.graph} {args.tensor}: PSI {psi(reference, values):.3f} over the newest {len(records)} records"
    )
    return 0


def register(subparsers: Any) -> None:
    """Add `capture` (export, prune, reference, drift) to an argparse subparsers object."""
    capture = subparsers.add_parser("capture", help="export or prune payload capture records")
    commands = capture.add_subparsers(dest="capture_command", required=True, metavar="SUBCOMMAND")
    db_help = f"SQLAlchemy URL or SQLite path (env {DB_ENV}; default {default_url()})"
    out = commands.add_parser("export", help="a window of records to Parquet, one column per tensor")
    out.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    out.add_argument("--since", type=when, default=0.0, help="ISO time or age (30m, 7d); default: all")
    out.add_argument("--until", type=when, default=float("inf"), help="ISO time or age; default: now")
    out.add_argument("--graph", help="only this graph's records")
    out.add_argument("--step", help="only this step's records ('' = the graph's own)")
    out.add_argument("--db", help=db_help)
    out.set_defaults(jobs_command=_export)
    prune = commands.add_parser("prune", help="retention: delete records by age and/or count")
    prune.add_argument("--max-age", type=age, help="delete records older than this (e.g. 7d)")
    prune.add_argument("--max-records", type=int, help="then keep only the newest N")
    prune.add_argument("--db", help=db_help)
    prune.set_defaults(jobs_command=_prune)
    ref = commands.add_parser("reference", help="a drift reference from captured records or a .npy file")
    ref.add_argument("--tensor", required=True, help="input.<name> or output.<name>")
    ref.add_argument("--out", type=Path, required=True, help="the reference file (JSON) to write")
    ref.add_argument("--graph", help="from this graph's captured records")
    ref.add_argument("--values", type=Path, help="from this .npy file (e.g. the training split)")
    ref.add_argument("--since", type=when, default=0.0, help="ISO time or age (30m, 7d); default: all")
    ref.add_argument("--until", type=when, default=float("inf"), help="ISO time or age; default: now")
    ref.add_argument("--db", help=db_help)
    ref.set_defaults(jobs_command=_reference)
    drift = commands.add_parser("drift", help="PSI of the newest records against a reference")
    drift.add_argument("--graph", required=True)
    drift.add_argument("--tensor", required=True, help="input.<name> or output.<name>")
    drift.add_argument("--reference", type=Path, required=True, help="a file `capture reference` wrote")
    drift.add_argument("--window", type=int, default=500, help="the newest records compared (default: 500)")
    drift.add_argument("--db", help=db_help)
    drift.set_defaults(jobs_command=_drift)
