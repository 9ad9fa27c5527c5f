"""The digits preprocessor: raw 8x8 images (0..16) -> standardized features for the models.

It runs as its own service (the preprocess/predict split) and is served as an OIP model,
`digits-preprocess`, using the statistics saved at training time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from services.common.digits import PIXEL_MAX
from services.common.errors import InvalidInput
from services.common.model import Model, Servable
from services.common.repository import ModelVersionDir
from services.common.settings import ServerSettings
from services.common.types import ModelSignature, TensorSpec


class DigitsPreprocess(Model):
    """image UINT8 [-1,8,8], values 0..16 -> features FP32 [-1,64] = (x - mean) / scale."""

    def __init__(self, entry: ModelVersionDir, executor: Executor) -> None:
        super().__init__(entry.name, entry.version, executor)
        self.stats_path = entry.path
        self.signature = ModelSignature(
            entry.name,
            (entry.version,),
            "onnxmesh_python",
            (TensorSpec("image", "UINT8", (-1, 8, 8)),),
            (TensorSpec("features", "FP32", (-1, 64)),),
        )

    def load_sync(self) -> None:
        stats = json.loads(self.stats_path.read_text())
        self.mean = np.asarray(stats["mean"], dtype=np.float32)
        self.inv_scale = (1.0 / np.asarray(stats["scale"], dtype=np.float32)).astype(np.float32)
        if self.mean.shape != (64,) or self.inv_scale.shape != (64,):
            raise ValueError(f"{self.stats_path}: mean and scale must hold 64 values each")

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        image = inputs["image"]
        if image.size and int(image.max()) > PIXEL_MAX:
            row = int(np.argwhere(image > PIXEL_MAX)[0][0])
            raise InvalidInput(
                f"tensor 'image': pixel values must be 0..{PIXEL_MAX}, found {int(image.max())} (row {row})"
            )
        flat = image.reshape(len(image), 64).astype(np.float32)
        return {"features": (flat - self.mean) * self.inv_scale}


def preprocess_servable(entry: ModelVersionDir, settings: ServerSettings, executor: Executor) -> Servable:
    return DigitsPreprocess(entry, executor)
