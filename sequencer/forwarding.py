"""The forwarder's store: what entities have to forward, their leases, and recording the
ledger's outcomes of a batch (which releases parked successors). Owns these statements, each a
transaction of its own, none held across a ledger call; the forwarder owns the calls."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import db
from common.clock import Clock
from common.errors import DeadlineReached, Retryable
from sequencer import hints
from sequencer import repository as repo
from sequencer.config import Settings
from sequencer.hints import Change
from sequencer.metrics import SequencerMetrics
from sequencer.repository import EntityKey, Outcome
from sequencer.states import BLOCKED, QUEUED, state_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedEvent:
    """An event to forward: an entity's queued event, or a parked successor sent right after it
    in the same batch (the ledger applies them in MSI order)."""

    entity_type: int
    entity_id: str
    sequence: int
    transaction_id: uuid.UUID
    event: bytes
    correlation_id: str
    skip_reason: str | None
    # The trace the event was accepted (or parked) under: its forward span continues it.
    traceparent: str | None = None

    @property
    def key(self) -> EntityKey:
        return (self.entity_type, self.entity_id)

    @classmethod
    def from_row(cls, row: Row[Any]) -> QueuedEvent:
        return cls(
            row.entity_type,
            row.entity_id,
            row.sequence,
            row.transaction_id,
            row.event,
            row.correlation_id,
            row.skip_reason,
            row.traceparent,
        )


@dataclass(frozen=True)
class Refused:
    """A refused attempt counted against an entity's queued event."""

    key: EntityKey
    sequence: int
    transaction_id: uuid.UUID
    attempts: int
    blocked: bool


@dataclass(frozen=True)
class Recorded:
    """What recording a batch's outcomes did to one entity."""

    key: EntityKey
    # The watermark before and after: outcomes in between were recorded by this batch.
    previous: int
    watermark: int
    # The parked successor now QUEUED, if any: the entity has more to forward.
    released: uuid.UUID | None
    lease_kept: bool


def chains(rows: Sequence[Row[Any]]) -> dict[EntityKey, list[QueuedEvent]]:
    """Per entity, what may be forwarded now: its QUEUED event (the direct successor of the
    watermark) and the consecutive held successors after it; nothing when the direct successor
    is not queued. `rows` are repo.forwardable's, in (entity, MSI) order."""
    found: dict[EntityKey, list[QueuedEvent]] = {}
    for row in rows:
        key = (int(row.entity_type), str(row.entity_id))
        chain = found.setdefault(key, [])
        expected = int(row.watermark) + 1 + len(chain)
        if row.sequence != expected or (not chain and row.state != QUEUED):
            continue  # past the run (or no queued head): the rest waits
        chain.append(QueuedEvent.from_row(row))
    return {key: chain for key, chain in found.items() if chain}


class ForwardingStore:
    def __init__(
        self, engine: AsyncEngine, settings: Settings, clock: Clock, metrics: SequencerMetrics, instance: str
    ) -> None:
        self.engine = engine
        # Single statements need no transaction: one round trip instead of BEGIN, it, COMMIT.
        self.single = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.instance = instance

    async def forwardable(self, keys: Sequence[EntityKey], per_entity: int) -> dict[EntityKey, list[QueuedEvent]]:
        """What each of `keys` has to forward now, at most `per_entity` events each."""
        async with db.reading(self.single) as conn:
            rows = await repo.forwardable(conn, keys, per_entity)
        return chains(rows)

    async def claim_any(self, owner: str, until: dt.datetime, limit: int) -> list[EntityKey]:
        """Up to `limit` entities with queued work and no live lease of another replica."""

        async def work(conn: AsyncConnection) -> list[EntityKey]:
            return await repo.claim_entities(conn, owner, self.clock.now(), until, limit)

        return await db.transaction(self.single, work)

    async def claim(self, keys: Sequence[EntityKey], owner: str, until: dt.datetime) -> list[EntityKey]:
        """Those of `keys` whose lease `owner` now holds (free, expired or already ours)."""

        async def work(conn: AsyncConnection) -> list[EntityKey]:
            return await repo.claim_named(conn, keys, owner, self.clock.now(), until)

        return await db.transaction(self.single, work)

    async def rest(self, keys: Sequence[EntityKey], owner: str, until: dt.datetime) -> None:
        """Our leases of `keys` end at `until`, so the entities rest before anyone retries."""

        async def work(conn: AsyncConnection) -> None:
            await repo.rest_leases(conn, keys, owner, until)

        await db.transaction(self.single, work)

    async def release(self, keys: Sequence[EntityKey], owner: str) -> None:
        """Hands our leases back (at shutdown), never waiting long on a row."""

        async def work(conn: AsyncConnection) -> None:
            # A cancelled transaction may still hold a row: expiry frees it, do not wait.
            await conn.execute(text("SET LOCAL lock_timeout = '500ms'"))
            await repo.release_leases(conn, keys, owner)

        await db.transaction(self.engine, work, retries=0)

    async def record(self, sent: Sequence[tuple[QueuedEvent, Outcome]], owner: str) -> list[Recorded]:
        """Records the ledger's outcomes of a batch: one statement (one per entity with the row
        lock strategy, SPEC 10), then one hint of what changed."""
        now = self.clock.now()
        lease_until = now + dt.timedelta(seconds=self.settings.forwarder_lease)
        hand_over_before = now - dt.timedelta(seconds=self.settings.forwarder_lease_max_hold)
        outcomes = [outcome for _event, outcome in sent]
        groups: list[list[Outcome]] = [outcomes]
        if self.settings.lock_strategy == "row":
            by_entity: dict[EntityKey, list[Outcome]] = {}
            for outcome in outcomes:
                by_entity.setdefault((outcome.entity_type, outcome.entity_id), []).append(outcome)
            groups = list(by_entity.values())
        results: list[Recorded] = []
        for group in groups:

            async def work(conn: AsyncConnection, group: list[Outcome] = group) -> list[Row[Any]]:
                return await repo.record_outcomes(
                    conn,
                    group,
                    strategy=self.settings.lock_strategy,
                    now=now,
                    owner=owner,
                    lease_until=lease_until,
                    hand_over_before=hand_over_before,
                )

            rows = await db.transaction(self.single, work)
            results += [
                Recorded(
                    (int(r.r_type), str(r.r_id)), int(r.r_previous), int(r.r_watermark), r.r_released, r.r_lease_kept
                )
                for r in rows
            ]
        await self._announce(sent, results)
        return results

    async def refused(self, heads: Sequence[QueuedEvent], *, code: str, reason: str, detail: str) -> list[Refused]:
        """Counts a refusal retrying cannot fix against each of `heads` (their entities' queued
        events); those reaching SEQUENCER_BLOCK_AFTER attempts are BLOCKED, and a hint says so."""
        now = self.clock.now()

        async def work(conn: AsyncConnection) -> list[Row[Any]]:
            return await repo.count_refusals(
                conn,
                sorted((e.entity_type, e.entity_id, e.sequence) for e in heads),
                code=code,
                reason=reason,
                detail=detail,
                block_after=self.settings.block_after,
                now=now,
            )

        rows = await db.transaction(self.single, work)
        counted = [
            Refused(
                (int(r.entity_type), str(r.entity_id)),
                int(r.sequence),
                r.transaction_id,
                int(r.forward_attempts),
                r.state == BLOCKED,
            )
            for r in rows
        ]
        changes = [Change(*r.key, BLOCKED, str(r.transaction_id)) for r in counted if r.blocked]
        if changes:
            self.metrics.events.labels(state_name(BLOCKED)).inc(len(changes))
            await self._hint(changes)
        return counted

    async def _announce(self, sent: Sequence[tuple[QueuedEvent, Outcome]], results: Sequence[Recorded]) -> None:
        """Counts what was recorded and sends one hint of it (after the commit: the released
        events are known only then; a lost hint is caught by the watchers' poll)."""
        by_key = {r.key: r for r in results}
        changes: list[Change] = []
        for event, outcome in sent:
            recorded = by_key.get(event.key)
            if recorded is None or not recorded.previous < event.sequence <= recorded.watermark:
                continue
            name = state_name(outcome.state)
            self.metrics.events.labels(name).inc()
            self.metrics.ledger_outcomes.labels(name).inc()
            changes.append(Change(*event.key, outcome.state, str(event.transaction_id)))
        for recorded in results:
            if recorded.released is not None:
                self.metrics.events.labels(state_name(QUEUED)).inc()
                changes.append(Change(*recorded.key, QUEUED, str(recorded.released)))
        if changes:
            await self._hint(changes)

    async def _hint(self, changes: list[Change]) -> None:
        """One wake-up hint of `changes`, after their commit (a lost hint is caught by the
        watchers' poll)."""
        try:
            async with db.reading(self.single) as conn:
                await repo.notify(conn, hints.encode(self.instance, changes))
        except (Retryable, DeadlineReached):
            log.warning("could not send the outcome hint; watchers poll", exc_info=True)
