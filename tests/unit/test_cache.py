"""Response caches: what is kept, what is served, what never is; graph and step caches, both stores."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from orchestrator.graph.engine import Engine
from orchestrator.spec import SpecError, parse_spec
from orchestrator.stages.cache import (
    Entry,
    LocalStore,
    ResponseCaches,
    decode_entry,
    encode_entry,
    request_key,
)
from services.common.errors import InvalidInput, Unavailable
from services.common.types import ModelSignature, TensorSpec
from tests.support import run
from tests.unit.fakes import FakeClock, FakeStage

HEADER = """
services:
  s: {address: "127.0.0.1:1"}
  t: {address: "127.0.0.1:2"}
graphs:
"""
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"]
    if (x < 0).any():
        raise InvalidInput("negative rows are not allowed")
    # Floats that are not round: a copy that went wrong anywhere would not be bit-equal.
    return {"y": (x * np.float32(2.0) / np.float32(3.0)).astype(np.float32), "z": x + 1}


def signature(versions: tuple[str, ...]) -> ModelSignature:
    x = (TensorSpec("x", "FP32", (-1, 4)),)
    y = (TensorSpec("y", "FP32", (-1, 4)), TensorSpec("z", "FP32", (-1, 4)))
    return ModelSignature("m", versions, "fake", x, y)


def engine(graph_yaml: str, stages: Mapping[str, FakeStage], clock: FakeClock | None = None) -> Engine:
    text = HEADER + "  g:\n" + "\n".join("    " + line for line in graph_yaml.strip("\n").splitlines())
    return Engine(parse_spec(text), stages, clock=clock or FakeClock())


GRAPH_CACHE = """
cache: {entries: 8, ttl: 30}
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}}
outputs: {y: a.y}
"""

STEP_CACHE = """
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}, cache: true}
outputs: {y: a.y}
"""

SOFT = """
cache: true
inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
steps:
  - {name: a, service: s, model: m, inputs: {x: request.x}}
  - {name: b, service: t, model: m, inputs: {x: request.x}, dependency: soft, retries: 0}
outputs: {y: a.y, z: b.z|a.z}
"""


async def ask(e: Engine, x: np.ndarray = X) -> Any:
    return await e.run("g", {"x": x}, deadline=None)


@pytest.mark.parametrize("graph", [GRAPH_CACHE, STEP_CACHE], ids=["graph cache", "step cache"])
def test_a_hit_is_bit_equal_and_makes_no_downstream_call(graph: str) -> None:
    fake = FakeStage({"m": double})
    e = engine(graph, {"s": fake, "t": FakeStage({})})

    async def scenario() -> tuple[Any, Any, Any]:
        first, second = await ask(e), await ask(e)
        other = await ask(e, X + 1)
        return first, second, other

    first, second, other = run(scenario())
    assert len(fake.calls) == 2  # the repeat was answered from the cache, the new input was not
    assert first.outputs["y"].tobytes() == second.outputs["y"].tobytes()
    assert first.outputs["y"].dtype == second.outputs["y"].dtype and first.outputs["y"].shape == (2, 4)
    assert other.outputs["y"].tobytes() == double({"x": X + 1})["y"].tobytes()
    assert second.parameters["version.a"] == "1" and second.parameters["step.a"] == "ok"


def test_a_graph_hit_says_so_in_the_parameters_and_counts_in_metrics() -> None:
    seen: list[tuple[str, str]] = []
    spec = parse_spec(
        HEADER + "  g:\n" + "\n".join("    " + line for line in GRAPH_CACHE.strip().splitlines())
    )
    stages = {"s": FakeStage({"m": double}), "t": FakeStage({})}
    caches = ResponseCaches(spec, stages, on_lookup=lambda name, result: seen.append((name, result)))
    e = Engine(spec, stages, caches=caches)

    async def scenario() -> tuple[Any, Any]:
        return await ask(e), await ask(e)

    first, second = run(scenario())
    assert "cache" not in first.parameters and second.parameters["cache"] == "hit"
    assert seen == [("g", "miss"), ("g", "hit")]


def test_cached_arrays_cannot_be_changed_by_whoever_got_them() -> None:
    fake = FakeStage({"m": double})
    e = engine(GRAPH_CACHE, {"s": fake, "t": FakeStage({})})

    async def scenario() -> Any:
        await ask(e)
        return await ask(e)

    hit = run(scenario())
    with pytest.raises(ValueError):
        hit.outputs["y"][0, 0] = 99.0


@pytest.mark.parametrize("graph", [GRAPH_CACHE, STEP_CACHE], ids=["graph cache", "step cache"])
def test_a_new_model_version_never_serves_an_old_answer(graph: str) -> None:
    fake = FakeStage({"m": double}, signatures={"m": signature(("1",))})
    e = engine(graph, {"s": fake, "t": FakeStage({})})

    async def scenario() -> list[Any]:
        answers = [await ask(e)]  # kept as version 1's answer
        fake.version = "2"  # the service now answers with version 2 ...
        answers.append(await ask(e, X + 5))  # ... and an answer from it reaches the cache
        answers.append(await ask(e))
        return answers

    v1, _, again = run(scenario())
    assert v1.parameters["version.a"] == "1"
    assert again.parameters["version.a"] == "2"
    assert len(fake.calls) == 3  # the old entry was a miss


def test_the_version_poll_retires_old_answers_with_no_new_answer_seen() -> None:
    clock = FakeClock()
    fake = FakeStage({"m": double}, signatures={"m": signature(("1",))})
    e = engine(GRAPH_CACHE, {"s": fake, "t": FakeStage({})}, clock)

    async def scenario() -> Any:
        await ask(e)
        await ask(e)
        assert len(fake.calls) == 1
        fake.version, fake.signatures["m"] = "2", signature(("1", "2"))
        clock.advance(5.0)  # past the poll interval: this lookup starts a metadata poll
        await ask(e)
        await asyncio.sleep(0)  # the poll runs
        await asyncio.sleep(0)  # (a second turn: the poll answers)
        return await ask(e)

    answer = run(scenario())
    assert answer.parameters["version.a"] == "2"


def test_a_soft_failed_answer_is_not_cached() -> None:
    good, flaky = FakeStage({"m": double}), FakeStage({"m": double})
    flaky.fail("m", Unavailable("replica gone"))
    e = engine(SOFT, {"s": good, "t": flaky})

    async def scenario() -> tuple[Any, Any, Any]:
        return await ask(e), await ask(e), await ask(e)

    degraded, whole, cached = run(scenario())
    assert degraded.parameters["step.b"].startswith("error: UNAVAILABLE")
    assert whole.parameters["step.b"] == "ok"  # the degraded answer was not served again
    assert "cache" not in whole.parameters and cached.parameters["cache"] == "hit"
    assert len(good.calls) == 2


@pytest.mark.parametrize("graph", [GRAPH_CACHE, STEP_CACHE], ids=["graph cache", "step cache"])
def test_errors_are_never_cached(graph: str) -> None:
    fake = FakeStage({"m": double})
    e = engine(graph, {"s": fake, "t": FakeStage({})})
    bad = -np.ones((1, 4), np.float32)

    async def scenario() -> list[BaseException]:
        errors: list[BaseException] = []
        for _ in range(2):
            try:
                await ask(e, bad)
            except InvalidInput as err:
                errors.append(err)
        return errors

    assert len(run(scenario())) == 2
    assert len(fake.calls) == 2


def test_entries_expire_after_their_ttl() -> None:
    clock = FakeClock()
    fake = FakeStage({"m": double})
    e = engine(GRAPH_CACHE, {"s": fake, "t": FakeStage({})}, clock)

    async def scenario() -> None:
        await ask(e)
        clock.advance(29.0)
        await ask(e)
        clock.advance(2.0)  # 31 s after it was kept: ttl 30
        await ask(e)

    run(scenario())
    assert len(fake.calls) == 2


def entry(value: float, rows: int = 1, expires: float = 1e9) -> Entry:
    return Entry({"y": np.full((rows, 4), value, np.float32)}, ((("s", "m", ""), "1"),), {}, expires)


def test_the_local_store_is_bounded_in_entries_and_bytes_least_recently_used_first() -> None:
    store = LocalStore(entries=2, max_bytes=1000)

    async def scenario() -> list[bool]:
        await store.put(b"a", entry(1.0))
        await store.put(b"b", entry(2.0))
        await store.get(b"a")  # a is now the most recently used
        await store.put(b"c", entry(3.0))  # over 2 entries: b goes
        kept = [await store.get(k) is not None for k in (b"a", b"b", b"c")]
        await store.put(b"big", entry(4.0, rows=40))  # 640 bytes: a and c (16 each) fit beside it
        await store.put(b"bigger", entry(5.0, rows=50))  # 800 bytes more: over 1000, the oldest go
        await store.put(b"huge", entry(6.0, rows=100))  # 1600 bytes alone: never kept
        return [*kept, await store.get(b"bigger") is not None, await store.get(b"huge") is None]

    assert run(scenario()) == [True, False, True, True, True]
    assert store.bytes <= 1000 and len(store) <= 2


def test_keys_tell_apart_model_version_outputs_and_every_tensor_detail() -> None:
    x = np.zeros((1, 4), np.float32)
    base = request_key("m", "", ("y",), {"x": x})
    assert base == request_key("m", "", ("y",), {"x": x.copy()})
    others = [
        request_key("n", "", ("y",), {"x": x}),
        request_key("m", "2", ("y",), {"x": x}),
        request_key("m", "", ("z",), {"x": x}),
        request_key("m", "", ("y",), {"w": x}),
        request_key("m", "", ("y",), {"x": x.reshape(2, 2)}),
        request_key("m", "", ("y",), {"x": x.view(np.int32)}),
        request_key("m", "", ("y",), {"x": x + 1}),
    ]
    assert len({base, *others}) == len(others) + 1


def test_an_encoded_entry_decodes_to_the_same_arrays() -> None:
    original = entry(2.5, rows=3)
    decoded = decode_entry(encode_entry(original), original.expires)
    assert decoded.outputs["y"].tobytes() == original.outputs["y"].tobytes()


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ("cache: {entries: 0}", "entries must be a positive integer"),
        ("cache: {ttl: -1}", "ttl must be a positive number"),
        ("cache: {tll: 3}", "unknown key 'tll' in cache (did you mean 'ttl'?)"),
        ("cache: 3", "cache must be a mapping"),
    ],
)
def test_bad_cache_options_say_what_was_expected(cache: str, message: str) -> None:
    graph = GRAPH_CACHE.replace("cache: {entries: 8, ttl: 30}", cache)
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(HEADER + "  g:\n" + "\n".join("    " + line for line in graph.strip().splitlines()))


def test_cache_options_parse_per_graph_and_per_step() -> None:
    spec = parse_spec(
        HEADER + "  g:\n" + "\n".join("    " + line for line in STEP_CACHE.strip().splitlines())
    )
    step = next(spec.graphs["g"].model_steps())
    assert spec.graphs["g"].cache is None and step.cache is not None and step.cache.ttl == 60.0
    with pytest.raises(SpecError, match="cache_store must be 'local' or a redis"):
        parse_spec("cache_store: memcached://x\n" + HEADER + "  g:\n    inputs: []\n")
