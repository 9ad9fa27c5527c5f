"""The OCR mesh's steps in one process: the same Python steps (the example's model.py files, with
their config.json) and the same ONNX files, called one after the other with no hop between them.

What `python -m bench.ocr` measures the mesh against: served by the Python runtime on one node
(`python -m services.common.model_node --name ocr --runtime python --model-dir
examples/ocr/all-in-one`). The recognizer sees one page's lines per call (no batching across pages).
"""

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

#: The example's folder, from <example>/all-in-one/ocr-all/1/.
EXAMPLE = Path(__file__).resolve().parents[3]


def python_step(service: str, model: str) -> Any:
    version_dir = EXAMPLE / service / model / "1"
    spec = importlib.util.spec_from_file_location(f"ocr_all_{service}", version_dir / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (cls,) = (c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__)
    step = cls()
    step.load(version_dir, json.loads((EXAMPLE / service / model / "config.json").read_text()))
    return step


class AllInOne:
    def load(self, version_dir: Path, config: dict[str, Any]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(config["parameters"]["ort_threads"])
        options.inter_op_num_threads = 1

        def session(service: str, model: str) -> ort.InferenceSession:
            path = EXAMPLE / service / model / "1" / "model.onnx"
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        self.decode = python_step("decode", "ocr-decode")
        self.detect = session("detect", "ppocr-det")
        self.boxes = python_step("boxes", "ocr-boxes")
        self.angle = session("angle", "ppocr-cls")
        self.rotate = python_step("rotate", "ocr-rotate")
        self.recognize = session("recognize", "ppocr-rec")
        self.ctc = python_step("ctc", "ocr-ctc")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pre = self.decode.predict(inputs)
        (probability,) = self.detect.run(None, {"x": pre["det_input"]})
        lines = self.boxes.predict(
            {"probability": probability, "image": pre["image"], "geometry": pre["geometry"]}
        )
        rec_input = lines["rec_input"]
        if len(rec_input):
            (angles,) = self.angle.run(None, {"x": lines["cls_input"]})
            rotated = self.rotate.predict(
                {"rec_input": rec_input, "widths": lines["widths"], "angles": angles}
            )
            (probabilities,) = self.recognize.run(None, {"x": rotated["rec_input"]})
        else:
            probabilities = np.zeros((0, 0, 6625), dtype=np.float32)
        return self.ctc.predict({"probabilities": probabilities, "boxes": lines["boxes"]})
