"""The webhook dispatcher (SPEC 14): claims due deliveries from the outbox, POSTs them signed
per Standard Webhooks, and records every attempt. Runs on every replica; the outbox's claim
keeps one delivery of a (subscription, entity) in flight at a time, in MSI order, and never the
same delivery on two replicas at once (sequencer/outbox.py: CLAIM). At-least-once: a replica that
dies mid-attempt leaves a claim that expires, and the delivery is sent again with the same
`webhook-id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from typing import Any

import aiohttp
from google.protobuf import json_format
from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from standardwebhooks.webhooks import Webhook

from common import db
from common.clock import Clock
from common.errors import DeadlineReached, Retryable
from sequencer import outbox, webhooks
from sequencer.config import Settings
from sequencer.convert import status_from_delivery
from sequencer.hints import Hint
from sequencer.metrics import SequencerMetrics
from sequencer.notifications import Notifier
from sequencer.sealing import SecretBox, UnsealError

log = logging.getLogger(__name__)

DATABASE_TROUBLE = (DBAPIError, OSError, Retryable, DeadlineReached)
MAX_ERROR = 500
USER_AGENT = "logistics-sequencer-webhooks/1"
# After a wake-up, a moment to gather the hints of a burst of commits into one claim.
COALESCE = 0.02


def body(row: Row[Any]) -> str:
    """The POSTed JSON: {"type": "event.applied", "timestamp": ..., "data": <EventStatus JSON>}."""
    when = row.processed_at or row.created_at
    payload = {
        "type": webhooks.event_type(row.event_state),
        "timestamp": when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        "data": json_format.MessageToDict(status_from_delivery(row)),
    }
    return json.dumps(payload, separators=(",", ":"))


class Dispatcher:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        clock: Clock,
        metrics: SequencerMetrics,
        notifier: Notifier,
        instance: str,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.owner = f"webhooks-{instance}"
        self.box = SecretBox.from_setting(settings.webhook_secret_key)
        self.wake = asyncio.Event()
        # Whether any webhook subscription is active (re-read every poll): without one, the hints
        # of every committed batch are ignored, so an unused feature costs no claim queries.
        self.active = True
        self.in_flight: set[asyncio.Task[None]] = set()
        self._unsubscribe = notifier.subscribe(self._on_notification)

    def kick(self) -> None:
        """New or redelivered work committed by this process: look now."""
        self.active = True
        self.wake.set()

    def _on_notification(self, hint: Hint) -> None:
        # A reported state committed somewhere: its deliveries were written with it.
        if self.active and (hint.resync or any(c.state in webhooks.REPORTABLE for c in hint.changes)):
            self.wake.set()

    async def close(self) -> None:
        """Stops the attempts in flight and hands their claims back (an attempt cut short may
        have reached its receiver: at-least-once, the same webhook-id comes again)."""
        self._unsubscribe()
        if not self.in_flight:
            return
        for task in list(self.in_flight):
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)

        async def work(conn: AsyncConnection) -> int:
            return await outbox.release(conn, self.owner)

        try:
            await db.transaction(self.engine, work)
        except DATABASE_TROUBLE:
            log.warning("handing back webhook claims failed; they expire with their lease", exc_info=True)

    async def run(self) -> None:
        """Claims while there is room (SEQUENCER_WEBHOOK_CONCURRENCY), else waits for a wake-up,
        a finished attempt or the poll (SEQUENCER_WEBHOOK_POLL_INTERVAL): hints only hurry it."""
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        connector = aiohttp.TCPConnector(limit=self.settings.webhook_concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            last_gauge = 0.0
            try:
                while True:
                    self.wake.clear()
                    claimed = 0
                    try:
                        if time.monotonic() - last_gauge >= self.settings.webhook_poll_interval:
                            await self._measure()
                            last_gauge = time.monotonic()
                        if self.active:
                            claimed = await self._claim(session)
                    except DATABASE_TROUBLE:
                        log.warning("claiming webhook deliveries failed; will retry", exc_info=True)
                    except Exception:
                        log.exception("claiming webhook deliveries failed unexpectedly; will retry")
                    if claimed and len(self.in_flight) < self.settings.webhook_concurrency:
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), self.settings.webhook_poll_interval)
                        await asyncio.sleep(COALESCE)
            finally:
                await self.close()

    async def _claim(self, session: aiohttp.ClientSession) -> int:
        room = self.settings.webhook_concurrency - len(self.in_flight)
        if room <= 0:
            return 0
        now = self.clock.now()
        until = now + dt.timedelta(seconds=self.settings.webhook_lease)

        async def work(conn: AsyncConnection) -> list[Row[Any]]:
            return await outbox.claim(conn, sink=webhooks.SINK, owner=self.owner, now=now, until=until, limit=room)

        rows = await db.transaction(self.engine, work)
        for row in rows:
            task = asyncio.create_task(self._deliver(session, row), name=f"webhook-{row.id}")
            self.in_flight.add(task)
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.wake.set()  # room again, and the entity's next delivery may be due

    async def _measure(self) -> None:
        async with db.reading(self.engine) as conn:
            self.active, oldest = await outbox.sink_summary(conn, webhooks.SINK)
        age = 0.0 if oldest is None else max(0.0, (self.clock.now() - oldest).total_seconds())
        self.metrics.webhook_oldest_undelivered_age.set(age)

    async def _deliver(self, session: aiohttp.ClientSession, row: Row[Any]) -> None:
        try:
            result, latency = await self._attempt(session, row)
            await self._record(row, result, latency)
        except asyncio.CancelledError:
            raise
        except DATABASE_TROUBLE:
            # The attempt happened but is not recorded: the claim expires and it is sent again
            # (at-least-once; the receiver dedupes on webhook-id).
            log.warning("recording a webhook attempt failed", extra={"delivery_id": str(row.id)}, exc_info=True)
        except Exception:
            log.exception("a webhook delivery failed unexpectedly", extra={"delivery_id": str(row.id)})

    async def _attempt(self, session: aiohttp.ClientSession, row: Row[Any]) -> tuple[webhooks.AttemptResult, float]:
        started = time.monotonic()
        try:
            secret = self.box.open(bytes(row.secret), row.subscription_id.bytes)
        except UnsealError as exc:
            return webhooks.AttemptResult(False, None, str(exc)), 0.0
        content = body(row)
        msg_id = str(row.id)
        sent_at = self.clock.now()
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, sent_at, content),
        }
        try:
            # Redirects are not followed: a redirect could lead off the allow-list.
            async with session.post(row.target, data=content.encode(), headers=headers, allow_redirects=False) as resp:
                await resp.read()
                result = webhooks.judge(resp.status, None, resp.headers.get("Retry-After"))
        except TimeoutError:
            result = webhooks.AttemptResult(False, None, f"no answer within {self.settings.webhook_timeout:g} s")
        except aiohttp.ClientError as exc:
            result = webhooks.AttemptResult(False, None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR])
        latency = time.monotonic() - started
        self.metrics.webhook_latency.observe(latency)
        return result, latency

    async def _record(self, row: Row[Any], result: webhooks.AttemptResult, latency: float) -> None:
        now = self.clock.now()
        step = row.step + 1
        status, next_at, outcome = outbox.DELIVERED, None, "delivered"
        if not result.delivered:
            delay = webhooks.retry_delay(self.settings.webhook_retry_schedule, step)
            if delay is not None and result.retry_after is not None:
                delay = max(delay, result.retry_after)
            if delay is None or result.disable:
                status, outcome = outbox.FAILED, "failed"
            else:
                status, next_at, outcome = outbox.PENDING, now + dt.timedelta(seconds=delay), "retrying"

        async def work(conn: AsyncConnection) -> tuple[bool, tuple[str, int] | None]:
            kept = await outbox.finish(
                conn,
                delivery_id=row.id,
                owner=self.owner,
                at=now,
                status=status,
                next_attempt_at=next_at,
                http_status=result.http_status,
                error=result.error,
                latency=latency,
            )
            if result.delivered:
                await outbox.mark_succeeding(conn, row.subscription_id)
                return kept, None
            since = await outbox.mark_failing(conn, row.subscription_id, now)
            reason = None
            if result.disable:
                reason = "RECEIVER_GONE"
            elif since is not None and (now - since).total_seconds() >= self.settings.webhook_disable_after:
                reason = "FAILING_TOO_LONG"
            if reason is None:
                return kept, None
            off, dropped = await outbox.disable(conn, row.subscription_id, now, reason)
            return kept, (reason, dropped) if off else None

        kept, disabled = await db.transaction(self.engine, work)
        self.metrics.webhook_deliveries.labels(outcome).inc()
        fields = {
            "delivery_id": str(row.id),
            "subscription_id": str(row.subscription_id),
            "http_status": result.http_status,
            "attempt": row.attempts + 1,
            "latency_seconds": round(latency, 4),
        }
        if not kept:
            log.warning("webhook claim ran out before the attempt was recorded", extra=fields)
        elif not result.delivered:
            log.info("webhook attempt failed", extra={**fields, "error": result.error, "outcome": outcome})
        if disabled is not None:
            reason, dropped = disabled
            self.metrics.webhook_deliveries.labels("failed").inc(dropped)
            # The alert: an operator must look at the receiver and create a new subscription.
            log.error(
                "webhook subscription disabled",
                extra={"subscription_id": str(row.subscription_id), "reason": reason, "failed_deliveries": dropped},
            )
