"""rejections index: the recent rejections of the integration dashboard (SPEC 15)

A partial index of REJECTED events by processing time, so "the latest rejections" is an index
scan instead of a scan of every event. Rejections are rare, so the index stays small; `state` is
already in the predicates of ix_events_queued and ix_events_blocked, so state changes were not
HOT updates before either and the write path pays little more.

Revision ID: c8e4b1f2a6d3
Revises: c3b8e1f0a6d2
"""

import sqlalchemy as sa
from alembic import op

revision = "c8e4b1f2a6d3"
down_revision = "c3b8e1f0a6d2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_events_rejected",
        "events",
        ["processed_at"],
        schema="sequencer",
        postgresql_where=sa.text("state = 4"),
    )


def downgrade() -> None:
    op.drop_index("ix_events_rejected", "events", schema="sequencer")
