"""The concurrency-critical SQL of the ledger, named, each with why it is written this way.

A transaction (one ApplyEvent, a whole ApplyEvents batch, or with the row lock strategy one
entity's items of a batch) is, in order: BEGIN, the locks of all its entities (sorted, one
statement), one read of everything its items need (LOAD_HEADS), the decisions in Python, one
statement that writes every new state, moves every version by compare-and-set and appends every
history row (record_events), COMMIT: three statements whatever the number of items. The read is
a statement of its own after the locks: in READ COMMITTED a statement that waits for a lock
keeps the snapshot it took before the wait, so a read folded into the lock statement could miss
the commit of the transaction it waited for.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from sqlalchemy import Table, TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.models import entity_history, inventory_balances, inventory_reservations, shipments

# Serialises all work on one entity for the rest of the transaction. Transaction-scoped, so a
# dropped connection cannot leave it held; the namespace keeps it apart from the sequencer's.
ADVISORY_LOCK: Final = text(
    "SELECT pg_advisory_xact_lock(hashtextextended('ledger:' || :entity_type || ':' || :entity_id, 0))"
)

# The same locks for every entity of an ApplyEvents batch, in one round trip and in the order
# given (sorted by the caller), so two batches over the same entities never wait on each other in
# a cycle. The key text is ADVISORY_LOCK's, so a batch and a single ApplyEvent exclude each other.
# ORDER BY the ordinality: PostgreSQL evaluates a volatile select list after the sort.
ADVISORY_LOCKS: Final = text(
    "SELECT pg_advisory_xact_lock(hashtextextended('ledger:' || k.entity_type || ':' || k.entity_id, 0)) "
    "FROM unnest(CAST(:entity_types AS text[]), CAST(:entity_ids AS text[])) WITH ORDINALITY "
    "AS k(entity_type, entity_id, n) ORDER BY k.n"
)

# The "row" strategy (Citus: advisory locks are node-local): make sure the version row exists so
# there is something to lock. A concurrent insert of the same key waits for the first to finish.
ENSURE_VERSION_ROW: Final = text(
    "INSERT INTO ledger.entity_versions (entity_type, entity_id, version, updated_at) "
    "VALUES (:entity_type, :entity_id, 0, now()) ON CONFLICT (entity_type, entity_id) DO NOTHING"
)

# Then lock it, in a statement of its own (this one's snapshot is taken after the insert above
# finished waiting): every writer of the entity queues here until the holder commits.
LOCK_VERSION_ROW: Final = text(
    "SELECT version FROM ledger.entity_versions WHERE entity_type = :entity_type AND entity_id = :entity_id FOR UPDATE"
)

# --- the write path: one read and one write per transaction, whatever the number of items ------
# The rows of a batch go as one JSON array per table (jsonb_populate_recordset, typed by the
# table itself): one parameter per table instead of one array per column, which psycopg would
# dump element by element in Python (a fifth of the ledger's CPU per batch when measured).


def _rows(table: Table, param: str, alias: str) -> str:
    """`jsonb_populate_recordset(NULL::<table>, :param) AS <alias>`: the rows of a JSON array
    of objects, each key a column of `table` (a missing key is NULL)."""
    return f"jsonb_populate_recordset(NULL::{table.fullname}, CAST(:{param} AS jsonb)) AS {alias}"


def _columns(table: Table, alias: str = "") -> str:
    return ", ".join(f"{alias}{name}" for name in table.c.keys())  # noqa: SIM118 - names, not Columns


# What every item of a transaction is checked against, read in one statement after the locks:
# its entity's version (0 if never seen), the history row of its MSI if that was processed
# already (a re-send or a conflict), and the state its rule needs: the shipment's row, or the
# item's balances (at most two locations per command) and reservation with the balance at the
# reservation's location. One row per item, in item order (:items carries each item's
# position n); NULLs where a row does not exist. Items of one entity repeat its rows: the
# service merges them and lets item k+1 see item k's effect in memory.
# Each lookup is a LATERAL primary-key probe with LIMIT 1, which the planner cannot flatten
# into a join: it knows nothing of the JSON's length (it assumes 100 rows), and as joins it
# planned hash joins over whole tables (the history too) for a single item, and spent ~3 ms
# planning an eight-way join.
LOAD_HEADS: Final = text(
    "SELECT COALESCE(v.version, 0) AS version, h.sequence AS processed_sequence, h.kind, h.outcome, h.reason, "
    "h.reason_detail, h.correlation_id, h.transaction_id, h.source, h.occurred_at, h.processed_at, h.payload_hash, "
    f"{_columns(shipments, 's.')}, "
    "r.location AS reservation_location, r.quantity AS reservation_quantity, "
    "r.released_at IS NOT NULL AS reservation_released, "
    "b1.on_hand AS on_hand_1, b1.reserved AS reserved_1, b2.on_hand AS on_hand_2, b2.reserved AS reserved_2, "
    "br.on_hand AS reservation_on_hand, br.reserved AS reservation_reserved "
    "FROM jsonb_to_recordset(CAST(:items AS jsonb)) AS k(n integer, entity_type smallint, entity_id text, "
    "sequence bigint, location_1 text, location_2 text, reservation_id text) "
    "LEFT JOIN LATERAL (SELECT * FROM ledger.entity_versions v "
    "WHERE v.entity_type = k.entity_type AND v.entity_id = k.entity_id LIMIT 1) v ON true "
    "LEFT JOIN LATERAL (SELECT * FROM ledger.entity_history h "
    "WHERE h.entity_type = k.entity_type AND h.entity_id = k.entity_id AND h.sequence = k.sequence LIMIT 1) h ON true "
    "LEFT JOIN LATERAL (SELECT * FROM ledger.shipments s "
    "WHERE k.entity_type = 1 AND s.shipment_id = k.entity_id LIMIT 1) s ON true "
    "LEFT JOIN LATERAL (SELECT * FROM ledger.inventory_reservations r "
    "WHERE k.entity_type = 2 AND r.sku = k.entity_id AND r.reservation_id = k.reservation_id LIMIT 1) r ON true "
    "LEFT JOIN LATERAL (SELECT * FROM ledger.inventory_balances b "
    "WHERE k.entity_type = 2 AND b.sku = k.entity_id AND b.location = k.location_1 LIMIT 1) b1 ON true "
    "LEFT JOIN LATERAL (SELECT * FROM ledger.inventory_balances b "
    "WHERE k.entity_type = 2 AND b.sku = k.entity_id AND b.location = k.location_2 LIMIT 1) b2 ON true "
    "LEFT JOIN LATERAL (SELECT * FROM ledger.inventory_balances b "
    "WHERE b.sku = r.sku AND b.location = r.location LIMIT 1) br ON true "
    "ORDER BY k.n"
)

# The compare-and-set of every entity the transaction moves, and the history rows: each version
# moves from its `expected` (read under the lock) to its last new MSI, by an UPDATE of an
# existing row or the INSERT of a new one, and the history rows are inserted only for the
# entities whose CAS matched. Under the locks every CAS matches; if one does not (a writer
# without the lock), `advanced` counts fewer entities than were sent and the service rolls the
# transaction back instead of overwriting. Each row is written at most once per statement (the
# service sends each entity's and each row's final value): the parts of one statement share a
# snapshot and cannot see each other's writes.
_ADVANCE_AND_RECORD: Final = (
    "moves AS (SELECT * FROM jsonb_to_recordset(CAST(:moves AS jsonb)) "
    "AS m(entity_type smallint, entity_id text, expected bigint, version bigint, updated_at timestamptz)), "
    "moved AS (UPDATE ledger.entity_versions AS v SET version = m.version, updated_at = m.updated_at FROM moves m "
    "WHERE v.entity_type = m.entity_type AND v.entity_id = m.entity_id AND v.version = m.expected "
    "RETURNING v.entity_type, v.entity_id), "
    "created AS (INSERT INTO ledger.entity_versions AS v (entity_type, entity_id, version, updated_at) "
    "SELECT m.entity_type, m.entity_id, m.version, m.updated_at FROM moves m WHERE m.expected = 0 AND NOT EXISTS "
    "(SELECT FROM ledger.entity_versions e WHERE e.entity_type = m.entity_type AND e.entity_id = m.entity_id) "
    "ON CONFLICT (entity_type, entity_id) DO NOTHING RETURNING v.entity_type, v.entity_id), "
    "advanced AS (SELECT entity_type, entity_id FROM moved UNION ALL SELECT entity_type, entity_id FROM created), "
    f"recorded AS (INSERT INTO ledger.entity_history ({_columns(entity_history)}) "
    f"SELECT {_columns(entity_history, 'h.')} FROM {_rows(entity_history, 'history', 'h')} "
    "WHERE (h.entity_type, h.entity_id) IN (SELECT entity_type, entity_id FROM advanced) RETURNING 1) "
    "SELECT (SELECT count(*) FROM advanced) AS advanced, (SELECT count(*) FROM recorded) AS recorded"
)

# State writes that go in front of the compare-and-set, as parts of the same statement, one row
# per shipment, balance or reservation with its final value. They run whether or not the CAS
# matches; when it does not, the transaction rolls back, taking them with it. The key and the
# creation time of a shipment never change.
_SHIPMENT_UPDATES: Final = [c for c in shipments.c.keys() if c not in ("shipment_id", "created_at")]  # noqa: SIM118
UPSERT_SHIPMENTS: Final = (
    f"INSERT INTO ledger.shipments ({_columns(shipments)}) "
    f"SELECT {_columns(shipments, 's.')} FROM {_rows(shipments, 'shipments', 's')} "
    "ON CONFLICT (shipment_id) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in _SHIPMENT_UPDATES)
)

UPSERT_BALANCES: Final = (
    f"INSERT INTO ledger.inventory_balances ({_columns(inventory_balances)}) "
    f"SELECT {_columns(inventory_balances, 'b.')} FROM {_rows(inventory_balances, 'balances', 'b')} "
    "ON CONFLICT (sku, location) DO UPDATE "
    "SET on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved, updated_at = EXCLUDED.updated_at"
)

# Reservations opened by the transaction (released too, if a later item released them).
OPEN_RESERVATIONS: Final = (
    f"INSERT INTO ledger.inventory_reservations ({_columns(inventory_reservations)}) "
    f"SELECT {_columns(inventory_reservations, 'o.')} FROM {_rows(inventory_reservations, 'opened', 'o')}"
)

# Reservations opened before the transaction and released by it (rows of sku, reservation_id
# and released_at).
RELEASE_RESERVATIONS: Final = (
    "UPDATE ledger.inventory_reservations AS r SET released_at = k.released_at "
    f"FROM {_rows(inventory_reservations, 'released', 'k')} "
    "WHERE r.sku = k.sku AND r.reservation_id = k.reservation_id"
)


@functools.cache
def record_events(writes: tuple[str, ...] = ()) -> TextClause:
    """The state writes (some of the four above), every compare-and-set and every history row
    of a transaction, as one statement: one round trip for the whole change."""
    parts = [f"w{i} AS ({sql})" for i, sql in enumerate(writes)]
    return text("WITH " + ", ".join([*parts, _ADVANCE_AND_RECORD]))


LOCK_STRATEGIES: Final = ("advisory", "row")


async def lock_entity(conn: AsyncConnection, entity_type: int, entity_id: str, strategy: str) -> None:
    """Takes the per-entity lock that every state change of the entity holds (one helper, two
    strategies, so moving to Citus is a setting)."""
    params = {"entity_type": int(entity_type), "entity_id": entity_id}
    if strategy == "advisory":
        await conn.execute(ADVISORY_LOCK, {"entity_type": str(int(entity_type)), "entity_id": entity_id})
    elif strategy == "row":
        await conn.execute(ENSURE_VERSION_ROW, params)
        await conn.execute(LOCK_VERSION_ROW, params)
    else:
        raise ValueError(f"unknown lock strategy {strategy!r}")


async def lock_entities(conn: AsyncConnection, entities: Sequence[tuple[int, str]], strategy: str) -> None:
    """Takes the per-entity locks of several entities, in the order given; the caller sorts
    them, so concurrent batches agree on the order and cannot deadlock."""
    if len(entities) == 1:
        await lock_entity(conn, *entities[0], strategy)
    elif strategy == "advisory":
        params = {"entity_types": [str(int(t)) for t, _ in entities], "entity_ids": [i for _, i in entities]}
        await conn.execute(ADVISORY_LOCKS, params)
    else:
        # lock_entity's two statements per entity (make sure the row exists, then lock it).
        for entity_type, entity_id in entities:
            await lock_entity(conn, entity_type, entity_id, strategy)
