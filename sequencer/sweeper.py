"""Deletes expired idempotency records and finished outbox deliveries past their retention, in
small batches, so no sweep holds long locks."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from common.clock import Clock
from sequencer import outbox
from sequencer import repository as repo
from sequencer.config import Settings

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, engine: AsyncEngine, settings: Settings, clock: Clock) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock

    async def sweep_once(self) -> int:
        """Deletes every record expired now, one short transaction per batch."""
        total = 0
        while True:
            async with self.engine.begin() as conn:
                deleted = await repo.sweep_expired_keys(conn, self.clock.now(), self.settings.sweep_batch)
            total += deleted
            if deleted < self.settings.sweep_batch:
                break
            await asyncio.sleep(0)  # let requests in between batches
        if total:
            log.info("expired idempotency records deleted", extra={"deleted": total})
        return total

    async def sweep_outbox_once(self) -> int:
        """Deletes finished deliveries older than SEQUENCER_OUTBOX_RETENTION, batch by batch."""
        total = 0
        before = self.clock.now() - dt.timedelta(seconds=self.settings.outbox_retention)
        while True:
            async with self.engine.begin() as conn:
                deleted = await outbox.sweep_finished(conn, before, self.settings.sweep_batch)
            total += deleted
            if deleted < self.settings.sweep_batch:
                break
            await asyncio.sleep(0)
        if total:
            log.info("finished outbox deliveries deleted", extra={"deleted": total})
        return total

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep_once()
                await self.sweep_outbox_once()
            except (DBAPIError, OSError):
                log.warning("key sweep failed; will retry", exc_info=True)
