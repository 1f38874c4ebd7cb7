"""The JSON log lines: the request's context on every line, a line's own fields winning over it
(a batch's line names its event), and the trace ids of the current span beside them."""

from __future__ import annotations

import json
import logging

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from common import logs


def line(logger: logging.Logger, message: str, **extra: object) -> dict[str, object]:
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None, extra=extra)
    loaded: dict[str, object] = json.loads(logs.JsonFormatter("svc").format(record))
    return loaded


def test_context_fields_trace_ids_and_a_line_s_own_fields() -> None:
    logs.install_context()
    logger = logging.getLogger("tests.logs")
    token = logs.log_context.set({"correlation_id": "c-1", "entity_id": "CONTEXT", "batch_size": 2})
    try:
        plain = line(logger, "rpc")
        assert plain["correlation_id"] == "c-1" and plain["entity_id"] == "CONTEXT"
        assert "trace_id" not in plain  # no span: no ids
        # A field the context has too: no KeyError from logging, the line's own value wins.
        own = line(logger, "event rejected", entity_id="SHP-9", sequence=3)
        assert own["entity_id"] == "SHP-9" and own["sequence"] == 3 and own["batch_size"] == 2
        # Any handler (caplog too) reads the context as attributes of the record.
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "rpc", (), None)
        assert getattr(record, "correlation_id", None) == "c-1" and not hasattr(record, "nothing")
        span = NonRecordingSpan(
            SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False, TraceFlags(1))
        )
        with trace.use_span(span):
            traced = line(logger, "rpc")
        assert traced["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert traced["span_id"] == "00f067aa0ba902b7"
        assert traced["correlation_id"] == "c-1"
    finally:
        logs.log_context.reset(token)


def test_enum_fields_are_names_and_unknown_values_do_not_raise() -> None:
    from logistics.events.v1 import events_pb2

    assert logs.enum_name(events_pb2.EntityType, events_pb2.ENTITY_TYPE_SHIPMENT) == "ENTITY_TYPE_SHIPMENT"
    # A caller's bad input is logged before validation refuses it: its number, not an exception.
    assert logs.enum_name(events_pb2.EntityType, -3) == "-3"
