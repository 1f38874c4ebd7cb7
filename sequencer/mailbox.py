"""The statements that hold events in the durable mailbox: the ingress batch's, and an
operator's skip (skips.py runs the same two through SQLAlchemy's driver-level execution).

Statements only: no rules and no commits (the callers own the transaction). Two statements per
batch, however large: the locks with the reads, then every write; set-based (arrays in, `unnest`
in SQL) and prepared on first use. Raw psycopg rather than SQLAlchemy on the ingress path: see
docs/ingress.md for the figures behind that choice.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from sequencer import hints
from sequencer.idempotency import StoredAnswer
from sequencer.repository import EntityKey
from sequencer.rules import Entity, HeldEvent

# Every lock of the batch, in one sorted order (keys, then entities), and what the rules need,
# read after them (sequencer/sql/lock_submissions_v3.sql): one statement.
LOCK_SUBMISSIONS = (
    "SELECT * FROM sequencer.lock_submissions_v3(%(callers)s::text[], %(keys)s::text[], %(types)s::smallint[], "
    "%(ids)s::text[], %(seqs)s::bigint[], %(row_lock)s, %(lock_timeout)s, %(now)s)"
)

# Everything a batch writes, in one statement: the held events, the answers (an expired record
# of a key is replaced; a live one cannot exist under the key's lock, and the count of stored
# answers proves it), the parked counts, the gap rows (a gap that stays keeps its first-seen
# time, so its age keeps counting; a new one starts again) and the batch's one NOTIFY.
WRITE_BATCH = (
    "WITH held AS ("
    "  INSERT INTO sequencer.events (entity_type, entity_id, sequence, transaction_id, state, event, payload_hash,"
    "    correlation_id, caller_id, idempotency_key, skip_reason, traceparent, accepted_at, queued_at)"
    "  SELECT t, i, s, x, st, ev, h, c, cl, k, sk, tp, %(now)s, CASE WHEN st = %(queued)s THEN %(now)s END"
    "  FROM unnest(%(types)s::smallint[], %(ids)s::text[], %(seqs)s::bigint[], %(txs)s::uuid[],"
    "    %(states)s::smallint[], %(events)s::bytea[], %(hashes)s::bytea[], %(correlations)s::text[],"
    "    %(callers)s::text[], %(keys)s::text[], %(skips)s::text[], %(traceparents)s::text[])"
    "    AS u(t, i, s, x, st, ev, h, c, cl, k, sk, tp)"
    "), answered AS ("
    "  INSERT INTO sequencer.idempotency_keys AS k (caller_id, idempotency_key, method, fingerprint, request,"
    "    status_code, response, transaction_id, created_at, expires_at)"
    "  SELECT c, k, %(method)s, f, r, 0, a, x, %(now)s, %(expires_at)s"
    "  FROM unnest(%(answer_callers)s::text[], %(answer_keys)s::text[], %(fingerprints)s::bytea[],"
    "    %(requests)s::bytea[], %(responses)s::bytea[], %(answer_txs)s::uuid[]) AS u(c, k, f, r, a, x)"
    "  ON CONFLICT (caller_id, idempotency_key) DO UPDATE SET method = excluded.method,"
    "    fingerprint = excluded.fingerprint, request = excluded.request, status_code = excluded.status_code,"
    "    response = excluded.response, transaction_id = excluded.transaction_id, created_at = excluded.created_at,"
    "    expires_at = excluded.expires_at WHERE k.expires_at <= excluded.created_at"
    "  RETURNING 1"
    "), parked AS ("
    "  UPDATE sequencer.entities e SET parked_count = e.parked_count + u.n, updated_at = %(now)s"
    "  FROM unnest(%(parked_types)s::smallint[], %(parked_ids)s::text[], %(parked_counts)s::integer[]) AS u(t, i, n)"
    "  WHERE e.entity_type = u.t AND e.entity_id = u.i"
    "), put_gaps AS ("
    "  INSERT INTO sequencer.gaps AS g (entity_type, entity_id, awaiting_sequence, first_seen_at)"
    "  SELECT t, i, a, %(now)s FROM unnest(%(gap_types)s::smallint[], %(gap_ids)s::text[],"
    "    %(gap_awaiting)s::bigint[]) AS u(t, i, a)"
    "  ON CONFLICT (entity_type, entity_id) DO UPDATE SET awaiting_sequence = excluded.awaiting_sequence,"
    "    first_seen_at = excluded.first_seen_at, alerted_at = NULL"
    "  WHERE g.awaiting_sequence <> excluded.awaiting_sequence"
    "), cleared_gaps AS ("
    "  DELETE FROM sequencer.gaps g USING unnest(%(closed_types)s::smallint[], %(closed_ids)s::text[]) AS u(t, i)"
    "  WHERE g.entity_type = u.t AND g.entity_id = u.i"
    ") "
    "SELECT (SELECT count(*) FROM answered), "
    "(SELECT pg_notify(%(channel)s, %(payload)s::text) WHERE %(payload)s::text IS NOT NULL)"
)


# The events columns a batch writes, in Writes.hold's order.
EVENT_COLUMNS = (
    "types",
    "ids",
    "seqs",
    "txs",
    "states",
    "events",
    "hashes",
    "correlations",
    "callers",
    "keys",
    "skips",
    "traceparents",
)


class StoreDrift(RuntimeError):
    """A write found the mailbox other than the rules saw it under the locks: a bug, never a
    caller's fault."""


@dataclass
class Snapshot:
    """What the batch's rules decide on, read under its locks."""

    entities: dict[EntityKey, Entity]
    records: dict[tuple[str, str], StoredAnswer]


@dataclass
class Writes:
    """Everything a batch writes, column by column."""

    events: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in EVENT_COLUMNS})
    answers: dict[str, list[Any]] = field(
        default_factory=lambda: {k: [] for k in ("callers", "keys", "fingerprints", "requests", "responses", "txs")}
    )
    parked: dict[EntityKey, int] = field(default_factory=dict)
    changes: list[hints.Change] = field(default_factory=list)

    def hold(
        self,
        entity: EntityKey,
        sequence: int,
        transaction_id: uuid.UUID,
        state: int,
        event: bytes,
        payload_hash: bytes,
        correlation_id: str,
        caller: str,
        key: str,
        skip_reason: str | None = None,
        traceparent: str | None = None,
    ) -> None:
        """An events row: a submitted event, or an operator's skip marker (with its reason)."""
        row = (
            entity[0], entity[1], sequence, transaction_id, state, event, payload_hash, correlation_id, caller, key,
            skip_reason, traceparent or None,
        )  # fmt: skip
        for column, value in zip(self.events, row, strict=True):
            self.events[column].append(value)
        self.changes.append(hints.Change(entity[0], entity[1], state))

    def answer(
        self, caller: str, key: str, fingerprint: bytes, request: bytes, response: bytes, tx: uuid.UUID | None
    ) -> None:
        for column, value in zip(self.answers, (caller, key, fingerprint, request, response, tx), strict=True):
            self.answers[column].append(value)


def lock_timeout(seconds: float | None) -> str:
    """A remaining deadline as the lock step's lock_timeout ('0': no bound)."""
    return "0" if seconds is None else f"{max(1, int(seconds * 1000))}ms"


def lock_params(
    *,
    keys: list[tuple[str, str]],
    submitted: list[tuple[int, str, int]],
    row_lock: bool,
    lock_timeout: str,
    now: dt.datetime,
) -> dict[str, Any]:
    """LOCK_SUBMISSIONS' parameters: the batch's keys and its submitted (entity, MSI)s."""
    return {
        "callers": [c for c, _ in keys],
        "keys": [k for _, k in keys],
        "types": [t for t, _, _ in submitted],
        "ids": [i for _, i, _ in submitted],
        "seqs": [s for _, _, s in submitted],
        "row_lock": row_lock,
        "lock_timeout": lock_timeout,
        "now": now,
    }


def snapshot(rows: Sequence[Sequence[Any]]) -> Snapshot:
    """LOCK_SUBMISSIONS' rows as what the rules decide on."""
    entities: dict[EntityKey, Entity] = {}
    answers: dict[tuple[str, str], StoredAnswer] = {}
    for kind, t, i, s, watermark, parked, x, h, skip, state, c, k, m, f, r, a, created, expires in rows:
        if kind == "entity":
            entities[(int(t), str(i))] = Entity(int(watermark), int(parked))
        elif kind == "held":
            entities[(int(t), str(i))].held[int(s)] = HeldEvent(int(s), x, bytes(h), skip, int(state))
        else:
            answers[(c, k)] = StoredAnswer(m, bytes(f), bytes(r), bytes(a), created, expires)
    return Snapshot(entities, answers)


def write_params(
    writes: Writes,
    entities: dict[EntityKey, Entity],
    *,
    method: str,
    now: dt.datetime,
    expires_at: dt.datetime,
    queued_state: int,
    origin: str,
) -> dict[str, Any]:
    """WRITE_BATCH's parameters: the batch's events, answers, parked counts, the gap rows of
    the entities whose held events changed (rules.Entity.gap, the gap rule's one home) and its
    one wake-up."""
    changed = [(k, e.gap()) for k, e in entities.items() if e.changed]
    gaps = [(k, g) for k, g in changed if g is not None]
    closed = [k for k, g in changed if g is None]
    parked = list(writes.parked.items())
    return {
        **writes.events,
        "answer_callers": writes.answers["callers"],
        "answer_keys": writes.answers["keys"],
        "fingerprints": writes.answers["fingerprints"],
        "requests": writes.answers["requests"],
        "responses": writes.answers["responses"],
        "answer_txs": writes.answers["txs"],
        "parked_types": [k[0] for k, _ in parked],
        "parked_ids": [k[1] for k, _ in parked],
        "parked_counts": [n for _, n in parked],
        "gap_types": [k[0] for k, _ in gaps],
        "gap_ids": [k[1] for k, _ in gaps],
        "gap_awaiting": [g for _, g in gaps],
        "closed_types": [k[0] for k in closed],
        "closed_ids": [k[1] for k in closed],
        "channel": hints.CHANNEL,
        "payload": hints.encode(origin, writes.changes) if writes.changes else None,
        "method": method,
        "now": now,
        "expires_at": expires_at,
        "queued": queued_state,
    }


def check_written(row: Sequence[Any] | None, writes: Writes) -> None:
    """WRITE_BATCH stored exactly the batch's answers."""
    if row is None or row[0] != len(writes.answers["keys"]):
        # The key lock makes this unreachable; the primary key is the rule's backstop.
        raise StoreDrift("an idempotency record already exists for a key held under its lock")


async def lock_and_read(conn: psycopg.AsyncConnection[Any], **params: Any) -> Snapshot:
    """Takes the batch's locks and reads what its rules need, in one statement."""
    rows = await (await conn.execute(LOCK_SUBMISSIONS, lock_params(**params), prepare=True)).fetchall()
    return snapshot(rows)


async def write(
    conn: psycopg.AsyncConnection[Any], writes: Writes, entities: dict[EntityKey, Entity], **params: Any
) -> None:
    """Writes the batch's events, answers, parked counts and gaps, and its one wake-up."""
    row = await (await conn.execute(WRITE_BATCH, write_params(writes, entities, **params), prepare=True)).fetchone()
    check_written(row, writes)
