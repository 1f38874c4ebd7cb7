"""event traceparent: the W3C trace context an event was accepted under

The ingress batch stores the `traceparent` of the accepting call (the caller's, or a new trace's)
with each event, and the forwarder sends it on to the ledger per item, so one trace spans
accept, park, forward and apply (docs/observability.md). Nullable: rows accepted before this
revision, skip markers and calls without a recorded trace have none. Additive only: a replica of
the previous release neither writes nor reads it.

Revision ID: c7e4a9d2b6f1
Revises: c8e4b1f2a6d3
"""

import sqlalchemy as sa
from alembic import op

revision = "c7e4a9d2b6f1"
down_revision = "c8e4b1f2a6d3"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("traceparent", sa.Text(), nullable=True), schema="sequencer")


def downgrade() -> None:
    op.drop_column("events", "traceparent", schema="sequencer")
