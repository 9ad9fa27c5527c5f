"""The digits preprocessor: raw 8x8 images (0..16) -> standardized features for the models.

Served by the Python runtime (it imports nothing of onnxmesh): the statistics saved at training
time (stats.json, beside this file) standardize each pixel.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np


class DigitsPreprocess:
    """image UINT8 [-1,8,8], values 0..pixel_max -> features FP32 [-1,64] = (x - mean) / scale."""

    def load(self, version_dir: Path, config: dict[str, Any]) -> None:
        stats = json.loads((version_dir / "stats.json").read_text())
        self.mean = np.asarray(stats["mean"], dtype=np.float32)
        self.inv_scale = (1.0 / np.asarray(stats["scale"], dtype=np.float32)).astype(np.float32)
        if self.mean.shape != (64,) or self.inv_scale.shape != (64,):
            raise ValueError(f"{version_dir / 'stats.json'}: mean and scale must hold 64 values each")
        self.pixel_max = int(config["parameters"]["pixel_max"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = inputs["image"]
        if image.size and int(image.max()) > self.pixel_max:
            row = int(np.argwhere(image > self.pixel_max)[0][0])
            raise ValueError(
                f"tensor 'image': pixel values must be 0..{self.pixel_max}, found {int(image.max())} (row {row})"
            )
        flat = image.reshape(len(image), 64).astype(np.float32)
        return {"features": (flat - self.mean) * self.inv_scale}
