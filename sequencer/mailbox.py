"""The ingress batch's statements over the durable mailbox, on a raw psycopg connection.

Statements only: no rules and no commits (ingress.py owns the transaction). Every statement is
set-based (one call per batch, arrays in, `unnest` in SQL) and prepared on first use. Raw
psycopg rather than SQLAlchemy here: this path runs a few statements per batch of hundreds of
submissions in pipeline mode (two round trips per batch), and SQLAlchemy's per-statement cost
and lack of pipelining would be most of the work.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from sequencer import hints
from sequencer.idempotency import StoredAnswer
from sequencer.rules import Entity, HeldEvent

EntityKey = tuple[int, str]

# Every lock of the batch, in one sorted order (keys, then entities), and the entities'
# bookkeeping read after them (sequencer/sql/lock_submissions_v2.sql).
LOCK_SUBMISSIONS = (
    "SELECT entity_type, entity_id, watermark, parked_count FROM sequencer.lock_submissions_v2("
    "%(callers)s::text[], %(keys)s::text[], %(types)s::smallint[], %(ids)s::text[], %(row_lock)s, "
    "%(lock_timeout)s, %(now)s)"
)

# The live records of the batch's keys (read after their locks: a first execution that
# committed while we waited is seen).
KEY_RECORDS = (
    "SELECT k.caller_id, k.idempotency_key, k.method, k.fingerprint, k.request, k.response, k.created_at, "
    "k.expires_at FROM sequencer.idempotency_keys k "
    "JOIN unnest(%(callers)s::text[], %(keys)s::text[]) AS u(c, k) ON k.caller_id = u.c AND k.idempotency_key = u.k "
    "WHERE k.expires_at > %(now)s"
)

# What the rules need of each entity: every row above its watermark (held: parked or queued,
# bounded by the parked limit), and the rows at the submitted MSIs at or below it.
HELD_EVENTS = (
    "SELECT e.entity_type, e.entity_id, e.sequence, e.transaction_id, e.payload_hash, e.skip_reason "
    "FROM sequencer.events e "
    "JOIN (SELECT DISTINCT t, i FROM unnest(%(types)s::smallint[], %(ids)s::text[]) AS u(t, i)) w "
    "  ON e.entity_type = w.t AND e.entity_id = w.i "
    "JOIN sequencer.entities x ON x.entity_type = e.entity_type AND x.entity_id = e.entity_id "
    "WHERE e.sequence > x.watermark "
    "UNION ALL "
    "SELECT e.entity_type, e.entity_id, e.sequence, e.transaction_id, e.payload_hash, e.skip_reason "
    "FROM sequencer.events e "
    "JOIN unnest(%(types)s::smallint[], %(ids)s::text[], %(seqs)s::bigint[]) AS u(t, i, s) "
    "  ON e.entity_type = u.t AND e.entity_id = u.i AND e.sequence = u.s "
    "JOIN sequencer.entities x ON x.entity_type = e.entity_type AND x.entity_id = e.entity_id "
    "WHERE e.sequence <= x.watermark"
)

INSERT_EVENTS = (
    "INSERT INTO sequencer.events (entity_type, entity_id, sequence, transaction_id, state, event, payload_hash, "
    "correlation_id, caller_id, idempotency_key, accepted_at, queued_at) "
    "SELECT t, i, s, x, st, ev, h, c, cl, k, %(now)s, CASE WHEN st = %(queued)s THEN %(now)s END "
    "FROM unnest(%(types)s::smallint[], %(ids)s::text[], %(seqs)s::bigint[], %(txs)s::uuid[], "
    "%(states)s::smallint[], %(events)s::bytea[], %(hashes)s::bytea[], %(correlations)s::text[], "
    "%(callers)s::text[], %(keys)s::text[]) AS u(t, i, s, x, st, ev, h, c, cl, k)"
)

# The first executions' answers; an expired record of the same key is replaced. A live one
# cannot exist under the key's lock: the row count proves it.
STORE_ANSWERS = (
    "INSERT INTO sequencer.idempotency_keys AS k (caller_id, idempotency_key, method, fingerprint, request, "
    "status_code, response, transaction_id, created_at, expires_at) "
    "SELECT c, k, %(method)s, f, r, 0, a, x, %(now)s, %(expires_at)s "
    "FROM unnest(%(callers)s::text[], %(keys)s::text[], %(fingerprints)s::bytea[], %(requests)s::bytea[], "
    "%(responses)s::bytea[], %(txs)s::uuid[]) AS u(c, k, f, r, a, x) "
    "ON CONFLICT (caller_id, idempotency_key) DO UPDATE SET method = excluded.method, "
    "fingerprint = excluded.fingerprint, request = excluded.request, status_code = excluded.status_code, "
    "response = excluded.response, transaction_id = excluded.transaction_id, created_at = excluded.created_at, "
    "expires_at = excluded.expires_at WHERE k.expires_at <= excluded.created_at"
)

ADD_PARKED = (
    "UPDATE sequencer.entities e SET parked_count = e.parked_count + u.n, updated_at = %(now)s "
    "FROM unnest(%(types)s::smallint[], %(ids)s::text[], %(counts)s::integer[]) AS u(t, i, n) "
    "WHERE e.entity_type = u.t AND e.entity_id = u.i"
)

# A gap row says what its entity misses now; a gap that stays keeps its first-seen time (its
# age keeps counting), a new one starts again.
PUT_GAPS = (
    "INSERT INTO sequencer.gaps AS g (entity_type, entity_id, awaiting_sequence, first_seen_at) "
    "SELECT t, i, a, %(now)s FROM unnest(%(types)s::smallint[], %(ids)s::text[], %(awaiting)s::bigint[]) "
    "AS u(t, i, a) "
    "ON CONFLICT (entity_type, entity_id) DO UPDATE SET awaiting_sequence = excluded.awaiting_sequence, "
    "first_seen_at = excluded.first_seen_at, alerted_at = NULL "
    "WHERE g.awaiting_sequence <> excluded.awaiting_sequence"
)

CLEAR_GAPS = (
    "DELETE FROM sequencer.gaps g USING unnest(%(types)s::smallint[], %(ids)s::text[]) AS u(t, i) "
    "WHERE g.entity_type = u.t AND g.entity_id = u.i"
)

NOTIFY = "SELECT pg_notify(%(channel)s, %(payload)s)"


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

    events: dict[str, list[Any]] = field(
        default_factory=lambda: {
            k: []
            for k in ("types", "ids", "seqs", "txs", "states", "events", "hashes", "correlations", "callers", "keys")
        }
    )
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
    ) -> None:
        row = (entity[0], entity[1], sequence, transaction_id, state, event, payload_hash, correlation_id, caller, key)
        for column, value in zip(self.events, row, strict=True):
            self.events[column].append(value)
        self.changes.append(hints.Change(entity[0], entity[1], state))

    def answer(
        self, caller: str, key: str, fingerprint: bytes, request: bytes, response: bytes, tx: uuid.UUID | None
    ) -> None:
        for column, value in zip(self.answers, (caller, key, fingerprint, request, response, tx), strict=True):
            self.answers[column].append(value)


async def lock_and_read(
    conn: psycopg.AsyncConnection[Any],
    *,
    keys: list[tuple[str, str]],
    submitted: list[tuple[int, str, int]],
    row_lock: bool,
    lock_timeout: str,
    now: dt.datetime,
) -> Snapshot:
    """Takes the batch's locks and reads what its rules need (one round trip, pipelined)."""
    key_params = {"callers": [c for c, _ in keys], "keys": [k for _, k in keys], "now": now}
    entity_params = {
        "types": [t for t, _, _ in submitted],
        "ids": [i for _, i, _ in submitted],
        "seqs": [s for _, _, s in submitted],
    }
    async with conn.pipeline():
        locked = await conn.execute(
            LOCK_SUBMISSIONS,
            {**key_params, **entity_params, "row_lock": row_lock, "lock_timeout": lock_timeout},
            prepare=True,
        )
        records = await conn.execute(KEY_RECORDS, key_params, prepare=True)
        held = await conn.execute(HELD_EVENTS, entity_params, prepare=True)
        entities = {(int(t), str(i)): Entity(int(w), int(p)) for t, i, w, p in await locked.fetchall()}
        answers = {
            (c, k): StoredAnswer(m, bytes(f), bytes(r), bytes(a), created, expires)
            for c, k, m, f, r, a, created, expires in await records.fetchall()
        }
        for t, i, s, x, h, skip in await held.fetchall():
            entities[(int(t), str(i))].held[int(s)] = HeldEvent(int(s), x, bytes(h), skip)
    return Snapshot(entities, answers)


async def write(
    conn: psycopg.AsyncConnection[Any],
    writes: Writes,
    entities: dict[EntityKey, Entity],
    *,
    method: str,
    now: dt.datetime,
    expires_at: dt.datetime,
    queued_state: int,
    origin: str,
) -> None:
    """Writes the batch's events, answers, parked counts and gaps, and its one wake-up."""
    changed = [(k, e.gap()) for k, e in entities.items() if e.changed]
    gaps = [(k, g) for k, g in changed if g is not None]
    closed = [k for k, g in changed if g is None]
    async with conn.pipeline():
        stored = None
        if writes.events["seqs"]:
            await conn.execute(INSERT_EVENTS, {**writes.events, "now": now, "queued": queued_state}, prepare=True)
        if writes.answers["keys"]:
            stored = await conn.execute(
                STORE_ANSWERS, {**writes.answers, "method": method, "now": now, "expires_at": expires_at}, prepare=True
            )
        if writes.parked:
            parked = list(writes.parked.items())
            await conn.execute(
                ADD_PARKED,
                {
                    "types": [k[0] for k, _ in parked],
                    "ids": [k[1] for k, _ in parked],
                    "counts": [n for _, n in parked],
                    "now": now,
                },
                prepare=True,
            )
        if gaps:
            await conn.execute(
                PUT_GAPS,
                {
                    "types": [k[0] for k, _ in gaps],
                    "ids": [k[1] for k, _ in gaps],
                    "awaiting": [g for _, g in gaps],
                    "now": now,
                },
                prepare=True,
            )
        if closed:
            await conn.execute(
                CLEAR_GAPS, {"types": [k[0] for k in closed], "ids": [k[1] for k in closed]}, prepare=True
            )
        if writes.changes:
            await conn.execute(
                NOTIFY, {"channel": hints.CHANNEL, "payload": hints.encode(origin, writes.changes)}, prepare=True
            )
    if stored is not None and stored.rowcount != len(writes.answers["keys"]):
        # The key lock makes this unreachable; the primary key is the rule's backstop.
        raise StoreDrift("an idempotency record already exists for a key held under its lock")
