"""Engine creation, the migration guard, and driver-error classification by SQLSTATE."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import psycopg
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from common.errors import DeadlineReached, Retryable

T = TypeVar("T")
UNAVAILABLE = "the database is unavailable; retry with the same idempotency key"

# SQLSTATEs that mean "try the same transaction again".
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
UNIQUE_VIOLATION = "23505"
CHECK_VIOLATION = "23514"


# Constraint and index names both services' models get, so they are predictable in migrations
# and recognisable in driver errors.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class NotMigrated(RuntimeError):
    """The database schema is behind this code's migrations."""


def make_engine(url: str, *, pool_size: int = 10, application_name: str = "logistics") -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No ping per checkout (a round trip per transaction): a connection that died is
        # invalidated on first use, and that request fails as retryable.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"application_name": application_name},
    )


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, raw or wrapped by SQLAlchemy, if any."""
    if isinstance(exc, DBAPIError):
        return getattr(exc.orig, "sqlstate", None)
    if isinstance(exc, psycopg.Error):
        return exc.sqlstate
    return None


# Connection failures (08), insufficient resources (53), operator intervention such as a
# shutdown or "starting up" (57): the database is away for a while, not wrong.
TRANSIENT_CLASSES = ("08", "53", "57")


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying by the caller with the same key: serialization failures and
    deadlocks, lost or refused connections (which carry no SQLSTATE), a server shutting down or
    starting up, exhausted resources. The one classifier for both services."""
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, DBAPIError | psycopg.Error):
        return False
    state = sqlstate(exc)
    if state in RETRYABLE_SQLSTATES or (state is not None and state[:2] in TRANSIENT_CLASSES):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    # No SQLSTATE: the driver lost (or never had) its connection.
    return state is None and isinstance(exc, DBAPIError | psycopg.OperationalError | psycopg.InterfaceError)


def constraint_name(exc: BaseException) -> str | None:
    if isinstance(exc, DBAPIError):
        diag = getattr(exc.orig, "diag", None)
        return getattr(diag, "constraint_name", None)
    return None


def alembic_config(migrations_dir: Path, url: str, schema: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["schema"] = schema
    return cfg


async def require_migrated(engine: AsyncEngine, migrations_dir: Path, schema: str) -> None:
    """Refuses to serve on a database whose schema is not at this code's migration head."""
    head = ScriptDirectory.from_config(alembic_config(migrations_dir, "", schema)).get_current_head()
    async with engine.connect() as conn:
        exists = await conn.scalar(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": f"{schema}.alembic_version"})
        current = None
        if exists:
            current = await conn.scalar(text(f'SELECT version_num FROM "{schema}".alembic_version'))
    if current != head:
        raise NotMigrated(
            f"schema {schema!r} is at revision {current or 'none'} but this code needs {head}; "
            f"run `make migrate` (or `python -m {schema} migrate`) first"
        )


def libpq_url(url: str) -> str:
    """The same database as a plain libpq URL, for raw psycopg connections (LISTEN, admin)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def translate(exc: BaseException) -> BaseException:
    """A driver error as the domain sees it: a lock wait that outlived the deadline, a transient
    failure (UNAVAILABLE, reason TRANSIENT), or the error itself (a bug: INTERNAL)."""
    state = sqlstate(exc)
    if state in (LOCK_NOT_AVAILABLE, QUERY_CANCELED):
        return DeadlineReached("gave up waiting for a concurrent request within the deadline")
    if is_transient(exc):
        return Retryable(UNAVAILABLE)
    return exc


async def transaction(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]], retries: int = 2) -> T:
    """Runs `work` in one transaction; serialization failures and deadlocks are retried, other
    driver errors translated. Callers carry out side effects only after this returns."""
    for attempt in range(retries + 1):
        try:
            async with engine.begin() as conn:
                return await work(conn)
        except (DBAPIError, OSError) as exc:
            if sqlstate(exc) in RETRYABLE_SQLSTATES and attempt < retries:
                continue
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def reading(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reads outside a transaction, with driver errors translated."""
    try:
        async with engine.connect() as conn:
            yield conn
    except (DBAPIError, OSError) as exc:
        translated = translate(exc)
        if translated is exc:
            raise
        raise translated from exc
