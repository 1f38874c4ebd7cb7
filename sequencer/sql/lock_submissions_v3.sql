CREATE OR REPLACE FUNCTION sequencer.lock_submissions_v3(p_callers text[], p_keys text[], p_types smallint[], p_ids text[], p_sequences bigint[], p_row_lock boolean, p_lock_timeout text, p_now timestamp with time zone)
 RETURNS TABLE(r_kind text, r_type smallint, r_id text, r_sequence bigint, r_watermark bigint, r_parked integer, r_transaction_id uuid, r_payload_hash bytea, r_skip_reason text, r_state smallint, r_caller text, r_key text, r_method text, r_fingerprint bytea, r_request bytea, r_response bytea, r_created_at timestamp with time zone, r_expires_at timestamp with time zone)
 LANGUAGE plpgsql
AS $function$
-- The first step of a batch of submissions: every lock it needs, in one order for all
-- transactions (the keys' advisory locks, then the entities' locks: advisory, or the rows' own
-- on distributed Postgres; each set sorted), so concurrent batches never deadlock, and then
-- what the sequencing rules need, read after the locks (each statement here takes a fresh
-- snapshot, so work committed while this one waited is seen):
--   'entity' rows: each entity's watermark and parked count (created on first sight);
--   'held' rows: its events above the watermark, and those at the submitted MSIs below it,
--     with their state (an operator's retry or skip needs to know a BLOCKED one);
--   'key' rows: the live idempotency records of the keys.
-- The caller's deadline bounds every lock wait of the transaction ('0': none).
-- v3: 'held' rows carry the event's state (v2 stays for replicas of the previous release).
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    PERFORM pg_advisory_xact_lock(s.h) FROM (
        SELECT DISTINCT hashtextextended('idem:' || u.c || ':' || u.k, 0) AS h
        FROM unnest(p_callers, p_keys) AS u(c, k) ORDER BY 1 OFFSET 0) s;
    IF NOT p_row_lock THEN
        PERFORM pg_advisory_xact_lock(s.h) FROM (
            SELECT DISTINCT hashtextextended('seq:' || u.t::text || ':' || u.i, 0) AS h
            FROM unnest(p_types, p_ids) AS u(t, i) ORDER BY 1 OFFSET 0) s;
    END IF;
    INSERT INTO sequencer.entities (entity_type, entity_id, updated_at)
    SELECT DISTINCT u.t, u.i, p_now FROM unnest(p_types, p_ids) AS u(t, i)
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    IF p_row_lock THEN
        PERFORM 1 FROM sequencer.entities e
        WHERE (e.entity_type, e.entity_id) IN (SELECT u.t, u.i FROM unnest(p_types, p_ids) AS u(t, i))
        ORDER BY e.entity_type, e.entity_id FOR UPDATE;
    END IF;
    RETURN QUERY
    SELECT 'entity', e.entity_type, e.entity_id, NULL::bigint, e.watermark, e.parked_count, NULL::uuid,
        NULL::bytea, NULL::text, NULL::smallint, NULL::text, NULL::text, NULL::text, NULL::bytea, NULL::bytea, NULL::bytea,
        NULL::timestamptz, NULL::timestamptz
    FROM (SELECT DISTINCT u.t, u.i FROM unnest(p_types, p_ids) AS u(t, i)) w
    JOIN LATERAL (SELECT * FROM sequencer.entities x WHERE x.entity_type = w.t AND x.entity_id = w.i) e ON true;
    RETURN QUERY
    SELECT 'held', e.entity_type, e.entity_id, e.sequence, NULL::bigint, NULL::integer, e.transaction_id,
        e.payload_hash, e.skip_reason, e.state, NULL::text, NULL::text, NULL::text, NULL::bytea, NULL::bytea, NULL::bytea,
        NULL::timestamptz, NULL::timestamptz
    FROM (SELECT DISTINCT u.t, u.i FROM unnest(p_types, p_ids) AS u(t, i)) w
    JOIN LATERAL (SELECT x.watermark FROM sequencer.entities x WHERE x.entity_type = w.t AND x.entity_id = w.i) x
        ON true
    JOIN LATERAL (SELECT * FROM sequencer.events v WHERE v.entity_type = w.t AND v.entity_id = w.i
        AND v.sequence > x.watermark) e ON true;
    RETURN QUERY
    SELECT 'held', e.entity_type, e.entity_id, e.sequence, NULL::bigint, NULL::integer, e.transaction_id,
        e.payload_hash, e.skip_reason, e.state, NULL::text, NULL::text, NULL::text, NULL::bytea, NULL::bytea, NULL::bytea,
        NULL::timestamptz, NULL::timestamptz
    FROM (SELECT DISTINCT u.t, u.i, u.s FROM unnest(p_types, p_ids, p_sequences) AS u(t, i, s)) w
    JOIN LATERAL (SELECT x.watermark FROM sequencer.entities x WHERE x.entity_type = w.t AND x.entity_id = w.i) x
        ON w.s <= x.watermark
    JOIN LATERAL (SELECT * FROM sequencer.events v WHERE v.entity_type = w.t AND v.entity_id = w.i
        AND v.sequence = w.s) e ON true;
    RETURN QUERY
    SELECT 'key', NULL::smallint, NULL::text, NULL::bigint, NULL::bigint, NULL::integer, k.transaction_id,
        NULL::bytea, NULL::text, NULL::smallint, k.caller_id, k.idempotency_key, k.method, k.fingerprint, k.request, k.response,
        k.created_at, k.expires_at
    FROM (SELECT DISTINCT u.c, u.k FROM unnest(p_callers, p_keys) AS u(c, k)) w
    JOIN LATERAL (SELECT * FROM sequencer.idempotency_keys v WHERE v.caller_id = w.c AND v.idempotency_key = w.k
        AND v.expires_at > p_now) k ON true;
END
$function$
