"""The reads behind status and admin RPCs: statuses, key records, gaps, parked events,
entities. No transactions (each read is one statement); driver errors translated."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from common.clock import Clock
from common.db import reading
from common.pages import decode_token, encode_token, page_size
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import repository as repo
from sequencer.config import Settings
from sequencer.convert import duration, status_from_row
from sequencer.errors import EntityNotFound, EventNotFound, IdempotencyRecordNotFound, InvalidArgument
from sequencer.validation import validate_entity


class Reads:
    def __init__(self, engine: AsyncEngine, settings: Settings, clock: Clock) -> None:
        # Single reads need no transaction: one round trip instead of BEGIN, read, ROLLBACK.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.settings = settings
        self.clock = clock

    async def get_status(self, transaction_id: str, scope: str | None = None) -> sequencer_pb2.EventStatus:
        """The status of one transaction; with a scope, only if that caller submitted it (anyone
        else learns nothing, not even that it exists)."""
        try:
            tx = uuid.UUID(transaction_id)
        except ValueError as exc:
            raise InvalidArgument("transaction_id must be a UUID", field="transaction_id") from exc
        async with reading(self.engine) as conn:
            row = await repo.status_by_transaction(conn, tx)
        if row is None or (scope is not None and row.caller_id != scope):
            raise EventNotFound(f"no event with transaction id {transaction_id}", transaction_id=transaction_id)
        return status_from_row(row)

    async def get_status_by_key(self, caller: str, key: str) -> sequencer_pb2.EventStatus:
        async with reading(self.engine) as conn:
            row = await repo.status_by_key(conn, caller, key, self.clock.now())
        if row is None:
            raise EventNotFound("no event was submitted with this idempotency key by this caller")
        return status_from_row(row)

    async def entity_statuses(
        self, entity_type: int, entity_id: str, since: dt.datetime | None
    ) -> list[sequencer_pb2.EventStatus]:
        async with reading(self.engine) as conn:
            rows = await repo.statuses_for_entity(conn, entity_type, entity_id, since)
        return [status_from_row(r) for r in rows]

    async def get_key_record(self, caller: str, key: str) -> sequencer_pb2.IdempotencyRecord:
        async with reading(self.engine) as conn:
            record = await repo.get_key_record(conn, caller, key, self.clock.now())
            row = None
            if record is not None and record.transaction_id is not None:
                row = await repo.status_by_transaction(conn, record.transaction_id)
        if record is None:
            raise IdempotencyRecordNotFound("no live record of this idempotency key for this caller")
        result = sequencer_pb2.IdempotencyRecord(
            idempotency_key=key,
            caller_id=caller,
            method=record.method,
            transaction_id=str(record.transaction_id or ""),
            status_code=record.status_code,
            response=record.response,
            state=row.state if row is not None else events_pb2.EVENT_STATE_UNSPECIFIED,
        )
        result.first_seen_at.FromDatetime(record.created_at)
        result.expires_at.FromDatetime(record.expires_at)
        return result

    async def list_gaps(self, requested_size: int, page_token: str) -> tuple[list[sequencer_pb2.Gap], str]:
        size = page_size(requested_size)
        after = decode_token(page_token)
        cursor = None
        if after is not None:
            try:
                cursor = (dt.datetime.fromisoformat(after[0]), int(after[1]), str(after[2]))
            except (ValueError, IndexError, TypeError) as exc:
                raise InvalidArgument("page_token is malformed", field="page_token") from exc
        now = self.clock.now()
        async with reading(self.engine) as conn:
            rows = await repo.list_gaps(conn, cursor, size + 1)
        result = []
        for r in rows[:size]:
            age = (now - r.first_seen_at).total_seconds()
            gap = sequencer_pb2.Gap(
                entity=events_pb2.EntityRef(entity_type=r.entity_type, entity_id=r.entity_id),
                awaiting_sequence=r.awaiting_sequence,
                parked_count=r.parked_count,
                age=duration(age),
                alerting=age >= self.settings.gap_alert_after,
            )
            gap.first_seen_at.FromDatetime(r.first_seen_at)
            result.append(gap)
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_token([last.first_seen_at.isoformat(), last.entity_type, last.entity_id])
        return result, token

    async def list_parked(
        self, entity: events_pb2.EntityRef | None, requested_size: int, page_token: str
    ) -> tuple[list[sequencer_pb2.ParkedEvent], str]:
        size = page_size(requested_size)
        if entity is not None:
            validate_entity(entity.entity_type, entity.entity_id, prefix="entity")
        after = decode_token(page_token)
        cursor = None
        if after is not None:
            try:
                cursor = (int(after[0]), str(after[1]), int(after[2]))
            except (ValueError, IndexError, TypeError) as exc:
                raise InvalidArgument("page_token is malformed", field="page_token") from exc
        async with reading(self.engine) as conn:
            rows = await repo.list_parked(
                conn, (entity.entity_type, entity.entity_id) if entity is not None else None, cursor, size + 1
            )
        result = []
        for r in rows[:size]:
            parked = sequencer_pb2.ParkedEvent(
                transaction_id=str(r.transaction_id),
                event=events_pb2.Event.FromString(r.event),
                correlation_id=r.correlation_id,
            )
            parked.parked_at.FromDatetime(r.accepted_at)
            result.append(parked)
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_token([last.entity_type, last.entity_id, last.sequence])
        return result, token

    async def get_entity(self, entity_type: int, entity_id: str) -> sequencer_pb2.Entity:
        validate_entity(entity_type, entity_id, prefix="entity")
        async with reading(self.engine) as conn:
            row = await repo.get_entity(conn, entity_type, entity_id)
        if row is None:
            raise EntityNotFound(f"the sequencer has never seen entity {entity_id}", entity_id=entity_id)
        entity = sequencer_pb2.Entity(
            entity=events_pb2.EntityRef(entity_type=entity_type, entity_id=entity_id),  # type: ignore[arg-type]
            watermark=row.watermark,
            parked_count=row.parked_count,
            awaiting_sequence=row.awaiting_sequence or 0,
            last_outcome=row.last_outcome or events_pb2.EVENT_STATE_UNSPECIFIED,
            last_outcome_reason=row.last_outcome_reason or "",
        )
        if row.first_seen_at is not None:
            entity.oldest_gap_age.CopyFrom(duration((self.clock.now() - row.first_seen_at).total_seconds()))
        if row.blocked_sequence is not None:
            entity.blocked_sequence = row.blocked_sequence
            entity.blocked_reason = row.blocked_reason or ""
            entity.blocked_since.FromDatetime(row.blocked_at)
        entity.updated_at.FromDatetime(row.updated_at)
        return entity

    async def list_blocked(self, requested_size: int, page_token: str) -> tuple[list[sequencer_pb2.EventStatus], str]:
        """Blocked events, oldest first: what operators must decide on (retry or skip)."""
        size = page_size(requested_size)
        after = decode_token(page_token)
        cursor = None
        if after is not None:
            try:
                cursor = (dt.datetime.fromisoformat(after[0]), int(after[1]), str(after[2]))
            except (ValueError, IndexError, TypeError) as exc:
                raise InvalidArgument("page_token is malformed", field="page_token") from exc
        async with reading(self.engine) as conn:
            rows = await repo.list_blocked(conn, cursor, size + 1)
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_token([last.blocked_at.isoformat(), last.entity_type, last.entity_id])
        return [status_from_row(r) for r in rows[:size]], token

    async def recent_rejections(self, limit: int) -> list[sequencer_pb2.EventStatus]:
        """The latest rejections, newest first (the integration dashboard)."""
        async with reading(self.engine) as conn:
            rows = await repo.recent_rejections(conn, limit)
        return [status_from_row(r) for r in rows]
