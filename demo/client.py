"""The digits demo's client conveniences (demo/mesh.yaml names this file; meshctl/client.py says
what it provides): `onnxmesh predict` sends a held-out digit (`--index`, `--count`, `--data`) or an
image file (`--image`), and `batch`, perf_data and the rehearsal send the held-out split."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from demo.digits import IMAGE_SHAPE, PIXEL_MAX, load_holdout
from meshctl.client import Samples
from meshctl.targets import CliError
from services.common.settings import non_negative_int, positive_int

DEFAULT_NAME = "digits-parallel"
#: The demo's graphs take the images as this input.
INPUT = "image"


@dataclass(frozen=True)
class Digits:
    """Images to send, with their true labels when they come from the held-out set."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64] | None
    description: list[str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--index", type=non_negative_int, default=0, help="held-out digit to send (default: 0)"
    )
    source.add_argument(
        "--image", type=Path, help=f".npy (8x8) or text/CSV file of 64 integers 0..{PIXEL_MAX}"
    )
    parser.add_argument("--count", type=positive_int, default=1, help="send K consecutive held-out digits")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="held-out digits (.npz; default: the demo's, demo/data/digits-holdout.npz)",
    )


def load_image(path: Path) -> NDArray[np.uint8]:
    """One 8x8 image from a `.npy` file (8x8, 1x8x8 or 64 values) or a text/CSV file of 64 integers 0..16."""
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: cannot read an image: {exc}") from None
    values = np.asarray(values)
    if values.size != 64:
        raise CliError(f"{path}: expected 64 pixel values (an 8x8 image), found {values.size}")
    if (
        values.dtype.kind not in "biuf"
        or not np.all(np.isfinite(values))
        or np.any(values != np.round(values))
    ):
        raise CliError(f"{path}: expected integer pixel values 0..{PIXEL_MAX}")
    if values.min() < 0 or values.max() > PIXEL_MAX:
        raise CliError(
            f"{path}: pixel values must be 0..{PIXEL_MAX}, found {values.min():g}..{values.max():g}"
        )
    return values.reshape(IMAGE_SHAPE).astype(np.uint8)


def select_digits(args: argparse.Namespace) -> Digits:
    if args.image is not None:
        if args.count > 1:
            raise CliError("--count sends held-out digits; it cannot be used with --image")
        image = load_image(args.image)
        return Digits(image[None], None, [str(args.image)])
    try:
        holdout = load_holdout(args.data)
    except (OSError, KeyError, ValueError) as exc:
        raise CliError(
            f"{args.data or 'the held-out digits'}: cannot read the held-out digits: {exc}"
        ) from None
    images, labels = holdout.images, holdout.labels
    if args.index >= len(images):
        raise CliError(
            f"--index {args.index} is out of range: the held-out set has {len(images)} images (0..{len(images) - 1})"
        )
    if args.count > len(images):
        raise CliError(f"--count {args.count} is more than the {len(images)} held-out images")
    rows = [(args.index + i) % len(images) for i in range(args.count)]  # wraps around the set
    return Digits(images[rows], labels[rows], [f"held-out #{row}" for row in rows])


def select(args: argparse.Namespace) -> Samples:
    digits = select_digits(args)
    return Samples({INPUT: digits.images}, digits.labels, digits.description)


def samples() -> Samples:
    holdout = load_holdout()
    return Samples({INPUT: holdout.images}, holdout.labels, [f"held-out #{i}" for i in range(len(holdout))])
