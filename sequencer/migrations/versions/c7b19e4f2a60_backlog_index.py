"""backlog index: held events (PARKED, QUEUED, BLOCKED) for the admission bound of SPEC 12

The sequencer counts its backlog about once a second (sequencer/admission.py); this partial index
holds only the rows it counts, so the count costs what the backlog is, not what the table is.
Additive: no statement of an earlier release depends on it.

Revision ID: c7b19e4f2a60
Revises: b5d2f8e3c1a7
"""

from alembic import op

revision = "c7b19e4f2a60"
down_revision = "b5d2f8e3c1a7"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX ix_events_held ON sequencer.events (state) WHERE state IN (1, 2, 7)")


def downgrade() -> None:
    op.execute("DROP INDEX sequencer.ix_events_held")
