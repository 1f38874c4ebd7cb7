"""Webhook subscriptions (SPEC 14): the admin operations and the rules of delivery, without
transport. The deliveries are written by the outbox trigger; the dispatcher (dispatcher.py)
sends them; docs/webhooks.md is the contract.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import random
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import db
from common.clock import Clock
from common.limits import MAX_TEXT
from common.pages import decode_token, encode_token, page_size
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import outbox
from sequencer import repository as repo
from sequencer.config import Settings
from sequencer.convert import timestamp
from sequencer.errors import (
    InvalidArgument,
    WebhookDeliveryNotFound,
    WebhookSubscriptionDisabled,
    WebhookSubscriptionNotFound,
    WebhookTargetNotAllowed,
)
from sequencer.idempotency import AnswerCache, StoredAnswer, Submission, replay
from sequencer.sealing import SecretBox
from sequencer.states import APPLIED, BLOCKED, DUPLICATE, REJECTED, SKIPPED

log = logging.getLogger(__name__)

SINK = "webhook"
CREATE_METHOD = "/logistics.sequencer.v1.SequencerAdminService/CreateWebhookSubscription"
# The states a subscription may ask for (the outbox trigger reports these), and the default.
REPORTABLE = frozenset({APPLIED, REJECTED, DUPLICATE, SKIPPED, BLOCKED})
DEFAULT_STATES = (APPLIED, REJECTED, SKIPPED, BLOCKED)
SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
SECRET_BYTES = 32
MAX_URL = 2048
# A delay's jitter: up to this fraction either way, so retries of many deliveries spread out.
JITTER = 0.2


# --- the rules (pure) ----------------------------------------------------------------------------


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and host != pattern[2:]:
            return True
        if host == pattern:
            return True
    return False


def check_target(url: str, allowed: tuple[str, ...], development: bool) -> str:
    """The URL a subscription may target: https on an allowed host; in development mode (no
    credentials configured) also loopback over http. Matched by name, as written: the allow-list
    is the operator's statement of which receivers exist, so internal addresses stay out of reach
    unless listed. Raises WebhookTargetNotAllowed with the reason otherwise."""
    url = url.strip()
    if not url:
        raise InvalidArgument("url is required", field="url")
    if len(url) > MAX_URL:
        raise WebhookTargetNotAllowed(f"url is longer than {MAX_URL} characters", field="url")
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        _ = parts.port  # a malformed port raises here
    except ValueError as exc:
        raise WebhookTargetNotAllowed(f"url {url!r} is not a valid URL", field="url") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookTargetNotAllowed("url must be an http(s) URL with a host", field="url")
    if parts.username or parts.password:
        raise WebhookTargetNotAllowed("url must not carry credentials", field="url")
    if development and _is_loopback(host) and not allowed:
        return url
    if parts.scheme != "https" and not (development and _is_loopback(host)):
        raise WebhookTargetNotAllowed("url must be https (http only to loopback in development mode)", field="url")
    if _host_allowed(host, allowed) or (development and _is_loopback(host)):
        return url
    where = ", ".join(allowed) if allowed else "none (development mode allows loopback only)"
    raise WebhookTargetNotAllowed(
        f"host {host} is not on SEQUENCER_WEBHOOK_ALLOWED_HOSTS (allowed: {where})", field="url", host=host
    )


def check_states(states: list[int]) -> tuple[int, ...]:
    if not states:
        return DEFAULT_STATES
    unknown = sorted({s for s in states if s not in REPORTABLE})
    if unknown:
        names = ", ".join(_state_name(s) for s in unknown)
        raise InvalidArgument(
            f"states may name only outcomes (APPLIED, REJECTED, DUPLICATE, SKIPPED, BLOCKED), not {names}",
            field="states",
        )
    return tuple(sorted(set(states)))


def _state_name(state: int) -> str:
    if state in events_pb2.EventState.values():
        return events_pb2.EventState.Name(state)  # type: ignore[arg-type]
    return f"EVENT_STATE_{state}"


def event_type(state: int) -> str:
    """The payload's `type`: `event.applied`, `event.rejected`, `event.skipped`, `event.blocked`..."""
    return "event." + _state_name(state).removeprefix("EVENT_STATE_").lower()


def retry_delay(schedule: tuple[float, ...], step: int, rand: random.Random | None = None) -> float | None:
    """Seconds until attempt number `step` (0-based) of a delivery, jittered; None when the
    schedule is spent."""
    if step >= len(schedule):
        return None
    delay = schedule[step]
    if delay <= 0:
        return 0.0
    spread = delay * JITTER
    return max(0.0, delay + (rand or random).uniform(-spread, spread))


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt came to: delivered, retry later (at least `retry_after`), or disable."""

    delivered: bool
    http_status: int | None
    error: str | None
    retry_after: float | None = None
    disable: bool = False


def judge(http_status: int | None, error: str | None, retry_after_header: str | None) -> AttemptResult:
    """The Standard Webhooks reading of a receiver's answer: 2xx delivered; 410 Gone disables
    the subscription; 429 and 503 may name when to come back (Retry-After, seconds or an HTTP
    date); anything else, or no answer, is retried on the schedule."""
    if http_status is not None and 200 <= http_status < 300:
        return AttemptResult(True, http_status, None)
    if http_status == 410:
        return AttemptResult(False, http_status, "the receiver answered 410 Gone", disable=True)
    retry_after = parse_retry_after(retry_after_header) if http_status in (429, 503) else None
    return AttemptResult(False, http_status, error or f"the receiver answered {http_status}", retry_after)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


# --- the admin operations ------------------------------------------------------------------------


def subscription_message(row: Row[Any], secret: str = "") -> sequencer_pb2.WebhookSubscription:
    message = sequencer_pb2.WebhookSubscription(
        id=str(row.id),
        url=row.target,
        states=list(row.states),
        entity_type=row.entity_type or 0,  # type: ignore[arg-type]
        description=row.description,
        state=row.state,
        secret=secret,
        disabled_reason=row.disabled_reason or "",
    )
    for name in ("created_at", "disabled_at"):
        stamp = timestamp(getattr(row, name))
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    return message


def delivery_message(row: Row[Any]) -> sequencer_pb2.WebhookDelivery:
    message = sequencer_pb2.WebhookDelivery(
        id=str(row.id),
        subscription_id=str(row.subscription_id),
        transaction_id=str(row.transaction_id),
        entity=events_pb2.EntityRef(entity_type=row.entity_type, entity_id=row.entity_id),
        sequence=row.sequence,
        event_type=event_type(row.event_state),
        state=row.status,
        attempts=row.attempts,
        last_http_status=row.last_http_status or 0,
        last_error=row.last_error or "",
    )
    stamps = {"created_at": row.created_at, "delivered_at": row.delivered_at}
    if row.status == outbox.PENDING:
        stamps["next_attempt_at"] = row.next_attempt_at
    for name, value in stamps.items():
        stamp = timestamp(value)
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    return message


def _uuid(value: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidArgument(f"{name} must be a UUID", field=name) from exc


class Webhooks:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        clock: Clock,
        answers: AnswerCache,
        *,
        development: bool,
    ) -> None:
        self.engine = engine
        self.reads = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.settings = settings
        self.clock = clock
        self.answers = answers
        self.development = development
        self.box = SecretBox.from_setting(settings.webhook_secret_key)
        # Told when a redelivery is due now (the dispatcher looks at once).
        self.on_work: Callable[[], None] = lambda: None

    async def create(
        self, *, caller: str, key: str, request: sequencer_pb2.CreateWebhookSubscriptionRequest
    ) -> Submission:
        """Creates a subscription once per idempotency key. The secret is in this answer only:
        the stored answer (the one a replay gets) has none, so no later call can read it."""
        url = check_target(request.url, self.settings.webhook_allowed_hosts, self.development)
        states = check_states(list(request.states))
        if request.entity_type and request.entity_type not in events_pb2.EntityType.values():
            raise InvalidArgument(f"entity_type {request.entity_type} is not known", field="entity_type")
        description = request.description.strip()
        if len(description) > MAX_TEXT or not description.isprintable():
            raise InvalidArgument(f"description must be at most {MAX_TEXT} printable characters", field="description")
        keyless = sequencer_pb2.CreateWebhookSubscriptionRequest()
        keyless.CopyFrom(request)
        keyless.request_id = ""
        request_bytes = keyless.SerializeToString(deterministic=True)
        fingerprint = hashlib.sha256(request_bytes).digest()
        response_type = sequencer_pb2.CreateWebhookSubscriptionResponse

        def replayed(record: StoredAnswer) -> Submission:
            response = replay(record, key, CREATE_METHOD, keyless, fingerprint, response_type)
            return Submission(response, True, record.created_at, record.expires_at)

        cached = self.answers.get(caller, key, self.clock.now())
        if cached is not None:
            return replayed(cached)

        async def work(conn: AsyncConnection) -> Submission:
            now = self.clock.now()
            await repo.lock_key(conn, caller, key)
            found = await repo.get_key_record(conn, caller, key, now)
            if found is not None:
                record = StoredAnswer(
                    found.method, found.fingerprint, found.request, found.response, found.created_at, found.expires_at
                )
                self.answers.put(caller, key, record)
                return replayed(record)
            subscription_id = uuid.uuid4()
            secret = new_secret()
            row = await outbox.insert_subscription(
                conn,
                id=subscription_id,
                sink=SINK,
                target=url,
                states=list(states),
                entity_type=request.entity_type or None,
                description=description,
                secret=self.box.seal(secret, subscription_id.bytes),
                created_by=caller,
                created_at=now,
            )
            stored = response_type(subscription=subscription_message(row))
            expires_at = now + dt.timedelta(seconds=self.settings.idempotency_retention)
            answer = stored.SerializeToString()
            record = StoredAnswer(CREATE_METHOD, fingerprint, request_bytes, answer, now, expires_at)
            await repo.store_key_record(
                conn,
                caller_id=caller,
                idempotency_key=key,
                method=CREATE_METHOD,
                fingerprint=fingerprint,
                request=request_bytes,
                status_code=0,
                response=record.response,
                transaction_id=None,
                created_at=now,
                expires_at=expires_at,
            )
            self.answers.put(caller, key, record)
            log.info(
                "webhook subscription created",
                extra={"subscription_id": str(subscription_id), "url": url, "created_by": caller},
            )
            return Submission(response_type(subscription=subscription_message(row, secret)), False, now, expires_at)

        return await db.transaction(self.engine, work)

    async def list_subscriptions(
        self, requested_size: int, page_token: str
    ) -> tuple[list[sequencer_pb2.WebhookSubscription], str]:
        size = page_size(requested_size)
        after = decode_token(page_token)
        cursor = None
        if after is not None:
            try:
                cursor = (dt.datetime.fromisoformat(after[0]), uuid.UUID(after[1]))
            except (ValueError, IndexError, TypeError, AttributeError) as exc:
                raise InvalidArgument("page_token is malformed", field="page_token") from exc
        async with db.reading(self.reads) as conn:
            rows = await outbox.list_subscriptions(conn, SINK, cursor, size + 1)
        page, last = outbox.page_rows(rows, size)
        token = encode_token([last.created_at.isoformat(), str(last.id)]) if last is not None else ""
        return [subscription_message(r) for r in page], token

    async def delete(self, subscription_id: str) -> None:
        sid = _uuid(subscription_id, "id")

        async def work(conn: AsyncConnection) -> bool:
            return await outbox.delete_subscription(conn, SINK, sid)

        if not await db.transaction(self.engine, work):
            raise WebhookSubscriptionNotFound(f"no webhook subscription {subscription_id}", id=subscription_id)
        log.info("webhook subscription deleted", extra={"subscription_id": subscription_id})

    async def list_deliveries(
        self, subscription_id: str, requested_size: int, page_token: str
    ) -> tuple[list[sequencer_pb2.WebhookDelivery], str]:
        sid = _uuid(subscription_id, "subscription_id")
        size = page_size(requested_size)
        after = decode_token(page_token)
        cursor = None
        if after is not None:
            try:
                cursor = int(after[0])
            except (ValueError, IndexError, TypeError) as exc:
                raise InvalidArgument("page_token is malformed", field="page_token") from exc
        async with db.reading(self.reads) as conn:
            if await outbox.get_subscription(conn, SINK, sid) is None:
                raise WebhookSubscriptionNotFound(f"no webhook subscription {subscription_id}", id=subscription_id)
            rows = await outbox.list_deliveries(conn, sid, cursor, size + 1)
        page, last = outbox.page_rows(rows, size)
        token = encode_token([last.position]) if last is not None else ""
        return [delivery_message(r) for r in page], token

    async def redeliver(self, delivery_id: str) -> sequencer_pb2.WebhookDelivery:
        """Sends a delivery again, due now, with a fresh retry schedule. It keeps its place in its
        entity's MSI order: the entity's later pending deliveries wait for it."""
        did = _uuid(delivery_id, "delivery_id")

        async def work(conn: AsyncConnection) -> Row[Any]:
            found = await outbox.get_delivery(conn, SINK, did)
            if found is None:
                raise WebhookDeliveryNotFound(f"no webhook delivery {delivery_id}", delivery_id=delivery_id)
            if found.subscription_state != outbox.ACTIVE:
                raise WebhookSubscriptionDisabled(
                    f"subscription {found.subscription_id} is disabled; create a new subscription",
                    subscription_id=str(found.subscription_id),
                )
            row = await outbox.redeliver(conn, did, self.clock.now())
            assert row is not None
            return row

        row = await db.transaction(self.engine, work)
        self.on_work()
        log.info("webhook delivery redelivered", extra={"delivery_id": delivery_id})
        return delivery_message(row)
