"""Triton's perf_analyzer, the real binary, against a model node and the orchestrator of a running
mesh, unary and `--streaming`, with real digits from `meshctl.perf_data` as `--input-data`.

`make perf_analyzer` sets the binary up under .venv (scripts/perf_analyzer_setup.sh; `make test`
runs it first, and a set-up that fails fails it). Beside it, the
parameters tritonclient's gRPC and HTTP clients send unasked are checked against the same mesh.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from meshctl.perf_data import perf_analyzer_data
from tests.support import ROOT, metric_total

PERF_ANALYZER = ROOT / ".venv/perf_analyzer/perf_analyzer"
THROUGHPUT = re.compile(r"Throughput: ([0-9.]+) infer/sec")


def _check_usable() -> None:
    """perf_analyzer is set up and starts; otherwise the test fails saying so (never a skip: the
    project installs it)."""
    if not PERF_ANALYZER.exists():
        pytest.fail(f"{PERF_ANALYZER} is not set up: `make perf_analyzer` sets it up")
    try:
        run = subprocess.run([str(PERF_ANALYZER), "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.fail(f"{PERF_ANALYZER} is set up but does not start: {exc}")
    if run.returncode != 0:
        pytest.fail(
            f"{PERF_ANALYZER} is set up but does not start: {(run.stderr or run.stdout).strip()[:200]}"
        )


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with LocalMesh(ports=EPHEMERAL_PORTS, metrics=True, grace=2.0) as running:
        yield running


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("perf") / "digits.json"
    path.write_text(json.dumps(perf_analyzer_data(16)))
    return path


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
@pytest.mark.parametrize(
    ("service", "model"), [("preprocess", "digits-preprocess"), ("orchestrator", "digits-serial")]
)
def test_perf_analyzer_runs_to_completion(
    mesh: LocalMesh, digits: Path, service: str, model: str, streaming: bool
) -> None:
    _check_usable()
    proc = mesh.process(service)
    assert proc.metrics_port is not None
    ignored = "onnxmesh_ignored_parameters_total"
    before = metric_total(proc.metrics_port, ignored, parameter="triton_enable_empty_final_response")
    argv = [
        str(PERF_ANALYZER),
        *("-m", model, "-u", proc.address, "-i", "grpc"),
        *("--shape", "image:1,8,8", "--input-data", str(digits)),
        "--concurrency-range=2",
        # A fixed number of requests per window, and any spread accepted: this checks that the
        # tool runs against the node, not how fast (that is `make bench`'s, on a quiet machine).
        *("--measurement-mode", "count_windows", "--measurement-request-count", "50"),
        *("--stability-percentage", "1000", "--max-trials", "3"),
        *(["--streaming"] if streaming else []),
    ]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rates = [float(rate) for rate in THROUGHPUT.findall(run.stdout)]
    assert rates and all(rate > 0 for rate in rates), run.stdout[-2000:]
    assert "error" not in run.stdout.lower(), run.stdout[-2000:]
    # perf_analyzer's own request parameter was accepted and counted, once per call.
    after = metric_total(proc.metrics_port, ignored, parameter="triton_enable_empty_final_response")
    assert after - before >= 100


TRITONCLIENT = textwrap.dedent(
    """
    import json, queue, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    grpc_address, http_address = sys.argv[1:3]
    x = np.asarray(json.loads(sys.argv[3]), dtype=np.uint8).reshape(1, 8, 8)
    out = {}

    g = grpcclient.InferenceServerClient(grpc_address)
    t = grpcclient.InferInput("image", [1, 8, 8], "UINT8")
    t.set_data_from_numpy(x)
    # priority and timeout as a caller sets them; the stream as perf_analyzer opens it.
    out["grpc"] = g.infer("digits-serial", [t], priority=1, client_timeout=30).as_numpy("label").tolist()
    answers = queue.Queue()
    g.start_stream(callback=lambda result, error: answers.put((result, error)))
    g.async_stream_infer("digits-serial", [t], enable_empty_final_response=True)
    result, error = answers.get(timeout=30)
    g.stop_stream()
    out["stream"] = error.message() if error else result.as_numpy("label").tolist()

    h = httpclient.InferenceServerClient(http_address)
    t = httpclient.InferInput("image", [1, 8, 8], "UINT8")
    t.set_data_from_numpy(x, binary_data=True)  # binary_data_size; no outputs: binary_data_output
    out["http"] = h.infer("digits-serial", [t], priority=1).as_numpy("label").tolist()
    print(json.dumps(out))
    """
)


def test_what_tritonclient_sends_unasked_is_accepted(mesh: LocalMesh) -> None:
    proc = mesh.process("orchestrator")
    assert proc.metrics_port is not None and proc.http_port is not None
    image = perf_analyzer_data(1)["data"][0]["image"]["content"]

    def ignored(name: str) -> float:
        assert proc.metrics_port is not None
        return metric_total(proc.metrics_port, "onnxmesh_ignored_parameters_total", parameter=name)

    names = ("priority", "triton_enable_empty_final_response")
    before = {name: ignored(name) for name in names}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITONCLIENT,
            proc.address,
            f"127.0.0.1:{proc.http_port}",
            json.dumps(image),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # tritonclient registers our protobuf package's names: not beside our stubs
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["grpc"] == out["stream"] == out["http"]
    assert {name: ignored(name) - before[name] for name in names} == {
        "priority": 2,
        "triton_enable_empty_final_response": 1,
    }
