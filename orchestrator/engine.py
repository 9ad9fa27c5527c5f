"""The execution engine: runs a graph of a checked spec over the services' ``Stage`` s.

No protobuf and no sockets: tensors are numpy arrays, services are ``Stage`` objects, and errors are
the ``services.common.errors`` tree. Each graph is compiled once (``orchestrator.nodes``) in
``Engine.__init__``; a request only walks the compiled plan. This module holds what a request
needs beyond its plan: the deadline budget, each model step's attempts, shadows and the reports.

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

from orchestrator import step_spans
from orchestrator.budget import RetryBudget
from orchestrator.cache import ResponseCaches
from orchestrator.nodes import (
    Compiler,
    ModelNode,
    Run,
    StepContext,
    run_sequence,
)
from orchestrator.spec import (
    REQUEST,
    MeshSpec,
    ModelStep,
)
from orchestrator.stage import Stage
from services.common.errors import DeadlineExceeded, MeshError, NotFound, Unavailable
from services.common.observability import tracing
from services.common.types import InferRequest, InferResult

logger = logging.getLogger(__name__)

#: Kept back from every step's budget so that the answer (or the error naming the step) leaves
#: before the client's deadline: a share of the request's whole budget, within bounds. A loaded
#: 2-core machine needs tens of milliseconds to notice a timeout and send the answer; a fixed
#: 5 ms let the client's own deadline fire first.
MARGIN_SHARE = 0.15
MARGIN_MIN = 0.005
MARGIN_MAX = 0.25
#: Backoff before retry n (n = 1, 2, ...) is uniform in [0, min(RETRY_CAP, RETRY_BASE * 2**(n-1))].
RETRY_BASE = 0.025
RETRY_CAP = 0.5

#: on_step(graph, step, service, model, version, status, seconds); status is ok, error, timeout or
#: cancelled; version is the one that answered (else the spec's, "" = default).
StepHook = Callable[[str, str, str, str, str, str, float], None]
#: on_mirror(graph, mirror step, argmax agrees on every row, max abs difference)
MirrorHook = Callable[[str, str, bool, float], None]
#: on_request(graph, seconds): the engine's own time for one request, i.e. its duration minus the
#: time at least one model step was in flight (queueing for coalescing included).
RequestHook = Callable[[str, float], None]


def deadline_margin(budget: float) -> float:
    """Seconds kept back from each step of a request whose whole budget is ``budget`` seconds."""
    return min(MARGIN_MAX, max(MARGIN_MIN, MARGIN_SHARE * budget))


class _Failed(Exception):
    """A model step failed: the error to raise and its ``step.<name>`` parameter value."""

    def __init__(self, error: MeshError, status: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status


def _reason(err: MeshError) -> str:
    # Response parameters reach the client: keep non-public messages out of them.
    return err.message if err.public else "internal error"


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
    ) -> None:
        """``caches``: the response caches the spec declares (default: local ones, no metrics)."""
        missing = sorted({s.service for g in spec.graphs.values() for s in g.model_steps()} - set(stages))
        if missing:
            raise ValueError(f"no Stage for service(s) {', '.join(missing)}")
        self.spec = spec
        self._rng = rng if rng is not None else random.Random()
        self._budget = retry_budget if retry_budget is not None else RetryBudget(clock=clock)
        self._clock = clock
        self._on_mirror = on_mirror
        self._on_step = on_step
        self._on_request = on_request
        # With tracing on, each step call runs in a span of its own; off, nothing wraps it.
        call = step_spans.traced(self._call) if tracing.enabled else self._call
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
        run = Run(self._ctx, plan, deadline, deadline_margin(deadline - started), request_id)
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

    # Called by the compiled nodes.

    async def _call(
        self, node: ModelNode, run: Run, inputs: Mapping[str, np.ndarray]
    ) -> Mapping[str, np.ndarray]:
        """One model step: its attempts, then its status, version and on_step report."""
        step = node.step
        started = self._clock()
        try:
            try:
                result = await self._attempts(node, run, inputs)
            finally:
                run.spans.append((started, self._clock()))
            missing = [t for t in node.requested if t not in result.outputs]
            if missing:
                error = MeshError(f"{node.label} answered without the output(s) {', '.join(missing)}")
                raise _Failed(error, f"error: INTERNAL answered without {', '.join(missing)}")
        except _Failed as failed:
            run.status[step.name] = failed.status
            code = failed.error.code
            level = logging.INFO if code in ("INVALID_ARGUMENT", "NOT_FOUND") else logging.WARNING
            extra = {"graph": run.graph, "step": step.name, "code": code, "error": failed.error.message}
            logger.log(level, "step failed", extra=extra)
            kind = "timeout" if failed.status.startswith("timeout") else "error"
            self._notify_step(run, step, step.version, kind, self._clock() - started)
            raise failed.error from failed.__cause__
        except asyncio.CancelledError:
            self._notify_step(run, step, step.version, "cancelled", self._clock() - started)
            raise
        run.status[step.name] = "ok"
        run.versions[step.name] = result.model_version
        version = result.model_version or step.version
        self._notify_step(run, step, version, "ok", self._clock() - started)
        return result.outputs

    async def _attempts(self, node: ModelNode, run: Run, inputs: Mapping[str, np.ndarray]) -> InferResult:
        """Call the stage, retrying UNAVAILABLE within the deadline, retries and retry budget."""
        step = node.step
        self._budget.deposit()
        attempt = 1
        while True:
            left = run.deadline - self._clock() - run.margin
            timeout = min(step.timeout, left)
            if timeout <= 0:
                reason = "exceeded the deadline before it could be called"
                raise _Failed(DeadlineExceeded(f"{node.label} {reason}"), f"timeout: {reason}")
            limit = (
                f"exceeded its timeout of {step.timeout:g}s"
                if step.timeout < left
                else "exceeded the deadline"
            )
            try:
                # The stage is asked to keep to `timeout` itself; this guard holds when it doesn't.
                async with asyncio.timeout(timeout):
                    return await node.stage.call(
                        InferRequest(
                            model=step.model,
                            inputs=inputs,
                            outputs=node.requested,
                            version=step.version,
                            request_id=run.request_id,
                            deadline=self._clock() + timeout,
                        )
                    )
            except TimeoutError:
                raise _Failed(DeadlineExceeded(f"{node.label} {limit}"), f"timeout: {limit}") from None
            except MeshError as err:
                if isinstance(err, DeadlineExceeded):
                    status = f"timeout: {limit}: {_reason(err)}"
                    raise _Failed(err.with_prefix(f"{node.label} {limit}"), status) from err
                after = f" (after {attempt} attempts)" if attempt > 1 else ""
                failed = _Failed(
                    err.with_prefix(f"{node.label}: {err.code}{after}"),
                    f"error: {err.code} {_reason(err)}{after}",
                )
                if not isinstance(err, Unavailable) or attempt > step.retries:
                    raise failed from err
                # Full jitter spreads the retries of concurrent requests apart.
                delay = self._rng.uniform(0.0, min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1)))
                no_time = self._clock() + delay + run.margin >= run.deadline
                if no_time or not self._budget.try_spend():
                    raise failed from err
            await asyncio.sleep(delay)
            attempt += 1

    def _spawn_shadow(self, run: Run, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        # Held here so the loop doesn't drop a running shadow; dropped again when it ends.
        self._background.add(task)
        run.shadows.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(run.shadows.discard)
        return task

    def _notify_step(self, run: Run, step: ModelStep, version: str, status: str, seconds: float) -> None:
        if self._on_step is None:
            return
        try:
            self._on_step(run.graph, step.name, step.service, step.model, version, status, seconds)
        except Exception:
            logger.exception("on_step hook failed")

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
