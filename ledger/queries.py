"""The concurrency-critical SQL of the ledger, named, each with why it is written this way."""

from __future__ import annotations

from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# Serialises all work on one entity for the rest of the transaction. Transaction-scoped, so a
# dropped connection cannot leave it held; the namespace keeps it apart from the sequencer's.
ADVISORY_LOCK: Final = text(
    "SELECT pg_advisory_xact_lock(hashtextextended('ledger:' || :entity_type || ':' || :entity_id, 0))"
)

# The "row" strategy (Citus: advisory locks are node-local): make sure the version row exists so
# there is something to lock. A concurrent insert of the same key waits for the first to finish.
ENSURE_VERSION_ROW: Final = text(
    "INSERT INTO ledger.entity_versions (entity_type, entity_id, version, updated_at) "
    "VALUES (:entity_type, :entity_id, 0, now()) ON CONFLICT (entity_type, entity_id) DO NOTHING"
)

# Then lock it: every writer of the entity queues here until the holder commits.
LOCK_VERSION_ROW: Final = text(
    "SELECT version FROM ledger.entity_versions WHERE entity_type = :entity_type AND entity_id = :entity_id FOR UPDATE"
)

# The compare-and-set: moves the version from :expected to :version and nothing else. Under the
# entity lock it always matches; if it does not (a writer without the lock), no row is returned
# and the transaction is retried instead of overwriting.
ADVANCE_VERSION: Final = text(
    "INSERT INTO ledger.entity_versions AS v (entity_type, entity_id, version, updated_at) "
    "VALUES (:entity_type, :entity_id, :version, :updated_at) "
    "ON CONFLICT (entity_type, entity_id) DO UPDATE "
    "SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at "
    "WHERE v.version = :expected "
    "RETURNING v.version"
)

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
