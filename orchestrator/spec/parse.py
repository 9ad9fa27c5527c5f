"""Parsing: YAML (or an already-loaded mapping) -> the frozen dataclasses of steps.py.

The first round of checks: everything knowable from the spec alone. Keys (typos are caught and the
allowed keys listed), types and ranges, services, step names, aggregators, quorums, conditions are
checked here, while parsing; each graph's references and scoping are then checked by scope.py
before the next graph is parsed.

Each composite kind has one parser method, found through ``_PARSERS`` by its key in the step
mapping; model steps, told apart by their ``service``/``model`` keys, have ``_model``.
"""

from __future__ import annotations

import difflib
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

import yaml

from orchestrator.graph.aggregators import AGGREGATORS
from orchestrator.spec.errors import Problems, SpecError, _At
from orchestrator.spec.scope import check_scope
from orchestrator.spec.steps import (
    CONDITION_FUNCTIONS,
    REQUEST,
    STEP_KINDS,
    Aggregate,
    CacheSpec,
    CaptureSpec,
    Condition,
    Defaults,
    Dependency,
    DriftSpec,
    EnsembleStep,
    GraphSpec,
    MeshSpec,
    MirrorStep,
    ModelStep,
    OutputExpr,
    SequenceStep,
    ServiceSpec,
    SplitterBranch,
    SplitterStep,
    Step,
    SwitchStep,
    TensorRef,
)
from services.common.types import DATATYPE_TO_NUMPY, TensorSpec

#: Keys of a mesh file (meshctl/mesh.py) beside the spec's, at the top and per service: the
#: orchestrator reads a mesh file as its spec and leaves these to `onnxmesh check` and the launcher.
MESH_KEYS = ("base_port", "images", "orchestrator", "client")
MESH_SERVICE_KEYS = ("runtime", "model_dir", "replicas", "resources", "settings", "requirements", "port")

#: Upper bound on ``retries``: more would turn an outage into a retry storm.
MAX_RETRIES = 10

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


def load_spec(path: str | Path) -> MeshSpec:
    """Read and check a spec file (YAML)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read the spec {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        return parse_spec(text, origin=str(path))
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}", [f"{path}: {p}" for p in exc.problems]) from None


def parse_spec(source: str | Mapping[str, Any], *, origin: str | None = None) -> MeshSpec:
    """Check a spec given as YAML text or as the already-loaded mapping; every problem found is
    reported in one SpecError. `origin`: the file the text came from, named by YAML errors."""
    if isinstance(source, str):
        stream = io.StringIO(source)
        stream.name = origin or "the spec"  # what YAML's messages say instead of "<unicode string>"
        try:
            raw: Any = yaml.safe_load(stream)
        except yaml.YAMLError as exc:
            raise SpecError(f"the spec is not valid YAML: {exc}") from None
    else:
        raw = source
    return _parse_mesh(raw)


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


_CACHE_KEYS = ("entries", "bytes", "ttl")
_CACHE_STORE = re.compile(r"(local|rediss?://\S+)\Z")


def _cache(value: Any, at: _At) -> CacheSpec | None:
    """``cache: true`` (the defaults), ``false``, or ``{entries, bytes, ttl}``."""
    if value is True:
        return CacheSpec()
    if value is False or value is None:
        return None
    body = _mapping(value, at, "cache", non_empty=False)
    _check_keys(body, at, _CACHE_KEYS, (), "cache")
    default = CacheSpec()
    bounds = {}
    for key in ("entries", "bytes"):
        bound = body.get(key, getattr(default, key))
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
            raise at.key(key).error(f"{key} must be a positive integer, got {bound!r}")
        bounds[key] = bound
    ttl = body.get("ttl", default.ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise at.key("ttl").error(f"ttl must be a positive number of seconds, got {ttl!r}")
    return CacheSpec(bounds["entries"], bounds["bytes"], float(ttl))


_CAPTURE_KEYS = ("rate", "inputs", "outputs", "tensors", "max_bytes")


def _capture(value: Any, at: _At) -> CaptureSpec | None:
    """``capture: true`` (every request, every tensor), ``false``, or
    ``{rate, inputs, outputs, tensors, max_bytes}``."""
    if value is True:
        return CaptureSpec()
    if value is False or value is None:
        return None
    body = _mapping(value, at, "capture", non_empty=False)
    _check_keys(body, at, _CAPTURE_KEYS, (), "capture")
    default = CaptureSpec()
    rate = body.get("rate", default.rate)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
        raise at.key("rate").error(f"rate must be a number from 0 to 1 (the share captured), got {rate!r}")
    flags = {}
    for key in ("inputs", "outputs"):
        flag = body.get(key, getattr(default, key))
        if not isinstance(flag, bool):
            raise at.key(key).error(f"{key} must be true or false, got {flag!r}")
        flags[key] = flag
    if not (flags["inputs"] or flags["outputs"]):
        raise at.error("capture keeps neither inputs nor outputs; set one of them to true")
    tensors: tuple[str, ...] = ()
    if "tensors" in body:
        t_at = at.key("tensors")
        tensors = tuple(_string(t, t_at, "a tensor name") for t in _list(body["tensors"], t_at, "tensors"))
    max_bytes = body.get("max_bytes", default.max_bytes)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise at.key("max_bytes").error(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return CaptureSpec(float(rate), flags["inputs"], flags["outputs"], tensors, max_bytes)


_DRIFT_KEYS = ("reference", "window")


def _drift(
    raw: Any,
    at: _At,
    capture: CaptureSpec | None,
    inputs: Sequence[TensorSpec],
    outputs: Mapping[str, OutputExpr],
) -> tuple[DriftSpec, ...]:
    """``drift: {input.<name> | output.<name>: {reference: FILE, window: N}, ...}``."""
    if raw is None:
        return ()
    body = _mapping(raw, at, "drift")
    if capture is None:
        raise at.error("drift is computed from the captured records: the graph needs 'capture'")
    drifts = []
    for tensor, item in body.items():
        t_at = at.key(str(tensor))
        side, _, name = str(tensor).partition(".")
        names = {t.name for t in inputs} if side == "input" else set(outputs) if side == "output" else set()
        if name not in names:
            raise t_at.error(
                f"drift watches 'input.<name>' or 'output.<name>' of the graph, got {tensor!r}; inputs: "
                f"{', '.join(t.name for t in inputs)}; outputs: {', '.join(outputs)}"
            )
        kept = capture.inputs if side == "input" else capture.outputs
        if not kept or (capture.tensors and name not in capture.tensors):
            raise t_at.error(f"the graph's capture does not keep {tensor!r}, so its drift cannot be computed")
        spec = _mapping(item, t_at, f"drift of {tensor}")
        _check_keys(spec, t_at, _DRIFT_KEYS, ("reference",), f"drift of {tensor}")
        window = spec.get("window", DriftSpec.window)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise t_at.key("window").error(f"window must be a positive number of records, got {window!r}")
        reference = _string(spec["reference"], t_at.key("reference"), "reference (a file)")
        drifts.append(DriftSpec(str(tensor), reference, window))
    return tuple(drifts)


def _cache_store(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not _CACHE_STORE.match(value):
        raise at.error(f"cache_store must be 'local' or a redis://host:port/db URL, got {value!r}")
    return value


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
    _check_keys(
        raw,
        top,
        ("services", "defaults", "graphs", "cache_store", *MESH_KEYS),
        ("services", "graphs"),
        "the spec",
    )
    cache_store = _cache_store(raw.get("cache_store", "local"), top.key("cache_store"))

    problems = Problems()
    services: dict[str, ServiceSpec] = {}
    for name, body in _mapping(raw["services"], top.key("services"), "services").items():
        with problems.part():
            at = top.key("services").key(str(name))
            _name(name, at, "a service name")
            _check_keys(
                _mapping(body, at, f"service {name!r}"), at, ("address", *MESH_SERVICE_KEYS), (), "a service"
            )
            if "address" in body:
                services[name] = ServiceSpec(name, _string(body["address"], at.key("address"), "address"))
            elif "runtime" in body:
                # A service the mesh runs: whoever starts it tells the orchestrator where it is.
                services[name] = ServiceSpec(name, "")
            else:
                raise at.error(
                    "a service needs an address (one the mesh only calls) or a runtime (one it runs)"
                )

    defaults = Defaults()
    if "defaults" in raw:
        with problems.part():
            at = top.key("defaults")
            body = _mapping(raw["defaults"], at, "defaults", non_empty=False)
            _check_keys(body, at, ("timeout", "retries"), (), "defaults")
            defaults = Defaults(
                _timeout(body.get("timeout", defaults.timeout), at.key("timeout")),
                _retries(body.get("retries", defaults.retries), at.key("retries")),
            )

    graphs: dict[str, GraphSpec] = {}
    for name, body in _mapping(raw["graphs"], top.key("graphs"), "graphs").items():
        with problems.part():
            if not isinstance(name, str) or not _GRAPH_NAME.match(name):
                raise top.key("graphs").error(
                    f"bad graph name {name!r}: use letters, digits, '_', '.' and '-'"
                )
            graphs[name] = _GraphParser(name, services, defaults).parse(body)
    problems.check()
    return MeshSpec(MappingProxyType(services), defaults, MappingProxyType(graphs), cache_store)


_MODEL_KEYS = (
    "name",
    "service",
    "model",
    "version",
    "inputs",
    "outputs",
    "timeout",
    "retries",
    "cache",
    "capture",
)


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
        _check_keys(
            body, at, ("timeout", "inputs", "steps", "outputs", "cache", "capture", "drift"), (), "a graph"
        )
        if not body.get("steps"):
            raise at.error("the graph has no steps; expected a non-empty list under 'steps'")
        for key, what in (("inputs", "the graph inputs"), ("outputs", "the graph outputs")):
            if not body.get(key):
                raise at.error(f"{what} are missing; expected a non-empty {key!r}")
        # Independent parts, each reported; the scope checks need them all.
        problems = Problems()
        timeout = self.defaults.timeout
        inputs: tuple[TensorSpec, ...] = ()
        steps: tuple[Step, ...] = ()
        with problems.part():
            timeout = _timeout(body.get("timeout", self.defaults.timeout), at.key("timeout"))
        with problems.part():
            inputs = self._inputs(body["inputs"], at.key("inputs"))
        with problems.part():
            steps = self._steps(body["steps"], at.key("steps"), "steps")
        outputs: dict[str, OutputExpr] = {}
        with problems.part():
            for name, text in _mapping(body["outputs"], at.key("outputs"), "outputs").items():
                out_at = at.key("outputs").key(str(name))
                with problems.part():
                    _string(name, out_at, "an output name")
                    outputs[name] = _parse_output(text, out_at, f"graph output {name!r}")
        problems.check()
        requested = check_scope(self.graph, inputs, steps, outputs)
        return GraphSpec(
            self.graph,
            timeout,
            inputs,
            steps,
            MappingProxyType(outputs),
            MappingProxyType(requested),
            _cache(body.get("cache"), at.key("cache")),
            capture := self._graph_capture(body.get("capture"), at.key("capture"), inputs, outputs),
            _drift(body.get("drift"), at.key("drift"), capture, inputs, outputs),
        )

    def _graph_capture(
        self, raw: Any, at: _At, inputs: Sequence[TensorSpec], outputs: Mapping[str, OutputExpr]
    ) -> CaptureSpec | None:
        capture = _capture(raw, at)
        known = {t.name for t in inputs} | set(outputs)
        unknown = [t for t in capture.tensors if t not in known] if capture else []
        if unknown:
            raise at.key("tensors").error(
                f"unknown tensor(s) {', '.join(unknown)}; the graph's inputs and outputs are "
                f"{', '.join(sorted(known))}"
            )
        return capture

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
            if not isinstance(datatype, str) or datatype not in DATATYPE_TO_NUMPY:
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
        """Every step of a list, or one SpecError with the problems of each that has any."""
        problems = Problems()
        steps: list[Step] = []
        for i, item in enumerate(_list(raw, at, what)):
            with problems.part():
                steps.append(self._step(item, at.index(i)))
        problems.check()
        return tuple(steps)

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
        return _PARSERS[kind](self, body, body_at, name, at.path, dependency)

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
            _cache(raw.get("cache"), at.key("cache")),
            _capture(raw.get("capture"), at.key("capture")),
        )

    # The composite kinds: the body under the kind's key, where it is, and the step's name, path
    # and dependency.

    def _sequence(
        self, body: Mapping[Any, Any], at: _At, name: str, path: str, dependency: Dependency
    ) -> SequenceStep:
        _check_keys(body, at, ("steps",), ("steps",), "a sequence")
        steps = self._steps(body["steps"], at.key("steps"), "the sequence's steps")
        return SequenceStep(name, path, dependency, steps)

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

    def _mirror(
        self, body: Mapping[Any, Any], at: _At, name: str, path: str, dependency: Dependency
    ) -> MirrorStep:
        _check_keys(body, at, ("primary", "shadow", "compare"), ("primary", "shadow", "compare"), "a mirror")
        primary = self._step(body["primary"], at.key("primary"), governed=True)
        shadow = self._step(body["shadow"], at.key("shadow"), governed=True)
        compare = _string(body["compare"], at.key("compare"), "compare")
        return MirrorStep(name, path, dependency, primary, shadow, compare)


_Parser: TypeAlias = Callable[[_GraphParser, Mapping[Any, Any], _At, str, str, Dependency], Step]
#: The parser of each composite kind, by its key in a step mapping.
_PARSERS: Mapping[str, _Parser] = {
    SequenceStep.kind: _GraphParser._sequence,
    EnsembleStep.kind: _GraphParser._ensemble,
    SwitchStep.kind: _GraphParser._switch,
    SplitterStep.kind: _GraphParser._splitter,
    MirrorStep.kind: _GraphParser._mirror,
}
