"""The committed digit models (scripts/train_digits.py): contracts, held-out accuracy, reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "train_digits.py"
STATS = Path("services/preprocess/models/digits-preprocess/1/stats.json")
MLP = Path("services/model_a/models/digits-mlp/1/model.onnx")
LOGREG = Path("services/model_b/models/digits-logreg/1/model.onnx")
HEAD = Path("services/model_b/models/digits-head/1/model.onnx")
HOLDOUT = Path("data/digits-holdout.npz")
CONFIGS = [p.parent.parent / "config.json" for p in (MLP, LOGREG, HEAD)]
GENERATED = [STATS, MLP, LOGREG, HEAD, HOLDOUT, *CONFIGS]

MIN_ACCURACY = 0.95
EMBEDDING = 32

# model -> ({input: width}, {output: width})
CONTRACTS: dict[Path, tuple[dict[str, int], dict[str, int]]] = {
    MLP: ({"features": 64}, {"probabilities": 10, "embedding": EMBEDDING}),
    LOGREG: ({"features": 64}, {"probabilities": 10}),
    HEAD: ({"embedding": EMBEDDING}, {"probabilities": 10}),
}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(REPO / path), providers=["CPUExecutionProvider"])


def _run(path: Path, inputs: dict[str, NDArray[Any]], output: str) -> NDArray[np.float32]:
    return np.asarray(_session(path).run([output], inputs)[0])


@pytest.fixture(scope="module")
def holdout() -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    with np.load(REPO / HOLDOUT) as data:
        return data["images"], data["labels"]


@pytest.fixture(scope="module")
def features(holdout: tuple[NDArray[np.uint8], NDArray[np.int64]]) -> NDArray[np.float32]:
    """The preprocess service's transform, applied in numpy with the committed stats."""
    stats = json.loads((REPO / STATS).read_text())
    mean = np.asarray(stats["mean"], dtype=np.float32)
    scale = np.asarray(stats["scale"], dtype=np.float32)
    images, _ = holdout
    return (images.reshape(-1, 64).astype(np.float32) - mean) / scale


@pytest.mark.parametrize("path", list(CONTRACTS), ids=lambda p: p.parent.parent.name)
def test_onnx_contract(path: Path) -> None:
    sess = _session(path)
    want_inputs, want_outputs = CONTRACTS[path]
    for got, want in ((sess.get_inputs(), want_inputs), (sess.get_outputs(), want_outputs)):
        assert [t.name for t in got] == list(want)
        for tensor in got:
            assert tensor.type == "tensor(float)"
            batch, width = tensor.shape
            assert isinstance(batch, str), f"{tensor.name}: first dim must be dynamic, got {batch!r}"
            assert width == want[tensor.name]


@pytest.mark.parametrize("path", list(CONTRACTS), ids=lambda p: p.parent.parent.name)
def test_onnx_model_metadata(path: Path) -> None:
    model = onnx.load(str(REPO / path))
    onnx.checker.check_model(model)
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.producer_name == "onnxmesh"
    config = json.loads((REPO / path.parent.parent / "config.json").read_text())
    assert config["platform"] == "onnxruntime_onnx"


def test_holdout_npz(holdout: tuple[NDArray[np.uint8], NDArray[np.int64]]) -> None:
    images, labels = holdout
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert images.ndim == 3 and images.shape[1:] == (8, 8)
    assert labels.shape == (images.shape[0],)
    assert 300 <= len(labels) <= 400  # 20 % of 1797
    assert images.max() <= 16
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_standardization_stats() -> None:
    stats = json.loads((REPO / STATS).read_text())
    assert isinstance(stats["description"], str) and stats["description"]
    assert len(stats["mean"]) == 64 and len(stats["scale"]) == 64
    scale = np.asarray(stats["scale"], dtype=np.float64)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert np.all(np.isfinite(stats["mean"]))


def test_accuracy(
    holdout: tuple[NDArray[np.uint8], NDArray[np.int64]], features: NDArray[np.float32]
) -> None:
    _, labels = holdout
    embedding = _run(MLP, {"features": features}, "embedding")
    probabilities = {
        "digits-mlp": _run(MLP, {"features": features}, "probabilities"),
        "digits-logreg": _run(LOGREG, {"features": features}, "probabilities"),
        "digits-head": _run(HEAD, {"embedding": embedding}, "probabilities"),
    }
    for name, probs in probabilities.items():
        assert probs.shape == (len(labels), 10) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5, err_msg=name)
        acc = float(np.mean(probs.argmax(axis=1) == labels))
        assert acc >= MIN_ACCURACY, f"{name}: held-out accuracy {acc:.4f} < {MIN_ACCURACY}"


def test_batch_rows_are_independent(features: NDArray[np.float32]) -> None:
    """A row's output does not depend on its batch: serving may batch requests any way."""
    whole = _run(LOGREG, {"features": features[:8]}, "probabilities")
    single = _run(LOGREG, {"features": features[3:4]}, "probabilities")
    np.testing.assert_allclose(whole[3:4], single, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_training_reproduces_committed_files(tmp_path: Path) -> None:
    """Re-running the training (a few seconds) writes exactly the committed bytes."""
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=110,
    )
    for rel in GENERATED:
        fresh, committed = (tmp_path / rel).read_bytes(), (REPO / rel).read_bytes()
        assert fresh == committed, f"{rel}: re-training does not reproduce the committed file"
