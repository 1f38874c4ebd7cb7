"""PostgreSQL for a run: DATABASE_URL if set, else the embedded server; a fresh database per
run (migrated like production, dropped at the end)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from bench.processes import ROOT
from common import embedded_pg
from common.migrate import upgrade

DATA_DIR = ROOT / ".pgdata-bench"
SERVICES = ("ledger", "sequencer")


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str, name: str, driver: str = "postgresql+psycopg") -> str:
    return make_url(url).set(drivername=driver, database=name).render_as_string(hide_password=False)


@dataclass
class Database:
    """The run's database: a SQLAlchemy URL for the services, a libpq one for psycopg/pgbench."""

    admin_url: str
    name: str
    where: str
    server: Any = None

    @property
    def url(self) -> str:
        return with_database(self.admin_url, self.name)

    @property
    def libpq_url(self) -> str:
        return with_database(self.admin_url, self.name, "postgresql")

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.libpq_url, autocommit=True)

    def drop(self) -> None:
        with psycopg.connect(libpq(self.admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self.server is not None:
            self.server.cleanup()
            self.server = None


def provision(data_dir: Path = DATA_DIR) -> Database:
    """Creates `bench_<random>` on DATABASE_URL's server (or the embedded one) and migrates both
    services' schemas into it."""
    url = os.environ.get("DATABASE_URL", "").strip()
    server = None
    if url:
        where = "DATABASE_URL"
    else:
        server = embedded_pg.start(data_dir, stop_at_exit=True)
        url = server.get_uri()
        where = f"embedded PostgreSQL ({data_dir.name})"
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db = Database(url, name, where, server)
    try:
        for service in SERVICES:
            upgrade(ROOT / service / "migrations", db.url, service)
    except BaseException:
        db.drop()
        raise
    return db


def server_settings(db: Database) -> dict[str, str]:
    """The PostgreSQL settings that shape the numbers, for the report."""
    names = (
        "server_version", "max_connections", "shared_buffers", "synchronous_commit", "fsync", "wal_level", "autovacuum"
    )  # fmt: skip
    with db.connect() as conn:
        return {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]
