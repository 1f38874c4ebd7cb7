"""The forwarder's store: the queued event of an entity, and recording the ledger's outcome
(which releases the parked successor). Owns these transactions; the forwarder owns the calls."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import db
from sequencer import repository as repo
from sequencer.clock import Clock
from sequencer.config import Settings
from sequencer.metrics import SequencerMetrics
from sequencer.states import QUEUED, state_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedEvent:
    """An event to forward: what the forwarder needs, from a fresh acceptance or from a row."""

    entity_type: int
    entity_id: str
    sequence: int
    transaction_id: uuid.UUID
    event: bytes
    correlation_id: str
    skip_reason: str | None

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
        )


@dataclass(frozen=True)
class Recorded:
    """The result of recording a ledger outcome: the next queued event, if one was released,
    and whether the forwarder still holds the entity's lease."""

    recorded: bool
    next_event: QueuedEvent | None
    lease_kept: bool


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

    async def next_queued(self, entity_type: int, entity_id: str) -> QueuedEvent | None:
        async with db.reading(self.single) as conn:
            row = await repo.queued_event(conn, entity_type, entity_id)
        return QueuedEvent.from_row(row) if row is not None else None

    async def record_outcome(
        self,
        entity_type: int,
        entity_id: str,
        sequence: int,
        *,
        state: int,
        reason: str,
        reason_detail: str,
        entity_version: int,
        lease_owner: str,
    ) -> Recorded:
        """Records the ledger's outcome, advances the watermark, and releases the direct
        successor if it is parked (the chain continues with it). One statement."""

        async def work(conn: AsyncConnection) -> Recorded:
            now = self.clock.now()
            row = await repo.record_outcome(
                conn,
                entity_type,
                entity_id,
                sequence,
                strategy=self.settings.lock_strategy,
                state=state,
                reason=reason or None,
                reason_detail=reason_detail or None,
                entity_version=entity_version,
                now=now,
                origin=self.instance,
                lease_owner=lease_owner,
                lease_until=now + dt.timedelta(seconds=self.settings.forwarder_lease),
                hand_over_before=now - dt.timedelta(seconds=self.settings.forwarder_lease_max_hold),
            )
            kept = bool(row.lease_kept)
            if not row.recorded:
                return Recorded(False, None, kept)
            if row.previous_watermark != sequence - 1:
                log.error(
                    "watermark out of step with the queued event",
                    extra={"entity_id": entity_id, "watermark": row.previous_watermark, "sequence": sequence},
                )
            if row.transaction_id is None:
                return Recorded(True, None, kept)
            released = QueuedEvent(
                entity_type, entity_id, sequence + 1, row.transaction_id, row.event, row.correlation_id, row.skip_reason
            )
            return Recorded(True, released, kept)

        result = await db.transaction(self.single, work)
        if result.recorded:
            self.metrics.events.labels(state_name(state)).inc()
            self.metrics.ledger_outcomes.labels(state_name(state)).inc()
            if result.next_event is not None:
                self.metrics.events.labels(state_name(QUEUED)).inc()
        return result
