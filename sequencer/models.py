"""The sequencer's tables: the durable mailbox (events), per-entity watermarks, gaps, keys.

Every per-entity table is keyed by (entity_type, entity_id) first, so the schema can be
distributed by entity (Citus) without changing a statement.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY

from common.db import NAMING_CONVENTION

SCHEMA = "sequencer"

metadata = MetaData(schema=SCHEMA, naming_convention=NAMING_CONVENTION)

# One row per entity: the watermark (last MSI processed) and the forwarding lease.
entities = Table(
    "entities",
    metadata,
    Column("entity_type", SmallInteger, primary_key=True),
    Column("entity_id", Text, primary_key=True),
    Column("watermark", BigInteger, nullable=False, server_default=text("0")),
    Column("parked_count", Integer, nullable=False, server_default=text("0")),
    Column("last_outcome", SmallInteger, nullable=True),
    Column("last_outcome_reason", Text, nullable=True),
    # Which replica forwards this entity, until when (NULL: nobody).
    Column("lease_owner", Text, nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    # When the current owner claimed it: a lease held this long is handed back at a chain's end.
    Column("lease_taken_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("watermark >= 0", name="watermark_non_negative"),
    CheckConstraint("parked_count >= 0", name="parked_count_non_negative"),
)

# The mailbox: every accepted event, by entity and MSI, with its state. One row per MSI is the
# rule that makes a second acceptance of the same MSI impossible.
events = Table(
    "events",
    metadata,
    Column("entity_type", SmallInteger, primary_key=True),
    Column("entity_id", Text, primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    Column("transaction_id", Uuid, nullable=False),
    Column("state", SmallInteger, nullable=False),
    # The serialized logistics.events.v1.Event; for a skip marker, an Event with no payload.
    Column("event", LargeBinary, nullable=False),
    Column("payload_hash", LargeBinary, nullable=False),
    Column("correlation_id", Text, nullable=False),
    Column("caller_id", Text, nullable=True),
    Column("idempotency_key", Text, nullable=True),
    # Set on operator skips: who and why.
    Column("skip_reason", Text, nullable=True),
    Column("accepted_at", DateTime(timezone=True), nullable=False),
    Column("queued_at", DateTime(timezone=True), nullable=True),
    Column("processed_at", DateTime(timezone=True), nullable=True),
    Column("reason", Text, nullable=True),
    Column("reason_detail", Text, nullable=True),
    Column("entity_version", BigInteger, nullable=True),
    # Refusals retrying cannot fix since the event was last queued; at SEQUENCER_BLOCK_AFTER the
    # event is BLOCKED, with the refusal's gRPC code (ledger_code), reason and detail.
    Column("forward_attempts", Integer, nullable=False, server_default=text("0")),
    Column("blocked_at", DateTime(timezone=True), nullable=True),
    Column("ledger_code", Text, nullable=True),
    # The W3C traceparent the event was accepted under: the forwarder continues that trace.
    Column("traceparent", Text, nullable=True),
    CheckConstraint("sequence >= 1", name="sequence_positive"),
    CheckConstraint("state BETWEEN 1 AND 7", name="state_known"),
    Index("ix_events_transaction_id", "transaction_id"),
    # The forwarder's work list: only QUEUED rows, so it stays tiny.
    Index("ix_events_queued", "queued_at", postgresql_where=text("state = 2")),
    # The backlog count of admission (SPEC 12): held rows only (PARKED, QUEUED, BLOCKED), so it
    # stays as small as the backlog itself.
    Index("ix_events_held", "state", postgresql_where=text("state IN (1, 2, 7)")),
    # Blocked events, oldest first (the admin list, the gauge): only BLOCKED rows.
    Index("ix_events_blocked", "blocked_at", "entity_type", "entity_id", postgresql_where=text("state = 7")),
    # The latest rejections (the integration dashboard): only REJECTED rows.
    Index("ix_events_rejected", "processed_at", postgresql_where=text("state = 4")),
)

# The operators' audit trail: every skip and every retry of a blocked event, who, when and why.
interventions = Table(
    "interventions",
    metadata,
    Column("entity_type", SmallInteger, primary_key=True),
    Column("entity_id", Text, primary_key=True),
    Column("id", Uuid, primary_key=True),
    Column("sequence", BigInteger, nullable=False),
    Column("action", Text, nullable=False),
    Column("caller_id", Text, nullable=False),
    Column("reason", Text, nullable=False),
    # For an intervention on a BLOCKED event: the refusal that blocked it.
    Column("blocked_reason", Text, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
    CheckConstraint("action IN ('skip', 'retry')", name="action_known"),
)

# Entities waiting for a missing MSI: at most one row per entity (its lowest missing MSI).
gaps = Table(
    "gaps",
    metadata,
    Column("entity_type", SmallInteger, primary_key=True),
    Column("entity_id", Text, primary_key=True),
    Column("awaiting_sequence", BigInteger, nullable=False),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("alerted_at", DateTime(timezone=True), nullable=True),
    Index("ix_gaps_first_seen_at", "first_seen_at"),
)

# Idempotency records: the stored outcome of the first execution of (caller, key).
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("caller_id", Text, primary_key=True),
    Column("idempotency_key", Text, primary_key=True),
    Column("method", Text, nullable=False),
    Column("fingerprint", LargeBinary, nullable=False),
    # The request without its key, kept to name the differing fields when a key is reused.
    Column("request", LargeBinary, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response", LargeBinary, nullable=False),
    Column("transaction_id", Uuid, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_idempotency_keys_expires_at", "expires_at"),
)

# The outbox (docs/webhooks.md): who is told about outcomes, and what is still to tell them.
# Sink-neutral: `sink` names the dispatcher that serves a subscription ('webhook' here; the
# broker publishers add theirs) and `target` is what that sink sends to (a URL, a subject).
outbox_subscriptions = Table(
    "outbox_subscriptions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("sink", Text, nullable=False),
    Column("target", Text, nullable=False),
    # The event states reported (EventState numbers).
    Column("states", ARRAY(SmallInteger), nullable=False),
    # Only this entity type's events when set.
    Column("entity_type", SmallInteger, nullable=True),
    Column("description", Text, nullable=False, server_default=text("''")),
    # 1 ACTIVE, 2 DISABLED (WebhookSubscriptionState).
    Column("state", SmallInteger, nullable=False),
    # The signing secret, sealed (sequencer/webhooks.py: SecretBox); never returned by a read.
    Column("secret", LargeBinary, nullable=True),
    Column("created_by", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Since when every attempt has failed (NULL: the last one succeeded, or none was made).
    Column("failing_since", DateTime(timezone=True), nullable=True),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
    Column("disabled_reason", Text, nullable=True),
    CheckConstraint("state IN (1, 2)", name="state_known"),
)

# One row per (subscription, event state change) to report, written by the trigger on events
# in the transaction of the change (sequencer/sql/outbox_enqueue_v1.sql). It keeps what the
# change said (state, reason, version), since a BLOCKED event's row moves on when retried.
outbox_deliveries = Table(
    "outbox_deliveries",
    metadata,
    # Also the `webhook-id`: stable across retries.
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    # Commit order among one entity's deliveries of the same MSI (BLOCKED, then APPLIED).
    Column("position", BigInteger, Identity(always=True), nullable=False),
    Column(
        "subscription_id",
        Uuid,
        ForeignKey("outbox_subscriptions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("entity_type", SmallInteger, nullable=False),
    Column("entity_id", Text, nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("transaction_id", Uuid, nullable=False),
    Column("event_state", SmallInteger, nullable=False),
    Column("reason", Text, nullable=True),
    Column("reason_detail", Text, nullable=True),
    Column("entity_version", BigInteger, nullable=True),
    Column("processed_at", DateTime(timezone=True), nullable=True),
    Column("forward_attempts", Integer, nullable=True),
    Column("blocked_at", DateTime(timezone=True), nullable=True),
    Column("ledger_code", Text, nullable=True),
    # 1 PENDING, 2 DELIVERED, 3 FAILED (WebhookDeliveryState).
    Column("status", SmallInteger, nullable=False, server_default=text("1")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # Failed attempts since the delivery was (re)started: the position in the retry schedule.
    Column("step", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    # The dispatcher replica sending it, until when (a lease: a crashed sender's claim expires).
    Column("claimed_by", Text, nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Column("last_http_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("status IN (1, 2, 3)", name="status_known"),
    # The claim's work list: each (subscription, entity)'s lowest pending delivery.
    Index(
        "ix_outbox_deliveries_pending",
        "subscription_id",
        "entity_type",
        "entity_id",
        "sequence",
        "position",
        postgresql_where=text("status = 1"),
    ),
    Index("ix_outbox_deliveries_subscription_id_position", "subscription_id", "position"),
    # The retention sweep's work list: finished deliveries, oldest first.
    Index("ix_outbox_deliveries_finished", "created_at", postgresql_where=text("status <> 1")),
)

# Every attempt of a delivery: when, what came back, how long it took.
outbox_attempts = Table(
    "outbox_attempts",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column(
        "delivery_id",
        Uuid,
        ForeignKey("outbox_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempted_at", DateTime(timezone=True), nullable=False),
    Column("http_status", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("latency_seconds", Float, nullable=False),
    Column("replica", Text, nullable=False),
    Index("ix_outbox_attempts_delivery_id", "delivery_id"),
)
