"""Stacking: the rows of several requests in one call, and each caller's rows back out of it.

Two places stack requests: adaptive batching (`services.common.batching.adaptive`, a model service
joining queued requests into one `predict`) and coalescing (`orchestrator.stages.coalescing`, the
orchestrator joining concurrent calls of a step into one downstream call). Both rely on what
this module holds, so that they cannot drift apart:

    requests --layout()--> same layout --stack()--> one call ---> split() --> each caller's rows
                                                       |            | not one row per stacked row
                                                       | fails      v
                                                       +--shared()? -- no --> each request alone
                                                            | yes
                                                            v
                                                  every caller gets the error

`run_stacked` is that whole flow. Its guarantees, which both callers pass on:

- each caller gets exactly its own rows (row i of every output belongs to row i of the stacked
  inputs; an answer without one row per stacked row is never split, each request runs alone);
- each caller gets only the outputs it asked for (empty = all);
- a failure stays with the request that caused it: when the shared call fails with anything but
  a shared failure (`SHARED_FAILURES`), each request is run alone, so one bad request fails
  alone while the others succeed. A shared failure says something about the service (it is
  down, overloaded, out of time, or gave up), not about any rows, so it is every caller's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from services.common.types import InferRequest, InferResult, rows_of

#: What must match for requests to share a call: per input, in name order, its name, dtype and
#: the dimensions after the first (the batch dimension).
Layout = tuple[tuple[str, np.dtype, tuple[int, ...]], ...]

#: Failures about the service rather than about one request's rows: every caller of the shared
#: call gets them as they are, and nobody is run again alone.
SHARED_FAILURES: tuple[type[Exception], ...] = (Unavailable, DeadlineExceeded, ResourceExhausted, Cancelled)

#: The most request ids a stacked request carries (joined with commas), for the logs downstream.
MAX_REQUEST_ID = 256


def layout(inputs: Mapping[str, np.ndarray], *, bytes_tensors: bool = True) -> tuple[Layout, int] | None:
    """(layout, rows) of a request's inputs, or None when its rows cannot be stacked with others':
    no inputs, a scalar, first dimensions that differ between inputs, no rows at all, or (when
    `bytes_tensors` is False) a BYTES (object) tensor."""
    key = []
    rows = -1
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0 or (not bytes_tensors and array.dtype == np.object_):
            return None
        if rows == -1:
            rows = array.shape[0]
        if array.shape[0] != rows or rows == 0:
            return None
        key.append((name, array.dtype, array.shape[1:]))
    if rows <= 0:
        return None
    return tuple(key), rows


def union_outputs(requests: Sequence[InferRequest]) -> tuple[str, ...]:
    """Every output some request asked for, in first-asked order; () (= all) if one asked for all."""
    if any(not request.outputs for request in requests):
        return ()
    return tuple(dict.fromkeys(name for request in requests for name in request.outputs))


def stack(requests: Sequence[InferRequest]) -> InferRequest:
    """One request carrying the rows of `requests` (of one layout), in order.

    It asks for every output any of them asked for, keeps the latest deadline (None if one has
    none: each caller keeps its own deadline while it waits) and names their request ids.
    """
    first = requests[0]
    deadlines = [request.deadline for request in requests]
    return InferRequest(
        model=first.model,
        inputs={
            name: np.concatenate([request.inputs[name] for request in requests]) for name in first.inputs
        },
        outputs=union_outputs(requests),
        version=first.version,
        request_id=",".join(r.request_id for r in requests if r.request_id)[:MAX_REQUEST_ID],
        deadline=None if None in deadlines else max(d for d in deadlines if d is not None),
    )


def misaligned(outputs: Mapping[str, np.ndarray], total: int) -> str | None:
    """The first output that has not one row per stacked row (`total`), or None if all have."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            return name
    return None


def split(result: InferResult, requests: Sequence[InferRequest], counts: Sequence[int]) -> list[InferResult]:
    """Each request's rows (`counts[i]` of them, in order) of a stacked call's answer, with only the
    outputs it asked for; check `misaligned` first."""
    answers = []
    start = 0
    for request, count in zip(requests, counts, strict=True):
        stop = start + count
        names = request.outputs or result.outputs
        answers.append(
            InferResult(
                {name: result.outputs[name][start:stop] for name in names if name in result.outputs},
                result.model_name,
                result.model_version,
                dict(result.parameters),
            )
        )
        start = stop
    return answers


def shared(error: BaseException) -> bool:
    """Whether a failed stacked call's error is every caller's answer (else each is run alone)."""
    return isinstance(error, SHARED_FAILURES)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `run_stacked` did, for the caller's counters and logs."""

    #: One call answered every request (with its rows or with a shared failure).
    together: bool
    #: The stacked call's failure: shared by every request when `together`, else why each ran alone.
    error: BaseException | None = None
    #: The output without one row per stacked row, when that is why each ran alone.
    misaligned: str | None = None


async def run_stacked(
    requests: Sequence[InferRequest],
    call: Callable[[InferRequest], Awaitable[InferResult]],
    answer: Callable[[int, InferResult | BaseException], None],
) -> Outcome:
    """Run `requests` (two or more, of one layout) as one `call`, and `answer` each (by index).

    See the module docstring for who gets what. `call` may raise anything: an Exception is an
    answer, a BaseException (cancellation) propagates and leaves the unanswered to the caller.
    """
    counts = [rows_of(request.inputs.values()) for request in requests]
    try:
        result = await call(stack(requests))
    except Exception as exc:
        if shared(exc):
            for index in range(len(requests)):
                answer(index, exc)
            return Outcome(together=True, error=exc)
        await run_alone(requests, call, answer)
        return Outcome(together=False, error=exc)
    bad = misaligned(result.outputs, sum(counts))
    if bad is not None:
        # Rows cannot be told apart; a model that is not batch-native still answers right alone.
        await run_alone(requests, call, answer)
        return Outcome(together=False, misaligned=bad)
    for index, part in enumerate(split(result, requests, counts)):
        answer(index, part)
    return Outcome(together=True)


async def run_alone(
    requests: Sequence[InferRequest],
    call: Callable[[InferRequest], Awaitable[InferResult]],
    answer: Callable[[int, InferResult | BaseException], None],
) -> None:
    """`call` each request on its own, concurrently; each answer as soon as it comes."""

    async def one(index: int) -> None:
        try:
            result = await call(requests[index])
        except Exception as exc:
            answer(index, exc)
        else:
            answer(index, result)

    await asyncio.gather(*(one(index) for index in range(len(requests))))
