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

The package, one pass per module:

- ``steps``: the data model: the step kinds, graphs, the whole spec. Each step class states what
  it is structurally (children, the step it forwards, what it reads); ``forwarded_step`` is the
  one rule for whose outputs a sequence or mirror answers with, used by every pass below and, via
  ``storage_name``, by the engine.
- ``parse``: YAML -> dataclasses, round 1 up to the references.
- ``scope``: references and scoping, the tensors each step is known to produce, and the outputs to
  request from each model step; round 1's last part, run on each graph as it is parsed.
- ``signatures``: round 2, and the graphs' served signatures.
- ``errors``: ``SpecError`` and the location its messages start with.

Everything other modules use is importable from ``orchestrator.spec``.
"""

from orchestrator.spec.errors import SpecError
from orchestrator.spec.parse import MAX_RETRIES, load_spec, parse_spec
from orchestrator.spec.signatures import GRAPH_PLATFORM, validate_against_signatures
from orchestrator.spec.steps import (
    CONDITION_FUNCTIONS,
    CONDITION_OPERATORS,
    DEPENDENCIES,
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
    SignatureKey,
    SplitterBranch,
    SplitterStep,
    Step,
    SwitchStep,
    TensorRef,
    children,
    forwarded_step,
    iter_steps,
    kind_of,
    storage_name,
)

__all__ = [
    "CONDITION_FUNCTIONS",
    "CONDITION_OPERATORS",
    "DEPENDENCIES",
    "GRAPH_PLATFORM",
    "MAX_RETRIES",
    "REQUEST",
    "STEP_KINDS",
    "Aggregate",
    "CacheSpec",
    "CaptureSpec",
    "Condition",
    "Defaults",
    "Dependency",
    "DriftSpec",
    "EnsembleStep",
    "GraphSpec",
    "MeshSpec",
    "MirrorStep",
    "ModelStep",
    "OutputExpr",
    "SequenceStep",
    "ServiceSpec",
    "SignatureKey",
    "SpecError",
    "SplitterBranch",
    "SplitterStep",
    "Step",
    "SwitchStep",
    "TensorRef",
    "children",
    "forwarded_step",
    "iter_steps",
    "kind_of",
    "load_spec",
    "parse_spec",
    "storage_name",
    "validate_against_signatures",
]
