"""batched forwarding: the outcomes of one ApplyEvents batch recorded in one statement

Adds `record_outcomes_v1` (body in sequencer/sql/), which the forwarder calls once per batch the
ledger answered: every outcome recorded, watermarks moved, parked successors released, leases
renewed or handed back. `record_outcome` of 5c1f0e2a9b7d stays for replicas of the previous
release during a rolling upgrade; a later revision drops it.

Revision ID: a4e7c2d91f35
Revises: 8d3a61c0f4b2
"""

from pathlib import Path

from alembic import op

from common.migrate import sql_function

revision = "a4e7c2d91f35"
down_revision = "8d3a61c0f4b2"
branch_labels = None
depends_on = None

SERVICE = Path(__file__).resolve().parents[2]
FUNCTIONS = ["record_outcomes_v1"]
SIGNATURES = [
    "sequencer.record_outcomes_v1(smallint[], text[], bigint[], smallint[], text[], text[], bigint[], boolean, "
    "timestamptz, text, timestamptz, timestamptz)",
]


def upgrade() -> None:
    for name in FUNCTIONS:
        op.execute(sql_function(SERVICE, name))


def downgrade() -> None:
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
