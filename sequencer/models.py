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
    CheckConstraint("sequence >= 1", name="sequence_positive"),
    CheckConstraint("state BETWEEN 1 AND 7", name="state_known"),
    Index("ix_events_transaction_id", "transaction_id"),
    # The forwarder's work list: only QUEUED rows, so it stays tiny.
    Index("ix_events_queued", "queued_at", postgresql_where=text("state = 2")),
    # Blocked events, oldest first (the admin list, the gauge): only BLOCKED rows.
    Index("ix_events_blocked", "blocked_at", "entity_type", "entity_id", postgresql_where=text("state = 7")),
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
