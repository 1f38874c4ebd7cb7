"""Statements over the sequencer's tables. No business rules and no commits: the service owns
the transaction and passes its connection in."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Row, and_, bindparam, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from logistics.events.v1 import events_pb2
from sequencer import queries
from sequencer.models import entities, events, gaps, idempotency_keys

PARKED = events_pb2.EVENT_STATE_PARKED
QUEUED = events_pb2.EVENT_STATE_QUEUED


def _entity(entity_type: int, entity_id: str) -> dict[str, Any]:
    return {"entity_type": entity_type, "entity_id": entity_id}


# --- idempotency keys -------------------------------------------------------------------------


def _lock_timeout(timeout: float | None) -> str:
    """The caller's remaining deadline as a lock_timeout setting ('0': no bound)."""
    return "0" if timeout is None else f"{max(1, int(timeout * 1000))}ms"


async def lock_key(
    conn: AsyncConnection, caller: str, key: str, now: dt.datetime, timeout: float | None = None
) -> Row[Any] | None:
    """Takes the key's lock and returns its live (unexpired) record, if any; `timeout` (the
    caller's remaining deadline) bounds this and every later lock wait of the transaction."""
    params = {"caller": caller, "key": key, "lock_timeout": _lock_timeout(timeout), "now": now}
    return (await conn.execute(queries.LOCK_KEY, params)).first()


# Built once: the admin lookup of a key's record.
_LIVE_KEY_RECORD = select(idempotency_keys).where(
    idempotency_keys.c.caller_id == bindparam("caller"),
    idempotency_keys.c.idempotency_key == bindparam("key"),
    idempotency_keys.c.expires_at > bindparam("now"),
)


async def get_key_record(conn: AsyncConnection, caller: str, key: str, now: dt.datetime) -> Row[Any] | None:
    """The live (unexpired) record of a key, if any."""
    result = await conn.execute(_LIVE_KEY_RECORD, {"caller": caller, "key": key, "now": now})
    return result.first()


async def store_key_record(conn: AsyncConnection, **values: Any) -> None:
    """Stores the first execution's outcome; replaces an expired record of the same key."""
    insert_stmt = pg_insert(idempotency_keys).values(**values)
    stmt = insert_stmt.on_conflict_do_update(
        index_elements=[idempotency_keys.c.caller_id, idempotency_keys.c.idempotency_key],
        set_={c: insert_stmt.excluded[c] for c in values if c not in ("caller_id", "idempotency_key")},
        where=idempotency_keys.c.expires_at <= values["created_at"],
    ).returning(idempotency_keys.c.caller_id)
    result = await conn.execute(stmt)
    if result.first() is None:
        # The key lock makes this unreachable; the primary key is the rule's backstop.
        raise RuntimeError("idempotency record already exists for a key held under its lock")


async def sweep_expired_keys(conn: AsyncConnection, now: dt.datetime, batch: int) -> int:
    result = await conn.execute(queries.SWEEP_EXPIRED_KEYS, {"now": now, "batch": batch})
    return int(result.rowcount)


# --- entities and events ----------------------------------------------------------------------


async def lock_entity(
    conn: AsyncConnection, entity_type: int, entity_id: str, strategy: str, now: dt.datetime
) -> Row[Any]:
    """Serialises work on one entity for this transaction; returns (watermark, parked_count)."""
    params = {**_entity(entity_type, entity_id), "row_lock": strategy == "row", "now": now}
    return (await conn.execute(queries.LOCK_ENTITY, params)).one()


async def get_event(conn: AsyncConnection, entity_type: int, entity_id: str, sequence: int) -> Row[Any] | None:
    result = await conn.execute(
        select(events).where(
            events.c.entity_type == entity_type, events.c.entity_id == entity_id, events.c.sequence == sequence
        )
    )
    return result.first()


async def hold_event(conn: AsyncConnection, **values: Any) -> tuple[bool, int | None]:
    """Holds a parked event or a skip marker (row, wake-up, parked count, gap) in one round
    trip; returns (held, the MSI the entity then misses); not held when the MSI already is."""
    values.setdefault("skip_reason", None)
    row = (await conn.execute(queries.HOLD_EVENT, values)).one()
    return bool(row.held), None if row.awaiting is None else int(row.awaiting)


async def held_range(conn: AsyncConnection, entity_type: int, entity_id: str, watermark: int) -> tuple[int, int | None]:
    """(lowest missing MSI above the watermark, highest held MSI or None)."""
    row = (await conn.execute(queries.HELD_RANGE, {**_entity(entity_type, entity_id), "watermark": watermark})).one()
    return int(row.lowest_missing), None if row.highest_held is None else int(row.highest_held)


async def queued_event(conn: AsyncConnection, entity_type: int, entity_id: str) -> Row[Any] | None:
    """The entity's queued event: at most one, the direct successor of its watermark."""
    result = await conn.execute(
        select(events)
        .where(events.c.entity_type == entity_type, events.c.entity_id == entity_id, events.c.state == QUEUED)
        .order_by(events.c.sequence)
        .limit(1)
    )
    return result.first()


async def record_outcome(
    conn: AsyncConnection,
    entity_type: int,
    entity_id: str,
    sequence: int,
    *,
    strategy: str,
    state: int,
    reason: str | None,
    reason_detail: str | None,
    entity_version: int,
    now: dt.datetime,
    origin: str,
    lease_owner: str,
    lease_until: dt.datetime,
    hand_over_before: dt.datetime,
) -> Row[Any]:
    """Records a QUEUED event's outcome under the entity's lock, releases its parked successor,
    advances the watermark and renews the lease (handing it back at a chain's end when taken
    before `hand_over_before`); returns (recorded, previous_watermark, the released event's
    transaction_id, event, correlation_id, skip_reason or NULLs, lease_kept)."""
    params = {
        **_entity(entity_type, entity_id),
        "sequence": sequence,
        "state": state,
        "reason": reason,
        "reason_detail": reason_detail,
        "entity_version": entity_version,
        "row_lock": strategy == "row",
        "now": now,
        "origin": origin,
        "owner": lease_owner,
        "lease_until": lease_until,
        "hand_over_before": hand_over_before,
    }
    return (await conn.execute(queries.RECORD_OUTCOME, params)).one()


# --- forwarding leases ------------------------------------------------------------------------


async def claim_entities(
    conn: AsyncConnection, owner: str, now: dt.datetime, until: dt.datetime, limit: int
) -> list[tuple[int, str]]:
    result = await conn.execute(queries.CLAIM_ENTITIES, {"owner": owner, "now": now, "until": until, "limit": limit})
    return [(int(r.entity_type), str(r.entity_id)) for r in result]


async def claim_entity(
    conn: AsyncConnection, entity_type: int, entity_id: str, owner: str, now: dt.datetime, until: dt.datetime
) -> bool:
    result = await conn.execute(
        queries.CLAIM_ENTITY, {**_entity(entity_type, entity_id), "owner": owner, "now": now, "until": until}
    )
    return result.first() is not None


async def release_lease(conn: AsyncConnection, entity_type: int, entity_id: str, owner: str) -> None:
    await conn.execute(queries.RELEASE_LEASE, {**_entity(entity_type, entity_id), "owner": owner})


async def renew_lease(conn: AsyncConnection, entity_type: int, entity_id: str, owner: str, until: dt.datetime) -> bool:
    result = await conn.execute(
        update(entities)
        .where(
            entities.c.entity_type == entity_type,
            entities.c.entity_id == entity_id,
            entities.c.lease_owner == owner,
        )
        .values(lease_until=until)
    )
    return bool(result.rowcount == 1)


# --- reads --------------------------------------------------------------------------------------

_STATUS_COLUMNS = (
    *events.c,
    gaps.c.awaiting_sequence.label("gap_awaiting"),
    entities.c.watermark,
)


def _status_select() -> Any:
    """Events with what their entity waits for (its gap and watermark)."""
    same_entity_gap = and_(gaps.c.entity_type == events.c.entity_type, gaps.c.entity_id == events.c.entity_id)
    same_entity = and_(entities.c.entity_type == events.c.entity_type, entities.c.entity_id == events.c.entity_id)
    return select(*_STATUS_COLUMNS).select_from(events.join(entities, same_entity).outerjoin(gaps, same_entity_gap))


async def status_by_transaction(conn: AsyncConnection, transaction_id: uuid.UUID) -> Row[Any] | None:
    return (await conn.execute(_status_select().where(events.c.transaction_id == transaction_id))).first()


async def status_by_key(conn: AsyncConnection, caller: str, key: str, now: dt.datetime) -> Row[Any] | None:
    record = await get_key_record(conn, caller, key, now)
    if record is None or record.transaction_id is None:
        return None
    return await status_by_transaction(conn, record.transaction_id)


async def statuses_for_entity(
    conn: AsyncConnection, entity_type: int, entity_id: str, since: dt.datetime | None
) -> list[Row[Any]]:
    """An entity's events changed at or after `since` (all when None), in MSI order."""
    stmt = _status_select().where(events.c.entity_type == entity_type, events.c.entity_id == entity_id)
    if since is not None:
        stmt = stmt.where(
            or_(events.c.accepted_at >= since, events.c.queued_at >= since, events.c.processed_at >= since)
        )
    return list((await conn.execute(stmt.order_by(events.c.sequence))).all())


async def list_gaps(conn: AsyncConnection, after: tuple[dt.datetime, int, str] | None, limit: int) -> list[Row[Any]]:
    stmt = select(gaps, entities.c.parked_count).join(
        entities, and_(entities.c.entity_type == gaps.c.entity_type, entities.c.entity_id == gaps.c.entity_id)
    )
    if after is not None:
        stmt = stmt.where(tuple_(gaps.c.first_seen_at, gaps.c.entity_type, gaps.c.entity_id) > tuple_(*after))
    stmt = stmt.order_by(gaps.c.first_seen_at, gaps.c.entity_type, gaps.c.entity_id).limit(limit)
    return list((await conn.execute(stmt)).all())


async def gap_summary(conn: AsyncConnection, alert_before: dt.datetime) -> Any:
    """How many gaps (and how many alerting), the oldest first-seen time, and parked events."""
    stmt = select(
        select(func.count()).select_from(gaps).scalar_subquery().label("gaps"),
        select(func.count())
        .select_from(gaps)
        .where(gaps.c.first_seen_at <= alert_before)
        .scalar_subquery()
        .label("alerting"),
        select(func.min(gaps.c.first_seen_at)).scalar_subquery().label("oldest"),
        select(func.coalesce(func.sum(entities.c.parked_count), 0)).scalar_subquery().label("parked"),
    )
    row = (await conn.execute(stmt)).first()
    assert row is not None
    return row


async def gaps_to_alert(conn: AsyncConnection, older_than: dt.datetime, now: dt.datetime) -> list[Row[Any]]:
    """Marks and returns gaps that crossed the alert threshold and were not yet alerted."""
    result = await conn.execute(
        update(gaps)
        .where(gaps.c.first_seen_at <= older_than, gaps.c.alerted_at.is_(None))
        .values(alerted_at=now)
        .returning(gaps.c.entity_type, gaps.c.entity_id, gaps.c.awaiting_sequence, gaps.c.first_seen_at)
    )
    return list(result.all())


async def list_parked(
    conn: AsyncConnection, entity: tuple[int, str] | None, after: tuple[int, str, int] | None, limit: int
) -> list[Row[Any]]:
    stmt = select(events).where(events.c.state == PARKED)
    if entity is not None:
        stmt = stmt.where(events.c.entity_type == entity[0], events.c.entity_id == entity[1])
    if after is not None:
        stmt = stmt.where(tuple_(events.c.entity_type, events.c.entity_id, events.c.sequence) > tuple_(*after))
    stmt = stmt.order_by(events.c.entity_type, events.c.entity_id, events.c.sequence).limit(limit)
    return list((await conn.execute(stmt)).all())


async def get_entity(conn: AsyncConnection, entity_type: int, entity_id: str) -> Any:
    stmt = (
        select(entities, gaps.c.awaiting_sequence, gaps.c.first_seen_at)
        .select_from(
            entities.outerjoin(
                gaps, and_(gaps.c.entity_type == entities.c.entity_type, gaps.c.entity_id == entities.c.entity_id)
            )
        )
        .where(entities.c.entity_type == entity_type, entities.c.entity_id == entity_id)
    )
    return (await conn.execute(stmt)).first()
