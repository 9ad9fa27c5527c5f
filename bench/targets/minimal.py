"""`python -m bench.targets.minimal`: the all-in-one server a user would write by hand, the second baseline.

The "web single" pattern, written the shortest way that still speaks the same protocol:

- one grpcio server (the synchronous one, a thread pool of `--threads` workers),
- one onnxruntime session per model file (one intra-op thread each), preprocessing as numpy,
- each graph's steps as plain function calls on the handler's thread,
- the same OIP `ModelInfer` request and response (raw tensor bytes), `ModelMetadata` so that
  the load generator can ask what to send, and grpc.health.v1 so that launchers know it is up.

Nothing else: no data plane, no validation beyond what numpy and onnxruntime refuse, no engine,
no metrics, no batching, no coalescing. `bench.targets.all_in_one` is the other baseline: the mesh's own
parts in one process, which costs what those parts cost; this one shows what they cost.

It prints `minimal listening on HOST:PORT` and `minimal ready on HOST:PORT` like every node.

`--aio` serves the very same handlers from a `grpc.aio` server instead (handlers are coroutines
that run the models inline on the event loop, as the sync server runs them on its thread): the
benchmark measures the two servers against each other with nothing else different.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.models import DEFAULT_DIRS
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc

SERVICE = "minimal"
DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT64": np.int64}
DATATYPES = {np.dtype(v): k for k, v in DTYPES.items()}
#: One graph: the request's input arrays -> every output array.
Pipeline = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graphs(dirs: dict[str, Path]) -> dict[str, tuple[str, Pipeline]]:
    """Each graph of demo/mesh.yaml it serves: (input name, pipeline)."""
    stats = json.loads((dirs["preprocess"] / "digits-preprocess" / "1" / "stats.json").read_text())
    mean = np.asarray(stats["mean"], np.float32)
    inv_scale = (1.0 / np.asarray(stats["scale"], np.float32)).astype(np.float32)
    mlp = session(dirs["model_a"] / "digits-mlp" / "1" / "model.onnx")
    head = session(dirs["model_b"] / "digits-head" / "1" / "model.onnx")
    logreg = session(dirs["model_b"] / "digits-logreg" / "1" / "model.onnx")

    def features(image: np.ndarray) -> np.ndarray:
        return (image.reshape(len(image), 64).astype(np.float32) - mean) * inv_scale

    def serial(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (embedding,) = mlp.run(["embedding"], {"features": features(inputs["image"])})
        (probabilities,) = head.run(["probabilities"], {"embedding": embedding})
        return {"probabilities": probabilities, "label": np.argmax(probabilities, axis=-1)}

    def parallel(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = {"features": features(inputs["image"])}
        (a,) = mlp.run(["probabilities"], x)
        (b,) = logreg.run(["probabilities"], x)
        probabilities = (a + b) / 2.0
        return {"probabilities": probabilities, "label": np.argmax(probabilities, axis=-1)}

    return {"digits-serial": ("image", serial), "digits-parallel": ("image", parallel)}


class Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, served: dict[str, tuple[str, Pipeline]]) -> None:
        self.served = served

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        if request.name not in self.served:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="minimal",
            inputs=[tensor(name="image", datatype="UINT8", shape=[-1, 8, 8])],
            outputs=[
                tensor(name="probabilities", datatype="FP32", shape=[-1, 10]),
                tensor(name="label", datatype="INT64", shape=[-1]),
            ],
        )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        served = self.served.get(request.model_name)
        if served is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
            raise AssertionError("unreachable: abort raises")
        _, pipeline = served
        inputs = {
            t.name: np.frombuffer(raw, DTYPES[t.datatype]).reshape(t.shape)
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        outputs = pipeline(inputs)
        wanted = [o.name for o in request.outputs] or list(outputs)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for name in wanted:
            array = outputs[name]
            response.outputs.add(name=name, datatype=DATATYPES[array.dtype], shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


class AsyncServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The same handlers for `grpc.aio`; only the server around them differs."""

    def __init__(self, served: dict[str, tuple[str, Pipeline]]) -> None:
        self.sync = Servicer(served)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        if request.name not in self.sync.served:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        return self.sync.ModelMetadata(request, context)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if request.model_name not in self.sync.served:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        return self.sync.ModelInfer(request, context)


async def serve_aio(host: str, port: int, dirs: dict[str, Path]) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(AsyncServicer(graphs(dirs)), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"{SERVICE} listening on {host}:{bound}", flush=True)
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"{SERVICE} ready on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def serve(host: str, port: int, threads: int, dirs: dict[str, Path]) -> None:
    server = grpc.server(ThreadPoolExecutor(threads), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(graphs(dirs)), server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"{SERVICE} listening on {host}:{bound}", flush=True)
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"{SERVICE} ready on {host}:{bound}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0).wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.targets.minimal", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=32, help="gRPC handler threads (default: 32)")
    parser.add_argument("--aio", action="store_true", help="the same handlers on a grpc.aio server")
    args = parser.parse_args(argv)
    try:
        if args.aio:
            asyncio.run(serve_aio(args.host, args.port, dict(DEFAULT_DIRS)))
        else:
            serve(args.host, args.port, args.threads, dict(DEFAULT_DIRS))
    except (OSError, RuntimeError) as exc:
        sys.exit(f"{SERVICE}: {exc}")


if __name__ == "__main__":
    main()
