"""A private PostgreSQL cluster that a test (or `make chaos`) owns, so it may crash it.

initdb into a temporary folder, listening on a unix socket in that folder only (no port is
shared or raced for); `stop()` is `pg_ctl stop -m immediate`, as a crash or failover would be.
Both services' schemas are migrated once into a template; `fresh_database()` clones it."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

from common.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "logistics_template"


def _bindir() -> Path:
    """PostgreSQL's server binaries: the system's (newest version), else pgserver's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    from pgserver._commands import POSTGRES_BIN_PATH  # the project's embedded server

    return Path(POSTGRES_BIN_PATH)


class Cluster:
    """A private PostgreSQL cluster on a unix socket; root runs it as the `postgres` user."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-private-"))
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else None
        self._template = False
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    def _command(self, tool: str, *args: str) -> list[str]:
        # runuser, not subprocess's user=: that makes Python fork() instead of vfork(), and a
        # fork of a process with gRPC threads running may crash the child (pg_ctl died SIGSEGV).
        prefix = ["runuser", "-u", self.user, "--"] if self.user is not None else []
        return [*prefix, str(self.bindir / tool), *args]

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(self._command(tool, *args), check=True, capture_output=True, cwd=self.dir, timeout=60)

    def start(self) -> None:
        # fsync=off loses nothing when only PostgreSQL crashes (the kernel keeps what was written);
        # room for both services' pools, a replica restarted while the old one's sessions linger.
        options = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=300"
        self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options)

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "30", "-D", str(self.data), "-m", "immediate")

    def url_of(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.dir}"

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def fresh_database(self) -> str:
        """A new database with both schemas at head (cloned from a template migrated once)."""
        admin = f"postgresql://postgres@/postgres?host={self.dir}"
        if not self._template:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
            for service in ("ledger", "sequencer"):
                upgrade(ROOT / service / "migrations", self.url_of(TEMPLATE), service)
            self._template = True
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        return self.url_of(name)

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                self._command("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate"),
                capture_output=True,
                cwd=self.dir,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.dir, ignore_errors=True)
