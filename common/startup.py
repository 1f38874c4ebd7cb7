"""Start-up failures as one line: what is wrong and which setting to fix, never a traceback.

A misspelt setting, a `DATABASE_URL` with the wrong scheme, an unreachable or refusing database
server: the operator needs one sentence, not 170 lines of SQLAlchemy and psycopg frames. Used by
`python -m sequencer`, `python -m ledger` (serve and migrate) and `make up`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from common.settings import ConfigError

#: Exit status of a configuration error (a setting to fix) and of an unreachable database.
EXIT_CONFIG = 2
EXIT_DATABASE = 1


def redacted(url: str) -> str:
    """The URL with its password hidden (it goes to logs and terminals)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def database_problem(exc: BaseException, url: str) -> str | None:
    """One line for a database the process cannot use, or None when `exc` is something else."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError):
        return None
    # psycopg's message is several lines ("connection failed: ...\n\tIs the server running ...");
    # the first carries the cause (refused, host not resolved, password failed).
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return f"cannot use the database at DATABASE_URL={redacted(url)}: {first}"


def one_line(error: BaseException, url: str) -> tuple[str, int] | None:
    """The line and exit status for a start-up failure that needs no traceback."""
    if isinstance(error, ConfigError):
        return f"configuration error: {error}", EXIT_CONFIG
    problem = database_problem(error, url)
    if problem is not None:
        return problem, EXIT_DATABASE
    return None


def run(service: str, main: Callable[[], object], url: Callable[[], str]) -> None:
    """Runs `main`; a configuration or database failure exits with one line on stderr."""
    try:
        main()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        found = one_line(exc, url())
        if found is None:
            raise
        line, status = found
        print(f"{service}: {line}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None
