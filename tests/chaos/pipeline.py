"""The system under test (a private PostgreSQL cluster, one ledger, sequencer replicas, all real
processes) and the faults injected into it. Each fault returns with everything running again;
what happened meanwhile is left for the audit to judge."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from common.db import libpq_url
from tests.chaos.audit import HELD
from tests.cluster import Cluster
from tests.processes import ServiceProcess, start_ledger, start_sequencer

# Short deadlines so that a paused process outlives them: the forwarder's ApplyEvent deadline,
# and a replica's claim on an entity's forwarding.
LEDGER_TIMEOUT = 1.0
FORWARDER_LEASE = 2.0
SEQUENCER_ENV = {
    "SEQUENCER_LEDGER_TIMEOUT": str(LEDGER_TIMEOUT),
    "SEQUENCER_FORWARDER_LEASE": str(FORWARDER_LEASE),
    "SEQUENCER_FORWARDER_RETRY_BUDGET": "1",
}
KEEP_LOGS = 2000


class Pipeline:
    def __init__(self, cluster: Cluster, database_url: str, replicas: int = 2) -> None:
        self.cluster = cluster
        self.url = database_url
        self.replicas = replicas
        self.ledger: ServiceProcess | None = None
        self.sequencers: list[ServiceProcess] = []
        self._monitor: psycopg.AsyncConnection[Any] | None = None

    async def start(self) -> None:
        self.ledger = await asyncio.to_thread(start_ledger, self.url, keep=KEEP_LOGS)
        self.sequencers = list(await asyncio.gather(*(self._sequencer() for _ in range(self.replicas))))

    async def _sequencer(self) -> ServiceProcess:
        assert self.ledger is not None
        return await asyncio.to_thread(start_sequencer, self.url, self.ledger.port, keep=KEEP_LOGS, **SEQUENCER_ENV)

    async def backlog(self) -> int | None:
        """Events accepted and not yet processed (None while the database is away): only for
        pacing the load, never for judging the outcome."""
        try:
            if self._monitor is None or self._monitor.closed:
                self._monitor = await psycopg.AsyncConnection.connect(
                    libpq_url(self.url), autocommit=True, connect_timeout=2, application_name="chaos-monitor"
                )
            cursor = await self._monitor.execute("SELECT count(*) FROM sequencer.events WHERE state = ANY(%s)", (HELD,))
            row = await cursor.fetchone()
        except (psycopg.Error, OSError):
            if self._monitor is not None:
                await self._monitor.close()
            return None
        return int(row[0]) if row else None

    async def close_monitor(self) -> None:
        if self._monitor is not None:
            await self._monitor.close()

    def addresses(self) -> list[str]:
        return [s.address for s in self.sequencers]

    def stop(self) -> None:
        for proc in [*self.sequencers, *([self.ledger] if self.ledger else [])]:
            proc.kill()

    def tail(self, lines: int = 20) -> str:
        """The last log lines of every live process, for a failure's message."""
        procs = [*([self.ledger] if self.ledger else []), *self.sequencers]
        return "\n".join(f"--- {p.name} {p.address}\n" + "\n".join(p.raw[-lines:]) for p in procs)


Fault = Callable[[Pipeline, random.Random], Awaitable[str]]


async def pg_crash(pipeline: Pipeline, rng: random.Random) -> str:
    """PostgreSQL killed (`pg_ctl stop -m immediate`: no checkpoint, every session cut), down for
    a moment, then started again (crash recovery) under the services' feet."""
    await asyncio.to_thread(pipeline.cluster.stop)
    down = rng.uniform(0.5, 1.5)
    await asyncio.sleep(down)
    await asyncio.to_thread(pipeline.cluster.start)
    return f"down {down:.1f} s"


async def pg_terminate(pipeline: Pipeline, rng: random.Random) -> str:
    """pg_terminate_backend of every session of the services' database (both services' pools,
    the ingress workers, the LISTEN connection), this one excepted."""

    def terminate() -> str:
        with psycopg.connect(libpq_url(pipeline.url), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchall()
        names = sorted({name or "-" for name, _ in rows})
        return f"{len(rows)} sessions ({', '.join(names)})"

    return await asyncio.to_thread(terminate)


def _pause(proc: ServiceProcess) -> None:
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGSTOP)


def _resume(proc: ServiceProcess) -> None:
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGCONT)


async def ledger_pause(pipeline: Pipeline, rng: random.Random) -> str:
    """The ledger frozen (SIGSTOP) for longer than the forwarder's deadline: calls in flight
    end in DEADLINE_EXCEEDED without the sequencer knowing whether they were applied, and the
    ledger carries them out when it resumes (SIGCONT)."""
    assert pipeline.ledger is not None
    paused = rng.uniform(2.0, 3.0) * LEDGER_TIMEOUT
    _pause(pipeline.ledger)
    try:
        await asyncio.sleep(paused)
    finally:
        _resume(pipeline.ledger)
    return f"paused {paused:.1f} s"


async def sequencer_pause(pipeline: Pipeline, rng: random.Random) -> str:
    """One replica frozen (SIGSTOP) for longer than its forwarding lease while it holds work
    (each replica forwards what it accepted, and the load goes to both): the other replica
    takes its entities over; when it resumes (SIGCONT) it still believes in its old leases
    and its ApplyEvent calls and outcome writes in flight go on."""
    victim = rng.choice(pipeline.sequencers)
    paused = FORWARDER_LEASE + rng.uniform(1.0, 2.0)
    _pause(victim)
    try:
        await asyncio.sleep(paused)
    finally:
        _resume(victim)
    return f"{victim.address} paused {paused:.1f} s"


async def ledger_kill(pipeline: Pipeline, rng: random.Random) -> str:
    """kill -9 of the ledger while batches are in flight, then a new ledger on the same port
    (the sequencers' target) after a moment."""
    assert pipeline.ledger is not None
    port = pipeline.ledger.port
    await asyncio.to_thread(pipeline.ledger.kill)
    down = rng.uniform(0.2, 1.5)
    await asyncio.sleep(down)
    pipeline.ledger = await asyncio.to_thread(start_ledger, pipeline.url, port, keep=KEEP_LOGS)
    return f"down {down:.1f} s"


async def sequencer_kill(pipeline: Pipeline, rng: random.Random) -> str:
    """kill -9 of one replica while it accepts and forwards (no lease handed back, answers lost
    in flight), then a new replica in its place."""
    index = rng.randrange(len(pipeline.sequencers))
    victim = pipeline.sequencers[index]
    await asyncio.to_thread(victim.kill)
    pipeline.sequencers[index] = await pipeline._sequencer()
    return f"{victim.address} replaced by {pipeline.sequencers[index].address}"


FAULTS: dict[str, Fault] = {
    "pg_crash": pg_crash,
    "pg_terminate": pg_terminate,
    "ledger_pause": ledger_pause,
    "sequencer_pause": sequencer_pause,
    "ledger_kill": ledger_kill,
    "sequencer_kill": sequencer_kill,
}
