"""Fakes at the engine's Stage seam: services as plain Python functions, no sockets."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.dataplane import DataPlane
from services.common.errors import MeshError
from services.common.model import Servable
from services.common.observability.metrics import ServerMetrics
from services.common.repository import ModelRepository
from services.common.types import InferRequest, InferResult, ModelSignature, TensorSpec
from tests.support import run

FakeModel = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class FakeClock:
    """A clock that only moves when told to: deadlines become exact in tests."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeCall:
    """One infer call a FakeStage received."""

    model: str
    version: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    timeout: float
    request_id: str
    at: float | None = None  # the FakeClock's time when called
    cancelled: bool = False
    finished: bool = False


@dataclass
class FakeStage:
    """A Stage whose models are functions of their inputs.

    Scripting: ``fail(model, err, ...)`` queues errors the next calls raise; ``hang(model)``
    makes calls wait until cancelled; ``takes[model]`` advances the FakeClock per call; ``sleep``
    makes calls really wait (seconds). Every call is recorded in ``calls``; ``wait_for_calls(n)``
    returns once n calls have begun.
    """

    models: dict[str, FakeModel]
    version: str = "1"
    clock: FakeClock | None = None
    takes: dict[str, float] = field(default_factory=dict)
    sleep: dict[str, float] = field(default_factory=dict)
    hanging: set[str] = field(default_factory=set)
    errors: dict[str, list[BaseException]] = field(default_factory=dict)
    signatures: dict[str, ModelSignature] = field(default_factory=dict)
    calls: list[FakeCall] = field(default_factory=list)
    _called: asyncio.Event | None = None

    def fail(self, model: str, *errors: BaseException) -> FakeStage:
        self.errors.setdefault(model, []).extend(errors)
        return self

    def hang(self, model: str) -> FakeStage:
        self.hanging.add(model)
        return self

    def calls_to(self, model: str) -> list[FakeCall]:
        return [c for c in self.calls if c.model == model]

    async def wait_for_calls(self, n: int) -> None:
        while len(self.calls) < n:
            self._called = asyncio.Event()
            await self._called.wait()

    async def call(self, request: InferRequest) -> InferResult:
        model, version, inputs, outputs = request.model, request.version, request.inputs, request.outputs
        now = self.clock() if self.clock else time.monotonic()
        timeout = math.inf if request.deadline is None else request.deadline - now
        call = FakeCall(
            model,
            version,
            dict(inputs),
            tuple(outputs),
            timeout,
            request.request_id,
            self.clock() if self.clock else None,
        )
        self.calls.append(call)
        if self._called is not None:
            self._called.set()
        try:
            if model in self.hanging:
                await asyncio.Event().wait()
            if model in self.sleep:
                await asyncio.sleep(self.sleep[model])
            if self.clock is not None and model in self.takes:
                self.clock.advance(self.takes[model])
            queued = self.errors.get(model)
            if queued:
                raise queued.pop(0)
            answer = self.models[model](inputs)
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        call.finished = True
        if outputs:
            answer = {name: answer[name] for name in outputs}
        return InferResult(answer, model_name=model, model_version=version or self.version)

    async def metadata(self, model: str, version: str) -> ModelSignature:
        try:
            return self.signatures[model]
        except KeyError:
            raise MeshError(f"FakeStage has no signature for {model!r}") from None

    async def is_ready(self, model: str, version: str) -> bool:
        return model in self.models


# Digits-shaped fake models: deterministic numpy stand-ins with the real tensor contracts.


def fake_preprocess(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = inputs["image"]
    return {"features": (image.reshape(len(image), 64) / 16.0).astype(np.float32)}


def _softmax(x: np.ndarray) -> np.ndarray:
    e: np.ndarray = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def fake_mlp(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    features = inputs["features"]
    logits = features[:, :10] * 4.0
    return {"probabilities": _softmax(logits), "embedding": features[:, :32].copy()}


def fake_logreg(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    features = inputs["features"]
    return {"probabilities": _softmax(features[:, 10:20] * 2.0)}


def fake_head(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"probabilities": _softmax(inputs["embedding"][:, 5:15] * 3.0)}


def constant(probabilities: Sequence[float], name: str = "probabilities") -> FakeModel:
    """A model answering the same row for every row of its first input."""
    row = np.asarray(probabilities, dtype=np.float32)

    def model(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(inputs.values())))
        return {name: np.tile(row, (batch, 1))}

    return model


def rows(*per_row: Sequence[float], name: str = "probabilities") -> FakeModel:
    """A model answering the given rows (the batch must have as many rows)."""
    table = np.asarray(per_row, dtype=np.float32)

    def model(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: table.copy()}

    return model


def _t(name: str, datatype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, datatype, tuple(shape))


def _sig(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ModelSignature:
    return ModelSignature(name, ("1",), "onnxruntime_onnx", tuple(inputs), tuple(outputs))


#: The signatures of the real digits models (what each service's ModelMetadata answers).
DIGITS_SIGNATURES: dict[str, ModelSignature] = {
    "digits-preprocess": _sig(
        "digits-preprocess", [_t("image", "UINT8", -1, 8, 8)], [_t("features", "FP32", -1, 64)]
    ),
    "digits-mlp": _sig(
        "digits-mlp",
        [_t("features", "FP32", -1, 64)],
        [_t("probabilities", "FP32", -1, 10), _t("embedding", "FP32", -1, 32)],
    ),
    "digits-logreg": _sig(
        "digits-logreg", [_t("features", "FP32", -1, 64)], [_t("probabilities", "FP32", -1, 10)]
    ),
    "digits-head": _sig(
        "digits-head", [_t("embedding", "FP32", -1, 32)], [_t("probabilities", "FP32", -1, 10)]
    ),
}

#: service -> model names, as in the default mesh.
DIGITS_SERVICES = {
    "preprocess": ("digits-preprocess",),
    "model_a": ("digits-mlp",),
    "model_b": ("digits-logreg", "digits-head"),
}


def digits_signatures(version: str = "") -> dict[tuple[str, str, str], ModelSignature]:
    """The signature mapping validate_against_signatures takes, for the default mesh."""
    return {
        (service, model, version): DIGITS_SIGNATURES[model]
        for service, models in DIGITS_SERVICES.items()
        for model in models
    }


def digits_stages(clock: FakeClock | None = None) -> dict[str, FakeStage]:
    """FakeStages for the default mesh's three services."""
    return {
        "preprocess": FakeStage({"digits-preprocess": fake_preprocess}, clock=clock),
        "model_a": FakeStage({"digits-mlp": fake_mlp}, clock=clock),
        "model_b": FakeStage({"digits-logreg": fake_logreg, "digits-head": fake_head}, clock=clock),
    }


# -- a servable doubling its input, on a data plane of its own ----------------------------------------

SIGNATURE = ModelSignature(
    "double",
    ("1",),
    "test",
    (TensorSpec("x", "FP32", (-1, 3)),),
    (TensorSpec("y", "FP32", (-1, 3)), TensorSpec("total", "FP32", (-1,))),
)


class Double(Servable):
    """y = 2x and total = row sums of x FP32[-1, 3]; records every request it answers."""

    def __init__(self, version: str = "1") -> None:
        self.name = "double"
        self.version = version
        self.signature = SIGNATURE
        self.calls: list[InferRequest] = []
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def load(self) -> None:
        self._ready = True

    async def infer(self, request: InferRequest) -> InferResult:
        self.calls.append(request)
        x = request.inputs["x"]
        answers = {"y": x * 2, "total": x.sum(axis=1)}
        return InferResult({name: answers[name] for name in request.outputs or answers})


def plane(*servables: Servable) -> DataPlane:
    return DataPlane(ModelRepository(servables), ServerMetrics("test"), server_name="onnxmesh-test")


def loaded(*models: Double) -> DataPlane:
    for model in models:
        run(model.load())
    return plane(*models)


def requests_counted(dataplane: DataPlane, model: str, code: str, version: str = "1") -> float:
    value = dataplane.metrics.registry.get_sample_value(
        "onnxmesh_requests_total", {"model": model, "version": version, "code": code}
    )
    return value or 0.0


X = np.ones((2, 3), dtype=np.float32)
