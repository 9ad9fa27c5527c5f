"""The orchestrator refuses a bad spec at start-up and hot-reloads a changed one safely."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from demo.digits import load_holdout
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from services.common.errors import NotFound
from services.common.grpc.client import OipClient
from tests.support import ROOT, metric_total, until

SPEC = yaml.safe_load((ROOT / "demo/mesh.yaml").read_text())
IMAGE = load_holdout().images[:1]


def run_orchestrator(spec_path: Path, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--port", "0", "--graphs", str(spec_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_bad_spec_never_starts(tmp_path: Path) -> None:
    spec = dict(SPEC)
    graph = dict(SPEC["graphs"]["digits-serial"])
    graph["steps"] = [*graph["steps"][:2], {**graph["steps"][2], "service": "model_c"}]
    spec["graphs"] = {"broken": graph}
    path = tmp_path / "graphs.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_orchestrator(path)
    assert result.returncode != 0
    assert "model_c" in result.stderr and "listening" not in result.stdout


def test_a_spec_that_does_not_match_the_services_exits(tmp_path: Path) -> None:
    with LocalMesh(ports=EPHEMERAL_PORTS, include_orchestrator=False) as mesh:
        spec = {
            "services": {
                name: {"address": mesh.address(name)} for name in ("preprocess", "model_a", "model_b")
            },
            "graphs": {
                "wrong": {
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8]}],
                    # digits-head reads an embedding, not raw features: a datatype/shape mismatch.
                    "steps": [
                        {
                            "name": "pre",
                            "service": "preprocess",
                            "model": "digits-preprocess",
                            "inputs": {"image": "request.image"},
                        },
                        {
                            "name": "head",
                            "service": "model_b",
                            "model": "digits-head",
                            "inputs": {"embedding": "pre.features"},
                        },
                    ],
                    "outputs": {"probabilities": "head.probabilities"},
                }
            },
        }
        path = tmp_path / "graphs.yaml"
        path.write_text(yaml.safe_dump(spec))
        result = run_orchestrator(path, timeout=30)
    assert result.returncode != 0
    assert "embedding" in result.stderr and "[-1, 32]" in result.stderr.replace("(", "[").replace(")", "]")


@pytest.fixture
def reloading_mesh(tmp_path: Path) -> Iterator[tuple[LocalMesh, Path]]:
    path = tmp_path / "graphs.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    with LocalMesh(
        ports=EPHEMERAL_PORTS,
        graphs=path,
        extra_args={"orchestrator": ["--reload-interval", "0.2", "--metrics-port", "0"]},
    ) as mesh:
        yield mesh, path


def call(address: str, graph: str) -> str:
    async def go() -> str:
        async with OipClient(address) as client:
            result = await client.infer(graph, {"image": IMAGE}, timeout=5)
        return str(result.model_name)

    return asyncio.run(go())


def serves(address: str, graph: str) -> bool:
    """The orchestrator answers for `graph` (False while it does not know it yet)."""
    try:
        return call(address, graph) == graph
    except NotFound:
        return False


def test_hot_reload_applies_a_good_spec_and_keeps_the_old_one_on_a_bad_one(
    reloading_mesh: tuple[LocalMesh, Path],
) -> None:
    mesh, path = reloading_mesh
    address = mesh.address("orchestrator")
    assert call(address, "digits-serial") == "digits-serial"

    renamed = yaml.safe_load(path.read_text())
    renamed["graphs"]["digits-serial-v2"] = renamed["graphs"].pop("digits-serial")
    path.write_text(yaml.safe_dump(renamed))
    until(lambda: serves(address, "digits-serial-v2"), "the renamed graph to be served")
    with pytest.raises(NotFound):
        call(address, "digits-serial")

    broken = dict(renamed)
    broken["graphs"] = {"bad": {"steps": [{"name": "x", "service": "nowhere", "model": "m"}]}}
    path.write_text(yaml.safe_dump(broken))
    port = mesh.process("orchestrator").metrics_port
    assert port is not None
    until(
        lambda: metric_total(port, "onnxmesh_spec_reloads_total", result="rejected") >= 1, "a rejected reload"
    )
    assert call(address, "digits-serial-v2") == "digits-serial-v2"
    assert call(address, "digits-parallel") == "digits-parallel"
