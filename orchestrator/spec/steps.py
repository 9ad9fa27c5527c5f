"""The data model: the step kinds, graphs and the whole spec, as frozen dataclasses.

Frozen: a parsed spec is shared by every request and never changes. (Mapping fields hold read-only
views, so these dataclasses compare by value but are not hashable.)

What a step is, structurally, is said by its class, in one place per kind:

- ``children()``: the steps directly nested in it;
- ``forwards()``: the step whose outputs are its outputs (a sequence's last step, a mirror's
  primary), or None when it makes outputs of its own. This is THE forwarding rule:
  ``storage_name``, the scope checks, the outputs requested from each model and the signature
  checks all follow it, and so does the engine, through ``storage_name``;
- ``sources(tensor)``: what reading ``<step>.<tensor>`` reads in turn: the forwarded step's tensor,
  a splitter's branches (one of them answers), a switch output's alternatives;
- ``reads()``: the tensors the step reads itself (not through its children);
- ``awaited()``: the children it may wait on to answer (not a mirror's shadow, not a splitter
  branch of weight 0): the models a graph's readiness depends on.

These are methods rather than functions dispatching on the type because they are facts about the
step alone, the same for every pass; a new kind states them next to its fields. What the passes do
with each kind (parse, scope, signatures) stays in the pass's module, in one table per pass keyed
by kind, so that the data model does not depend on the checks.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias, get_args

import numpy as np

from orchestrator.graph.aggregators import AGGREGATORS
from services.common.types import TensorSpec

#: The pseudo-step whose tensors are the graph's inputs: ``request.<input>``.
REQUEST = "request"
DEPENDENCIES = ("hard", "soft")
#: Condition functions, reduced over every axis but the first (the batch).
CONDITION_FUNCTIONS: dict[str, Callable[..., Any]] = {"max": np.max, "min": np.min, "mean": np.mean}
CONDITION_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

Dependency: TypeAlias = Literal["hard", "soft"]
#: (service, model, version as written in the spec, "" = the service's default)
SignatureKey: TypeAlias = tuple[str, str, str]


@dataclass(frozen=True)
class TensorRef:
    """``<step>.<tensor>``, or ``request.<input>`` for a graph input."""

    step: str
    tensor: str

    def __str__(self) -> str:
        return f"{self.step}.{self.tensor}"


@dataclass(frozen=True)
class OutputExpr:
    """An output: references tried in order (``a.x|b.x``: the first that exists), maybe argmax'ed."""

    alternatives: tuple[TensorRef, ...]
    argmax: bool
    text: str


@dataclass(frozen=True)
class Condition:
    """``<fn>(<ref>) <op> <number>``: true if it holds for ANY row of the batch."""

    fn: str
    ref: TensorRef
    op: str
    value: float
    text: str

    def holds(self, array: np.ndarray) -> bool:
        """Evaluate on a tensor whose first axis is the batch; an empty batch is False."""
        if array.size == 0:
            # No rows (a step upstream found nothing), or rows of nothing: never reshaped, false.
            return False
        rows = array.reshape(1, -1) if array.ndim == 0 else array.reshape(array.shape[0], -1)
        per_row = CONDITION_FUNCTIONS[self.fn](rows, axis=1)
        return bool(np.any(CONDITION_OPERATORS[self.op](per_row, self.value)))


@dataclass(frozen=True)
class CacheSpec:
    """A response cache on a graph or a model step (``cache:``): bounds and time to live.

    Keys are the model (or graph), its version and the request's tensor bytes; see
    orchestrator/stages/cache.py for what is stored and when an entry is served.
    """

    #: The most answers kept; the least recently used goes first.
    entries: int = 1024
    #: The most bytes of output tensors kept.
    bytes: int = 64 * 1024 * 1024
    #: Seconds an answer is served after it was stored.
    ttl: float = 60.0


@dataclass(frozen=True)
class CaptureSpec:
    """Payload capture on a graph or a model step (``capture:``): which requests are kept, and what
    of them. Records are written off the request path (orchestrator/capture.py)."""

    #: The share of requests captured, from 0 to 1 (each request drawn independently).
    rate: float = 1.0
    #: Keep the request's tensors (a step's: what the step was sent).
    inputs: bool = True
    #: Keep the answer's tensors.
    outputs: bool = True
    #: Only these tensor names (inputs or outputs); () = all of them.
    tensors: tuple[str, ...] = ()
    #: A record's tensors are kept up to this many bytes; past it the tensors are left out and the
    #: record says so (``truncated``), so one huge request cannot fill the store.
    max_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class DriftSpec:
    """One watched tensor of a graph (``drift:``): its captured values against a reference
    (orchestrator/capture/drift.py)."""

    #: ``input.<name>`` or ``output.<name>``: a tensor the graph's capture keeps.
    tensor: str
    #: The reference distribution's file (``onnxmesh capture reference``), relative to the spec's
    #: directory.
    reference: str
    #: The newest records compared with it.
    window: int = 500


# ---------------------------------------------------------------------------------------------
# The step kinds


class _StepKind:
    """What every step kind says about itself. The defaults fit a step that makes its own outputs."""

    #: ``model``, or the key of the step mapping: ``sequence``, ``ensemble``, ...
    kind: ClassVar[str]

    def children(self) -> tuple[Step, ...]:
        """The steps directly nested in this one, in spec order."""
        return ()

    def forwards(self) -> Step | None:
        """The step whose outputs are this step's outputs; None if it makes its own."""
        return None

    def sources(self, tensor: str) -> tuple[TensorRef, ...]:
        """What reading ``<this step>.<tensor>`` reads in turn; () if this step computes it."""
        forwarded = self.forwards()
        return () if forwarded is None else (TensorRef(forwarded.name, tensor),)

    def reads(self) -> tuple[TensorRef, ...]:
        """The tensors this step reads itself, not through its children, in spec order."""
        return ()

    def awaited(self) -> tuple[Step, ...]:
        """The children this step may wait on to answer."""
        return self.children()


@dataclass(frozen=True)
class ModelStep(_StepKind):
    """One call to one model of one service."""

    kind: ClassVar[str] = "model"

    name: str
    path: str  # where in the graph, e.g. "steps[1].ensemble.branches[0]", for messages
    dependency: Dependency
    service: str
    model: str
    version: str  # "" = the service's default version
    inputs: Mapping[str, TensorRef]  # model input name -> where its tensor comes from
    outputs: tuple[str, ...] | None  # explicit outputs to request; None = what is read later
    timeout: float
    retries: int
    #: A response cache for this step's calls; None = every call goes downstream.
    cache: CacheSpec | None = None
    #: Payload capture of this step's calls; None = not captured.
    capture: CaptureSpec | None = None

    @property
    def label(self) -> str:
        """``service/model``: how the step's target is named in messages."""
        return f"{self.service}/{self.model}"

    def reads(self) -> tuple[TensorRef, ...]:
        return tuple(self.inputs.values())


@dataclass(frozen=True)
class SequenceStep(_StepKind):
    """Steps in order; it produces what its last step produces."""

    kind: ClassVar[str] = "sequence"

    name: str
    path: str
    dependency: Dependency
    steps: tuple[Step, ...]

    def children(self) -> tuple[Step, ...]:
        return self.steps

    def forwards(self) -> Step:
        return self.steps[-1]


@dataclass(frozen=True)
class Aggregate:
    """How an ensemble combines its branches: ``method`` over each branch's ``tensor``."""

    method: str
    tensor: str
    weights: Mapping[str, float] | None  # weighted_mean only: branch name -> weight

    @property
    def outputs(self) -> tuple[str, ...]:
        """The tensors the ensemble produces."""
        return AGGREGATORS[self.method].outputs(self.tensor)


@dataclass(frozen=True)
class EnsembleStep(_StepKind):
    """Branches in parallel, aggregated; succeeds when ``quorum`` branches succeed."""

    kind: ClassVar[str] = "ensemble"

    name: str
    path: str
    dependency: Dependency
    branches: tuple[Step, ...]
    aggregate: Aggregate
    quorum: int | None  # None: every hard branch and at least one branch

    @property
    def fixed_branches(self) -> bool:
        """True if every branch always takes part in the aggregate (no soft branch, no quorum)."""
        return self.quorum is None and all(b.dependency == "hard" for b in self.branches)

    def children(self) -> tuple[Step, ...]:
        return self.branches

    def reads(self) -> tuple[TensorRef, ...]:
        # The aggregate reads every branch; the ensemble's outputs are the aggregate's.
        return tuple(TensorRef(b.name, self.aggregate.tensor) for b in self.branches)


@dataclass(frozen=True)
class SwitchStep(_StepKind):
    """Runs ``then`` if the condition holds, else ``else_``; produces its ``outputs``."""

    kind: ClassVar[str] = "switch"

    name: str
    path: str
    dependency: Dependency
    condition: Condition
    then: tuple[Step, ...]
    else_: tuple[Step, ...]
    outputs: Mapping[str, OutputExpr]

    def children(self) -> tuple[Step, ...]:
        return self.then + self.else_

    def sources(self, tensor: str) -> tuple[TensorRef, ...]:
        return self.outputs[tensor].alternatives

    def reads(self) -> tuple[TensorRef, ...]:
        return (self.condition.ref, *(ref for expr in self.outputs.values() for ref in expr.alternatives))


@dataclass(frozen=True)
class SplitterBranch:
    """One weighted branch of a splitter."""

    weight: int
    step: ModelStep


@dataclass(frozen=True)
class SplitterStep(_StepKind):
    """Each request goes to exactly one branch, chosen at random by weight."""

    kind: ClassVar[str] = "splitter"

    name: str
    path: str
    dependency: Dependency
    branches: tuple[SplitterBranch, ...]

    def children(self) -> tuple[Step, ...]:
        return tuple(b.step for b in self.branches)

    # Not a forward: which branch answers is chosen per request, so the splitter holds the chosen
    # branch's outputs under its own name, and they are what every branch has in common.
    def sources(self, tensor: str) -> tuple[TensorRef, ...]:
        return tuple(TensorRef(b.step.name, tensor) for b in self.branches)

    def awaited(self) -> tuple[Step, ...]:
        return tuple(b.step for b in self.branches if b.weight > 0)  # weight 0: never chosen


@dataclass(frozen=True)
class MirrorStep(_StepKind):
    """Answers with ``primary``; ``shadow`` runs alongside, is compared on ``compare`` and dropped."""

    kind: ClassVar[str] = "mirror"

    name: str
    path: str
    dependency: Dependency
    primary: Step
    shadow: Step
    compare: str

    def children(self) -> tuple[Step, ...]:
        return (self.primary, self.shadow)

    def forwards(self) -> Step:
        return self.primary

    def reads(self) -> tuple[TensorRef, ...]:
        return (TensorRef(self.primary.name, self.compare), TensorRef(self.shadow.name, self.compare))

    def awaited(self) -> tuple[Step, ...]:
        return (self.primary,)  # the shadow is never awaited


#: Every step kind. A new kind is a class above, a member here, its parser in parse.py and its
#: rules in scope.py and signatures.py.
Step: TypeAlias = ModelStep | SequenceStep | EnsembleStep | SwitchStep | SplitterStep | MirrorStep
#: The composite step kinds, each a key of a step mapping.
STEP_KINDS: tuple[str, ...] = tuple(t.kind for t in get_args(Step) if t is not ModelStep)


def children(step: Step) -> tuple[Step, ...]:
    """The steps directly nested in ``step``."""
    return step.children()


def iter_steps(steps: Sequence[Step]) -> Iterator[Step]:
    """``steps`` and everything nested in them, depth first, in spec order."""
    for step in steps:
        yield step
        yield from iter_steps(step.children())


def forwarded_step(step: Step) -> Step | None:
    """The step whose outputs are ``step``'s outputs, or None if ``step`` makes its own.

    A sequence forwards its last step and a mirror its primary; the other kinds make their own
    outputs (a splitter's are those of the branch it chose for the request, held under its name).
    """
    return step.forwards()


def storage_name(step: Step) -> str:
    """The step whose outputs ``step``'s outputs are: sequences and mirrors forward another's."""
    while (forwarded := forwarded_step(step)) is not None:
        step = forwarded
    return step.name


def kind_of(step: Step) -> str:
    """``model``, ``sequence``, ``ensemble``, ``switch``, ``splitter`` or ``mirror``."""
    return step.kind


# ---------------------------------------------------------------------------------------------
# Graphs and the whole spec


@dataclass(frozen=True)
class GraphSpec:
    """One graph, served by the orchestrator as a model of the same name."""

    name: str
    timeout: float  # whole-request budget when the client sends no deadline
    inputs: tuple[TensorSpec, ...]
    steps: tuple[Step, ...]
    outputs: Mapping[str, OutputExpr]
    #: model step name -> the outputs to request from it (computed once; () = all outputs)
    requested_outputs: Mapping[str, tuple[str, ...]]
    #: A response cache for whole requests of this graph; None = every request runs the graph.
    cache: CacheSpec | None = None
    #: Payload capture of this graph's requests and answers; None = not captured.
    capture: CaptureSpec | None = None
    #: Tensors watched for drift (they need the graph's capture).
    drift: tuple[DriftSpec, ...] = ()

    def all_steps(self) -> Iterator[Step]:
        """Every step, nested ones included, in spec order."""
        return iter_steps(self.steps)

    def model_steps(self) -> Iterator[ModelStep]:
        """Every model step, nested ones included, in spec order."""
        return (s for s in iter_steps(self.steps) if isinstance(s, ModelStep))


@dataclass(frozen=True)
class ServiceSpec:
    """A logical service and where it listens (``host:port`` or e.g. ``dns:///host:port``; "" for
    a service of a mesh file, whose address its launcher passes in ONNXMESH_SERVICE_<NAME>_ADDRESS)."""

    name: str
    address: str


@dataclass(frozen=True)
class Defaults:
    """Per-step defaults (the graph timeout falls back to ``timeout`` too)."""

    timeout: float = 10.0
    retries: int = 2


@dataclass(frozen=True)
class MeshSpec:
    """A whole spec: services, defaults and graphs."""

    services: Mapping[str, ServiceSpec]
    defaults: Defaults
    graphs: Mapping[str, GraphSpec]
    #: Where the response caches keep their entries: ``local`` (each replica its own) or a
    #: ``redis://host:port/db`` URL (shared by every replica).
    cache_store: str = "local"

    def model_keys(self) -> tuple[SignatureKey, ...]:
        """Every (service, model, version) some graph calls: the signatures to fetch."""
        seen: dict[SignatureKey, None] = {}
        for graph in self.graphs.values():
            for step in graph.model_steps():
                seen[(step.service, step.model, step.version)] = None
        return tuple(seen)

    def hard_model_keys(self, graph: str) -> set[SignatureKey]:
        """The models ``graph`` cannot answer without: its readiness is theirs.

        Every model step not inside a soft step, leaving out mirror shadows (never awaited) and
        splitter branches of weight 0 (never chosen).
        """
        keys: set[SignatureKey] = set()

        def visit(step: Step) -> None:
            if step.dependency == "soft":
                return
            if isinstance(step, ModelStep):
                keys.add((step.service, step.model, step.version))
            for child in step.awaited():
                visit(child)

        for step in self.graphs[graph].steps:
            visit(step)
        return keys
