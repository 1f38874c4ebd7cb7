"""The concurrency-critical statements, named, each with why it is shaped so."""

from __future__ import annotations

from sqlalchemy import text

# Serialises all work on one idempotency key (scoped by caller) for the rest of the transaction;
# transaction-scoped so a dropped connection can never leave it held. The same round trip bounds
# every lock wait of the transaction by the caller's deadline (:lock_timeout, '0' = none): the
# volatile subquery is evaluated before the lock is requested.
LOCK_KEY = text(
    "SELECT t.bound, pg_advisory_xact_lock(hashtextextended('idem:' || :caller || ':' || :key, 0)) "
    "FROM (SELECT set_config('lock_timeout', :lock_timeout, true) AS bound) t"
)

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

# Claims forwarding of up to :limit entities with queued work whose lease is free, expired or
# already ours (a replica keeps its leases while it is busy with an entity).
# The UPDATE re-checks the lease after waiting on a row another replica just claimed, so two
# replicas never both win one entity.
CLAIM_ENTITIES = text(
    "UPDATE sequencer.entities e SET lease_owner = :owner, lease_until = :until "
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

_EVENT_COLUMNS = (
    "entity_type, entity_id, sequence, transaction_id, state, event, payload_hash, correlation_id, "
    "caller_id, idempotency_key, accepted_at, queued_at"
)
_EVENT_VALUES = (
    ":entity_type, :entity_id, :sequence, :transaction_id, :state, :event, :payload_hash, :correlation_id, "
    ":caller_id, :idempotency_key, :accepted_at, :queued_at"
)

# Accepts an event whose answer is known before it is written (the in-order path) in one round
# trip: the event row, the idempotency record with the answer, and the NOTIFY wake-up. A held
# MSI makes the insert do nothing, and then nothing else happens either (no row comes back).
ACCEPT_EVENT = text(
    f"WITH ins AS (INSERT INTO sequencer.events ({_EVENT_COLUMNS}) VALUES ({_EVENT_VALUES}) "
    "  ON CONFLICT DO NOTHING RETURNING transaction_id), "
    "k AS (INSERT INTO sequencer.idempotency_keys (caller_id, idempotency_key, method, fingerprint, request, "
    "  status_code, response, transaction_id, created_at, expires_at) "
    "  SELECT :caller_id, :idempotency_key, :method, :fingerprint, :request, 0, :response, transaction_id, "
    "  :accepted_at, :expires_at FROM ins "
    "  ON CONFLICT (caller_id, idempotency_key) DO UPDATE SET method = excluded.method, "
    "  fingerprint = excluded.fingerprint, request = excluded.request, status_code = excluded.status_code, "
    "  response = excluded.response, transaction_id = excluded.transaction_id, "
    "  created_at = excluded.created_at, expires_at = excluded.expires_at "
    "  WHERE sequencer.idempotency_keys.expires_at <= excluded.created_at RETURNING 1) "
    "SELECT (SELECT count(*) FROM k) AS stored, pg_notify('sequencer_events', :payload) FROM ins"
)

# Inserts an event row whose answer depends on what is then held (parked events, skips), with
# its NOTIFY; returns nothing when the MSI is already held.
INSERT_EVENT = text(
    f"WITH ins AS (INSERT INTO sequencer.events ({_EVENT_COLUMNS}, skip_reason) "
    f"  VALUES ({_EVENT_VALUES}, :skip_reason) ON CONFLICT DO NOTHING RETURNING transaction_id) "
    "SELECT pg_notify('sequencer_events', :payload) FROM ins"
)

# Moves a QUEUED event to its terminal state and announces it; no row when it was not QUEUED.
COMPLETE_EVENT = text(
    "WITH done AS (UPDATE sequencer.events SET state = :state, reason = :reason, reason_detail = :reason_detail, "
    "  entity_version = :entity_version, processed_at = :now "
    "  WHERE entity_type = :entity_type AND entity_id = :entity_id AND sequence = :sequence AND state = 2 "
    "  RETURNING transaction_id) "
    "SELECT done.transaction_id, pg_notify('sequencer_events', json_build_object("
    "  'x', done.transaction_id, 't', CAST(:entity_type AS int), 'e', CAST(:entity_id AS text), "
    "  's', CAST(:state AS int), 'o', CAST(:origin AS text))::text) "
    "FROM done"
)

# Queues the parked direct successor, if there is one, and announces it; returns the whole row.
RELEASE_PARKED = text(
    "WITH released AS (UPDATE sequencer.events SET state = 2, queued_at = :now "
    "  WHERE entity_type = :entity_type AND entity_id = :entity_id AND sequence = :sequence AND state = 1 "
    "  RETURNING *) "
    "SELECT released.*, pg_notify('sequencer_events', json_build_object("
    "  'x', released.transaction_id, 't', CAST(:entity_type AS int), 'e', CAST(:entity_id AS text), 's', 2, "
    "  'o', CAST(:origin AS text))::text) "
    "  AS notified FROM released"
)

# The new watermark and outcome; the forwarding lease is renewed in the same write.
ADVANCE_WATERMARK = text(
    "UPDATE sequencer.entities SET watermark = :watermark, last_outcome = :last_outcome, "
    "  last_outcome_reason = :last_outcome_reason, updated_at = :now, parked_count = parked_count - :released, "
    "  lease_until = CASE WHEN lease_owner = :owner THEN :lease_until ELSE lease_until END "
    "WHERE entity_type = :entity_type AND entity_id = :entity_id"
)
