"""OpenTelemetry tracing both services share: W3C trace context in and out, spans of our own.

Off by default: without OTEL_TRACES_EXPORTER (or with `none`) no SDK is installed and every span
is the API's non-recording one, which costs next to nothing yet still carries a caller's
`traceparent` through (stored with the event, sent on to the ledger, logged). With
OTEL_TRACES_EXPORTER=otlp (or console) the SDK exports spans as the standard OTEL_* variables
say (endpoint, protocol, headers, sampler, service name). docs/observability.md has the recipe.

A traceparent travels as text because it is stored with the event (sequencer.events) and sent
per item inside ApplyEvents (a batch holds events of many traces): `traceparent_of` and
`context_of` convert between the W3C header value and an OpenTelemetry context.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTRUMENTATION = "logistics"

_propagator = TraceContextTextMapPropagator()


def configure(service: str) -> None:
    """Installs the SDK with the exporters OTEL_TRACES_EXPORTER names (otlp, console; none, the
    default here, installs nothing). Called once by a service's main, never by build_server:
    tests install their own provider."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    if not names or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win; without them the service's own name,
    # not the SDK's "unknown_service".
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            exporter = _otlp_exporter()
        elif name == "console":
            exporter = ConsoleSpanExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on", extra={"exporters": names})


def _otlp_exporter() -> Any:
    """OTLP over gRPC (the default) or over HTTP, as OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL says;
    endpoint, headers and TLS come from the standard variables the exporters read."""
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (grpc or http/protobuf)")


def tracer() -> trace.Tracer:
    # Looked up per use, not at import: a provider installed later (tests, main) is honoured.
    return trace.get_tracer(INSTRUMENTATION)


def extract(metadata: Iterable[tuple[str, Any]]) -> otel_context.Context:
    """The caller's trace context from gRPC metadata (`traceparent`, `tracestate`); a malformed
    or missing one gives an empty context, so the call starts a new trace."""
    carrier = {k: v for k, v in metadata if k in (TRACEPARENT, TRACESTATE) and isinstance(v, str)}
    return _propagator.extract(carrier)


def context_of(traceparent: str | None) -> otel_context.Context:
    """An OpenTelemetry context whose parent is the stored `traceparent` (empty when none)."""
    if not traceparent:
        return otel_context.Context()
    return _propagator.extract({TRACEPARENT: traceparent})


def traceparent_of(span: Span | None = None) -> str:
    """The W3C traceparent of `span` (the current one by default); "" when it has no valid
    context (no caller trace and no SDK)."""
    span = span or trace.get_current_span()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT, "")


def metadata_of(span: Span | None = None) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata that continues `span`'s (by default the current span's) trace at the
    callee; empty when there is no valid context."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span or trace.get_current_span()))
    return tuple(carrier.items())


def log_ids(traceparent: str | None) -> dict[str, str]:
    """`trace_id` and `span_id` of a stored traceparent, for a log line about that event written
    outside its spans (empty when there is none)."""
    parts = (traceparent or "").split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return {}
    return {"trace_id": parts[1], "span_id": parts[2]}


def start(
    name: str,
    *,
    parent: str | otel_context.Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: Iterable[Span] = (),
    start_time: int | None = None,
) -> Span:
    """A span (ended by the caller) under a stored traceparent or an extracted context."""
    parent_context = context_of(parent) if parent is None or isinstance(parent, str) else parent
    return tracer().start_span(
        name,
        context=parent_context,
        kind=kind,
        attributes=dict(attributes or {}),
        links=[Link(s.get_span_context()) for s in links if s.get_span_context().is_valid],
        start_time=start_time,
    )


def mark(name: str, parent: str, attributes: Mapping[str, Any]) -> str:
    """A step with no duration of its own (an event parked): a span under `parent`, ended at
    once; returns its traceparent, so what follows the step is its child (or `parent` itself
    when no SDK records spans)."""
    span = start(name, parent=parent, attributes=attributes)
    span.end()
    return traceparent_of(span) or parent
