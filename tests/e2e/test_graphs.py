"""The orchestrator's graphs end to end: real processes on 127.0.0.1, a stock client, faults.

Every node runs as its own process (LocalMesh); the fixtures always stop them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from demo import digits
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from services.common.errors import InvalidInput, MeshError, Unavailable
from services.common.grpc.client import OipClient

HOLDOUT = digits.load_holdout()
GRAPHS = ("digits-serial", "digits-parallel", "digits-cascade")

# A stock client in its own process (tritonclient and our stubs both register `inference.*`).
TRITON_ACCURACY = Path(__file__).with_name("triton_accuracy.py")


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with LocalMesh(
        ports=EPHEMERAL_PORTS, replicas={"model_a": 2}, extra_args={"model_a": ["--metrics-port", "0"]}
    ) as running:
        yield running


def infer(address: str, graph: str, image: np.ndarray, timeout: float = 10.0) -> dict[str, object]:
    async def call() -> dict[str, object]:
        async with OipClient(address) as client:
            result = await client.infer(graph, {"image": image}, timeout=timeout)
        return {"outputs": result.outputs, "parameters": result.parameters, "version": result.model_version}

    return asyncio.run(call())


def test_every_graph_is_accurate_through_a_stock_client(mesh: LocalMesh) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(TRITON_ACCURACY),
            mesh.address("orchestrator"),
            str(digits.HOLDOUT),
            *GRAPHS,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd="/",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    for graph in GRAPHS:
        assert report[graph]["accuracy"] >= 0.95, (graph, report[graph])
        assert report[graph]["inputs"] == ["image"]
        assert report[graph]["outputs"] == ["label", "probabilities"]
    # The cascade asked model_b only for some images: its switch really routes.
    logreg = report["digits-cascade"]["statuses"]["step.logreg"]
    assert logreg.get("ok", 0) > 0 and logreg.get("skipped", 0) > logreg.get("ok", 0)
    print({g: report[g]["accuracy"] for g in GRAPHS})


def test_both_model_a_replicas_receive_traffic(mesh: LocalMesh) -> None:
    images = HOLDOUT.images
    for i in range(40):
        infer(mesh.address("orchestrator"), "digits-serial", images[i : i + 1])
    counts = []
    for proc in mesh.processes("model_a"):
        assert proc.metrics_port is not None
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5).read().decode()
        )
        counts.append(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("onnxmesh_requests_total{") and 'model="digits-mlp"' in line
            )
        )
    assert len(counts) == 2 and all(c >= 5 for c in counts), counts


def test_bad_client_input_names_step_and_tensor(mesh: LocalMesh) -> None:
    bad = np.full((1, 8, 8), 99, dtype=np.uint8)
    with pytest.raises(InvalidInput) as info:
        infer(mesh.address("orchestrator"), "digits-parallel", bad)
    assert "pre" in info.value.message and "'image'" in info.value.message
    with pytest.raises(InvalidInput, match="image"):
        infer(mesh.address("orchestrator"), "digits-parallel", np.zeros((1, 8, 8), np.float32))
    # The mesh keeps answering.
    assert infer(mesh.address("orchestrator"), "digits-parallel", HOLDOUT.images[:1])["outputs"]


def test_unknown_graph_is_not_found(mesh: LocalMesh) -> None:
    with pytest.raises(MeshError) as info:
        infer(mesh.address("orchestrator"), "digits-nope", HOLDOUT.images[:1])
    assert info.value.code == "NOT_FOUND" and "digits-parallel" in info.value.message


@pytest.fixture
def mesh_without_model_b() -> Iterator[LocalMesh]:
    with LocalMesh(ports=EPHEMERAL_PORTS) as running:
        running.stop_service("model_b")
        yield running


def test_with_model_b_down_parallel_degrades_and_serial_fails_fast(mesh_without_model_b: LocalMesh) -> None:
    address = mesh_without_model_b.address("orchestrator")
    images, labels = HOLDOUT.images[:20], HOLDOUT.labels[:20]
    correct = 0
    for image, label in zip(images, labels, strict=True):
        answer = infer(address, "digits-parallel", image[None])
        params = answer["parameters"]
        assert isinstance(params, dict)
        assert params["step.mlp"] == "ok"
        assert str(params["step.logreg"]).startswith("error: UNAVAILABLE")
        outputs = answer["outputs"]
        assert isinstance(outputs, dict)
        correct += int(outputs["label"][0] == label)
    assert correct >= 18

    # UNAVAILABLE, not DEADLINE_EXCEEDED: the hard step failed fast, it never hung until the deadline.
    with pytest.raises(Unavailable) as info:
        infer(address, "digits-serial", images[:1], timeout=30.0)
    assert "step 'head'" in info.value.message and "model_b" in info.value.message
