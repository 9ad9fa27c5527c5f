"""The second round of checks: tensors against the models' signatures; the graphs' signatures.

Run once the orchestrator has fetched the signatures through ``Stage.metadata``. The graph is
walked in execution order, recording the spec (datatype, shape) of every tensor each step
produces; each read is checked against them, and the graph's outputs give the signature the
orchestrator serves for it.

Each step kind has one rule in ``_CHECKS``: it checks the step (its children first, through
``_steps``) and returns the specs of the outputs the step makes itself. A step that forwards
another's outputs makes none (its rule returns None): reads of it are looked up under
``storage_name``, as the engine looks them up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from orchestrator.graph.aggregators import AGGREGATORS, NUMERIC_DATATYPES, unify_shape
from orchestrator.spec.errors import _At
from orchestrator.spec.steps import (
    REQUEST,
    EnsembleStep,
    GraphSpec,
    MeshSpec,
    MirrorStep,
    ModelStep,
    OutputExpr,
    SequenceStep,
    SignatureKey,
    SplitterStep,
    Step,
    SwitchStep,
    TensorRef,
    storage_name,
)
from services.common.types import ModelSignature, TensorSpec

#: ``platform`` of the signatures the orchestrator serves for graphs.
GRAPH_PLATFORM = "onnxmesh_graph"

_Produced: TypeAlias = dict[str, TensorSpec]


def validate_against_signatures(
    spec: MeshSpec, signatures: Mapping[SignatureKey, ModelSignature]
) -> dict[str, ModelSignature]:
    """Check every connected tensor against the models' signatures; return the graphs' signatures.

    ``signatures`` maps each of ``spec.model_keys()`` to what the service's ModelMetadata answered.
    Checked: every producing output exists on its model and every consuming input on its model,
    datatypes are equal and shapes compatible (same rank; -1 matches any size), every model input
    is connected, and the graph inputs agree with the inputs of the steps that read them. Raises
    SpecError naming the graph and step. Returns graph name -> the signature the orchestrator
    serves for it (inputs as declared; outputs as the references produce them).
    """
    return {name: _SignatureChecker(graph, signatures).check() for name, graph in spec.graphs.items()}


class _SignatureChecker:
    def __init__(self, graph: GraphSpec, signatures: Mapping[SignatureKey, ModelSignature]) -> None:
        self.graph = graph
        self.signatures = signatures
        # step name -> the step holding its outputs (itself, or the one it forwards)
        self.storage = {s.name: storage_name(s) for s in graph.all_steps()}
        self.storage[REQUEST] = REQUEST
        # step holding outputs -> the specs of the tensors it produces (request = the graph inputs)
        self.env: dict[str, _Produced] = {REQUEST: {t.name: t for t in graph.inputs}}

    def at(self, step: Step) -> _At:
        return _At(self.graph.name, step.path, step.name)

    def check(self) -> ModelSignature:
        self._steps(self.graph.steps)
        outputs: list[TensorSpec] = []
        for name, expr in self.graph.outputs.items():
            at = _At(self.graph.name, f"outputs.{name}")
            outputs.append(self._expr(name, expr, at, f"graph output {name!r}"))
        return ModelSignature(
            name=self.graph.name,
            versions=("1",),
            platform=GRAPH_PLATFORM,
            inputs=self.graph.inputs,
            outputs=tuple(outputs),
        )

    def _produced(self, step: str) -> _Produced | None:
        """The specs of what ``step`` (a step name or ``request``) produces; None: not run yet."""
        return self.env.get(self.storage[step])

    def _spec(self, ref: TensorRef, at: _At, usage: str) -> TensorSpec:
        produced = self._produced(ref.step)
        if produced is None:  # pragma: no cover - parse_spec's scoping rules this out
            raise at.error(f"{usage}: {ref.step!r} has not run here")
        spec = produced.get(ref.tensor)
        if spec is None:
            where = "the graph inputs are" if ref.step == REQUEST else f"step {ref.step!r} produces"
            raise at.error(
                f"{usage} reads '{ref}', but {where} only {', '.join(sorted(produced)) or 'nothing'}"
            )
        return spec

    def _expr(self, name: str, expr: OutputExpr, at: _At, usage: str) -> TensorSpec:
        specs = [self._spec(ref, at, usage) for ref in expr.alternatives]
        datatype, shape = specs[0].datatype, specs[0].shape
        for ref, spec in zip(expr.alternatives[1:], specs[1:], strict=True):
            if spec.datatype != datatype or unify_shape(shape, spec.shape) is None:
                raise at.error(
                    f"{usage}: the alternatives disagree: '{expr.alternatives[0]}' is "
                    f"{specs[0].describe()} but '{ref}' is {spec.describe()}"
                )
            # Either alternative may answer, so only sizes they share stay fixed.
            shape = tuple(a if a == b else -1 for a, b in zip(shape, spec.shape, strict=True))
        if expr.argmax:
            if datatype not in NUMERIC_DATATYPES or not shape:
                raise at.error(
                    f"{usage}: argmax needs a numeric tensor of rank >= 1, '{expr.alternatives[0]}' "
                    f"is {datatype}{list(shape)}"
                )
            return TensorSpec(name, "INT64", shape[:-1])
        return TensorSpec(name, datatype, shape)

    def _steps(self, steps: Sequence[Step]) -> None:
        for step in steps:
            produced = _CHECKS[type(step)](self, step)
            if produced is not None:
                self.env[step.name] = produced

    # The rule of each step kind (the table `_CHECKS` below): check the step, children first;
    # return the specs of the outputs it makes itself, None if it forwards another's.

    def _model(self, step: ModelStep) -> _Produced:
        at = self.at(step)
        key = (step.service, step.model, step.version)
        sig = self.signatures.get(key)
        version = f" version {step.version!r}" if step.version else ""
        target = f"model {step.model!r}{version} of service {step.service!r}"
        if sig is None:
            raise at.error(f"no signature for {target} (its metadata was not fetched)")
        for input_name, ref in step.inputs.items():
            want = sig.input(input_name)
            if want is None:
                raise at.key("inputs").error(
                    f"{target} has no input {input_name!r}; its inputs: "
                    f"{', '.join(t.name for t in sig.inputs)}"
                )
            got = self._spec(ref, at.key("inputs"), f"input {input_name!r}")
            if got.datatype != want.datatype or unify_shape(got.shape, want.shape) is None:
                source = f"graph input {ref.tensor!r} is declared" if ref.step == REQUEST else f"'{ref}' is"
                raise at.key("inputs").error(
                    f"input {input_name!r} of {target} expects {want.describe()}, but {source} "
                    f"{got.describe()}"
                )
        unconnected = [t for t in sig.inputs if t.name not in step.inputs]
        if unconnected:
            raise at.key("inputs").error(
                f"{target} input {unconnected[0].name!r} ({unconnected[0].describe()}) is not connected"
            )
        requested = self.graph.requested_outputs.get(step.name) or tuple(t.name for t in sig.outputs)
        produced: _Produced = {}
        for name in requested:
            spec = sig.output(name)
            if spec is None:
                why = (
                    "listed in 'outputs'"
                    if step.outputs is not None
                    else f"read later as '{step.name}.{name}'"
                )
                raise at.error(
                    f"{target} has no output {name!r} ({why}); its outputs: "
                    f"{', '.join(t.name for t in sig.outputs)}"
                )
            produced[name] = spec
        return produced

    def _sequence(self, step: SequenceStep) -> None:
        self._steps(step.steps)

    def _ensemble(self, step: EnsembleStep) -> _Produced:
        self._steps(step.branches)
        tensor = step.aggregate.tensor
        branch_specs = [
            self._spec(TensorRef(b.name, tensor), self.at(b), "the aggregate") for b in step.branches
        ]
        try:
            return AGGREGATORS[step.aggregate.method].output_specs(
                tensor, branch_specs, fixed_branches=step.fixed_branches
            )
        except ValueError as exc:
            raise self.at(step).key("ensemble.aggregate").error(f"{step.aggregate.method}: {exc}") from None

    def _switch(self, step: SwitchStep) -> _Produced:
        at = self.at(step)
        cond = self._spec(step.condition.ref, at.key("switch.condition"), "the condition")
        if cond.datatype not in NUMERIC_DATATYPES:
            raise at.key("switch.condition").error(
                f"the condition needs a numeric tensor, '{step.condition.ref}' is {cond.describe()}"
            )
        self._steps(step.then)
        self._steps(step.else_)
        return {
            name: self._expr(name, expr, at.key(f"switch.outputs.{name}"), f"output {name!r}")
            for name, expr in step.outputs.items()
        }

    def _splitter(self, step: SplitterStep) -> _Produced:
        self._steps(step.children())
        first = step.branches[0].step
        produced: _Produced = {}
        for tensor, spec in self.env[first.name].items():
            for b in step.branches[1:]:
                other = self.env[b.step.name].get(tensor)
                if other is None:
                    break
                if other.datatype != spec.datatype or unify_shape(spec.shape, other.shape) is None:
                    raise self.at(b.step).error(
                        f"splitter {step.name!r}: branch {b.step.name!r} gives {tensor!r} as "
                        f"{other.describe()} but {first.name!r} gives {spec.describe()}; "
                        "every branch must answer alike"
                    )
            else:
                produced[tensor] = spec
        return produced

    def _mirror(self, step: MirrorStep) -> None:
        at = self.at(step)
        self._steps([step.primary, step.shadow])
        ref_p, ref_s = (
            TensorRef(step.primary.name, step.compare),
            TensorRef(step.shadow.name, step.compare),
        )
        p = self._spec(ref_p, at, "compare")
        s = self._spec(ref_s, at, "compare")
        if p.datatype not in NUMERIC_DATATYPES:
            raise at.error(f"mirror compares '{ref_p}', which is {p.describe()}; it must be numeric")
        if p.datatype != s.datatype or unify_shape(p.shape, s.shape) is None:
            raise at.error(
                f"mirror compares '{ref_p}' ({p.describe()}) with '{ref_s}' ({s.describe()}); "
                "they must have the same datatype and compatible shapes"
            )


# The step argument is the key's type: one rule per kind, looked up by ``type(step)``.
_Check: TypeAlias = Callable[[_SignatureChecker, Any], _Produced | None]

_CHECKS: Mapping[type[Step], _Check] = {
    ModelStep: _SignatureChecker._model,
    SequenceStep: _SignatureChecker._sequence,
    EnsembleStep: _SignatureChecker._ensemble,
    SwitchStep: _SignatureChecker._switch,
    SplitterStep: _SignatureChecker._splitter,
    MirrorStep: _SignatureChecker._mirror,
}
