"""Stacking shared by batching and coalescing: layouts, stacking, splitting, and who gets which failure."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
import pytest

from services.common.batching import stacking
from services.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    MeshError,
    ResourceExhausted,
    Unavailable,
)
from services.common.types import InferRequest, InferResult


def request(
    x: np.ndarray, outputs: tuple[str, ...] = (), request_id: str = "", deadline: float | None = None
) -> InferRequest:
    return InferRequest("m", {"x": x}, outputs, version="1", request_id=request_id, deadline=deadline)


def block(value: float, n: int, width: int = 3) -> np.ndarray:
    return np.full((n, width), value, dtype=np.float32)


def test_layout_is_names_dtypes_and_non_batch_dims() -> None:
    a = stacking.layout({"x": block(1, 2), "w": np.zeros((2,), np.int64)})
    b = stacking.layout({"w": np.ones((5,), np.int64), "x": block(2, 5)})
    assert a is not None and b is not None
    assert a[0] == b[0] and (a[1], b[1]) == (2, 5)
    assert a[0] == (("w", np.dtype(np.int64), ()), ("x", np.dtype(np.float32), (3,)))
    assert stacking.layout({"x": block(1, 2, width=4)}) != stacking.layout({"x": block(1, 2)})
    assert stacking.layout({"y": block(1, 2)}) != stacking.layout({"x": block(1, 2)})


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"x": np.array(1.0, dtype=np.float32)},
        {"x": block(1, 2), "w": block(1, 3)},
        {"x": block(1, 0)},
    ],
    ids=["no-inputs", "scalar", "ragged", "no-rows"],
)
def test_what_cannot_be_stacked_has_no_layout(inputs: Mapping[str, np.ndarray]) -> None:
    assert stacking.layout(inputs) is None


def test_bytes_tensors_stack_unless_excluded() -> None:
    strings = {"s": np.array([b"a", b"b"], dtype=np.object_)}
    assert stacking.layout(strings) is not None
    assert stacking.layout(strings, bytes_tensors=False) is None


def test_stack_joins_rows_in_order_and_keeps_what_every_caller_needs() -> None:
    stacked = stacking.stack(
        [
            request(block(1, 1), ("y",), "a", deadline=10.0),
            request(block(2, 2), ("z", "y"), "", deadline=30.0),
            request(block(3, 1), ("z",), "c", deadline=20.0),
        ]
    )
    np.testing.assert_array_equal(stacked.inputs["x"][:, 0], [1, 2, 2, 3])
    assert stacked.outputs == ("y", "z")
    assert (stacked.model, stacked.version, stacked.request_id, stacked.deadline) == ("m", "1", "a,c", 30.0)
    everything = stacking.stack([request(block(1, 1), ("y",)), request(block(2, 1), (), deadline=5.0)])
    assert everything.outputs == () and everything.deadline is None


def test_split_gives_each_request_its_rows_and_only_its_outputs() -> None:
    requests = [request(block(1, 1), ("y",)), request(block(2, 2)), request(block(3, 1), ("z",))]
    x = stacking.stack(requests).inputs["x"]
    result = InferResult({"y": x * 2, "z": x + 1}, "m", "1", {"p": 1})
    assert stacking.misaligned(result.outputs, 4) is None
    parts = stacking.split(result, requests, [1, 2, 1])
    assert [set(p.outputs) for p in parts] == [{"y"}, {"y", "z"}, {"z"}]
    np.testing.assert_array_equal(parts[0].outputs["y"], block(2, 1))
    np.testing.assert_array_equal(parts[1].outputs["z"], block(3, 2))
    np.testing.assert_array_equal(parts[2].outputs["z"], block(4, 1))
    assert all((p.model_name, p.model_version, p.parameters) == ("m", "1", {"p": 1}) for p in parts)
    parts[0].parameters["p"] = 2
    assert parts[1].parameters == {"p": 1}  # each answer owns its parameters


def test_an_answer_without_one_row_per_stacked_row_is_misaligned() -> None:
    assert stacking.misaligned({"y": np.zeros((4, 3)), "n": np.zeros((1,))}, 4) == "n"
    assert stacking.misaligned({"y": np.zeros(())}, 4) == "y"


@pytest.mark.parametrize(
    ("error", "is_shared"),
    [
        (Unavailable("down"), True),
        (DeadlineExceeded("late"), True),
        (ResourceExhausted("full"), True),
        (Cancelled("gone"), True),
        (InvalidInput("bad row"), False),
        (MeshError("bug downstream"), False),
        (ValueError("model code"), False),
    ],
)
def test_which_failures_are_shared(error: Exception, is_shared: bool) -> None:
    assert stacking.shared(error) is is_shared


class Doubler:
    """A shared call: y = 2x, z = x + 1; rejects any call holding a negative row."""

    def __init__(self, error: Exception | None = None, rows_out: int | None = None) -> None:
        self.calls: list[int] = []
        self.error = error
        self.rows_out = rows_out

    async def __call__(self, req: InferRequest) -> InferResult:
        x = req.inputs["x"]
        self.calls.append(len(x))
        if self.error is not None and len(self.calls) == 1:
            raise self.error
        if (x < 0).any():
            raise InvalidInput("negative rows are not allowed")
        y = x * 2 if self.rows_out is None or len(self.calls) > 1 else (x * 2)[: self.rows_out]
        answers = {"y": y, "z": x + 1}
        return InferResult({name: answers[name] for name in req.outputs or answers}, "m", "1")


def run_stacked(
    requests: list[InferRequest], call: Doubler
) -> tuple[stacking.Outcome, dict[int, InferResult | BaseException]]:
    answers: dict[int, InferResult | BaseException] = {}

    def answer(index: int, value: InferResult | BaseException) -> None:
        assert index not in answers, "answered twice"
        answers[index] = value

    outcome = asyncio.run(stacking.run_stacked(requests, call, answer))
    assert sorted(answers) == list(range(len(requests)))
    return outcome, answers


def test_one_call_answers_every_request_with_its_own_rows() -> None:
    requests = [request(block(float(i), 1 + i % 3), ("y",) if i % 2 else ()) for i in range(6)]
    call = Doubler()
    outcome, answers = run_stacked(requests, call)
    assert outcome == stacking.Outcome(together=True)
    assert call.calls == [sum(1 + i % 3 for i in range(6))]
    for i, req in enumerate(requests):
        got = answers[i]
        assert isinstance(got, InferResult)
        np.testing.assert_array_equal(got.outputs["y"], req.inputs["x"] * 2)
        assert set(got.outputs) == ({"y"} if i % 2 else {"y", "z"})


def test_a_bad_request_fails_alone_and_the_others_succeed() -> None:
    requests = [request(block(1, 2)), request(block(-1, 1)), request(block(3, 1))]
    call = Doubler()
    outcome, answers = run_stacked(requests, call)
    assert not outcome.together and isinstance(outcome.error, InvalidInput)
    assert call.calls == [4, 2, 1, 1]  # the stacked call, then each alone
    assert isinstance(answers[1], InvalidInput)
    for i in (0, 2):
        got = answers[i]
        assert isinstance(got, InferResult)
        np.testing.assert_array_equal(got.outputs["y"], requests[i].inputs["x"] * 2)


def test_a_shared_failure_reaches_every_caller_without_running_anyone_alone() -> None:
    call = Doubler(error=Unavailable("replica gone"))
    outcome, answers = run_stacked([request(block(1, 1)), request(block(2, 1))], call)
    assert outcome.together and isinstance(outcome.error, Unavailable)
    assert call.calls == [2]
    assert all(answers[i] is outcome.error for i in (0, 1))


def test_a_misaligned_answer_is_never_split_each_runs_alone() -> None:
    requests = [request(block(1, 2)), request(block(2, 1))]
    call = Doubler(rows_out=1)
    outcome, answers = run_stacked(requests, call)
    assert outcome == stacking.Outcome(together=False, misaligned="y")
    assert call.calls == [3, 2, 1]
    for i, req in enumerate(requests):
        got = answers[i]
        assert isinstance(got, InferResult)
        np.testing.assert_array_equal(got.outputs["y"], req.inputs["x"] * 2)


def test_cancellation_propagates_and_leaves_the_unanswered_to_the_caller() -> None:
    async def hang(req: InferRequest) -> InferResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    answers: list[int] = []

    async def scenario() -> None:
        task = asyncio.create_task(
            stacking.run_stacked(
                [request(block(1, 1)), request(block(2, 1))], hang, lambda i, _: answers.append(i)
            )
        )
        await asyncio.sleep(0)  # one loop turn: the batch is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert answers == []
