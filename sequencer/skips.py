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
from sequencer import hints
from sequencer import repository as repo
from sequencer.config import Settings
from sequencer.convert import status_from_row
from sequencer.errors import InvalidArgument, NotAGap
from sequencer.forwarding import QueuedEvent
from sequencer.idempotency import AnswerCache, StoredAnswer, Submission, replay
from sequencer.metrics import SequencerMetrics
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
        self.on_queued: Callable[[QueuedEvent], None] = lambda _event: None

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
        queued: list[QueuedEvent] = []

        async def work(conn: AsyncConnection) -> Submission:
            queued.clear()
            now = self.clock.now()
            row = await repo.lock_key(conn, caller, key, now, timeout)
            if row is not None:  # a concurrent first execution committed meanwhile
                record = StoredAnswer(
                    row.method, row.fingerprint, row.request, row.response, row.created_at, row.expires_at
                )
                self.answers.put(caller, key, record)
                return replayed(record)
            response, forward = await self._skip(conn, caller, key, keyless, reason, correlation_id, now)
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
        for event in queued:
            self.on_queued(event)
        return result

    async def _skip(
        self,
        conn: AsyncConnection,
        caller: str,
        key: str,
        request: sequencer_pb2.SkipSequenceRequest,
        reason: str,
        correlation_id: str,
        now: dt.datetime,
    ) -> tuple[sequencer_pb2.SkipSequenceResponse, list[QueuedEvent]]:
        """Only a gap may be skipped: an MSI neither held nor processed, with something parked
        behind it."""
        et, eid, seq = request.entity.entity_type, request.entity.entity_id, request.sequence
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
            payload=hints.encode(self.instance, [hints.Change(et, eid, state, str(transaction_id))]),
        )
        log.warning(
            "sequence skipped by operator",
            extra={"skipped_by": caller, "skip_reason": reason, "transaction_id": str(transaction_id)},
        )
        status_row = await repo.status_by_transaction(conn, transaction_id)
        assert status_row is not None
        response = sequencer_pb2.SkipSequenceResponse(status=status_from_row(status_row), watermark=entity.watermark)
        forward = [QueuedEvent(et, eid, seq, transaction_id, marker_bytes, correlation_id, reason)]
        return response, forward if state == QUEUED else []
