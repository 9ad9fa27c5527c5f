"""Protobuf forms of Triton's extensions (transport edge): ModelConfig, ModelStatistics,
RepositoryIndex and shared-memory status, from the data plane's plain answers.

The gRPC servicer returns these messages; the REST edge sends the same ones as JSON
(`json_format`, Triton's field names), so both transports say the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import model_config_pb2 as mc
from services.common.dataplane import IndexEntry, ModelDescription
from services.common.triton.shared_memory import RegionStatus
from services.common.triton.statistics import Duration, ModelStats
from services.common.types import TensorSpec

#: Triton's backend for each platform onnxmesh knows.
BACKENDS = {"onnxruntime_onnx": "onnxruntime", "python": "python"}


def data_type(datatype: str) -> mc.DataType:
    """The model_config DataType of an OIP datatype (BYTES is TYPE_STRING)."""
    value: mc.DataType = getattr(mc, "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")
    return value


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    return list(spec.shape[1:] if batched else spec.shape)


def model_config(description: ModelDescription) -> mc.ModelConfig:
    sig = description.signature
    batched = description.max_batch_size > 0
    config = mc.ModelConfig(
        name=sig.name,
        platform=description.platform,
        backend=BACKENDS.get(description.platform, ""),
        version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()),
        max_batch_size=description.max_batch_size,
        input=[
            mc.ModelInput(name=t.name, data_type=data_type(t.datatype), dims=_dims(t, batched))
            for t in sig.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=data_type(t.datatype), dims=_dims(t, batched))
            for t in sig.outputs
        ],
    )
    if description.platform == "onnxruntime_onnx":
        config.default_model_filename = "model.onnx"
    if description.description:
        config.parameters["description"].string_value = description.description
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = description.max_queue_delay_us
        config.dynamic_batching.default_queue_policy.max_queue_size = description.max_queue_size
    for sample in description.warmup or ():
        warmup = config.model_warmup.add(name=sample.name, count=sample.count)
        for tensor, given in sample.inputs.items():
            spec = sig.input(tensor)
            entry = warmup.inputs[tensor]
            entry.data_type = data_type(spec.datatype) if spec is not None else mc.TYPE_INVALID
            entry.dims.extend(given.dims)
            if given.source == "random_data":
                entry.random_data = True
            elif given.source == "input_data_file" and given.path is not None:
                entry.input_data_file = given.path.name
            else:
                entry.zero_data = given.source == "zero_data"
    return config


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(stats: Sequence[ModelStats]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name=s.name,
                version=s.version,
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(s.success),
                    fail=_duration(s.fail),
                    queue=_duration(s.queue),
                    compute_input=_duration(s.compute_input),
                    compute_infer=_duration(s.compute_infer),
                    compute_output=_duration(s.compute_output),
                    cache_hit=pb.StatisticDuration(),
                    cache_miss=pb.StatisticDuration(),
                ),
            )
            for s in stats
        ]
    )


def repository_index(entries: Sequence[IndexEntry]) -> pb.RepositoryIndexResponse:
    index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries]
    )


def shm_status(regions: Sequence[RegionStatus]) -> pb.SystemSharedMemoryStatusResponse:
    response = pb.SystemSharedMemoryStatusResponse()
    for r in regions:
        response.regions[r.name].CopyFrom(
            pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
            )
        )
    return response
