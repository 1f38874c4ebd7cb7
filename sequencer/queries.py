"""The concurrency-critical statements, named, each with why it is shaped so."""

from __future__ import annotations

from sqlalchemy import text

# The ingress's and the skips' statements are in mailbox.py, the outcome step's function in
# sql/ (a change to a function is a new version there and a new revision). Casts pin the
# argument types for resolution. bench/ceilings.py copies these statements (its smoke test fails
# when the two drift apart).

# Records the ledger's outcomes of one forwarded batch (sequencer/sql/record_outcomes_v1.sql):
# terminal states, watermarks, released successors, leases, after the entities' locks in the
# ingress's order. Returns per entity the watermark before and after, the released event's
# transaction and whether the lease is still ours.
RECORD_OUTCOMES = text(
    "SELECT r_type, r_id, r_previous, r_watermark, r_released, r_lease_kept FROM sequencer.record_outcomes_v1("
    "CAST(:types AS smallint[]), CAST(:ids AS text[]), CAST(:sequences AS bigint[]), CAST(:states AS smallint[]), "
    "CAST(:reasons AS text[]), CAST(:details AS text[]), CAST(:versions AS bigint[]), :row_lock, :now, :owner, "
    ":lease_until, :hand_over_before)"
)

# What each named entity has to forward: its events right above the watermark (the QUEUED one
# first, then PARKED successors), at most :per_entity each; the forwarder keeps the consecutive
# run. Reads only (the lease, not a lock, keeps other forwarders away).
FORWARDABLE = text(
    "SELECT x.entity_type, x.entity_id, x.watermark, v.sequence, v.state, v.transaction_id, v.event, "
    "  v.correlation_id, v.skip_reason, v.traceparent "
    "FROM unnest(CAST(:types AS smallint[]), CAST(:ids AS text[])) AS w(t, i) "
    "JOIN sequencer.entities x ON x.entity_type = w.t AND x.entity_id = w.i "
    "JOIN LATERAL (SELECT * FROM sequencer.events e WHERE e.entity_type = w.t AND e.entity_id = w.i "
    "  AND e.sequence > x.watermark AND e.state IN (1, 2) ORDER BY e.sequence LIMIT :per_entity) v ON true "
    "ORDER BY x.entity_type, x.entity_id, v.sequence"
)

# Counts a refusal that retrying cannot fix against each named event (the QUEUED head its
# entity's batch led with), keeping the refusal's gRPC code, reason and detail for the status.
# The attempt that reaches :block_after makes the event BLOCKED, which stops its entity: only a
# QUEUED head is forwarded or claimed. An event no longer QUEUED (another replica recorded its
# outcome meanwhile) is left alone. Returns the events counted, with their attempts and state.
COUNT_REFUSALS = text(
    "UPDATE sequencer.events e SET forward_attempts = e.forward_attempts + 1, ledger_code = :code, "
    "  reason = :reason, reason_detail = :detail, "
    "  state = CASE WHEN e.forward_attempts + 1 >= :block_after THEN :blocked ELSE e.state END, "
    "  blocked_at = CASE WHEN e.forward_attempts + 1 >= :block_after THEN :now END "
    "FROM unnest(CAST(:types AS smallint[]), CAST(:ids AS text[]), CAST(:sequences AS bigint[])) AS w(t, i, q) "
    "WHERE e.entity_type = w.t AND e.entity_id = w.i AND e.sequence = w.q AND e.state = :queued "
    "RETURNING e.entity_type, e.entity_id, e.sequence, e.transaction_id, e.state, e.forward_attempts"
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

# Claims the named entities whose lease is free, expired or already ours (the fast path after a
# local submit queued work for them); returns those won.
CLAIM_NAMED = text(
    "UPDATE sequencer.entities e SET lease_owner = :owner, lease_until = :until, "
    "  lease_taken_at = CASE WHEN e.lease_owner = :owner THEN e.lease_taken_at ELSE :now END "
    "FROM unnest(CAST(:types AS smallint[]), CAST(:ids AS text[])) AS w(t, i) "
    "WHERE e.entity_type = w.t AND e.entity_id = w.i "
    "AND (e.lease_until IS NULL OR e.lease_until < :now OR e.lease_owner = :owner) "
    "RETURNING e.entity_type, e.entity_id"
)

# Shortens our leases of the named entities to :until: they rest after a failure, then any
# replica may take them.
REST_LEASES = text(
    "UPDATE sequencer.entities e SET lease_until = :until "
    "FROM unnest(CAST(:types AS smallint[]), CAST(:ids AS text[])) AS w(t, i) "
    "WHERE e.entity_type = w.t AND e.entity_id = w.i AND e.lease_owner = :owner"
)

RELEASE_LEASES = text(
    "UPDATE sequencer.entities e SET lease_owner = NULL, lease_until = NULL, lease_taken_at = NULL "
    "FROM unnest(CAST(:types AS smallint[]), CAST(:ids AS text[])) AS w(t, i) "
    "WHERE e.entity_type = w.t AND e.entity_id = w.i AND e.lease_owner = :owner"
)

# A hint sent after a commit (the outcome step's: the released events are known only then).
NOTIFY = text("SELECT pg_notify(:channel, :payload)")

# Deletes a bounded batch of expired keys; SKIP LOCKED so the sweeper never waits on (or
# blocks) a request that is replacing an expired key right now.
SWEEP_EXPIRED_KEYS = text(
    "DELETE FROM sequencer.idempotency_keys k USING ("
    "  SELECT caller_id, idempotency_key FROM sequencer.idempotency_keys"
    "  WHERE expires_at <= :now ORDER BY expires_at LIMIT :batch FOR UPDATE SKIP LOCKED"
    ") d WHERE k.caller_id = d.caller_id AND k.idempotency_key = d.idempotency_key"
)

# The backlog of SPEC 12: held events (states.HELD: PARKED = 1, QUEUED = 2, BLOCKED = 7; accepted,
# not yet processed; a unit test holds the literals to states.HELD),
# counted over the partial index ix_events_held (index-only where the visibility map allows) and
# capped at :cap rows, so a backlog far past the bound costs no more to count than the bound.
COUNT_HELD = text("SELECT count(*) FROM (SELECT 1 FROM sequencer.events WHERE state IN (1, 2, 7) LIMIT :cap) h")
