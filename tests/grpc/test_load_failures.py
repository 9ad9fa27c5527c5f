"""A model that fails to load or warm up beside one that works: the node serves the good one.

Real ONNX files: the digits logistic regression, and a model built here whose Reshape needs
a multiple of 4 values, so the default warm-up (one row of zeros, dynamic dims 1) fails as a
real third-party model's would; its config.json can declare a sample that fits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.grpc.client import OipClient
from services.common.model_node import build_repository
from services.common.settings import ServerSettings
from tests.support import ROOT, ServerThread, stub


def fussy_model(path: Path) -> None:
    """x FP32 [-1, -1] -> y = reshape(x, [-1, 4]): any input whose size is not a multiple of 4 fails."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "fussy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k", 4])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True)
    onnx.save(model, path)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "services/model_b/models/digits-logreg", tmp_path / "digits-logreg")
    fussy_model(tmp_path / "fussy/1/model.onnx")
    (tmp_path / "broken/1").mkdir(parents=True)
    (tmp_path / "broken/1/model.onnx").write_bytes(b"not an onnx file")
    (tmp_path / "typo/1").mkdir(parents=True)
    shutil.copy(ROOT / "services/model_b/models/digits-logreg/1/model.onnx", tmp_path / "typo/1/model.onnx")
    (tmp_path / "typo/config.json").write_text('{"max_batch_sise": 4}')
    return tmp_path


@pytest.fixture
def server(model_dir: Path) -> Iterator[ServerThread]:
    with ThreadPoolExecutor(2) as executor:
        repository = build_repository(ServerSettings(service="test", model_dir=model_dir), executor)
        running = ServerThread(repository)
        try:
            running.start()
            yield running
        finally:
            running.stop()


def test_the_node_serves_the_good_model_and_reports_the_others(server: ServerThread) -> None:
    with stub(server.address) as api:
        assert api.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        index = {m.name: m for m in api.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
        assert index["digits-logreg"].state == "READY"
        for name in ("fussy", "broken", "typo"):
            assert index[name].state == "UNAVAILABLE", name
        assert "warm-up sample 'default (zeros, dynamic dims 1)' failed" in index["fussy"].reason
        assert '"warmup": false' in index["fussy"].reason
        assert "cannot load" in index["broken"].reason
        assert "unknown keys ['max_batch_sise']" in index["typo"].reason
        ready = api.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10).models
        assert [m.name for m in ready] == ["digits-logreg"]
        assert not api.ModelReady(pb.ModelReadyRequest(name="fussy"), timeout=10).ready
        with pytest.raises(grpc.RpcError) as info:
            api.ModelInfer(OipClient.build_request("fussy", {"x": np.zeros((1, 4), np.float32)}), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "fussy' version 1 failed to load: warm-up sample" in info.value.details()
        x = np.zeros((1, 64), np.float32)
        answer = api.ModelInfer(OipClient.build_request("digits-logreg", {"features": x}), timeout=10)
        assert answer.model_name == "digits-logreg"


def test_declared_warmup_samples_load_the_model(model_dir: Path) -> None:
    (model_dir / "fussy/warmup").mkdir()
    (model_dir / "fussy/warmup/x.bin").write_bytes(np.arange(8, dtype=np.float32).tobytes())
    samples = [
        {"name": "zeros", "inputs": {"x": {"dims": [2, 2], "zero_data": True}}},
        {"name": "from a file", "count": 2, "inputs": {"x": {"dims": [1, 8], "input_data_file": "x.bin"}}},
        {
            "name": "values",
            "inputs": {"x": {"dims": [1, 4], "values": [1, 2, 3, 4], "data_type": "TYPE_FP32"}},
        },
    ]
    (model_dir / "fussy/config.json").write_text(json.dumps({"warmup": samples}))
    with ThreadPoolExecutor(2) as executor:
        repository = build_repository(ServerSettings(service="test", model_dir=model_dir), executor)
        running = ServerThread(repository)
        try:
            running.start()
            with stub(running.address) as api:
                index = {
                    m.name: m.state
                    for m in api.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
                }
                assert index["fussy"] == "READY"
                config = api.ModelConfig(pb.ModelConfigRequest(name="fussy"), timeout=10).config
                assert [w.name for w in config.model_warmup] == ["zeros", "from a file", "values"]
        finally:
            running.stop()


@pytest.mark.parametrize(
    ("warmup", "reason"),
    [
        (False, None),
        ([{"inputs": {"z": {"dims": [1, 4]}}}], "the model has no input 'z'"),
        ([{"inputs": {"x": {"dims": [4]}}}], "dims [4] do not fit FP32[-1, -1]"),
        ([{"inputs": {"x": {"dims": [1, 4], "input_data_file": "missing.bin"}}}], "cannot read"),
    ],
)
def test_warmup_can_be_turned_off_and_bad_samples_are_reasons(
    model_dir: Path, warmup: object, reason: str | None
) -> None:
    (model_dir / "fussy/config.json").write_text(json.dumps({"warmup": warmup}))
    with ThreadPoolExecutor(2) as executor:
        repository = build_repository(ServerSettings(service="test", model_dir=model_dir), executor)
        running = ServerThread(repository)
        try:
            running.start()
            with stub(running.address) as api:
                index = {
                    m.name: m for m in api.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
                }
        finally:
            running.stop()
    if reason is None:
        assert index["fussy"].state == "READY"
    else:
        assert index["fussy"].state == "UNAVAILABLE" and reason in index["fussy"].reason


def test_a_node_with_no_loadable_model_exits_with_every_reason(tmp_path: Path) -> None:
    fussy_model(tmp_path / "fussy/1/model.onnx")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.common.model_node",
            "--name",
            "model_a",
            "--port",
            "0",
            "--model-dir",
            str(tmp_path),
            "--log-format",
            "text",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("model_a: no model could be loaded: fussy/1: warm-up sample"), last
    assert "Traceback" not in run.stderr
