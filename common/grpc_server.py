"""What both servers share: health, reflection under v1 and v1alpha, and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

from common import logs, tracing
from common.auth import Authenticator, SecuritySettings, is_loopback
from common.grpc_metrics import Method, UnknownMethods, methods_of
from common.metrics import serve_metrics

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


def served_methods(service_names: Iterable[str]) -> list[Method]:
    """Every method the server serves: the services', health's and reflection's (v1 and
    v1alpha), for the metrics' pre-initialised series."""
    _register_reflection_v1_descriptor()
    return methods_of([*service_names, health.SERVICE_NAME, REFLECTION_V1, REFLECTION_V1ALPHA])


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    """Registers health (overall and per service, all SERVING) and reflection (v1 and v1alpha),
    then the fallback that answers unknown methods UNIMPLEMENTED through the interceptors (so
    they are counted): call it after the services are registered."""
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
    server.add_generic_rpc_handlers((UnknownMethods(),))
    return health_servicer


async def bounded(step: Awaitable[Any], seconds: float, what: str) -> None:
    """Awaits one shutdown step for at most `seconds`: a stuck step is logged and skipped, so
    stopping a process (or a test's servers) can never hang."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("shutdown step timed out", extra={"step": what, "seconds": seconds})


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)


def transport_ceiling(max_message_bytes: int) -> int:
    """The transport's own receive limit: above the configured one, so a request between the
    two reaches the interceptor, which answers RESOURCE_EXHAUSTED (REQUEST_TOO_LARGE) and counts
    it; only a request over this ceiling is refused by grpc unseen (docs/observability.md)."""
    return 4 * max_message_bytes


def new_server(interceptors: Sequence[grpc.aio.ServerInterceptor], security: SecuritySettings) -> grpc.aio.Server:
    """A grpc.aio server with the interceptors (outermost first) and the configured limits.
    SO_REUSEPORT is off, so a port already taken is an error instead of a silent second
    listener."""
    options = [
        (name, transport_ceiling(value) if name == "grpc.max_receive_message_length" else value)
        for name, value in security.grpc_options()
    ]
    return grpc.aio.server(interceptors=list(interceptors), options=[("grpc.so_reuseport", 0), *options])


async def serve(
    service: str,
    settings: Any,
    build: Callable[..., Awaitable[Any]],
    names: Iterable[str],
    **fields: Any,
) -> None:
    """A service's main: JSON logs, the metrics endpoint, the server built by `build`, the
    start-up line (with `fields`), then serving until SIGTERM/SIGINT and a graceful stop."""
    logs.configure(service, settings.log_level)
    tracing.configure(service)
    registry = CollectorRegistry()
    metrics_port = serve_metrics(registry, settings.metrics_addr)
    app = await build(settings, registry=registry)
    where = listening(settings.listen_addr, app.port, metrics_port, settings.security, app.authenticator)
    # A service with more listeners (the sequencer's HTTP) names them in the same line.
    extra = app.listening_fields() if hasattr(app, "listening_fields") else {}
    log.info(f"{service} listening", extra={**where, **extra, **fields})
    await run_until_signal(
        app.server, app.health, names, settings.shutdown_grace, app.close, drain=getattr(app, "drain", None)
    )


async def run_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    names: Iterable[str],
    grace: float,
    cleanup: Callable[[], Awaitable[None]],
    drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT, then: health NOT_SERVING, drain (listeners in front of the
    gRPC server, e.g. HTTP), stop(grace), cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": grace})
    await set_serving(health_servicer, names, False)
    if drain is not None:
        await bounded(drain(), grace + 5, "drain")
    await bounded(server.stop(grace), grace + 5, "grpc server")
    await bounded(cleanup(), 10, "cleanup")
    log.info("stopped")


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def bind(server: grpc.aio.Server, address: str, security: SecuritySettings) -> int:
    """Adds the listening port: TLS when a certificate is configured, mutual TLS (client
    certificates required) when a client CA is too."""
    if not security.tls:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(_read(security.tls_key), _read(security.tls_cert))],
        root_certificates=_read(security.tls_client_ca) if security.tls_client_ca else None,
        require_client_auth=bool(security.tls_client_ca),
    )
    return server.add_secure_port(address, credentials)


def channel(
    target: str,
    *,
    ca: str = "",
    cert: str = "",
    key: str = "",
    server_name: str = "",
    token_file: str = "",
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A client channel: TLS when `ca` is given (mutual TLS with cert/key), and a bearer token
    on every call when `token_file` is given."""
    options: list[tuple[str, Any]] = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if not ca:
        if token_file:
            raise ValueError("a bearer token needs TLS: configure the CA of the server")
        return grpc.aio.insecure_channel(target, options=options, interceptors=list(interceptors))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca),
        private_key=_read(key) if key else None,
        certificate_chain=_read(cert) if cert else None,
    )
    if token_file:
        token = _read(token_file).decode().strip()
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=list(interceptors))


def listening(
    listen_addr: str, port: int, metrics_port: int, security: SecuritySettings, authenticator: Authenticator
) -> dict[str, Any]:
    """The fields of the start-up log line: where it listens (the bound ports, so port 0 works
    for tests and `make up`) and who may call (development mode is loud)."""
    host = listen_addr.rpartition(":")[0]
    loopback = is_loopback(listen_addr)
    if not authenticator.development:
        auth = "credentials required"
    elif loopback:
        auth = "development: every caller has every role (loopback listener)"
    else:
        # Only *_ALLOW_INSECURE gets here (check_exposure): say so, never "loopback only".
        auth = "development: every caller has every role, on a non-loopback listener (ALLOW_INSECURE)"
    return {
        "address": f"{host}:{port}",
        "port": port,
        "metrics_port": metrics_port,
        "exposure": "loopback" if loopback else "network",
        "tls": "mutual" if security.tls_client_ca else ("on" if security.tls else "off"),
        "auth": auth,
    }
