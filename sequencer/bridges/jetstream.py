"""The NATS JetStream ingress bridge (nats-py): a durable pull consumer on the stream
`SEQUENCER_NATS_STREAM` into the sequencer's ingress, acknowledged only after the commit.

The stream (subjects `SEQUENCER_NATS_SUBJECTS`) and the dead-letter stream are created when
missing and left as they are when present (an operator's limits and replicas stay theirs). The
consumer acknowledges explicitly, holds at most `SEQUENCER_NATS_PREFETCH` unacknowledged
messages (max_ack_pending) and the bridge pulls no more than it has room for, so a burst cannot
exhaust memory; the messages in hand are submitted concurrently and share group commits.

- Accepted or replayed: ack after the commit.
- Refused for good: published (a JetStream publish, acknowledged by the server) to
  `<SEQUENCER_NATS_DEAD_SUBJECT>.<the rest of the subject>` with the body, the original headers
  and `x-error-reason` / `x-error-message`, then terminated (`+TERM`: never redelivered). The
  dead letter's `Nats-Msg-Id` is the original's stream and sequence, so a crash between the two
  steps stores it once within the dead stream's duplicate window.
- Transient (database away): `-NAK` with the back-off as its delay.

nats-py reconnects by itself (without limit here) after a dropped connection or a server
restart; a pull in flight then fails or times out and the loop pulls again. Messages whose ack
was lost come back after ack_wait, and the key makes them replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from sequencer.bridges.delivery import Bridged, Outcome, Verdict
from sequencer.config import BrokerSettings

log = logging.getLogger(__name__)

BROKER = "nats"
KEY_HEADER = "Nats-Msg-Id"
CORRELATION_HEADERS = ("X-Correlation-Id", "x-correlation-id")
PULL_EXPIRES = 1.0


async def connect(url: str, name: str) -> Client:
    """A connection that reconnects forever (a broker restart is an interruption, not an end);
    the first connection is retried by the caller."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats connection error", extra={"error": repr(exc), "connection": name})

    async def on_disconnected() -> None:
        log.warning("nats disconnected; reconnecting", extra={"connection": name})

    async def on_reconnected() -> None:
        log.info("nats reconnected", extra={"connection": name})

    return await nats.connect(
        url,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )


async def ensure_stream(js: JetStreamContext, name: str, subjects: list[str]) -> None:
    """Creates the stream when missing; an existing one is left as configured."""
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(api.StreamConfig(name=name, subjects=subjects, storage=api.StorageType.FILE))
        log.info("nats stream created", extra={"stream": name, "subjects": subjects})


class NatsBridge:
    def __init__(self, bridged: Bridged, settings: BrokerSettings) -> None:
        self.bridged = bridged
        self.settings = settings
        self.ready = asyncio.Event()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        # `logistics.events.>` -> the prefix `logistics.events.` a subject's rest follows.
        self._prefix = settings.nats_subjects[:-1]

    async def run(self) -> None:
        delay = 1.0
        while self._nc is None:
            try:
                self._nc = await connect(self.settings.nats_url, "sequencer-bridge")
            except (OSError, nats.errors.Error) as exc:
                log.warning("nats bridge cannot connect yet; retrying", extra={"error": repr(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self._js = self._nc.jetstream()
        subscription = await self._subscribe(self._js)
        if subscription is None:
            return  # closed meanwhile
        self.ready.set()
        log.info(
            "nats bridge consuming",
            extra={
                "stream": self.settings.nats_stream,
                "consumer": self.settings.nats_consumer,
                "prefetch": self.settings.nats_prefetch,
            },
        )
        await self._pull(subscription)

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription | None:
        """The stream, the dead-letter stream and the durable consumer; retried while the
        server is away (JetStream API calls time out then)."""
        while not self._stopping:
            try:
                await ensure_stream(js, self.settings.nats_stream, [self.settings.nats_subjects])
                await ensure_stream(js, self.settings.nats_dead_stream, [f"{self.settings.nats_dead_subject}.>"])
                config = api.ConsumerConfig(
                    ack_policy=api.AckPolicy.EXPLICIT,
                    max_ack_pending=self.settings.nats_prefetch,
                    ack_wait=self.settings.nats_ack_wait,
                )
                return await js.pull_subscribe(
                    self.settings.nats_subjects,
                    durable=self.settings.nats_consumer,
                    stream=self.settings.nats_stream,
                    config=config,
                    pending_msgs_limit=self.settings.nats_prefetch * 2,
                )
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("nats bridge cannot set up its consumer yet; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
        return None

    async def _pull(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping:
            room = self.settings.nats_prefetch - len(self._inflight)
            if room <= 0:
                await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                messages = await subscription.fetch(room, timeout=PULL_EXPIRES)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as exc:
                # Disconnected or reconnecting (the client reconnects by itself), or the consumer
                # or stream is gone (an operator's doing): pull again shortly, and say so.
                log.warning("nats pull failed; pulling again", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
                continue
            for message in messages:
                task = asyncio.create_task(self._handle(message), name="nats-bridge-message")
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def close(self) -> None:
        self._stopping = True
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=2)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 5)

    def reset(self) -> None:
        """Forgets a closed connection, so `run` starts over."""
        self._nc = None
        self._js = None
        self._stopping = False

    async def _handle(self, message: Msg) -> None:
        headers = message.headers or {}
        self.bridged.consumed(message.metadata.num_delivered > 1)
        correlation = next((headers[h] for h in CORRELATION_HEADERS if h in headers), None)
        outcome = await self.bridged.submit(
            message.data, headers.get("Content-Type"), headers.get(KEY_HEADER), correlation
        )
        try:
            if outcome.verdict is Verdict.ACK:
                await message.ack()
                self.bridged.acked()
            elif outcome.verdict is Verdict.DEAD:
                await self._dead_letter(message, outcome)
                await message.term()
                self.bridged.dead_lettered(outcome)
            else:
                await message.nak(delay=self.bridged.backoff(outcome))
                self.bridged.requeued()
        except (nats.errors.Error, OSError) as exc:
            # Lost with the connection: JetStream redelivers after ack_wait.
            log.warning(
                "nats message could not be settled; JetStream redelivers it",
                extra={"error": repr(exc), "verdict": outcome.verdict.value},
            )

    def dead_subject(self, subject: str) -> str:
        rest = subject[len(self._prefix) :] if subject.startswith(self._prefix) else subject
        return f"{self.settings.nats_dead_subject}.{rest}"

    async def _dead_letter(self, message: Msg, outcome: Outcome) -> None:
        assert self._js is not None
        headers: dict[str, Any] = dict(message.headers or {})
        headers.update(outcome.dead_headers())
        headers["x-original-subject"] = message.subject
        if KEY_HEADER in headers:
            headers["x-original-msg-id"] = headers[KEY_HEADER]
        metadata = message.metadata
        # Unique per original message, so a repeated dead-lettering is deduplicated.
        headers[KEY_HEADER] = f"{metadata.stream}:{metadata.sequence.stream}"
        await self._js.publish(
            self.dead_subject(message.subject),
            message.data,
            stream=self.settings.nats_dead_stream,
            headers=headers,
            timeout=5,
        )
