"""python -m ledger [serve|migrate]"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from common import startup
from common.migrate import upgrade
from common.settings import database_url
from ledger import server

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def main(argv: list[str]) -> None:
    command = argv[0] if argv else "serve"
    if command == "migrate":
        upgrade(MIGRATIONS, database_url(), "ledger")
    elif command == "serve":
        asyncio.run(server.main())
    else:
        sys.exit(f"usage: python -m ledger [serve|migrate], not {command!r}")


if __name__ == "__main__":
    # A bad setting or an unusable DATABASE_URL is one line on stderr, not a traceback.
    startup.run("ledger", lambda: main(sys.argv[1:]), lambda: os.environ.get("DATABASE_URL", ""))
