"""The server interceptor both services use: correlation id, error mapping, logs and metrics.

Each service passes its own table from domain error classes to gRPC codes (its
`interceptors.py`); the mechanism is here once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common import logs
from common.errors import DomainError
from common.metrics import RpcMetrics

log = logging.getLogger(__name__)

CORRELATION_HEADER = "x-correlation-id"
MAX_CORRELATION_ID = 128

ErrorTable = Mapping[type[DomainError], grpc.StatusCode]
Context = grpc.aio.ServicerContext[Any, Any]

_trailing: contextvars.ContextVar[list[tuple[str, str]]] = contextvars.ContextVar("trailing")


def add_trailing_metadata(context: Context, *pairs: tuple[str, str]) -> None:
    """Adds to the call's trailing metadata (set_trailing_metadata alone would replace it)."""
    current = [*_trailing.get([]), *pairs]
    _trailing.set(current)
    context.set_trailing_metadata(tuple(current))


def correlation_id() -> str:
    """The correlation id of the RPC being handled."""
    return str((logs.log_context.get() or {}).get("correlation_id", ""))


def status_for(error: DomainError, table: ErrorTable, domain: str) -> status_pb2.Status:
    """Builds google.rpc.Status with an ErrorInfo detail from a domain error via the table."""
    code = next((c for cls, c in table.items() if isinstance(error, cls)), grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=domain, metadata={k: str(v) for k, v in error.metadata.items()}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code.value[0], message=error.message, details=[detail])


def _internal_status(domain: str) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=domain)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[detail])


async def _abort(context: Context, status: status_pb2.Status) -> None:
    """abort_with_status, keeping the trailing metadata already set (the correlation id)."""
    grpc_status = rpc_status.to_status(status)
    trailing = (*_trailing.get([]), *grpc_status.trailing_metadata)
    await context.abort(grpc_status.code, grpc_status.details, trailing)


def correlation_id_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == CORRELATION_HEADER and isinstance(value, str):
            cleaned = value.strip()
            if 0 < len(cleaned) <= MAX_CORRELATION_ID and cleaned.isprintable():
                return cleaned
    return uuid.uuid4().hex


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC: binds a correlation id, maps domain errors, logs one line, counts."""

    def __init__(
        self, table: ErrorTable, domain: str, metrics: RpcMetrics, skip_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.table = table
        self.domain = domain
        self.metrics = metrics
        self.skip_prefixes = ("/grpc.health.", "/grpc.reflection.", *skip_prefixes)
        logs.install_context()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.skip_prefixes):
            return handler
        metadata = handler_call_details.invocation_metadata
        if handler.unary_unary:
            inner_unary: Any = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                self._begin(method, metadata, context)
                started = time.perf_counter()
                try:
                    response = await inner_unary(request, context)
                except BaseException as exc:
                    await self._fail(exc, method, started, context)
                    raise
                self._done(method, started, context)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                self._begin(method, metadata, context)
                started = time.perf_counter()
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as exc:
                    await self._fail(exc, method, started, context)
                    raise
                self._done(method, started, context)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _begin(self, method: str, metadata: Any, context: Context) -> None:
        correlation_id = correlation_id_from(metadata)
        logs.log_context.set({"rpc": method, "correlation_id": correlation_id})
        _trailing.set([])
        add_trailing_metadata(context, (CORRELATION_HEADER, correlation_id))

    def _done(self, method: str, started: float, context: Context) -> None:
        code = context.code() or grpc.StatusCode.OK
        elapsed = time.perf_counter() - started
        self.metrics.observe(method, code.name, elapsed)
        log.info("rpc", extra={"code": code.name, "latency_ms": round(elapsed * 1000, 2)})

    async def _fail(self, exc: BaseException, method: str, started: float, context: Context) -> None:
        elapsed = time.perf_counter() - started
        if isinstance(exc, DomainError):
            status = status_for(exc, self.table, self.domain)
            code_name = next(c.name for c in grpc.StatusCode if c.value[0] == status.code)
            self.metrics.observe(method, code_name, elapsed)
            log.info(
                "rpc",
                extra={"code": code_name, "reason": exc.reason, "latency_ms": round(elapsed * 1000, 2)},
            )
            await _abort(context, status)
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code() or grpc.StatusCode.UNKNOWN
            self.metrics.observe(method, code.name, elapsed)
            log.info("rpc", extra={"code": code.name, "latency_ms": round(elapsed * 1000, 2)})
            return
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
            return
        if isinstance(exc, asyncio.CancelledError):
            self.metrics.observe(method, "CANCELLED", elapsed)
            log.info("rpc", extra={"code": "CANCELLED", "latency_ms": round(elapsed * 1000, 2)})
            return
        self.metrics.observe(method, "INTERNAL", elapsed)
        log.error("unhandled error", exc_info=exc, extra={"code": "INTERNAL"})
        await _abort(context, _internal_status(self.domain))
