"""The concurrency-critical statements, named, each with why it is shaped so."""

from __future__ import annotations

from sqlalchemy import text

# The skip and outcome steps below are server-side functions (migration 5c1f0e2a9b7d): each is
# one round trip for what took several, under the same locks. Casts pin the argument types for
# resolution. A change to a function is a new version in sql/ and a new revision; the ingress
# batch's statements are in mailbox.py. bench/ceilings.py copies these statements (its smoke test
# fails when the two drift apart).

# Serialises all work on one idempotency key (scoped by caller) for the rest of the transaction
# (transaction-scoped: a dropped connection never leaves it held), with the caller's deadline as
# the lock_timeout of every lock wait that follows; returns the key's live record, read after
# the lock.
LOCK_KEY = text("SELECT * FROM sequencer.lock_key(:caller, :key, :lock_timeout, :now)")

# Serialises all work on one entity for the rest of the transaction; returns (watermark,
# parked_count), creating the row on first sight. Advisory lock, or the row's lock for
# distributed Postgres (where advisory locks are node-local).
LOCK_ENTITY = text(
    "SELECT watermark, parked_count FROM sequencer.lock_entity("
    "CAST(:entity_type AS smallint), :entity_id, :row_lock, :now)"
)

# (lowest missing MSI above the watermark, highest held MSI): a gap exists only below the latter.
HELD_RANGE = text(
    "SELECT lowest_missing, highest_held FROM sequencer.held_range("
    "CAST(:entity_type AS smallint), :entity_id, CAST(:watermark AS bigint))"
)

# Holds a parked event or a skip marker (row, NOTIFY, parked count, gap); returns (held, the MSI
# then missing or NULL); not held, nothing written, when the MSI is already held.
HOLD_EVENT = text(
    "SELECT held, awaiting FROM sequencer.hold_event(CAST(:entity_type AS smallint), :entity_id, "
    "CAST(:sequence AS bigint), :transaction_id, CAST(:state AS smallint), :event, :payload_hash, :correlation_id, "
    ":caller_id, :idempotency_key, :skip_reason, CAST(:watermark AS bigint), :now, :payload)"
)

# Records a ledger outcome: terminal state, parked successor released, watermark advanced, lease
# renewed (or handed back at a chain's end once held since :hand_over_before), gap kept in step.
# Returns whether it was recorded, the released event if any, and whether the lease is still ours.
RECORD_OUTCOME = text(
    "SELECT recorded, previous_watermark, transaction_id, event, correlation_id, skip_reason, lease_kept "
    "FROM sequencer.record_outcome(CAST(:entity_type AS smallint), :entity_id, CAST(:sequence AS bigint), "
    "CAST(:state AS smallint), :reason, :reason_detail, CAST(:entity_version AS bigint), :row_lock, :now, "
    ":origin, :owner, :lease_until, :hand_over_before)"
)

# Claims forwarding of up to :limit entities with queued work whose lease is free, expired or
# already ours (a replica keeps its leases while it is busy with an entity). lease_taken_at
# keeps the time of the first claim while the owner stays the same.
# The UPDATE re-checks the lease after waiting on a row another replica just claimed, so two
# replicas never both win one entity.
CLAIM_ENTITIES = text(
    "UPDATE sequencer.entities e SET lease_owner = :owner, lease_until = :until, "
    "  lease_taken_at = CASE WHEN e.lease_owner = :owner THEN e.lease_taken_at ELSE :now END "
    "FROM (SELECT DISTINCT q.entity_type, q.entity_id FROM sequencer.events q "
    "      JOIN sequencer.entities x ON x.entity_type = q.entity_type AND x.entity_id = q.entity_id "
    "      WHERE q.state = 2 AND (x.lease_until IS NULL OR x.lease_until < :now OR x.lease_owner = :owner) "
    "      LIMIT :limit) w "
    "WHERE e.entity_type = w.entity_type AND e.entity_id = w.entity_id "
    "AND (e.lease_until IS NULL OR e.lease_until < :now OR e.lease_owner = :owner) "
    "RETURNING e.entity_type, e.entity_id"
)

# Claims one named entity (the fast path after a local submit queued work for it).
CLAIM_ENTITY = text(
    "UPDATE sequencer.entities SET lease_owner = :owner, lease_until = :until, "
    "  lease_taken_at = CASE WHEN lease_owner = :owner THEN lease_taken_at ELSE :now END "
    "WHERE entity_type = :entity_type AND entity_id = :entity_id "
    "AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :owner) "
    "RETURNING entity_type"
)

RELEASE_LEASE = text(
    "UPDATE sequencer.entities SET lease_owner = NULL, lease_until = NULL, lease_taken_at = NULL "
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
