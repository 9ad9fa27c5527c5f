"""docs/your-own-mesh.md, done in a temporary folder outside the repository.

Every file the tutorial shows (its `<!-- file: PATH -->` blocks) is written into the folder, and
its commands run there with the installed `onnxmesh` command: train (scikit-learn's iris data,
exported to ONNX), `onnxmesh check`, `onnxmesh up` (real processes on 127.0.0.1, free ports,
always stopped), the tutorial's stock tritonclient call, a call of every iris flower compared with
the same steps run in one process, and `onnxmesh k8s` rendered and validated strictly.
tritonclient registers the same protobuf package as our stubs, so its calls run in a process of
their own, as a user's client would.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from sklearn.datasets import load_iris

from tests.e2e.tutorial import Mesh, run, tutorial_files
from tests.support import K8S_VERSION, ROOT

#: Every iris flower through the graph with tritonclient: probabilities and labels to an .npz; a
#: negative measurement's status and message as JSON on stdout.
STOCK_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(sys.argv[1])
measurements = np.load(sys.argv[2])["measurements"]
request = grpcclient.InferInput("measurements", list(measurements.shape), "FP32")
request.set_data_from_numpy(measurements)
answer = client.infer("iris", [request], client_timeout=60)
np.savez(sys.argv[3], probabilities=answer.as_numpy("probabilities"), label=answer.as_numpy("label"))
bad = grpcclient.InferInput("measurements", [1, 4], "FP32")
bad.set_data_from_numpy(np.array([[5.1, -3.5, 1.4, 0.2]], np.float32))
try:
    client.infer("iris", [bad], client_timeout=60)
    print(json.dumps({"status": "OK"}))
except grpcclient.InferenceServerException as exc:
    print(json.dumps({"status": exc.status(), "message": exc.message()}))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("iris-mesh")
    assert not root.resolve().is_relative_to(ROOT), "the tutorial runs outside the repository"
    files = tutorial_files()
    assert {"train.py", "mesh.yaml", "client.py"} <= set(files)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    trained = run(root, sys.executable, "train.py")
    assert trained.returncode == 0, trained.stderr
    assert "training accuracy" in trained.stdout
    return root


@pytest.fixture(scope="module")
def orchestrator(folder: Path) -> Iterator[str]:
    mesh = Mesh(folder)
    try:
        yield mesh.ready()
    finally:
        mesh.stop()
    assert mesh.proc.returncode == 0


def in_one_process(folder: Path, measurements: np.ndarray) -> np.ndarray:
    """The graph's steps without the mesh: the user's class, then both ONNX models, then the mean."""
    version = folder / "models/features/iris-features/1"
    spec = importlib.util.spec_from_file_location("tutorial_iris_features", version / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step = module.IrisFeatures()
    step.load(version, {})
    features = step.predict({"measurements": measurements})["features"].astype(np.float32)
    answers = [
        ort.InferenceSession(str(folder / path)).run(["probabilities"], {"features": features})[0]
        for path in ("models/logreg/iris-logreg/1/model.onnx", "models/lda/iris-lda/1/model.onnx")
    ]
    return np.mean(answers, axis=0)


def test_check_passes(folder: Path) -> None:
    checked = run(folder, "onnxmesh", "check", "mesh.yaml")
    assert checked.returncode == 0, checked.stderr
    assert (
        "graph iris: ok  (measurements FP32[-1, 4]) -> (probabilities FP32[-1, 3], label INT64[-1])"
        in checked.stdout
    )


def test_the_tutorials_client_gets_its_answer(folder: Path, orchestrator: str) -> None:
    called = run(folder, sys.executable, "client.py", orchestrator)
    assert called.returncode == 0, called.stderr
    assert "label [0 2]" in called.stdout


def test_a_stock_client_gets_what_the_steps_give_in_one_process(folder: Path, orchestrator: str) -> None:
    iris = load_iris()
    measurements = iris.data.astype(np.float32)
    np.savez(folder / "iris.npz", measurements=measurements)
    (folder / "stock_client.py").write_text(STOCK_CLIENT)
    called = run(folder, sys.executable, "stock_client.py", orchestrator, "iris.npz", "answers.npz")
    assert called.returncode == 0, called.stderr
    answer = np.load(folder / "answers.npz")
    expected = in_one_process(folder, measurements)
    np.testing.assert_allclose(answer["probabilities"], expected, rtol=1e-4, atol=1e-6)
    # Ties within float noise may break either way: every clear answer agrees.
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-4
    assert (answer["label"] == expected.argmax(axis=1))[clear].all()
    assert (answer["label"] == iris.target).mean() > 0.9
    # A ValueError in the user's step reaches the stock client as INVALID_ARGUMENT with its message.
    refused = json.loads(called.stdout.strip().splitlines()[-1])
    assert refused["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "none can be negative" in refused["message"]


def test_k8s_renders_a_base_valid_strictly(folder: Path) -> None:
    rendered = run(folder, "onnxmesh", "k8s", "mesh.yaml", "--out", "k8s")
    assert rendered.returncode == 0, rendered.stderr
    kinds = []
    for path in sorted((folder / "k8s").glob("*.yaml")):
        if path.name in ("kustomization.yaml", "graphs.yaml"):
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            kinds.append((obj["kind"], obj["metadata"]["name"]))
    for name in ("features", "logreg", "lda", "orchestrator"):
        assert ("Deployment", name) in kinds and ("Service", name) in kinds
    assert (folder / "k8s/graphs.yaml").read_text() == (folder / "mesh.yaml").read_text()
