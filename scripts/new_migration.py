"""Autogenerates a migration for one service against DATABASE_URL (a database at head).

Usage: DATABASE_URL=... python scripts/new_migration.py sequencer|ledger "message"
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command

from common.db import alembic_config
from common.settings import database_url

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    service, message = sys.argv[1], sys.argv[2]
    cfg = alembic_config(ROOT / service / "migrations", database_url(), service)
    command.revision(cfg, message=message, autogenerate=True)
