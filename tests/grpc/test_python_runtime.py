"""The Python runtime: a user's model.py, importing nothing of onnxmesh, served by a real node.

Each test writes its model directory in a temporary folder: a batched scaler, a model whose
predict raises ValueError or another error, a model.py that fails to import beside one that
works, a model counting its warm-up calls.
"""

from __future__ import annotations

import json
import logging
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.batching.adaptive import BatchingModel
from services.common.grpc.codec import decode_response_outputs
from services.common.model_node import build_repository
from services.common.python_model import PythonModel
from services.common.settings import ServerSettings
from services.common.tensors import encode_raw
from tests.support import ServerThread, stub

SCALE = """
import numpy as np

class Scale:
    def load(self, version_dir, config):
        self.factor = float((version_dir / "factor.txt").read_text())
        self.calls = []

    def predict(self, inputs):
        x = inputs["x"]
        self.calls.append(len(x))
        if (x < 0).any():
            raise ValueError("x must not be negative")
        if (x > 1000).any():
            raise RuntimeError("secret internal detail")
        # float64 arithmetic: the runtime returns the declared FP32.
        return {"y": x * self.factor, "rows": np.full(len(x), len(x), dtype=np.int64)}
"""

SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "rows", "datatype": "INT64", "shape": [-1]},
    ],
}


def write_model(
    root: Path, name: str, code: str, config: dict[str, Any], files: dict[str, str] | None = None
) -> None:
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(textwrap.dedent(code))
    for filename, text in (files or {}).items():
        (version / filename).write_text(text)
    (root / name / "config.json").write_text(json.dumps(config))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_model(
        tmp_path,
        "scale",
        SCALE,
        {**SIGNATURE, "max_batch_size": 64, "max_queue_delay_ms": 50},
        {"factor.txt": "3"},
    )
    # Room for exactly the rows of the concurrency test's callers (1 + 2 + ... + 8): the batch runs
    # when they have all arrived, however slowly, and never before.
    write_model(
        tmp_path,
        "gather",
        SCALE,
        {**SIGNATURE, "max_batch_size": 36, "max_queue_delay_ms": 60_000},
        {"factor.txt": "3"},
    )
    write_model(tmp_path, "broken", "import not_a_module_anywhere\n", SIGNATURE)
    write_model(tmp_path, "unsigned", SCALE, {"max_batch_size": 8})
    return tmp_path


@pytest.fixture
def server(model_dir: Path) -> Iterator[ServerThread]:
    with ThreadPoolExecutor(2) as executor:
        settings = ServerSettings(service="test", model_dir=model_dir, runtime="python")
        running = ServerThread(
            build_repository(settings, executor),
            ServerSettings(service="test", port=0, grace=2.0, http_port=0),
        )
        try:
            running.start()
            yield running
        finally:
            running.stop()


def infer(api: Any, x: np.ndarray, timeout: float = 10, model: str = "scale") -> pb.ModelInferResponse:
    datatype, shape, raw = encode_raw(x.astype(np.float32))
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)],
        raw_input_contents=[raw],
    )
    return api.ModelInfer(request, timeout=timeout)


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return decode_response_outputs(response)


def test_the_good_model_serves_and_the_bad_ones_report_why(server: ServerThread) -> None:
    with stub(server.address) as api:
        assert api.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        index = {m.name: m for m in api.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
        assert index["scale"].state == "READY"
        assert index["broken"].state == "UNAVAILABLE"
        assert "not_a_module_anywhere" in index["broken"].reason
        assert index["unsigned"].state == "UNAVAILABLE"
        assert "declares its signature" in index["unsigned"].reason
        with pytest.raises(grpc.RpcError) as caught:
            api.ModelInfer(pb.ModelInferRequest(model_name="broken"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        metadata = api.ModelMetadata(pb.ModelMetadataRequest(name="scale"), timeout=10)
        assert metadata.platform == "python"
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("y", "FP32", [-1, 2]),
            ("rows", "INT64", [-1]),
        ]
        config = api.ModelConfig(pb.ModelConfigRequest(name="scale"), timeout=10).config
        assert (config.backend, config.max_batch_size) == ("python", 64)


def test_answers_come_back_as_declared(server: ServerThread) -> None:
    x = np.array([[1.0, 2.0], [0.5, 0.25]], np.float32)
    with stub(server.address) as api:
        answer = outputs(infer(api, x))
    np.testing.assert_allclose(answer["y"], x * 3, rtol=1e-6)
    assert answer["y"].dtype == np.float32


def test_concurrent_callers_are_batched_and_each_gets_its_own_rows(server: ServerThread) -> None:
    callers = 8
    answers: dict[int, dict[str, np.ndarray]] = {}

    def call(index: int) -> None:
        x = np.full((index + 1, 2), index, np.float32)
        with stub(server.address) as api:
            answers[index] = outputs(infer(api, x, timeout=90, model="gather"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for index in range(callers):
        np.testing.assert_allclose(answers[index]["y"], np.full((index + 1, 2), index * 3.0), rtol=1e-6)
    # One predict call saw every caller's rows, and each caller got back only its own.
    assert all(a["rows"].tolist() == [36] * (index + 1) for index, a in answers.items())
    batched = server.repository.get("gather")
    assert isinstance(batched, BatchingModel)
    assert (batched.batches_run, batched.requests_run) == (1, callers)


def test_a_value_error_is_invalid_argument_with_its_message(server: ServerThread) -> None:
    with stub(server.address) as api, pytest.raises(grpc.RpcError) as caught:
        infer(api, np.array([[-1.0, 0.0]]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x must not be negative" in (caught.value.details() or "")


def test_any_other_error_is_internal_and_only_the_log_has_the_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), stub(server.address) as api, pytest.raises(grpc.RpcError) as caught:
        infer(api, np.array([[1001.0, 0.0]]))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert "secret" not in details and "RuntimeError" not in details
    logged = [r for r in caplog.records if r.exc_info and "secret internal detail" in str(r.exc_info[1])]
    assert logged, "the traceback is in the log"


def test_warm_up_runs_before_ready_and_statistics_count_calls(server: ServerThread) -> None:
    model = server.repository.get("scale")
    assert isinstance(model, BatchingModel) and isinstance(model.inner, PythonModel)
    # The default warm-up (one row of zeros) ran at load, before the first request.
    assert model.inner._instance.calls[0] == 1
    with stub(server.address) as api:
        for _ in range(3):
            infer(api, np.ones((2, 2)))
        (stats,) = api.ModelStatistics(pb.ModelStatisticsRequest(name="scale"), timeout=10).model_stats
    assert stats.inference_stats.success.count == 3
    assert stats.inference_count == 6


def test_rest_serves_a_python_model(server: ServerThread) -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server.http_port}/v2/models/scale/infer",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    y = next(o for o in answer["outputs"] if o["name"] == "y")
    np.testing.assert_allclose(y["data"], [3.0, 6.0], rtol=1e-6)
