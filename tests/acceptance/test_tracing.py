"""OpenTelemetry traces across both services (in one process, so one in-memory exporter sees
both): a caller's W3C traceparent is continued through accept, park, forward and apply, and
the JSON log lines carry the trace ids beside the correlation id."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from common import logs
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from tests.support import System, shipment_event

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
SUBMIT = "logistics.sequencer.v1.SequencerService/SubmitEvent"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's tracer provider (the SDK's, installed once per
    process: OpenTelemetry allows one global provider); shut down after the test, so later tests
    record nothing into it."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


class Lines(logging.Handler):
    """Log records formatted as the services write them (common.logs' JSON lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter("test"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def parent_of(span: ReadableSpan) -> str | None:
    return _hex(span.parent.span_id, 16) if span.parent is not None else None


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return _hex(span.context.span_id, 16)


def trace_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return _hex(span.context.trace_id, 32)


async def test_one_trace_from_submit_to_apply_of_a_parked_event(
    system: System, spans: InMemorySpanExporter, database_url: str
) -> None:
    lines = Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    try:
        parked = await system.sequencer.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event("TRC-1", 2, "shipment_picked")),
            metadata=(("idempotency-key", "trc-2"), ("traceparent", TRACEPARENT), ("x-correlation-id", "trc")),
            timeout=10,
        )
        assert parked.state == events_pb2.EVENT_STATE_PARKED
        # The predecessor comes without a trace context: a trace of its own, which releases MSI 2.
        first = await system.submit(shipment_event("TRC-1", 1, "shipment_created"), "trc-1")
        assert (await system.wait_terminal(parked.transaction_id)).state == events_pb2.EVENT_STATE_APPLIED
        await system.wait_terminal(first.transaction_id)
    finally:
        root.removeHandler(lines)
        root.setLevel(level)

    mine = [s for s in spans.get_finished_spans() if trace_of(s) == TRACE_ID]
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in mine:
        by_name.setdefault(span.name, []).append(span)
    assert set(by_name) >= {SUBMIT, "sequencer.park", "sequencer.forward", "ledger.apply"}, sorted(by_name)
    (submit,) = by_name[SUBMIT]
    (park,) = by_name["sequencer.park"]
    applies = [s for s in by_name["ledger.apply"] if s.attributes and s.attributes["logistics.sequence"] == 2]
    assert len(applies) == 1
    (apply,) = applies
    # The chain, parent by parent: the caller's span -> SubmitEvent -> park -> forward -> apply.
    assert parent_of(submit) == CALLER_SPAN
    assert submit.kind == trace.SpanKind.SERVER
    assert parent_of(park) == span_id(submit)
    assert park.attributes is not None and park.attributes["logistics.awaiting"] == 1
    forward = next(s for s in by_name["sequencer.forward"] if parent_of(apply) == span_id(s))
    assert parent_of(forward) == span_id(park)
    assert forward.attributes is not None and forward.attributes["logistics.transaction_id"] == parked.transaction_id
    assert apply.attributes is not None and apply.attributes["logistics.outcome"] == "APPLIED"
    # The ApplyEvents call has a trace of its own (a batch mixes traces), linked to the event's.
    (call,) = [
        s
        for s in spans.get_finished_spans()
        if s.kind == trace.SpanKind.CLIENT and span_id(forward) in [_hex(link.context.span_id, 16) for link in s.links]
    ]
    assert call.name == "logistics.ledger.v1.LedgerService/ApplyEvents"
    assert trace_of(call) != TRACE_ID
    # ...continued by the ledger's server span, which each item's apply span links.
    (served,) = [
        s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER and parent_of(s) == span_id(call)
    ]
    assert served.name == "logistics.ledger.v1.LedgerService/ApplyEvents"
    assert [_hex(link.context.span_id, 16) for link in apply.links] == [span_id(served)]
    # MSI 1's trace is another one: it was submitted without a context.
    first_apply = next(
        s
        for s in spans.get_finished_spans()
        if s.name == "ledger.apply"
        and s.attributes
        and s.attributes["logistics.transaction_id"] == first.transaction_id
    )
    assert trace_of(first_apply) != TRACE_ID

    # The stored context is the park span's: what the forwarder continued after the release.
    engine = create_async_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        async with engine.connect() as conn:
            stored = await conn.scalar(
                text("SELECT traceparent FROM sequencer.events WHERE transaction_id = CAST(:tx AS uuid)"),
                {"tx": parked.transaction_id},
            )
    finally:
        await engine.dispose()
    assert stored == f"00-{TRACE_ID}-{span_id(park)}-01"

    # Log lines: trace ids beside the correlation id, on both services' lines.
    traced = [e for e in lines.lines if e.get("correlation_id") == "trc" and e.get("trace_id") == TRACE_ID]
    assert any(e.get("msg") == "rpc" and str(e.get("rpc")).endswith("/SubmitEvent") for e in traced)
    assert any(e.get("span_id") == span_id(submit) for e in traced)
