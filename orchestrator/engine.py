"""The execution engine: runs a graph of a checked spec over the services' ``Stage`` s.

No protobuf and no sockets: tensors are numpy arrays, services are ``Stage`` objects, and errors are
the ``services.common.errors`` tree. Everything that depends only on the spec (the step tree, which
outputs to request from each model, where each reference reads from) is compiled once per graph in
``Engine.__init__``; a request only walks the compiled plan.

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
import bisect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import step_spans
from orchestrator.aggregators import AGGREGATORS
from orchestrator.budget import RetryBudget
from orchestrator.cache import GraphCache, ResponseCaches
from orchestrator.spec import (
    REQUEST,
    EnsembleStep,
    GraphSpec,
    MeshSpec,
    MirrorStep,
    ModelStep,
    OutputExpr,
    SequenceStep,
    SplitterStep,
    Step,
    SwitchStep,
    iter_steps,
    storage_name,
)
from orchestrator.stage import Stage
from services.common import tracing
from services.common.errors import DeadlineExceeded, MeshError, NotFound, Unavailable
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

#: What ``parameters`` reports for the model steps of a mirror's shadow: the answer doesn't wait for
#: them, their outcome goes to the on_step / on_mirror hooks.
SHADOW_STATUS = "shadow: not awaited"


def deadline_margin(budget: float) -> float:
    """Seconds kept back from each step of a request whose whole budget is ``budget`` seconds."""
    return min(MARGIN_MAX, max(MARGIN_MIN, MARGIN_SHARE * budget))


def compare_outputs(primary: np.ndarray, shadow: np.ndarray) -> tuple[bool, float]:
    """(argmax over the last axis agrees on every row, max absolute difference) of two answers."""
    if primary.shape != shadow.shape:
        return False, math.inf
    if primary.size == 0:
        return True, 0.0
    diff = float(np.max(np.abs(primary.astype(np.float64) - shadow.astype(np.float64))))
    if primary.ndim == 0:
        return diff == 0.0, diff
    agree = bool(np.array_equal(np.argmax(primary, axis=-1), np.argmax(shadow, axis=-1)))
    return agree, diff


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
# Per-request state


@dataclass(frozen=True, slots=True)
class StepContext:
    """What compiled steps may use of the engine, and nothing else of it."""

    #: The time base of deadlines (seconds, monotonic).
    clock: Callable[[], float]
    #: Drives the splitter's choices.
    rng: random.Random
    #: One model step: its attempts, status, version and report.
    call: Callable[[_ModelNode, _Run, Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
    #: Runs a coroutine in the background (a mirror's shadow), tied to the request.
    spawn: Callable[[_Run, Coroutine[Any, Any, None]], asyncio.Task[None]]
    #: Reports a shadow's comparison with the primary.
    mirrored: Callable[[str, str, bool, float], None]


class _Run:
    """The state of one request: produced tensors, failures, per-step statuses, shadow tasks."""

    def __init__(self, ctx: StepContext, plan: _Plan, deadline: float, request_id: str) -> None:
        self.ctx = ctx
        self.graph = plan.name
        self.deadline = deadline
        #: Kept back from every step's budget for answering (see ``deadline_margin``).
        self.margin = deadline_margin(deadline - ctx.clock())
        self.request_id = request_id
        self.values: dict[str, Mapping[str, np.ndarray]] = {}
        self.failures: dict[str, MeshError] = {}  # step -> why it has no outputs
        self.status: dict[str, str] = {}  # model step -> parameter value
        self.versions: dict[str, str] = {}  # model step -> version that answered
        self.shadows: set[asyncio.Task[None]] = set()
        #: (start, end) of every model step, for the orchestrator's own-time metric.
        self.spans: list[tuple[float, float]] = []
        #: A soft step failed: the answer is partial (and never cached).
        self.degraded = False

    def get(self, source: str, tensor: str) -> np.ndarray | None:
        outputs = self.values.get(source)
        return None if outputs is None else outputs.get(tensor)

    def missing(self, source: str, tensor: str, consumer: str) -> MeshError:
        """The error for a consumer whose tensor isn't there: the producer's own, when known."""
        cause = self.failures.get(source)
        if cause is None:
            return MeshError(f"{consumer} needs '{source}.{tensor}', which was not produced")
        return cause.with_prefix(f"{consumer} needs '{source}.{tensor}'")

    def skip(self, node: _Node, reason: str, cause: MeshError) -> None:
        """Record that ``node`` (or what of it had not finished) did not run."""
        for name in node.model_steps:
            self.status.setdefault(name, f"skipped: {reason}")
        for name in node.names:
            self.failures.setdefault(name, cause)


# ---------------------------------------------------------------------------------------------
# Compiled steps


class _Node:
    """A compiled step. ``execute`` returns its outputs, or None when it forwards another step's."""

    def __init__(self, step: Step) -> None:
        self.name = step.name
        self.soft = step.dependency == "soft"
        subtree = list(iter_steps((step,)))
        self.names = tuple(s.name for s in subtree)
        self.model_steps = tuple(s.name for s in subtree if s.kind == ModelStep.kind)

    async def execute(self, run: _Run) -> Mapping[str, np.ndarray] | None:
        raise NotImplementedError


async def _run_node(node: _Node, run: _Run) -> None:
    """Run one step; a soft step's failure is recorded instead of raised."""
    try:
        outputs = await node.execute(run)
    except MeshError as err:
        run.failures[node.name] = err
        run.skip(node, f"step {node.name!r} failed", err)
        if node.soft:
            run.degraded = True
            return
        raise
    if outputs is not None:
        run.values[node.name] = outputs


async def _run_sequence(nodes: Sequence[_Node], run: _Run) -> None:
    for i, node in enumerate(nodes):
        try:
            await _run_node(node, run)
        except MeshError as err:
            for later in nodes[i + 1 :]:
                run.skip(later, f"earlier step {node.name!r} failed", err)
            raise


async def _all_or_cancel(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently. On the first exception cancel the others, wait for them and raise it
    (the first in the given order if several failed). If cancelled, cancel them all and wait.
    """
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        # Retrieve every outcome, so no failure is reported as "never retrieved".
        errors = [t.exception() for t in tasks if not t.cancelled()]
    for error in errors:
        if error is not None:
            raise error


class _ModelNode(_Node):
    def __init__(
        self, step: ModelStep, stage: Stage, requested: tuple[str, ...], storage: Mapping[str, str]
    ) -> None:
        super().__init__(step)
        self.step = step
        self.stage = stage
        self.requested = requested
        self.label = f"step {step.name!r} ({step.label})"
        # input name -> (step whose outputs hold the tensor, tensor name)
        self.bindings = tuple((name, storage[ref.step], ref.tensor) for name, ref in step.inputs.items())

    async def execute(self, run: _Run) -> Mapping[str, np.ndarray]:
        inputs: dict[str, np.ndarray] = {}
        for name, source, tensor in self.bindings:
            array = run.get(source, tensor)
            if array is None:
                run.status[self.name] = (
                    f"skipped: input {name!r} needs '{source}.{tensor}', which is unavailable"
                )
                raise run.missing(source, tensor, self.label)
            inputs[name] = array  # as produced: no copy
        return await run.ctx.call(self, run, inputs)


class _SequenceNode(_Node):
    def __init__(self, step: SequenceStep, nodes: tuple[_Node, ...]) -> None:
        super().__init__(step)
        self.nodes = nodes

    async def execute(self, run: _Run) -> None:
        await _run_sequence(self.nodes, run)
        return None  # its outputs are its last step's, read there directly


class _EnsembleNode(_Node):
    def __init__(self, step: EnsembleStep, branches: tuple[_Node, ...], storage: Mapping[str, str]) -> None:
        super().__init__(step)
        self.branches = branches
        self.sources = tuple(storage[b.name] for b in branches)
        self.tensor = step.aggregate.tensor
        self.method = step.aggregate.method
        self.aggregator = AGGREGATORS[step.aggregate.method]
        weights = step.aggregate.weights or {}
        self.weights = tuple(weights.get(b.name, 1.0) for b in branches)
        self.quorum = step.quorum if step.quorum is not None else 1

    async def execute(self, run: _Run) -> Mapping[str, np.ndarray]:
        try:
            await _all_or_cancel([_run_node(b, run) for b in self.branches])
        except MeshError as err:
            for branch in self.branches:
                run.skip(branch, f"cancelled: a hard branch of ensemble {self.name!r} failed", err)
            raise
        arrays: list[np.ndarray] = []
        weights: list[float] = []
        causes: list[MeshError | None] = []
        for branch, source, weight in zip(self.branches, self.sources, self.weights, strict=True):
            array = run.get(source, self.tensor)
            if array is None:
                # A composite branch may have finished while its last step (soft) did not.
                causes.append(run.failures.get(branch.name) or run.failures.get(source))
            else:
                arrays.append(array)
                weights.append(weight)
        if len(arrays) < self.quorum:
            summary = (
                f"ensemble {self.name!r}: quorum not met ({len(arrays)} of {len(self.branches)} "
                f"branches succeeded, {self.quorum} needed)"
            )
            cause = next((c for c in causes if c is not None), None)
            raise MeshError(summary) if cause is None else cause.with_prefix(summary)
        try:
            return self.aggregator.combine(self.tensor, arrays, weights)
        except ValueError as exc:
            raise MeshError(f"ensemble {self.name!r} ({self.method}): {exc}") from exc


class _Outputs:
    """Compiled ``OutputExpr`` s: name -> alternatives (source step, tensor), argmax."""

    def __init__(self, outputs: Mapping[str, OutputExpr], storage: Mapping[str, str]) -> None:
        self.items = tuple(
            (name, tuple((storage[r.step], r.tensor) for r in expr.alternatives), expr.argmax)
            for name, expr in outputs.items()
        )

    def evaluate(self, run: _Run, consumer: str) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for name, alternatives, argmax in self.items:
            array = next((a for s, t in alternatives if (a := run.get(s, t)) is not None), None)
            if array is None:
                source, tensor = alternatives[0]
                raise run.missing(source, tensor, consumer.format(name=name))
            values[name] = np.argmax(array, axis=-1).astype(np.int64, copy=False) if argmax else array
        return values


class _SwitchNode(_Node):
    def __init__(
        self,
        step: SwitchStep,
        then: tuple[_Node, ...],
        else_: tuple[_Node, ...],
        storage: Mapping[str, str],
    ) -> None:
        super().__init__(step)
        self.condition = step.condition
        self.source = storage[step.condition.ref.step]
        self.then = then
        self.else_ = else_
        self.outputs = _Outputs(step.outputs, storage)

    async def execute(self, run: _Run) -> Mapping[str, np.ndarray]:
        ref = self.condition.ref
        array = run.get(self.source, ref.tensor)
        if array is None:
            raise run.missing(self.source, ref.tensor, f"the condition of switch {self.name!r}")
        taken = self.condition.holds(array)
        branch, other = (self.then, self.else_) if taken else (self.else_, self.then)
        reason = (
            f"switch {self.name!r} took its {'then' if taken else 'else'!r} branch "
            f"({self.condition.text} is {'true' if taken else 'false'})"
        )
        cause = MeshError(f"{reason}, so the other branch did not run")
        for node in other:
            run.skip(node, reason, cause)
        await _run_sequence(branch, run)
        return self.outputs.evaluate(run, f"output {{name!r}} of switch {self.name!r}")


class _SplitterNode(_Node):
    def __init__(self, step: SplitterStep, branches: tuple[_ModelNode, ...]) -> None:
        super().__init__(step)
        self.branches = branches
        self.cumulative: list[int] = []
        total = 0
        for b in step.branches:
            total += b.weight
            self.cumulative.append(total)
        self.total = total

    async def execute(self, run: _Run) -> Mapping[str, np.ndarray]:
        # bisect_right never lands on a 0-weight branch: its cumulative equals its predecessor's.
        chosen = bisect.bisect_right(self.cumulative, run.ctx.rng.random() * self.total)
        cause = MeshError(f"splitter {self.name!r} chose another branch")
        for i, branch in enumerate(self.branches):
            if i != chosen:
                run.skip(branch, "not chosen by splitter", cause)
        return await self.branches[chosen].execute(run)


class _MirrorNode(_Node):
    def __init__(self, step: MirrorStep, primary: _Node, shadow: _Node, storage: Mapping[str, str]) -> None:
        super().__init__(step)
        self.primary = primary
        self.shadow = shadow
        self.compare = step.compare
        self.primary_source = storage[step.primary.name]
        self.shadow_source = storage[step.shadow.name]

    async def execute(self, run: _Run) -> None:
        primary_answer: asyncio.Future[np.ndarray | None] = asyncio.get_running_loop().create_future()
        shadow = run.ctx.spawn(run, self._shadow(run, primary_answer))
        try:
            await _run_node(self.primary, run)
        except BaseException:
            shadow.cancel()  # nothing to compare against
            raise
        primary_answer.set_result(run.get(self.primary_source, self.compare))
        return None  # its outputs are the primary's, read there directly

    async def _shadow(self, run: _Run, primary_answer: Awaitable[np.ndarray | None]) -> None:
        try:
            # Bounded by the request's deadline even though nobody waits for it.
            async with asyncio.timeout(max(0.0, run.deadline - run.ctx.clock())):
                await _run_node(self.shadow, run)
                theirs = run.get(self.shadow_source, self.compare)
                ours = await primary_answer
            if ours is None or theirs is None:
                return
            agree, diff = compare_outputs(ours, theirs)
        except (MeshError, TimeoutError) as exc:
            # Its failure never reaches the client; on_step has already counted it.
            logger.debug("shadow of mirror %r in graph %r failed: %s", self.name, run.graph, exc)
            return
        except Exception:
            logger.exception("shadow of mirror %r in graph %r crashed", self.name, run.graph)
            return
        run.ctx.mirrored(run.graph, self.name, agree, diff)


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class _Plan:
    name: str
    timeout: float
    root: tuple[_Node, ...]
    outputs: _Outputs
    model_steps: tuple[str, ...]
    shadow_steps: frozenset[str]
    cache: GraphCache | None = None

    def parameters(self, run: _Run) -> dict[str, str | int | float | bool]:
        params: dict[str, str | int | float | bool] = {"graph": self.name}
        for name in self.model_steps:
            if name in self.shadow_steps:
                params[f"step.{name}"] = SHADOW_STATUS
                continue
            params[f"step.{name}"] = run.status.get(name, "skipped: not reached")
            if name in run.versions:
                params[f"version.{name}"] = run.versions[name]
        return params


class _Compiler:
    """Compiles one graph's steps into nodes; the one place the engine dispatches on step kinds."""

    def __init__(self, graph: GraphSpec, stages: Mapping[str, Stage], caches: ResponseCaches) -> None:
        self.graph = graph
        self.stages = stages
        self.caches = caches
        self.storage = {s.name: storage_name(s) for s in graph.all_steps()}
        self.storage[REQUEST] = REQUEST
        self._by_kind: dict[str, Callable[[Any], _Node]] = {
            ModelStep.kind: self._model,
            SequenceStep.kind: self._sequence,
            EnsembleStep.kind: self._ensemble,
            SwitchStep.kind: self._switch,
            SplitterStep.kind: self._splitter,
            MirrorStep.kind: self._mirror,
        }

    def node(self, step: Step) -> _Node:
        return self._by_kind[step.kind](step)

    def nodes(self, steps: Sequence[Step]) -> tuple[_Node, ...]:
        return tuple(map(self.node, steps))

    def plan(self) -> _Plan:
        graph = self.graph
        shadows = frozenset(
            s.name
            for mirror in graph.all_steps()
            if isinstance(mirror, MirrorStep)
            for s in iter_steps((mirror.shadow,))
        )
        return _Plan(
            name=graph.name,
            timeout=graph.timeout,
            root=self.nodes(graph.steps),
            outputs=_Outputs(graph.outputs, self.storage),
            model_steps=tuple(s.name for s in graph.model_steps()),
            shadow_steps=shadows,
            cache=self.caches.graph(graph),
        )

    def _model(self, step: ModelStep) -> _ModelNode:
        requested = self.graph.requested_outputs.get(step.name, ())
        stage = self.caches.stage(self.graph.name, step, self.stages[step.service])
        return _ModelNode(step, stage, requested, self.storage)

    def _sequence(self, step: SequenceStep) -> _Node:
        return _SequenceNode(step, self.nodes(step.steps))

    def _ensemble(self, step: EnsembleStep) -> _Node:
        return _EnsembleNode(step, self.nodes(step.branches), self.storage)

    def _switch(self, step: SwitchStep) -> _Node:
        return _SwitchNode(step, self.nodes(step.then), self.nodes(step.else_), self.storage)

    def _splitter(self, step: SplitterStep) -> _Node:
        return _SplitterNode(step, tuple(self._model(b.step) for b in step.branches))

    def _mirror(self, step: MirrorStep) -> _Node:
        return _MirrorNode(step, self.node(step.primary), self.node(step.shadow), self.storage)


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
            name: _Compiler(graph, stages, self._caches).plan() for name, graph in spec.graphs.items()
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
        run = _Run(self._ctx, plan, started + plan.timeout if deadline is None else deadline, request_id)
        run.values[REQUEST] = inputs
        try:
            await _run_sequence(plan.root, run)
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
        self, node: _ModelNode, run: _Run, inputs: Mapping[str, np.ndarray]
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

    async def _attempts(self, node: _ModelNode, run: _Run, inputs: Mapping[str, np.ndarray]) -> InferResult:
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

    def _spawn_shadow(self, run: _Run, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        # Held here so the loop doesn't drop a running shadow; dropped again when it ends.
        self._background.add(task)
        run.shadows.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(run.shadows.discard)
        return task

    def _notify_step(self, run: _Run, step: ModelStep, version: str, status: str, seconds: float) -> None:
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
