"""How the mesh's cost grows with the graph: serial chains and fan-outs of 1..N cheap steps, and a cached graph.

The steps are identity models (`echo-<k>`: `features` FP32 [-1,64] -> `echo`, one ONNX Identity
node, microseconds), so what a row costs is the mesh's own: one more hop per serial step, one
more concurrent call per branch. Built at bench time into a temporary directory:

    <tmp>/model_a/echo-1, echo-3, ...        the odd steps on model_a, the even on model_b, so
    <tmp>/model_b/echo-2, echo-4, ...        consecutive hops alternate services
    <tmp>/model_a/digits-mlp, model_b/...    links to the demo models (for the cached graph)
    <tmp>/graphs.yaml                        chain-1..N, fanout-1..N, digits-serial-cached

Each branch and each step has a model of its own, so coalescing never stacks two branches of one
request into one call (the fan-out row measures concurrent calls, not stacking).

    chain-3:   features -> echo-1 -> echo-2 -> echo-3 -> echo
    fanout-3:  features -> (echo-1 || echo-2 || echo-3) -> mean -> echo
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import TensorProto, helper

from bench.models import DEFAULT_DIRS
from demo.topology import DEFAULT_PORTS, MODEL_A, MODEL_B, MODEL_SERVICES

DEFAULT_MAX_STEPS = 4
#: The demo's graph with a whole-graph response cache: the cache row of the report.
CACHED_GRAPH = "digits-serial-cached"
CACHE_OPTIONS = {"entries": 4096, "bytes": 16 * 1024 * 1024, "ttl": 300.0}
ECHO_IR_VERSION = 10
ECHO_OPSET = 17


def chain(n: int) -> str:
    return f"chain-{n}"


def fanout(n: int) -> str:
    return f"fanout-{n}"


def echo_model(name: str) -> onnx.ModelProto:
    """`features` FP32 [batch, 64] -> `echo`, the same values (one Identity node)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["echo"])],
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("echo", TensorProto.FLOAT, ["batch", 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ECHO_OPSET)])
    model.ir_version = ECHO_IR_VERSION  # what the pinned onnxruntime reads
    return model


def service_of(k: int) -> str:
    return MODEL_A if k % 2 else MODEL_B


def _step(k: int, source: str) -> dict[str, Any]:
    return {"name": f"s{k}", "service": service_of(k), "model": f"echo-{k}", "inputs": {"features": source}}


def spec(max_steps: int, digits_serial: dict[str, Any]) -> dict[str, Any]:
    """The growth spec: chains and fan-outs of 1..max_steps, and the cached digits-serial."""
    features = [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}]
    graphs: dict[str, Any] = {}
    for n in range(1, max_steps + 1):
        steps = [_step(k, "request.features" if k == 1 else f"s{k - 1}.echo") for k in range(1, n + 1)]
        graphs[chain(n)] = {"inputs": features, "steps": steps, "outputs": {"echo": f"s{n}.echo"}}
    for n in range(1, max_steps + 1):
        branches = [_step(k, "request.features") for k in range(1, n + 1)]
        fan = {
            "name": "fan",
            "ensemble": {"aggregate": {"method": "mean", "tensor": "echo"}, "branches": branches},
        }
        graphs[fanout(n)] = {"inputs": features, "steps": [fan], "outputs": {"echo": "fan.echo"}}
    graphs[CACHED_GRAPH] = {**digits_serial, "cache": dict(CACHE_OPTIONS)}
    services = {name: {"address": f"127.0.0.1:{port}"} for name, port in _ADDRESSES.items()}
    return {"services": services, "defaults": {"timeout": 2.0, "retries": 2}, "graphs": graphs}


#: Placeholders: the launcher points the orchestrator at the real ports (ONNXMESH_SERVICE_*_ADDRESS).
_ADDRESSES = {service: DEFAULT_PORTS[service] for service in MODEL_SERVICES}


@dataclass(frozen=True)
class GrowthSetup:
    dirs: dict[str, Path]
    graphs: Path
    max_steps: int

    @property
    def names(self) -> list[str]:
        n = range(1, self.max_steps + 1)
        return [*(chain(k) for k in n), *(fanout(k) for k in n)]


def build(root: Path, default_graphs: Path, max_steps: int = DEFAULT_MAX_STEPS) -> GrowthSetup:
    """Write the echo models, the links to the demo models and the spec under `root`."""
    dirs = {MODEL_A: root / MODEL_A, MODEL_B: root / MODEL_B}
    for service, directory in dirs.items():
        directory.mkdir(parents=True)
        for model in DEFAULT_DIRS[service].iterdir():
            (directory / model.name).symlink_to(model, target_is_directory=True)
    for k in range(1, max_steps + 1):
        version = dirs[service_of(k)] / f"echo-{k}" / "1"
        version.mkdir(parents=True)
        onnx.save(echo_model(f"echo-{k}"), str(version / "model.onnx"))
    default = yaml.safe_load(default_graphs.read_text())
    path = root / "graphs.yaml"
    path.write_text(yaml.safe_dump(spec(max_steps, default["graphs"]["digits-serial"]), sort_keys=False))
    return GrowthSetup(dirs, path, max_steps)
