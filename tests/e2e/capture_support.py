"""What the capture and drift tests share: requests sent one image each, records counted in the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from jobs.store import Store
from services.common.grpc.client import OipClient


def send(
    address: str, graph: str, images: list[np.ndarray], concurrency: int = 8, prefix: str = "r"
) -> list[dict[str, np.ndarray]]:
    """Each image as its own request (request id "<prefix><i>"); the answers in order."""

    async def run() -> list[dict[str, np.ndarray]]:
        gate = asyncio.Semaphore(concurrency)
        async with OipClient(address) as client:

            async def one(i: int, image: np.ndarray) -> dict[str, np.ndarray]:
                async with gate:
                    result = await client.infer(
                        graph, {"image": image[None]}, timeout=20, request_id=f"{prefix}{i}"
                    )
                return dict(result.outputs)

            return list(await asyncio.gather(*(one(i, im) for i, im in enumerate(images))))

    return asyncio.run(run())


def count(db: Path, graph: str, step: str = "") -> int:
    with Store(str(db)) as store:
        return len(store.read_captures(graph=graph, step=step))
