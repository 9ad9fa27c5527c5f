"""The wheel `make dist` builds: the `onnxmesh` command, the runtimes and their data; no
benchmarks, scripts, image tooling or tests as top-level packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    assert uv is not None, "uv is not in the venv: the dev extra installs it (make setup)"
    out = tmp_path_factory.mktemp("dist")
    leftover = not (ROOT / "build").exists()  # setuptools builds in the tree: leave it as found
    try:
        built = subprocess.run(
            [uv, "build", "--wheel", "--out-dir", str(out), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        if leftover:
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("onnxmesh-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_the_projects_packages(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"services", "orchestrator", "meshctl", "jobs", "proto"}


def test_the_wheel_has_the_command_the_runtimes_and_their_data(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "onnxmesh = meshctl.cli:main" in wheel.read(entry_points).decode()
    for module in ("services/common/onnx_model.py", "services/common/python_model.py", "meshctl/mesh.py"):
        assert module in names
    assert "proto/gen/inference/grpc_predict_v2_pb2.py" in names
    assert {f"meshctl/k8s_templates/{t}.yaml" for t in ("service", "orchestrator", "kustomization")} <= names
