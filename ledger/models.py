"""The ledger's tables: per-entity versions, the append-only history, shipments, inventory.

Every per-entity table is keyed by the entity id first (shipment id or SKU), so the schema can
be distributed and co-located by entity (Citus) without changing a statement. The inventory
invariants are CHECK constraints as well as code: a bug in the rules fails the transaction
instead of storing an illegal balance.
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
    text,
)

from common.db import NAMING_CONVENTION

SCHEMA = "ledger"

metadata = MetaData(schema=SCHEMA, naming_convention=NAMING_CONVENTION)

# One row per entity: the last MSI processed (applied, rejected or skipped). The compare-and-set
# target, and the row the "row" lock strategy locks.
entity_versions = Table(
    "entity_versions",
    metadata,
    Column("entity_type", SmallInteger, primary_key=True),
    Column("entity_id", Text, primary_key=True),
    Column("version", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("version >= 0", name="version_non_negative"),
    CheckConstraint("entity_type IN (1, 2)", name="entity_type_known"),
)

# Append-only: one row per processed MSI, with the outcome a re-sent event is answered with.
entity_history = Table(
    "entity_history",
    metadata,
    Column("entity_type", SmallInteger, primary_key=True),
    Column("entity_id", Text, primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    # The payload kind (e.g. "shipment_loaded"), or "skip".
    Column("kind", Text, nullable=False),
    # logistics.ledger.v1.ApplyOutcome: 1 APPLIED, 2 REJECTED, 4 SKIPPED.
    Column("outcome", SmallInteger, nullable=False),
    Column("reason", Text, nullable=False, server_default=text("''")),
    Column("reason_detail", Text, nullable=False, server_default=text("''")),
    Column("correlation_id", Text, nullable=False, server_default=text("''")),
    Column("transaction_id", Text, nullable=False, server_default=text("''")),
    Column("source", Text, nullable=False, server_default=text("''")),
    Column("occurred_at", DateTime(timezone=True), nullable=True),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    # sha256 of the deterministic serialization: tells a re-send from a conflicting event.
    Column("payload_hash", LargeBinary, nullable=False),
    CheckConstraint("sequence >= 1", name="sequence_positive"),
    CheckConstraint("outcome IN (1, 2, 4)", name="outcome_known"),
    CheckConstraint("outcome = 2 OR reason = ''", name="reason_only_on_rejection"),
)

shipments = Table(
    "shipments",
    metadata,
    Column("shipment_id", Text, primary_key=True),
    # logistics.ledger.v1.ShipmentStatus (1 CREATED .. 7 CANCELLED).
    Column("status", SmallInteger, nullable=False),
    Column("order_id", Text, nullable=False, server_default=text("''")),
    Column("origin", Text, nullable=False, server_default=text("''")),
    Column("destination", Text, nullable=False, server_default=text("''")),
    Column("warehouse_id", Text, nullable=False, server_default=text("''")),
    Column("package_count", Integer, nullable=False, server_default=text("0")),
    Column("vehicle_id", Text, nullable=False, server_default=text("''")),
    Column("carrier", Text, nullable=False, server_default=text("''")),
    Column("tracking_number", Text, nullable=False, server_default=text("''")),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("received_by", Text, nullable=False, server_default=text("''")),
    Column("cancel_reason", Text, nullable=False, server_default=text("''")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("status BETWEEN 1 AND 7", name="status_known"),
    CheckConstraint("package_count >= 0", name="package_count_non_negative"),
)

# Balances per (SKU, location). The invariants hold in every committed state.
inventory_balances = Table(
    "inventory_balances",
    metadata,
    Column("sku", Text, primary_key=True),
    Column("location", Text, primary_key=True),
    Column("on_hand", BigInteger, nullable=False, server_default=text("0")),
    Column("reserved", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("on_hand >= 0", name="on_hand_non_negative"),
    CheckConstraint("reserved >= 0", name="reserved_non_negative"),
    CheckConstraint("reserved <= on_hand", name="reserved_within_on_hand"),
)

# Reservations, unique per SKU; a released one is kept (released_at set) so its id is never
# reused and a second release is recognised.
inventory_reservations = Table(
    "inventory_reservations",
    metadata,
    Column("sku", Text, primary_key=True),
    Column("reservation_id", Text, primary_key=True),
    Column("location", Text, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("released_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("quantity > 0", name="quantity_positive"),
    Index("ix_inventory_reservations_open", "sku", "location", postgresql_where=text("released_at IS NULL")),
)
