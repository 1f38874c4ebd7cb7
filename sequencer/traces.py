"""The forwarder's spans: one per event, continuing the trace the event was accepted (or parked)
under, and one per ApplyEvents call, linked to them.

A batch carries events of many traces, so the call cannot be a child of all of them: the call
span starts a trace of its own (the ledger's ApplyEvents server span is its child, through the
call's metadata) and links each event's forward span; each event's forward span is the parent
sent with that item (ApplyEventRequest.traceparent), under which the ledger records the item's
apply span. So one event's trace reads: SubmitEvent -> sequencer.park (when parked) ->
sequencer.forward -> ledger.apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import tracing
from common.logs import enum_name
from logistics.events.v1 import events_pb2
from sequencer.forwarding import QueuedEvent

APPLY_EVENTS = "logistics.ledger.v1.LedgerService/ApplyEvents"


@contextlib.contextmanager
def forwarding(batch: list[QueuedEvent]) -> Iterator[list[QueuedEvent]]:
    """Spans for sending `batch` (all its attempts): yields the batch with each event's
    traceparent replaced by its forward span's, with the call span current, so the call's
    metadata continues it. A failure marks every span."""
    spans = [
        tracing.start(
            "sequencer.forward",
            parent=e.traceparent,
            attributes={
                "logistics.entity_type": enum_name(events_pb2.EntityType, e.entity_type),
                "logistics.entity_id": e.entity_id,
                "logistics.sequence": e.sequence,
                "logistics.transaction_id": str(e.transaction_id),
            },
        )
        for e in batch
    ]
    call = tracing.start(
        APPLY_EVENTS,
        kind=SpanKind.CLIENT,
        links=spans,
        attributes={"rpc.system": "grpc", "logistics.batch_size": len(batch)},
    )
    traced = [
        dataclasses.replace(e, traceparent=tracing.traceparent_of(s) or e.traceparent)
        for e, s in zip(batch, spans, strict=True)
    ]
    try:
        with trace.use_span(call, record_exception=False, set_status_on_exception=False):
            yield traced
    except BaseException as exc:
        for span in (call, *spans):
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        for span in (call, *spans):
            span.end()
