"""What both broker bridges share: a delivered message becomes a submission on the ingress path
of every gRPC caller, and its outcome says what the bridge tells the broker.

The body is a `SubmitEventRequest` (protobuf or its proto3 JSON), the idempotency key the
message's own id (AMQP `message_id`, NATS `Nats-Msg-Id`), the caller the bridge's configured
identity. The submission goes through `Ingress.submit`, so concurrent deliveries share group
commits like any callers, and a redelivery of a committed message is a replay. The broker is
told only after the commit: ACK (accepted or replayed), DEAD (refused for good: to the
dead-letter destination, with the ErrorInfo reason), RETRY (transient: handed back after a
back-off, nothing stored, the key still usable).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from common import logs
from common.errors import DeadlineReached, DomainError, MalformedRequest, Overloaded, Retryable
from common.interceptors import CORRELATION_HEADER, correlation_id_from
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.config import BrokerSettings
from sequencer.errors import InvalidArgument, ParkedLimitReached
from sequencer.idempotency import resolve_key
from sequencer.ingress import Ingress
from sequencer.metrics import SequencerMetrics

log = logging.getLogger(__name__)

PROTOBUF_TYPES = frozenset({"application/x-protobuf", "application/protobuf", "application/vnd.google.protobuf"})
JSON_TYPES = frozenset({"application/json"})
# How long one submission may wait for its locks before it is handed back as transient.
SUBMIT_TIMEOUT = 30.0
# Dead-letter headers: why the message was refused (ErrorInfo reason and the message).
REASON_HEADER = "x-error-reason"
MESSAGE_HEADER = "x-error-message"
# Header values stay small: the reason is what a consumer of dead letters dispatches on.
MAX_MESSAGE = 1000
# Refusals that a later attempt may not repeat: handed back with a back-off, never dead-lettered
# (the parked limit frees when the entity's gap fills; flow control's BACKLOG_FULL when the
# pipeline drains, after at least its RetryInfo delay).
TRANSIENT_ERRORS: tuple[type[DomainError], ...] = (Retryable, DeadlineReached, ParkedLimitReached, Overloaded)


class Verdict(enum.Enum):
    ACK = "ack"
    DEAD = "dead"
    RETRY = "retry"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str = ""
    message: str = ""
    replayed: bool = False
    # The least wait before a retry the refusal asked for (flow control's RetryInfo).
    retry_after: float = 0.0

    def dead_headers(self) -> dict[str, str]:
        return {REASON_HEADER: self.reason, MESSAGE_HEADER: self.message[:MAX_MESSAGE]}


def decode(body: bytes, content_type: str | None) -> sequencer_pb2.SubmitEventRequest:
    """The request in the body: by its content type; without one, proto3 JSON when it looks like
    a JSON object (a serialized SubmitEventRequest never starts with `{`), else protobuf."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if not kind:
        kind = "application/json" if body.lstrip()[:1] == b"{" else "application/x-protobuf"
    request = sequencer_pb2.SubmitEventRequest()
    try:
        if kind in PROTOBUF_TYPES:
            request.ParseFromString(body)
        elif kind in JSON_TYPES:
            json_format.Parse(body, request)
        else:
            raise MalformedRequest(
                f"content type {content_type!r} is not supported: send application/x-protobuf or application/json"
            )
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"the body is not a SubmitEventRequest ({kind}): {exc}") from exc
    return request


class Bridged:
    """Submits delivered messages for one broker and keeps that broker's counts."""

    def __init__(self, broker: str, ingress: Ingress, settings: BrokerSettings, metrics: SequencerMetrics) -> None:
        self.broker = broker
        self.ingress = ingress
        self.settings = settings
        self.metrics = metrics
        # Consecutive transient failures, for the back-off: while the database is away every
        # message waits longer, and the first success resets it.
        self._failures = 0

    def consumed(self, redelivered: bool) -> None:
        self.metrics.bridge_consumed.labels(self.broker).inc()
        if redelivered:
            self.metrics.bridge_redelivered.labels(self.broker).inc()

    def acked(self) -> None:
        self.metrics.bridge_acked.labels(self.broker).inc()

    def dead_lettered(self, outcome: Outcome) -> None:
        self.metrics.bridge_dead_lettered.labels(self.broker, outcome.reason).inc()

    def requeued(self) -> None:
        self.metrics.bridge_requeued.labels(self.broker).inc()

    def backoff(self, outcome: Outcome) -> float:
        """Seconds to hold a transiently failed message before handing it back (with jitter, so
        a burst of them does not come back at once), at least what the refusal asked for."""
        base = min(self.settings.bridge_backoff * 2 ** max(0, self._failures - 1), self.settings.bridge_backoff_max)
        return max(float(base * random.uniform(0.75, 1.0)), outcome.retry_after)  # noqa: S311 (jitter)

    async def submit(self, body: bytes, content_type: str | None, key: str | None, correlation: str | None) -> Outcome:
        """One message's outcome, decided only after the sequencer committed (or refused) it."""
        correlation_id = correlation_id_from([(CORRELATION_HEADER, correlation)] if correlation else [])
        logs.log_context.set({"correlation_id": correlation_id, "broker": self.broker})
        try:
            request = decode(body, content_type)
            if request.HasField("wait_for_terminal"):
                raise InvalidArgument(
                    "wait_for_terminal is not supported through a broker: read the outcome stream or poll",
                    field="wait_for_terminal",
                )
            result = await self.ingress.submit(
                caller=self.settings.bridge_caller,
                key=resolve_key([key] if key else [], request.request_id),
                request=request,
                correlation_id=correlation_id,
                timeout=SUBMIT_TIMEOUT,
            )
        except TRANSIENT_ERRORS as exc:
            self._failures += 1
            log.warning("bridged message failed transiently; handed back later", extra={"reason": exc.reason})
            retry_after = exc.retry_after if isinstance(exc, Overloaded) else 0.0
            return Outcome(Verdict.RETRY, exc.reason, exc.message, retry_after=retry_after)
        except DomainError as exc:
            self._failures = 0
            log.info(
                "bridged message refused; to the dead-letter destination",
                extra={"reason": exc.reason, "detail": exc.message},
            )
            return Outcome(Verdict.DEAD, exc.reason, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A defect, not the message's fault as far as we know; the dead-letter destination keeps
            # it for a replay once fixed, instead of a redelivery loop.
            log.exception("bridged message failed unexpectedly; dead-lettered")
            return Outcome(Verdict.DEAD, "INTERNAL", f"internal error ({type(exc).__name__})")
        self._failures = 0
        log.debug("bridged message accepted")  # (the transaction and state are in the log context)
        return Outcome(Verdict.ACK, replayed=result.replayed)
