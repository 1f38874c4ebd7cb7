"""The outcome stream (SPEC 16): every APPLIED, REJECTED, SKIPPED or BLOCKED status published
to NATS JetStream and to a RabbitMQ topic exchange, from the same outbox as the webhooks.

Each enabled broker is an outbox sink (`nats`, `amqp`) with one subscription row per target,
created (or re-activated) at start-up with an id derived from sink and target, so every replica
names the same row. The outbox trigger writes a delivery for each reported state change in the
transaction of the change; a publisher claims due deliveries of its sink (per entity only the
head, so one delivery of an entity is in flight at a time, in MSI order), publishes each, and
marks it delivered only after the broker confirmed it (a JetStream PubAck; a RabbitMQ publisher
confirm). A failed publish stays pending and is retried with a back-off; a crash leaves a claim
that expires and the delivery is published again with the same id: at least once, deduplicated
by `Nats-Msg-Id` (inside the stream's duplicate window) or by `message_id` at the consumer.

Names (docs/brokers.md): entity types `shipment` and `inventory_item`, states `applied`,
`rejected`, `skipped`, `blocked`; an entity id's `.` is written `%2E` (a `.` separates subject
and routing-key tokens, and `%` is not allowed in entity ids, so the form is reversible).
- NATS: subject `logistics.outcomes.<entity_type>.<entity_id>`, `Nats-Msg-Id`
  `<transaction_id>:<state>`, stream `LOGISTICS_OUTCOMES` (created when missing).
- RabbitMQ: durable topic exchange `logistics.outcomes`, routing key
  `<entity_type>.<entity_id>.<state>`, `message_id` `<transaction_id>:<state>`, persistent.
Body: the `EventStatus` in proto3 JSON (`application/json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from typing import Any, Protocol

import aio_pika
import nats.errors
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from google.protobuf import json_format
from nats.aio.client import Client
from nats.js import JetStreamContext
from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import db
from common.clock import Clock
from common.errors import DeadlineReached, Retryable
from logistics.events.v1 import events_pb2
from sequencer import outbox
from sequencer.bridges.jetstream import connect as nats_connect
from sequencer.bridges.jetstream import ensure_stream
from sequencer.config import BrokerSettings
from sequencer.convert import status_from_delivery
from sequencer.hints import Hint
from sequencer.metrics import SequencerMetrics
from sequencer.notifications import Notifier
from sequencer.states import APPLIED, BLOCKED, REJECTED, SKIPPED

log = logging.getLogger(__name__)

STATES = (APPLIED, REJECTED, SKIPPED, BLOCKED)
STATE_NAMES = {APPLIED: "applied", REJECTED: "rejected", SKIPPED: "skipped", BLOCKED: "blocked"}
ENTITY_TYPE_NAMES = {
    events_pb2.ENTITY_TYPE_SHIPMENT: "shipment",
    events_pb2.ENTITY_TYPE_INVENTORY_ITEM: "inventory_item",
}
# Subscription ids derived from (sink, target): the same row on every replica.
SUBSCRIPTION_NAMESPACE = uuid.UUID("5b0c4f0e-8a43-4c3e-9f4a-2f7c1b6d9e18")
# Deliveries published at once per sink and replica (each of another entity).
CONCURRENCY = 64
PUBLISH_TIMEOUT = 5.0
POLL_INTERVAL = 1.0
# Back-off of a failed publish: doubling from the first, capped.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
DATABASE_TROUBLE = (DBAPIError, OSError, Retryable, DeadlineReached)
MAX_ERROR = 500


def entity_token(entity_id: str) -> str:
    return entity_id.replace(".", "%2E")


def message_id(row: Row[Any]) -> str:
    return f"{row.transaction_id}:{STATE_NAMES[row.event_state]}"


def nats_subject(prefix: str, row: Row[Any]) -> str:
    return f"{prefix}.{ENTITY_TYPE_NAMES[row.entity_type]}.{entity_token(row.entity_id)}"


def routing_key(row: Row[Any]) -> str:
    return f"{ENTITY_TYPE_NAMES[row.entity_type]}.{entity_token(row.entity_id)}.{STATE_NAMES[row.event_state]}"


def body(row: Row[Any]) -> bytes:
    """The EventStatus as the state change reported it, in proto3 JSON."""
    return json_format.MessageToJson(status_from_delivery(row), indent=None).encode()


def retry_delay(step: int) -> float:
    return float(min(RETRY_FIRST * 2 ** max(0, step - 1), RETRY_MAX))


def subscription_id(sink: str, target: str) -> uuid.UUID:
    return uuid.uuid5(SUBSCRIPTION_NAMESPACE, f"{sink}:{target}")


class Sink(Protocol):
    name: str
    target: str

    async def connect(self) -> None: ...

    async def publish(self, row: Row[Any]) -> None:
        """Returns once the broker has confirmed the message; raises otherwise."""

    async def close(self) -> None: ...


class NatsSink:
    name = "nats"

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.target = settings.outcomes_nats_subject
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    async def connect(self) -> None:
        self._nc = await nats_connect(self.settings.nats_url, "sequencer-outcomes")
        self._js = self._nc.jetstream()
        await ensure_stream(self._js, self.settings.outcomes_nats_stream, [f"{self.target}.>"])

    async def publish(self, row: Row[Any]) -> None:
        assert self._js is not None
        headers = {"Nats-Msg-Id": message_id(row), "Content-Type": "application/json"}
        await self._js.publish(
            nats_subject(self.target, row),
            body(row),
            headers=headers,
            stream=self.settings.outcomes_nats_stream,
            timeout=PUBLISH_TIMEOUT,
        )

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 5)


class AmqpSink:
    name = "amqp"

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.target = settings.outcomes_amqp_exchange
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None

    async def connect(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self.settings.amqp_url, client_properties={"connection_name": "sequencer-outcomes"}
        )
        channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await channel.declare_exchange(self.target, aio_pika.ExchangeType.TOPIC, durable=True)

    async def publish(self, row: Row[Any]) -> None:
        assert self._exchange is not None
        message = aio_pika.Message(
            body(row),
            message_id=message_id(row),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # Not mandatory: a topic exchange drops what no binding wants, as for any publisher;
        # the confirm says RabbitMQ took responsibility for it.
        await self._exchange.publish(message, routing_key=routing_key(row), mandatory=False, timeout=PUBLISH_TIMEOUT)

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()


BROKER_TROUBLE = (nats.errors.Error, aio_pika.exceptions.AMQPError, OSError, TimeoutError, RuntimeError)


class OutcomePublisher:
    """One sink's publisher on this replica: claims, publishes, records."""

    def __init__(
        self,
        sink: Sink,
        lease: float,
        engine: AsyncEngine,
        clock: Clock,
        metrics: SequencerMetrics,
        notifier: Notifier,
        instance: str,
    ) -> None:
        self.sink = sink
        self.lease = lease
        self.engine = engine
        self.clock = clock
        self.metrics = metrics
        self.owner = f"outcomes-{sink.name}-{instance}"
        self.subscription = subscription_id(sink.name, sink.target)
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()
        self.in_flight: set[asyncio.Task[None]] = set()
        self._unsubscribe = notifier.subscribe(self._on_notification)

    def _on_notification(self, hint: Hint) -> None:
        if hint.resync or any(c.state in STATE_NAMES for c in hint.changes):
            self.wake.set()

    async def _ensure_subscription(self) -> None:
        async def work(conn: AsyncConnection) -> None:
            await outbox.ensure_subscription(
                conn,
                id=self.subscription,
                sink=self.sink.name,
                target=self.sink.target,
                states=list(STATES),
                description=f"outcome stream ({self.sink.name})",
                created_by="sequencer",
                created_at=self.clock.now(),
            )

        await db.transaction(self.engine, work)

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._ensure_subscription()
                await self.sink.connect()
                break
            except (*DATABASE_TROUBLE, *BROKER_TROUBLE) as exc:
                log.warning(
                    "outcome publisher cannot start yet; retrying",
                    extra={"broker": self.sink.name, "error": repr(exc), "retry_in": delay},
                )
                await self.sink.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.ready.set()
        log.info("outcome publisher running", extra={"broker": self.sink.name, "target": self.sink.target})
        while True:
            self.wake.clear()
            claimed = 0
            try:
                claimed = await self._claim()
            except DATABASE_TROUBLE:
                log.warning("claiming outcome deliveries failed; will retry", exc_info=True)
            except Exception:
                # Never a silent end of the stream: logged, and the next round tries again.
                log.exception("claiming outcome deliveries failed unexpectedly; will retry")
            if claimed and len(self.in_flight) < CONCURRENCY:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_INTERVAL)

    async def close(self) -> None:
        self._unsubscribe()
        for task in list(self.in_flight):
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)
        await self.sink.close()

    async def _claim(self) -> int:
        room = CONCURRENCY - len(self.in_flight)
        if room <= 0:
            return 0
        now = self.clock.now()
        until = now + dt.timedelta(seconds=self.lease)

        async def work(conn: AsyncConnection) -> list[Row[Any]]:
            return await outbox.claim(conn, sink=self.sink.name, owner=self.owner, now=now, until=until, limit=room)

        rows = await db.transaction(self.engine, work)
        for row in rows:
            task = asyncio.create_task(self._deliver(row), name=f"outcome-{self.sink.name}-{row.id}")
            self.in_flight.add(task)
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.wake.set()  # room again, and the entity's next delivery may be due

    async def _deliver(self, row: Row[Any]) -> None:
        started = time.monotonic()
        error: str | None = None
        try:
            await self.sink.publish(row)
        except BROKER_TROUBLE as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("publishing an outcome failed unexpectedly", extra={"delivery_id": str(row.id)})
            error = f"{type(exc).__name__}"
        latency = time.monotonic() - started
        now = self.clock.now()
        if error is None:
            self.metrics.outcomes_published.labels(self.sink.name).inc()
            self.metrics.outcomes_publish_lag.labels(self.sink.name).observe(
                max(0.0, (now - row.created_at).total_seconds())
            )
            status, next_at = outbox.DELIVERED, None
        else:
            log.warning(
                "publishing an outcome failed; will retry",
                extra={"broker": self.sink.name, "delivery_id": str(row.id), "error": error},
            )
            status, next_at = outbox.PENDING, now + dt.timedelta(seconds=retry_delay(row.step + 1))

        async def work(conn: AsyncConnection) -> bool:
            return await outbox.finish(
                conn,
                delivery_id=row.id,
                owner=self.owner,
                at=now,
                status=status,
                next_attempt_at=next_at,
                http_status=None,
                error=error,
                latency=latency,
            )

        try:
            await db.transaction(self.engine, work)
        except DATABASE_TROUBLE:
            # Published but not recorded: the claim expires and it goes again (same message id).
            log.warning("recording an outcome publish failed", extra={"delivery_id": str(row.id)}, exc_info=True)


def build(
    settings: BrokerSettings,
    engine: AsyncEngine,
    clock: Clock,
    metrics: SequencerMetrics,
    notifier: Notifier,
    instance: str,
) -> list[OutcomePublisher]:
    """The publishers the settings enable."""
    sinks: list[Sink] = []
    if settings.outcomes_nats:
        sinks.append(NatsSink(settings))
    if settings.outcomes_amqp:
        sinks.append(AmqpSink(settings))
    return [
        OutcomePublisher(sink, settings.outcomes_lease, engine, clock, metrics, notifier, instance) for sink in sinks
    ]
