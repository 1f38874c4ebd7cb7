"""The outbox's statements (docs/webhooks.md): subscriptions, the claim of due deliveries, and
what an attempt leaves behind. Sink-neutral: every sink (webhooks here, the broker publishers
later) claims its subscriptions' deliveries with CLAIM and reports with the same finishers.

Statements only: no rules, no commits (the caller owns the transaction). The deliveries
themselves are written by the trigger on sequencer.events (sequencer/sql/outbox_enqueue_v1.sql).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncConnection

ACTIVE = 1
DISABLED = 2
PENDING = 1
DELIVERED = 2
FAILED = 3

# Claims up to :limit due deliveries of :sink's active subscriptions. Per (subscription, entity)
# only the head is a candidate: the lowest pending delivery in (MSI, position) order, so one
# entity's deliveries go out one at a time and in MSI order, a retry waiting holds the ones
# behind it, and a head that is claimed (an unexpired lease) keeps the others away. The lease,
# not a held lock, marks a delivery in flight, so the claim commits at once and a crashed
# sender's claim simply expires. SKIP LOCKED lets replicas claim side by side; the UPDATE
# re-checks the lease on the row's newest version (READ COMMITTED re-evaluates the WHERE after
# waiting), so two replicas never both win one delivery.
CLAIM = text(
    "WITH head AS ("
    "  SELECT DISTINCT ON (d.subscription_id, d.entity_type, d.entity_id) d.id, d.next_attempt_at, d.claimed_until"
    "  FROM sequencer.outbox_deliveries d"
    "  JOIN sequencer.outbox_subscriptions s ON s.id = d.subscription_id AND s.sink = :sink AND s.state = 1"
    "  WHERE d.status = 1"
    "  ORDER BY d.subscription_id, d.entity_type, d.entity_id, d.sequence, d.position"
    "), due AS ("
    "  SELECT h.id FROM head h WHERE h.next_attempt_at <= :now AND (h.claimed_until IS NULL OR h.claimed_until < :now)"
    "  ORDER BY h.next_attempt_at LIMIT :limit"
    "), locked AS ("
    "  SELECT d.id FROM sequencer.outbox_deliveries d WHERE d.id IN (SELECT id FROM due) FOR UPDATE SKIP LOCKED"
    ") "
    "UPDATE sequencer.outbox_deliveries d SET claimed_by = :owner, claimed_until = :until "
    "FROM locked l, sequencer.outbox_subscriptions s, sequencer.events e "
    "WHERE d.id = l.id AND d.status = 1 AND (d.claimed_until IS NULL OR d.claimed_until < :now) "
    "  AND s.id = d.subscription_id AND s.state = 1 "
    "  AND e.entity_type = d.entity_type AND e.entity_id = d.entity_id AND e.sequence = d.sequence "
    "RETURNING d.id, d.subscription_id, d.entity_type, d.entity_id, d.sequence, d.transaction_id, d.event_state, "
    "  d.reason, d.reason_detail, d.entity_version, d.processed_at, d.forward_attempts, d.blocked_at, d.ledger_code, "
    "  d.attempts, d.step, d.created_at, "
    "  s.target, s.secret, e.correlation_id, e.idempotency_key, e.accepted_at, e.queued_at"
)

# A stopping replica hands its claims back, so another sends them without waiting for the lease.
RELEASE = text(
    "UPDATE sequencer.outbox_deliveries SET claimed_by = NULL, claimed_until = NULL "
    "WHERE claimed_by = :owner AND status = 1"
)

# One attempt, whatever came of it.
RECORD_ATTEMPT = text(
    "INSERT INTO sequencer.outbox_attempts (delivery_id, attempted_at, http_status, error, latency_seconds, replica) "
    "VALUES (:id, :at, :http_status, :error, :latency, :owner)"
)

# The attempt's result on the delivery, while this replica's claim holds (a sender whose lease
# ran out changes nothing: the delivery is someone else's now). :status is PENDING again (a
# retry at :next), DELIVERED or FAILED (the schedule is spent).
FINISH = text(
    "UPDATE sequencer.outbox_deliveries SET status = :status, attempts = attempts + 1, step = step + 1, "
    "  next_attempt_at = coalesce(:next, next_attempt_at), last_http_status = :http_status, last_error = :error, "
    "  delivered_at = CASE WHEN :status = 2 THEN :at ELSE delivered_at END, claimed_by = NULL, claimed_until = NULL "
    "WHERE id = :id AND claimed_by = :owner RETURNING id"
)

# Since when a subscription has been failing: cleared by a success, kept by further failures.
# Returns failing_since, so the caller can tell whether the subscription failed long enough.
MARK_FAILING = text(
    "UPDATE sequencer.outbox_subscriptions SET failing_since = coalesce(failing_since, :at) "
    "WHERE id = :id RETURNING failing_since"
)
MARK_SUCCEEDING = text(
    "UPDATE sequencer.outbox_subscriptions SET failing_since = NULL WHERE id = :id AND failing_since IS NOT NULL"
)

# Disables an active subscription (410, or failing too long) and fails its pending deliveries.
DISABLE = text(
    "WITH off AS ("
    "  UPDATE sequencer.outbox_subscriptions SET state = 2, disabled_at = :at, disabled_reason = :reason "
    "  WHERE id = :id AND state = 1 RETURNING id"
    "), dropped AS ("
    "  UPDATE sequencer.outbox_deliveries d SET status = 3, claimed_by = NULL, claimed_until = NULL, "
    "    last_error = coalesce(d.last_error, :reason) "
    "  FROM off WHERE d.subscription_id = off.id AND d.status = 1 RETURNING 1"
    ") SELECT (SELECT count(*) FROM off), (SELECT count(*) FROM dropped)"
)

# Whether :sink has an active subscription at all (a dispatcher without one ignores wake-ups),
# and when the oldest delivery still pending for them was written (the gauge).
SINK_SUMMARY = text(
    "SELECT EXISTS (SELECT 1 FROM sequencer.outbox_subscriptions WHERE sink = :sink AND state = 1), "
    "(SELECT min(d.created_at) FROM sequencer.outbox_deliveries d "
    "  JOIN sequencer.outbox_subscriptions s ON s.id = d.subscription_id AND s.sink = :sink AND s.state = 1 "
    "  WHERE d.status = 1)"
)

# Deletes up to :batch finished deliveries written before :before (their attempts cascade).
SWEEP_FINISHED = text(
    "DELETE FROM sequencer.outbox_deliveries d USING ("
    "  SELECT id FROM sequencer.outbox_deliveries WHERE status <> 1 AND created_at < :before"
    "  ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED"
    ") f WHERE d.id = f.id"
)

SUBSCRIPTION_COLUMNS = (
    "id, sink, target, states, entity_type, description, state, created_by, created_at, failing_since, "
    "disabled_at, disabled_reason"
)
DELIVERY_COLUMNS = (
    "id, position, subscription_id, entity_type, entity_id, sequence, transaction_id, event_state, status, "
    "attempts, next_attempt_at, last_http_status, last_error, created_at, delivered_at"
)


async def claim(
    conn: AsyncConnection, *, sink: str, owner: str, now: dt.datetime, until: dt.datetime, limit: int
) -> list[Row[Any]]:
    params = {"sink": sink, "owner": owner, "now": now, "until": until, "limit": limit}
    return list((await conn.execute(CLAIM, params)).all())


async def release(conn: AsyncConnection, owner: str) -> int:
    return int((await conn.execute(RELEASE, {"owner": owner})).rowcount)


async def finish(
    conn: AsyncConnection,
    *,
    delivery_id: uuid.UUID,
    owner: str,
    at: dt.datetime,
    status: int,
    next_attempt_at: dt.datetime | None,
    http_status: int | None,
    error: str | None,
    latency: float,
) -> bool:
    """Records the attempt and its result; False when this replica's claim had run out."""
    await conn.execute(
        RECORD_ATTEMPT,
        {"id": delivery_id, "at": at, "http_status": http_status, "error": error, "latency": latency, "owner": owner},
    )
    params = {
        "id": delivery_id,
        "owner": owner,
        "at": at,
        "status": status,
        "next": next_attempt_at,
        "http_status": http_status,
        "error": error,
    }
    return (await conn.execute(FINISH, params)).first() is not None


async def mark_failing(conn: AsyncConnection, subscription_id: uuid.UUID, at: dt.datetime) -> dt.datetime | None:
    row = (await conn.execute(MARK_FAILING, {"id": subscription_id, "at": at})).first()
    return None if row is None else row[0]


async def mark_succeeding(conn: AsyncConnection, subscription_id: uuid.UUID) -> None:
    await conn.execute(MARK_SUCCEEDING, {"id": subscription_id})


async def disable(conn: AsyncConnection, subscription_id: uuid.UUID, at: dt.datetime, reason: str) -> tuple[int, int]:
    """(subscriptions disabled: 0 or 1, pending deliveries failed with it)."""
    row = (await conn.execute(DISABLE, {"id": subscription_id, "at": at, "reason": reason})).one()
    return int(row[0]), int(row[1])


async def sink_summary(conn: AsyncConnection, sink: str) -> tuple[bool, dt.datetime | None]:
    """(any active subscription, the oldest pending delivery's creation time)."""
    active, oldest = (await conn.execute(SINK_SUMMARY, {"sink": sink})).one()
    return bool(active), oldest if isinstance(oldest, dt.datetime) else None


async def sweep_finished(conn: AsyncConnection, before: dt.datetime, batch: int) -> int:
    return int((await conn.execute(SWEEP_FINISHED, {"before": before, "batch": batch})).rowcount)


# --- subscriptions and the admin reads -----------------------------------------------------------


async def insert_subscription(conn: AsyncConnection, **values: Any) -> Row[Any]:
    stmt = text(
        "INSERT INTO sequencer.outbox_subscriptions (id, sink, target, states, entity_type, description, state, "
        "  secret, created_by, created_at) "
        "VALUES (:id, :sink, :target, CAST(:states AS smallint[]), :entity_type, :description, 1, :secret, "
        f"  :created_by, :created_at) RETURNING {SUBSCRIPTION_COLUMNS}"
    )
    return (await conn.execute(stmt, values)).one()


async def list_subscriptions(
    conn: AsyncConnection, sink: str, after: tuple[dt.datetime, uuid.UUID] | None, limit: int
) -> list[Row[Any]]:
    """Newest first; `after` is the (created_at, id) of the last row of the previous page."""
    stmt = text(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM sequencer.outbox_subscriptions WHERE sink = :sink "
        "AND (CAST(:after_at AS timestamptz) IS NULL OR (created_at, id) < (:after_at, :after_id)) "
        "ORDER BY created_at DESC, id DESC LIMIT :limit"
    )
    params = {"sink": sink, "after_at": after[0] if after else None, "after_id": after[1] if after else None}
    return list((await conn.execute(stmt, {**params, "limit": limit})).all())


async def get_subscription(conn: AsyncConnection, sink: str, subscription_id: uuid.UUID) -> Row[Any] | None:
    stmt = text(f"SELECT {SUBSCRIPTION_COLUMNS} FROM sequencer.outbox_subscriptions WHERE id = :id AND sink = :sink")
    return (await conn.execute(stmt, {"id": subscription_id, "sink": sink})).first()


async def delete_subscription(conn: AsyncConnection, sink: str, subscription_id: uuid.UUID) -> bool:
    """Deletes it with its deliveries and attempts (ON DELETE CASCADE)."""
    stmt = text("DELETE FROM sequencer.outbox_subscriptions WHERE id = :id AND sink = :sink RETURNING id")
    return (await conn.execute(stmt, {"id": subscription_id, "sink": sink})).first() is not None


async def list_deliveries(
    conn: AsyncConnection, subscription_id: uuid.UUID, after: int | None, limit: int
) -> list[Row[Any]]:
    """Newest first (by position); `after` is the position of the last row of the previous page."""
    stmt = text(
        f"SELECT {DELIVERY_COLUMNS} FROM sequencer.outbox_deliveries WHERE subscription_id = :id "
        "AND (CAST(:after AS bigint) IS NULL OR position < :after) ORDER BY position DESC LIMIT :limit"
    )
    return list((await conn.execute(stmt, {"id": subscription_id, "after": after, "limit": limit})).all())


async def get_delivery(conn: AsyncConnection, sink: str, delivery_id: uuid.UUID) -> Row[Any] | None:
    stmt = text(
        f"SELECT d.{DELIVERY_COLUMNS.replace(', ', ', d.')}, s.state AS subscription_state "
        "FROM sequencer.outbox_deliveries d JOIN sequencer.outbox_subscriptions s ON s.id = d.subscription_id "
        "WHERE d.id = :id AND s.sink = :sink"
    )
    return (await conn.execute(stmt, {"id": delivery_id, "sink": sink})).first()


async def redeliver(conn: AsyncConnection, delivery_id: uuid.UUID, now: dt.datetime) -> Row[Any] | None:
    """Pending again, due now, its retry schedule restarted (its attempts so far are kept). A
    delivery in flight keeps its claim, so it is never sent twice at once."""
    stmt = text(
        "UPDATE sequencer.outbox_deliveries SET status = 1, step = 0, next_attempt_at = :now, delivered_at = NULL "
        f"WHERE id = :id RETURNING {DELIVERY_COLUMNS}"
    )
    return (await conn.execute(stmt, {"id": delivery_id, "now": now})).first()


def page_rows(rows: Sequence[Row[Any]], size: int) -> tuple[Sequence[Row[Any]], Row[Any] | None]:
    """The page, and its last row when another page follows."""
    return rows[:size], (rows[size - 1] if len(rows) > size else None)
