"""The bad-input matrix: every RPC of every node, each mistake answered with the right code and a
bounded message, and the node serving everyone else afterwards.

Requests are built by hand (protobuf, or raw bytes that are not protobuf at all) and sent on a
plain gRPC channel, so nothing of our client smooths them over. The matrix is printed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from meshctl.launcher import LocalMesh
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import MAX_MESSAGE
from services.common.grpc.client import OipClient
from tests.faults.conftest import IMAGES
from tests.faults.load import say

pytestmark = pytest.mark.timeout(120)

SERVICE = "/inference.GRPCInferenceService/"
HUGE = "n" * 16_000
#: What each node serves: (replica, model, input, datatype, one valid row).
FEATURES = np.zeros((1, 64), np.float32)
NODES: dict[str, tuple[str, str, str, np.ndarray]] = {
    "preprocess": ("digits-preprocess", "image", "UINT8", IMAGES[:1]),
    "model_a": ("digits-mlp", "features", "FP32", FEATURES),
    "model_b": ("digits-logreg", "features", "FP32", FEATURES),
    "orchestrator": ("digits-serial", "image", "UINT8", IMAGES[:1]),
}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    build: Callable[[str, str, str, np.ndarray], pb.ModelInferRequest | bytes]
    expected: str  # status code name
    #: The code for nodes taking images (UINT8), where it differs.
    for_images: str | None = None

    def code(self, datatype: str) -> str:
        return self.for_images if self.for_images and datatype == "UINT8" else self.expected


def infer(model: str, name: str, datatype: str, array: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def with_input(
    model: str, name: str, datatype: str, shape: list[int], raw: bytes, **fields: object
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def mixed(model: str, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    request = infer(model, name, datatype, array)
    request.inputs[0].contents.uint_contents.extend([0] * 64)
    return request


def typed_bytes(model: str, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"not a tensor of numbers")
    return request


def duplicate(model: str, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    request = infer(model, name, datatype, array)
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


def non_finite(model: str, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    if datatype == "UINT8":  # images cannot hold NaN: their refused values are pixels above 16
        return infer(model, name, datatype, np.full_like(array, 99))
    bad = array.copy()
    bad[0, :2] = [np.nan, np.inf]
    return infer(model, name, datatype, bad)


def rows(n: int) -> Callable[[str, str, str, np.ndarray], pb.ModelInferRequest]:
    def build(model: str, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
        return infer(model, name, datatype, np.repeat(array, n, axis=0))

    return build


def oversize(model: str, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    raw = bytes(65 * 1024 * 1024)  # above every node's 64 MiB message limit
    return with_input(model, name, datatype, [len(raw) // array[0].nbytes, *array.shape[1:]], raw)


INFER_CASES = [
    Case("valid", "ModelInfer", infer, "OK"),
    Case(
        "datatype", "ModelInfer", lambda m, n, d, a: infer(m, n, d, a.astype(np.float64)), "INVALID_ARGUMENT"
    ),
    Case("rank", "ModelInfer", lambda m, n, d, a: infer(m, n, d, a.reshape(1, 1, -1)), "INVALID_ARGUMENT"),
    Case(
        "dim", "ModelInfer", lambda m, n, d, a: infer(m, n, d, np.zeros((1, 70), a.dtype)), "INVALID_ARGUMENT"
    ),
    Case(
        "byte length",
        "ModelInfer",
        lambda m, n, d, a: with_input(m, n, d, list(a.shape), a.tobytes()[:-1]),
        "INVALID_ARGUMENT",
    ),
    Case(
        "negative dim",
        "ModelInfer",
        lambda m, n, d, a: with_input(m, n, d, [-1, *a.shape[1:]], a.tobytes()),
        "INVALID_ARGUMENT",
    ),
    Case("raw+typed", "ModelInfer", mixed, "INVALID_ARGUMENT"),
    # Features are real numbers: NaN and Inf propagate to the answer. Pixels are refused outside 0..16.
    Case("NaN/Inf", "ModelInfer", non_finite, "OK", for_images="INVALID_ARGUMENT"),
    Case("empty batch", "ModelInfer", rows(0), "OK"),
    Case("huge batch", "ModelInfer", rows(20_000), "OK"),
    Case("oversize", "ModelInfer", oversize, "RESOURCE_EXHAUSTED"),
    Case("unknown model", "ModelInfer", lambda m, n, d, a: infer("no-such-model", n, d, a), "NOT_FOUND"),
    Case(
        "unknown version", "ModelInfer", lambda m, n, d, a: infer(m, n, d, a, model_version="99"), "NOT_FOUND"
    ),
    Case(
        "unknown output",
        "ModelInfer",
        lambda m, n, d, a: infer(
            m, n, d, a, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]
        ),
        "INVALID_ARGUMENT",
    ),
    Case("BYTES", "ModelInfer", typed_bytes, "INVALID_ARGUMENT"),
    Case("duplicate names", "ModelInfer", duplicate, "INVALID_ARGUMENT"),
    Case(
        "missing input",
        "ModelInfer",
        lambda m, n, d, a: pb.ModelInferRequest(model_name=m),
        "INVALID_ARGUMENT",
    ),
    Case("garbage bytes", "ModelInfer", lambda m, n, d, a: b"\xff\xfe\x00garbage" * 8, "INVALID_ARGUMENT"),
    Case("huge model name", "ModelInfer", lambda m, n, d, a: infer(HUGE, n, d, a), "NOT_FOUND"),
    Case("huge input name", "ModelInfer", lambda m, n, d, a: infer(m, HUGE, d, a), "INVALID_ARGUMENT"),
    Case("huge request id", "ModelInfer", lambda m, n, d, a: infer(m, n, d, a, id=HUGE), "OK"),
]


def _other(method: str, message: type, valid: dict[str, str]) -> list[Case]:
    return [
        Case("valid", method, lambda m, n, d, a: message(**{k: m for k in valid}), "OK"),
        Case("garbage bytes", method, lambda m, n, d, a: b"\xff\xfe\x00garbage", "INVALID_ARGUMENT"),
    ] + (
        [
            Case("unknown model", method, lambda m, n, d, a: message(name="no-such-model"), "NOT_FOUND"),
            Case("unknown version", method, lambda m, n, d, a: message(name=m, version="99"), "NOT_FOUND"),
            Case("huge name", method, lambda m, n, d, a: message(name=HUGE), "NOT_FOUND"),
        ]
        if valid
        else []
    )


CASES = [
    *INFER_CASES,
    *_other("ModelMetadata", pb.ModelMetadataRequest, {"name": ""}),
    *_other("ModelReady", pb.ModelReadyRequest, {"name": ""}),
    *_other("ServerLive", pb.ServerLiveRequest, {}),
    *_other("ServerReady", pb.ServerReadyRequest, {}),
    *_other("ServerMetadata", pb.ServerMetadataRequest, {}),
]


def send(channel: grpc.Channel, method: str, body: pb.ModelInferRequest | bytes) -> tuple[str, str]:
    raw = body if isinstance(body, bytes) else body.SerializeToString()
    try:
        channel.unary_unary(SERVICE + method)(raw, timeout=30.0)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


@pytest.mark.parametrize("node", list(NODES))
def test_every_rpc_answers_every_mistake_with_its_code(mesh: LocalMesh, node: str) -> None:
    model, name, datatype, array = NODES[node]
    address = mesh.address(node)
    options = [("grpc.max_send_message_length", 128 << 20), ("grpc.max_receive_message_length", 128 << 20)]
    rows_out = []
    with grpc.insecure_channel(address, options=options) as channel:
        for case in CASES:
            code, details = send(channel, case.method, case.build(model, name, datatype, array))
            rows_out.append((case, code, details))
    say(f"[faults] bad-input matrix on {node} ({model}):")
    for case, code, details in rows_out:
        say(f"[faults]   {case.method:<14} {case.name:<16} {code:<18} {details[:90]}")
    wrong = [(c.method, c.name, code, d[:200]) for c, code, d in rows_out if code != c.code(datatype)]
    assert wrong == []
    for _, _, details in rows_out:
        assert len(details) <= MAX_MESSAGE + 40  # bounded, whatever was echoed
        assert "Unexpected" not in details and "Traceback" not in details
    assert serving(address, model, name, array)


def serving(address: str, model: str, name: str, array: np.ndarray) -> bool:
    async def check() -> bool:
        async with OipClient(address) as client:
            health = await client.health(timeout=5.0)
            result = await client.infer(model, {name: array}, timeout=5.0)
        return health == "SERVING" and bool(result.outputs)

    return asyncio.run(check())


def test_no_traceback_reached_any_log(mesh: LocalMesh, logs: object) -> None:
    text = logs.getvalue()  # type: ignore[attr-defined]
    assert "Traceback" not in text and "DecodeError" not in text
