CREATE OR REPLACE FUNCTION sequencer.outbox_enqueue_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
-- The outbox's one writer (docs/webhooks.md): a statement-level trigger on sequencer.events,
-- after INSERT and after UPDATE, with the statement's rows as transition tables. Every event
-- that entered a reported state (APPLIED 3, REJECTED 4, DUPLICATE 5, SKIPPED 6, BLOCKED 7) gets
-- one delivery per ACTIVE subscription whose states and entity type match, in the transaction
-- of the change: a crash loses none, and every write path (record_outcomes_v1's batches, the
-- skips, a block) is covered here without each remembering it. One execution per statement,
-- however many rows; without an active subscription it stops after one index-free probe of a
-- tiny table. Rows are inserted in (entity, MSI) order, so `position` follows MSI order.
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sequencer.outbox_subscriptions s WHERE s.state = 1) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO sequencer.outbox_deliveries (subscription_id, entity_type, entity_id, sequence, transaction_id,
            event_state, reason, reason_detail, entity_version, processed_at, forward_attempts, blocked_at, ledger_code,
            next_attempt_at, created_at)
        SELECT s.id, n.entity_type, n.entity_id, n.sequence, n.transaction_id, n.state,
            coalesce(n.reason, n.skip_reason), n.reason_detail, n.entity_version, n.processed_at, n.forward_attempts,
            n.blocked_at, n.ledger_code, now(), now()
        FROM changed_rows n
        JOIN previous_rows o ON o.entity_type = n.entity_type AND o.entity_id = n.entity_id AND o.sequence = n.sequence
        JOIN sequencer.outbox_subscriptions s ON s.state = 1 AND n.state = ANY (s.states)
            AND (s.entity_type IS NULL OR s.entity_type = n.entity_type)
        WHERE n.state IN (3, 4, 5, 6, 7) AND n.state IS DISTINCT FROM o.state
        ORDER BY n.entity_type, n.entity_id, n.sequence, s.id;
    ELSE
        INSERT INTO sequencer.outbox_deliveries (subscription_id, entity_type, entity_id, sequence, transaction_id,
            event_state, reason, reason_detail, entity_version, processed_at, forward_attempts, blocked_at, ledger_code,
            next_attempt_at, created_at)
        SELECT s.id, n.entity_type, n.entity_id, n.sequence, n.transaction_id, n.state,
            coalesce(n.reason, n.skip_reason), n.reason_detail, n.entity_version, n.processed_at, n.forward_attempts,
            n.blocked_at, n.ledger_code, now(), now()
        FROM inserted_rows n
        JOIN sequencer.outbox_subscriptions s ON s.state = 1 AND n.state = ANY (s.states)
            AND (s.entity_type IS NULL OR s.entity_type = n.entity_type)
        WHERE n.state IN (3, 4, 5, 6, 7)
        ORDER BY n.entity_type, n.entity_id, n.sequence, s.id;
    END IF;
    RETURN NULL;
END
$function$
