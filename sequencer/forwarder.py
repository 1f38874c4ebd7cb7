"""Sends each entity's direct successor to the ledger, records the outcome, and follows the
chain of released successors.

At most one forwarder per entity across replicas: a lease on the entity's row, claimed and
renewed in short transactions, so no transaction stays open while the ledger is slow or down.
Exactly-once effect does not rest on the lease: the ledger is idempotent per (entity, MSI).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
import uuid

import grpc
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from common import logs
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from sequencer import repository as repo
from sequencer.clock import Clock
from sequencer.config import Settings
from sequencer.errors import Retryable
from sequencer.forwarding import ForwardingStore, QueuedEvent
from sequencer.hints import Hint
from sequencer.metrics import SequencerMetrics
from sequencer.notifications import Notifier
from sequencer.states import QUEUED

log = logging.getLogger(__name__)

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

OUTCOME_STATES = {
    ledger_pb2.APPLY_OUTCOME_APPLIED: events_pb2.EVENT_STATE_APPLIED,
    ledger_pb2.APPLY_OUTCOME_REJECTED: events_pb2.EVENT_STATE_REJECTED,
    ledger_pb2.APPLY_OUTCOME_SKIPPED: events_pb2.EVENT_STATE_SKIPPED,
}

EntityKey = tuple[int, str]


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT_CODES


class GiveUp(Exception):
    """This claim stops trying; the entity is retried after a back-off."""


class Forwarder:
    def __init__(
        self,
        engine: AsyncEngine,
        ledger: ledger_pb2_grpc.LedgerServiceStub,
        store: ForwardingStore,
        notifier: Notifier,
        settings: Settings,
        clock: Clock,
        metrics: SequencerMetrics,
    ) -> None:
        self.engine = engine
        self.ledger = ledger
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.active: dict[EntityKey, asyncio.Task[None]] = {}
        # Leases this replica holds, and until when (kept between chains, renewed per event).
        self.leases: dict[EntityKey, dt.datetime] = {}
        # Entities that got new work while their task was running (re-checked before it ends).
        self.dirty: set[EntityKey] = set()
        self.slots = asyncio.Semaphore(settings.forwarder_concurrency)
        self.wake = asyncio.Event()
        self._unsubscribe = notifier.subscribe(self._on_notification)

    # --- scheduling ---------------------------------------------------------------------------

    def _on_notification(self, message: Hint) -> None:
        """Another replica queued work (our own submits kick us directly)."""
        if message.resync:
            self.wake.set()
            return
        if message.origin == self.store.instance:
            return
        for change in message.changes:
            if change.state != QUEUED:
                continue
            key = (change.entity_type, change.entity_id)
            if key in self.active:
                self.dirty.add(key)
            else:
                self.wake.set()

    def kick(self, event: QueuedEvent) -> None:
        """New queued work committed by this process: forward it now."""
        key = (event.entity_type, event.entity_id)
        if key in self.active:
            self.dirty.add(key)
        else:
            self._start(key, first=event, claimed=False)

    def _start(self, key: EntityKey, *, first: QueuedEvent | None = None, claimed: bool) -> None:
        task = asyncio.create_task(self._drive(key, first, claimed), name=f"forward:{key[0]}:{key[1]}")
        self.active[key] = task

    async def run(self) -> None:
        """Claims entities with queued work: on wake-ups, and on a modest poll as a safety net."""
        while True:
            self.wake.clear()
            try:
                await self._claim_batch()
            except (DBAPIError, OSError):
                log.warning("claiming forwarding work failed; will retry", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.settings.forwarder_poll_interval)

    async def _claim_batch(self) -> None:
        room = self.settings.forwarder_concurrency * 2 - len(self.active)
        if room <= 0:
            return
        now = self.clock.now()
        until = now + dt.timedelta(seconds=self.settings.forwarder_lease)
        async with self.engine.begin() as conn:
            claimed = await repo.claim_entities(conn, self.owner, now, until, room)
        for key in claimed:
            self.leases[key] = until
            if key not in self.active:
                self._start(key, claimed=True)

    async def close(self) -> None:
        """Stops forwarding and hands this replica's leases back, so others need not wait."""
        self._unsubscribe()
        tasks = list(self.active.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        leases, self.leases = list(self.leases), {}
        if not leases:
            return
        try:
            async with self.engine.begin() as conn:
                # Never wait on a row a cancelled transaction may still hold: expiry frees it.
                await conn.execute(text("SET LOCAL lock_timeout = '500ms'"))
                for key in leases:
                    await repo.release_lease(conn, key[0], key[1], self.owner)
        except (DBAPIError, OSError):
            log.warning("could not hand back forwarding leases; they will expire", exc_info=True)

    # --- one entity ---------------------------------------------------------------------------

    async def _drive(self, key: EntityKey, first: QueuedEvent | None, claimed: bool) -> None:
        entity_type, entity_id = key
        backoff: float | None = None
        try:
            async with self.slots:
                if not claimed and not await self._hold_lease(key):
                    self.active.pop(key, None)  # another replica forwards it
                    return
                logs.log_context.set({"entity_type": entity_type, "entity_id": entity_id, "forwarder": self.owner})
                self.dirty.discard(key)
                event = first if first is not None else await self.store.next_queued(entity_type, entity_id)
                while True:
                    while event is not None:
                        event = await self._forward(key, event)
                    # The chain ended; look again only if new work arrived meanwhile, and only
                    # while the lease is ours (it may have been handed back at the chain's end).
                    if key not in self.dirty:
                        break
                    self.dirty.discard(key)
                    if not await self._hold_lease(key):
                        break
                    event = await self.store.next_queued(entity_type, entity_id)
        except GiveUp:
            backoff = min(self.settings.forwarder_lease, 2.0)
        except (DBAPIError, OSError, Retryable):
            log.warning("forwarding interrupted by a database error; will retry", exc_info=True)
            backoff = 1.0
        except BaseException:
            self.active.pop(key, None)
            raise
        try:
            if backoff is not None:
                await self._rest(key, backoff)
        finally:
            self.active.pop(key, None)
        if backoff is None and key in self.dirty:
            self.dirty.discard(key)
            self._start(key, claimed=False)

    async def _hold_lease(self, key: EntityKey) -> bool:
        """True when this replica holds the entity's lease: still (it is kept between chains, so
        a busy entity costs no claim per event) or newly claimed."""
        now = self.clock.now()
        half = dt.timedelta(seconds=self.settings.forwarder_lease / 2)
        held_until = self.leases.get(key)
        if held_until is not None and held_until - now > half:
            return True
        until = now + dt.timedelta(seconds=self.settings.forwarder_lease)
        async with self.engine.begin() as conn:
            claimed = await repo.claim_entity(conn, key[0], key[1], self.owner, now, until)
        if claimed:
            self.leases[key] = until
        else:
            self.leases.pop(key, None)
        return claimed

    async def _rest(self, key: EntityKey, backoff: float) -> None:
        """Keeps the lease for `backoff` seconds only, so the entity rests before a retry."""
        self.leases.pop(key, None)
        try:
            async with self.engine.begin() as conn:
                until = self.clock.now() + dt.timedelta(seconds=backoff)
                await repo.renew_lease(conn, key[0], key[1], self.owner, until)
        except (DBAPIError, OSError):
            log.warning("could not shorten a forwarding lease; it will expire", exc_info=True)

    async def _forward(self, key: EntityKey, queued: QueuedEvent) -> QueuedEvent | None:
        """Applies one event at the ledger and records the outcome; returns the next one."""
        logs.bind(
            sequence=queued.sequence, transaction_id=str(queued.transaction_id), correlation_id=queued.correlation_id
        )
        request = ledger_pb2.ApplyEventRequest(
            event=events_pb2.Event.FromString(queued.event),
            correlation_id=queued.correlation_id,
            transaction_id=str(queued.transaction_id),
            skip_reason=queued.skip_reason or "",
        )
        reply = await self._apply(request)
        outcome = reply.original_outcome if reply.outcome == ledger_pb2.APPLY_OUTCOME_DUPLICATE else reply.outcome
        state = OUTCOME_STATES.get(outcome)
        if state is None:
            log.error("ledger answered an unknown outcome", extra={"outcome": int(outcome)})
            raise GiveUp
        if state == events_pb2.EVENT_STATE_REJECTED:
            log.warning("event rejected by the ledger", extra={"reason": reply.reason, "detail": reply.reason_detail})
        recorded = await self.store.record_outcome(
            key[0],
            key[1],
            queued.sequence,
            state=state,
            reason=reply.reason,
            reason_detail=reply.reason_detail,
            entity_version=reply.version,
            lease_owner=self.owner,
        )
        log.info("event forwarded", extra={"outcome": events_pb2.EventState.Name(state)})
        if not recorded.lease_kept:
            # Handed back at the chain's end, or lost: whoever claims the entity next goes on.
            self.leases.pop(key, None)
            return None
        self.leases[key] = self.clock.now() + dt.timedelta(seconds=self.settings.forwarder_lease)
        return recorded.next_event

    async def _apply(self, request: ledger_pb2.ApplyEventRequest) -> ledger_pb2.ApplyEventResponse:
        """ApplyEvent with tenacity: exponential back-off with jitter on transient codes, for at
        most the retry budget of one claim."""

        def count_retry(_state: object) -> None:
            self.metrics.forward_retries.inc()

        metadata = (("x-correlation-id", request.correlation_id),)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_transient),
                wait=wait_exponential_jitter(multiplier=0.05, jitter=0.05, max=2.0),
                stop=stop_after_delay(self.settings.forwarder_retry_budget),
                before_sleep=count_retry,
                reraise=True,
            ):
                with attempt:
                    started = time.perf_counter()
                    reply: ledger_pb2.ApplyEventResponse = await self.ledger.ApplyEvent(  # type: ignore[misc]
                        request, timeout=self.settings.ledger_timeout, metadata=metadata
                    )
                    self.metrics.ledger_latency.observe(time.perf_counter() - started)
                    return reply
        except grpc.aio.AioRpcError as exc:
            level = logging.WARNING if _transient(exc) else logging.ERROR
            log.log(
                level,
                "ledger did not apply the event; backing off",
                extra={"code": exc.code().name, "details": exc.details()},
            )
            raise GiveUp from exc
        raise AssertionError("unreachable")
