"""The graph spec: YAML -> frozen dataclasses, checked before anything runs.

A spec names the services (logical name -> address), per-step defaults and the graphs. A graph is
a sequence of steps; a step is a model step (one call to one model of one service) or a composite:
``sequence``, ``ensemble``, ``switch``, ``splitter`` or ``mirror``, nested arbitrarily. The user
reference with examples is docs/graphs.md.

Checks happen in two rounds, both raising ``SpecError`` whose message says where (graph and step
path), what is wrong and what was expected:

1. ``parse_spec`` / ``load_spec``: everything knowable from the spec alone: keys (typos are caught
   and the allowed keys listed), types and ranges, services, step names, references and their
   scoping (no forward references or cycles), aggregators, quorums, conditions, switch outputs.
2. ``validate_against_signatures``: tensors against the models' signatures (names, datatypes,
   shapes), once the orchestrator has fetched them through ``Stage.metadata``. It also computes
   the signature the orchestrator serves for each graph.

Scoping, in short: a step reads the request and the steps that ran before it, including steps
nested in earlier sequences, ensembles and mirror primaries. Steps inside a switch are read through
the switch's ``outputs``; a splitter and a mirror are read by their own name; the branches of one
ensemble (and a mirror's primary and shadow) run in parallel and cannot read each other.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import numpy as np
import yaml

from orchestrator.aggregators import AGGREGATORS, NUMERIC_DATATYPES, unify_shape
from services.common.types import DATATYPE_TO_NUMPY, ModelSignature, TensorSpec

#: The pseudo-step whose tensors are the graph's inputs: ``request.<input>``.
REQUEST = "request"
#: The composite step kinds, each a key of a step mapping.
STEP_KINDS = ("sequence", "ensemble", "switch", "splitter", "mirror")
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
#: ``platform`` of the signatures the orchestrator serves for graphs.
GRAPH_PLATFORM = "onnxmesh_graph"
#: Upper bound on ``retries``: more would turn an outage into a retry storm.
MAX_RETRIES = 10

Dependency: TypeAlias = Literal["hard", "soft"]
#: (service, model, version as written in the spec, "" = the service's default)
SignatureKey: TypeAlias = tuple[str, str, str]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_GRAPH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
# Step names hold no dot, so everything after the first dot is the tensor name: ONNX tensor names
# such as "logits.1" stay readable.
_REF = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)\.([^\s|]+)\Z")
_ARGMAX = re.compile(r"\s*argmax\((.*)\)\s*\Z")
_CONDITION = re.compile(r"\s*(\w+)\(\s*([^\s()]+)\s*\)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*\Z")
_REF_FORMS = "'<step>.<tensor>' or 'request.<input>'"
_CONDITION_FORM = (
    "'<fn>(<step>.<tensor>) <op> <number>' with fn one of max, min, mean and op one of <, <=, >, >=, ==, !="
)


class SpecError(Exception):
    """The spec is invalid. The message says where, what is wrong and what was expected."""


# ---------------------------------------------------------------------------------------------
# The data model. Frozen: a parsed spec is shared by every request and never changes.
# (Mapping fields hold read-only views, so these dataclasses compare by value but are not hashable.)


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
        rows = array.reshape(1, -1) if array.ndim == 0 else array.reshape(array.shape[0], -1)
        if rows.size == 0:
            return False
        per_row = CONDITION_FUNCTIONS[self.fn](rows, axis=1)
        return bool(np.any(CONDITION_OPERATORS[self.op](per_row, self.value)))


@dataclass(frozen=True)
class ModelStep:
    """One call to one model of one service."""

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

    @property
    def label(self) -> str:
        """``service/model``: how the step's target is named in messages."""
        return f"{self.service}/{self.model}"


@dataclass(frozen=True)
class SequenceStep:
    """Steps in order; it produces what its last step produces."""

    name: str
    path: str
    dependency: Dependency
    steps: tuple[Step, ...]


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
class EnsembleStep:
    """Branches in parallel, aggregated; succeeds when ``quorum`` branches succeed."""

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


@dataclass(frozen=True)
class SwitchStep:
    """Runs ``then`` if the condition holds, else ``else_``; produces its ``outputs``."""

    name: str
    path: str
    dependency: Dependency
    condition: Condition
    then: tuple[Step, ...]
    else_: tuple[Step, ...]
    outputs: Mapping[str, OutputExpr]


@dataclass(frozen=True)
class SplitterBranch:
    """One weighted branch of a splitter."""

    weight: int
    step: ModelStep


@dataclass(frozen=True)
class SplitterStep:
    """Each request goes to exactly one branch, chosen at random by weight."""

    name: str
    path: str
    dependency: Dependency
    branches: tuple[SplitterBranch, ...]


@dataclass(frozen=True)
class MirrorStep:
    """Answers with ``primary``; ``shadow`` runs alongside, is compared on ``compare`` and dropped."""

    name: str
    path: str
    dependency: Dependency
    primary: Step
    shadow: Step
    compare: str


Step: TypeAlias = ModelStep | SequenceStep | EnsembleStep | SwitchStep | SplitterStep | MirrorStep


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

    def all_steps(self) -> Iterator[Step]:
        """Every step, nested ones included, in spec order."""
        return iter_steps(self.steps)

    def model_steps(self) -> Iterator[ModelStep]:
        """Every model step, nested ones included, in spec order."""
        return (s for s in iter_steps(self.steps) if isinstance(s, ModelStep))


@dataclass(frozen=True)
class ServiceSpec:
    """A logical service and where it listens (``host:port`` or e.g. ``dns:///host:port``)."""

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
            elif isinstance(step, MirrorStep):
                visit(step.primary)
            elif isinstance(step, SplitterStep):
                for branch in step.branches:
                    if branch.weight > 0:
                        visit(branch.step)
            else:
                for child in children(step):
                    visit(child)

        for step in self.graphs[graph].steps:
            visit(step)
        return keys


def children(step: Step) -> tuple[Step, ...]:
    """The steps directly nested in ``step``."""
    if isinstance(step, SequenceStep):
        return step.steps
    if isinstance(step, EnsembleStep):
        return step.branches
    if isinstance(step, SwitchStep):
        return step.then + step.else_
    if isinstance(step, SplitterStep):
        return tuple(b.step for b in step.branches)
    if isinstance(step, MirrorStep):
        return (step.primary, step.shadow)
    return ()


def iter_steps(steps: Sequence[Step]) -> Iterator[Step]:
    """``steps`` and everything nested in them, depth first, in spec order."""
    for step in steps:
        yield step
        yield from iter_steps(children(step))


def storage_name(step: Step) -> str:
    """The step whose outputs ``step``'s outputs are: sequences and mirrors forward another's."""
    while isinstance(step, SequenceStep | MirrorStep):
        step = step.steps[-1] if isinstance(step, SequenceStep) else step.primary
    return step.name


def kind_of(step: Step) -> str:
    """``model``, ``sequence``, ``ensemble``, ``switch``, ``splitter`` or ``mirror``."""
    return "model" if isinstance(step, ModelStep) else type(step).__name__.removesuffix("Step").lower()


# ---------------------------------------------------------------------------------------------
# Parsing


def load_spec(path: str | Path) -> MeshSpec:
    """Read and check a spec file (YAML)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read the spec {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        return parse_spec(text)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def parse_spec(source: str | Mapping[str, Any]) -> MeshSpec:
    """Check a spec given as YAML text or as the already-loaded mapping."""
    if isinstance(source, str):
        try:
            raw: Any = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise SpecError(f"the spec is not valid YAML: {exc}") from None
    else:
        raw = source
    return _parse_mesh(raw)


@dataclass(frozen=True)
class _At:
    """Where something is in the spec; renders the prefix of every SpecError."""

    graph: str | None
    path: str
    step: str | None = None

    def key(self, key: str) -> _At:
        return _At(self.graph, f"{self.path}.{key}" if self.path else key, self.step)

    def index(self, i: int) -> _At:
        return _At(self.graph, f"{self.path}[{i}]", self.step)

    def named(self, step: str) -> _At:
        return _At(self.graph, self.path, step)

    def error(self, problem: str) -> SpecError:
        where = [f"graph {self.graph!r}"] if self.graph is not None else []
        if self.path:
            where.append(f"at {self.path}" if self.graph is not None else self.path)
        if self.step is not None:
            where.append(f"(step {self.step!r})")
        return SpecError(f"{' '.join(where) or 'spec'}: {problem}")


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def _check_keys(
    raw: Mapping[Any, Any], at: _At, allowed: Sequence[str], required: Sequence[str], what: str
) -> None:
    for key in raw:
        if not isinstance(key, str) or key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise at.error(f"unknown key {key!r} in {what}{hint}; allowed keys: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            raise at.error(f"{what} is missing the required key {key!r}")


def _mapping(value: Any, at: _At, what: str, *, non_empty: bool = True) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise at.error(f"{what} must be a mapping, got {_type_name(value)}")
    if non_empty and not value:
        raise at.error(f"{what} is empty")
    return value


def _list(value: Any, at: _At, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise at.error(f"{what} must be a list, got {_type_name(value)}")
    if not value:
        raise at.error(f"{what} is empty")
    return value


def _yaml_hint(value: Any) -> str:
    # YAML 1.1 reads yes/no/on/off/true/false as booleans: a step named `off` is False.
    return " (YAML reads yes/no/on/off as booleans: quote it)" if isinstance(value, bool) else ""


def _string(value: Any, at: _At, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise at.error(f"{what} must be a non-empty string, got {value!r}{_yaml_hint(value)}")
    return value


def _name(value: Any, at: _At, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise at.error(
            f"{what} must be a name of letters, digits, '_' and '-' starting with a letter or '_', "
            f"got {value!r}{_yaml_hint(value)}"
        )
    return value


def _timeout(value: Any, at: _At) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise at.error(f"timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _retries(value: Any, at: _At) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise at.error(f"retries must be an integer from 0 to {MAX_RETRIES}, got {value!r}")
    return value


def _parse_ref(text: Any, at: _At, usage: str) -> TensorRef:
    match = _REF.match(text) if isinstance(text, str) else None
    if match is None:
        raise at.error(f"{usage}: bad reference {text!r}; expected {_REF_FORMS}")
    return TensorRef(match[1], match[2])


def _parse_output(text: Any, at: _At, usage: str) -> OutputExpr:
    if not isinstance(text, str):
        raise at.error(f"{usage} must be a reference string, got {_type_name(text)}")
    argmax = _ARGMAX.match(text)
    body = argmax[1] if argmax else text
    alternatives = tuple(_parse_ref(part.strip(), at, usage) for part in body.split("|"))
    return OutputExpr(alternatives, argmax is not None, text)


def _parse_condition(text: Any, at: _At) -> Condition:
    match = _CONDITION.match(text) if isinstance(text, str) else None
    if match is None or match[1] not in CONDITION_FUNCTIONS:
        raise at.error(f"bad condition {text!r}; expected {_CONDITION_FORM}")
    try:
        value = float(match[4])
    except ValueError:
        raise at.error(f"bad condition {text!r}: {match[4]!r} is not a number") from None
    if not math.isfinite(value):
        raise at.error(f"bad condition {text!r}: the number must be finite")
    ref = _parse_ref(match[2], at, "the condition")
    return Condition(match[1], ref, match[3], value, text.strip())


def _parse_mesh(raw: Any) -> MeshSpec:
    top = _At(None, "")
    if not isinstance(raw, Mapping):
        raise SpecError(
            f"the spec must be a mapping with keys services, defaults, graphs; got {_type_name(raw)}"
        )
    _check_keys(raw, top, ("services", "defaults", "graphs"), ("services", "graphs"), "the spec")

    services: dict[str, ServiceSpec] = {}
    for name, body in _mapping(raw["services"], top.key("services"), "services").items():
        at = top.key("services").key(str(name))
        _name(name, at, "a service name")
        _check_keys(_mapping(body, at, f"service {name!r}"), at, ("address",), ("address",), "a service")
        services[name] = ServiceSpec(name, _string(body["address"], at.key("address"), "address"))

    defaults = Defaults()
    if "defaults" in raw:
        at = top.key("defaults")
        body = _mapping(raw["defaults"], at, "defaults", non_empty=False)
        _check_keys(body, at, ("timeout", "retries"), (), "defaults")
        defaults = Defaults(
            _timeout(body.get("timeout", defaults.timeout), at.key("timeout")),
            _retries(body.get("retries", defaults.retries), at.key("retries")),
        )

    graphs: dict[str, GraphSpec] = {}
    for name, body in _mapping(raw["graphs"], top.key("graphs"), "graphs").items():
        if not isinstance(name, str) or not _GRAPH_NAME.match(name):
            raise top.key("graphs").error(f"bad graph name {name!r}: use letters, digits, '_', '.' and '-'")
        graphs[name] = _GraphParser(name, services, defaults).parse(body)
    return MeshSpec(MappingProxyType(services), defaults, MappingProxyType(graphs))


_MODEL_KEYS = ("name", "service", "model", "version", "inputs", "outputs", "timeout", "retries")


class _GraphParser:
    """Parses one graph; step names are global per graph, so it keeps the registry."""

    def __init__(self, graph: str, services: Mapping[str, ServiceSpec], defaults: Defaults) -> None:
        self.graph = graph
        self.services = services
        self.defaults = defaults
        self.paths: dict[str, str] = {}  # step name -> path, to report duplicates

    def parse(self, raw: Any) -> GraphSpec:
        at = _At(self.graph, "")
        body = _mapping(raw, at, "a graph", non_empty=False)
        _check_keys(body, at, ("timeout", "inputs", "steps", "outputs"), (), "a graph")
        if not body.get("steps"):
            raise at.error("the graph has no steps; expected a non-empty list under 'steps'")
        for key, what in (("inputs", "the graph inputs"), ("outputs", "the graph outputs")):
            if not body.get(key):
                raise at.error(f"{what} are missing; expected a non-empty {key!r}")
        timeout = _timeout(body.get("timeout", self.defaults.timeout), at.key("timeout"))
        inputs = self._inputs(body["inputs"], at.key("inputs"))
        steps = self._steps(body["steps"], at.key("steps"), "steps")
        outputs: dict[str, OutputExpr] = {}
        for name, text in _mapping(body["outputs"], at.key("outputs"), "outputs").items():
            out_at = at.key("outputs").key(str(name))
            _string(name, out_at, "an output name")
            outputs[name] = _parse_output(text, out_at, f"graph output {name!r}")
        requested = _GraphChecker(self.graph, inputs, steps, outputs).check()
        return GraphSpec(
            self.graph, timeout, inputs, steps, MappingProxyType(outputs), MappingProxyType(requested)
        )

    def _inputs(self, raw: Any, at: _At) -> tuple[TensorSpec, ...]:
        specs: list[TensorSpec] = []
        for i, item in enumerate(_list(raw, at, "inputs")):
            item_at = at.index(i)
            body = _mapping(item, item_at, "a graph input")
            _check_keys(
                body, item_at, ("name", "datatype", "shape"), ("name", "datatype", "shape"), "a graph input"
            )
            name = _string(body["name"], item_at.key("name"), "an input name")
            if any(s.name == name for s in specs):
                raise item_at.error(f"duplicate graph input {name!r}")
            datatype = body["datatype"]
            if datatype not in DATATYPE_TO_NUMPY:
                raise item_at.key("datatype").error(
                    f"unknown datatype {datatype!r}; expected one of: {', '.join(DATATYPE_TO_NUMPY)}"
                )
            shape = body["shape"]
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
            ):
                raise item_at.key("shape").error(
                    f"shape must be a list of sizes (-1 for any size), got {shape!r}"
                )
            specs.append(TensorSpec(name, datatype, tuple(shape)))
        return tuple(specs)

    def _steps(self, raw: Any, at: _At, what: str) -> tuple[Step, ...]:
        return tuple(self._step(item, at.index(i)) for i, item in enumerate(_list(raw, at, what)))

    def _register(self, raw: Mapping[Any, Any], at: _At) -> tuple[str, _At]:
        if "name" not in raw:
            raise at.error("the step has no 'name' (every step needs one, unique in the graph)")
        name = _name(raw["name"], at.key("name"), "a step name")
        if name == REQUEST:
            raise at.error(f"{REQUEST!r} is reserved for the graph inputs; choose another step name")
        if name in self.paths:
            raise at.named(name).error(
                f"duplicate step name {name!r}, already used at {self.paths[name]}; "
                "step names must be unique in a graph"
            )
        self.paths[name] = at.path
        return name, at.named(name)

    def _dependency(self, raw: Mapping[Any, Any], at: _At) -> Dependency:
        value = raw.get("dependency", "hard")
        if value == "hard":
            return "hard"
        if value == "soft":
            return "soft"
        raise at.key("dependency").error(f"bad dependency {value!r}; expected 'hard' or 'soft'")

    def _step(self, raw: Any, at: _At, *, governed: bool = False) -> Step:
        """A step mapping; ``governed``: the enclosing mirror or splitter sets its dependency."""
        if not isinstance(raw, Mapping):
            raise at.error(f"a step must be a mapping, got {_type_name(raw)}")
        name, at = self._register(raw, at)
        kinds = [k for k in STEP_KINDS if k in raw]
        if "service" in raw or "model" in raw:
            kinds.insert(0, "service/model")
        if len(kinds) > 1:
            raise at.error(f"a step has exactly one kind, this one has {' and '.join(kinds)}")
        if not kinds:
            raise at.error(
                "the step has no kind; expected 'service' and 'model' (a model step) "
                f"or one of {', '.join(STEP_KINDS)}"
            )
        if governed and "dependency" in raw:
            raise at.key("dependency").error(
                "'dependency' cannot be set here: the enclosing splitter or mirror's dependency applies"
            )
        common = ("name",) if governed else ("name", "dependency")
        dependency: Dependency = "hard" if governed else self._dependency(raw, at)
        if kinds[0] == "service/model":
            keys = _MODEL_KEYS if governed else (*_MODEL_KEYS, "dependency")
            _check_keys(raw, at, keys, ("service", "model", "inputs"), "a model step")
            return self._model(raw, at, name, dependency)
        kind = kinds[0]
        _check_keys(raw, at, (*common, kind), (), f"a {kind} step")
        body_at = at.key(kind)
        body = _mapping(raw[kind], body_at, kind)
        if kind == "sequence":
            _check_keys(body, body_at, ("steps",), ("steps",), "a sequence")
            steps = self._steps(body["steps"], body_at.key("steps"), "the sequence's steps")
            return SequenceStep(name, at.path, dependency, steps)
        if kind == "ensemble":
            return self._ensemble(body, body_at, name, at.path, dependency)
        if kind == "switch":
            return self._switch(body, body_at, name, at.path, dependency)
        if kind == "splitter":
            return self._splitter(body, body_at, name, at.path, dependency)
        _check_keys(
            body, body_at, ("primary", "shadow", "compare"), ("primary", "shadow", "compare"), "a mirror"
        )
        primary = self._step(body["primary"], body_at.key("primary"), governed=True)
        shadow = self._step(body["shadow"], body_at.key("shadow"), governed=True)
        compare = _string(body["compare"], body_at.key("compare"), "compare")
        return MirrorStep(name, at.path, dependency, primary, shadow, compare)

    def _model(self, raw: Mapping[Any, Any], at: _At, name: str, dependency: Dependency) -> ModelStep:
        service = _string(raw["service"], at.key("service"), "service")
        if service not in self.services:
            raise at.key("service").error(
                f"unknown service {service!r}; services in the spec: {', '.join(sorted(self.services))}"
            )
        model = _string(raw["model"], at.key("model"), "model")
        version = raw.get("version", "")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)  # YAML reads `version: 2` as a number
        if not isinstance(version, str):
            raise at.key("version").error(f"version must be a string, got {version!r}")
        inputs: dict[str, TensorRef] = {}
        inputs_at = at.key("inputs")
        for input_name, text in _mapping(raw["inputs"], inputs_at, "inputs").items():
            _string(input_name, inputs_at, "a model input name")
            inputs[input_name] = _parse_ref(text, inputs_at.key(input_name), f"input {input_name!r}")
        outputs: tuple[str, ...] | None = None
        if "outputs" in raw:
            out_at = at.key("outputs")
            listed = [_string(o, out_at, "an output name") for o in _list(raw["outputs"], out_at, "outputs")]
            if len(set(listed)) != len(listed):
                raise out_at.error(f"outputs lists a name twice: {listed}")
            outputs = tuple(listed)
        return ModelStep(
            name,
            at.path,
            dependency,
            service,
            model,
            version,
            MappingProxyType(inputs),
            outputs,
            _timeout(raw.get("timeout", self.defaults.timeout), at.key("timeout")),
            _retries(raw.get("retries", self.defaults.retries), at.key("retries")),
        )

    def _ensemble(
        self, body: Mapping[Any, Any], at: _At, name: str, path: str, dependency: Dependency
    ) -> EnsembleStep:
        _check_keys(body, at, ("branches", "aggregate", "quorum"), ("branches", "aggregate"), "an ensemble")
        branches = self._steps(body["branches"], at.key("branches"), "the ensemble's branches")
        agg_at = at.key("aggregate")
        agg = _mapping(body["aggregate"], agg_at, "aggregate")
        _check_keys(agg, agg_at, ("method", "tensor", "weights"), ("method", "tensor"), "aggregate")
        method = agg["method"]
        if method not in AGGREGATORS:
            raise agg_at.key("method").error(
                f"unknown aggregator {method!r}; expected one of: {', '.join(AGGREGATORS)}"
            )
        tensor = _string(agg["tensor"], agg_at.key("tensor"), "tensor")
        weights: dict[str, float] | None = None
        names = [b.name for b in branches]
        if method == "weighted_mean":
            if "weights" not in agg:
                raise agg_at.error(
                    f"weighted_mean needs 'weights': a weight for each branch ({', '.join(names)})"
                )
            weights = self._weights(agg["weights"], agg_at.key("weights"), names)
        elif "weights" in agg:
            raise agg_at.key("weights").error(f"weights apply only to weighted_mean, not to {method!r}")
        quorum = body.get("quorum")
        if quorum is not None:
            if isinstance(quorum, bool) or not isinstance(quorum, int):
                raise at.key("quorum").error(f"quorum must be an integer, got {quorum!r}")
            if quorum < 1:
                raise at.key("quorum").error(f"quorum must be at least 1, got {quorum}")
            if quorum > len(branches):
                raise at.key("quorum").error(
                    f"quorum {quorum} is more than the {len(branches)} branches of the ensemble"
                )
        aggregate = Aggregate(method, tensor, None if weights is None else MappingProxyType(weights))
        return EnsembleStep(name, path, dependency, branches, aggregate, quorum)

    @staticmethod
    def _weights(raw: Any, at: _At, names: Sequence[str]) -> dict[str, float]:
        given = _mapping(raw, at, "weights")
        missing = [n for n in names if n not in given]
        if missing:
            raise at.error(f"weights missing for branch(es): {', '.join(missing)}")
        extra = [str(n) for n in given if n not in names]
        if extra:
            raise at.error(
                f"weights given for unknown branch(es): {', '.join(extra)}; branches: {', '.join(names)}"
            )
        weights: dict[str, float] = {}
        for n in names:
            w = given[n]
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < math.inf:
                raise at.key(n).error(f"a weight must be a non-negative number, got {w!r}")
            weights[n] = float(w)
        if not any(weights.values()):
            raise at.error("all weights are 0; at least one must be positive")
        return weights

    def _switch(
        self, body: Mapping[Any, Any], at: _At, name: str, path: str, dependency: Dependency
    ) -> SwitchStep:
        _check_keys(
            body, at, ("condition", "then", "else", "outputs"), ("condition", "then", "outputs"), "a switch"
        )
        condition = _parse_condition(body["condition"], at.key("condition"))
        then = self._steps(body["then"], at.key("then"), "then")
        else_ = self._steps(body["else"], at.key("else"), "else") if body.get("else") else ()
        outputs: dict[str, OutputExpr] = {}
        out_at = at.key("outputs")
        for out_name, text in _mapping(body["outputs"], out_at, "the switch's outputs").items():
            _string(out_name, out_at, "an output name")
            outputs[out_name] = _parse_output(text, out_at.key(out_name), f"output {out_name!r}")
        return SwitchStep(name, path, dependency, condition, then, else_, MappingProxyType(outputs))

    def _splitter(
        self, body: Mapping[Any, Any], at: _At, name: str, path: str, dependency: Dependency
    ) -> SplitterStep:
        _check_keys(body, at, ("branches",), ("branches",), "a splitter")
        branches: list[SplitterBranch] = []
        branches_at = at.key("branches")
        for i, raw in enumerate(_list(body["branches"], branches_at, "the splitter's branches")):
            b_at = branches_at.index(i)
            item = dict(_mapping(raw, b_at, "a splitter branch"))
            if "weight" not in item:
                raise b_at.error("a splitter branch needs a 'weight' (a non-negative integer)")
            weight = item.pop("weight")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise b_at.key("weight").error(f"weight must be a non-negative integer, got {weight!r}")
            if any(k in item for k in STEP_KINDS):
                raise b_at.error("splitter branches are model steps (service, model, ...)")
            step = self._step(item, b_at, governed=True)
            assert isinstance(step, ModelStep)
            branches.append(SplitterBranch(weight, step))
        if not any(b.weight for b in branches):
            raise branches_at.error("every splitter weight is 0; at least one must be positive")
        return SplitterStep(name, path, dependency, tuple(branches))


# ---------------------------------------------------------------------------------------------
# Static checks of references and scoping; computes the outputs to request from each model step.


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

    # Scoping. `visible`: steps readable here; `hidden`: steps that exist but cannot be read here,
    # with the reason. A name in neither runs later.

    def _sequence(
        self, steps: Sequence[Step], visible: dict[str, Step], hidden: dict[str, str]
    ) -> tuple[dict[str, Step], dict[str, str]]:
        visible, hidden = dict(visible), dict(hidden)
        for step in steps:
            self._step(step, visible, hidden)
            self._export(step, visible, hidden)
        return visible, hidden

    def _export(self, step: Step, visible: dict[str, Step], hidden: dict[str, str]) -> None:
        """Make ``step`` (and what it lets through) readable by the steps after it."""
        visible[step.name] = step
        hidden.pop(step.name, None)
        if isinstance(step, SequenceStep | EnsembleStep):
            for child in children(step):
                self._export(child, visible, hidden)
        elif isinstance(step, SwitchStep):
            for name in _descendants(step)[1:]:
                hidden[name] = (
                    f"step {name!r} is inside switch {step.name!r}, which may not run it; "
                    f"read it through the switch's outputs ('{step.name}.<output>')"
                )
        elif isinstance(step, SplitterStep):
            for b in step.branches:
                hidden[b.step.name] = (
                    f"step {b.step.name!r} is a branch of splitter {step.name!r}, which runs one "
                    f"branch per request; read '{step.name}.<tensor>' instead"
                )
        elif isinstance(step, MirrorStep):
            self._export(step.primary, visible, hidden)
            for name in _descendants(step.shadow):
                hidden[name] = (
                    f"step {name!r} is the shadow of mirror {step.name!r}, whose outputs are "
                    f"compared and dropped; read '{step.name}.<tensor>' instead"
                )

    def _step(self, step: Step, visible: dict[str, Step], hidden: dict[str, str]) -> None:
        at = self.at(step)
        inner = dict(hidden)
        inner[step.name] = f"step {step.name!r} encloses this step, so reading it would be a cycle"
        if isinstance(step, ModelStep):
            for input_name, ref in step.inputs.items():
                self._ref(ref, visible, hidden, at, f"input {input_name!r}", consumer=step.name)
        elif isinstance(step, SequenceStep):
            self._sequence(step.steps, visible, inner)
        elif isinstance(step, EnsembleStep):
            self._parallel(step, step.branches, visible, inner, "branches of ensemble")
            for branch in step.branches:
                self._produces_or_fail(
                    branch,
                    step.aggregate.tensor,
                    self.at(branch),
                    f"ensemble {step.name!r} aggregates {step.aggregate.tensor!r}",
                )
        elif isinstance(step, SwitchStep):
            self._switch(step, visible, hidden, inner)
        elif isinstance(step, SplitterStep):
            self._parallel(step, [b.step for b in step.branches], visible, inner, "branches of splitter")
        else:
            self._parallel(step, [step.primary, step.shadow], visible, inner, "primary and shadow of mirror")
            for half in (step.primary, step.shadow):
                self._produces_or_fail(
                    half, step.compare, self.at(half), f"mirror {step.name!r} compares {step.compare!r}"
                )

    def _parallel(
        self,
        parent: Step,
        branches: Sequence[Step],
        visible: dict[str, Step],
        hidden: dict[str, str],
        relation: str,
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

    def _switch(
        self, step: SwitchStep, visible: dict[str, Step], hidden: dict[str, str], inner: dict[str, str]
    ) -> None:
        at = self.at(step)
        self._ref(
            step.condition.ref, visible, hidden, at.key("condition"), "the condition", consumer=step.name
        )
        scopes: dict[str, tuple[dict[str, Step], dict[str, str]]] = {}
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
        if isinstance(step, ModelStep):
            return None if step.outputs is None else frozenset(step.outputs)
        if isinstance(step, SequenceStep):
            return self._produces(step.steps[-1])
        if isinstance(step, EnsembleStep):
            return frozenset(step.aggregate.outputs)
        if isinstance(step, SwitchStep):
            return frozenset(step.outputs)
        if isinstance(step, SplitterStep):
            known = [self._produces(b.step) for b in step.branches]
            if any(k is None for k in known):
                return None
            return frozenset.intersection(*(k for k in known if k is not None))
        return self._produces(step.primary)

    # What each model step must be asked for: every tensor read from it, directly or through the
    # composite steps that forward its outputs. Computed once per graph, used for every request.

    def _requested_outputs(self) -> dict[str, tuple[str, ...]]:
        demand: dict[str, dict[str, None]] = {
            s.name: {} for s in self.index.values() if isinstance(s, ModelStep)
        }

        def want(ref: TensorRef) -> None:
            if ref.step == REQUEST:
                return
            step = self.index[ref.step]
            if isinstance(step, ModelStep):
                demand[step.name][ref.tensor] = None
            elif isinstance(step, SequenceStep):
                want(TensorRef(step.steps[-1].name, ref.tensor))
            elif isinstance(step, SwitchStep):
                for alt in step.outputs[ref.tensor].alternatives:
                    want(alt)
            elif isinstance(step, SplitterStep):
                for b in step.branches:
                    want(TensorRef(b.step.name, ref.tensor))
            elif isinstance(step, MirrorStep):
                want(TensorRef(step.primary.name, ref.tensor))
            # An ensemble's aggregate always reads its branches; that demand is added below.

        for step in self.index.values():
            if isinstance(step, ModelStep):
                for ref in step.inputs.values():
                    want(ref)
            elif isinstance(step, EnsembleStep):
                for branch in step.branches:
                    want(TensorRef(branch.name, step.aggregate.tensor))
            elif isinstance(step, SwitchStep):
                want(step.condition.ref)
                for expr in step.outputs.values():
                    for ref in expr.alternatives:
                        want(ref)
            elif isinstance(step, MirrorStep):
                want(TensorRef(step.primary.name, step.compare))
                want(TensorRef(step.shadow.name, step.compare))
        for expr in self.outputs.values():
            for ref in expr.alternatives:
                want(ref)
        requested: dict[str, tuple[str, ...]] = {}
        for name, tensors in demand.items():
            step = self.index[name]
            assert isinstance(step, ModelStep)
            # Scoping already proved that whatever is read is in an explicit list.
            requested[name] = step.outputs if step.outputs is not None else tuple(tensors)
        return requested


# ---------------------------------------------------------------------------------------------
# Checks against the models' signatures


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
        # step name -> the specs of the tensors it produces (request = the graph inputs)
        self.env: dict[str, dict[str, TensorSpec]] = {REQUEST: {t.name: t for t in graph.inputs}}

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

    def _spec(self, ref: TensorRef, at: _At, usage: str) -> TensorSpec:
        produced = self.env.get(ref.step)
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
            self._step(step)

    def _step(self, step: Step) -> None:
        at = self.at(step)
        if isinstance(step, ModelStep):
            self.env[step.name] = self._model(step, at)
        elif isinstance(step, SequenceStep):
            self._steps(step.steps)
            self.env[step.name] = self.env[step.steps[-1].name]
        elif isinstance(step, EnsembleStep):
            self._steps(step.branches)
            tensor = step.aggregate.tensor
            branch_specs = [
                self._spec(TensorRef(b.name, tensor), self.at(b), "the aggregate") for b in step.branches
            ]
            try:
                produced = AGGREGATORS[step.aggregate.method].output_specs(
                    tensor, branch_specs, fixed_branches=step.fixed_branches
                )
            except ValueError as exc:
                raise at.key("ensemble.aggregate").error(f"{step.aggregate.method}: {exc}") from None
            self.env[step.name] = produced
        elif isinstance(step, SwitchStep):
            cond = self._spec(step.condition.ref, at.key("switch.condition"), "the condition")
            if cond.datatype not in NUMERIC_DATATYPES:
                raise at.key("switch.condition").error(
                    f"the condition needs a numeric tensor, '{step.condition.ref}' is {cond.describe()}"
                )
            self._steps(step.then)
            self._steps(step.else_)
            self.env[step.name] = {
                name: self._expr(name, expr, at.key(f"switch.outputs.{name}"), f"output {name!r}")
                for name, expr in step.outputs.items()
            }
        elif isinstance(step, SplitterStep):
            self._steps([b.step for b in step.branches])
            first = step.branches[0].step
            produced = {}
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
            self.env[step.name] = produced
        else:
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
            self.env[step.name] = self.env[step.primary.name]

    def _model(self, step: ModelStep, at: _At) -> dict[str, TensorSpec]:
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
        produced: dict[str, TensorSpec] = {}
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
