"""An operator's skip of one missing MSI, audited and idempotent: a skip marker takes the MSI's
place in the chain, is forwarded like an event (so the ledger's version follows), and releases
the successors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import db, logs
from common.clock import Clock
from common.limits import MAX_TEXT
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import mailbox
from sequencer import repository as repo
from sequencer.config import Settings
from sequencer.convert import status_from_row
from sequencer.errors import InvalidArgument, NotAGap
from sequencer.idempotency import AnswerCache, StoredAnswer, Submission, replay
from sequencer.metrics import SequencerMetrics
from sequencer.repository import EntityKey
from sequencer.rules import Entity, Verdict
from sequencer.states import PARKED, QUEUED
from sequencer.validation import validate_entity, validate_sequence

log = logging.getLogger(__name__)

SKIP_METHOD = "/logistics.sequencer.v1.SequencerAdminService/SkipSequence"
SKIP_MARKER_HASH = hashlib.sha256(b"logistics.sequencer.skip").digest()


class Skips:
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
        validate_entity(request.entity.entity_type, request.entity.entity_id, prefix="entity")
        validate_sequence(request.sequence, "sequence")
        reason = request.reason.strip()
        if not reason or len(reason) > MAX_TEXT or not reason.isprintable():
            raise InvalidArgument(f"reason is required (1-{MAX_TEXT} printable characters)", field="reason")
        logs.bind(entity_type=request.entity.entity_type, entity_id=request.entity.entity_id, sequence=request.sequence)
        keyless = sequencer_pb2.SkipSequenceRequest(entity=request.entity, sequence=request.sequence, reason=reason)
        request_bytes = keyless.SerializeToString(deterministic=True)
        fingerprint = hashlib.sha256(request_bytes).digest()

        def replayed(record: StoredAnswer) -> Submission:
            response = replay(record, key, SKIP_METHOD, keyless, fingerprint, sequencer_pb2.SkipSequenceResponse)
            self.metrics.replays.inc()
            return Submission(response, True, record.created_at, record.expires_at)

        cached = self.answers.get(caller, key, self.clock.now())
        if cached is not None:
            return replayed(cached)
        queued: list[EntityKey] = []

        async def work(conn: AsyncConnection) -> Submission:
            queued.clear()
            now = self.clock.now()
            et, eid, seq = request.entity.entity_type, request.entity.entity_id, request.sequence
            # The ingress's lock step: the key's lock, then the entity's, and what the rules need.
            lock = mailbox.lock_params(
                keys=[(caller, key)],
                submitted=[(et, eid, seq)],
                row_lock=self.settings.lock_strategy == "row",
                lock_timeout=mailbox.lock_timeout(timeout),
                now=now,
            )
            seen = mailbox.snapshot((await conn.exec_driver_sql(mailbox.LOCK_SUBMISSIONS, lock)).all())
            record = seen.records.get((caller, key))
            if record is not None:  # a concurrent first execution committed meanwhile
                self.answers.put(caller, key, record)
                return replayed(record)
            entity = seen.entities[(et, eid)]
            response, forward = await self._skip(conn, entity, caller, key, keyless, reason, correlation_id, now)
            queued.extend(forward)
            expires_at = now + dt.timedelta(seconds=self.settings.idempotency_retention)
            record = StoredAnswer(
                SKIP_METHOD, fingerprint, request_bytes, response.SerializeToString(), now, expires_at
            )
            await repo.store_key_record(
                conn,
                caller_id=caller,
                idempotency_key=key,
                **{f.name: getattr(record, f.name) for f in dataclasses.fields(record)},
                status_code=0,
                transaction_id=uuid.UUID(response.status.transaction_id),
            )
            self.answers.put(caller, key, record)
            return Submission(response, False, now, expires_at)

        result = await db.transaction(self.engine, work)
        for entity in queued:
            self.on_queued(entity)
        return result

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
    ) -> tuple[sequencer_pb2.SkipSequenceResponse, list[EntityKey]]:
        """Holds the skip marker where the rules allow it (rules.Entity.skip: only a gap), with
        the ingress's write statement, so parked counts and gap rows follow the one gap rule."""
        et, eid, seq = request.entity.entity_type, request.entity.entity_id, request.sequence
        watermark = entity.watermark
        transaction_id = uuid.uuid4()
        decision = entity.skip(seq, transaction_id, SKIP_MARKER_HASH, reason)
        if decision.verdict is Verdict.NOT_MISSING:
            raise NotAGap(f"MSI {seq} of {eid} is not missing: it is held or processed", sequence=seq)
        if decision.verdict is Verdict.NOTHING_BEHIND:
            raise NotAGap(f"MSI {seq} of {eid} is not a gap: nothing parked waits behind it", sequence=seq)
        state = QUEUED if decision.verdict is Verdict.QUEUED else PARKED
        marker = events_pb2.Event(entity_type=et, entity_id=eid, sequence=seq, source=f"skip by {caller}")
        marker_bytes = marker.SerializeToString(deterministic=True)
        writes = mailbox.Writes()
        writes.hold(
            (et, eid), seq, transaction_id, state, marker_bytes, SKIP_MARKER_HASH, correlation_id, caller, key, reason
        )
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
        log.warning(
            "sequence skipped by operator",
            extra={"skipped_by": caller, "skip_reason": reason, "transaction_id": str(transaction_id)},
        )
        status_row = await repo.status_by_transaction(conn, transaction_id)
        assert status_row is not None
        response = sequencer_pb2.SkipSequenceResponse(status=status_from_row(status_row), watermark=watermark)
        return response, [(et, eid)] if state == QUEUED else []
