"""Static checks of references and scoping; computes the outputs to request from each model step.

Part of the first round of checks (``parse_spec`` runs them on each graph once it is parsed).
``check_scope`` walks a graph in execution order, tracking which steps each step may read:
``visible`` maps the steps readable here, ``hidden`` the steps that exist but cannot be read here,
with the reason; a name in neither runs later.

Each step kind has its rules here, in the tables at the end of the module: ``_CHECKS`` (check its
own reads and scope its children), ``_EXPORTS`` (what the steps after it may read of its children)
and ``_PRODUCES`` (the tensors it is known to produce). A step that forwards another's outputs
(``forwarded_step``) needs no ``_PRODUCES`` rule: it produces what the forwarded step produces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from orchestrator.spec.errors import _At
from orchestrator.spec.steps import (
    REQUEST,
    EnsembleStep,
    MirrorStep,
    ModelStep,
    OutputExpr,
    SequenceStep,
    SplitterStep,
    Step,
    SwitchStep,
    TensorRef,
    forwarded_step,
    iter_steps,
    kind_of,
)
from services.common.types import TensorSpec

_Visible: TypeAlias = dict[str, Step]
_Hidden: TypeAlias = dict[str, str]


def check_scope(
    graph: str,
    inputs: Sequence[TensorSpec],
    steps: tuple[Step, ...],
    outputs: Mapping[str, OutputExpr],
) -> dict[str, tuple[str, ...]]:
    """Check the references and scoping of a parsed graph; return the outputs to request.

    The result maps every model step to the outputs to request from it: its explicit ``outputs``,
    else every tensor read from it, directly or through the steps that forward its outputs.
    """
    return _GraphChecker(graph, inputs, steps, outputs).check()


def _descendants(step: Step) -> list[str]:
    return [s.name for s in iter_steps((step,))]


class _GraphChecker:
    """Walks a parsed graph in execution order, tracking which steps each step may read."""

    def __init__(
        self,
        graph: str,
        inputs: Sequence[TensorSpec],
        steps: tuple[Step, ...],
        outputs: Mapping[str, OutputExpr],
    ) -> None:
        self.graph = graph
        self.inputs = [t.name for t in inputs]
        self.steps = steps
        self.outputs = outputs
        self.index = {s.name: s for s in iter_steps(steps)}
        self.read_inputs: set[str] = set()

    def at(self, step: Step) -> _At:
        return _At(self.graph, step.path, step.name)

    def check(self) -> dict[str, tuple[str, ...]]:
        visible, hidden = self._sequence(self.steps, {}, {})
        for name, expr in self.outputs.items():
            at = _At(self.graph, f"outputs.{name}")
            for ref in expr.alternatives:
                self._ref(ref, visible, hidden, at, f"graph output {name!r}", consumer=None)
        unread = [n for n in self.inputs if n not in self.read_inputs]
        if unread:
            raise _At(self.graph, "inputs").error(
                f"graph input {unread[0]!r} is declared but nothing reads 'request.{unread[0]}'"
            )
        return self._requested_outputs()

    # Scoping

    def _sequence(
        self, steps: Sequence[Step], visible: _Visible, hidden: _Hidden
    ) -> tuple[_Visible, _Hidden]:
        visible, hidden = dict(visible), dict(hidden)
        for step in steps:
            self._step(step, visible, hidden)
            self._export(step, visible, hidden)
        return visible, hidden

    def _step(self, step: Step, visible: _Visible, hidden: _Hidden) -> None:
        inner = dict(hidden)
        inner[step.name] = f"step {step.name!r} encloses this step, so reading it would be a cycle"
        _CHECKS[type(step)](self, step, visible, hidden, inner)

    def _export(self, step: Step, visible: _Visible, hidden: _Hidden) -> None:
        """Make ``step`` (and what it lets through) readable by the steps after it."""
        visible[step.name] = step
        hidden.pop(step.name, None)
        _EXPORTS[type(step)](self, step, visible, hidden)

    def _parallel(
        self, parent: Step, branches: Sequence[Step], visible: _Visible, hidden: _Hidden, relation: str
    ) -> None:
        for branch in branches:
            siblings = dict(hidden)
            for other in branches:
                if other is not branch:
                    for name in _descendants(other):
                        siblings[name] = (
                            f"step {name!r} runs in parallel with this one ({relation} {parent.name!r}), "
                            "so its outputs are not available to it"
                        )
            self._step(branch, visible, siblings)

    def _ref(
        self,
        ref: TensorRef,
        visible: Mapping[str, Step],
        hidden: Mapping[str, str],
        at: _At,
        usage: str,
        *,
        consumer: str | None,
    ) -> None:
        if ref.step == REQUEST:
            if ref.tensor not in self.inputs:
                raise at.error(
                    f"{usage} reads '{ref}', but the graph has no input {ref.tensor!r}; "
                    f"graph inputs: {', '.join(self.inputs)}"
                )
            self.read_inputs.add(ref.tensor)
        elif ref.step == consumer:
            raise at.error(f"{usage} reads '{ref}', its own step's output (a cycle)")
        elif ref.step in visible:
            self._produces_or_fail(visible[ref.step], ref.tensor, at, f"{usage} reads '{ref}'")
        elif ref.step in hidden:
            raise at.error(f"{usage} cannot read '{ref}': {hidden[ref.step]}")
        elif ref.step in self.index:
            raise at.error(
                f"{usage} reads '{ref}', but step {ref.step!r} runs later (a forward reference, which "
                "would be a cycle); a step can read only the request and steps that ran before it"
            )
        else:
            readable = [REQUEST, *(n for n in visible if n != consumer)]
            raise at.error(
                f"{usage} reads '{ref}': unknown step {ref.step!r}; readable here: {', '.join(readable)}"
            )

    def _produces_or_fail(self, step: Step, tensor: str, at: _At, context: str) -> None:
        produced = self._produces(step)
        if produced is not None and tensor not in produced:
            raise at.error(
                f"{context}: {kind_of(step)} step {step.name!r} produces only "
                f"{', '.join(sorted(produced))}, not {tensor!r}"
            )

    def _produces(self, step: Step) -> frozenset[str] | None:
        """The tensors ``step`` produces, when known before the signatures are (None: not yet)."""
        forwarded = forwarded_step(step)
        if forwarded is not None:
            return self._produces(forwarded)
        return _PRODUCES[type(step)](self, step)

    # What each model step must be asked for: every tensor read from it, directly or through the
    # steps that answer with its outputs (``Step.sources``: the step a sequence or mirror
    # forwards, a splitter's branches, a switch output's alternatives). Computed once per graph,
    # used for every request.

    def _requested_outputs(self) -> dict[str, tuple[str, ...]]:
        model_steps = [s for s in self.index.values() if isinstance(s, ModelStep)]
        demand: dict[str, dict[str, None]] = {s.name: {} for s in model_steps}

        def want(ref: TensorRef) -> None:
            if ref.step == REQUEST:
                return
            if ref.step in demand:
                demand[ref.step][ref.tensor] = None
            for source in self.index[ref.step].sources(ref.tensor):
                want(source)

        for step in self.index.values():
            for ref in step.reads():
                want(ref)
        for expr in self.outputs.values():
            for ref in expr.alternatives:
                want(ref)
        # Scoping already proved that whatever is read is in an explicit list.
        return {s.name: s.outputs if s.outputs is not None else tuple(demand[s.name]) for s in model_steps}

    # The rules of each step kind, gathered in the tables below.
    # Checks: the step's own reads, then its children in their scopes. `hidden` is the scope
    # around the step, `inner` that of its children (the step itself hidden: reading it would be
    # a cycle).

    def _check_model(self, step: ModelStep, visible: _Visible, hidden: _Hidden, inner: _Hidden) -> None:
        at = self.at(step)
        for input_name, ref in step.inputs.items():
            self._ref(ref, visible, hidden, at, f"input {input_name!r}", consumer=step.name)

    def _check_sequence(self, step: SequenceStep, visible: _Visible, hidden: _Hidden, inner: _Hidden) -> None:
        self._sequence(step.steps, visible, inner)

    def _check_ensemble(self, step: EnsembleStep, visible: _Visible, hidden: _Hidden, inner: _Hidden) -> None:
        self._parallel(step, step.branches, visible, inner, "branches of ensemble")
        for branch in step.branches:
            self._produces_or_fail(
                branch,
                step.aggregate.tensor,
                self.at(branch),
                f"ensemble {step.name!r} aggregates {step.aggregate.tensor!r}",
            )

    def _check_switch(self, step: SwitchStep, visible: _Visible, hidden: _Hidden, inner: _Hidden) -> None:
        at = self.at(step)
        self._ref(
            step.condition.ref, visible, hidden, at.key("condition"), "the condition", consumer=step.name
        )
        scopes: dict[str, tuple[_Visible, _Hidden]] = {}
        for branch, steps, other in (("then", step.then, step.else_), ("else", step.else_, step.then)):
            branch_hidden = dict(inner)
            for name in (n for s in other for n in _descendants(s)):
                branch_hidden[name] = (
                    f"step {name!r} is in the other branch of switch {step.name!r}; only one branch runs"
                )
            scopes[branch] = self._sequence(steps, visible, branch_hidden)
        # The outputs read from either branch (whichever ran) and from before the switch.
        out_visible = {**scopes["then"][0], **scopes["else"][0]}
        out_hidden = {
            k: v for k, v in {**scopes["then"][1], **scopes["else"][1]}.items() if k not in out_visible
        }
        out_hidden[step.name] = inner[step.name]
        for out_name, expr in step.outputs.items():
            out_at = at.key(f"switch.outputs.{out_name}")
            for ref in expr.alternatives:
                self._ref(ref, out_visible, out_hidden, out_at, f"output {out_name!r}", consumer=step.name)
            for branch, (branch_visible, _) in scopes.items():
                if not any(r.step == REQUEST or r.step in branch_visible for r in expr.alternatives):
                    raise out_at.error(
                        f"output {out_name!r} = {expr.text!r} has no value when the {branch!r} branch "
                        "runs; add an alternative available then, e.g. 'a.x|b.x' with b from before "
                        "the switch"
                    )

    def _check_splitter(self, step: SplitterStep, visible: _Visible, hidden: _Hidden, inner: _Hidden) -> None:
        self._parallel(step, step.children(), visible, inner, "branches of splitter")

    def _check_mirror(self, step: MirrorStep, visible: _Visible, hidden: _Hidden, inner: _Hidden) -> None:
        self._parallel(step, [step.primary, step.shadow], visible, inner, "primary and shadow of mirror")
        for half in (step.primary, step.shadow):
            self._produces_or_fail(
                half, step.compare, self.at(half), f"mirror {step.name!r} compares {step.compare!r}"
            )

    # Exports: beyond the step itself, which of its children the steps after it may read.

    def _export_nothing(self, step: Step, visible: _Visible, hidden: _Hidden) -> None:
        pass

    def _export_children(self, step: Step, visible: _Visible, hidden: _Hidden) -> None:
        for child in step.children():
            self._export(child, visible, hidden)

    def _export_switch(self, step: SwitchStep, visible: _Visible, hidden: _Hidden) -> None:
        for name in _descendants(step)[1:]:
            hidden[name] = (
                f"step {name!r} is inside switch {step.name!r}, which may not run it; "
                f"read it through the switch's outputs ('{step.name}.<output>')"
            )

    def _export_splitter(self, step: SplitterStep, visible: _Visible, hidden: _Hidden) -> None:
        for b in step.branches:
            hidden[b.step.name] = (
                f"step {b.step.name!r} is a branch of splitter {step.name!r}, which runs one "
                f"branch per request; read '{step.name}.<tensor>' instead"
            )

    def _export_mirror(self, step: MirrorStep, visible: _Visible, hidden: _Hidden) -> None:
        self._export(step.primary, visible, hidden)
        for name in _descendants(step.shadow):
            hidden[name] = (
                f"step {name!r} is the shadow of mirror {step.name!r}, whose outputs are "
                f"compared and dropped; read '{step.name}.<tensor>' instead"
            )

    # Produced tensors, for the kinds that make their own outputs.

    def _produces_model(self, step: ModelStep) -> frozenset[str] | None:
        return None if step.outputs is None else frozenset(step.outputs)

    def _produces_ensemble(self, step: EnsembleStep) -> frozenset[str]:
        return frozenset(step.aggregate.outputs)

    def _produces_switch(self, step: SwitchStep) -> frozenset[str]:
        return frozenset(step.outputs)

    def _produces_splitter(self, step: SplitterStep) -> frozenset[str] | None:
        known = [self._produces(b.step) for b in step.branches]
        if any(k is None for k in known):
            return None
        return frozenset.intersection(*(k for k in known if k is not None))


# The step argument is the key's type: one rule per kind, looked up by ``type(step)``.
_Check: TypeAlias = Callable[[_GraphChecker, Any, _Visible, _Hidden, _Hidden], None]
_Export: TypeAlias = Callable[[_GraphChecker, Any, _Visible, _Hidden], None]
_Produces: TypeAlias = Callable[[_GraphChecker, Any], frozenset[str] | None]

_CHECKS: Mapping[type[Step], _Check] = {
    ModelStep: _GraphChecker._check_model,
    SequenceStep: _GraphChecker._check_sequence,
    EnsembleStep: _GraphChecker._check_ensemble,
    SwitchStep: _GraphChecker._check_switch,
    SplitterStep: _GraphChecker._check_splitter,
    MirrorStep: _GraphChecker._check_mirror,
}
_EXPORTS: Mapping[type[Step], _Export] = {
    ModelStep: _GraphChecker._export_nothing,
    SequenceStep: _GraphChecker._export_children,
    EnsembleStep: _GraphChecker._export_children,
    SwitchStep: _GraphChecker._export_switch,
    SplitterStep: _GraphChecker._export_splitter,
    MirrorStep: _GraphChecker._export_mirror,
}
_PRODUCES: Mapping[type[Step], _Produces] = {
    ModelStep: _GraphChecker._produces_model,
    EnsembleStep: _GraphChecker._produces_ensemble,
    SwitchStep: _GraphChecker._produces_switch,
    SplitterStep: _GraphChecker._produces_splitter,
}
