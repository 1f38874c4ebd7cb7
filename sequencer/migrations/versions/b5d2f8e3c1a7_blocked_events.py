"""blocked events: EVENT_STATE_BLOCKED, forwarding attempts, the operators' audit trail

An event the ledger keeps refusing in a way retrying cannot fix becomes BLOCKED (7) after
SEQUENCER_BLOCK_AFTER attempts, with the refusal's code, reason and message; its entity stops
there. Adds the attempt count and the blocked time to events, an index of blocked events (the
admin list and the gauge), the `interventions` table (who skipped or retried what, when, why),
and `lock_submissions_v3` (body in sequencer/sql/), whose held rows carry their state so the
rules can tell a blocked event. `lock_submissions_v2` stays for replicas of the previous release
during a rolling upgrade; a later revision drops it.

Revision ID: b5d2f8e3c1a7
Revises: a4e7c2d91f35
"""

from pathlib import Path

import sqlalchemy as sa
from alembic import op

from common.migrate import sql_function

revision = "b5d2f8e3c1a7"
down_revision = "a4e7c2d91f35"
branch_labels = None
depends_on = None

SERVICE = Path(__file__).resolve().parents[2]
FUNCTIONS = ["lock_submissions_v3"]
SIGNATURES = [
    "sequencer.lock_submissions_v3(text[], text[], smallint[], text[], bigint[], boolean, text, timestamptz)",
]


def upgrade() -> None:
    op.drop_constraint(op.f("ck_events_state_known"), "events", schema="sequencer", type_="check")
    op.create_check_constraint(op.f("ck_events_state_known"), "events", "state BETWEEN 1 AND 7", schema="sequencer")
    op.add_column(
        "events",
        sa.Column("forward_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        schema="sequencer",
    )
    op.add_column("events", sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True), schema="sequencer")
    op.add_column("events", sa.Column("ledger_code", sa.Text(), nullable=True), schema="sequencer")
    op.create_index(
        "ix_events_blocked",
        "events",
        ["blocked_at", "entity_type", "entity_id"],
        schema="sequencer",
        postgresql_where=sa.text("state = 7"),
    )
    op.create_table(
        "interventions",
        sa.Column("entity_type", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("caller_id", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("blocked_reason", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("action IN ('skip', 'retry')", name=op.f("ck_interventions_action_known")),
        sa.PrimaryKeyConstraint("entity_type", "entity_id", "id", name=op.f("pk_interventions")),
        schema="sequencer",
    )
    for name in FUNCTIONS:
        op.execute(sql_function(SERVICE, name))


def downgrade() -> None:
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
    op.drop_table("interventions", schema="sequencer")
    op.drop_index("ix_events_blocked", "events", schema="sequencer")
    op.drop_column("events", "ledger_code", schema="sequencer")
    op.drop_column("events", "blocked_at", schema="sequencer")
    op.drop_column("events", "forward_attempts", schema="sequencer")
    op.execute("DELETE FROM sequencer.events WHERE state = 7")
    op.drop_constraint(op.f("ck_events_state_known"), "events", schema="sequencer", type_="check")
    op.create_check_constraint(op.f("ck_events_state_known"), "events", "state BETWEEN 1 AND 6", schema="sequencer")
