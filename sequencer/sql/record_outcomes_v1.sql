CREATE OR REPLACE FUNCTION sequencer.record_outcomes_v1(p_types smallint[], p_ids text[], p_sequences bigint[], p_states smallint[], p_reasons text[], p_details text[], p_versions bigint[], p_row_lock boolean, p_now timestamp with time zone, p_owner text, p_lease_until timestamp with time zone, p_hand_over_before timestamp with time zone)
 RETURNS TABLE(r_type smallint, r_id text, r_previous bigint, r_watermark bigint, r_released uuid, r_lease_kept boolean)
 LANGUAGE plpgsql
AS $function$
-- Records the ledger's outcomes of one forwarded batch: per entity, consecutive MSIs right
-- above its watermark (its QUEUED event and the PARKED successors sent with it), in one
-- statement after the entities' locks (the same sorted order as lock_submissions_v2, so it
-- never deadlocks with a batch of submissions; the statement after the locks takes a fresh
-- snapshot). Per entity: each outcome becomes the event's terminal state, the watermark moves
-- to the last one, the next parked successor is released (QUEUED), the parked count follows,
-- and this forwarder's lease is renewed, or handed back at a chain's end once held since
-- p_hand_over_before. An outcome at or below the watermark was recorded already (another
-- forwarder got there first) and changes nothing. No gap moves here: an entity's lowest
-- missing MSI lies above the chain the outcomes cover.
-- Returns per entity: the watermark before and after, the released event, whether the lease
-- is still this forwarder's.
BEGIN
    IF NOT p_row_lock THEN
        PERFORM pg_advisory_xact_lock(s.h) FROM (
            SELECT DISTINCT hashtextextended('seq:' || u.t::text || ':' || u.i, 0) AS h
            FROM unnest(p_types, p_ids) AS u(t, i) ORDER BY 1 OFFSET 0) s;
    ELSE
        PERFORM 1 FROM sequencer.entities e
        WHERE (e.entity_type, e.entity_id) IN (SELECT u.t, u.i FROM unnest(p_types, p_ids) AS u(t, i))
        ORDER BY e.entity_type, e.entity_id FOR UPDATE;
    END IF;
    RETURN QUERY
    WITH outcome AS (
        SELECT u.t, u.i, u.q, u.s, NULLIF(u.r, '') AS r, NULLIF(u.d, '') AS d, u.v
        FROM unnest(p_types, p_ids, p_sequences, p_states, p_reasons, p_details, p_versions) AS u(t, i, q, s, r, d, v)
    ), entity AS (
        SELECT x.entity_type AS t, x.entity_id AS i, x.watermark, x.lease_owner, x.lease_taken_at
        FROM sequencer.entities x
        WHERE (x.entity_type, x.entity_id) IN (SELECT DISTINCT o.t, o.i FROM outcome o)
    ), due AS (
        SELECT o.*, h.state AS was FROM outcome o
        JOIN entity w ON w.t = o.t AND w.i = o.i
        JOIN sequencer.events h ON h.entity_type = o.t AND h.entity_id = o.i AND h.sequence = o.q
        WHERE o.q > w.watermark AND h.state IN (1, 2)
    ), done AS (
        UPDATE sequencer.events e SET state = d.s, reason = d.r, reason_detail = d.d, entity_version = d.v,
            processed_at = p_now
        FROM due d
        WHERE e.entity_type = d.t AND e.entity_id = d.i AND e.sequence = d.q
        RETURNING e.entity_type AS t, e.entity_id AS i, e.sequence AS q
    ), chain AS (
        SELECT d.t, d.i, max(d.q) AS through, count(*) FILTER (WHERE d.was = 1) AS parked,
            (array_agg(d.s ORDER BY d.q DESC))[1] AS last_state,
            (array_agg(d.r ORDER BY d.q DESC))[1] AS last_reason
        FROM due d
        WHERE EXISTS (SELECT 1 FROM done n WHERE n.t = d.t AND n.i = d.i AND n.q = d.q)
        GROUP BY d.t, d.i
    ), released AS (
        UPDATE sequencer.events e SET state = 2, queued_at = p_now
        FROM chain c
        WHERE e.entity_type = c.t AND e.entity_id = c.i AND e.sequence = c.through + 1 AND e.state = 1
        RETURNING e.entity_type AS t, e.entity_id AS i, e.transaction_id
    ), moved AS (
        UPDATE sequencer.entities e SET watermark = c.through, last_outcome = c.last_state,
            last_outcome_reason = c.last_reason, updated_at = p_now,
            parked_count = e.parked_count - c.parked::integer - (CASE WHEN r.t IS NULL THEN 0 ELSE 1 END),
            lease_owner = CASE WHEN e.lease_owner = p_owner AND r.t IS NULL
                AND (e.lease_taken_at IS NULL OR e.lease_taken_at < p_hand_over_before)
                THEN NULL ELSE e.lease_owner END,
            lease_until = CASE WHEN e.lease_owner IS DISTINCT FROM p_owner THEN e.lease_until
                WHEN r.t IS NULL AND (e.lease_taken_at IS NULL OR e.lease_taken_at < p_hand_over_before) THEN NULL
                ELSE p_lease_until END,
            lease_taken_at = CASE WHEN e.lease_owner = p_owner AND r.t IS NULL
                AND (e.lease_taken_at IS NULL OR e.lease_taken_at < p_hand_over_before)
                THEN NULL ELSE e.lease_taken_at END
        FROM chain c LEFT JOIN released r ON r.t = c.t AND r.i = c.i
        WHERE e.entity_type = c.t AND e.entity_id = c.i
        RETURNING e.entity_type AS t, e.entity_id AS i, e.lease_owner
    )
    SELECT w.t, w.i, w.watermark, coalesce(c.through, w.watermark), r.transaction_id,
        coalesce(m.lease_owner, CASE WHEN m.t IS NULL THEN w.lease_owner END) IS NOT DISTINCT FROM p_owner
    FROM entity w
    LEFT JOIN chain c ON c.t = w.t AND c.i = w.i
    LEFT JOIN released r ON r.t = w.t AND r.i = w.i
    LEFT JOIN moved m ON m.t = w.t AND m.i = w.i;
END
$function$
