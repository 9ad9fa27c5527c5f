"""The model services over real gRPC (in-process server on 127.0.0.1:0): every RPC, every bad input."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from demo.digits import load_holdout
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.grpc.client import OipClient
from services.common.grpc.codec import decode_response_outputs
from services.common.model_node import build_repository
from services.common.settings import ServerSettings
from tests.support import ROOT, ServerThread, model_repository, serving, stub

HOLDOUT = load_holdout()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ThreadPoolExecutor(2) as executor:
        repo = model_repository(
            ROOT / "services/model_a/models", ROOT / "services/model_b/models", executor=executor
        )
        pre = build_repository(
            ServerSettings(service="test", model_dir=ROOT / "services/preprocess/models", runtime="python"),
            executor,
        )
        for servable in pre.all():
            repo.add(servable)
        with serving(repo) as running:
            yield running


@pytest.fixture
def api(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with stub(server.address) as s:
        yield s


def features(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((rows, 64)).astype(np.float32)


def infer_request(model: str, **tensors: np.ndarray) -> pb.ModelInferRequest:
    return OipClient.build_request(model, tensors)


def expect_error(call: grpc.UnaryUnaryMultiCallable, request: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def test_server_live_ready_and_metadata(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert api.ServerLive(pb.ServerLiveRequest()).live
    assert api.ServerReady(pb.ServerReadyRequest()).ready
    meta = api.ServerMetadata(pb.ServerMetadataRequest())
    # The version pyproject.toml gives the package, read from its installed metadata.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta.name == "onnxmesh-test" and meta.version == project["version"]


def test_model_metadata_comes_from_the_onnx_graph(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = api.ModelMetadata(pb.ModelMetadataRequest(name="digits-mlp"))
    assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("features", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 10]),
        ("embedding", "FP32", [-1, 32]),
    ]
    assert api.ModelReady(pb.ModelReadyRequest(name="digits-head")).ready


def test_infer_returns_every_output_with_model_and_version(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = api.ModelInfer(infer_request("digits-mlp", features=features(3)))
    assert (response.model_name, response.model_version) == ("digits-mlp", "1")
    outputs = decode_response_outputs(response)
    assert outputs["probabilities"].shape == (3, 10) and outputs["embedding"].shape == (3, 32)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_requested_output_subset_and_version(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("digits-mlp", features=features())
    request.model_version = "1"
    request.outputs.add(name="embedding")
    response = api.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["embedding"]


def test_typed_contents_are_accepted(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = features(1)
    request = pb.ModelInferRequest(model_name="digits-logreg")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(
        x.ravel()
    )
    typed = decode_response_outputs(api.ModelInfer(request))["probabilities"]
    raw = decode_response_outputs(api.ModelInfer(infer_request("digits-logreg", features=x)))["probabilities"]
    np.testing.assert_allclose(typed, raw, rtol=1e-6)


def test_preprocess_then_models_classify_held_out_digits(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    images, labels = HOLDOUT.images[:50], HOLDOUT.labels[:50]
    feats = decode_response_outputs(api.ModelInfer(infer_request("digits-preprocess", image=images)))[
        "features"
    ]
    probs = decode_response_outputs(api.ModelInfer(infer_request("digits-mlp", features=feats)))[
        "probabilities"
    ]
    assert (probs.argmax(axis=1) == labels).mean() >= 0.9


@pytest.mark.parametrize(
    ("request_factory", "code", "fragments"),
    [
        (
            lambda: infer_request("no-such-model", features=features()),
            "NOT_FOUND",
            ["no-such-model", "digits-mlp"],
        ),
        (
            lambda: pb.ModelInferRequest(model_name="digits-mlp", model_version="7"),
            "NOT_FOUND",
            ["version '7'", "available: 1"],
        ),
        (
            lambda: pb.ModelInferRequest(model_name="digits-mlp"),
            "INVALID_ARGUMENT",
            ["'features' is missing"],
        ),
        (
            lambda: infer_request("digits-mlp", features=features(), extra=features()),
            "INVALID_ARGUMENT",
            ["no input named 'extra'", "features FP32[-1, 64]"],
        ),
        (
            lambda: infer_request("digits-mlp", feature=features()),
            "INVALID_ARGUMENT",
            ["no input named 'feature'"],
        ),
        (
            lambda: infer_request("digits-mlp", features=features().astype(np.float64)),
            "INVALID_ARGUMENT",
            ["'features' has datatype FP64, expected FP32"],
        ),
        (
            lambda: infer_request("digits-mlp", features=features().reshape(2, 8, 8)),
            "INVALID_ARGUMENT",
            ["'features' has shape [2, 8, 8], expected [-1, 64]"],
        ),
        (
            lambda: infer_request("digits-mlp", features=features()[:, :60]),
            "INVALID_ARGUMENT",
            ["'features' has shape [2, 60]"],
        ),
        (
            lambda: infer_request("digits-preprocess", image=np.full((1, 8, 8), 17, np.uint8)),
            "INVALID_ARGUMENT",
            ["'image'", "0..16", "found 17"],
        ),
        (
            lambda: infer_request("digits-preprocess", image=np.zeros((1, 64), np.uint8)),
            "INVALID_ARGUMENT",
            ["'image' has shape [1, 64], expected [-1, 8, 8]"],
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "missing-input",
        "extra-input",
        "misnamed-input",
        "wrong-datatype",
        "wrong-rank",
        "wrong-dim",
        "pixel-out-of-range",
        "image-wrong-shape",
    ],
)
def test_bad_requests_get_a_clear_status(
    api: pb_grpc.GRPCInferenceServiceStub, request_factory: object, code: str, fragments: list[str]
) -> None:
    details = expect_error(api.ModelInfer, request_factory(), getattr(grpc.StatusCode, code))  # type: ignore[operator]
    for fragment in fragments:
        assert fragment in details
    # The server keeps serving everyone else.
    assert api.ModelInfer(infer_request("digits-logreg", features=features())).outputs


def test_byte_length_mismatch(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("digits-mlp", features=features())
    request.raw_input_contents[0] = request.raw_input_contents[0][:-3]
    details = expect_error(api.ModelInfer, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert "tensor 'features'" in details and "needs 512 bytes" in details


def test_mixing_raw_and_typed_contents(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("digits-mlp", features=features())
    request.inputs[0].contents.fp32_contents.append(1.0)
    details = expect_error(api.ModelInfer, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert "input 'features'" in details and "one or the other" in details


def test_unknown_requested_output(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request("digits-mlp", features=features())
    request.outputs.add(name="logits")
    details = expect_error(api.ModelInfer, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert "no output named 'logits'" in details and "embedding, probabilities" in details


def test_metadata_and_ready_of_unknown_model(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    expect_error(api.ModelMetadata, pb.ModelMetadataRequest(name="nope"), grpc.StatusCode.NOT_FOUND)
    expect_error(api.ModelReady, pb.ModelReadyRequest(name="nope"), grpc.StatusCode.NOT_FOUND)


def test_large_batch_above_grpc_default_limit(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    # 20k rows x 64 floats = 5 MiB in, above gRPC's 4 MiB default receive limit.
    response = api.ModelInfer(infer_request("digits-logreg", features=features(20_000)))
    assert list(response.outputs[0].shape) == [20_000, 10]


def test_an_unknown_model_is_not_found_even_when_its_tensors_are_malformed(
    api: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = infer_request("no-such-model", features=features())
    request.raw_input_contents[0] = request.raw_input_contents[0][:-3]
    assert "no-such-model" in expect_error(api.ModelInfer, request, grpc.StatusCode.NOT_FOUND)


def test_every_call_is_counted_by_model_version_and_code(
    server: ServerThread, api: pb_grpc.GRPCInferenceServiceStub
) -> None:
    registry = server.server.metrics.registry

    def count(code: str) -> float:
        labels = {"model": "digits-logreg", "version": "1", "code": code}
        return registry.get_sample_value("onnxmesh_requests_total", labels) or 0.0

    ok, invalid = count("OK"), count("INVALID_ARGUMENT")
    api.ModelInfer(infer_request("digits-logreg", features=features()))
    expect_error(
        api.ModelInfer,
        infer_request("digits-logreg", features=features(1)[:, :8]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    truncated = infer_request("digits-logreg", features=features())
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-3]
    expect_error(api.ModelInfer, truncated, grpc.StatusCode.INVALID_ARGUMENT)
    assert (count("OK") - ok, count("INVALID_ARGUMENT") - invalid) == (1, 2)
