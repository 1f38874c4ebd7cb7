"""The sequencer's rules: idempotent acceptance, MSI bookkeeping, recording ledger outcomes,
skips and the reads behind the admin API. Owns every transaction; no gRPC here."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import logs
from common.db import LOCK_NOT_AVAILABLE, QUERY_CANCELED, RETRYABLE_SQLSTATES, sqlstate
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import repository as repo
from sequencer.clock import Clock
from sequencer.config import Settings
from sequencer.errors import (
    DeadlineReached,
    EntityNotFound,
    EventNotFound,
    IdempotencyKeyReused,
    IdempotencyRecordNotFound,
    InvalidArgument,
    InvalidEvent,
    NotAGap,
    ParkedLimitReached,
    Retryable,
    SequenceConflict,
)
from sequencer.idempotency import differing_fields, fingerprint
from sequencer.metrics import SequencerMetrics
from sequencer.notifications import Notifier
from sequencer.validation import MAX_TEXT, validate_entity, validate_event, validate_sequence

log = logging.getLogger(__name__)

T = TypeVar("T")

PARKED = events_pb2.EVENT_STATE_PARKED
QUEUED = events_pb2.EVENT_STATE_QUEUED
APPLIED = events_pb2.EVENT_STATE_APPLIED
REJECTED = events_pb2.EVENT_STATE_REJECTED
DUPLICATE = events_pb2.EVENT_STATE_DUPLICATE
SKIPPED = events_pb2.EVENT_STATE_SKIPPED
TERMINAL = frozenset({APPLIED, REJECTED, SKIPPED})

SUBMIT_METHOD = "/logistics.sequencer.v1.SequencerService/SubmitEvent"
SKIP_METHOD = "/logistics.sequencer.v1.SequencerAdminService/SkipSequence"
SKIP_MARKER_HASH = hashlib.sha256(b"logistics.sequencer.skip").digest()
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


def state_name(state: int) -> str:
    return events_pb2.EventState.Name(state)  # type: ignore[arg-type]


def _ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(dt.timedelta(seconds=max(0.0, seconds)))
    return value


def awaiting_for(sequence: int, gap: int | None, watermark: int) -> int:
    """What a parked event waits for: the entity's missing MSI when one lies below it, else the
    next MSI to be processed (its predecessors are all held, the first is on its way)."""
    return gap if gap is not None and gap < sequence else watermark + 1


def status_from_row(row: Row[Any], key: str | None = None) -> sequencer_pb2.EventStatus:
    """An events row (joined with its entity's gap) as the public EventStatus."""
    status = sequencer_pb2.EventStatus(
        transaction_id=str(row.transaction_id),
        entity=events_pb2.EntityRef(entity_type=row.entity_type, entity_id=row.entity_id),
        sequence=row.sequence,
        state=row.state,
        reason=row.reason or row.skip_reason or "",
        reason_detail=row.reason_detail or "",
        entity_version=row.entity_version or 0,
        correlation_id=row.correlation_id,
        idempotency_key=key if key is not None else (row.idempotency_key or ""),
    )
    if row.state == PARKED:
        status.awaiting_sequence = awaiting_for(row.sequence, row.gap_awaiting, row.watermark)
    for name in ("accepted_at", "queued_at", "processed_at"):
        stamp = _ts(getattr(row, name))
        if stamp is not None:
            getattr(status, name).CopyFrom(stamp)
    return status


@dataclass
class Submission:
    """The answer to an idempotent request: the response and where it came from."""

    response: Message
    replayed: bool
    first_seen_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class QueuedEvent:
    """An event to forward: what the forwarder needs, from a fresh insert or from a row."""

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


@dataclass
class Effects:
    """What to do once the transaction has committed (never before: it might roll back)."""

    queued: list[QueuedEvent] = field(default_factory=list)
    states: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class KeyRecord:
    """The idempotency record to store with the first execution's answer."""

    caller_id: str
    idempotency_key: str
    method: str
    fingerprint: bytes
    request: bytes
    created_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class StoredAnswer:
    """A committed idempotency record: what a retry of the key is compared with and answered."""

    method: str
    fingerprint: bytes
    request: bytes
    response: bytes
    created_at: dt.datetime
    expires_at: dt.datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> StoredAnswer:
        return cls(row.method, row.fingerprint, row.request, row.response, row.created_at, row.expires_at)


class AnswerCache:
    """Recently committed answers, by (caller, key), least recently used dropped first.

    Safe because a committed record never changes before it expires; expired entries are
    never answered from here."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[tuple[str, str], StoredAnswer] = collections.OrderedDict()

    def get(self, caller: str, key: str, now: dt.datetime) -> StoredAnswer | None:
        answer = self._entries.get((caller, key))
        if answer is None:
            return None
        if answer.expires_at <= now:
            del self._entries[(caller, key)]
            return None
        self._entries.move_to_end((caller, key))
        return answer

    def put(self, caller: str, key: str, answer: StoredAnswer) -> StoredAnswer:
        if self.capacity > 0:
            self._entries[(caller, key)] = answer
            self._entries.move_to_end((caller, key))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return answer


@dataclass(frozen=True)
class Executed:
    """A first execution's answer, and whether the key record was already written with it."""

    response: Message
    transaction_id: uuid.UUID | None
    stored: bool = False


@dataclass(frozen=True)
class Acceptance:
    """An event about to be accepted as QUEUED: its answer is known before the write, so one
    step writes the event, its key record and the wake-up (`params` are that step's arguments)."""

    payload_hash: bytes
    response: sequencer_pb2.SubmitEventResponse
    forward: QueuedEvent
    params: dict[str, Any]

    def accepted(self, effects: Effects) -> Executed:
        effects.queued.append(self.forward)
        effects.states.append(QUEUED)
        return Executed(self.response, self.forward.transaction_id, stored=True)


@dataclass(frozen=True)
class Recorded:
    """The result of recording a ledger outcome: the next queued event, if one was released,
    and whether the forwarder still holds the entity's lease."""

    recorded: bool
    next_event: QueuedEvent | None
    lease_kept: bool


class Sequencer:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        clock: Clock,
        notifier: Notifier,
        metrics: SequencerMetrics,
    ) -> None:
        self.engine = engine
        # Single reads need no transaction: one round trip instead of BEGIN, read, ROLLBACK.
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.settings = settings
        self.clock = clock
        self.notifier = notifier
        self.metrics = metrics
        self.answers = AnswerCache(settings.answer_cache_size)
        # Names this process in its notifications, so it can ignore its own wake-ups.
        self.instance = uuid.uuid4().hex
        # Set by the server to the forwarder's kick: new queued work for an entity.
        self.on_queued: Callable[[QueuedEvent], None] = lambda _event: None

    # --- transactions -------------------------------------------------------------------------

    async def _transaction(
        self, work: Callable[[AsyncConnection, Effects], Awaitable[T]], *, single_statement: bool = False
    ) -> T:
        """Runs `work` in one transaction; retries serialization failures, maps driver errors,
        and carries out the effects only after commit. Work of one statement (a server-side
        step) runs as that statement's own transaction: no BEGIN and COMMIT round trips."""
        engine = self.reader if single_statement else self.engine
        for attempt in range(3):
            effects = Effects()
            try:
                async with engine.begin() as conn:
                    result = await work(conn, effects)
            except DBAPIError as exc:
                state = sqlstate(exc)
                if state in RETRYABLE_SQLSTATES and attempt < 2:
                    continue
                if state in (LOCK_NOT_AVAILABLE, QUERY_CANCELED):
                    raise DeadlineReached("gave up waiting for a concurrent request within the deadline") from exc
                if _transient(exc, state):
                    raise Retryable("the database is unavailable; retry with the same idempotency key") from exc
                raise
            except OSError as exc:
                raise Retryable("the database is unavailable; retry with the same idempotency key") from exc
            self._after_commit(effects)
            return result
        raise AssertionError("unreachable")

    def _after_commit(self, effects: Effects) -> None:
        for state in effects.states:
            self.metrics.events.labels(state_name(state)).inc()
        for event in effects.queued:
            self.on_queued(event)

    def _payload(self, transaction_id: uuid.UUID | str, entity_type: int, entity_id: str, state: int) -> str:
        """The NOTIFY payload: which event changed, to what, and which process changed it."""
        return json.dumps(
            {"x": str(transaction_id), "t": entity_type, "e": entity_id, "s": state, "o": self.instance},
            separators=(",", ":"),
        )

    async def _idempotent(
        self,
        *,
        caller: str,
        key: str,
        method: str,
        keyless: Message,
        response_type: type[Message],
        execute: Callable[[AsyncConnection, Effects, KeyRecord], Awaitable[Executed]],
        timeout: float | None,
        first_step: Callable[[AsyncConnection, Effects, KeyRecord], Awaitable[Executed | StoredAnswer | None]]
        | None = None,
    ) -> Submission:
        """Replays the stored answer of (caller, key), or executes once and stores the answer in
        the same transaction as the work. The key's advisory lock makes concurrent duplicates
        wait for the first and then replay it.

        `first_step`, when given, is one server-side statement that takes the same locks and
        either finds the key's record, or executes the common case, or (None) leaves the
        request to `execute`."""
        request_fp = fingerprint(keyless)

        def replay(record: StoredAnswer) -> Submission:
            if record.method != method or record.fingerprint != request_fp:
                fields = (
                    ["method"]
                    if record.method != method
                    else differing_fields(type(keyless).FromString(record.request), keyless)
                )
                raise IdempotencyKeyReused(
                    f"idempotency key {key!r} was first used with a different request; differing fields: "
                    + ", ".join(fields),
                    fields=",".join(fields),
                    first_seen_at=record.created_at.isoformat(),
                )
            self.metrics.replays.inc()
            return Submission(response_type.FromString(record.response), True, record.created_at, record.expires_at)

        def pending_record() -> KeyRecord:
            now = self.clock.now()
            expires_at = now + dt.timedelta(seconds=self.settings.idempotency_retention)
            request = keyless.SerializeToString(deterministic=True)
            return KeyRecord(caller, key, method, request_fp, request, now, expires_at)

        def first(executed: Executed, pending: KeyRecord) -> tuple[Submission, StoredAnswer]:
            response = executed.response.SerializeToString()
            answer = StoredAnswer(method, request_fp, pending.request, response, pending.created_at, pending.expires_at)
            return Submission(executed.response, False, pending.created_at, pending.expires_at), answer

        # A committed record never changes until it expires, so a hit in this process's memory
        # needs no lock.
        cached = self.answers.get(caller, key, self.clock.now())
        if cached is not None:
            return replay(cached)
        if first_step is not None:
            pending = pending_record()

            async def step(conn: AsyncConnection, effects: Effects) -> Executed | StoredAnswer | None:
                return await first_step(conn, effects, pending)

            outcome = await self._transaction(step, single_statement=True)
            if isinstance(outcome, StoredAnswer):
                return replay(self.answers.put(caller, key, outcome))
            if outcome is not None:
                submission, answer = first(outcome, pending)
                self.answers.put(caller, key, answer)
                return submission

        async def work(conn: AsyncConnection, effects: Effects) -> tuple[Submission, StoredAnswer]:
            pending = pending_record()
            row = await repo.lock_key(conn, caller, key, pending.created_at, timeout)
            if row is not None:  # a concurrent first execution committed meanwhile
                answer = StoredAnswer.from_row(row)
                return replay(answer), answer
            executed = await execute(conn, effects, pending)
            submission, answer = first(executed, pending)
            if not executed.stored:
                await repo.store_key_record(
                    conn,
                    **dataclasses.asdict(pending),
                    status_code=0,
                    response=answer.response,
                    transaction_id=executed.transaction_id,
                )
            return submission, answer

        submission, answer = await self._transaction(work)
        self.answers.put(caller, key, answer)  # committed: safe to remember
        return submission

    # --- ingress ------------------------------------------------------------------------------

    async def submit(
        self,
        *,
        caller: str,
        key: str,
        request: sequencer_pb2.SubmitEventRequest,
        correlation_id: str,
        timeout: float | None = None,
    ) -> Submission:
        """Accepts an event once per key: QUEUED, PARKED or DUPLICATE, stored with the answer."""
        validate_event(request.event, present=request.HasField("event"))
        event = request.event
        logs.bind(entity_type=event.entity_type, entity_id=event.entity_id, sequence=event.sequence)
        keyless = sequencer_pb2.SubmitEventRequest(event=event)

        async def in_order(
            conn: AsyncConnection, effects: Effects, pending: KeyRecord
        ) -> Executed | StoredAnswer | None:
            return await self._submit_in_order(conn, effects, event, correlation_id, pending, timeout)

        async def execute(conn: AsyncConnection, effects: Effects, pending: KeyRecord) -> Executed:
            return await self._accept(conn, effects, event, correlation_id, pending)

        result = await self._idempotent(
            caller=caller,
            key=key,
            method=SUBMIT_METHOD,
            keyless=keyless,
            response_type=sequencer_pb2.SubmitEventResponse,
            execute=execute,
            timeout=timeout,
            first_step=in_order,
        )
        response = result.response
        assert isinstance(response, sequencer_pb2.SubmitEventResponse)
        logs.bind(transaction_id=response.transaction_id, state=state_name(response.state), replayed=result.replayed)
        return result

    def _queued(self, event: events_pb2.Event, correlation_id: str, pending: KeyRecord) -> Acceptance:
        et, eid, seq = event.entity_type, event.entity_id, event.sequence
        event_bytes = event.SerializeToString(deterministic=True)
        payload_hash = hashlib.sha256(event_bytes).digest()
        transaction_id = uuid.uuid4()
        response = sequencer_pb2.SubmitEventResponse(
            transaction_id=str(transaction_id), state=QUEUED, correlation_id=correlation_id
        )
        params = {
            "entity_type": et,
            "entity_id": eid,
            "sequence": seq,
            "transaction_id": transaction_id,
            "event": event_bytes,
            "payload_hash": payload_hash,
            "correlation_id": correlation_id,
            "caller_id": pending.caller_id,
            "idempotency_key": pending.idempotency_key,
            "now": pending.created_at,
            "method": pending.method,
            "fingerprint": pending.fingerprint,
            "request": pending.request,
            "response": response.SerializeToString(),
            "expires_at": pending.expires_at,
            "payload": self._payload(transaction_id, et, eid, QUEUED),
        }
        forward = QueuedEvent(et, eid, seq, transaction_id, event_bytes, correlation_id, None)
        return Acceptance(payload_hash, response, forward, params)

    async def _submit_in_order(
        self,
        conn: AsyncConnection,
        effects: Effects,
        event: events_pb2.Event,
        correlation_id: str,
        pending: KeyRecord,
        timeout: float | None,
    ) -> Executed | StoredAnswer | None:
        """The common case in one statement: the key's live record (a replay), or the entity's
        direct successor accepted as QUEUED. None: nothing written, `_accept` decides."""
        queued = self._queued(event, correlation_id, pending)
        row = await repo.submit_in_order(conn, strategy=self.settings.lock_strategy, timeout=timeout, **queued.params)
        if row.outcome == "replay":
            return StoredAnswer.from_row(row)
        if row.outcome == "queued":
            return queued.accepted(effects)
        return None

    async def _accept(
        self,
        conn: AsyncConnection,
        effects: Effects,
        event: events_pb2.Event,
        correlation_id: str,
        pending: KeyRecord,
    ) -> Executed:
        """The MSI rules of SPEC 5, under the entity's lock."""
        et, eid, seq = event.entity_type, event.entity_id, event.sequence
        now = pending.created_at
        entity = await repo.lock_entity(conn, et, eid, self.settings.lock_strategy, now)
        queued = self._queued(event, correlation_id, pending)
        event_bytes, payload_hash = queued.forward.event, queued.payload_hash
        if seq <= entity.watermark:
            return await self._already_held(conn, effects, event, payload_hash, correlation_id)
        if seq == entity.watermark + 1:
            # The answer is known before the write: one step writes the event, its key record
            # and the wake-up.
            if not await repo.accept_queued(conn, **queued.params):
                return await self._already_held(conn, effects, event, payload_hash, correlation_id)
            if entity.parked_count > 0:
                await repo.sync_gap(conn, et, eid, entity.watermark, now)
            return queued.accepted(effects)
        if entity.parked_count >= self.settings.parked_limit:
            if await repo.get_event(conn, et, eid, seq) is not None:
                return await self._already_held(conn, effects, event, payload_hash, correlation_id)
            raise ParkedLimitReached(
                f"entity {eid} already holds {entity.parked_count} parked events (limit "
                f"{self.settings.parked_limit}); it waits for MSI {entity.watermark + 1}",
                entity_id=eid,
                limit=self.settings.parked_limit,
            )
        transaction_id = uuid.uuid4()
        held, gap = await repo.hold_event(
            conn,
            entity_type=et,
            entity_id=eid,
            sequence=seq,
            transaction_id=transaction_id,
            state=PARKED,
            event=event_bytes,
            payload_hash=payload_hash,
            correlation_id=correlation_id,
            caller_id=pending.caller_id,
            idempotency_key=pending.idempotency_key,
            watermark=entity.watermark,
            now=now,
            payload=self._payload(transaction_id, et, eid, PARKED),
        )
        if not held:
            return await self._already_held(conn, effects, event, payload_hash, correlation_id)
        effects.states.append(PARKED)
        response = sequencer_pb2.SubmitEventResponse(
            transaction_id=str(transaction_id),
            state=PARKED,
            awaiting_sequence=awaiting_for(seq, gap, entity.watermark),
            correlation_id=correlation_id,
        )
        return Executed(response, transaction_id)

    async def _already_held(
        self,
        conn: AsyncConnection,
        effects: Effects,
        event: events_pb2.Event,
        payload_hash: bytes,
        correlation_id: str,
    ) -> Executed:
        """The MSI is held or processed: the same payload is a DUPLICATE, another a conflict."""
        et, eid, seq = event.entity_type, event.entity_id, event.sequence
        held = await repo.get_event(conn, et, eid, seq)
        if held is None:
            # Processed long ago and no longer held: harmless, never applied twice.
            effects.states.append(DUPLICATE)
            return Executed(sequencer_pb2.SubmitEventResponse(state=DUPLICATE, correlation_id=correlation_id), None)
        if held.skip_reason is not None:
            # An operator gave up on this MSI; the late event is not applied.
            response = sequencer_pb2.SubmitEventResponse(
                transaction_id=str(held.transaction_id), state=SKIPPED, correlation_id=correlation_id
            )
            return Executed(response, held.transaction_id)
        if held.payload_hash != payload_hash:
            raise SequenceConflict(
                f"MSI {seq} of {eid} is already held with a different payload (transaction "
                f"{held.transaction_id}); a producer must never reuse an MSI",
                entity_id=eid,
                sequence=seq,
                transaction_id=str(held.transaction_id),
            )
        effects.states.append(DUPLICATE)
        response = sequencer_pb2.SubmitEventResponse(
            transaction_id=str(held.transaction_id), state=DUPLICATE, correlation_id=correlation_id
        )
        return Executed(response, held.transaction_id)

    # --- forwarding ---------------------------------------------------------------------------

    async def next_queued(self, entity_type: int, entity_id: str) -> QueuedEvent | None:
        async with self.reader.connect() as conn:
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
        successor if it is parked (the chain continues with it)."""

        async def work(conn: AsyncConnection, effects: Effects) -> Recorded:
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
            effects.states.append(state)
            if row.transaction_id is None:
                return Recorded(True, None, kept)
            effects.states.append(QUEUED)
            released = QueuedEvent(
                entity_type, entity_id, sequence + 1, row.transaction_id, row.event, row.correlation_id, row.skip_reason
            )
            return Recorded(True, released, kept)

        result = await self._transaction(work, single_statement=True)
        if result.recorded:
            self.metrics.ledger_outcomes.labels(state_name(state)).inc()
        return result

    # --- operations ---------------------------------------------------------------------------

    async def skip_sequence(
        self,
        *,
        caller: str,
        key: str,
        request: sequencer_pb2.SkipSequenceRequest,
        correlation_id: str,
        timeout: float | None = None,
    ) -> Submission:
        """Gives up on one missing MSI, audited: a skip marker takes its place in the chain, is
        forwarded like an event (so the ledger's version follows), and releases successors."""
        validate_entity(request.entity.entity_type, request.entity.entity_id, prefix="entity")
        validate_sequence(request.sequence, "sequence")
        reason = request.reason.strip()
        if not reason or len(reason) > MAX_TEXT or not reason.isprintable():
            raise InvalidArgument(f"reason is required (1-{MAX_TEXT} printable characters)", field="reason")
        et, eid, seq = request.entity.entity_type, request.entity.entity_id, request.sequence
        logs.bind(entity_type=et, entity_id=eid, sequence=seq)
        keyless = sequencer_pb2.SkipSequenceRequest(entity=request.entity, sequence=seq, reason=reason)

        async def execute(conn: AsyncConnection, effects: Effects, pending: KeyRecord) -> Executed:
            now = pending.created_at
            entity = await repo.lock_entity(conn, et, eid, self.settings.lock_strategy, now)
            held = await repo.get_event(conn, et, eid, seq)
            if held is not None or seq <= entity.watermark:
                raise NotAGap(f"MSI {seq} of {eid} is not missing: it is held or processed", sequence=seq)
            _lowest, highest = await repo.held_range(conn, et, eid, entity.watermark)
            if highest is None or seq > highest:
                raise NotAGap(f"MSI {seq} of {eid} is not a gap: nothing parked waits behind it", sequence=seq)
            state = QUEUED if seq == entity.watermark + 1 else PARKED
            transaction_id = uuid.uuid4()
            marker = events_pb2.Event(entity_type=et, entity_id=eid, sequence=seq, source=f"skip by {caller}")
            marker_bytes = marker.SerializeToString(deterministic=True)
            await repo.hold_event(
                conn,
                entity_type=et,
                entity_id=eid,
                sequence=seq,
                transaction_id=transaction_id,
                state=state,
                event=marker_bytes,
                payload_hash=SKIP_MARKER_HASH,
                correlation_id=correlation_id,
                caller_id=caller,
                idempotency_key=key,
                skip_reason=reason,
                watermark=entity.watermark,
                now=now,
                payload=self._payload(transaction_id, et, eid, state),
            )
            if state == QUEUED:
                effects.queued.append(QueuedEvent(et, eid, seq, transaction_id, marker_bytes, correlation_id, reason))
            log.warning(
                "sequence skipped by operator",
                extra={"skipped_by": caller, "skip_reason": reason, "transaction_id": str(transaction_id)},
            )
            status_row = await repo.status_by_transaction(conn, transaction_id)
            assert status_row is not None
            response = sequencer_pb2.SkipSequenceResponse(
                status=status_from_row(status_row), watermark=entity.watermark
            )
            return Executed(response, transaction_id)

        return await self._idempotent(
            caller=caller,
            key=key,
            method=SKIP_METHOD,
            keyless=keyless,
            response_type=sequencer_pb2.SkipSequenceResponse,
            execute=execute,
            timeout=timeout,
        )

    # --- reads --------------------------------------------------------------------------------

    async def get_status(self, transaction_id: str, scope: str | None = None) -> sequencer_pb2.EventStatus:
        """The status of one transaction; with a scope, only if that caller submitted it (anyone
        else learns nothing, not even that it exists)."""
        try:
            tx = uuid.UUID(transaction_id)
        except ValueError as exc:
            raise InvalidArgument("transaction_id must be a UUID", field="transaction_id") from exc
        async with self.reader.connect() as conn:
            row = await repo.status_by_transaction(conn, tx)
        if row is None or (scope is not None and row.caller_id != scope):
            raise EventNotFound(f"no event with transaction id {transaction_id}", transaction_id=transaction_id)
        return status_from_row(row)

    async def get_status_by_key(self, caller: str, key: str) -> sequencer_pb2.EventStatus:
        async with self.reader.connect() as conn:
            row = await repo.status_by_key(conn, caller, key, self.clock.now())
        if row is None:
            raise EventNotFound("no event was submitted with this idempotency key by this caller")
        return status_from_row(row)

    async def entity_statuses(
        self, entity_type: int, entity_id: str, since: dt.datetime | None
    ) -> list[sequencer_pb2.EventStatus]:
        async with self.reader.connect() as conn:
            rows = await repo.statuses_for_entity(conn, entity_type, entity_id, since)
        return [status_from_row(r) for r in rows]

    async def get_key_record(self, caller: str, key: str) -> sequencer_pb2.IdempotencyRecord:
        async with self.reader.connect() as conn:
            record = await repo.get_key_record(conn, caller, key, self.clock.now())
            row = None
            if record is not None and record.transaction_id is not None:
                row = await repo.status_by_transaction(conn, record.transaction_id)
        if record is None:
            raise IdempotencyRecordNotFound("no live record of this idempotency key for this caller")
        result = sequencer_pb2.IdempotencyRecord(
            idempotency_key=key,
            caller_id=caller,
            method=record.method,
            transaction_id=str(record.transaction_id or ""),
            status_code=record.status_code,
            response=record.response,
            state=row.state if row is not None else events_pb2.EVENT_STATE_UNSPECIFIED,
        )
        result.first_seen_at.FromDatetime(record.created_at)
        result.expires_at.FromDatetime(record.expires_at)
        return result

    async def list_gaps(self, page_size: int, page_token: str) -> tuple[list[sequencer_pb2.Gap], str]:
        size = _page_size(page_size)
        after = _decode_token(page_token)
        cursor = None
        if after is not None:
            try:
                cursor = (dt.datetime.fromisoformat(after[0]), int(after[1]), str(after[2]))
            except (ValueError, IndexError, TypeError) as exc:
                raise InvalidArgument("page_token is malformed", field="page_token") from exc
        now = self.clock.now()
        async with self.reader.connect() as conn:
            rows = await repo.list_gaps(conn, cursor, size + 1)
        result = []
        for r in rows[:size]:
            age = (now - r.first_seen_at).total_seconds()
            gap = sequencer_pb2.Gap(
                entity=events_pb2.EntityRef(entity_type=r.entity_type, entity_id=r.entity_id),
                awaiting_sequence=r.awaiting_sequence,
                parked_count=r.parked_count,
                age=_duration(age),
                alerting=age >= self.settings.gap_alert_after,
            )
            gap.first_seen_at.FromDatetime(r.first_seen_at)
            result.append(gap)
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = _encode_token([last.first_seen_at.isoformat(), last.entity_type, last.entity_id])
        return result, token

    async def list_parked(
        self, entity: events_pb2.EntityRef | None, page_size: int, page_token: str
    ) -> tuple[list[sequencer_pb2.ParkedEvent], str]:
        size = _page_size(page_size)
        if entity is not None:
            validate_entity(entity.entity_type, entity.entity_id, prefix="entity")
        after = _decode_token(page_token)
        cursor = None
        if after is not None:
            try:
                cursor = (int(after[0]), str(after[1]), int(after[2]))
            except (ValueError, IndexError, TypeError) as exc:
                raise InvalidArgument("page_token is malformed", field="page_token") from exc
        async with self.reader.connect() as conn:
            rows = await repo.list_parked(
                conn, (entity.entity_type, entity.entity_id) if entity is not None else None, cursor, size + 1
            )
        result = []
        for r in rows[:size]:
            parked = sequencer_pb2.ParkedEvent(
                transaction_id=str(r.transaction_id),
                event=events_pb2.Event.FromString(r.event),
                correlation_id=r.correlation_id,
            )
            parked.parked_at.FromDatetime(r.accepted_at)
            result.append(parked)
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = _encode_token([last.entity_type, last.entity_id, last.sequence])
        return result, token

    async def get_entity(self, entity_type: int, entity_id: str) -> sequencer_pb2.Entity:
        validate_entity(entity_type, entity_id, prefix="entity")
        async with self.reader.connect() as conn:
            row = await repo.get_entity(conn, entity_type, entity_id)
        if row is None:
            raise EntityNotFound(f"the sequencer has never seen entity {entity_id}", entity_id=entity_id)
        entity = sequencer_pb2.Entity(
            entity=events_pb2.EntityRef(entity_type=entity_type, entity_id=entity_id),  # type: ignore[arg-type]
            watermark=row.watermark,
            parked_count=row.parked_count,
            awaiting_sequence=row.awaiting_sequence or 0,
            last_outcome=row.last_outcome or events_pb2.EVENT_STATE_UNSPECIFIED,
            last_outcome_reason=row.last_outcome_reason or "",
        )
        if row.first_seen_at is not None:
            entity.oldest_gap_age.CopyFrom(_duration((self.clock.now() - row.first_seen_at).total_seconds()))
        entity.updated_at.FromDatetime(row.updated_at)
        return entity

    # --- background ---------------------------------------------------------------------------

    async def monitor_gaps(self) -> None:
        """Alerts (once per gap) when a gap outlives the threshold; keeps the gap gauges fresh."""
        interval = max(0.2, min(5.0, self.settings.gap_alert_after / 4))
        while True:
            try:
                await self.check_gaps()
            except (DBAPIError, OSError, Retryable):
                log.warning("gap check failed; will retry", exc_info=True)
            await asyncio.sleep(interval)

    async def check_gaps(self) -> int:
        now = self.clock.now()
        threshold = now - dt.timedelta(seconds=self.settings.gap_alert_after)
        async with self.engine.begin() as conn:
            alerted = await repo.gaps_to_alert(conn, threshold, now)
            summary = await repo.gap_summary(conn, threshold)
        for gap in alerted:
            log.warning(
                "gap older than alert threshold",
                extra={
                    "entity_type": gap.entity_type,
                    "entity_id": gap.entity_id,
                    "awaiting_sequence": gap.awaiting_sequence,
                    "age_seconds": round((now - gap.first_seen_at).total_seconds(), 3),
                },
            )
        self.metrics.gaps.set(summary.gaps)
        self.metrics.parked.set(summary.parked)
        self.metrics.gaps_alerting.set(summary.alerting)
        self.metrics.oldest_gap_age.set((now - summary.oldest).total_seconds() if summary.oldest else 0.0)
        return len(alerted)


def _transient(exc: DBAPIError, state: str | None) -> bool:
    """Lost connections, server shutdowns and resource exhaustion: worth a retry by the caller."""
    return (
        state in RETRYABLE_SQLSTATES or exc.connection_invalidated or state is None or state[:2] in ("08", "53", "57")
    )


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode()


def _decode_token(token: str) -> list[Any] | None:
    if not token:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token is malformed", field="page_token") from exc
    if not isinstance(values, list):
        raise InvalidArgument("page_token is malformed", field="page_token")
    return values


__all__ = ["InvalidEvent", "Sequencer", "Submission", "status_from_row"]
