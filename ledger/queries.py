"""The concurrency-critical SQL of the ledger, named, each with why it is written this way.

One ApplyEvent is, in order: BEGIN, the entity lock, one read of everything the event needs,
one statement that writes the new state (if the rule accepts), moves the version by
compare-and-set and appends the history row, COMMIT. An ApplyEvents batch takes the locks of
all its entities first (sorted, one statement), then does the read and the write of each event
in request order. The read is a statement of its own after
the lock: in READ COMMITTED a statement that waits for a lock keeps the snapshot it took before
the wait, so a read folded into the lock statement could miss the commit of the transaction it
waited for.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.models import shipments

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

# What every event needs to know, read under the lock: the entity's version (0 if never seen)
# and the history row of this MSI if it was processed already (a re-send or a conflict). The
# one-row `one` makes the answer exactly one row whether or not either row exists.
_HEAD_COLUMNS = (
    "COALESCE(v.version, 0) AS version, h.sequence AS processed_sequence, h.kind, h.outcome, h.reason, "
    "h.reason_detail, h.correlation_id, h.transaction_id, h.source, h.occurred_at, h.processed_at, h.payload_hash"
)
_HEAD_FROM = (
    "FROM (SELECT 1) AS one "
    "LEFT JOIN ledger.entity_versions v ON v.entity_type = :entity_type AND v.entity_id = :entity_id "
    "LEFT JOIN ledger.entity_history h "
    "ON h.entity_type = :entity_type AND h.entity_id = :entity_id AND h.sequence = :sequence"
)

# A skip changes no state: the head alone.
LOAD_HEAD: Final = text(f"SELECT {_HEAD_COLUMNS} {_HEAD_FROM}")

# The head plus the shipment's row (NULLs for a shipment not created yet), in the same read.
LOAD_SHIPMENT_HEAD: Final = text(
    f"SELECT {_HEAD_COLUMNS}, {', '.join(f's.{c.name}' for c in shipments.c)} {_HEAD_FROM} "
    "LEFT JOIN ledger.shipments s ON s.shipment_id = :entity_id"
)

# The head plus the part of the item the command touches: the reservation (if named) and the
# balances of :locations and of the reservation's location; one row per balance found, at
# least one row.
LOAD_INVENTORY_HEAD: Final = text(
    f"SELECT {_HEAD_COLUMNS}, r.location AS reservation_location, r.quantity AS reservation_quantity, "
    "r.released_at IS NOT NULL AS reservation_released, b.location, b.on_hand, b.reserved "
    f"{_HEAD_FROM} "
    "LEFT JOIN ledger.inventory_reservations r ON r.sku = :entity_id AND r.reservation_id = :reservation_id "
    "LEFT JOIN ledger.inventory_balances b "
    "ON b.sku = :entity_id AND (b.location = ANY(CAST(:locations AS text[])) OR b.location = r.location)"
)

# The compare-and-set and the history row: the version moves from :expected to :sequence and
# nothing else, and the history row is inserted only from the CAS's RETURNING. Under the entity
# lock it always matches; if it does not (a writer without the lock), no row is returned and the
# transaction is retried instead of overwriting. (The casts: parameters in a SELECT list take no
# type from the columns they are inserted into.)
_ADVANCE_AND_RECORD: Final = (
    "advanced AS ("
    "INSERT INTO ledger.entity_versions AS v (entity_type, entity_id, version, updated_at) "
    "VALUES (:entity_type, :entity_id, :sequence, :processed_at) "
    "ON CONFLICT (entity_type, entity_id) DO UPDATE "
    "SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at "
    "WHERE v.version = :expected "
    "RETURNING v.version) "
    "INSERT INTO ledger.entity_history (entity_type, entity_id, sequence, kind, outcome, reason, reason_detail, "
    "correlation_id, transaction_id, source, occurred_at, processed_at, payload_hash) "
    "SELECT CAST(:entity_type AS smallint), CAST(:entity_id AS text), advanced.version, CAST(:kind AS text), "
    "CAST(:outcome AS smallint), CAST(:reason AS text), CAST(:reason_detail AS text), "
    "CAST(:correlation_id AS text), CAST(:transaction_id AS text), CAST(:source AS text), "
    "CAST(:occurred_at AS timestamptz), CAST(:processed_at AS timestamptz), CAST(:payload_hash AS bytea) "
    "FROM advanced "
    "RETURNING sequence"
)

# State writes that go in front of the compare-and-set, as parts of the same statement. They run
# whether or not the CAS matches; when it does not, the statement returns no row and the
# transaction rolls back, taking them with it.
_SHIPMENT_COLUMNS: Final = tuple(c.name for c in shipments.c)
SAVE_SHIPMENT: Final = (
    f"INSERT INTO ledger.shipments ({', '.join(_SHIPMENT_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _SHIPMENT_COLUMNS)}) "
    "ON CONFLICT (shipment_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _SHIPMENT_COLUMNS if c not in ("shipment_id", "created_at"))
)

# One statement whatever the number of touched locations (one or two): the rows go as parallel
# arrays, in location order.
SAVE_BALANCES: Final = (
    "INSERT INTO ledger.inventory_balances (sku, location, on_hand, reserved, updated_at) "
    "SELECT CAST(:sku AS text), t.location, t.on_hand, t.reserved, CAST(:updated_at AS timestamptz) "
    "FROM unnest(CAST(:locations AS text[]), CAST(:on_hand AS bigint[]), CAST(:reserved AS bigint[])) "
    "AS t(location, on_hand, reserved) "
    "ON CONFLICT (sku, location) DO UPDATE "
    "SET on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved, updated_at = EXCLUDED.updated_at"
)

OPEN_RESERVATION: Final = (
    "INSERT INTO ledger.inventory_reservations (sku, reservation_id, location, quantity, created_at) "
    "VALUES (:sku, :reservation_id, :location, :quantity, :at)"
)

RELEASE_RESERVATION: Final = (
    "UPDATE ledger.inventory_reservations SET released_at = :at WHERE sku = :sku AND reservation_id = :reservation_id"
)


@functools.cache
def record_event(writes: tuple[str, ...] = ()) -> TextClause:
    """The state writes (none for a rejection or a skip), the compare-and-set and the history
    row, as one statement: one round trip for the whole change."""
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
