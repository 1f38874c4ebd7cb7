"""Forwards queued events to the ledger in batches and records the outcomes.

A batch takes every entity with work that no batch in flight holds: each one's queued event (the
direct successor of its watermark) and the parked successors right after it, in MSI order. One
`ApplyEvents` call applies them at the ledger, one statement records every outcome and releases
the next parked successors, so a chain moves several MSIs per round trip and many entities share
one. While a batch is at the ledger, the next gathers (natural batching, no timer).

At most one forwarder per entity across replicas: a lease on the entity's row, claimed and
renewed in single statements, so no transaction stays open while the ledger is slow or down.
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
from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from common import tracing
from common.clock import Clock
from common.errors import DeadlineReached, Retryable
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from sequencer import traces
from sequencer.config import Settings
from sequencer.forwarding import ForwardingStore, QueuedEvent
from sequencer.hints import Hint
from sequencer.metrics import SequencerMetrics
from sequencer.notifications import Notifier
from sequencer.repository import EntityKey, Outcome
from sequencer.states import QUEUED, SKIPPED, entity_type_name

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

# The database is away or busy: the work is retried after a rest, nothing is lost.
DATABASE_TROUBLE = (DBAPIError, OSError, Retryable, DeadlineReached)
# How long an entity rests after its batch failed, before this replica tries again.
REST_AFTER_DATABASE_TROUBLE = 1.0


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT_CODES


def refusal_info(exc: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of an ApplyEvents refusal (empty without one)."""
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, dict(info.metadata)
    return "", {}


def refused_index(metadata: dict[str, str], size: int) -> int | None:
    """The item a refusal names (`index`), if any."""
    index = metadata.get("index", "")
    return int(index) if index.isdigit() and int(index) < size else None


def _as_sent(event: QueuedEvent) -> events_pb2.Event:
    """The event as the ledger gets it: a skip carries no payload (a skipped BLOCKED event
    keeps its own in the mailbox, for the record)."""
    message = events_pb2.Event.FromString(event.event)
    if event.skip_reason is not None:
        message.ClearField("payload")
    return message


class GiveUp(Exception):
    """The ledger stayed unavailable for the retry budget: the batch's entities rest."""


class Forwarder:
    def __init__(
        self,
        ledger: ledger_pb2_grpc.LedgerServiceStub,
        store: ForwardingStore,
        notifier: Notifier,
        settings: Settings,
        clock: Clock,
        metrics: SequencerMetrics,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Entities that may have work, oldest first (a dict as an ordered set).
        self.wanted: dict[EntityKey, None] = {}
        # Entities of a batch in flight: no second batch takes them.
        self.busy: set[EntityKey] = set()
        # Entities resting after a failure, until this loop time.
        self.resting: dict[EntityKey, float] = {}
        # Leases this replica holds, and until when (kept between chains, renewed per batch).
        self.leases: dict[EntityKey, dt.datetime] = {}
        # The most events a batch carries: SEQUENCER_FORWARDER_BATCH, or less when the ledger
        # says it takes fewer (its LEDGER_MAX_BATCH).
        self.batch_limit = settings.forwarder_batch
        self.wake = asyncio.Event()
        self.sweep = asyncio.Event()
        self._unsubscribe = notifier.subscribe(self._on_notification)

    # --- what there is to do ------------------------------------------------------------------

    def _want(self, key: EntityKey) -> None:
        self.wanted[key] = None
        self.wake.set()

    def kick(self, entity: EntityKey) -> None:
        """New queued work for `entity` committed by this process: forward it now."""
        self._want(entity)

    def _on_notification(self, message: Hint) -> None:
        """Another replica queued work (our own commits kick us directly)."""
        if message.resync:
            self.sweep.set()
            return
        if message.origin == self.store.instance:
            return
        for change in message.changes:
            if change.state == QUEUED:
                self._want((change.entity_type, change.entity_id))

    def _take(self) -> list[EntityKey]:
        """The entities of the next batch: wanted, not in flight, not resting; marked busy."""
        now = asyncio.get_running_loop().time()
        taken: list[EntityKey] = []
        for key in self.wanted:
            if key in self.busy:
                continue
            until = self.resting.get(key)
            if until is not None:
                if until > now:
                    continue
                del self.resting[key]
            taken.append(key)
            if len(taken) >= self.batch_limit:
                break
        for key in taken:
            del self.wanted[key]
        self.busy.update(taken)
        return taken

    def _next_wake_up(self) -> float:
        """Seconds until the first resting entity may go again (the poll interval at most)."""
        now = asyncio.get_running_loop().time()
        waiting = [until - now for key, until in self.resting.items() if key in self.wanted]
        return max(0.01, min([self.settings.forwarder_poll_interval, *waiting]))

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Batches in flight (SEQUENCER_FORWARDER_CONCURRENCY), and the safety net: on a modest
        poll, and on a resync hint, claim every entity with queued work and no live lease."""
        workers = [
            asyncio.create_task(self._work(), name=f"forward-{n}") for n in range(self.settings.forwarder_concurrency)
        ]
        try:
            while True:
                self.sweep.clear()
                try:
                    await self._claim_any()
                except DATABASE_TROUBLE:
                    log.warning("claiming forwarding work failed; will retry", exc_info=True)
                except Exception:
                    log.exception("claiming forwarding work failed unexpectedly; will retry")
                self._forget_expired_leases()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.sweep.wait(), self.settings.forwarder_poll_interval)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _claim_any(self) -> None:
        until = self.clock.now() + dt.timedelta(seconds=self.settings.forwarder_lease)
        room = max(0, self.settings.forwarder_batch * self.settings.forwarder_concurrency - len(self.wanted))
        if room == 0:
            return
        for key in await self.store.claim_any(self.owner, until, room):
            self.leases[key] = until
            self._want(key)

    def _forget_expired_leases(self) -> None:
        """Leases of entities whose chain ended long ago lapse: no entry stays forever."""
        now = self.clock.now()
        for key in [k for k, until in self.leases.items() if until < now and k not in self.busy]:
            del self.leases[key]

    async def _work(self) -> None:
        while True:
            keys = self._take()
            if not keys:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self._next_wake_up())
                continue
            try:
                await self._forward(keys)
            except DATABASE_TROUBLE:
                log.warning("forwarding interrupted by a database error; will retry", exc_info=True)
                self._rest_here(keys, REST_AFTER_DATABASE_TROUBLE)
            except Exception:
                # A bug must not stop forwarding for good: these entities rest, the rest go on.
                log.exception("forwarding a batch failed unexpectedly; its entities rest")
                self._rest_here(keys, REST_AFTER_DATABASE_TROUBLE)
            finally:
                self.busy.difference_update(keys)
            if self.wanted:
                self.wake.set()

    async def close(self) -> None:
        """Stops forwarding (run's task is cancelled first) and hands this replica's leases
        back, so others need not wait."""
        self._unsubscribe()
        leases, self.leases = list(self.leases), {}
        if not leases:
            return
        try:
            await self.store.release(leases, self.owner)
        except DATABASE_TROUBLE:
            log.warning("could not hand back forwarding leases; they will expire", exc_info=True)

    # --- one batch ----------------------------------------------------------------------------

    async def _forward(self, keys: list[EntityKey]) -> None:
        """Holds the leases of `keys`, reads what they have to forward, applies it at the ledger
        and records the outcomes."""
        held = await self._hold_leases(keys)
        if not held:
            return
        # A fair share each: one long chain cannot crowd out the other entities of the batch.
        per_entity = max(1, self.batch_limit // len(held))
        found = await self.store.forwardable(held, per_entity)
        await self._send([event for key in held for event in found.get(key, ())])

    async def _send(self, batch: list[QueuedEvent]) -> None:
        """Applies `batch` at the ledger and records the outcomes; what the ledger refuses rests,
        and is counted towards blocking it."""
        while batch:
            try:
                with traces.forwarding(batch) as traced:
                    replies = await self._apply(traced)
            except GiveUp:
                await self._rest(sorted({e.key for e in batch}), min(self.settings.forwarder_lease, 2.0))
                return
            except grpc.aio.AioRpcError as exc:
                reason, metadata = refusal_info(exc)
                fewer = metadata.get("max_batch", "")
                if fewer.isdigit() and 0 < int(fewer) < len(batch):
                    # The ledger takes fewer events per call: send the batch in parts that fit.
                    log.warning("the ledger takes fewer events per call; batches follow", extra={"max_batch": fewer})
                    self.batch_limit = int(fewer)
                    for part in range(0, len(batch), self.batch_limit):
                        await self._send(batch[part : part + self.batch_limit])
                    return
                batch = await self._refused(batch, exc, reason, refused_index(metadata, len(batch)))
                continue
            await self._record(batch, replies)
            return

    async def _refused(
        self, batch: list[QueuedEvent], exc: grpc.aio.AioRpcError, reason: str, index: int | None
    ) -> list[QueuedEvent]:
        """Handles a refusal retrying cannot fix (a conflict, out of order, a bad credential...)
        and returns what to send again at once. Only an entity's queued head is ever blamed:
        a refused parked successor is cut from the batch with what follows it, and its entity's
        events before it go on (it becomes the head of a later batch). A blamed head counts a
        failed attempt; at SEQUENCER_BLOCK_AFTER it is BLOCKED and its entity stops there.
        Without an index the refusal is the whole call's: every entity's head is blamed."""
        self.metrics.forward_retries.inc()
        if index is not None:
            refused = batch[index]
            if any(e.key == refused.key and e.sequence < refused.sequence for e in batch):
                return [e for e in batch if e.key != refused.key or e.sequence < refused.sequence]
            heads = [refused]
        else:
            heads = list({e.key: e for e in reversed(batch)}.values())
        code = exc.code().name
        detail = (exc.details() or "")[:1000]
        counted = await self.store.refused(heads, code=code, reason=reason or code, detail=detail)
        for refusal in counted:
            extra = {
                "entity_type": entity_type_name(refusal.key[0]),
                "entity_id": refusal.key[1],
                "sequence": refusal.sequence,
                "transaction_id": str(refusal.transaction_id),
                "code": code,
                "reason": reason,
                "reason_detail": detail,
                "attempts": refusal.attempts,
            }
            if refusal.blocked:
                log.error("event blocked: the ledger keeps refusing it; an operator must retry or skip it", extra=extra)
            else:
                log.warning("the ledger refused an event; it is tried again after a rest", extra=extra)
        # The more often refused, the longer the rest (1, 2, 4, 8 s...): about 15 s to block
        # at the default 5 attempts. Blocked entities rest too; nothing forwards them.
        attempts = {r.key: r.attempts for r in counted}
        rests: dict[float, list[EntityKey]] = {}
        for key in sorted({e.key for e in heads}):
            seconds = min(self.settings.forwarder_lease, 2.0 ** (attempts.get(key, 1) - 1), 8.0)
            rests.setdefault(seconds, []).append(key)
        for seconds, keys in rests.items():
            await self._rest(keys, seconds)
        blamed = {e.key for e in heads}
        return [e for e in batch if e.key not in blamed]

    async def _hold_leases(self, keys: list[EntityKey]) -> list[EntityKey]:
        """Those of `keys` whose lease this replica holds: still (kept between chains, so a busy
        entity costs no claim per batch) or newly claimed, in one statement."""
        now = self.clock.now()
        half = dt.timedelta(seconds=self.settings.forwarder_lease / 2)
        stale = [k for k in keys if k not in self.leases or self.leases[k] - now <= half]
        if stale:
            until = now + dt.timedelta(seconds=self.settings.forwarder_lease)
            won = set(await self.store.claim(stale, self.owner, until))
            for key in stale:
                if key in won:
                    self.leases[key] = until
                else:
                    self.leases.pop(key, None)  # another replica forwards it
        return [k for k in keys if k in self.leases]

    def _rest_here(self, keys: Sequence[EntityKey], seconds: float) -> None:
        """The entities wait `seconds` before this replica tries them again."""
        until = asyncio.get_running_loop().time() + seconds
        for key in keys:
            self.resting[key] = until
            self.wanted[key] = None

    async def _rest(self, keys: Sequence[EntityKey], seconds: float) -> None:
        """Rests the entities here, and keeps their leases for `seconds` only, so after the rest
        any replica may try them."""
        self._rest_here(keys, seconds)
        for key in keys:
            self.leases.pop(key, None)
        try:
            await self.store.rest(keys, self.owner, self.clock.now() + dt.timedelta(seconds=seconds))
        except DATABASE_TROUBLE:
            log.warning("could not shorten forwarding leases; they will expire", exc_info=True)

    async def _record(self, batch: list[QueuedEvent], replies: Sequence[ledger_pb2.ApplyEventResponse]) -> None:
        """Records the outcomes of a batch the ledger answered; entities with a released
        successor go on in the next batch."""
        sent: list[tuple[QueuedEvent, Outcome]] = []
        stopped: set[EntityKey] = set()
        for event, reply in zip(batch, replies, strict=True):
            if event.key in stopped:
                continue  # outcomes are recorded in MSI order: none after a missing one
            outcome = reply.original_outcome if reply.outcome == ledger_pb2.APPLY_OUTCOME_DUPLICATE else reply.outcome
            state = OUTCOME_STATES.get(outcome)
            reason, detail = reply.reason, reply.reason_detail
            if state is not None and event.skip_reason is not None:
                # A skip is SKIPPED here whatever the ledger held at that MSI already (it answers
                # that as a DUPLICATE: the MSI is consumed either way); the reason is the skip's.
                state, reason = SKIPPED, ""
                if outcome != ledger_pb2.APPLY_OUTCOME_SKIPPED:
                    held = ledger_pb2.ApplyOutcome.Name(outcome)
                    detail = f"the ledger had processed MSI {event.sequence} already ({held})"
            if state is None:
                log.error(
                    "ledger answered an unknown outcome",
                    extra={"outcome": int(outcome), "entity_id": event.entity_id, "sequence": event.sequence},
                )
                stopped.add(event.key)
                continue
            if state == events_pb2.EVENT_STATE_REJECTED:
                log.warning(
                    "event rejected by the ledger",
                    extra={
                        "entity_id": event.entity_id,
                        "sequence": event.sequence,
                        "transaction_id": str(event.transaction_id),
                        "correlation_id": event.correlation_id,
                        "reason": reason,
                        "reason_detail": detail,
                    },
                )
            outcome_row = Outcome(
                event.entity_type, event.entity_id, event.sequence, state, reason, detail, reply.version
            )
            sent.append((event, outcome_row))
        if stopped:
            await self._rest(sorted(stopped), min(self.settings.forwarder_lease, 2.0))
        if not sent:
            return
        recorded = await self.store.record(sent, self.owner)
        lease_until = self.clock.now() + dt.timedelta(seconds=self.settings.forwarder_lease)
        first: dict[EntityKey, int] = {}
        for event, _outcome in sent:
            first.setdefault(event.key, event.sequence)
        for result in recorded:
            if result.previous < first.get(result.key, 0) - 1:
                log.error(
                    "watermark out of step with the forwarded events",
                    extra={"entity_id": result.key[1], "watermark": result.previous, "sequence": first[result.key]},
                )
            if result.lease_kept:
                self.leases[result.key] = lease_until
            else:
                # Handed back at the chain's end, or lost: whoever claims the entity next goes on.
                self.leases.pop(result.key, None)
            if result.released is not None:
                self._want(result.key)
        for event, outcome_row in sent:
            log.info(
                "event forwarded",
                extra={
                    "entity_id": event.entity_id,
                    "sequence": event.sequence,
                    "transaction_id": str(event.transaction_id),
                    "correlation_id": event.correlation_id,
                    "outcome": events_pb2.EventState.Name(outcome_row.state),  # type: ignore[arg-type]
                    "batch_size": len(sent),
                    **tracing.log_ids(event.traceparent),
                },
            )

    async def _apply(self, batch: list[QueuedEvent]) -> Sequence[ledger_pb2.ApplyEventResponse]:
        """ApplyEvents with tenacity: exponential back-off with jitter on transient codes, for at
        most the retry budget. A refusal (another code) is raised for the caller to handle."""

        def count_retry(_state: object) -> None:
            self.metrics.forward_retries.inc()

        request = ledger_pb2.ApplyEventsRequest(
            requests=[
                ledger_pb2.ApplyEventRequest(
                    event=_as_sent(e),
                    correlation_id=e.correlation_id,
                    transaction_id=str(e.transaction_id),
                    skip_reason=e.skip_reason or "",
                    traceparent=e.traceparent or "",
                )
                for e in batch
            ]
        )
        # The call's correlation id: the first event's (each item carries its own too).
        metadata = (("x-correlation-id", batch[0].correlation_id), *tracing.metadata_of())
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
                    reply: ledger_pb2.ApplyEventsResponse = await self.ledger.ApplyEvents(  # type: ignore[misc]
                        request, timeout=self.settings.ledger_timeout, metadata=metadata
                    )
                    self.metrics.ledger_latency.observe(time.perf_counter() - started)
                    if len(reply.responses) != len(batch):
                        raise GiveUp(f"the ledger answered {len(reply.responses)} outcomes for {len(batch)} events")
                    return reply.responses
        except grpc.aio.AioRpcError as exc:
            if not _transient(exc):
                raise
            log.warning(
                "the ledger did not apply the batch; backing off",
                extra={"code": exc.code().name, "details": exc.details(), "events": len(batch)},
            )
            raise GiveUp from exc
        raise AssertionError("unreachable")
