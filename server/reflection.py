"""gRPC server reflection, v1alpha (grpcio-reflection's servicer) and v1 beside it: grpcio-reflection ships v1alpha
only, and v1's messages carry the same fields under the same numbers (protos/grpc/reflection/v1/reflection.proto),
so a v1 request is re-read as v1alpha, answered by the library, and its answer re-read as v1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb
from grpc_reflection.v1alpha import reflection_pb2_grpc as alpha_grpc

from adalora.server.gen.grpc.reflection.v1 import reflection_pb2 as v1_pb
from adalora.server.gen.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc

V1_SERVICE = v1_pb.DESCRIPTOR.services_by_name["ServerReflection"].full_name


class ReflectionV1(v1_grpc.ServerReflectionServicer):
    def __init__(self, alpha: reflection.aio.ReflectionServicer) -> None:
        self.alpha = alpha

    async def ServerReflectionInfo(self, request_iterator: AsyncIterator[v1_pb.ServerReflectionRequest],
                                   context) -> AsyncIterator[v1_pb.ServerReflectionResponse]:
        async def as_alpha() -> AsyncIterator[alpha_pb.ServerReflectionRequest]:
            async for request in request_iterator:
                yield alpha_pb.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self.alpha.ServerReflectionInfo(as_alpha(), context):
            yield v1_pb.ServerReflectionResponse.FromString(response.SerializeToString())


def enable(services: Sequence[str], server: grpc.aio.Server) -> None:
    """Reflection v1alpha and v1 on `server`, listing `services` and both reflection services."""
    names = (*services, reflection.SERVICE_NAME, V1_SERVICE)
    alpha = reflection.aio.ReflectionServicer(names)
    alpha_grpc.add_ServerReflectionServicer_to_server(alpha, server)
    v1_grpc.add_ServerReflectionServicer_to_server(ReflectionV1(alpha), server)
