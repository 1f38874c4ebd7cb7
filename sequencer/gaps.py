"""The gap monitor: alerts (once per gap) when a gap outlives the threshold, and keeps the gap,
parked and blocked gauges fresh."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from common.clock import Clock
from sequencer import repository as repo
from sequencer.config import Settings
from sequencer.errors import Retryable
from sequencer.metrics import SequencerMetrics
from sequencer.states import entity_type_name

log = logging.getLogger(__name__)


class GapMonitor:
    def __init__(self, engine: AsyncEngine, settings: Settings, clock: Clock, metrics: SequencerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.metrics = metrics

    async def run(self) -> None:
        interval = max(0.2, min(5.0, self.settings.gap_alert_after / 4))
        while True:
            try:
                await self.check()
            except (DBAPIError, OSError, Retryable):
                log.warning("gap check failed; will retry", exc_info=True)
            await asyncio.sleep(interval)

    async def check(self) -> int:
        """Alerts the gaps that crossed the threshold since the last check; returns how many."""
        now = self.clock.now()
        threshold = now - dt.timedelta(seconds=self.settings.gap_alert_after)
        async with self.engine.begin() as conn:
            alerted = await repo.gaps_to_alert(conn, threshold, now)
            summary = await repo.gap_summary(conn, threshold)
        for gap in alerted:
            log.warning(
                "gap older than alert threshold",
                extra={
                    "entity_type": entity_type_name(gap.entity_type),
                    "entity_id": gap.entity_id,
                    "awaiting_sequence": gap.awaiting_sequence,
                    "age_seconds": round((now - gap.first_seen_at).total_seconds(), 3),
                },
            )
        self.metrics.gaps.set(summary.gaps)
        self.metrics.parked.set(summary.parked)
        self.metrics.blocked.set(summary.blocked)
        self.metrics.gaps_alerting.set(summary.alerting)
        self.metrics.oldest_gap_age.set((now - summary.oldest).total_seconds() if summary.oldest else 0.0)
        return len(alerted)
