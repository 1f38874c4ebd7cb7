"""outbox: webhook (and later broker) subscriptions, their deliveries and attempts

Adds the outbox tables and `outbox_enqueue_v1` (body in sequencer/sql/), a statement-level
trigger function on sequencer.events after INSERT and after UPDATE: every event entering a
reported state gets its deliveries in the transaction of the change (docs/webhooks.md).
Additive only: the write paths of the previous release keep working and are covered too.

Revision ID: c3b8e1f0a6d2
Revises: c7b19e4f2a60
"""

from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from common.migrate import sql_function

revision = "c3b8e1f0a6d2"
down_revision = "c7b19e4f2a60"
branch_labels = None
depends_on = None

SERVICE = Path(__file__).resolve().parents[2]
S = "sequencer"


def upgrade() -> None:
    op.create_table(
        "outbox_subscriptions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("sink", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("states", postgresql.ARRAY(sa.SmallInteger()), nullable=False),
        sa.Column("entity_type", sa.SmallInteger(), nullable=True),
        sa.Column("description", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN (1, 2)", name=op.f("ck_outbox_subscriptions_state_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_subscriptions")),
        schema=S,
    )
    op.create_table(
        "outbox_deliveries",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("position", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("subscription_id", sa.Uuid(), nullable=False),
        sa.Column("entity_type", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.Text(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("transaction_id", sa.Uuid(), nullable=False),
        sa.Column("event_state", sa.SmallInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("reason_detail", sa.Text(), nullable=True),
        sa.Column("entity_version", sa.BigInteger(), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("forward_attempts", sa.Integer(), nullable=True),
        sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ledger_code", sa.Text(), nullable=True),
        sa.Column("status", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("step", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_http_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN (1, 2, 3)", name=op.f("ck_outbox_deliveries_status_known")),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            [f"{S}.outbox_subscriptions.id"],
            name=op.f("fk_outbox_deliveries_subscription_id_outbox_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_deliveries")),
        schema=S,
    )
    op.create_index(
        "ix_outbox_deliveries_pending",
        "outbox_deliveries",
        ["subscription_id", "entity_type", "entity_id", "sequence", "position"],
        schema=S,
        postgresql_where=sa.text("status = 1"),
    )
    op.create_index(
        "ix_outbox_deliveries_subscription_id_position",
        "outbox_deliveries",
        ["subscription_id", "position"],
        schema=S,
    )
    op.create_index(
        "ix_outbox_deliveries_finished",
        "outbox_deliveries",
        ["created_at"],
        schema=S,
        postgresql_where=sa.text("status <> 1"),
    )
    op.create_table(
        "outbox_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("delivery_id", sa.Uuid(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_seconds", sa.Float(), nullable=False),
        sa.Column("replica", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            [f"{S}.outbox_deliveries.id"],
            name=op.f("fk_outbox_attempts_delivery_id_outbox_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_attempts")),
        schema=S,
    )
    op.create_index("ix_outbox_attempts_delivery_id", "outbox_attempts", ["delivery_id"], schema=S)
    op.execute(sql_function(SERVICE, "outbox_enqueue_v1"))
    # Statement-level with transition tables: one execution per statement, however many rows.
    op.execute(
        "CREATE TRIGGER outbox_enqueue_on_update AFTER UPDATE ON sequencer.events "
        "REFERENCING OLD TABLE AS previous_rows NEW TABLE AS changed_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION sequencer.outbox_enqueue_v1()"
    )
    op.execute(
        "CREATE TRIGGER outbox_enqueue_on_insert AFTER INSERT ON sequencer.events "
        "REFERENCING NEW TABLE AS inserted_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION sequencer.outbox_enqueue_v1()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER outbox_enqueue_on_insert ON sequencer.events")
    op.execute("DROP TRIGGER outbox_enqueue_on_update ON sequencer.events")
    op.execute("DROP FUNCTION sequencer.outbox_enqueue_v1()")
    op.drop_table("outbox_attempts", schema=S)
    op.drop_table("outbox_deliveries", schema=S)
    op.drop_table("outbox_subscriptions", schema=S)
