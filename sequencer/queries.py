"""The concurrency-critical statements, named, each with why it is shaped so."""

from __future__ import annotations

from sqlalchemy import text

# Serialises all work on one idempotency key (scoped by caller) for the rest of the transaction;
# transaction-scoped so a dropped connection can never leave it held.
LOCK_KEY = text("SELECT pg_advisory_xact_lock(hashtextextended('idem:' || :caller || ':' || :key, 0))")

# Serialises all work on one entity (advisory strategy). Node-local on Citus: use "row" there.
LOCK_ENTITY_ADVISORY = text(
    "SELECT pg_advisory_xact_lock(hashtextextended('seq:' || CAST(:entity_type AS text) || ':' || :entity_id, 0))"
)

# Creates the watermark row on first sight; the primary key settles concurrent first events.
ENSURE_ENTITY = text(
    "INSERT INTO sequencer.entities (entity_type, entity_id, updated_at) "
    "VALUES (:entity_type, :entity_id, :now) ON CONFLICT DO NOTHING"
)

SELECT_ENTITY = text(
    "SELECT watermark, parked_count FROM sequencer.entities WHERE entity_type = :entity_type AND entity_id = :entity_id"
)

# Row strategy: the watermark row itself is the lock (works on distributed Postgres).
SELECT_ENTITY_FOR_UPDATE = text(
    "SELECT watermark, parked_count FROM sequencer.entities "
    "WHERE entity_type = :entity_type AND entity_id = :entity_id FOR UPDATE"
)

# Where the entity's gap is: the lowest MSI above the watermark that is not held, and the
# highest held MSI (a gap exists only below it). Bounded by the parked limit, since only held
# (PARKED/QUEUED) rows lie above the watermark.
LOWEST_MISSING = text(
    "SELECT (SELECT min(s.sequence) + 1 FROM ("
    "  SELECT CAST(:watermark AS bigint) AS sequence"
    "  UNION ALL SELECT sequence FROM sequencer.events"
    "  WHERE entity_type = :entity_type AND entity_id = :entity_id AND sequence > :watermark"
    ") s WHERE NOT EXISTS ("
    "  SELECT 1 FROM sequencer.events e WHERE e.entity_type = :entity_type AND e.entity_id = :entity_id"
    "  AND e.sequence = s.sequence + 1)) AS lowest_missing, "
    "(SELECT max(sequence) FROM sequencer.events"
    "  WHERE entity_type = :entity_type AND entity_id = :entity_id AND sequence > :watermark) AS highest_held"
)

# Claims forwarding of up to :limit entities with queued work whose lease is free or expired.
# The UPDATE re-checks the lease after waiting on a row another replica just claimed, so two
# replicas never both win one entity.
CLAIM_ENTITIES = text(
    "UPDATE sequencer.entities e SET lease_owner = :owner, lease_until = :until "
    "FROM (SELECT DISTINCT q.entity_type, q.entity_id FROM sequencer.events q "
    "      JOIN sequencer.entities x ON x.entity_type = q.entity_type AND x.entity_id = q.entity_id "
    "      WHERE q.state = 2 AND (x.lease_until IS NULL OR x.lease_until < :now) LIMIT :limit) w "
    "WHERE e.entity_type = w.entity_type AND e.entity_id = w.entity_id "
    "AND (e.lease_until IS NULL OR e.lease_until < :now) "
    "RETURNING e.entity_type, e.entity_id"
)

# Claims one named entity (the fast path after a local submit queued work for it).
CLAIM_ENTITY = text(
    "UPDATE sequencer.entities SET lease_owner = :owner, lease_until = :until "
    "WHERE entity_type = :entity_type AND entity_id = :entity_id "
    "AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :owner) "
    "RETURNING entity_type"
)

RELEASE_LEASE = text(
    "UPDATE sequencer.entities SET lease_owner = NULL, lease_until = NULL "
    "WHERE entity_type = :entity_type AND entity_id = :entity_id AND lease_owner = :owner"
)

# Deletes a bounded batch of expired keys; SKIP LOCKED so the sweeper never waits on (or
# blocks) a request that is replacing an expired key right now.
SWEEP_EXPIRED_KEYS = text(
    "DELETE FROM sequencer.idempotency_keys k USING ("
    "  SELECT caller_id, idempotency_key FROM sequencer.idempotency_keys"
    "  WHERE expires_at <= :now ORDER BY expires_at LIMIT :batch FOR UPDATE SKIP LOCKED"
    ") d WHERE k.caller_id = d.caller_id AND k.idempotency_key = d.idempotency_key"
)

NOTIFY = text("SELECT pg_notify('sequencer_events', :payload)")
