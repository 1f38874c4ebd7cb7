"""What both servers share: health, reflection under v1 and v1alpha, and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

log = logging.getLogger(__name__)

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME


def _register_reflection_v1_descriptor() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default pool.

    grpcio-reflection ships only v1alpha. v1 is the same protocol under another package name, so
    the v1alpha file descriptor, renamed, lets clients that ask v1 (buf curl) describe it too.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    raw = proto.SerializeToString().replace(b"grpc.reflection.v1alpha", b"grpc.reflection.v1xxxxx")
    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"

    def fix(type_name: str) -> str:
        return type_name.replace("grpc.reflection.v1xxxxx", "grpc.reflection.v1")

    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = fix(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = fix(method.input_type)
            method.output_type = fix(method.output_type)
    proto.ClearField("options")
    pool.Add(proto)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    """Registers health (overall and per service, all SERVING) and reflection (v1 and v1alpha)."""
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _register_reflection_v1_descriptor()
    listed = [*names, health.SERVICE_NAME, REFLECTION_V1, REFLECTION_V1ALPHA]
    servicer = reflection.aio.ReflectionServicer(listed)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for name in (REFLECTION_V1ALPHA, REFLECTION_V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)


async def run_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    names: Iterable[str],
    grace: float,
    cleanup: Callable[[], Awaitable[None]],
) -> None:
    """Serves until SIGTERM/SIGINT, then: health NOT_SERVING, stop(grace), cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": grace})
    await set_serving(health_servicer, names, False)
    await server.stop(grace)
    await cleanup()
    log.info("stopped")
