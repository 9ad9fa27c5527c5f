"""The data plane: what a node does with a request, whatever transport brought it.

    servicer (gRPC edge: protobuf <-> InferRequest/InferResult, errors -> status codes)
        |
    DataPlane: model lookup -> readiness (draining, loading) -> validation -> metrics -> infer
        |
    Servable (a Model, a BatchingModel around one, or an orchestrator graph)

Every node has one, built by `MeshServer` over its `ModelRepository`: the model services, the
orchestrator (whose graphs are servables with a signature, so their inputs are checked here
too, and only here) and the all-in-one baseline, which also calls its in-process services
through one each, as the mesh calls them over the network. It knows no protobuf and no grpc:
it takes and returns plain values and raises the `services.common.errors` tree; the servicer
maps those errors to status codes.

Validation covers what a signature says: input names (none missing, none unknown), each
input's datatype and shape (-1 = any size), and that every requested output exists. The
first problem found is an InvalidInput naming the model, the tensor, what was expected and
what came. What needs the model itself (values out of range, shapes a Reshape rejects) is the
servable's to reject.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import numpy as np

from services.common.errors import InvalidInput, MeshError, Unavailable
from services.common.limits import ConcurrencyLimiter
from services.common.model import Servable
from services.common.observability import tracing
from services.common.observability.metrics import ServerMetrics
from services.common.repository import ModelConfig, ModelRepository
from services.common.triton.shared_memory import SharedMemory
from services.common.triton.statistics import Duration, ModelStats, Statistics
from services.common.types import (
    NUMPY_TO_DATATYPE,
    InferRequest,
    InferResult,
    ModelSignature,
    datatype_of,
    rows_of,
)
from services.common.warmup import WarmupSample

R = TypeVar("R")

#: A cancelled call this close to its deadline was cancelled by the deadline (clocks differ slightly).
_DEADLINE_SLACK = 0.005


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """What ServerMetadata answers."""

    name: str
    version: str
    extensions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What ModelMetadata answers: the servable's signature and the versions the request covers."""

    signature: ModelSignature
    versions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """What Triton's ModelConfig answers, from the signature and the model's config.json.

    `max_batch_size` is 0 unless the node batches the model adaptively; then, as in Triton,
    the first dimension of every tensor is the batch and is left out of the config's dims.
    """

    signature: ModelSignature
    platform: str
    max_batch_size: int
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    description: str = ""
    warmup: tuple[WarmupSample, ...] | None = None


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of RepositoryIndex: READY, LOADING or UNAVAILABLE, with the reason when known."""

    name: str
    version: str
    state: str
    reason: str = ""


class DataPlane:
    """Lookup, readiness, validation, metrics and inference over one node's repository.

    Shutting down has two steps. `draining` (`MeshServer.begin_drain`): the node and its models
    report not ready so balancers and health-watching clients move away, but calls are still
    answered (clients that have not noticed yet must not fail). `refusing` (`MeshServer.stop`,
    after the drain delay): new inference calls get UNAVAILABLE so that clients retry on another
    replica, while the ones in flight finish.
    """

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        *,
        server_name: str = "onnxmesh",
        server_version: str = "",
        extensions: tuple[str, ...] = (),
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.server = ServerMetadata(server_name, server_version, extensions)
        self.statistics = Statistics()
        #: Regions of the system shared-memory extension, registered by clients on this host.
        self.shared_memory = SharedMemory()
        self.draining = False
        self.refusing = False
        #: Load shedding (`--max-inflight`): None admits every call.
        self.limiter: ConcurrencyLimiter | None = None
        #: Inference calls in progress; the in-flight gauge reads it when scraped (an int kept
        #: here costs no call and no lock per request, a Gauge's inc()/dec() cost both).
        self.in_flight = 0
        metrics.inflight.set_function(lambda: self.in_flight)

    # -- health and metadata ---------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Every servable ready, and not draining."""
        return self.repository.ready and not self.draining

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether one model version serves (NotFound if it is not here; False if it failed to load)."""
        if self.repository.failure(name, version) is not None:
            return False
        return self.repository.get(name, version).ready and not self.draining

    def server_metadata(self) -> ServerMetadata:
        return self.server

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """The signature of one model version (NotFound; Unavailable while it loads)."""
        servable = self.repository.get(name, version)
        if not servable.loaded:
            raise Unavailable(f"model '{servable.name}' is still loading")
        versions = (version,) if version else tuple(self.repository.versions(servable.name))
        return ModelMetadata(servable.signature, versions)

    def model_description(self, name: str, version: str = "") -> ModelDescription:
        """What ModelConfig answers for one model version (NotFound; Unavailable while it loads)."""
        servable = self.repository.get(name, version)
        if not servable.loaded:
            raise Unavailable(f"model '{servable.name}' is still loading")
        config = self.repository.config(servable.name) or ModelConfig(platform=servable.signature.platform)
        batching = servable.dynamic_batching
        if batching is not None:
            return ModelDescription(
                servable.signature,
                servable.signature.platform,
                batching.max_batch_size,
                batching.max_queue_delay_us,
                batching.max_queue_size,
                config.description,
                config.warmup,
            )
        return ModelDescription(
            servable.signature, servable.signature.platform, 0, 0, 0, config.description, config.warmup
        )

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version of the node, failed ones included (with their reason)."""
        entries = [
            IndexEntry(s.name, s.version, *self._state(s))
            for s in sorted(self.repository.all(), key=lambda s: (s.name, s.version))
        ]
        entries += [
            IndexEntry(f.name, f.version, "UNAVAILABLE", f.reason) for f in self.repository.failures()
        ]
        entries.sort(key=lambda e: (e.name, e.version))
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    def _state(self, servable: Servable) -> tuple[str, str]:
        if self.draining:
            return "UNAVAILABLE", "the server is shutting down"
        if servable.ready:
            return "READY", ""
        if not servable.loaded:
            return "LOADING", servable.reason
        return "UNAVAILABLE", servable.reason

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """Cumulative statistics of every model version (or of one model, or one version)."""
        if not name:
            if version:
                raise InvalidInput("ModelStatistics: a version needs a model name")
            chosen = sorted(self.repository.all(), key=lambda s: (s.name, s.version))
        elif version:
            chosen = [self.repository.get(name, version)]
        else:
            versions = self.repository.versions(name)
            if not versions:
                self.repository.get(name)  # NotFound, or Unavailable naming why it failed to load
            chosen = [self.repository.get(name, v) for v in versions]
        return [self._stats_of(servable) for servable in chosen]

    def _stats_of(self, servable: Servable) -> ModelStats:
        kept = self.statistics.of(servable.name, servable.version)
        stats = ModelStats(
            kept.name,
            kept.version,
            kept.last_inference_ms,
            kept.inference_count,
            kept.execution_count,
            Duration(kept.success.count, kept.success.ns),
            Duration(kept.fail.count, kept.fail.ns),
            Duration(kept.queue.count, kept.queue.ns),
            Duration(kept.compute_input.count, kept.compute_input.ns),
            Duration(kept.compute_infer.count, kept.compute_infer.ns),
            Duration(kept.compute_output.count, kept.compute_output.ns),
        )
        # What only the servable knows: its waits for a worker, and batches for a batching model.
        queued = min(int(servable.queue_seconds * 1e9), stats.compute_infer.ns)
        stats.queue = Duration(stats.success.count, queued)
        stats.compute_infer.ns -= queued
        batching = servable.dynamic_batching
        if batching is not None:
            stats.execution_count = batching.batches_run
        return stats

    # -- inference -------------------------------------------------------------------------

    @overload
    async def infer(self, request: InferRequest) -> InferResult: ...

    @overload
    async def infer(self, request: InferRequest, encode: Callable[[InferResult], R]) -> R: ...

    async def infer(self, request: InferRequest, encode: Callable[[InferResult], Any] | None = None) -> Any:
        """Run `request` on the servable it names, after checking that it may run and is valid.

        Raises NotFound (unknown model or version), Unavailable (refusing, or still loading),
        InvalidInput (see the module docstring), or whatever the servable raises. The result
        names the model and version that answered. `encode`, when given, turns the result into
        the transport's answer inside the call, so that the request metrics time and count it
        too (a result that cannot be encoded counts as the error it is).
        """
        started = time.perf_counter()
        # Series are labelled by served models only: unknown names must not grow the registry.
        model, version, code = "unknown", "", "OK"
        self.in_flight += 1
        limiter = self.limiter
        admitted = False
        try:
            servable = self.repository.get(request.model, request.version)
            model, version = servable.name, servable.version
            if limiter is not None:
                if not limiter.try_acquire():
                    raise limiter.refusal(model)
                admitted = True
            if self.refusing or not servable.loaded:
                raise self._not_serving(servable)
            validate(model, servable.signature, request.inputs, request.outputs)
            running = time.perf_counter()
            if tracing.enabled:  # off, this check is all tracing costs here
                tracing.annotate(servable, request)
            result = await servable.infer(request)
            result.model_name = result.model_name or model
            result.model_version = result.model_version or version
            encoding = time.perf_counter()
            answer = result if encode is None else encode(result)
            done = time.perf_counter()
            self.statistics.of(model, version).succeeded(
                rows_of(request.inputs.values()),
                done - started,
                running - started,
                encoding - running,
                done - encoding,
            )
            return answer
        except MeshError as err:
            code = err.code
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the client goes away and when its deadline passes.
            expired = request.deadline is not None and time.monotonic() >= request.deadline - _DEADLINE_SLACK
            code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.in_flight -= 1
            seconds = time.perf_counter() - started
            if admitted:
                limiter.release(seconds, code == "OK")  # type: ignore[union-attr]
            self.metrics.observe_request(model, version, code, seconds)
            if code != "OK" and model != "unknown":
                self.statistics.of(model, version).failed(seconds)

    def refused(self, model: str, version: str, error: BaseException) -> BaseException:
        """Count an inference call the transport could not turn into an InferRequest (e.g. its
        tensors do not decode; latency 0, nothing ran), and return the error to answer it with:
        the one `infer` would have raised first (unknown model, refusing, still loading) if
        any, else `error`."""
        label, label_version = "unknown", ""
        try:
            servable = self.repository.get(model, version)
            label, label_version = servable.name, servable.version
            if self.refusing or not servable.loaded:
                raise self._not_serving(servable)
        except MeshError as err:
            error = err
        code = error.code if isinstance(error, MeshError) else "INTERNAL"
        self.metrics.observe_request(label, label_version, code, 0.0)
        if label != "unknown":
            self.statistics.of(label, label_version).failed(0.0)
        return error

    def _not_serving(self, servable: Servable) -> Unavailable:
        if self.refusing:
            return Unavailable(f"server is shutting down; retry on another replica of '{servable.name}'")
        return Unavailable(f"model '{servable.name}' version {servable.version} is still loading")


def validate(
    model: str, signature: ModelSignature, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
) -> None:
    """InvalidInput naming the tensor, what was expected and what came, for the first problem found."""
    expected = signature.inputs_by_name
    if inputs.keys() != expected.keys():
        _wrong_names(model, signature, inputs)
    for name, array in inputs.items():
        spec = expected[name]
        datatype = NUMPY_TO_DATATYPE.get(array.dtype) or _datatype(array)
        if datatype != spec.datatype:
            raise InvalidInput(
                f"model '{model}': input '{name}' has datatype {datatype}, expected {spec.datatype}"
            )
        # TensorSpec.accepts_shape, unrolled: this runs for every input of every request.
        shape = array.shape
        want = spec.shape
        if len(shape) != len(want):
            raise _wrong_shape(model, name, shape, want)
        for w, g in zip(want, shape, strict=True):
            if w != -1 and w != g:
                raise _wrong_shape(model, name, shape, want)
    if outputs:
        known = signature.outputs_by_name
        for name in outputs:
            if name not in known:
                raise InvalidInput(
                    f"model '{model}' has no output named '{name}'; outputs: {', '.join(sorted(known))}"
                )


def _wrong_shape(model: str, name: str, shape: Sequence[int], want: Sequence[int]) -> InvalidInput:
    return InvalidInput(
        f"model '{model}': input '{name}' has shape {list(shape)}, expected {list(want)} (-1 = any size)"
    )


def _wrong_names(model: str, signature: ModelSignature, inputs: Mapping[str, np.ndarray]) -> None:
    expected = signature.inputs_by_name
    described = ", ".join(f"{s.name} {s.describe()}" for s in signature.inputs)
    extra = [name for name in inputs if name not in expected]
    if extra:
        raise InvalidInput(f"model '{model}' has no input named '{extra[0]}'; expected inputs: {described}")
    missing = [name for name in expected if name not in inputs]
    raise InvalidInput(f"model '{model}': input '{missing[0]}' is missing; expected inputs: {described}")


def _datatype(array: np.ndarray) -> str:
    """The OIP datatype of an array whose dtype is not one of the exact ones (str, bytes), or the
    dtype's own name when OIP has none (in-process callers may pass anything)."""
    try:
        return datatype_of(array)
    except TypeError:
        return str(array.dtype)
