"""Runs a service's alembic migrations from code (no alembic.ini needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from sqlalchemy import MetaData, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from common.db import alembic_config


def upgrade(migrations_dir: Path, url: str, schema: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(migrations_dir, url, schema), revision)


def downgrade(migrations_dir: Path, url: str, schema: str, revision: str) -> None:
    command.downgrade(alembic_config(migrations_dir, url, schema), revision)


def run_env(metadata: MetaData) -> None:
    """The body of every service's migrations/env.py: async engine, own schema and version table."""
    cfg = context.config
    schema: str = cfg.attributes["schema"]
    url = cfg.get_main_option("sqlalchemy.url")
    assert url

    def do_run(conn: Connection) -> None:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        context.configure(
            connection=conn,
            target_metadata=metadata,
            version_table_schema=schema,
            include_schemas=True,
            include_name=lambda name, type_, _parent: type_ != "schema" or name == schema,
        )
        with context.begin_transaction():
            # One migrator at a time, whichever replica or `make up` runs it.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"migrate:{schema}"})
            context.run_migrations()

    async def run() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as conn:
            await conn.run_sync(do_run)
            await conn.commit()
        await engine.dispose()

    existing = cfg.attributes.get("connection")
    if existing is not None:
        do_run(existing)
    else:
        asyncio.run(run())


def sql_function(service_dir: Path, name: str) -> str:
    """The CREATE FUNCTION statement of `name` from the service's sql/ folder. Files there are
    written as pg_get_functiondef prints them (a test compares the two), and a versioned file
    never changes once landed: a new version is a new file and a new revision."""
    return (service_dir / "sql" / f"{name}.sql").read_text()
