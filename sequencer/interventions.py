"""Operators' interventions on one entity's MSI, audited and idempotent like a submission:

- a skip of a missing MSI: a skip marker takes the MSI's place in the chain, is forwarded like
  an event (so the ledger's version follows), and releases the successors;
- a skip of the entity's BLOCKED event: it is forwarded again as a skip (SKIPPED, same effect);
- a retry of the entity's BLOCKED event: it is QUEUED again with its attempts reset.

The rules decide (rules.Entity.skip / retry) under the ingress's locks; every intervention is
written to the `interventions` audit table (who, when, why) in the same transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import db, logs
from common.clock import Clock
from common.limits import MAX_TEXT
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import hints, mailbox
from sequencer import repository as repo
from sequencer.config import Settings
from sequencer.convert import status_from_row
from sequencer.errors import InvalidArgument, NotAGap, NotBlocked
from sequencer.hints import Change
from sequencer.idempotency import AnswerCache, StoredAnswer, Submission, replay
from sequencer.metrics import SequencerMetrics
from sequencer.repository import EntityKey
from sequencer.rules import Decision, Entity, Verdict
from sequencer.states import PARKED, QUEUED, entity_type_name
from sequencer.validation import validate_entity, validate_sequence

log = logging.getLogger(__name__)

SKIP_METHOD = "/logistics.sequencer.v1.SequencerAdminService/SkipSequence"
RETRY_METHOD = "/logistics.sequencer.v1.SequencerAdminService/RetryBlockedEvent"
SKIP_MARKER_HASH = hashlib.sha256(b"logistics.sequencer.skip").digest()

Response = TypeVar("Response", bound=Message)
# What an intervention does under the locks: the response, and whether the entity now has a
# QUEUED event to forward.
Act = Callable[[AsyncConnection, Entity, dt.datetime], Awaitable[tuple[Message, bool]]]


def _reason(text: str) -> str:
    reason = text.strip()
    if not reason or len(reason) > MAX_TEXT or not reason.isprintable():
        raise InvalidArgument(f"reason is required (1-{MAX_TEXT} printable characters)", field="reason")
    return reason


class Interventions:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        clock: Clock,
        metrics: SequencerMetrics,
        answers: AnswerCache,
        instance: str,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.answers = answers
        self.instance = instance
        self.on_queued: Callable[[EntityKey], None] = lambda _entity: None

    async def skip_sequence(
        self,
        *,
        caller: str,
        key: str,
        request: sequencer_pb2.SkipSequenceRequest,
        correlation_id: str,
        timeout: float | None = None,
    ) -> Submission:
        """SkipSequence: a gap's MSI, or the entity's BLOCKED event."""
        validate_entity(request.entity.entity_type, request.entity.entity_id, prefix="entity")
        validate_sequence(request.sequence, "sequence")
        reason = _reason(request.reason)
        keyless = sequencer_pb2.SkipSequenceRequest(entity=request.entity, sequence=request.sequence, reason=reason)

        async def act(conn: AsyncConnection, entity: Entity, now: dt.datetime) -> tuple[Message, bool]:
            return await self._skip(conn, entity, caller, key, keyless, reason, correlation_id, now)

        return await self._intervene(
            SKIP_METHOD, sequencer_pb2.SkipSequenceResponse, caller, key, keyless, act, timeout
        )

    async def retry_blocked(
        self,
        *,
        caller: str,
        key: str,
        request: sequencer_pb2.RetryBlockedEventRequest,
        timeout: float | None = None,
    ) -> Submission:
        """RetryBlockedEvent: the entity's BLOCKED event goes to the ledger again."""
        validate_entity(request.entity.entity_type, request.entity.entity_id, prefix="entity")
        validate_sequence(request.sequence, "sequence")
        reason = _reason(request.reason)
        keyless = sequencer_pb2.RetryBlockedEventRequest(
            entity=request.entity, sequence=request.sequence, reason=reason
        )
        et, eid, seq = request.entity.entity_type, request.entity.entity_id, request.sequence

        async def act(conn: AsyncConnection, entity: Entity, now: dt.datetime) -> tuple[Message, bool]:
            decision = entity.retry(seq)
            if decision.verdict is Verdict.NOT_BLOCKED:
                raise NotBlocked(f"MSI {seq} of {eid} is not blocked", sequence=seq)
            await self._unblock(conn, (et, eid), seq, decision, "retry", caller, reason, None, now)
            log.warning(
                "blocked event retried by operator",
                extra={"retried_by": caller, "retry_reason": reason, "transaction_id": str(decision.transaction_id)},
            )
            row = await repo.status_by_transaction(conn, decision.transaction_id)  # type: ignore[arg-type]
            assert row is not None
            return sequencer_pb2.RetryBlockedEventResponse(status=status_from_row(row)), True

        return await self._intervene(
            RETRY_METHOD, sequencer_pb2.RetryBlockedEventResponse, caller, key, keyless, act, timeout
        )

    async def _intervene(
        self,
        method: str,
        response_type: type[Response],
        caller: str,
        key: str,
        keyless: Message,
        act: Act,
        timeout: float | None,
    ) -> Submission:
        """One intervention, idempotent on (caller, key): a replay answers the stored response;
        otherwise `act` runs under the key's and the entity's locks (the ingress's lock step),
        and its response is stored with the key in the same transaction."""
        entity_ref = keyless.entity  # type: ignore[attr-defined]
        sequence = keyless.sequence  # type: ignore[attr-defined]
        logs.bind(
            entity_type=entity_type_name(entity_ref.entity_type), entity_id=entity_ref.entity_id, sequence=sequence
        )
        request_bytes = keyless.SerializeToString(deterministic=True)
        fingerprint = hashlib.sha256(request_bytes).digest()

        def replayed(record: StoredAnswer) -> Submission:
            response = replay(record, key, method, keyless, fingerprint, response_type)
            self.metrics.replays.inc()
            return Submission(response, True, record.created_at, record.expires_at)

        cached = self.answers.get(caller, key, self.clock.now())
        if cached is not None:
            return replayed(cached)
        queued: list[EntityKey] = []

        async def work(conn: AsyncConnection) -> Submission:
            queued.clear()
            now = self.clock.now()
            et, eid = entity_ref.entity_type, entity_ref.entity_id
            lock = mailbox.lock_params(
                keys=[(caller, key)],
                submitted=[(et, eid, sequence)],
                row_lock=self.settings.lock_strategy == "row",
                lock_timeout=mailbox.lock_timeout(timeout),
                now=now,
            )
            seen = mailbox.snapshot((await conn.exec_driver_sql(mailbox.LOCK_SUBMISSIONS, lock)).all())
            record = seen.records.get((caller, key))
            if record is not None:  # a concurrent first execution committed meanwhile
                self.answers.put(caller, key, record)
                return replayed(record)
            response, forward = await act(conn, seen.entities[(et, eid)], now)
            if forward:
                queued.append((et, eid))
            expires_at = now + dt.timedelta(seconds=self.settings.idempotency_retention)
            record = StoredAnswer(method, fingerprint, request_bytes, response.SerializeToString(), now, expires_at)
            await repo.store_key_record(
                conn,
                caller_id=caller,
                idempotency_key=key,
                **{f.name: getattr(record, f.name) for f in dataclasses.fields(record)},
                status_code=0,
                transaction_id=uuid.UUID(response.status.transaction_id),  # type: ignore[attr-defined]
            )
            self.answers.put(caller, key, record)
            return Submission(response, False, now, expires_at)

        result = await db.transaction(self.engine, work)
        for entity in queued:
            self.on_queued(entity)
        return result

    async def _unblock(
        self,
        conn: AsyncConnection,
        entity: EntityKey,
        sequence: int,
        decision: Decision,
        action: str,
        caller: str,
        reason: str,
        skip_reason: str | None,
        now: dt.datetime,
    ) -> None:
        """The entity's BLOCKED event QUEUED again (as a skip when `skip_reason` is set), its
        attempts reset, the intervention audited, and a hint sent at commit."""
        assert decision.transaction_id is not None
        await repo.audit(conn, entity, sequence, action=action, caller=caller, reason=reason, now=now, blocked=True)
        await repo.unblock(conn, entity, sequence, skip_reason=skip_reason, now=now)
        # Sent at commit (NOTIFY is transactional): watchers and other replicas see it queued.
        await repo.notify(conn, hints.encode(self.instance, [Change(*entity, QUEUED, str(decision.transaction_id))]))

    async def _skip(
        self,
        conn: AsyncConnection,
        entity: Entity,
        caller: str,
        key: str,
        request: sequencer_pb2.SkipSequenceRequest,
        reason: str,
        correlation_id: str,
        now: dt.datetime,
    ) -> tuple[sequencer_pb2.SkipSequenceResponse, bool]:
        """Skips where the rules allow it (rules.Entity.skip): the BLOCKED event is forwarded
        as a skip; a gap gets a skip marker, held with the ingress's write statement so parked
        counts and gap rows follow the one gap rule."""
        et, eid, seq = request.entity.entity_type, request.entity.entity_id, request.sequence
        watermark = entity.watermark
        transaction_id = uuid.uuid4()
        decision = entity.skip(seq, transaction_id, SKIP_MARKER_HASH, reason)
        if decision.verdict is Verdict.NOT_MISSING:
            raise NotAGap(f"MSI {seq} of {eid} is not missing: it is held or processed", sequence=seq)
        if decision.verdict is Verdict.NOTHING_BEHIND:
            raise NotAGap(f"MSI {seq} of {eid} is not a gap: nothing parked waits behind it", sequence=seq)
        forward = decision.verdict in (Verdict.QUEUED, Verdict.UNBLOCKED)
        if decision.verdict is Verdict.UNBLOCKED:
            await self._unblock(conn, (et, eid), seq, decision, "skip", caller, reason, reason, now)
            assert decision.transaction_id is not None
            transaction_id = decision.transaction_id
        else:
            state = QUEUED if decision.verdict is Verdict.QUEUED else PARKED
            marker = events_pb2.Event(entity_type=et, entity_id=eid, sequence=seq, source=f"skip by {caller}")
            marker_bytes = marker.SerializeToString(deterministic=True)
            writes = mailbox.Writes()
            writes.hold(
                (et, eid), seq, transaction_id, state, marker_bytes, SKIP_MARKER_HASH, correlation_id, caller, key,
                reason,
            )  # fmt: skip
            if state == PARKED:
                writes.parked[(et, eid)] = 1
            params = mailbox.write_params(
                writes,
                {(et, eid): entity},
                method=SKIP_METHOD,
                now=now,
                expires_at=now,
                queued_state=QUEUED,
                origin=self.instance,
            )
            mailbox.check_written((await conn.exec_driver_sql(mailbox.WRITE_BATCH, params)).first(), writes)
            await repo.audit(conn, (et, eid), seq, action="skip", caller=caller, reason=reason, now=now, blocked=False)
        log.warning(
            "sequence skipped by operator",
            extra={"skipped_by": caller, "skip_reason": reason, "transaction_id": str(transaction_id)},
        )
        status_row = await repo.status_by_transaction(conn, transaction_id)
        assert status_row is not None
        response = sequencer_pb2.SkipSequenceResponse(status=status_from_row(status_row), watermark=watermark)
        return response, forward
