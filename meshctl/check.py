"""`onnxmesh check MESH`: the mesh file, every model directory and every graph, without starting a node.

The file is checked first (meshctl.mesh). Then every model version is loaded as its node would
load it: the ONNX runtime opens each model.onnx, the Python runtime imports each model.py and runs
its class's `load` (user code: the same code the node would run). Last, each graph is checked
against the signatures found, as the orchestrator checks it at start-up. Every problem is listed;
the exit code is 1 when there is any.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from types import MappingProxyType

from meshctl.mesh import Mesh, Node
from orchestrator.spec import SpecError, validate_against_signatures
from orchestrator.spec.steps import SignatureKey
from services.common.model import Model
from services.common.model_node import RUNTIMES
from services.common.repository import scan_repository
from services.common.settings import ServerSettings
from services.common.types import ModelSignature


@dataclasses.dataclass
class CheckReport:
    """What `check_models` found: one line per model and graph, and the problems."""

    lines: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    #: (service, model, version) -> signature; version "" stands for the latest.
    signatures: dict[SignatureKey, ModelSignature] = dataclasses.field(default_factory=dict)


def check_models(mesh: Mesh, say: Callable[[str], None] = print) -> CheckReport:
    """Load every model of `mesh` and check every graph against their signatures."""
    report = CheckReport()
    with ThreadPoolExecutor(1) as executor:
        for node in mesh.services.values():
            _check_service(mesh, node, executor, report, say)
    checked = {
        name: graph
        for name, graph in mesh.spec.graphs.items()
        if not {step.service for step in graph.model_steps()} & set(mesh.external)
    }
    for name, graph in mesh.spec.graphs.items():
        if name not in checked:
            say(f"graph {name}: calls a service the mesh only knows by address; not checked")
            continue
        one = dataclasses.replace(mesh.spec, graphs=MappingProxyType({name: graph}))
        try:
            (signature,) = validate_against_signatures(one, report.signatures).values()
        except SpecError as exc:
            report.problems.append(f"{mesh.path}: graphs.{name}: {exc}")
            say(f"graph {name}: FAILED")
        except KeyError as exc:  # a model a step names that its service does not serve
            report.problems.append(
                f"{mesh.path}: graphs.{name}: no model {exc.args[0]} (service, model, version)"
            )
            say(f"graph {name}: FAILED")
        else:
            say(f"graph {name}: ok  {_describe(signature)}")
    return report


def _check_service(
    mesh: Mesh, node: Node, executor: Executor, report: CheckReport, say: Callable[[str], None]
) -> None:
    assert node.model_dir is not None
    factory, filename = RUNTIMES[node.runtime]
    settings = ServerSettings(service=node.name, model_dir=node.model_dir, runtime=node.runtime)
    where = f"{mesh.path}: services.{node.name}"
    try:
        entries, failures = scan_repository(node.model_dir, filename)
    except OSError as exc:
        report.problems.append(f"{where}: {exc}")
        return
    for failure in failures:
        report.problems.append(f"{where}: model {failure.name} version {failure.version}: {failure.reason}")
    if not entries and not failures:
        report.problems.append(f"{where}: no <model>/<version>/{filename or ''} under {node.model_dir}")
    latest: dict[str, ModelSignature] = {}
    for entry in entries:
        try:
            servable = factory(entry, settings, executor)
            model = getattr(servable, "inner", servable)
            assert isinstance(model, Model)
            model.load_sync()
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            report.problems.append(
                f"{where}: model {entry.name} version {entry.version} does not load: {reason}"
            )
            say(f"{node.name}: {entry.name} v{entry.version} FAILED")
            continue
        signature = model.signature
        report.signatures[(node.name, entry.name, entry.version)] = signature
        latest[entry.name] = signature
        say(f"{node.name} ({node.runtime}): {entry.name} v{entry.version} ok  {_describe(signature)}")
    for name, signature in latest.items():
        report.signatures[(node.name, name, "")] = signature


def _describe(signature: ModelSignature) -> str:
    inputs = ", ".join(f"{t.name} {t.describe()}" for t in signature.inputs)
    outputs = ", ".join(f"{t.name} {t.describe()}" for t in signature.outputs)
    return f"({inputs}) -> ({outputs})"
