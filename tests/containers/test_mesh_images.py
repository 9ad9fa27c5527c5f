"""`onnxmesh images` on the tutorial's mesh (docs/your-own-mesh.md), in a folder outside the
repository: one image per service on the runtime image `make images` builds, named as the
rendered manifests name them, and a Python service's image serving its model."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from images.build import BuiltImage
from meshctl.engine import ContainerEngine
from tests.e2e.tutorial import run, tutorial_files
from tests.support import ROOT, stub

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, images: dict[str, BuiltImage]) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("iris-images")
    assert not root.resolve().is_relative_to(ROOT)
    for name, text in tutorial_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert run(root, sys.executable, "train.py").returncode == 0
    yield root


@pytest.fixture(scope="module")
def built(folder: Path, engine: ContainerEngine) -> Iterator[list[str]]:
    made = run(folder, "onnxmesh", "images", "mesh.yaml")
    assert made.returncode == 0, made.stderr
    refs = made.stdout.split()
    try:
        yield refs
    finally:
        subprocess.run(engine.cli("rmi", *refs), capture_output=True, timeout=120, check=False)


def test_every_image_the_manifests_name_is_built(
    folder: Path, built: list[str], engine: ContainerEngine
) -> None:
    assert run(folder, "onnxmesh", "k8s", "mesh.yaml", "--out", "k8s").returncode == 0
    named = {
        engine.qualified(container["image"])
        for path in (folder / "k8s").glob("*.yaml")
        if path.name not in ("kustomization.yaml", "graphs.yaml")
        for obj in yaml.safe_load_all(path.read_text())
        if obj["kind"] == "Deployment"
        for container in obj["spec"]["template"]["spec"]["containers"]
    }
    assert named == set(built)
    assert all(engine.image_id(ref) is not None for ref in built)


def test_the_python_services_image_serves_its_model(built: list[str], engine: ContainerEngine) -> None:
    (image,) = [ref for ref in built if "/features:" in ref]
    name = "onnxmesh-test-features"
    port = "19811"
    started = subprocess.run(
        engine.run_command(
            "--rm",
            "-d",
            "--name",
            name,
            "-e",
            f"ONNXMESH_PORT={port}",
            "-e",
            "ONNXMESH_METRICS_PORT=off",
            image,
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    try:
        from proto.gen.inference import grpc_predict_v2_pb2 as pb

        with stub(f"127.0.0.1:{port}") as api:
            ready = api.ModelReady(
                pb.ModelReadyRequest(name="iris-features"), timeout=60, wait_for_ready=True
            )
            assert ready.ready
            metadata = api.ModelMetadata(pb.ModelMetadataRequest(name="iris-features"), timeout=10)
        assert metadata.platform == "python"
    finally:
        subprocess.run(engine.cli("kill", name), capture_output=True, timeout=60, check=False)
