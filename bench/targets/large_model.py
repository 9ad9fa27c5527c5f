"""The large-model configuration: a wide MLP whose compute is milliseconds per request.

Built at bench time into a temporary directory, from the same real data as the demo models: the
digits' train split (everything but the held-out images the benchmark sends), standardized with
the preprocess service's own statistics. The MLP keeps digits-mlp's contract (`features` FP32
[-1,64] -> `probabilities` FP32 [-1,10], `embedding` FP32 [-1,32]), so the graphs run unchanged;
a new digits-head is trained on *its* embedding so the serial graph still answers correctly.

    <tmp>/model_a/digits-mlp/1/model.onnx             no config: no batching
    <tmp>/model_a-batching/digits-mlp/1/model.onnx    config.json: max_batch_size 32, 2 ms
    <tmp>/model_b/digits-head/1/model.onnx            head on the large embedding
    <tmp>/model_b/digits-logreg/...                   a copy of model_b's own

A few training epochs are enough: the point is the compute per request, while the label check
still shows the model is a real classifier.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from bench.models import DEFAULT_DIRS, features_of
from demo.digits import Holdout
from scripts.train_digits import logreg_to_onnx, mlp_to_onnx

#: Hidden layers of the large MLP; the last one is the embedding and must stay 32 wide (digits-head).
DEFAULT_HIDDEN = (3072, 3072, 3072, 32)
DEFAULT_EPOCHS = 2
EMBEDDING = 32
#: What scripts/train_digits.py split with; the held-out part must equal demo.digits' holdout.
SPLIT_SEED = 0
TEST_SIZE = 0.2
BATCHING_CONFIG = {"platform": "onnxruntime_onnx", "max_batch_size": 32, "max_queue_delay_ms": 2}


@dataclass(frozen=True)
class LargeModel:
    """Where the large configuration lives and what it is."""

    #: service -> model directory, batching off and on (model_b is the same in both).
    dirs: dict[str, Path]
    batching_dirs: dict[str, Path]
    hidden: tuple[int, ...]
    parameters: int
    epochs: int
    accuracy: float
    train_seconds: float
    #: onnxruntime compute per request (1 thread), milliseconds, by batch size.
    compute_ms: dict[int, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "hidden": list(self.hidden),
            "parameters": self.parameters,
            "epochs": self.epochs,
            "heldout_accuracy": self.accuracy,
            "train_seconds": self.train_seconds,
            "compute_ms_per_request": {str(k): v for k, v in self.compute_ms.items()},
            "batching_config": BATCHING_CONFIG,
        }


def train_split(holdout: Holdout) -> tuple[np.ndarray, np.ndarray]:
    """The digits' train split (images, labels): the data set minus the held-out images."""
    digits = load_digits()
    images = np.asarray(digits.images).astype(np.uint8)
    labels = np.asarray(digits.target).astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels
    )
    if not (np.array_equal(test_x, holdout.images) and np.array_equal(test_y, holdout.labels)):
        # Training on the images the benchmark sends would make the label check meaningless.
        raise RuntimeError("the held-out file no longer matches the training split; rerun `make models`")
    return train_x, train_y


def session(path: Path) -> ort.InferenceSession:
    """A session like the services' (one intra-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compute_ms(path: Path, batch: int, calls: int = 20) -> float:
    """onnxruntime time per request (ms) at one batch size, after a warm-up call."""
    sess = session(path)
    x = np.zeros((batch, 64), dtype=np.float32)
    sess.run(None, {"features": x})
    started = time.perf_counter()
    for _ in range(calls):
        sess.run(None, {"features": x})
    return (time.perf_counter() - started) / calls / batch * 1000.0


def _write(model_dir: Path, model: onnx.ModelProto, config: dict[str, Any]) -> Path:
    path = model_dir / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def build_large_model(
    out: Path, holdout: Holdout, *, hidden: Sequence[int] = DEFAULT_HIDDEN, epochs: int = DEFAULT_EPOCHS
) -> LargeModel:
    """Train, export and lay out the large configuration under `out` (see the module docstring)."""
    if not hidden or hidden[-1] != EMBEDDING:
        raise ValueError(f"the last hidden layer is the embedding and must be {EMBEDDING} wide, got {hidden}")
    started = time.perf_counter()
    images, labels = train_split(holdout)
    train_x = features_of(images)
    mlp = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=epochs, random_state=SPLIT_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # few epochs on purpose
        mlp.fit(train_x, labels)
    description = f"Large digits MLP {tuple(hidden)} for the benchmark."
    mlp_path = _write(out / "model_a" / "digits-mlp", mlp_to_onnx(mlp), {"description": description})
    batching = out / "model_a-batching" / "digits-mlp" / "1" / "model.onnx"
    batching.parent.mkdir(parents=True)
    batching.hardlink_to(mlp_path)  # the same bytes; only config.json differs
    (batching.parent.parent / "config.json").write_text(
        json.dumps({**BATCHING_CONFIG, "description": description}, indent=2) + "\n"
    )
    # The head learns from the embedding exactly as the exported model serves it.
    embedding = session(mlp_path).run(["embedding"], {"features": train_x})[0]
    head = LogisticRegression(max_iter=2000, random_state=SPLIT_SEED).fit(embedding, labels)
    _write(
        out / "model_b" / "digits-head",
        logreg_to_onnx(head, "embedding", "digits-head", "Head on the large embedding."),
        {"description": "Head on the large embedding."},
    )
    shutil.copytree(DEFAULT_DIRS["model_b"] / "digits-logreg", out / "model_b" / "digits-logreg")
    train_seconds = time.perf_counter() - started
    probabilities = session(mlp_path).run(["probabilities"], {"features": features_of(holdout.images)})[0]
    return LargeModel(
        dirs={"model_a": out / "model_a", "model_b": out / "model_b"},
        batching_dirs={"model_a": out / "model_a-batching", "model_b": out / "model_b"},
        hidden=tuple(hidden),
        parameters=int(sum(w.size + b.size for w, b in zip(mlp.coefs_, mlp.intercepts_, strict=True))),
        epochs=epochs,
        accuracy=float(np.mean(np.argmax(probabilities, axis=1) == holdout.labels)),
        train_seconds=train_seconds,
        compute_ms={batch: compute_ms(mlp_path, batch) for batch in (1, 32)},
    )
