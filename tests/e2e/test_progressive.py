"""Progressive delivery with real processes under load: `rollout progressive` on a local spec file.

model_a serves digits-mlp version 1 (stable) and a version 2 (the canary): a copy (equal), or
one with its weights scrambled (worse). digits-canary splits between them; digits-shadow mirrors
stable with the canary, which is where the agreement gate reads from. Traffic flows to both graphs
from a background thread while the rollout runs; the fixtures always stop every process.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import numpy_helper

from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from meshctl.rehearsal import Traffic, versioned_copy
from meshctl.rollout import cli as rollout_cli
from meshctl.rollout.weights import splitter_branches
from tests.support import ROOT, until

# Short windows; the p99 of a hundred calls on a shared 2-core machine is noise, so the latency
# gate is loose here (its arithmetic is tested in tests/unit/test_progressive.py).
FAST = [
    "--window",
    "2",
    "--max-wait",
    "30",
    "--min-requests",
    "10",
    "--steps",
    "5,25,50",
    "--max-p99-ratio",
    "5",
]


def spec_text(canary_timeout: float | None = None) -> str:
    spec = yaml.safe_load((ROOT / "demo/mesh.yaml").read_text())
    graph = spec["graphs"]["digits-serial"]
    mlp = graph["steps"][1]
    branch = {key: mlp[key] for key in ("service", "model", "inputs")}
    canary = {"weight": 0, "name": "mlp-canary", "version": "2", **branch}
    if canary_timeout is not None:
        canary["timeout"] = canary_timeout
    graph["steps"][1] = {
        "name": "mlp",
        "splitter": {"branches": [{"weight": 100, "name": "mlp-stable", "version": "1", **branch}, canary]},
    }
    shadow = yaml.safe_load(yaml.safe_dump(spec["graphs"]["digits-serial"]))
    shadow["steps"][1] = {
        "name": "mlp",
        "mirror": {
            "primary": {"name": "mlp-v1", "version": "1", **branch},
            "shadow": {"name": "mlp-v2", "version": "2", **branch},
            "compare": "embedding",
        },
    }
    spec["graphs"] = {"digits-canary": graph, "digits-shadow": shadow}
    return yaml.safe_dump(spec)


def model_dir(tmp: Path, *, worse: bool) -> Path:
    out = versioned_copy(ROOT / "services/model_a/models", "digits-mlp", "2", tmp / "models")
    (out / "digits-mlp" / "1").symlink_to(ROOT / "services/model_a/models/digits-mlp/1")
    if worse:  # the same signature, weights shuffled: a model that disagrees with stable
        path = out / "digits-mlp" / "2" / "model.onnx"
        model = onnx.load(path)
        rng = np.random.default_rng(3)
        for init in model.graph.initializer:
            values = numpy_helper.to_array(init)
            if values.ndim == 2:
                init.CopyFrom(
                    numpy_helper.from_array(rng.permutation(values.ravel()).reshape(values.shape), init.name)
                )
        onnx.save(model, path)
    return out


@contextmanager
def mesh_under_load(
    tmp: Path, *, worse: bool = False, canary_timeout: float | None = None
) -> Iterator[tuple[Path, str]]:
    spec = tmp / "graphs.yaml"
    spec.write_text(spec_text(canary_timeout))
    with ExitStack() as stack:
        mesh = stack.enter_context(
            LocalMesh(
                ports=EPHEMERAL_PORTS,
                graphs=spec,
                model_dirs={"model_a": model_dir(tmp, worse=worse)},
                extra_args={"orchestrator": ["--reload-interval", "0.2", "--metrics-port", "0"]},
            )
        )
        target = mesh.address("orchestrator")
        stack.enter_context(
            Traffic(target, "digits-canary", steps=["mlp-stable", "mlp-canary"], concurrency=4)
        )
        stack.enter_context(Traffic(target, "digits-shadow", steps=["mlp-v1"], concurrency=2))
        port = mesh.process("orchestrator").metrics_port
        yield spec, f"http://127.0.0.1:{port}/metrics"


def progressive(spec: Path, metrics: str, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    args = rollout_cli.build_parser().parse_args(
        ["progressive", "digits-canary", "mlp", "--spec", str(spec), "--metrics", metrics, *FAST, *extra]
    )
    code = rollout_cli.run_rollout(args, out=out, err=out)
    print(out.getvalue())
    return code, out.getvalue()


def canary_weight(spec: Path) -> int:
    return splitter_branches(spec.read_text(), "digits-canary", "mlp")[1].weight


def test_an_equal_canary_is_promoted_to_100(tmp_path: Path) -> None:
    with mesh_under_load(tmp_path) as (spec, metrics):
        code, out = progressive(spec, metrics, "--mirror", "digits-shadow/mlp")
    assert code == 0, out
    assert out.count("PASS") == 3 and "promoted" in out
    assert canary_weight(spec) == 100


def test_a_worse_canary_is_aborted_at_the_first_gate(tmp_path: Path) -> None:
    with mesh_under_load(tmp_path, worse=True) as (spec, metrics):
        code, out = progressive(spec, metrics, "--mirror", "digits-shadow/mlp")
    assert code == 1, out
    assert "canary   5%:" in out and "FAIL agreement" in out and "aborted at 5%: gate agreement" in out
    assert canary_weight(spec) == 0


def test_an_erroring_canary_is_aborted(tmp_path: Path) -> None:
    # The canary branch times out on (nearly) every call it gets: its share of requests fails.
    with mesh_under_load(tmp_path, canary_timeout=0.0001) as (spec, metrics):
        code, out = progressive(spec, metrics)
    assert code == 1, out
    assert "aborted at 5%: gate errors" in out
    assert canary_weight(spec) == 0


def test_an_interrupted_run_is_resumed(tmp_path: Path) -> None:
    with mesh_under_load(tmp_path) as (spec, metrics):
        command = [sys.executable, "-u", "-m", "meshctl.rollout", "progressive", "digits-canary", "mlp"]
        command += ["--spec", str(spec), "--metrics", metrics, *FAST]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as first:
            assert first.stdout is not None
            for line in first.stdout:  # the first step passed: interrupt during the second
                if "PASS" in line:
                    until(lambda: canary_weight(spec) == 25, "the second step", timeout=30)
                    first.send_signal(2)  # SIGINT, as Ctrl-C
                    break
            rest = first.stdout.read()
            assert first.wait(timeout=60) == 130, rest
        assert "interrupted" in rest
        assert canary_weight(spec) == 25
        code, out = progressive(spec, metrics)
    assert code == 0, out
    assert "is at 25%: resuming from 25%" in out and "promoted" in out
    assert canary_weight(spec) == 100
