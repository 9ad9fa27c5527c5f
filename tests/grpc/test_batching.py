"""Adaptive batching through a real in-process server: every caller gets exactly its own rows.

Each test serves a `BatchingModel` from a `MeshServer` on 127.0.0.1:0 and calls it with the
`OipClient`. Tests that need requests to share (or not share) a batch line them up
deterministically instead of relying on timing: the inner model is a test double whose
`predict` waits at a `Gate`; one "blocker" request holds the only batch slot while the
others queue up, then the gate opens and the next batch takes whatever waits.
No assertion is about time; every wait is bounded by TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from services.common.batching.adaptive import BatchingModel
from services.common.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from services.common.grpc.client import OipClient
from services.common.model import Model
from services.common.onnx_model import OnnxModel
from services.common.repository import ModelConfig, ModelRepository
from services.common.server import MeshServer
from services.common.settings import ServerSettings
from services.common.types import InferRequest, InferResult, ModelSignature, TensorSpec
from tests.support import run, until_async

REPO = Path(__file__).resolve().parents[2]
MLP = REPO / "services/model_a/models/digits-mlp/1/model.onnx"
MLP_OUTPUTS = {"probabilities", "embedding"}
TIMEOUT = 30.0
SENTINEL = -999.0


@contextlib.asynccontextmanager
async def serving(*servables: BatchingModel) -> AsyncIterator[OipClient]:
    server = MeshServer(ServerSettings(service="test", host="127.0.0.1", port=0), ModelRepository(servables))
    try:
        port = await server.start()
        await server.load()
        async with OipClient(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        await server.stop(0)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-infer")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


# -- test doubles -------------------------------------------------------------------------


class Gate:
    """Holds every `predict` while shut and records the input shape of each call."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.calls: list[tuple[int, ...]] = []

    def shut(self) -> None:
        self.calls.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def enter(self, shape: tuple[int, ...]) -> None:
        self.calls.append(shape)
        if not self._open.wait(TIMEOUT):
            raise TimeoutError("the test never opened the gate")


class GatedMlp(OnnxModel):
    """Test double: digits-mlp, whose predict waits at a gate."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        super().__init__("digits-mlp", "1", MLP, executor)
        self.gate = Gate()

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.gate.enter(inputs["features"].shape)
        return super().predict(inputs, outputs)


class SentinelModel(Model):
    """Test double: `double` = 2x and `total` = row sums of x FP32[-1, -1]; a batch that
    holds SENTINEL anywhere is rejected as a whole with InvalidInput; waits at a gate."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        super().__init__("sentinel", "1", executor)
        self.gate = Gate()

    def load_sync(self) -> None:
        self.signature = ModelSignature(
            self.name,
            (self.version,),
            "python",
            (TensorSpec("x", "FP32", (-1, -1)),),
            (TensorSpec("double", "FP32", (-1, -1)), TensorSpec("total", "FP32", (-1,))),
        )

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.gate.enter(x.shape)
        if (x == SENTINEL).any():
            raise InvalidInput(f"model '{self.name}': a row holds the sentinel value {SENTINEL}")
        answers = {"double": x * 2, "total": x.sum(axis=1)}
        return {name: answers[name] for name in outputs or answers}


def fixed_batch_onnx(path: Path) -> Path:
    """y = x + 1 with x FP32[4, 3]: the first dimension is fixed, so rows cannot be stacked."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "fixed-batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # what the pinned onnxruntime reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def batching(
    model: Model, *, max_batch_size: int = 32, delay_ms: float = 1.0, **kwargs: Any
) -> BatchingModel:
    config = ModelConfig(max_batch_size=max_batch_size, max_queue_delay_ms=delay_ms, **kwargs)
    # One batch at a time, so a gated batch holds back everything queued behind it.
    return BatchingModel(model, config, max_concurrent_batches=1)


async def lined_up(
    model: BatchingModel,
    gate: Gate,
    client: OipClient,
    blocker: Mapping[str, np.ndarray],
    calls: Sequence[Callable[[], Coroutine[Any, Any, InferResult]]],
    rows: int,
) -> list[InferResult | BaseException]:
    """Run `calls` (`rows` rows in all) so that they all wait in the queue together before
    any batch takes them; returns their results or errors in order."""
    gate.shut()
    try:
        held = asyncio.create_task(client.infer(model.name, blocker))
        await until_async(lambda: len(gate.calls) == 1)  # the blocker is inside predict
        tasks = [asyncio.create_task(call()) for call in calls]
        await until_async(lambda: model.queued_rows == rows)
    finally:
        gate.open()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


# -- tests --------------------------------------------------------------------------------


def test_concurrent_callers_each_get_exactly_their_own_rows(executor: ThreadPoolExecutor) -> None:
    reference = OnnxModel("reference", "1", MLP, executor)
    reference.load_sync()
    # A generous delay lets the 40 calls meet in a few batches without asserting anything about time.
    model = BatchingModel(
        OnnxModel("digits-mlp", "1", MLP, executor), ModelConfig(max_batch_size=32, max_queue_delay_ms=100)
    )
    rng = np.random.default_rng(7)
    inputs = [rng.normal(size=(i % 7 + 1, 64)).astype(np.float32) for i in range(40)]

    async def main() -> list[InferResult]:
        async with serving(model) as client:
            return await asyncio.gather(*(client.infer("digits-mlp", {"features": x}) for x in inputs))

    results = run(main())
    for x, result in zip(inputs, results, strict=True):
        want = reference.predict({"features": x}, ())
        assert set(result.outputs) == MLP_OUTPUTS
        for name in MLP_OUTPUTS:
            assert result.outputs[name].shape[0] == x.shape[0]
            np.testing.assert_allclose(result.outputs[name], want[name], rtol=1e-5, atol=1e-6)
    assert model.requests_run == len(inputs)
    assert model.rows_run == sum(len(x) for x in inputs)
    assert 1 <= model.batches_run < len(inputs), "no two requests shared a batch"


def test_each_caller_gets_only_the_outputs_it_asked_for_within_one_batch(
    executor: ThreadPoolExecutor,
) -> None:
    reference = OnnxModel("reference", "1", MLP, executor)
    reference.load_sync()
    inner = GatedMlp(executor)
    model = batching(inner)
    rng = np.random.default_rng(11)
    asks: list[tuple[str, ...]] = [("probabilities",), ("embedding",), (), ("embedding", "probabilities")]
    inputs = [rng.normal(size=(i + 1, 64)).astype(np.float32) for i in range(len(asks))]

    async def main() -> list[InferResult | BaseException]:
        async with serving(model) as client:
            return await lined_up(
                model,
                inner.gate,
                client,
                {"features": np.zeros((1, 64), np.float32)},
                [
                    partial(client.infer, "digits-mlp", {"features": x}, ask)
                    for x, ask in zip(inputs, asks, strict=True)
                ],
                sum(len(x) for x in inputs),
            )

    results = run(main())
    # The blocker alone, then one batch holding every caller.
    assert inner.gate.calls == [(1, 64), (sum(len(x) for x in inputs), 64)]
    for x, ask, result in zip(inputs, asks, results, strict=True):
        assert isinstance(result, InferResult), result
        assert set(result.outputs) == (set(ask) or MLP_OUTPUTS)
        want = reference.predict({"features": x}, ())
        for name, got in result.outputs.items():
            np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6)


def test_a_bad_request_fails_alone_and_its_batch_mates_succeed(executor: ThreadPoolExecutor) -> None:
    inner = SentinelModel(executor)
    model = batching(inner)
    good_a = np.arange(6, dtype=np.float32).reshape(2, 3)
    bad = np.array([[1, 2, 3], [4, SENTINEL, 6]], dtype=np.float32)
    good_b = np.arange(6, 12, dtype=np.float32).reshape(2, 3)

    async def main() -> tuple[list[InferResult | BaseException], InferResult, bool]:
        async with serving(model) as client:
            results = await lined_up(
                model,
                inner.gate,
                client,
                {"x": np.zeros((1, 3), np.float32)},
                [partial(client.infer, "sentinel", {"x": x}) for x in (good_a, bad, good_b)],
                6,
            )
            # The server still answers normally afterwards.
            after = await client.infer("sentinel", {"x": good_a})
            return results, after, await client.model_ready("sentinel")

    (result_a, error, result_b), after, ready = run(main())
    assert isinstance(error, InvalidInput)
    assert error.code == "INVALID_ARGUMENT"
    assert "sentinel" in error.message
    for x, result in ((good_a, result_a), (good_b, result_b), (good_a, after)):
        assert isinstance(result, InferResult), result
        np.testing.assert_array_equal(result.outputs["double"], x * 2)
        np.testing.assert_array_equal(result.outputs["total"], x.sum(axis=1))
    assert ready
    assert model.failed_batches == 1
    # Blocker, the failed batch of all three, then each of them alone.
    assert inner.gate.calls[:2] == [(1, 3), (6, 3)]
    assert sorted(inner.gate.calls[2:5]) == [(2, 3)] * 3


def test_requests_with_different_non_batch_dims_go_in_separate_batches(
    executor: ThreadPoolExecutor,
) -> None:
    inner = SentinelModel(executor)
    model = batching(inner)
    inputs = [np.full((2, width), i, dtype=np.float32) for i, width in enumerate((3, 5, 3, 5))]

    async def main() -> list[InferResult | BaseException]:
        async with serving(model) as client:
            return await lined_up(
                model,
                inner.gate,
                client,
                {"x": np.zeros((1, 3), np.float32)},
                [partial(client.infer, "sentinel", {"x": x}, ["double"]) for x in inputs],
                8,
            )

    results = run(main())
    for x, result in zip(inputs, results, strict=True):
        assert isinstance(result, InferResult), result
        assert set(result.outputs) == {"double"}
        np.testing.assert_array_equal(result.outputs["double"], x * 2)
    assert inner.gate.calls[0] == (1, 3)
    assert sorted(inner.gate.calls[1:]) == [(4, 3), (4, 5)]


def test_a_request_larger_than_max_batch_size_runs_alone(executor: ThreadPoolExecutor) -> None:
    inner = SentinelModel(executor)
    model = batching(inner, max_batch_size=4)
    big = np.ones((6, 3), dtype=np.float32)
    small = np.full((1, 3), 2, dtype=np.float32)

    async def main() -> tuple[InferResult, InferResult]:
        async with serving(model) as client:
            return await client.infer("sentinel", {"x": big}), await client.infer("sentinel", {"x": small})

    big_result, small_result = run(main())
    np.testing.assert_array_equal(big_result.outputs["double"], big * 2)
    np.testing.assert_array_equal(small_result.outputs["double"], small * 2)
    assert (model.batches_run, model.rows_run) == (2, 7)


def test_a_full_queue_answers_resource_exhausted_at_once(executor: ThreadPoolExecutor) -> None:
    inner = SentinelModel(executor)
    model = batching(inner, max_batch_size=2, max_queue_size=3)
    row = np.ones((1, 3), dtype=np.float32)

    async def main() -> tuple[BaseException | None, list[InferResult], InferResult]:
        async with serving(model) as client:
            inner.gate.shut()
            try:
                held = asyncio.create_task(client.infer("sentinel", {"x": row}))
                await until_async(lambda: len(inner.gate.calls) == 1)
                queued = [asyncio.create_task(client.infer("sentinel", {"x": row})) for _ in range(3)]
                await until_async(lambda: model.queued_rows == 3)
                refused: BaseException | None = None
                try:
                    await client.infer("sentinel", {"x": row})
                except ResourceExhausted as err:
                    refused = err
            finally:
                inner.gate.open()
            answered = await asyncio.gather(held, *queued)
            return refused, answered, await client.infer("sentinel", {"x": row})

    refused, answered, after = run(main())
    assert isinstance(refused, ResourceExhausted)
    assert refused.code == "RESOURCE_EXHAUSTED"
    assert "queue is full" in refused.message and "max_queue_size 3" in refused.message
    for result in [*answered, after]:
        np.testing.assert_array_equal(result.outputs["double"], row * 2)


def test_a_model_with_a_fixed_first_dim_is_never_batched(
    executor: ThreadPoolExecutor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = BatchingModel(
        OnnxModel("fixed", "1", fixed_batch_onnx(tmp_path / "model.onnx"), executor),
        ModelConfig(max_batch_size=8, max_queue_delay_ms=50),
    )
    inputs = [np.full((4, 3), i, dtype=np.float32) for i in range(10)]

    async def main() -> list[InferResult]:
        async with serving(model) as client:
            return await asyncio.gather(*(client.infer("fixed", {"x": x}) for x in inputs))

    with caplog.at_level(logging.WARNING, logger="services.common.batching.adaptive"):
        results = run(main())
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], x + 1)
    assert not model.batching
    assert (model.batches_run, model.rows_run) == (0, 0)
    warnings = [r for r in caplog.records if "fixed first dimension" in r.getMessage()]
    assert len(warnings) == 1


def test_a_caller_that_leaves_is_dropped_before_its_batch_runs(executor: ThreadPoolExecutor) -> None:
    inner = SentinelModel(executor)
    model = batching(inner)
    leaving = np.full((3, 3), 7, dtype=np.float32)
    staying = np.full((2, 3), 8, dtype=np.float32)

    async def main() -> tuple[BaseException | None, InferResult]:
        async with serving(model) as client:
            inner.gate.shut()
            try:
                held = asyncio.create_task(client.infer("sentinel", {"x": staying[:1]}))
                await until_async(lambda: len(inner.gate.calls) == 1)
                gone = asyncio.create_task(client.infer("sentinel", {"x": leaving}))
                await until_async(lambda: model.queued_rows == 3)
                gone.cancel()  # the client goes away; the server sees the call cancelled
                await until_async(lambda: model.queued_rows == 0)
                stays = asyncio.create_task(client.infer("sentinel", {"x": staying}))
                await until_async(lambda: model.queued_rows == 2)
            finally:
                inner.gate.open()
            await held
            left: BaseException | None = None
            try:
                await gone
            except asyncio.CancelledError as err:
                left = err
            return left, await stays

    left, stayed = run(main())
    assert isinstance(left, asyncio.CancelledError)
    np.testing.assert_array_equal(stayed.outputs["double"], staying * 2)
    assert (3, 3) not in inner.gate.calls and (5, 3) not in inner.gate.calls
    assert inner.gate.calls == [(1, 3), (2, 3)]


def test_a_request_whose_deadline_passed_is_not_run(executor: ThreadPoolExecutor) -> None:
    inner = SentinelModel(executor)
    model = batching(inner)
    late = np.full((3, 3), 5, dtype=np.float32)

    async def main() -> tuple[BaseException | None, BaseException | None]:
        async with serving(model) as client:
            # Already too late on arrival: refused without queueing.
            expired: BaseException | None = None
            try:
                await model.infer(InferRequest("sentinel", {"x": late}, deadline=time.monotonic() - 1))
            except DeadlineExceeded as err:
                expired = err
            inner.gate.shut()
            try:
                held = asyncio.create_task(client.infer("sentinel", {"x": late[:1]}))
                await until_async(lambda: len(inner.gate.calls) == 1)
                deadline = time.monotonic() + 0.05
                waiting = asyncio.create_task(
                    model.infer(InferRequest("sentinel", {"x": late}, deadline=deadline))
                )
                await until_async(lambda: time.monotonic() > deadline)
            finally:
                inner.gate.open()
            await held
            timed_out: BaseException | None = None
            try:
                await waiting
            except DeadlineExceeded as err:
                timed_out = err
            return expired, timed_out

    expired, timed_out = run(main())
    assert isinstance(expired, DeadlineExceeded)
    assert isinstance(timed_out, DeadlineExceeded)
    assert inner.gate.calls == [(1, 3)], "a request past its deadline ran"


def rows_onnx(path: Path) -> Path:
    """y = x reshaped to [n, 2, -1], x FP32[n, 4]: a Reshape that onnxruntime refuses on zero rows."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "k"])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [3], [0, 2, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_zero_rows_answer_zero_rows_without_running_the_model(
    executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    # A step upstream that finds nothing (no text boxes on a page) sends an empty batch on.
    model = batching(OnnxModel("rows", "1", rows_onnx(tmp_path / "model.onnx"), executor))

    async def main() -> tuple[InferResult, InferResult]:
        async with serving(model) as client:
            empty = await client.infer("rows", {"x": np.zeros((0, 4), np.float32)})
            full = await client.infer("rows", {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
            return empty, full

    empty, full = run(main())
    assert empty.outputs["y"].shape[:2] == (0, 2)
    assert empty.outputs["y"].dtype == np.float32
    np.testing.assert_array_equal(full.outputs["y"], np.arange(8, dtype=np.float32).reshape(2, 2, 2))
