"""server-side steps: key and entity locks, gap upkeep, acceptance, in-order submit, outcome;
lease hand-over

Each function is one step of a transaction that used to take several round trips. The rules
stay the same (SPEC 4 and 5): every function runs under the same locks, in the caller's
transaction (or as its own single-statement transaction), and each statement in a PL/pgSQL
function sees what committed before it started, so a read after a lock sees the lock holder's
committed work.

Revision ID: 5c1f0e2a9b7d
Revises: 187e90d4b5bb
"""

import sqlalchemy as sa
from alembic import op

revision = "5c1f0e2a9b7d"
down_revision = "187e90d4b5bb"
branch_labels = None
depends_on = None

FUNCTIONS = [
    # Serialises all work on one idempotency key (scoped by caller) for the rest of the
    # transaction, and returns the key's live record, if any, read after the lock (so a
    # concurrent first execution that committed while this one waited is seen). The caller's
    # deadline bounds this and every later lock wait of the transaction ('0': none).
    """
CREATE FUNCTION sequencer.lock_key(p_caller text, p_key text, p_lock_timeout text, p_now timestamptz)
RETURNS SETOF sequencer.idempotency_keys
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    PERFORM pg_advisory_xact_lock(hashtextextended('idem:' || p_caller || ':' || p_key, 0));
    RETURN QUERY SELECT * FROM sequencer.idempotency_keys k
        WHERE k.caller_id = p_caller AND k.idempotency_key = p_key AND k.expires_at > p_now;
END $$""",
    # Serialises all work on one entity for the rest of the transaction and returns its
    # watermark row, creating it on first sight (the primary key settles concurrent first
    # events). The advisory lock is the default; the row's own lock works on distributed
    # Postgres, where advisory locks are node-local.
    """
CREATE FUNCTION sequencer.lock_entity(
    p_type smallint, p_id text, p_row_lock boolean, p_now timestamptz,
    OUT watermark bigint, OUT parked_count integer)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT p_row_lock THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('seq:' || p_type::text || ':' || p_id, 0));
    END IF;
    LOOP
        IF p_row_lock THEN
            SELECT e.watermark, e.parked_count INTO watermark, parked_count FROM sequencer.entities e
            WHERE e.entity_type = p_type AND e.entity_id = p_id FOR UPDATE;
        ELSE
            SELECT e.watermark, e.parked_count INTO watermark, parked_count FROM sequencer.entities e
            WHERE e.entity_type = p_type AND e.entity_id = p_id;
        END IF;
        EXIT WHEN FOUND;
        INSERT INTO sequencer.entities (entity_type, entity_id, updated_at)
        VALUES (p_type, p_id, p_now) ON CONFLICT DO NOTHING;
    END LOOP;
END $$""",
    # Where the entity's gap is: the lowest MSI above the watermark that is not held, and the
    # highest held MSI (a gap exists only below it). Bounded by the parked limit, since only
    # held (PARKED/QUEUED) rows lie above the watermark.
    """
CREATE FUNCTION sequencer.held_range(
    p_type smallint, p_id text, p_watermark bigint, OUT lowest_missing bigint, OUT highest_held bigint)
LANGUAGE sql STABLE AS $$
SELECT
    (SELECT min(s.sequence) + 1 FROM (
        SELECT p_watermark AS sequence
        UNION ALL SELECT sequence FROM sequencer.events
        WHERE entity_type = p_type AND entity_id = p_id AND sequence > p_watermark) s
     WHERE NOT EXISTS (SELECT 1 FROM sequencer.events e
        WHERE e.entity_type = p_type AND e.entity_id = p_id AND e.sequence = s.sequence + 1)),
    (SELECT max(sequence) FROM sequencer.events
     WHERE entity_type = p_type AND entity_id = p_id AND sequence > p_watermark)
$$""",
    # Makes the gap row say what the entity misses now: none (deleted), the same gap (kept, with
    # its first-seen time, so its age keeps counting), or a new one. Returns the missing MSI.
    """
CREATE FUNCTION sequencer.sync_gap(p_type smallint, p_id text, p_watermark bigint, p_now timestamptz)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_lowest bigint;
    v_highest bigint;
BEGIN
    SELECT h.lowest_missing, h.highest_held INTO v_lowest, v_highest
    FROM sequencer.held_range(p_type, p_id, p_watermark) h;
    IF v_highest IS NULL OR v_lowest >= v_highest THEN
        DELETE FROM sequencer.gaps WHERE entity_type = p_type AND entity_id = p_id;
        RETURN NULL;
    END IF;
    INSERT INTO sequencer.gaps AS g (entity_type, entity_id, awaiting_sequence, first_seen_at)
    VALUES (p_type, p_id, v_lowest, p_now)
    ON CONFLICT (entity_type, entity_id) DO UPDATE
        SET awaiting_sequence = excluded.awaiting_sequence, first_seen_at = excluded.first_seen_at,
            alerted_at = NULL
        WHERE g.awaiting_sequence <> excluded.awaiting_sequence;
    RETURN v_lowest;
END $$""",
    # Holds an event whose answer depends on what is then held (a parked event, an operator's
    # skip marker): the event row and its NOTIFY, the parked count, the gap kept in step.
    # Returns whether it was held (false, nothing written: the MSI is already held) and the
    # MSI the entity then misses (NULL: no gap).
    """
CREATE FUNCTION sequencer.hold_event(
    p_type smallint, p_id text, p_sequence bigint, p_transaction_id uuid, p_state smallint,
    p_event bytea, p_payload_hash bytea, p_correlation_id text, p_caller text, p_key text,
    p_skip_reason text, p_watermark bigint, p_now timestamptz, p_payload text,
    OUT held boolean, OUT awaiting bigint)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sequencer.events (entity_type, entity_id, sequence, transaction_id, state, event,
        payload_hash, correlation_id, caller_id, idempotency_key, skip_reason, accepted_at, queued_at)
    VALUES (p_type, p_id, p_sequence, p_transaction_id, p_state, p_event, p_payload_hash,
        p_correlation_id, p_caller, p_key, p_skip_reason, p_now, CASE WHEN p_state = 2 THEN p_now END)
    ON CONFLICT DO NOTHING;
    held := FOUND;
    IF NOT held THEN
        RETURN;
    END IF;
    PERFORM pg_notify('sequencer_events', p_payload);
    IF p_state = 1 THEN
        UPDATE sequencer.entities SET parked_count = parked_count + 1, updated_at = p_now
        WHERE entity_type = p_type AND entity_id = p_id;
    END IF;
    awaiting := sequencer.sync_gap(p_type, p_id, p_watermark, p_now);
END $$""",
    # Accepts an event as QUEUED with its answer, known before the write: the event row, the
    # idempotency record (replacing an expired one) and the NOTIFY wake-up. False, and nothing
    # written, when the MSI is already held.
    """
CREATE FUNCTION sequencer.accept_queued(
    p_type smallint, p_id text, p_sequence bigint, p_transaction_id uuid, p_event bytea,
    p_payload_hash bytea, p_correlation_id text, p_caller text, p_key text, p_now timestamptz,
    p_method text, p_fingerprint bytea, p_request bytea, p_response bytea, p_expires_at timestamptz,
    p_payload text)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sequencer.events (entity_type, entity_id, sequence, transaction_id, state, event,
        payload_hash, correlation_id, caller_id, idempotency_key, accepted_at, queued_at)
    VALUES (p_type, p_id, p_sequence, p_transaction_id, 2, p_event, p_payload_hash, p_correlation_id,
        p_caller, p_key, p_now, p_now)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO sequencer.idempotency_keys AS k (caller_id, idempotency_key, method, fingerprint,
        request, status_code, response, transaction_id, created_at, expires_at)
    VALUES (p_caller, p_key, p_method, p_fingerprint, p_request, 0, p_response, p_transaction_id,
        p_now, p_expires_at)
    ON CONFLICT (caller_id, idempotency_key) DO UPDATE
        SET method = excluded.method, fingerprint = excluded.fingerprint, request = excluded.request,
            status_code = excluded.status_code, response = excluded.response,
            transaction_id = excluded.transaction_id, created_at = excluded.created_at,
            expires_at = excluded.expires_at
        WHERE k.expires_at <= excluded.created_at;
    IF NOT FOUND THEN
        -- The key lock makes this unreachable; the primary key is the rule's backstop.
        RAISE EXCEPTION 'idempotency record already exists for a key held under its lock';
    END IF;
    PERFORM pg_notify('sequencer_events', p_payload);
    RETURN true;
END $$""",
    # The in-order submission as one statement (its own transaction): under the key's lock
    # (bounded by the caller's deadline), a live record of the key is returned for replay; else,
    # under the entity's lock, the entity's direct successor is accepted as QUEUED. Anything
    # else ('other') writes nothing and takes the general path.
    """
CREATE FUNCTION sequencer.submit_in_order(
    p_caller text, p_key text, p_lock_timeout text, p_row_lock boolean, p_now timestamptz,
    p_type smallint, p_id text, p_sequence bigint, p_transaction_id uuid, p_event bytea,
    p_payload_hash bytea, p_correlation_id text, p_method text, p_fingerprint bytea, p_request bytea,
    p_response bytea, p_expires_at timestamptz, p_payload text)
RETURNS TABLE (outcome text, method text, fingerprint bytea, request bytea, response bytea,
    created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_watermark bigint;
    v_parked integer;
BEGIN
    RETURN QUERY SELECT 'replay', k.method, k.fingerprint, k.request, k.response, k.created_at,
        k.expires_at FROM sequencer.lock_key(p_caller, p_key, p_lock_timeout, p_now) k;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT l.watermark, l.parked_count INTO v_watermark, v_parked
    FROM sequencer.lock_entity(p_type, p_id, p_row_lock, p_now) l;
    IF p_sequence = v_watermark + 1 AND sequencer.accept_queued(p_type, p_id, p_sequence,
            p_transaction_id, p_event, p_payload_hash, p_correlation_id, p_caller, p_key, p_now,
            p_method, p_fingerprint, p_request, p_response, p_expires_at, p_payload) THEN
        IF v_parked > 0 THEN
            PERFORM sequencer.sync_gap(p_type, p_id, v_watermark, p_now);
        END IF;
        RETURN QUERY SELECT 'queued', NULL::text, NULL::bytea, NULL::bytea, NULL::bytea,
            NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'other', NULL::text, NULL::bytea, NULL::bytea, NULL::bytea,
        NULL::timestamptz, NULL::timestamptz;
END $$""",
    # Records the ledger's outcome of a QUEUED event under the entity's lock: the terminal state
    # and its NOTIFY, the parked direct successor queued (and announced), the watermark advanced
    # with the lease renewed, the gap kept in step. Not recorded when the event was not QUEUED.
    # At a chain's end (nothing released), a lease held since before p_hand_over_before is
    # handed back, so busy entities move between replicas too. lease_kept: the caller still
    # holds the entity's lease.
    """
CREATE FUNCTION sequencer.record_outcome(
    p_type smallint, p_id text, p_sequence bigint, p_state smallint, p_reason text,
    p_reason_detail text, p_entity_version bigint, p_row_lock boolean, p_now timestamptz,
    p_origin text, p_lease_owner text, p_lease_until timestamptz, p_hand_over_before timestamptz)
RETURNS TABLE (recorded boolean, previous_watermark bigint, transaction_id uuid, event bytea,
    correlation_id text, skip_reason text, lease_kept boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_watermark bigint;
    v_parked integer;
    v_done uuid;
    v_next sequencer.events%ROWTYPE;
    v_kept boolean;
BEGIN
    SELECT l.watermark, l.parked_count INTO v_watermark, v_parked
    FROM sequencer.lock_entity(p_type, p_id, p_row_lock, p_now) l;
    UPDATE sequencer.events e SET state = p_state, reason = p_reason, reason_detail = p_reason_detail,
        entity_version = p_entity_version, processed_at = p_now
    WHERE e.entity_type = p_type AND e.entity_id = p_id AND e.sequence = p_sequence AND e.state = 2
    RETURNING e.transaction_id INTO v_done;
    IF FOUND THEN
        PERFORM pg_notify('sequencer_events', json_build_object(
            'x', v_done, 't', p_type, 'e', p_id, 's', p_state, 'o', p_origin)::text);
        IF v_parked > 0 THEN
            UPDATE sequencer.events e SET state = 2, queued_at = p_now
            WHERE e.entity_type = p_type AND e.entity_id = p_id AND e.sequence = p_sequence + 1
                AND e.state = 1
            RETURNING e.* INTO v_next;
            IF FOUND THEN
                PERFORM pg_notify('sequencer_events', json_build_object(
                    'x', v_next.transaction_id, 't', p_type, 'e', p_id, 's', 2, 'o', p_origin)::text);
            END IF;
        END IF;
        UPDATE sequencer.entities e SET watermark = p_sequence, last_outcome = p_state,
            last_outcome_reason = p_reason, updated_at = p_now,
            parked_count = e.parked_count - (CASE WHEN v_next.transaction_id IS NULL THEN 0 ELSE 1 END),
            lease_until = CASE WHEN e.lease_owner = p_lease_owner THEN p_lease_until ELSE e.lease_until END
        WHERE e.entity_type = p_type AND e.entity_id = p_id;
        IF v_parked > 0 THEN
            PERFORM sequencer.sync_gap(p_type, p_id, p_sequence, p_now);
        END IF;
        IF v_next.transaction_id IS NULL THEN
            UPDATE sequencer.entities e SET lease_owner = NULL, lease_until = NULL, lease_taken_at = NULL
            WHERE e.entity_type = p_type AND e.entity_id = p_id AND e.lease_owner = p_lease_owner
                AND (e.lease_taken_at IS NULL OR e.lease_taken_at < p_hand_over_before);
        END IF;
    END IF;
    SELECT e.lease_owner IS NOT DISTINCT FROM p_lease_owner INTO v_kept FROM sequencer.entities e
    WHERE e.entity_type = p_type AND e.entity_id = p_id;
    IF v_done IS NULL THEN
        RETURN QUERY SELECT false, v_watermark, NULL::uuid, NULL::bytea, NULL::text, NULL::text, v_kept;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, v_watermark, v_next.transaction_id, v_next.event, v_next.correlation_id,
        v_next.skip_reason, v_kept;
END $$""",
]

SIGNATURES = [
    "sequencer.record_outcome(smallint, text, bigint, smallint, text, text, bigint, boolean, timestamptz, text, "
    "text, timestamptz, timestamptz)",
    "sequencer.submit_in_order(text, text, text, boolean, timestamptz, smallint, text, bigint, uuid, bytea, bytea, "
    "text, text, bytea, bytea, bytea, timestamptz, text)",
    "sequencer.accept_queued(smallint, text, bigint, uuid, bytea, bytea, text, text, text, timestamptz, text, bytea, "
    "bytea, bytea, timestamptz, text)",
    "sequencer.hold_event(smallint, text, bigint, uuid, smallint, bytea, bytea, text, text, text, text, bigint, "
    "timestamptz, text)",
    "sequencer.sync_gap(smallint, text, bigint, timestamptz)",
    "sequencer.held_range(smallint, text, bigint)",
    "sequencer.lock_entity(smallint, text, boolean, timestamptz)",
    "sequencer.lock_key(text, text, text, timestamptz)",
]


def upgrade() -> None:
    op.add_column(
        "entities", sa.Column("lease_taken_at", sa.DateTime(timezone=True), nullable=True), schema="sequencer"
    )
    for statement in FUNCTIONS:
        op.execute(statement)


def downgrade() -> None:
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
    op.drop_column("entities", "lease_taken_at", schema="sequencer")
