"""CTC decoding: the recognizer's per-column probabilities -> texts (UTF-8) and their scores.

Per line: the most likely class of each column, repeats merged, blanks (class 0) dropped; class
i >= 1 is line i of the character set (`characters`, beside this file; `make ocr-models` takes
it out of the recognizer's metadata) and the last class is a space. The score is the mean
probability of the characters kept. Lines scoring under `text_score` are dropped with their box.
"""

from pathlib import Path
from typing import Any

import numpy as np


class CtcDecode:
    def load(self, version_dir: Path, config: dict[str, Any]) -> None:
        p = config["parameters"]
        path = version_dir / p["characters"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run `make ocr-models`")
        self.characters = ["", *path.read_text(encoding="utf-8").splitlines(), " "]
        self.text_score = float(p["text_score"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probabilities, boxes = inputs["probabilities"], inputs["boxes"]
        if len(probabilities) != len(boxes):
            raise ValueError(
                f"inputs 'probabilities' and 'boxes' must have as many rows, got {len(probabilities)} and {len(boxes)}"
            )
        if len(probabilities) and probabilities.shape[2] != len(self.characters):
            raise ValueError(
                f"input 'probabilities': {probabilities.shape[2]} classes, the character set has {len(self.characters)}"
            )
        texts, scores = [], []
        for best, prob in zip(probabilities.argmax(axis=2), probabilities.max(axis=2), strict=True):
            keep = np.ones(len(best), dtype=bool)
            keep[1:] = best[1:] != best[:-1]
            keep &= best != 0
            texts.append("".join(self.characters[i] for i in best[keep]))
            scores.append(float(np.mean(prob[keep])) if keep.any() else 0.0)
        kept = [i for i, score in enumerate(scores) if score >= self.text_score]
        return {
            "texts": np.array([texts[i].encode("utf-8") for i in kept], dtype=object),
            "boxes": boxes[kept].reshape(-1, 4, 2),
            "scores": np.array([scores[i] for i in kept], dtype=np.float32),
        }
