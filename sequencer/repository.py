"""Statements over the sequencer's tables. No business rules and no commits: the service owns
the transaction and passes its connection in."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, and_, bindparam, func, literal, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from sequencer import hints, queries
from sequencer.models import entities, events, gaps, idempotency_keys, interventions
from sequencer.states import BLOCKED, PARKED, QUEUED, REJECTED

EntityKey = tuple[int, str]


@dataclass(frozen=True)
class Outcome:
    """The ledger's answer for one forwarded event, as the events row records it."""

    entity_type: int
    entity_id: str
    sequence: int
    state: int
    reason: str
    reason_detail: str
    entity_version: int


def _keys(keys: Sequence[EntityKey]) -> dict[str, list[Any]]:
    """Entity keys as the statements' two arrays, `types` and `ids`."""
    return {"types": [k[0] for k in keys], "ids": [k[1] for k in keys]}


# --- idempotency keys -------------------------------------------------------------------------


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


async def lock_key(conn: AsyncConnection, caller: str, key: str) -> None:
    """The key's transaction-scoped lock, in lock_submissions_v2's namespace, so a concurrent
    first use of the key by any RPC waits for this one."""
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('idem:' || :caller || ':' || :key, 0))"),
        {"caller": caller, "key": key},
    )


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


async def forwardable(conn: AsyncConnection, keys: Sequence[EntityKey], per_entity: int) -> list[Row[Any]]:
    """Each entity's events right above its watermark (QUEUED first, then PARKED), at most
    `per_entity` each, in (entity, MSI) order, with the entity's watermark."""
    params = {**_keys(keys), "per_entity": per_entity}
    return list((await conn.execute(queries.FORWARDABLE, params)).all())


async def record_outcomes(
    conn: AsyncConnection,
    outcomes: Sequence[Outcome],
    *,
    strategy: str,
    now: dt.datetime,
    owner: str,
    lease_until: dt.datetime,
    hand_over_before: dt.datetime,
) -> list[Row[Any]]:
    """Records a batch's ledger outcomes (sequencer/sql/record_outcomes_v1.sql); per entity:
    (r_type, r_id, r_previous and r_watermark, r_released transaction or NULL, r_lease_kept)."""
    params = {
        "types": [o.entity_type for o in outcomes],
        "ids": [o.entity_id for o in outcomes],
        "sequences": [o.sequence for o in outcomes],
        "states": [o.state for o in outcomes],
        "reasons": [o.reason for o in outcomes],
        "details": [o.reason_detail for o in outcomes],
        "versions": [o.entity_version for o in outcomes],
        "row_lock": strategy == "row",
        "now": now,
        "owner": owner,
        "lease_until": lease_until,
        "hand_over_before": hand_over_before,
    }
    return list((await conn.execute(queries.RECORD_OUTCOMES, params)).all())


async def count_refusals(
    conn: AsyncConnection,
    heads: Sequence[tuple[int, str, int]],
    *,
    code: str,
    reason: str,
    detail: str,
    block_after: int,
    now: dt.datetime,
) -> list[Row[Any]]:
    """Counts one refused attempt against each (entity, MSI) still QUEUED; the attempt that
    reaches `block_after` blocks it (queries.COUNT_REFUSALS)."""
    params = {
        "types": [h[0] for h in heads],
        "ids": [h[1] for h in heads],
        "sequences": [h[2] for h in heads],
        "code": code,
        "reason": reason,
        "detail": detail,
        "block_after": block_after,
        "now": now,
        "queued": QUEUED,
        "blocked": BLOCKED,
    }
    return list((await conn.execute(queries.COUNT_REFUSALS, params)).all())


async def unblock(
    conn: AsyncConnection, entity: EntityKey, sequence: int, *, skip_reason: str | None, now: dt.datetime
) -> None:
    """The entity's BLOCKED event QUEUED again with its attempts and refusal cleared; with a
    skip reason it is forwarded as a skip."""
    values: dict[str, Any] = {
        "state": QUEUED,
        "queued_at": now,
        "forward_attempts": 0,
        "blocked_at": None,
        "ledger_code": None,
        "reason": None,
        "reason_detail": None,
    }
    if skip_reason is not None:
        values["skip_reason"] = skip_reason
    stmt = (
        update(events)
        .where(
            events.c.entity_type == entity[0],
            events.c.entity_id == entity[1],
            events.c.sequence == sequence,
            events.c.state == BLOCKED,
        )
        .values(**values)
    )
    if (await conn.execute(stmt)).rowcount != 1:
        # The entity's lock is held and the rules saw it blocked: unreachable.
        raise RuntimeError(f"MSI {sequence} of {entity[1]} was not blocked under its entity's lock")


async def audit(
    conn: AsyncConnection,
    entity: EntityKey,
    sequence: int,
    *,
    action: str,
    caller: str,
    reason: str,
    now: dt.datetime,
    blocked: bool,
) -> None:
    """An operator's intervention in the audit trail; on a BLOCKED event, with the refusal that
    blocked it (read before the intervention clears it)."""
    refusal = (
        select(func.concat_ws(": ", events.c.ledger_code, events.c.reason, events.c.reason_detail))
        .where(events.c.entity_type == entity[0], events.c.entity_id == entity[1], events.c.sequence == sequence)
        .scalar_subquery()
    )
    await conn.execute(
        interventions.insert().values(
            entity_type=entity[0],
            entity_id=entity[1],
            id=uuid.uuid4(),
            sequence=sequence,
            action=action,
            caller_id=caller,
            reason=reason,
            blocked_reason=refusal if blocked else None,
            at=now,
        )
    )


async def notify(conn: AsyncConnection, payload: str) -> None:
    """A wake-up hint (sequencer/hints.py) outside the ingress batch's statement."""
    await conn.execute(queries.NOTIFY, {"channel": hints.CHANNEL, "payload": payload})


# --- forwarding leases ------------------------------------------------------------------------


async def claim_entities(
    conn: AsyncConnection, owner: str, now: dt.datetime, until: dt.datetime, limit: int
) -> list[tuple[int, str]]:
    result = await conn.execute(queries.CLAIM_ENTITIES, {"owner": owner, "now": now, "until": until, "limit": limit})
    return [(int(r.entity_type), str(r.entity_id)) for r in result]


async def claim_named(
    conn: AsyncConnection, keys: Sequence[EntityKey], owner: str, now: dt.datetime, until: dt.datetime
) -> list[EntityKey]:
    """Claims the named entities whose lease is free, expired or ours; returns those won."""
    params = {**_keys(keys), "owner": owner, "now": now, "until": until}
    result = await conn.execute(queries.CLAIM_NAMED, params)
    return [(int(r.entity_type), str(r.entity_id)) for r in result]


async def rest_leases(conn: AsyncConnection, keys: Sequence[EntityKey], owner: str, until: dt.datetime) -> None:
    """Our leases of `keys` end at `until`: the entities rest, then any replica may claim them."""
    params = {**_keys(keys), "owner": owner, "until": until}
    await conn.execute(queries.REST_LEASES, params)


async def release_leases(conn: AsyncConnection, keys: Sequence[EntityKey], owner: str) -> None:
    """Hands our leases of `keys` back (at shutdown), so other replicas need not wait."""
    params = {**_keys(keys), "owner": owner}
    await conn.execute(queries.RELEASE_LEASES, params)


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
            or_(
                events.c.accepted_at >= since,
                events.c.queued_at >= since,
                events.c.processed_at >= since,
                events.c.blocked_at >= since,
            )
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
        select(func.count()).select_from(events).where(events.c.state == BLOCKED).scalar_subquery().label("blocked"),
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
    """An entity's row with its gap and its BLOCKED event (always the watermark's successor)."""
    blocked = and_(
        events.c.entity_type == entities.c.entity_type,
        events.c.entity_id == entities.c.entity_id,
        events.c.sequence == entities.c.watermark + 1,
        events.c.state == BLOCKED,
    )
    stmt = (
        select(
            entities,
            gaps.c.awaiting_sequence,
            gaps.c.first_seen_at,
            events.c.sequence.label("blocked_sequence"),
            events.c.blocked_at,
            events.c.reason.label("blocked_reason"),
        )
        .select_from(
            entities.outerjoin(
                gaps, and_(gaps.c.entity_type == entities.c.entity_type, gaps.c.entity_id == entities.c.entity_id)
            ).outerjoin(events, blocked)
        )
        .where(entities.c.entity_type == entity_type, entities.c.entity_id == entity_id)
    )
    return (await conn.execute(stmt)).first()


async def count_held(conn: AsyncConnection, cap: int) -> int:
    """Held events (PARKED, QUEUED or BLOCKED), at most `cap`: the backlog figure of admission."""
    return int((await conn.execute(queries.COUNT_HELD, {"cap": cap})).scalar_one())


async def list_blocked(conn: AsyncConnection, after: tuple[dt.datetime, int, str] | None, limit: int) -> list[Row[Any]]:
    """BLOCKED events, oldest first (ix_events_blocked), with their status columns."""
    stmt = _status_select().where(events.c.state == BLOCKED)
    if after is not None:
        stmt = stmt.where(tuple_(events.c.blocked_at, events.c.entity_type, events.c.entity_id) > tuple_(*after))
    stmt = stmt.order_by(events.c.blocked_at, events.c.entity_type, events.c.entity_id).limit(limit)
    return list((await conn.execute(stmt)).all())


async def recent_rejections(conn: AsyncConnection, limit: int) -> list[Row[Any]]:
    """The latest REJECTED events, newest first (ix_events_rejected), with their status columns."""
    # The state inline, not a bind parameter, so that a generic plan still matches the index.
    stmt = _status_select().where(
        events.c.state == literal(REJECTED, literal_execute=True), events.c.processed_at.is_not(None)
    )
    stmt = stmt.order_by(events.c.processed_at.desc()).limit(limit)
    return list((await conn.execute(stmt)).all())
