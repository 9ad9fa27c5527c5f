"""Triton's extensions of the OIP service over real gRPC (in-process server on 127.0.0.1:0).

tritonclient itself runs against real processes in tests/e2e/test_triton_client.py; here our own
stubs check each RPC's answers and refusals in detail.
"""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from proto.gen.inference import model_config_pb2 as mc
from proto.gen.inference import reflection_v1_pb2 as refl
from proto.gen.inference import reflection_v1_pb2_grpc as refl_grpc
from services.common.grpc.client import OipClient
from services.common.grpc.codec import decode_response_outputs
from services.common.model_node import build_repository
from services.common.settings import ServerSettings
from services.common.triton import params
from tests.support import ROOT, ServerThread, serving, stub


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ThreadPoolExecutor(2) as executor:
        settings = ServerSettings(service="test", model_dir=ROOT / "services/model_b/models")
        with serving(build_repository(settings, executor)) as running:
            yield running


@pytest.fixture
def api(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with stub(server.address) as s:
        yield s


def features(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((rows, 64)).astype(np.float32)


def error(call: grpc.UnaryUnaryMultiCallable, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code(), info.value.details()


def test_model_config_is_derived_from_the_onnx_signature(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    config = api.ModelConfig(pb.ModelConfigRequest(name="digits-logreg"), timeout=10).config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "digits-logreg",
        "onnxruntime_onnx",
        "onnxruntime",
        0,
    )
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("features", mc.TYPE_FP32, [-1, 64])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("probabilities", [-1, 10])]
    assert "logistic regression" in config.parameters["description"].string_value
    code, message = error(api.ModelConfig, pb.ModelConfigRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "digits-logreg" in message


def test_statistics_count_what_was_answered(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    def stats() -> pb.ModelStatistics:
        (one,) = api.ModelStatistics(pb.ModelStatisticsRequest(name="digits-head"), timeout=10).model_stats
        return one

    before = stats()
    for rows in (1, 3):
        api.ModelInfer(
            OipClient.build_request("digits-head", {"embedding": features(rows)[:, :32].copy()}), timeout=10
        )
    with pytest.raises(grpc.RpcError):
        api.ModelInfer(OipClient.build_request("digits-head", {"embedding": features(1)}), timeout=10)
    after = stats()
    assert (after.name, after.version) == ("digits-head", "1")
    assert after.inference_count - before.inference_count == 4
    assert after.execution_count - before.execution_count == 2
    s, b = after.inference_stats, before.inference_stats
    assert s.success.count - b.success.count == 2 and s.fail.count - b.fail.count == 1
    assert s.success.ns > b.success.ns and s.compute_infer.ns > b.compute_infer.ns
    assert after.last_inference > 0
    every = api.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10).model_stats
    assert {(m.name, m.version) for m in every} == {("digits-head", "1"), ("digits-logreg", "1")}


def test_repository_index_lists_every_model_with_its_state(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    index = api.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
    assert [(m.name, m.version, m.state) for m in index] == [
        ("digits-head", "1", "READY"),
        ("digits-logreg", "1", "READY"),
    ]
    code, message = error(api.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="other"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'other'" in message


def test_classification_answers_the_top_classes_as_bytes(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = features(2)
    full = decode_response_outputs(
        api.ModelInfer(OipClient.build_request("digits-logreg", {"features": x}), timeout=10)
    )["probabilities"]
    request = OipClient.build_request("digits-logreg", {"features": x}, ["probabilities"])
    request.outputs[0].parameters["classification"].int64_param = 3
    response = api.ModelInfer(request, timeout=10)
    (tensor,) = response.outputs
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [2, 3])
    classes = decode_response_outputs(response)["probabilities"]
    for row in range(2):
        indexes = [int(item.split(b":")[1]) for item in classes[row]]
        assert indexes == list(np.argsort(-full[row], kind="stable")[:3])
        assert float(classes[row][0].split(b":")[0]) == pytest.approx(full[row].max(), abs=1e-5)


@pytest.mark.parametrize(
    ("where", "key", "value", "expected"),
    [
        ("request", "sequence_id", 3, "parameter 'sequence_id' is not supported (sequence batching"),
        ("request", "sequence_start", True, "parameter 'sequence_start' is not supported (sequence batching"),
        ("request", "sequence_end", True, "parameter 'sequence_end' is not supported (sequence batching"),
        ("request", "timeout", "soon", "parameter 'timeout' must be an integer, got 'soon'"),
        ("output", "classification", 0, "'classification' must be at least 1"),
        ("input", "shared_memory_region", "nowhere", "needs 'shared_memory_byte_size'"),
    ],
)
def test_parameters_that_cannot_be_ignored_are_refused_by_name(
    api: pb_grpc.GRPCInferenceServiceStub, where: str, key: str, value: object, expected: str
) -> None:
    request = OipClient.build_request("digits-logreg", {"features": features(1)}, ["probabilities"])
    given = {"request": request.parameters, "output": request.outputs[0].parameters}.get(
        where, request.inputs[0].parameters
    )
    _set(given[key], value)
    code, message = error(api.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in message


def _set(param: pb.InferParameter, value: object) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        param.int64_param = int(value)  # type: ignore[call-overload]


def test_a_shared_memory_region_that_is_not_registered_is_refused(
    api: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = OipClient.build_request("digits-logreg", {"features": features(1)}, ["probabilities"])
    del request.raw_input_contents[:]
    given = request.inputs[0].parameters
    given["shared_memory_region"].string_param = "nowhere"
    given["shared_memory_byte_size"].int64_param = 256
    code, message = error(api.ModelInfer, request)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'nowhere'" in message


#: What stock clients send unasked (their sources: tritonclient 2.73 grpc/_utils.py, _client.py
#: async_stream_infer, http/_utils.py; perf_analyzer 2.60 on every gRPC call; MLServer's codecs),
#: and parameters of extensions nodes do not serve whose absence changes no answer.
ACCEPTED = [
    ("request", "triton_enable_empty_final_response", True),  # perf_analyzer; tritonclient streams
    ("request", "priority", 1),  # tritonclient/perf_analyzer when a priority is given
    ("request", "binary_data_output", True),  # tritonclient HTTP's request, ported to gRPC
    ("request", "timeout", 0),  # tritonclient client_timeout (0: none)
    ("input", "content_type", "np"),  # MLServer's codecs
    ("input", "binary_data_size", 256),
    ("output", "binary_data", True),  # tritonclient HTTP outputs
    ("output", "colour", "red"),  # a name no client knows: counted as "other"
]


@pytest.mark.parametrize(("where", "key", "value"), ACCEPTED)
def test_parameters_stock_clients_send_are_accepted_ignored_and_counted(
    server: ServerThread, api: pb_grpc.GRPCInferenceServiceStub, where: str, key: str, value: object
) -> None:
    x = features(2)
    plain = decode_response_outputs(
        api.ModelInfer(
            OipClient.build_request("digits-logreg", {"features": x}, ["probabilities"]), timeout=10
        )
    )
    request = OipClient.build_request("digits-logreg", {"features": x}, ["probabilities"])
    given = {"request": request.parameters, "output": request.outputs[0].parameters}.get(
        where, request.inputs[0].parameters
    )
    _set(given[key], value)
    registry = server.server.metrics.registry
    label = key if key in params.IGNORED else params.OTHER

    def ignored() -> float:
        return registry.get_sample_value("onnxmesh_ignored_parameters_total", {"parameter": label}) or 0.0

    before = ignored()
    answer = decode_response_outputs(api.ModelInfer(request, timeout=10))
    np.testing.assert_allclose(answer["probabilities"], plain["probabilities"], rtol=1e-6)
    assert ignored() == before + (0 if key == "timeout" else 1)


@pytest.fixture
def shm_region() -> Iterator[tuple[str, mmap.mmap]]:
    key = f"/onnxmesh-test-{uuid.uuid4().hex[:12]}"
    fd = os.open(f"/dev/shm{key}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 4096)
        memory = mmap.mmap(fd, 4096)
        yield key, memory
        memory.close()
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm{key}")


def test_system_shared_memory_inputs_and_outputs(
    api: pb_grpc.GRPCInferenceServiceStub, shm_region: tuple[str, mmap.mmap]
) -> None:
    key, memory = shm_region
    x = features(2)
    memory[: x.nbytes] = x.tobytes()
    api.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="r", key=key, byte_size=4096), timeout=10
    )
    try:
        status = api.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
        assert status.regions["r"].key == key and status.regions["r"].byte_size == 4096
        code, _ = error(
            api.SystemSharedMemoryRegister,
            pb.SystemSharedMemoryRegisterRequest(name="r", key=key, byte_size=8),
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS
        request = pb.ModelInferRequest(model_name="digits-logreg")
        tensor = request.inputs.add(name="features", datatype="FP32", shape=[2, 64])
        tensor.parameters["shared_memory_region"].string_param = "r"
        tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes
        out = request.outputs.add(name="probabilities")
        out.parameters["shared_memory_region"].string_param = "r"
        out.parameters["shared_memory_offset"].int64_param = 1024
        out.parameters["shared_memory_byte_size"].int64_param = 80
        response = api.ModelInfer(request, timeout=10)
        assert response.raw_output_contents == [b""]
        assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == 80
        inline = decode_response_outputs(
            api.ModelInfer(OipClient.build_request("digits-logreg", {"features": x}), timeout=10)
        )["probabilities"]
        written = np.frombuffer(memory[1024:1104], dtype=np.float32).reshape(2, 10)
        np.testing.assert_allclose(written, inline, rtol=1e-6)
        out.parameters["shared_memory_byte_size"].int64_param = 40
        code, message = error(api.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 80 bytes" in message
        tensor.parameters["shared_memory_offset"].int64_param = 4000
        code, message = error(api.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds region 'r'" in message
    finally:
        api.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=10)
    assert not api.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10).regions
    code, message = error(
        api.SystemSharedMemoryRegister,
        pb.SystemSharedMemoryRegisterRequest(name="x", key="/../etc", byte_size=8),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_answers_every_request_and_goes_on_after_an_error(
    api: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    good = [OipClient.build_request("digits-logreg", {"features": features(1)}) for _ in range(5)]
    for i, request in enumerate(good):
        request.id = f"r{i}"
    bad = OipClient.build_request("digits-logreg", {"features": features(1)[:, :8].copy()})
    bad.id = "bad"
    answers = list(api.ModelStreamInfer(iter([*good[:2], bad, *good[2:]]), timeout=30))
    assert len(answers) == 6
    ok = {a.infer_response.id for a in answers if not a.error_message}
    assert ok == {f"r{i}" for i in range(5)}
    (failed,) = [a for a in answers if a.error_message]
    assert failed.error_message.startswith("INVALID_ARGUMENT: ") and failed.infer_response.id == "bad"


def test_refused_rpcs_say_why(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    code, message = error(api.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="digits-head"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "model control is off" in message
    code, message = error(api.CudaSharedMemoryRegister, pb.CudaSharedMemoryRegisterRequest(name="c"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CUDA shared memory is not served" in message
    assert not api.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), timeout=10).regions
    code, _ = error(api.TraceSetting, pb.TraceSettingRequest())
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_server_metadata_lists_the_served_extensions(api: pb_grpc.GRPCInferenceServiceStub) -> None:
    extensions = api.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions
    assert {"classification", "model_configuration", "statistics", "system_shared_memory"} <= set(extensions)


def test_reflection_v1_lists_the_services(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reflection = refl_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(
            iter([refl.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.reflection.v1.ServerReflection"} <= names
        ask = refl.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        (found,) = reflection.ServerReflectionInfo(iter([ask]), timeout=10)
        assert found.file_descriptor_response.file_descriptor_proto
