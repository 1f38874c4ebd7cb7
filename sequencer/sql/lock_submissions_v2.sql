CREATE OR REPLACE FUNCTION sequencer.lock_submissions_v2(p_callers text[], p_keys text[], p_types smallint[], p_ids text[], p_row_lock boolean, p_lock_timeout text, p_now timestamp with time zone)
 RETURNS TABLE(entity_type smallint, entity_id text, watermark bigint, parked_count integer)
 LANGUAGE plpgsql
AS $function$
-- Every lock a batch of submissions needs, in one order for all transactions: the keys'
-- advisory locks, then the entities' locks (advisory, or the rows' own on distributed
-- Postgres), each set sorted, so concurrent batches never deadlock. The caller's deadline bounds
-- every lock wait of the transaction ('0': none). Creates entities on first sight and returns
-- their bookkeeping, read after the locks (each statement here takes a fresh snapshot, so work
-- committed while this one waited is seen).
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    PERFORM pg_advisory_xact_lock(s.h) FROM (
        SELECT DISTINCT hashtextextended('idem:' || c || ':' || k, 0) AS h
        FROM unnest(p_callers, p_keys) AS u(c, k) ORDER BY 1 OFFSET 0) s;
    IF NOT p_row_lock THEN
        PERFORM pg_advisory_xact_lock(s.h) FROM (
            SELECT DISTINCT hashtextextended('seq:' || t::text || ':' || i, 0) AS h
            FROM unnest(p_types, p_ids) AS u(t, i) ORDER BY 1 OFFSET 0) s;
    END IF;
    INSERT INTO sequencer.entities AS e (entity_type, entity_id, updated_at)
    SELECT DISTINCT t, i, p_now FROM unnest(p_types, p_ids) AS u(t, i)
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    IF p_row_lock THEN
        RETURN QUERY SELECT e.entity_type, e.entity_id, e.watermark, e.parked_count
        FROM sequencer.entities e JOIN (SELECT DISTINCT t, i FROM unnest(p_types, p_ids) AS u(t, i)) w
            ON e.entity_type = w.t AND e.entity_id = w.i
        ORDER BY e.entity_type, e.entity_id FOR UPDATE OF e;
    ELSE
        RETURN QUERY SELECT e.entity_type, e.entity_id, e.watermark, e.parked_count
        FROM sequencer.entities e JOIN (SELECT DISTINCT t, i FROM unnest(p_types, p_ids) AS u(t, i)) w
            ON e.entity_type = w.t AND e.entity_id = w.i;
    END IF;
END
$function$
