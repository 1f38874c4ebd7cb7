"""gRPC server and client metrics under go-grpc-middleware's names and labels (SPEC 15).

Grafana's gRPC dashboards and the usual alert rules query `grpc_server_handled_total` and
friends with the labels `grpc_type`, `grpc_service`, `grpc_method` and `grpc_code` (the Go code
names: `OK`, `InvalidArgument`, `Canceled`, ...). No maintained Python package does this for
grpc.aio (py-grpc-prometheus has no aio support), so this module is ours, kept small: one
server interceptor, one unary client interceptor, one fallback handler for unknown methods.
docs/observability.md says what the transport refuses before any of them can see it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import LATENCY_BUCKETS

# The Go names of the status codes (google.golang.org/grpc/codes, Code.String()), which is what
# go-grpc-middleware puts in grpc_code; Python's enum names differ (CANCELLED vs Canceled).
CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "unary", "client_stream", "server_stream", "bidi_stream"
# Label values of calls to methods no service registered: one series for all of them, so a
# caller cannot grow the registry by inventing method names.
UNKNOWN = "unknown"

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class Method:
    grpc_type: str
    service: str
    name: str

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.grpc_type, self.service, self.name)


def _grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    if client_streaming and server_streaming:
        return BIDI_STREAM
    return CLIENT_STREAM if client_streaming else SERVER_STREAM if server_streaming else UNARY


def methods_of(service_names: Iterable[str]) -> list[Method]:
    """Every method of the named services, from the descriptors the generated code registered
    (grpc.aio has no GetServiceInfo), with its grpc_type."""
    pool = descriptor_pool.Default()
    found = []
    for name in service_names:
        for m in pool.FindServiceByName(name).methods:
            found.append(Method(_grpc_type(m.client_streaming, m.server_streaming), name, m.name))
    return found


def code_name(code: grpc.StatusCode | None) -> str:
    return CODE_NAMES.get(code or grpc.StatusCode.OK, "Unknown")


class GrpcServerMetrics:
    """go-grpc-middleware's server series, plus an in-flight gauge it does not have."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "Total number of RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", labels,
            registry=registry,
        )  # fmt: skip
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", labels,
            registry=registry,
        )  # fmt: skip
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight_requests", "RPCs being handled by the server now.", labels, registry=registry
        )
        self._series: dict[tuple[str, str, str], _ServerSeries] = {}

    def series(self, labels: tuple[str, str, str]) -> _ServerSeries:
        """One method's series, created (at zero) on first use and kept: a label lookup takes
        a lock, so a call touches its bound series only."""
        found = self._series.get(labels)
        if found is None:
            found = self._series[labels] = _ServerSeries(self, labels)
        return found

    def initialize(self, methods: Iterable[Method]) -> None:
        """Creates every series at zero (handled_total for every code), so rates and alerts
        work from the first scrape instead of after the first call of each method."""
        for method in methods:
            self.series(method.labels)


class _ServerSeries:
    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self.started = metrics.started.labels(*labels)
        self.msg_received = metrics.msg_received.labels(*labels)
        self.msg_sent = metrics.msg_sent.labels(*labels)
        self.handling = metrics.handling.labels(*labels)
        self.in_flight = metrics.in_flight.labels(*labels)
        self.handled = {name: metrics.handled.labels(*labels, name) for name in CODE_NAMES.values()}


class _ServerCall:
    """One RPC's bookkeeping: in flight from the first handler line, finished exactly once."""

    def __init__(self, series: _ServerSeries) -> None:
        self.series = series
        self.started = time.perf_counter()
        self.done = False
        series.in_flight.inc()

    def received(self) -> None:
        self.series.msg_received.inc()

    def sent(self) -> None:
        self.series.msg_sent.inc()

    def finish(self, code: str) -> None:
        if self.done:
            return
        self.done = True
        self.series.in_flight.dec()
        self.series.handled[code].inc()
        self.series.handling.observe(time.perf_counter() - self.started)


def _code_after(exc: BaseException | None, context: Context) -> str:
    """The status a handler ended with: the one it set or aborted with; a task cancelled by
    grpc is DeadlineExceeded when the deadline has passed, else Canceled (the caller left)."""
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        return code_name(context.code())
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return "DeadlineExceeded" if remaining is not None and remaining <= 0 else "Canceled"
    return "Unknown"  # what grpc answers for an exception a handler let escape


async def _resolve(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """The outermost server interceptor: counts every call the server hands to a handler,
    health, reflection and unknown methods included, with go-grpc-middleware's semantics
    (a unary call receives and sends one message; a stream counts each)."""

    def __init__(self, metrics: GrpcServerMetrics, methods: Iterable[Method]) -> None:
        self.metrics = metrics
        self.known = {m.path: m for m in methods}
        metrics.initialize([*self.known.values(), Method(UNKNOWN, UNKNOWN, UNKNOWN)])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = self.known.get(handler_call_details.method)
        series = self.metrics.series(method.labels if method else (UNKNOWN, UNKNOWN, UNKNOWN))
        # Counted here, before the request message is read: a call the transport ends before the
        # handler runs (a message over the hard ceiling) stays visible as started - handled.
        series.started.inc()
        return self._wrap(handler, series)

    def _wrap(self, handler: Any, series: _ServerSeries) -> Any:
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        async def counted(call: _ServerCall, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                call.received()
                yield request

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                call = _ServerCall(series)
                call.received()
                try:
                    response = await _resolve(inner_uu(request, context))
                except BaseException as exc:
                    call.finish(_code_after(exc, context))
                    raise
                call.sent()
                call.finish(_code_after(None, context))
                return response

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)

        async def stream_out(call: _ServerCall, result: Any, context: Context) -> AsyncIterator[Any]:
            try:
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        call.sent()
                        yield item
                else:
                    await _resolve(result)  # a handler that writes with context.write()
            except BaseException as exc:
                call.finish(_code_after(exc, context))
                raise
            call.finish(_code_after(None, context))

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                call = _ServerCall(series)
                call.received()
                async for item in stream_out(call, inner_us(request, context), context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)

        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
                call = _ServerCall(series)
                try:
                    response = await _resolve(inner_su(counted(call, requests), context))
                except BaseException as exc:
                    call.finish(_code_after(exc, context))
                    raise
                call.sent()
                call.finish(_code_after(None, context))
                return response

            return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)

        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            call = _ServerCall(series)
            async for item in stream_out(call, inner_ss(counted(call, requests), context), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)


class UnknownMethods(grpc.GenericRpcHandler):
    """Registered last: answers any method no service registered with UNIMPLEMENTED, as grpc
    would, but through the interceptors, so the call is counted (grpc's own answer is not)."""

    def __init__(self) -> None:
        async def unimplemented(_requests: AsyncIterator[bytes], context: Context) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown service or method")

        # A stream handler that reads nothing answers every call shape at once.
        self.handler: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(unimplemented)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.handler


class GrpcClientMetrics:
    """go-grpc-middleware's client series (with the handling-time histogram turned on)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_client_started", "Total number of RPCs started on the client.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_client_handled",
            "Total number of RPCs completed by the client, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_client_msg_received", "Total number of RPC stream messages received by the client.", labels,
            registry=registry,
        )  # fmt: skip
        self.msg_sent = Counter(
            "grpc_client_msg_sent", "Total number of gRPC stream messages sent by the client.", labels,
            registry=registry,
        )  # fmt: skip
        self.handling = Histogram(
            "grpc_client_handling_seconds",
            "Histogram of response latency (seconds) of the gRPC until it is finished by the application.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def initialize(self, methods: Iterable[Method]) -> None:
        for method in methods:
            for family in (self.started, self.msg_received, self.msg_sent, self.handling):
                family.labels(*method.labels)
            for name in CODE_NAMES.values():
                self.handled.labels(*method.labels, name)


class ClientMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the unary calls a channel makes (the sequencer's calls to the ledger)."""

    def __init__(self, metrics: GrpcClientMetrics, methods: Iterable[Method]) -> None:
        self.metrics = metrics
        methods = list(methods)
        self.known = {m.path: m for m in methods}
        metrics.initialize(methods)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        path = client_call_details.method
        path = path.decode() if isinstance(path, bytes) else str(path)
        service, _, name = path.lstrip("/").partition("/")
        method = self.known.get(path) or Method(UNARY, service, name)
        labels = method.labels
        self.metrics.started.labels(*labels).inc()
        self.metrics.msg_sent.labels(*labels).inc()
        started = time.perf_counter()
        code = "Unknown"
        try:
            call = await continuation(client_call_details, request)
            await call  # the response (or the AioRpcError) of this attempt
            code = "OK"
            self.metrics.msg_received.labels(*labels).inc()
            return call
        except grpc.aio.AioRpcError as exc:
            code = code_name(exc.code())
            raise
        except asyncio.CancelledError:
            code = "Canceled"
            raise
        finally:
            self.metrics.handled.labels(*labels, code).inc()
            self.metrics.handling.labels(*labels).observe(time.perf_counter() - started)
