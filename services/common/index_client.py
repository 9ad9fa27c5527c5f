"""RepositoryIndex of a node, for tooling (transport edge): what a node serves, with each
model's state and reason. The mesh's own calls go through `services.common.client`."""

from __future__ import annotations

import grpc

from proto.gen.inference import grpc_predict_v2_pb2 as pb
from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.dataplane import IndexEntry
from services.common.errors import MeshError, from_status


async def repository_index(target: str, *, timeout: float = 2.0) -> list[IndexEntry]:
    """Every model version `target` has, ready or not; raises MeshError as the call failed."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            error: MeshError = from_status(exc.code().name, exc.details() or "")
            raise error from None
    return [IndexEntry(m.name, m.version, m.state, m.reason) for m in response.models]
