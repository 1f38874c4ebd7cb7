"""Ingress: idempotent acceptance of events, many submissions per transaction (group commit).

Every SubmitEvent and every item of SubmitEvents becomes a `Pending` in one queue. A few
workers, each with its own connection, take whatever is waiting (up to a cap) as one batch:
while one batch commits the next gathers, so batches grow with load and a lone caller pays no
wait. A batch takes its locks in one sorted order (keys, then entities), reads what the rules
need, lets `rules.Entity.decide` answer each item in order, writes everything set-based with
one NOTIFY, and commits (synchronous_commit stays on) before any item is answered.

Each item gets exactly the answer it would get alone: a stored record replays (byte-identical)
or is refused as reused, a second item with the same key waits for the first one's batch and
replays it, and an item's refusal (conflict, parked limit) is its own answer, never its
batch's. With the row lock strategy (distributed Postgres) a transaction holds one entity.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from common import logs, tracing
from common.clock import Clock
from common.db import LOCK_NOT_AVAILABLE, QUERY_CANCELED, RETRYABLE_SQLSTATES, is_transient, libpq_url, sqlstate
from common.errors import DomainError
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import mailbox
from sequencer.admission import Admission, Limits
from sequencer.config import Settings
from sequencer.errors import (
    DeadlineReached,
    IdempotencyKeyInvalid,
    InvalidArgument,
    ParkedLimitReached,
    Retryable,
    SequenceConflict,
)
from sequencer.idempotency import AnswerCache, StoredAnswer, Submission, replay, resolve_key
from sequencer.metrics import SequencerMetrics
from sequencer.repository import EntityKey
from sequencer.rules import Decision, Entity, Verdict
from sequencer.states import DUPLICATE, PARKED, QUEUED, SKIPPED, entity_type_name, state_name
from sequencer.validation import validate_event

log = logging.getLogger(__name__)

SUBMIT_METHOD = "/logistics.sequencer.v1.SequencerService/SubmitEvent"
UNAVAILABLE = "the database is unavailable; retry with the same idempotency key"
STATES = {Verdict.QUEUED: QUEUED, Verdict.PARKED: PARKED, Verdict.DUPLICATE: DUPLICATE, Verdict.SKIPPED: SKIPPED}


@dataclass(eq=False)
class Pending:
    """One submission waiting for its batch, with everything computed before it queues."""

    caller: str
    key: str
    event: events_pb2.Event
    event_bytes: bytes
    payload_hash: bytes
    request: bytes  # the keyless request, deterministic: stored to name differing fields
    fingerprint: bytes
    correlation_id: str
    deadline: float | None  # loop time
    # The accepting call's W3C trace context (its server span), stored with the event.
    traceparent: str = ""
    answer: asyncio.Future[Submission] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def entity(self) -> EntityKey:
        return (self.event.entity_type, self.event.entity_id)

    def settle(self, result: Submission | BaseException) -> None:
        if self.answer.done():
            return
        if isinstance(result, BaseException):
            self.answer.set_exception(result)
            # A caller that gave up never reads it: mark it read, so asyncio does not log it.
            self.answer.exception()
        else:
            self.answer.set_result(result)


@dataclass
class Committed:
    """What to do once a batch has committed (never before: it might roll back)."""

    answers: list[tuple[Pending, Submission | DomainError]] = field(default_factory=list)
    remember: list[tuple[Pending, StoredAnswer]] = field(default_factory=list)
    states: list[int] = field(default_factory=list)
    queued: list[EntityKey] = field(default_factory=list)


class Ingress:
    def __init__(
        self,
        database_url: str,
        settings: Settings,
        clock: Clock,
        metrics: SequencerMetrics,
        instance: str,
        admission: Admission | None = None,
    ) -> None:
        self.url = libpq_url(database_url)
        # The backlog bound (SPEC 12): checked once per call, after validation, before anything.
        self.admission = admission or Admission(
            Limits(settings.max_inflight_per_caller, settings.max_backlog, settings.backlog_refresh_interval)
        )
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        # Names this process in its notifications, so it can ignore its own wake-ups.
        self.instance = instance
        self.answers = AnswerCache(settings.answer_cache_size)
        # Set by the server to the forwarder's kick: new queued work for an entity.
        self.on_queued: Callable[[EntityKey], None] = lambda _entity: None
        # Submissions waiting for a batch, one per key; a second submission of a key waiting or
        # in a batch follows the first and replays its answer once that batch commits.
        self._waiting: collections.deque[Pending] = collections.deque()
        self._followers: dict[tuple[str, str], list[Pending]] = {}
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []

    # --- the callers' side --------------------------------------------------------------------

    def start(self) -> None:
        for number in range(self.settings.ingress_workers):
            self._workers.append(asyncio.create_task(self._work(), name=f"ingress-{number}"))

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        stopping = Retryable("the sequencer is shutting down; retry with the same key")
        while self._waiting:
            self._waiting.popleft().settle(stopping)
        for followers in self._followers.values():
            for pending in followers:
                pending.settle(stopping)
        self._followers.clear()

    def prepare(
        self,
        *,
        caller: str,
        key: str,
        request: sequencer_pb2.SubmitEventRequest,
        correlation_id: str,
        timeout: float | None,
    ) -> Pending:
        """Validates a submission and computes its bytes and hashes (nothing stored yet)."""
        validate_event(request.event, present=request.HasField("event"))
        event = request.event
        event_bytes = event.SerializeToString(deterministic=True)
        keyless = sequencer_pb2.SubmitEventRequest(event=event).SerializeToString(deterministic=True)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return Pending(
            caller,
            key,
            event,
            event_bytes,
            hashlib.sha256(event_bytes).digest(),
            keyless,
            hashlib.sha256(keyless).digest(),
            correlation_id,
            deadline,
            traceparent=tracing.traceparent_of(),
        )

    async def submit(
        self,
        *,
        caller: str,
        key: str,
        request: sequencer_pb2.SubmitEventRequest,
        correlation_id: str,
        timeout: float | None = None,
    ) -> Submission:
        """Accepts an event once per key: QUEUED, PARKED, DUPLICATE or SKIPPED, stored with the
        answer; a retry replays the stored answer."""
        event = request.event
        logs.bind(entity_type=entity_type_name(event.entity_type), entity_id=event.entity_id, sequence=event.sequence)
        pending = self.prepare(caller=caller, key=key, request=request, correlation_id=correlation_id, timeout=timeout)
        with self.admission.admitting(1):
            result = await self.accept(pending)
        response = result.response
        assert isinstance(response, sequencer_pb2.SubmitEventResponse)
        logs.bind(transaction_id=response.transaction_id, state=state_name(response.state), replayed=result.replayed)
        return result

    async def submit_batch(
        self,
        *,
        caller: str,
        metadata_keys: list[str],
        requests: list[sequencer_pb2.SubmitEventRequest],
        correlation_id: str,
        timeout: float | None,
    ) -> list[Submission | DomainError]:
        """SubmitEvents: independent items, each with its own key in request_id and the answer
        SubmitEvent would give it, in order. Only the call's own shape fails the call."""
        if metadata_keys:
            raise IdempotencyKeyInvalid(
                "a batch takes no idempotency-key metadata: give each item its own key in request_id"
            )
        if len(requests) > self.settings.max_batch:
            raise InvalidArgument(
                f"a batch holds at most {self.settings.max_batch} requests, got {len(requests)}", field="requests"
            )
        items = [self._item(caller, i, r, correlation_id, timeout) for i, r in enumerate(requests)]
        admitted = sum(1 for item in items if isinstance(item, Pending))
        if not admitted:
            return await self.submit_many(items)
        # The whole call is refused or admitted: one answer, one RetryInfo, nothing stored.
        with self.admission.admitting(admitted):
            return await self.submit_many(items)

    def _item(
        self,
        caller: str,
        index: int,
        request: sequencer_pb2.SubmitEventRequest,
        correlation_id: str,
        timeout: float | None,
    ) -> Pending | DomainError:
        try:
            if request.HasField("wait_for_terminal"):
                raise InvalidArgument(
                    f"requests[{index}].wait_for_terminal is not supported in a batch; watch or poll instead",
                    field=f"requests[{index}].wait_for_terminal",
                )
            key = resolve_key([], request.request_id)
            return self.prepare(caller=caller, key=key, request=request, correlation_id=correlation_id, timeout=timeout)
        except DomainError as exc:
            return exc

    async def submit_many(self, items: list[Pending | DomainError]) -> list[Submission | DomainError]:
        """Accepts independent submissions (those already refused stay refused), each with the
        answer it would get alone, in order."""
        accepting = [asyncio.ensure_future(self.accept(p)) for p in items if isinstance(p, Pending)]
        if accepting:
            await asyncio.wait(accepting)
        results: list[Submission | DomainError] = []
        answered = iter(accepting)
        for item in items:
            if isinstance(item, DomainError):
                results.append(item)
                continue
            task = next(answered)
            error = task.exception()
            if error is None:
                results.append(task.result())
            elif isinstance(error, DomainError):
                results.append(error)
            else:
                raise error
        return results

    async def accept(self, pending: Pending) -> Submission:
        # A committed record never changes until it expires: a hit in memory needs no lock.
        cached = self.answers.get(pending.caller, pending.key, self.clock.now())
        if cached is not None:
            return self._replayed(pending, cached)
        key = (pending.caller, pending.key)
        if key in self._followers:
            self._followers[key].append(pending)
        else:
            self._followers[key] = []
            self._waiting.append(pending)
            self._arrived.set()
        return await asyncio.shield(pending.answer)

    def _replayed(self, pending: Pending, record: StoredAnswer) -> Submission:
        keyless = sequencer_pb2.SubmitEventRequest(event=pending.event)
        response = replay(
            record, pending.key, SUBMIT_METHOD, keyless, pending.fingerprint, sequencer_pb2.SubmitEventResponse
        )
        self.metrics.replays.inc()
        return Submission(response, True, record.created_at, record.expires_at)

    # --- batches ------------------------------------------------------------------------------

    async def _take(self) -> list[Pending]:
        """The next batch: whatever waits (one submission per key), up to the cap; items past
        their deadline are answered so."""
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        now = asyncio.get_running_loop().time()
        batch: list[Pending] = []
        while self._waiting and len(batch) < self.settings.ingress_batch:
            pending = self._waiting.popleft()
            if pending.deadline is not None and pending.deadline <= now:
                pending.settle(DeadlineReached("the deadline passed before the request could be processed"))
            if pending.answer.done():
                self._next_of_key(pending)
            else:
                batch.append(pending)
        return batch

    def _next_of_key(self, pending: Pending) -> None:
        """After a submission's batch: its key's followers replay the committed answer; when
        nothing was stored (a refusal, a failure), the first follower goes on its own."""
        key = (pending.caller, pending.key)
        followers = self._followers.pop(key, [])
        record = self.answers.get(pending.caller, pending.key, self.clock.now())
        while followers and record is not None:
            self._settle_replay(followers.pop(0), record)
        if followers:
            first, rest = followers[0], followers[1:]
            self._followers[key] = rest
            self._waiting.append(first)
            self._arrived.set()

    def _settle_replay(self, pending: Pending, record: StoredAnswer) -> None:
        try:
            pending.settle(self._replayed(pending, record))
        except DomainError as exc:
            pending.settle(exc)

    async def _work(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                batch = await self._take()
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = await psycopg.AsyncConnection.connect(
                            self.url, application_name="sequencer-ingress", connect_timeout=5
                        )
                    await self._run(conn, batch)
                except Exception as exc:
                    if is_transient(exc):
                        log.warning("ingress batch failed on the database; answered as retryable", exc_info=True)
                        failure: Exception = Retryable(UNAVAILABLE)
                    else:
                        log.exception("ingress batch failed")
                        failure = exc
                    for pending in batch:
                        pending.settle(failure)
                    if conn is not None and (conn.broken or is_transient(exc)):
                        with contextlib.suppress(Exception):
                            await conn.close()
                        conn = None
                finally:
                    for pending in batch:
                        if not pending.answer.done():
                            pending.settle(Retryable("the request was interrupted; retry with the same key"))
                        self._next_of_key(pending)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _run(self, conn: psycopg.AsyncConnection[Any], batch: list[Pending]) -> None:
        """One transaction for the batch, or one per entity with the row lock strategy."""
        if self.settings.lock_strategy == "row":
            groups: dict[EntityKey, list[Pending]] = {}
            for pending in batch:
                groups.setdefault(pending.entity, []).append(pending)
            for group in groups.values():
                await self._commit(conn, group)
        else:
            await self._commit(conn, batch)

    async def _commit(self, conn: psycopg.AsyncConnection[Any], items: list[Pending]) -> None:
        """Runs the items' transaction: serialization failures are retried, a lock wait past an
        item's deadline answers that item and retries the rest, and a failure that is neither
        transient nor anyone's answer is narrowed down to the item that caused it."""
        attempts = 0
        while items:
            try:
                committed = await self._transaction(conn, items)
            except Exception as exc:
                state = sqlstate(exc)
                if state in RETRYABLE_SQLSTATES and attempts < 2:
                    attempts += 1
                    continue
                if state in (LOCK_NOT_AVAILABLE, QUERY_CANCELED):
                    items = self._expire(items)
                    continue
                if is_transient(exc) or len(items) == 1:
                    raise
                log.exception("ingress batch failed; retrying its items one by one")
                for pending in items:
                    await self._commit_alone(conn, pending)
                return
            self._after_commit(committed)
            return

    async def _commit_alone(self, conn: psycopg.AsyncConnection[Any], pending: Pending) -> None:
        try:
            await self._commit(conn, [pending])
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("ingress item failed", extra={"entity_id": pending.event.entity_id})
            pending.settle(exc)

    def _expire(self, items: list[Pending]) -> list[Pending]:
        """After a lock wait ran out: items past their deadline are answered so, the rest try
        again (the wait was bounded by the nearest deadline, so at least one goes)."""
        now = asyncio.get_running_loop().time()
        remaining = []
        for pending in items:
            if pending.deadline is not None and pending.deadline <= now + 0.005:
                pending.settle(DeadlineReached("gave up waiting for a concurrent request within the deadline"))
            else:
                remaining.append(pending)
        return remaining

    def _lock_timeout(self, items: list[Pending]) -> str:
        """The nearest deadline of the batch bounds every lock wait ('0': none)."""
        deadlines = [p.deadline for p in items if p.deadline is not None]
        if not deadlines:
            return mailbox.lock_timeout(None)
        return mailbox.lock_timeout(min(deadlines) - asyncio.get_running_loop().time())

    async def _transaction(self, conn: psycopg.AsyncConnection[Any], items: list[Pending]) -> Committed:
        now = self.clock.now()
        expires_at = now + dt.timedelta(seconds=self.settings.idempotency_retention)
        # BEGIN, the locks with the reads, the writes, COMMIT: four round trips a batch.
        async with conn.transaction():
            snapshot = await mailbox.lock_and_read(
                conn,
                keys=[(p.caller, p.key) for p in items],
                submitted=[(p.event.entity_type, p.event.entity_id, p.event.sequence) for p in items],
                row_lock=self.settings.lock_strategy == "row",
                lock_timeout=self._lock_timeout(items),
                now=now,
            )
            writes = mailbox.Writes()
            committed = Committed()
            for pending in items:
                self._answer(pending, snapshot, writes, committed, now, expires_at)
            await mailbox.write(
                conn,
                writes,
                snapshot.entities,
                method=SUBMIT_METHOD,
                now=now,
                expires_at=expires_at,
                queued_state=QUEUED,
                origin=self.instance,
            )
        return committed

    def _answer(
        self,
        pending: Pending,
        snapshot: mailbox.Snapshot,
        writes: mailbox.Writes,
        committed: Committed,
        now: dt.datetime,
        expires_at: dt.datetime,
    ) -> None:
        """One item's answer: a replay of its key's record, or the sequencing rules' decision,
        with the rows that decision writes."""
        record = snapshot.records.get((pending.caller, pending.key))
        if record is not None:
            try:
                committed.answers.append((pending, self._replayed(pending, record)))
            except DomainError as exc:
                committed.answers.append((pending, exc))
            committed.remember.append((pending, record))
            return
        entity = snapshot.entities[pending.entity]
        decision = entity.decide(pending.event.sequence, pending.payload_hash, self.settings.parked_limit, uuid.uuid4())
        refusal = self._refusal(pending, entity, decision)
        if refusal is not None:
            committed.answers.append((pending, refusal))  # not stored: the key stays usable
            return
        state = STATES[decision.verdict]
        tx = decision.transaction_id
        response = sequencer_pb2.SubmitEventResponse(
            transaction_id=str(tx) if tx is not None else "",
            state=state,
            awaiting_sequence=decision.awaiting,
            correlation_id=pending.correlation_id,
        )
        response_bytes = response.SerializeToString()
        if decision.holds:
            assert tx is not None
            traceparent = pending.traceparent
            if state == PARKED:
                # Parking is a step of the event's trace: what releases it later is its child.
                attributes = {"logistics.sequence": pending.event.sequence, "logistics.awaiting": decision.awaiting}
                traceparent = tracing.mark("sequencer.park", traceparent, attributes)
            writes.hold(
                pending.entity,
                pending.event.sequence,
                tx,
                state,
                pending.event_bytes,
                pending.payload_hash,
                pending.correlation_id,
                pending.caller,
                pending.key,
                traceparent=traceparent,
            )
            if state == PARKED:
                writes.parked[pending.entity] = writes.parked.get(pending.entity, 0) + 1
            else:
                committed.queued.append(pending.entity)
        writes.answer(pending.caller, pending.key, pending.fingerprint, pending.request, response_bytes, tx)
        if state != SKIPPED:
            committed.states.append(state)
        stored = StoredAnswer(SUBMIT_METHOD, pending.fingerprint, pending.request, response_bytes, now, expires_at)
        committed.remember.append((pending, stored))
        committed.answers.append((pending, Submission(response, False, now, expires_at)))

    def _refusal(self, pending: Pending, entity: Entity, decision: Decision) -> DomainError | None:
        eid, seq = pending.event.entity_id, pending.event.sequence
        if decision.verdict is Verdict.CONFLICT:
            return SequenceConflict(
                f"MSI {seq} of {eid} is already held with a different payload (transaction "
                f"{decision.transaction_id}); a producer must never reuse an MSI",
                entity_id=eid,
                sequence=seq,
                transaction_id=str(decision.transaction_id),
            )
        if decision.verdict is Verdict.PARKED_LIMIT:
            return ParkedLimitReached(
                f"entity {eid} already holds {entity.parked_count} parked events (limit "
                f"{self.settings.parked_limit}); it waits for MSI {entity.watermark + 1}",
                entity_id=eid,
                limit=self.settings.parked_limit,
            )
        return None

    def _after_commit(self, committed: Committed) -> None:
        for pending, record in committed.remember:
            self.answers.put(pending.caller, pending.key, record)
        for state in committed.states:
            self.metrics.events.labels(state_name(state)).inc()
        for pending, result in committed.answers:
            pending.settle(result)
        for entity in committed.queued:
            self.on_queued(entity)
