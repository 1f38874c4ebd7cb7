"""Rows as the public messages: one place for the proto shapes of the sequencer's reads."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from sqlalchemy import Row

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.rules import awaiting
from sequencer.states import PARKED


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(dt.timedelta(seconds=max(0.0, seconds)))
    return value


def status_from_row(row: Row[Any], key: str | None = None) -> sequencer_pb2.EventStatus:
    """An events row (joined with its entity's gap) as the public EventStatus."""
    status = sequencer_pb2.EventStatus(
        transaction_id=str(row.transaction_id),
        entity=events_pb2.EntityRef(entity_type=row.entity_type, entity_id=row.entity_id),
        sequence=row.sequence,
        state=row.state,
        reason=row.reason or row.skip_reason or "",
        reason_detail=row.reason_detail or "",
        entity_version=row.entity_version or 0,
        correlation_id=row.correlation_id,
        idempotency_key=key if key is not None else (row.idempotency_key or ""),
        forward_attempts=row.forward_attempts,
        ledger_code=row.ledger_code or "",
    )
    if row.state == PARKED:
        status.awaiting_sequence = awaiting(row.sequence, row.gap_awaiting, row.watermark)
    for name in ("accepted_at", "queued_at", "processed_at", "blocked_at"):
        stamp = timestamp(getattr(row, name))
        if stamp is not None:
            getattr(status, name).CopyFrom(stamp)
    return status


def status_from_delivery(row: Row[Any]) -> sequencer_pb2.EventStatus:
    """An outbox delivery as the EventStatus it reports: the state change it was written for
    (its own columns), and the event's fixed facts (joined from the events row)."""
    status = sequencer_pb2.EventStatus(
        transaction_id=str(row.transaction_id),
        entity=events_pb2.EntityRef(entity_type=row.entity_type, entity_id=row.entity_id),
        sequence=row.sequence,
        state=row.event_state,
        reason=row.reason or "",
        reason_detail=row.reason_detail or "",
        entity_version=row.entity_version or 0,
        correlation_id=row.correlation_id,
        idempotency_key=row.idempotency_key or "",
        forward_attempts=row.forward_attempts or 0,
        ledger_code=row.ledger_code or "",
    )
    for name in ("accepted_at", "queued_at", "processed_at", "blocked_at"):
        stamp = timestamp(getattr(row, name))
        if stamp is not None:
            getattr(status, name).CopyFrom(stamp)
    return status
