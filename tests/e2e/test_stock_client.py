"""A running model service driven by a stock OIP client (tritonclient.grpc), unmodified.

tritonclient registers the same `inference.*` protobuf package as our stubs, so it runs in
its own process, as a real client would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.support import ROOT, kill_group

TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(sys.argv[1])
    out = {"live": client.is_server_live(), "ready": client.is_model_ready("digits-mlp")}
    meta = client.get_model_metadata("digits-mlp", as_json=True)
    out["inputs"] = meta["inputs"]
    out["outputs"] = [o["name"] for o in meta["outputs"]]
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    tensor = tc.InferInput("features", [4, 64], "FP32")
    tensor.set_data_from_numpy(x)
    full = client.infer("digits-mlp", [tensor])
    out["full"] = {n: list(full.as_numpy(n).shape) for n in ("probabilities", "embedding")}
    out["sums"] = full.as_numpy("probabilities").sum(axis=1).round(4).tolist()
    out["version"] = full.get_response().model_version
    subset = client.infer("digits-mlp", [tensor], outputs=[tc.InferRequestedOutput("embedding")])
    out["subset"] = [o.name for o in subset.get_response().outputs]
    bad = tc.InferInput("features", [4, 32], "FP32")
    bad.set_data_from_numpy(x[:, :32].copy())
    try:
        client.infer("digits-mlp", [bad])
    except InferenceServerException as exc:
        out["bad"] = [exc.status(), exc.message()]
    print(json.dumps(out))
    """
)


@pytest.fixture
def model_a() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            *("-m", "services.common.model_node", "--name", "model_a"),
            *("--model-dir", str(ROOT / "services/model_a/models"), "--port", "0", "--grace", "2"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        listening = proc.stdout.readline()
        ready = proc.stdout.readline()
        assert "listening on" in listening and "ready on" in ready, (listening, ready)
        yield proc, ready.split()[-1]
    finally:
        kill_group(proc)


def test_tritonclient_talks_to_model_service(model_a: tuple[subprocess.Popen[str], str]) -> None:
    _, address = model_a
    run = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, address], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["live"] and out["ready"]
    assert out["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert out["outputs"] == ["probabilities", "embedding"]
    assert out["full"] == {"probabilities": [4, 10], "embedding": [4, 32]}
    assert out["sums"] == [1.0] * 4 and out["version"] == "1"
    assert out["subset"] == ["embedding"]
    status, message = out["bad"]
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "'features'" in message and "[-1, 64]" in message


def test_sigterm_drains_and_exits_cleanly(model_a: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = model_a
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert proc.stdout is not None
    assert "model_a draining" in proc.stdout.read()
