"""Small meshes for tests: a Python model (x -> 2x) and an ONNX model (y -> -y), built in a
temporary folder, and the mesh file that runs them behind one graph."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import TensorProto, helper

DOUBLE = """
class Double:
    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""


def onnx_negate(path: Path) -> None:
    """y FP32 [-1, 2] -> z = -y."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["z"])],
        "negate",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True)
    onnx.save(model, path)


def python_model(root: Path, name: str, code: str, config: dict[str, Any]) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(textwrap.dedent(code))
    (root / name / "config.json").write_text(json.dumps(config))


SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}


def build_folder(root: Path) -> Path:
    """`root` with models/double (Python) and models/negate (ONNX)."""
    python_model(root / "models/double", "double", DOUBLE, SIGNATURE)
    onnx_negate(root / "models/negate/negate/1/model.onnx")
    return root


def mesh(folder: Path, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "services": {
            "double": {"runtime": "python", "model_dir": "models/double", "replicas": 2},
            "negate": {"runtime": "onnx", "model_dir": "models/negate"},
        },
        "graphs": {
            "double-negate": {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
                "steps": [
                    {"name": "d", "service": "double", "model": "double", "inputs": {"x": "request.x"}},
                    {"name": "n", "service": "negate", "model": "negate", "inputs": {"y": "d.y"}},
                ],
                "outputs": {"z": "n.z"},
            }
        },
    }
    body.update(changes)
    return body


def write(folder: Path, body: dict[str, Any]) -> Path:
    path = folder / "mesh.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path
