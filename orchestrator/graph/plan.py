"""A graph compiled for the engine: one node per step, and the state of one request they share.

Everything that depends only on the spec (the step tree, which outputs to request from each
model, where each reference reads from) is compiled once per graph by ``Compiler``; a request
only walks the compiled plan. Nodes know nothing of the engine but the ``StepContext`` it gives
them (its clock and rng, one model call, a background task, a report). ``Compiler`` is the one
place that dispatches on step kinds.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.graph.aggregators import AGGREGATORS
from orchestrator.spec import (
    REQUEST,
    EnsembleStep,
    GraphSpec,
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
from orchestrator.stages.base import Stage, keeps_deadline
from orchestrator.stages.cache import GraphCache, ResponseCaches
from services.common.errors import MeshError

logger = logging.getLogger("orchestrator.graph.engine")

#: What ``parameters`` reports for the model steps of a mirror's shadow: the answer doesn't wait for
#: them, their outcome goes to the on_step / on_mirror hooks.
SHADOW_STATUS = "shadow: not awaited"


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
    call: Callable[[ModelNode, RequestState, Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
    #: Runs a coroutine in the background (a mirror's shadow), tied to the request.
    spawn: Callable[[RequestState, Coroutine[Any, Any, None]], asyncio.Task[None]]
    #: Reports a shadow's comparison with the primary.
    mirrored: Callable[[str, str, bool, float], None]


class RequestState:
    """The state of one request: produced tensors, failures, per-step statuses, shadow tasks."""

    def __init__(self, ctx: StepContext, plan: Plan, deadline: float, margin: float, request_id: str) -> None:
        self.ctx = ctx
        self.graph = plan.name
        self.deadline = deadline
        #: Kept back from every step's budget for answering (the engine's ``deadline_margin``).
        self.margin = margin
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

    def skip(self, node: CompiledStep, reason: str, cause: MeshError) -> None:
        """Record that ``node`` (or what of it had not finished) did not run."""
        for name in node.model_steps:
            self.status.setdefault(name, f"skipped: {reason}")
        for name in node.names:
            self.failures.setdefault(name, cause)


# ---------------------------------------------------------------------------------------------
# Compiled steps


class CompiledStep:
    """A compiled step. ``execute`` returns its outputs, or None when it forwards another step's."""

    def __init__(self, step: Step) -> None:
        self.name = step.name
        self.soft = step.dependency == "soft"
        subtree = list(iter_steps((step,)))
        self.names = tuple(s.name for s in subtree)
        self.model_steps = tuple(s.name for s in subtree if s.kind == ModelStep.kind)

    async def execute(self, run: RequestState) -> Mapping[str, np.ndarray] | None:
        raise NotImplementedError


async def _run_node(node: CompiledStep, run: RequestState) -> None:
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


async def run_sequence(nodes: Sequence[CompiledStep], run: RequestState) -> None:
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


class ModelNode(CompiledStep):
    def __init__(
        self, step: ModelStep, stage: Stage, requested: tuple[str, ...], storage: Mapping[str, str]
    ) -> None:
        super().__init__(step)
        self.step = step
        self.stage = stage
        #: The stage answers by the deadline itself: no timer of the engine's around its calls.
        self.keeps_deadline = keeps_deadline(stage)
        self.requested = requested
        self.label = f"step {step.name!r} ({step.label})"
        # input name -> (step whose outputs hold the tensor, tensor name)
        self.bindings = tuple((name, storage[ref.step], ref.tensor) for name, ref in step.inputs.items())

    async def execute(self, run: RequestState) -> Mapping[str, np.ndarray]:
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


class _SequenceNode(CompiledStep):
    def __init__(self, step: SequenceStep, nodes: tuple[CompiledStep, ...]) -> None:
        super().__init__(step)
        self.nodes = nodes

    async def execute(self, run: RequestState) -> None:
        await run_sequence(self.nodes, run)
        return None  # its outputs are its last step's, read there directly


class _EnsembleNode(CompiledStep):
    def __init__(
        self, step: EnsembleStep, branches: tuple[CompiledStep, ...], storage: Mapping[str, str]
    ) -> None:
        super().__init__(step)
        self.branches = branches
        self.sources = tuple(storage[b.name] for b in branches)
        self.tensor = step.aggregate.tensor
        self.method = step.aggregate.method
        self.aggregator = AGGREGATORS[step.aggregate.method]
        weights = step.aggregate.weights or {}
        self.weights = tuple(weights.get(b.name, 1.0) for b in branches)
        self.quorum = step.quorum if step.quorum is not None else 1

    async def execute(self, run: RequestState) -> Mapping[str, np.ndarray]:
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

    def evaluate(self, run: RequestState, consumer: str) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for name, alternatives, argmax in self.items:
            array = next((a for s, t in alternatives if (a := run.get(s, t)) is not None), None)
            if array is None:
                source, tensor = alternatives[0]
                raise run.missing(source, tensor, consumer.format(name=name))
            values[name] = np.argmax(array, axis=-1).astype(np.int64, copy=False) if argmax else array
        return values


class _SwitchNode(CompiledStep):
    def __init__(
        self,
        step: SwitchStep,
        then: tuple[CompiledStep, ...],
        else_: tuple[CompiledStep, ...],
        storage: Mapping[str, str],
    ) -> None:
        super().__init__(step)
        self.condition = step.condition
        self.source = storage[step.condition.ref.step]
        self.then = then
        self.else_ = else_
        self.outputs = _Outputs(step.outputs, storage)

    async def execute(self, run: RequestState) -> Mapping[str, np.ndarray]:
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
        await run_sequence(branch, run)
        return self.outputs.evaluate(run, f"output {{name!r}} of switch {self.name!r}")


class _SplitterNode(CompiledStep):
    def __init__(self, step: SplitterStep, branches: tuple[ModelNode, ...]) -> None:
        super().__init__(step)
        self.branches = branches
        self.cumulative: list[int] = []
        total = 0
        for b in step.branches:
            total += b.weight
            self.cumulative.append(total)
        self.total = total

    async def execute(self, run: RequestState) -> Mapping[str, np.ndarray]:
        # bisect_right never lands on a 0-weight branch: its cumulative equals its predecessor's.
        chosen = bisect.bisect_right(self.cumulative, run.ctx.rng.random() * self.total)
        cause = MeshError(f"splitter {self.name!r} chose another branch")
        for i, branch in enumerate(self.branches):
            if i != chosen:
                run.skip(branch, "not chosen by splitter", cause)
        return await self.branches[chosen].execute(run)


class _MirrorNode(CompiledStep):
    def __init__(
        self, step: MirrorStep, primary: CompiledStep, shadow: CompiledStep, storage: Mapping[str, str]
    ) -> None:
        super().__init__(step)
        self.primary = primary
        self.shadow = shadow
        self.compare = step.compare
        self.primary_source = storage[step.primary.name]
        self.shadow_source = storage[step.shadow.name]

    async def execute(self, run: RequestState) -> None:
        primary_answer: asyncio.Future[np.ndarray | None] = asyncio.get_running_loop().create_future()
        shadow = run.ctx.spawn(run, self._shadow(run, primary_answer))
        try:
            await _run_node(self.primary, run)
        except BaseException:
            shadow.cancel()  # nothing to compare against
            raise
        primary_answer.set_result(run.get(self.primary_source, self.compare))
        return None  # its outputs are the primary's, read there directly

    async def _shadow(self, run: RequestState, primary_answer: Awaitable[np.ndarray | None]) -> None:
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
class Plan:
    name: str
    timeout: float
    root: tuple[CompiledStep, ...]
    outputs: _Outputs
    model_steps: tuple[str, ...]
    shadow_steps: frozenset[str]
    cache: GraphCache | None = None

    def parameters(self, run: RequestState) -> dict[str, str | int | float | bool]:
        params: dict[str, str | int | float | bool] = {"graph": self.name}
        for name in self.model_steps:
            if name in self.shadow_steps:
                params[f"step.{name}"] = SHADOW_STATUS
                continue
            params[f"step.{name}"] = run.status.get(name, "skipped: not reached")
            if name in run.versions:
                params[f"version.{name}"] = run.versions[name]
        return params


class Compiler:
    """Compiles one graph's steps into nodes; the one place the engine dispatches on step kinds."""

    def __init__(self, graph: GraphSpec, stages: Mapping[str, Stage], caches: ResponseCaches) -> None:
        self.graph = graph
        self.stages = stages
        self.caches = caches
        self.storage = {s.name: storage_name(s) for s in graph.all_steps()}
        self.storage[REQUEST] = REQUEST
        self._by_kind: dict[str, Callable[[Any], CompiledStep]] = {
            ModelStep.kind: self._model,
            SequenceStep.kind: self._sequence,
            EnsembleStep.kind: self._ensemble,
            SwitchStep.kind: self._switch,
            SplitterStep.kind: self._splitter,
            MirrorStep.kind: self._mirror,
        }

    def node(self, step: Step) -> CompiledStep:
        return self._by_kind[step.kind](step)

    def nodes(self, steps: Sequence[Step]) -> tuple[CompiledStep, ...]:
        return tuple(map(self.node, steps))

    def plan(self) -> Plan:
        graph = self.graph
        shadows = frozenset(
            s.name
            for mirror in graph.all_steps()
            if isinstance(mirror, MirrorStep)
            for s in iter_steps((mirror.shadow,))
        )
        return Plan(
            name=graph.name,
            timeout=graph.timeout,
            root=self.nodes(graph.steps),
            outputs=_Outputs(graph.outputs, self.storage),
            model_steps=tuple(s.name for s in graph.model_steps()),
            shadow_steps=shadows,
            cache=self.caches.graph(graph),
        )

    def _model(self, step: ModelStep) -> ModelNode:
        requested = self.graph.requested_outputs.get(step.name, ())
        stage = self.caches.stage(self.graph.name, step, self.stages[step.service])
        return ModelNode(step, stage, requested, self.storage)

    def _sequence(self, step: SequenceStep) -> CompiledStep:
        return _SequenceNode(step, self.nodes(step.steps))

    def _ensemble(self, step: EnsembleStep) -> CompiledStep:
        return _EnsembleNode(step, self.nodes(step.branches), self.storage)

    def _switch(self, step: SwitchStep) -> CompiledStep:
        return _SwitchNode(step, self.nodes(step.then), self.nodes(step.else_), self.storage)

    def _splitter(self, step: SplitterStep) -> CompiledStep:
        return _SplitterNode(step, tuple(self._model(b.step) for b in step.branches))

    def _mirror(self, step: MirrorStep) -> CompiledStep:
        return _MirrorNode(step, self.node(step.primary), self.node(step.shadow), self.storage)
