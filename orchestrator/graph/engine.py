"""The execution engine: runs a graph of a checked spec over the services' ``Stage`` s.

No protobuf and no sockets: tensors are numpy arrays, services are ``Stage`` objects, and errors are
the ``services.common.errors`` tree. Each graph is compiled once (``orchestrator.graph.plan``) in
``Engine.__init__``; a request only walks the compiled plan, whose model steps call their Stage
through ``orchestrator.graph.model_step`` (attempts, retries, status) without coming back here.
This module holds what a request needs beyond its plan: the deadline budget, shadows, the cache
of the whole graph and the reports.

Semantics, in short (docs/graphs.md is the user reference):

- A request has one deadline (the client's, else now + the graph's timeout). Each model step gets
  ``min(step timeout, time left - margin)``, the margin scaling with the request's budget
  (``deadline_margin``), so the answer leaves before the client gives up; with nothing left a
  step is not called. Soft steps are cut the same way: a hung soft branch never costs the
  request its deadline.
- Only UNAVAILABLE is retried: up to the step's ``retries`` extra attempts, exponential backoff with
  full jitter, never past the deadline, and only while the shared ``RetryBudget`` has tokens.
- A hard step's failure fails the request with the stage's own error class and code, prefixed with
  the step; a soft step's failure is recorded and the graph goes on. Unexpected exceptions (bugs)
  propagate unchanged for the transport edge to turn into a fixed INTERNAL message.
- ``InferResult.parameters`` reports every planned model step (see ``Engine.run``).
- Cancelling ``run`` cancels every in-flight stage call, shadows included; a hard ensemble branch
  failing cancels its siblings.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import numpy as np

from orchestrator.capture.record import Capture, make_record
from orchestrator.graph import step_spans
from orchestrator.graph.model_step import ModelStepCaller, StepHook
from orchestrator.graph.plan import (
    Compiler,
    RequestState,
    StepContext,
    run_sequence,
)
from orchestrator.spec import (
    REQUEST,
    MeshSpec,
)
from orchestrator.stages.base import Stage
from orchestrator.stages.cache import ResponseCaches
from orchestrator.stages.retry_budget import RetryBudget
from services.common.errors import MeshError, NotFound
from services.common.observability import tracing
from services.common.types import InferResult

logger = logging.getLogger(__name__)

#: Kept back from every step's budget so that the answer (or the error naming the step) leaves
#: before the client's deadline: a share of the request's whole budget, within bounds. A loaded
#: 2-core machine needs tens of milliseconds to notice a timeout and send the answer; a fixed
#: 5 ms let the client's own deadline fire first.
MARGIN_SHARE = 0.15
MARGIN_MIN = 0.005
MARGIN_MAX = 0.25
#: on_mirror(graph, mirror step, argmax agrees on every row, max abs difference)
MirrorHook = Callable[[str, str, bool, float], None]
#: on_request(graph, seconds): the engine's own time for one request, i.e. its duration minus the
#: time at least one model step was in flight (queueing for coalescing included).
RequestHook = Callable[[str, float], None]
#: on_capture(record): hands a sampled record to the capture writer; must not block.
CaptureHook = Callable[[Capture], object]


def deadline_margin(budget: float) -> float:
    """Seconds kept back from each step of a request whose whole budget is ``budget`` seconds."""
    return min(MARGIN_MAX, max(MARGIN_MIN, MARGIN_SHARE * budget))


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs the graphs of a checked spec. One per orchestrator process; safe for concurrent requests.

    ``stages`` maps every service name of the spec to its Stage. ``rng`` drives the splitter's
    choices and the retry jitter (inject a seeded one in tests). ``retry_budget`` is shared by all
    requests (default: ``RetryBudget()``). ``clock`` is the time base of deadlines (seconds,
    monotonic; ``InferRequest.deadline`` of every stage call is in it). ``on_step``, ``on_mirror``
    and ``on_request`` are metric hooks; they must be quick and are called on
    the event loop (their exceptions are logged and ignored).
    """

    def __init__(
        self,
        spec: MeshSpec,
        stages: Mapping[str, Stage],
        *,
        rng: random.Random | None = None,
        retry_budget: RetryBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_mirror: MirrorHook | None = None,
        on_step: StepHook | None = None,
        on_request: RequestHook | None = None,
        caches: ResponseCaches | None = None,
        on_capture: CaptureHook | None = None,
    ) -> None:
        """``caches``: the response caches the spec declares (default: local ones, no metrics).
        ``on_capture``: where the records of the spec's ``capture:`` go (None = nothing captured)."""
        missing = sorted({s.service for g in spec.graphs.values() for s in g.model_steps()} - set(stages))
        if missing:
            raise ValueError(f"no Stage for service(s) {', '.join(missing)}")
        self.spec = spec
        self._rng = rng if rng is not None else random.Random()
        self._budget = retry_budget if retry_budget is not None else RetryBudget(clock=clock)
        self._clock = clock
        self._on_mirror = on_mirror
        self._on_request = on_request
        self._on_capture = on_capture
        caller = ModelStepCaller(clock, self._rng, self._budget, on_step, on_capture)
        # With tracing on, each step call runs in a span of its own; off, nothing wraps it.
        call = step_spans.traced(caller.call) if tracing.enabled else caller.call
        self._ctx = StepContext(clock, self._rng, call, self._spawn_shadow, self._notify_mirror)
        self._caches = caches if caches is not None else ResponseCaches(spec, stages, clock=clock)
        self._plans = {
            name: Compiler(graph, stages, self._caches).plan() for name, graph in spec.graphs.items()
        }
        self._background: set[asyncio.Task[None]] = set()

    @property
    def graphs(self) -> tuple[str, ...]:
        """The names of the graphs this engine serves."""
        return tuple(self._plans)

    async def run(
        self,
        graph: str,
        inputs: dict[str, np.ndarray],
        *,
        deadline: float | None,
        request_id: str = "",
    ) -> InferResult:
        """Run ``graph`` (see ``_run``), capturing the request and its answer when the graph's
        ``capture:`` samples it."""
        spec = self.spec.graphs[graph].capture if graph in self.spec.graphs else None
        if spec is None or self._on_capture is None or self._rng.random() >= spec.rate:
            return await self._run(graph, inputs, deadline=deadline, request_id=request_id)
        started = self._clock()
        outputs: Mapping[str, np.ndarray] | None = None
        code = "OK"
        try:
            result = await self._run(graph, inputs, deadline=deadline, request_id=request_id)
            outputs = result.outputs
            return result
        except MeshError as err:
            code = err.code
            raise
        finally:
            # A cancelled request (the client left) has no answer worth keeping.
            if outputs is not None or code != "OK":
                record = make_record(
                    spec,
                    inputs,
                    outputs,
                    graph=graph,
                    model=graph,
                    request_id=request_id,
                    latency=self._clock() - started,
                    status_code=code,
                )
                try:
                    self._on_capture(record)
                except Exception:
                    logger.exception("on_capture hook failed")

    async def _run(
        self,
        graph: str,
        inputs: dict[str, np.ndarray],
        *,
        deadline: float | None,
        request_id: str = "",
    ) -> InferResult:
        """Run ``graph`` on ``inputs`` before ``deadline`` (absolute ``clock()`` time; None = now +
        the graph's timeout).

        Returns the graph outputs with ``parameters``: ``"graph"`` -> graph name; for every model
        step ``"step.<name>"`` -> ``"ok"``, ``"error: <CODE> <reason>"``, ``"timeout: <reason>"``,
        ``"skipped: <reason>"`` (or ``SHADOW_STATUS`` for a mirror's shadow); for every step that
        answered ``"version.<name>"`` -> the model version that answered.

        ``inputs`` are taken as valid: the data plane checks them against the graph's signature
        before a graph runs. Raises NotFound (unknown graph), or the failing hard step's own
        error class prefixed with the step, e.g.
        ``step 'logreg' (model_b/digits-logreg): UNAVAILABLE: ...``.
        """
        plan = self._plans.get(graph)
        if plan is None:
            raise NotFound(f"unknown graph {graph!r}; graphs: {', '.join(self._plans)}")
        started = self._clock()
        key = None if plan.cache is None else plan.cache.key(inputs)
        if key is not None and (hit := await plan.cache.lookup(key)) is not None:  # type: ignore[union-attr]
            if self._on_request is not None:
                self._notify_request(graph, self._clock() - started)  # all of it is the engine's own
            return hit
        deadline = started + plan.timeout if deadline is None else deadline
        run = RequestState(self._ctx, plan, deadline, deadline_margin(deadline - started), request_id)
        run.values[REQUEST] = inputs
        try:
            await run_sequence(plan.root, run)
            outputs = plan.outputs.evaluate(run, "graph output {name!r}")
        except BaseException:
            # The request is over (failed or cancelled): shadows have nothing left to report to.
            await _cancel(run.shadows)
            raise
        finally:
            if self._on_request is not None:
                self._notify_request(graph, self._clock() - started - busy_time(run.spans))
        result = InferResult(outputs, model_name=graph, parameters=plan.parameters(run))
        if key is not None and not run.degraded:
            await plan.cache.keep(key, result, run.versions)  # type: ignore[union-attr]
        return result

    async def drain(self) -> None:
        """Wait for the shadows still running (each is bounded by its request's deadline)."""
        while self._background:
            await asyncio.wait(set(self._background))

    async def aclose(self) -> None:
        """Cancel the shadows still running and wait for them (at shutdown)."""
        await _cancel(set(self._background))
        await self._caches.close()

    def _spawn_shadow(self, run: RequestState, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        # Held here so the loop doesn't drop a running shadow; dropped again when it ends.
        self._background.add(task)
        run.shadows.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(run.shadows.discard)
        return task

    def _notify_request(self, graph: str, seconds: float) -> None:
        try:
            self._on_request(graph, max(0.0, seconds))  # type: ignore[misc]
        except Exception:
            logger.exception("on_request hook failed")

    def _notify_mirror(self, graph: str, step: str, agree: bool, diff: float) -> None:
        if self._on_mirror is None:
            return
        try:
            self._on_mirror(graph, step, agree, diff)
        except Exception:
            logger.exception("on_mirror hook failed")


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    tasks = {t for t in tasks if not t.done()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


def busy_time(spans: Sequence[tuple[float, float]]) -> float:
    """Total length of the union of intervals (overlapping parallel calls count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total
