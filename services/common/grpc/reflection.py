"""gRPC server reflection, v1 and v1alpha (transport edge).

grpcio-reflection serves only `grpc.reflection.v1alpha`; newer tools ask for
`grpc.reflection.v1` first. The two are the same protocol under two package names (same
messages, same field numbers), so v1 is answered by the v1alpha servicer's own logic, each
message re-read across the two packages from its bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from proto.gen.inference import reflection_v1_pb2 as v1
from proto.gen.inference import reflection_v1_pb2_grpc as v1_grpc

SERVICE_NAME_V1 = v1.DESCRIPTOR.services_by_name["ServerReflection"].full_name
SERVICE_NAME_V1ALPHA = reflection.SERVICE_NAME


class ReflectionV1(v1_grpc.ServerReflectionServicer):  # type: ignore[misc]
    def __init__(self, service_names: Sequence[str]) -> None:
        self._inner = reflection.aio.ReflectionServicer(service_names)

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[v1.ServerReflectionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[v1.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._inner.ServerReflectionInfo(as_v1alpha(), context):
            yield v1.ServerReflectionResponse.FromString(response.SerializeToString())


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) for `service_names` and for itself."""
    names = [*service_names, SERVICE_NAME_V1, SERVICE_NAME_V1ALPHA]
    reflection.enable_server_reflection(names, server)
    v1_grpc.add_ServerReflectionServicer_to_server(ReflectionV1(names), server)
