"""Batch rows/s against online requests/s on the same graph, in one run (`python -m bench.probes.throughput`).

Online: closed loop, one held-out image per ModelInfer, at concurrency 1 and 32 (as `make bench`).
Batch: the held-out digits repeated to `--rows` rows through `BatchRunner` into a fresh SQLite
file, with a few request shapes. Needs a running mesh (`make run`); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from demo.digits import load_holdout
from jobs.batch import BatchConfig, BatchRunner
from jobs.store import Store
from services.common.grpc.client import OipClient


async def online(target: str, graph: str, images: np.ndarray, concurrency: int, seconds: float) -> float:
    async with OipClient(target) as client:
        done = 0
        stop_at = time.monotonic() + seconds

        async def loop(offset: int) -> None:
            nonlocal done
            i = offset
            while time.monotonic() < stop_at:
                await client.infer(
                    graph, {"image": images[i % len(images) : i % len(images) + 1]}, timeout=10.0
                )
                done += 1
                i += concurrency

        started = time.monotonic()
        await asyncio.gather(*(loop(k) for k in range(concurrency)))
        return done / (time.monotonic() - started)


async def batch(target: str, graph: str, path: Path, rows_per_request: int, concurrency: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, Store(str(Path(tmp) / "b.sqlite")) as store:
        config = BatchConfig(
            graph, path, rows_per_request=rows_per_request, concurrency=concurrency, progress="off"
        )
        async with OipClient(target) as client:
            summary = await BatchRunner(config, client, store).run()
        assert summary.failed == 0, summary.lines()
        return summary.rows_per_second


async def measure(args: argparse.Namespace) -> list[str]:
    images = load_holdout().images
    lines = ["| mode | shape | throughput |", "|---|---|---|"]
    for c in (1, 32):
        rate = await online(args.target, args.graph, images, c, args.seconds)
        lines.append(f"| online | 1 image per request, c={c} | {rate:.0f} requests/s (= rows/s) |")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.npz"
        repeats = max(1, args.rows // len(images))
        np.savez(path, image=np.tile(images, (repeats, 1, 1)))
        for rows, c in ((1, 32), (32, 4), (128, 4), (512, 2)):
            rate = await batch(args.target, args.graph, path, rows, c)
            lines.append(
                f"| batch | {rows} rows per request, {c} in flight | {rate:.0f} rows/s (SQLite writes included) |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probes.throughput", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:8001")
    parser.add_argument("--graph", default="digits-parallel")
    parser.add_argument("--rows", type=int, default=7200, help="batch rows (the held-out digits repeated)")
    parser.add_argument("--seconds", type=float, default=5.0, help="online measurement per concurrency")
    args = parser.parse_args(argv)
    print(f"{args.graph} @ {args.target}")
    print("\n".join(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
