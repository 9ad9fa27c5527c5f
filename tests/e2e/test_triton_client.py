"""tritonclient, unmodified, against a running mesh: Triton's extensions on a model node and on
the orchestrator, every RPC perf_analyzer calls, and KServe v2 REST with a plain HTTP client.

tritonclient registers the same `inference.*` protobuf package as our stubs, so it runs in its
own process, as a real client would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.digits import load_holdout
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from meshctl.perf_data import perf_analyzer_data
from tests.support import ROOT, metric_total

TRITON = textwrap.dedent(
    """
    import json, queue, sys
    import numpy as np
    import tritonclient.grpc as tc
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException

    address, model, input_name, datatype, shape, data = sys.argv[1:7]
    shape = json.loads(shape)
    x = np.asarray(json.loads(data), dtype=datatype.lower().replace("fp", "float")).reshape(shape)
    c = tc.InferenceServerClient(address)
    out = {}

    def tensor():
        t = tc.InferInput(input_name, shape, datatype)
        t.set_data_from_numpy(x)
        return t

    # What perf_analyzer calls, in its order: metadata, config, statistics, infer, stream, shm.
    out["live"] = c.is_server_live()
    out["metadata"] = c.get_model_metadata(model, as_json=True)
    out["config"] = c.get_model_config(model, as_json=True)["config"]
    out["index"] = c.get_model_repository_index(as_json=True)["models"]
    before = c.get_inference_statistics(model, as_json=True)["model_stats"]
    result = c.infer(model, [tensor()], outputs=[tc.InferRequestedOutput("probabilities")])
    probabilities = result.as_numpy("probabilities")
    out["argmax"] = probabilities.argmax(axis=1).tolist()
    top = c.infer(model, [tensor()], outputs=[tc.InferRequestedOutput("probabilities", class_count=3)])
    out["classes"] = [[v.decode() for v in row] for row in top.as_numpy("probabilities")]
    answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(4):
        c.async_stream_infer(model, [tensor()], request_id=f"s{i}")
    stream = []
    for _ in range(4):
        res, err = answers.get(timeout=30)
        stream.append(err.message() if err else res.get_response().id)
    c.stop_stream()
    out["stream"] = sorted(stream)
    key = f"/onnxmesh-e2e-{address.rsplit(':', 1)[1]}"
    region = shm.create_shared_memory_region("in", key, x.nbytes)
    try:
        shm.set_shared_memory_region(region, [x])
        c.register_system_shared_memory("in", key, x.nbytes)
        t = tc.InferInput(input_name, shape, datatype)
        t.set_shared_memory("in", x.nbytes)
        via_shm = c.infer(model, [t], outputs=[tc.InferRequestedOutput("probabilities")])
        out["shm_equal"] = bool(np.allclose(via_shm.as_numpy("probabilities"), probabilities))
        out["shm_status"] = list(c.get_system_shared_memory_status(as_json=True).get("regions", {}))
        c.unregister_system_shared_memory("in")
    finally:
        shm.destroy_shared_memory_region(region)
    after = c.get_inference_statistics(model, as_json=True)["model_stats"]
    out["stats"] = [before, after]
    try:
        c.load_model(model)
    except InferenceServerException as exc:
        out["load"] = [exc.status(), exc.message()]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with LocalMesh(ports=EPHEMERAL_PORTS, metrics=True, grace=2.0) as running:
        yield running


def run_triton(address: str, model: str, input_name: str, datatype: str, x: np.ndarray) -> dict[str, Any]:
    argv = [
        address,
        model,
        input_name,
        datatype,
        json.dumps(list(x.shape)),
        json.dumps(x.reshape(-1).tolist()),
    ]
    run = subprocess.run(
        [sys.executable, "-c", TRITON, *argv], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def check_common(out: dict[str, Any], model: str, rows: int) -> None:
    assert out["live"]
    assert [m["name"] for m in out["index"] if m["state"] == "READY"].count(model) == 1
    assert len(out["classes"]) == rows and all(len(row) == 3 for row in out["classes"])
    assert [int(row[0].split(":")[1]) for row in out["classes"]] == out["argmax"]
    assert out["stream"] == ["s0", "s1", "s2", "s3"]
    assert out["shm_equal"] and out["shm_status"] == ["in"]
    before, after = (stats[0] for stats in out["stats"])
    assert after["name"] == model and after["version"] == "1"
    # infer, classification, 4 streamed, 1 through shared memory.
    done = int(after["inference_stats"]["success"]["count"]) - int(
        before["inference_stats"]["success"].get("count", 0)
    )
    assert done == 7
    assert out["load"][0] == "StatusCode.FAILED_PRECONDITION"


def test_tritonclient_extensions_on_a_model_node(mesh: LocalMesh) -> None:
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    out = run_triton(mesh.address("model_a"), "digits-mlp", "features", "FP32", x)
    check_common(out, "digits-mlp", 2)
    config = out["config"]
    assert (config["name"], config["platform"], config.get("max_batch_size", 0)) == (
        "digits-mlp",
        "onnxruntime_onnx",
        0,
    )
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": ["-1", "64"]}]


def test_tritonclient_extensions_on_the_orchestrator(mesh: LocalMesh) -> None:
    holdout = load_holdout()
    images = holdout.images[:3]
    out = run_triton(mesh.address("orchestrator"), "digits-serial", "image", "UINT8", images)
    check_common(out, "digits-serial", 3)
    assert out["config"]["input"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": ["-1", "8", "8"]}]
    assert {o["name"] for o in out["config"]["output"]} == {"probabilities", "label"}
    assert sum(int(a == b) for a, b in zip(out["argmax"], holdout.labels[:3], strict=True)) >= 2
    assert {m["name"] for m in out["index"]} >= {"digits-serial", "digits-parallel", "digits-cascade"}


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def test_rest_api_with_a_plain_http_client(mesh: LocalMesh) -> None:
    proc = mesh.process("orchestrator")
    assert proc.http_port is not None and proc.metrics_port is not None
    base = f"http://127.0.0.1:{proc.http_port}"
    assert http("GET", f"{base}/v2/health/live")[0] == 200
    assert http("GET", f"{base}/v2/health/ready")[0] == 200
    assert http("GET", f"{base}/v2/models/digits-serial/ready")[0] == 200
    status, body, _ = http("GET", f"{base}/v2")
    assert status == 200 and "classification" in json.loads(body)["extensions"]
    status, body, _ = http("GET", f"{base}/v2/models/digits-serial")
    meta = json.loads(body)
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8]}]
    holdout = load_holdout()
    image = holdout.images[:2]
    request: dict[str, Any] = {
        "id": "rest-1",
        "inputs": [
            {"name": "image", "datatype": "UINT8", "shape": [2, 8, 8], "data": image.reshape(-1).tolist()}
        ],
        "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"classification": 2}}],
    }
    before = metric_total(proc.metrics_port, "onnxmesh_requests_total", model="digits-serial", code="OK")
    status, body, _ = http("POST", f"{base}/v2/models/digits-serial/infer", json.dumps(request).encode())
    assert status == 200, body
    answer = json.loads(body)
    assert answer["id"] == "rest-1" and answer["model_name"] == "digits-serial"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [2]
    assert outputs["probabilities"]["datatype"] == "BYTES" and outputs["probabilities"]["shape"] == [2, 2]
    labels = outputs["label"]["data"]
    assert [int(c.split(":")[1]) for c in outputs["probabilities"]["data"][::2]] == labels
    assert (
        metric_total(proc.metrics_port, "onnxmesh_requests_total", model="digits-serial", code="OK")
        == before + 1
    )
    # The binary-data extension: raw bytes after the JSON header, an output asked back in binary.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [2, 8, 8],
                    "parameters": {"binary_data_size": 128},
                }
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, body, headers = http(
        "POST",
        f"{base}/v2/models/digits-serial/infer",
        header + image.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200, body
    length = int(headers["Inference-Header-Content-Length"])
    described = json.loads(body[:length])["outputs"][0]
    assert described["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(body[length:], dtype=np.int64).tolist() == labels
    # Errors: the same codes and messages as gRPC, as HTTP statuses.
    bad = dict(request, inputs=[dict(request["inputs"][0], data=[99] * 128)])
    status, body, _ = http("POST", f"{base}/v2/models/digits-serial/infer", json.dumps(bad).encode())
    assert status == 400 and "pixel values must be 0..16" in json.loads(body)["error"]
    status, body, _ = http("POST", f"{base}/v2/models/nope/infer", json.dumps(request).encode())
    assert status == 404 and "digits-serial" in json.loads(body)["error"]
    status, body, _ = http("POST", f"{base}/v2/models/digits-serial/infer", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, body, _ = http("GET", f"{base}/v2/models/digits-serial/config")
    assert status == 200 and json.loads(body)["input"][0]["data_type"] == "TYPE_UINT8"
    status, body, _ = http("GET", f"{base}/v2/models/digits-serial/stats")
    assert status == 200 and json.loads(body)["model_stats"][0]["name"] == "digits-serial"
    status, body, _ = http("POST", f"{base}/v2/repository/index", b"{}")
    assert status == 200 and {m["name"] for m in json.loads(body)} >= {"digits-serial"}


def test_every_node_has_its_own_rest_and_metrics_port_and_metrics_answer_only_metrics(
    mesh: LocalMesh,
) -> None:
    procs = mesh.processes()
    ports = [p.port for p in procs] + [p.http_port for p in procs] + [p.metrics_port for p in procs]
    assert None not in ports and len(set(ports)) == len(ports)
    for proc in procs:
        assert http("GET", f"http://127.0.0.1:{proc.metrics_port}/metrics")[0] == 200
        assert http("GET", f"http://127.0.0.1:{proc.metrics_port}/")[0] == 404
        assert http("GET", f"http://127.0.0.1:{proc.metrics_port}/healthz")[0] == 404


def test_perf_analyzer_input_data_holds_real_digits() -> None:
    data = perf_analyzer_data(3)["data"]
    assert len(data) == 3
    pixels = np.asarray(data[0]["image"]["content"])
    assert pixels.shape == (64,) and pixels.min() >= 0 and pixels.max() <= 16
    assert data[0]["image"]["shape"] == [1, 8, 8]


def test_a_fixed_metrics_port_in_the_environment_is_not_given_to_every_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ONNXMESH_METRICS_PORT", "1")  # a port no node could bind
    with LocalMesh(
        ports=EPHEMERAL_PORTS, include_orchestrator=False, metrics=True, http=False, grace=2.0
    ) as m:
        ports = [p.metrics_port for p in m.processes()]
        assert None not in ports and len(set(ports)) == len(ports) and 1 not in ports
        assert all(p.http_port is None for p in m.processes())


def test_the_readme_tritonclient_snippet_runs_from_any_directory(mesh: LocalMesh, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"\*\*tritonclient\*\*.*?```python\n(.*?)```", readme, re.S)
    assert snippet, "the README's tritonclient snippet is gone"
    code = snippet[1].replace("127.0.0.1:8001", mesh.address("orchestrator"))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[0] [[1. 0."), run.stdout  # the digit shown is a zero
    assert "step.mlp" in run.stdout
