"""The server interceptor both services use: correlation id, error mapping, logs and tracing
(the gRPC metrics are common.grpc_metrics', the outermost interceptor).

Each service passes its own table from domain error classes to gRPC codes (its
`interceptors.py`); the mechanism is here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import logs, tracing
from common.auth import Authenticator, authorize, set_identity
from common.errors import (
    DeadlineReached,
    DomainError,
    InvalidArgument,
    MalformedRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    RequestTooLarge,
    Retryable,
    Unauthenticated,
)

log = logging.getLogger(__name__)

CORRELATION_HEADER = "x-correlation-id"
MAX_CORRELATION_ID = 128

ErrorTable = Mapping[type[DomainError], grpc.StatusCode]
Context = grpc.aio.ServicerContext[Any, Any]
#: A service's admission gate: given the method and the call's metadata (after authentication),
#: a hold for the call's duration, or a raised domain error (an Overloaded) to refuse it.
Gate = Callable[[str, tuple[Any, ...]], contextlib.AbstractContextManager[None]]

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
    # The most specific class listed wins: the table is looked up along the error's MRO.
    code = next((table[cls] for cls in type(error).__mro__ if cls in table), grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=domain, metadata={k: str(v) for k, v in error.metadata.items()}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        # google.rpc.RetryInfo: how long the caller should wait before the same request again.
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(float(retry_after) * 1e9))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    return status_pb2.Status(code=code.value[0], message=error.message, details=details)


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


# Errors every service shares (before its own table): common.errors' classes, so a service's
# table only adds its own.
COMMON_TABLE: ErrorTable = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    DeadlineReached: grpc.StatusCode.DEADLINE_EXCEEDED,
    Retryable: grpc.StatusCode.UNAVAILABLE,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_MALFORMED = object()


@dataclass(frozen=True)
class _TooLarge:
    size: int


def _tolerant(deserialize: Callable[[bytes], Any] | None, limit: int | None) -> Callable[[bytes], Any] | None:
    """Request bytes that do not parse become a sentinel the handler answers INVALID_ARGUMENT,
    instead of grpc's own INTERNAL; bytes over `limit` one it answers RESOURCE_EXHAUSTED with an
    ErrorInfo (the transport's own ceiling is higher, see common.grpc_server.transport_ceiling,
    so this refusal is counted and logged like any other answer)."""
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        if limit is not None and len(raw) > limit:
            return _TooLarge(len(raw))
        try:
            return deserialize(raw)
        except Exception:  # noqa: BLE001 - any decode failure means the caller sent garbage
            return _MALFORMED

    return parse


def _nul_field(message: Any, prefix: str = "") -> str | None:
    """The path of the first string field holding a NUL (PostgreSQL text cannot store one)."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_STRING:
            values = value if field.is_repeated else [value]
            if any("\x00" in v for v in values):
                return path
        elif field.type == field.TYPE_MESSAGE:
            for index, child in enumerate(value if field.is_repeated else [value]):
                found = _nul_field(child, f"{path}[{index}]." if field.is_repeated else f"{path}.")
                if found is not None:
                    return found
    return None


def _peer_subjects(context: Context) -> list[str]:
    """The client certificate's subject (and "CN=<name>") when the call came over mutual TLS."""
    auth = context.auth_context() or {}
    names = [v.decode(errors="replace") for v in auth.get("x509_subject_name", [])]
    names += [f"CN={v.decode(errors='replace')}" for v in auth.get("x509_common_name", [])]
    return names


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC: correlation id, authentication and authorization, error mapping, one log
    line and metrics. Health and reflection stay open (probes and tools need no credentials)."""

    def __init__(
        self,
        table: ErrorTable,
        domain: str,
        authenticator: Authenticator,
        policy: Mapping[str, frozenset[str]],
        gate: Gate | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self.table = {**COMMON_TABLE, **table}
        self.gate: Gate = gate or (lambda _method, _metadata: contextlib.nullcontext())
        self.domain = domain
        self.max_message_bytes = max_message_bytes
        self.authenticator = authenticator
        self.policy = policy
        self.open_prefixes = ("/grpc.health.", "/grpc.reflection.")
        logs.install_context()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())
        if handler.unary_unary:
            inner_unary: Any = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                with self._traced(method, metadata):
                    self._begin(method, metadata, context)
                    started = time.perf_counter()
                    try:
                        await self._echo(context)
                        self._admit(method, metadata, request, context)
                        with self.gate(method, metadata):
                            response = await inner_unary(request, context)
                    except BaseException as exc:
                        await self._fail(exc, method, started, context)
                        raise
                    self._done(method, started, context)
                    return response

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=_tolerant(handler.request_deserializer, self.max_message_bytes),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                with self._traced(method, metadata):
                    self._begin(method, metadata, context)
                    started = time.perf_counter()
                    try:
                        await self._echo(context)
                        self._admit(method, metadata, request, context)
                        with self.gate(method, metadata):
                            async for item in inner_stream(request, context):
                                yield item
                    except BaseException as exc:
                        await self._fail(exc, method, started, context)
                        raise
                    self._done(method, started, context)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=_tolerant(handler.request_deserializer, self.max_message_bytes),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _admit(self, method: str, metadata: tuple[Any, ...], request: Any, context: Context) -> None:
        """Authenticates and authorizes the call, and rejects unparseable requests."""
        identity = self.authenticator.authenticate(metadata, _peer_subjects(context))
        set_identity(identity)
        logs.bind(caller=identity.caller)
        authorize(identity, method, self.policy)
        if isinstance(request, _TooLarge):
            raise RequestTooLarge(
                "the request is larger than the server accepts",
                size_bytes=request.size,
                limit_bytes=self.max_message_bytes,
            )
        if request is _MALFORMED:
            raise MalformedRequest("the request is not a valid message of this RPC's request type")
        path = _nul_field(request)
        if path is not None:
            raise InvalidArgument(f"{path} contains a NUL character", field=path)

    @staticmethod
    def _span(method: str, metadata: tuple[Any, ...]) -> trace.Span:
        """The call's server span, continuing the caller's W3C trace context when it sent one
        (metadata `traceparent` / `tracestate`), else starting a new trace."""
        service, _, name = method.lstrip("/").partition("/")
        return tracing.start(
            method.lstrip("/"),
            parent=tracing.extract(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )

    def _traced(self, method: str, metadata: tuple[Any, ...]) -> Any:
        # The status is set from the gRPC code (_status), not from the exception that carried it.
        return trace.use_span(
            self._span(method, metadata), end_on_exit=True, record_exception=False, set_status_on_exception=False
        )

    @staticmethod
    def _status(code: grpc.StatusCode) -> None:
        span = trace.get_current_span()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))

    def _begin(self, method: str, metadata: Any, context: Context) -> None:
        correlation_id = correlation_id_from(metadata)
        logs.log_context.set({"rpc": method, "correlation_id": correlation_id})
        _trailing.set([])
        add_trailing_metadata(context, (CORRELATION_HEADER, correlation_id))

    @staticmethod
    async def _echo(context: Context) -> None:
        """The correlation id goes back in the initial metadata too, so a caller has it at once
        (streams) and whatever the outcome."""
        await context.send_initial_metadata(((CORRELATION_HEADER, correlation_id()),))

    def _done(self, method: str, started: float, context: Context) -> None:
        code = context.code() or grpc.StatusCode.OK
        elapsed = time.perf_counter() - started
        self._status(code)
        log.info("rpc", extra={"code": code.name, "latency_ms": round(elapsed * 1000, 2)})

    async def _fail(self, exc: BaseException, method: str, started: float, context: Context) -> None:
        elapsed = time.perf_counter() - started
        if isinstance(exc, DomainError):
            status = status_for(exc, self.table, self.domain)
            found = next(c for c in grpc.StatusCode if c.value[0] == status.code)
            code_name = found.name
            self._status(found)
            log.info(
                "rpc",
                extra={"code": code_name, "reason": exc.reason, "latency_ms": round(elapsed * 1000, 2)},
            )
            await _abort(context, status)
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code() or grpc.StatusCode.UNKNOWN
            self._status(code)
            log.info("rpc", extra={"code": code.name, "latency_ms": round(elapsed * 1000, 2)})
            return
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
            return
        if isinstance(exc, asyncio.CancelledError):
            log.info("rpc", extra={"code": "CANCELLED", "latency_ms": round(elapsed * 1000, 2)})
            return
        self._status(grpc.StatusCode.INTERNAL)
        log.error("unhandled error", exc_info=exc, extra={"code": "INTERNAL"})
        await _abort(context, _internal_status(self.domain))
