"""Rotate: lines the angle classifier reads as upside down are turned 180 degrees.

`angles` are the classifier's [n, 2] probabilities of 0 and 180 degrees; a line is turned when
180 wins with more than `cls_thresh`. Only the line itself (the first `widths[i]` columns of its
row) turns; the padding after it stays where the recognizer expects it.
"""

from pathlib import Path
from typing import Any

import numpy as np


class Rotate:
    def load(self, version_dir: Path, config: dict[str, Any]) -> None:
        self.cls_thresh = float(config["parameters"]["cls_thresh"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines, widths, angles = inputs["rec_input"], inputs["widths"], inputs["angles"]
        if not len(lines) == len(widths) == len(angles):
            raise ValueError(
                f"inputs 'rec_input', 'widths' and 'angles' must have as many rows, got "
                f"{len(lines)}, {len(widths)} and {len(angles)}"
            )
        out = lines.copy()
        upside_down = (angles.argmax(axis=1) == 1) & (angles.max(axis=1) > self.cls_thresh)
        for i in np.flatnonzero(upside_down):
            w = int(widths[i])
            out[i, :, :, :w] = lines[i, :, ::-1, :w][:, :, ::-1]
        return {"rec_input": out}
