"""batched ingress: every lock of a batch of submissions in one sorted order

Adds `lock_submissions_v2` (body in sequencer/sql/), which the group commit of SubmitEvent and
SubmitEvents calls once per batch: every lock of the batch in one sorted order, then what the
sequencing rules need, read after the locks. The functions of 5c1f0e2a9b7d stay for the skip and outcome
steps (and for replicas of the previous release during a rolling upgrade).

Revision ID: 8d3a61c0f4b2
Revises: 5c1f0e2a9b7d
"""

from pathlib import Path

from alembic import op

from common.migrate import sql_function

revision = "8d3a61c0f4b2"
down_revision = "5c1f0e2a9b7d"
branch_labels = None
depends_on = None

SERVICE = Path(__file__).resolve().parents[2]
FUNCTIONS = ["lock_submissions_v2"]
SIGNATURES = [
    "sequencer.lock_submissions_v2(text[], text[], smallint[], text[], bigint[], boolean, text, timestamptz)",
]


def upgrade() -> None:
    for name in FUNCTIONS:
        op.execute(sql_function(SERVICE, name))


def downgrade() -> None:
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
