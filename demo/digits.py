"""The demo's data: 8x8 digit images and the held-out split, shipped with the package.

The mesh's demo models classify the UCI optical handwritten digits (8x8 images, values
0..``PIXEL_MAX``). scripts/train_digits.py writes the held-out split (the 20 % the models never
saw) into this package as package data, so the CLI, the rehearsal, the benchmark and the tests
find it the same way in a checkout and in an installed wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

#: The largest pixel value of a digit image (the preprocessor refuses anything above).
PIXEL_MAX = 16
IMAGE_SHAPE = (8, 8)
#: The held-out split, as package data of this package.
HOLDOUT: Traversable = resources.files("demo").joinpath("data", "digits-holdout.npz")


@dataclass(frozen=True)
class Holdout:
    """The held-out digits: images UINT8 [N, 8, 8] (0..PIXEL_MAX) and their labels INT64 [N]."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.labels)


def load_holdout(path: Path | None = None) -> Holdout:
    """The held-out split shipped with the package, or the same kind of ``.npz`` file at ``path``.

    Raises OSError if the file cannot be read, KeyError or ValueError if it is not such a file.
    """
    with path.open("rb") if path is not None else HOLDOUT.open("rb") as file, np.load(file) as data:
        return Holdout(np.asarray(data["images"], np.uint8), np.asarray(data["labels"], np.int64))
