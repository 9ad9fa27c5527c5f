"""Models of microseconds run inline on the event loop; slower ones, and ones that turn slow, on the executor."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.common.model import INLINE_BELOW_S, Model
from services.common.types import InferRequest, ModelSignature, TensorSpec

SIGNATURE = ModelSignature(
    "m", ("1",), "test", (TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 2)),)
)


class ThreadRecordingModel(Model):
    """A test double that records the thread each predict ran on and sleeps `seconds` per call."""

    def __init__(self, executor: ThreadPoolExecutor, seconds: float) -> None:
        super().__init__("m", "1", executor)
        self.signature = SIGNATURE
        self.seconds = seconds
        self.threads: list[int] = []

    def load_sync(self) -> None:
        pass

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        if self.seconds:
            time.sleep(self.seconds)
        return {"y": inputs["x"] * 2}


def calls_on_the_loop(seconds: float, calls: int = 3) -> tuple[list[bool], ThreadRecordingModel]:
    with ThreadPoolExecutor(1) as executor:
        model = ThreadRecordingModel(executor, seconds)

        async def scenario() -> list[bool]:
            await model.load()
            loop_thread = threading.get_ident()
            model.threads.clear()
            request = InferRequest("m", {"x": np.ones((1, 2), np.float32)})
            for _ in range(calls):
                result = await model.infer(request)
                np.testing.assert_array_equal(result.outputs["y"], np.full((1, 2), 2.0))
            return [thread == loop_thread for thread in model.threads]

        return asyncio.run(scenario()), model


def test_a_model_of_microseconds_runs_inline() -> None:
    inline, model = calls_on_the_loop(0.0)
    assert inline == [True, True, True]
    assert model.row_seconds < INLINE_BELOW_S


def test_a_slower_model_runs_on_the_executor() -> None:
    inline, _ = calls_on_the_loop(INLINE_BELOW_S * 5)
    assert inline == [False, False, False]


def test_a_model_that_turns_slow_moves_to_the_executor() -> None:
    with ThreadPoolExecutor(1) as executor:
        model = ThreadRecordingModel(executor, 0.0)

        async def scenario() -> list[bool]:
            await model.load()
            loop_thread = threading.get_ident()
            model.seconds = INLINE_BELOW_S * 50  # its warm-up said microseconds; now it takes 10 ms
            model.threads.clear()
            for _ in range(30):
                await model.infer(InferRequest("m", {"x": np.ones((1, 2), np.float32)}))
            return [thread == loop_thread for thread in model.threads]

        on_loop = asyncio.run(scenario())
    assert on_loop[0] and not on_loop[-1]
    assert sum(on_loop) <= 3  # a few inline calls at most before it moved


def test_many_rows_of_a_fast_model_go_to_the_executor() -> None:
    with ThreadPoolExecutor(1) as executor:
        model = ThreadRecordingModel(executor, 0.0)

        async def scenario() -> bool:
            await model.load()
            model.row_seconds = INLINE_BELOW_S / 10  # 10 rows fill the inline budget
            model.threads.clear()
            await model.infer(InferRequest("m", {"x": np.ones((100, 2), np.float32)}))
            return model.threads[0] == threading.get_ident()

        assert asyncio.run(scenario()) is False
