"""The RabbitMQ ingress bridge (aio-pika): the durable queue `SEQUENCER_AMQP_QUEUE` into the
sequencer's ingress, acknowledged only after the commit.

The broker hands at most `SEQUENCER_AMQP_PREFETCH` unacknowledged deliveries at once (basic_qos),
which bounds the memory a burst can take; aio-pika runs each delivery's handler as its own task,
so up to that many submissions wait together and the ingress commits them in group commits.

- Accepted or replayed: `basic.ack` after the commit.
- Refused for good: published (with publisher confirms) to `SEQUENCER_AMQP_DEAD_QUEUE` through
  the default exchange, the body and properties kept and the ErrorInfo reason and message in the
  `x-error-reason` / `x-error-message` headers, then acked. A crash between the two publishes
  the dead letter twice (same message_id), never loses it.
- Transient (database away): the delivery is held for the back-off, then `basic.nack` with
  requeue. Held deliveries count against the prefetch, so while the database is away the
  bridge slows down instead of spinning; no delay queue is needed.

`connect_robust` reconnects after a broker restart or a dropped connection and restores the
channel, its QoS and the consumer; deliveries in flight on the lost channel cannot be acked any
more and the broker redelivers them (the key makes that a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from sequencer.bridges.delivery import Bridged, Outcome, Verdict
from sequencer.config import BrokerSettings

log = logging.getLogger(__name__)

BROKER = "amqp"
RECONNECT_INTERVAL = 1.0


class AmqpBridge:
    def __init__(self, bridged: Bridged, settings: BrokerSettings) -> None:
        self.bridged = bridged
        self.settings = settings
        self.ready = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._consumer_tag: str | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Connects (retrying until the broker answers), declares the queues, consumes until
        cancelled."""
        delay = RECONNECT_INTERVAL
        while self._connection is None:
            try:
                self._connection = await aio_pika.connect_robust(
                    self.settings.amqp_url,
                    reconnect_interval=RECONNECT_INTERVAL,
                    client_properties={"connection_name": "sequencer-bridge"},
                )
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("amqp bridge cannot connect yet; retrying", extra={"error": repr(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        channel = await self._connection.channel(publisher_confirms=True)
        assert isinstance(channel, AbstractRobustChannel)
        self._channel = channel
        await channel.set_qos(prefetch_count=self.settings.amqp_prefetch)
        await self._declare(channel, self.settings.amqp_dead_queue)
        self._queue = await self._declare(channel, self.settings.amqp_queue)
        self._consumer_tag = await self._queue.consume(self._on_message)
        self.ready.set()
        log.info(
            "amqp bridge consuming",
            extra={"queue": self.settings.amqp_queue, "prefetch": self.settings.amqp_prefetch},
        )
        await asyncio.Event().wait()

    async def _declare(self, channel: AbstractRobustChannel, name: str) -> aio_pika.abc.AbstractQueue:
        """The queue as it is when it exists (an operator's quorum queue, its arguments and
        limits, stay theirs: redeclaring it with other arguments is refused), else a new
        durable classic queue. The probe runs on a channel of its own, which a missing queue
        closes."""
        assert self._connection is not None
        probe = await self._connection.channel()
        try:
            await probe.declare_queue(name, passive=True)
            exists = True
        except aio_pika.exceptions.ChannelNotFoundEntity:
            exists = False
        finally:
            with contextlib.suppress(Exception):
                await probe.close()
        if exists:
            return await channel.declare_queue(name, passive=True)
        return await channel.declare_queue(name, durable=True)

    async def close(self) -> None:
        """Stops taking deliveries, lets the handlers in flight finish briefly (the rest are
        redelivered), closes the connection."""
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), 2)
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    def reset(self) -> None:
        """Forgets a closed connection, so `run` starts over."""
        self._connection = self._channel = self._queue = None
        self._consumer_tag = None

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        self.bridged.consumed(bool(message.redelivered))
        headers = message.headers or {}
        correlation = message.correlation_id or headers.get("x-correlation-id")
        outcome = await self.bridged.submit(
            message.body,
            message.content_type,
            message.message_id,
            correlation if isinstance(correlation, str) else None,
        )
        try:
            if outcome.verdict is Verdict.ACK:
                await message.ack()
                self.bridged.acked()
            elif outcome.verdict is Verdict.DEAD:
                try:
                    await self._dead_letter(message, outcome)
                except aio_pika.exceptions.DeliveryError:
                    # The dead-letter queue refused it (deleted, full): keep the message.
                    log.warning("dead letter not accepted; the message is handed back", exc_info=True)
                    await self._requeue(message, outcome)
                    return
                await message.ack()
                self.bridged.dead_lettered(outcome)
            else:
                await self._requeue(message, outcome)
        except (aio_pika.exceptions.AMQPError, RuntimeError, OSError) as exc:
            # The channel went away with the delivery (ChannelInvalidStateError is a
            # RuntimeError): the broker redelivers it.
            log.warning(
                "amqp delivery could not be settled; the broker redelivers it",
                extra={"error": repr(exc), "verdict": outcome.verdict.value},
            )

    async def _requeue(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        await asyncio.sleep(self.bridged.backoff(outcome))
        await message.nack(requeue=True)
        self.bridged.requeued()

    async def _dead_letter(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        assert self._channel is not None
        headers = dict(message.headers or {})
        headers.update(outcome.dead_headers())
        headers["x-original-queue"] = self.settings.amqp_queue
        dead = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._channel.default_exchange.publish(dead, routing_key=self.settings.amqp_dead_queue)
