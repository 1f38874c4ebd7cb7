"""Real PostgreSQL for every test: DATABASE_URL when set, else the embedded server.

Migrations run once into a template database; each test that needs commits across connections
gets its own database cloned from it (CREATE DATABASE ... TEMPLATE takes milliseconds).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from common import embedded_pg
from common.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("ledger", "sequencer")


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_db(url: str, name: str) -> str:
    return make_url(url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A superuser URL of the server the tests use."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    server = embedded_pg.start(ROOT / ".pgdata-test", stop_at_exit=True)
    yield server.get_uri()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    name = f"logistics_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(pg_admin_url, name)
    for service in SERVICES:
        upgrade(ROOT / service / "migrations", url, service)
    yield name
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test (SQLAlchemy psycopg URL)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _with_db(pg_admin_url, name)
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (migration tests)."""
    name = f"e_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _with_db(pg_admin_url, name)
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sequencer_settings(database_url: str) -> Any:
    from tests.support import sequencer_test_settings

    return sequencer_test_settings(database_url)


@pytest.fixture(params=["advisory", "row"])
def lock_strategy(request: pytest.FixtureRequest) -> str:
    """Both per-entity serialisation strategies (SPEC 9)."""
    return str(request.param)


@pytest.fixture
async def system(database_url: str, sequencer_settings: Any) -> Any:
    """Ledger and sequencer, real servers on 127.0.0.1 port 0, sharing one fresh database."""
    from tests.support import System

    system = await System.start(database_url, sequencer_settings)
    yield system
    await system.stop()
