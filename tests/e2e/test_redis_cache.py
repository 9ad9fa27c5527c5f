"""The Redis response cache against a real redis-server, started by the tests on a free port.

Entries travel bit-equal with their TTL; a server that goes away mid-run turns every lookup into a
miss and every store into a no-op, never a failed request, both for the store alone and for a
running orchestrator whose spec names the server (`cache_store: redis://...`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from demo.digits import load_holdout
from meshctl.launcher import DEMO_MESH, EPHEMERAL_PORTS, LocalMesh
from orchestrator.stages.cache import HIT, Entry, RedisStore
from services.common.grpc.client import OipClient
from tests.support import RedisServer, redis_server, run

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


def entry(store: RedisStore, ttl: float = 30.0) -> Entry:
    return Entry(
        {"y": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "label": np.arange(3, dtype=np.int64)},
        ((("s", "m", ""), "7"),),
        {"step.a": "ok", "version.a": "7"},
        store.clock() + ttl,
    )


def test_entries_travel_through_redis_bit_equal(server: RedisServer) -> None:
    store = RedisStore(server.url, max_bytes=1 << 20)
    original = entry(store)

    async def scenario() -> tuple[Entry | None, Entry | None]:
        try:
            await store.put(b"k", original)
            return await store.get(b"k"), await store.get(b"other")
        finally:
            await store.close()

    found, missing = run(scenario())
    assert missing is None and found is not None
    for name, array in original.outputs.items():
        assert found.outputs[name].tobytes() == array.tobytes() and found.outputs[name].dtype == array.dtype
    assert found.answered == original.answered and dict(found.parameters) == dict(original.parameters)
    assert abs(found.expires - original.expires) < 5.0  # Redis keeps the TTL (seconds, not exact)
    with redis.Redis(port=server.port) as direct:
        assert 25_000 < direct.pttl(RedisStore.PREFIX + b"k") <= 30_000  # stored with PX, Redis expires it


def test_a_store_gone_mid_run_is_a_miss_and_stores_nothing(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(server.url, max_bytes=1 << 20)

    async def scenario() -> tuple[Entry | None, Entry | None]:
        try:
            await store.put(b"k", entry(store))
            before = await store.get(b"k")
            server.stop()
            await store.put(b"k2", entry(store))  # no exception: nothing is stored
            return before, await store.get(b"k")
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="orchestrator.stages.cache"):
        before, after = run(scenario())
    assert before is not None and after is None
    assert caplog.text.count("cache store unreachable") >= 2  # the put and the get, each said so


def test_the_orchestrator_answers_without_its_redis_cache(server: RedisServer, tmp_path: Path) -> None:
    spec = yaml.safe_load(DEMO_MESH.read_text())
    spec["cache_store"] = server.url
    spec["graphs"]["digits-serial"]["cache"] = True
    path = tmp_path / "graphs.yaml"
    path.write_text(yaml.safe_dump(spec))
    holdout = load_holdout()
    images, labels = holdout.images[:8], holdout.labels[:8]

    async def ask(address: str) -> list[tuple[int, str]]:
        async with OipClient(address) as client:
            answers = []
            for i in range(len(images)):
                result = await client.infer("digits-serial", {"image": images[i : i + 1]}, timeout=10.0)
                answers.append((int(result.outputs["label"][0]), str(result.parameters.get("cache", ""))))
            return answers

    with LocalMesh(ports=EPHEMERAL_PORTS, graphs=path) as mesh:
        address = mesh.address("orchestrator")
        first = asyncio.run(ask(address))
        cached = asyncio.run(ask(address))
        with redis.Redis(port=server.port) as direct:
            stored = len(direct.keys(RedisStore.PREFIX + b"*"))
        server.stop()
        without = asyncio.run(ask(address))
    assert stored >= 1
    assert [hit for _, hit in first] == [""] * len(images) and [hit for _, hit in cached] == [HIT] * len(
        images
    )
    # Gone: every request still answered, by the graph itself, the same labels.
    assert [hit for _, hit in without] == [""] * len(images)
    assert [label for label, _ in first] == [label for label, _ in cached] == [label for label, _ in without]
    assert sum(label == expected for (label, _), expected in zip(first, labels, strict=True)) >= 6
