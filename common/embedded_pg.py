"""The zero-setup PostgreSQL: pgserver, with its data in a git-ignored folder of the checkout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url


def start(data_dir: Path, *, stop_at_exit: bool = True) -> Any:
    """Starts (or reuses) the embedded server; its data survives restarts."""
    from pgserver import get_server  # lazily: only the embedded path needs it

    data_dir.mkdir(parents=True, exist_ok=True)
    return get_server(data_dir, cleanup_mode="stop" if stop_at_exit else None)


def ensure_database(admin_url: str, name: str) -> str:
    """Creates database `name` if missing; returns its SQLAlchemy URL."""
    url = make_url(admin_url)
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
