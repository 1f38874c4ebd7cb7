"""The machine's real RabbitMQ and NATS JetStream for the bridge tests, with names private to
one test (other agents and parallel runs share the brokers), and a TCP proxy that cuts a
connection for real without stopping the shared broker.

AMQP_URL / NATS_URL point the tests elsewhere (defaults: the local brokers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import nats
from aio_pika.abc import AbstractChannel, AbstractConnection
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from sequencer.config import BrokerSettings

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


@dataclass
class Outcome:
    msg_id: str
    where: str  # the subject or routing key
    body: bytes


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, str]
    key: str | None
    where: str  # the dead-letter queue or subject it arrived on


class BrokerUnderTest:
    """One broker with names for one test: what the sequencer is configured with, a publisher,
    and a reader of the dead-letter destination."""

    kind: str

    def broker_settings(self, url: str | None = None, *, outcomes: bool = False) -> BrokerSettings:
        raise NotImplementedError

    def env(self, url: str | None = None) -> dict[str, str]:
        """The same configuration as SEQUENCER_* variables (for subprocesses)."""
        raise NotImplementedError

    def outcomes_env(self) -> dict[str, str]:
        """The outcome publisher's SEQUENCER_* variables, beside `env()`."""
        raise NotImplementedError

    async def outcomes_stored(self) -> int:
        """How many outcome messages the broker holds (without reading them)."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def publish(self, body: bytes, *, key: str | None, content_type: str | None = PROTOBUF) -> None:
        raise NotImplementedError

    async def dead_letters(self, count: int, timeout: float = 30.0) -> list[DeadLetter]:
        raise NotImplementedError

    async def outcomes(self, until: Any, timeout: float = 120.0) -> list[Outcome]:
        """Outcome messages in arrival order, read until `until(messages)` holds."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


@dataclass
class RabbitBroker(BrokerUnderTest):
    kind: str = "amqp"
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Arguments of the ingress queue as an operator declared it (e.g. a quorum queue).
    queue_arguments: dict[str, Any] | None = None
    connection: AbstractConnection | None = None
    channel: AbstractChannel | None = None

    @property
    def url(self) -> str:
        return AMQP_URL

    @property
    def queue(self) -> str:
        return f"test.{self.suffix}.events"

    @property
    def dead_queue(self) -> str:
        return f"test.{self.suffix}.events.dead"

    @property
    def outcomes_exchange(self) -> str:
        return f"test.{self.suffix}.outcomes"

    @property
    def outcomes_queue(self) -> str:
        return f"test.{self.suffix}.outcomes.all"

    def broker_settings(self, url: str | None = None, *, outcomes: bool = False) -> BrokerSettings:
        return BrokerSettings(
            amqp_url=url or AMQP_URL,
            amqp_queue=self.queue,
            amqp_dead_queue=self.dead_queue,
            bridge_backoff=0.1,
            outcomes_amqp=outcomes,
            outcomes_amqp_exchange=self.outcomes_exchange,
        )

    def env(self, url: str | None = None) -> dict[str, str]:
        return {
            "SEQUENCER_AMQP_URL": url or AMQP_URL,
            "SEQUENCER_AMQP_QUEUE": self.queue,
            "SEQUENCER_AMQP_DEAD_QUEUE": self.dead_queue,
            "SEQUENCER_BRIDGE_BACKOFF": "0.1",
        }

    def outcomes_env(self) -> dict[str, str]:
        return {"SEQUENCER_OUTCOMES_AMQP": "true", "SEQUENCER_OUTCOMES_AMQP_EXCHANGE": self.outcomes_exchange}

    async def outcomes_stored(self) -> int:
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.outcomes_queue, durable=True)
        return int(queue.declaration_result.message_count or 0)

    async def open(self) -> None:
        self.connection = await aio_pika.connect(AMQP_URL)
        self.channel = await self.connection.channel(publisher_confirms=True)
        # Declared here as the bridge declares them, so publishing may start before it runs.
        await self.channel.declare_queue(self.queue, durable=True, arguments=self.queue_arguments)
        await self.channel.declare_queue(self.dead_queue, durable=True)
        # A reader of every outcome, bound before any is published (a topic exchange drops what
        # no binding wants).
        exchange = await self.channel.declare_exchange(
            self.outcomes_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        outcomes = await self.channel.declare_queue(self.outcomes_queue, durable=True)
        await outcomes.bind(exchange, routing_key="#")

    async def publish(self, body: bytes, *, key: str | None, content_type: str | None = PROTOBUF) -> None:
        assert self.channel is not None
        if key is None:
            await publish_without_message_id(AMQP_URL, self.queue, body, content_type or "")
            return
        message = aio_pika.Message(
            body, message_id=key, content_type=content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self.channel.default_exchange.publish(message, routing_key=self.queue)

    async def dead_letters(self, count: int, timeout: float = 30.0) -> list[DeadLetter]:
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.dead_queue, durable=True)
        found: list[DeadLetter] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < count:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{[d.headers for d in found]} in {self.dead_queue}, expected {count}")
                await asyncio.sleep(0.1)
                continue
            headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (message.headers or {}).items()}
            found.append(DeadLetter(message.body, headers, message.message_id, self.dead_queue))
        return found

    async def outcomes(self, until: Any, timeout: float = 120.0) -> list[Outcome]:
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.outcomes_queue, durable=True)
        found: list[Outcome] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while not until(found):
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{len(found)} outcomes in {self.outcomes_queue} before the timeout")
                await asyncio.sleep(0.1)
                continue
            found.append(Outcome(message.message_id or "", message.routing_key or "", message.body))
        return found

    async def close(self) -> None:
        if self.channel is not None:
            for name in (self.queue, self.dead_queue, self.outcomes_queue):
                with contextlib.suppress(Exception):
                    await self.channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await self.channel.exchange_delete(self.outcomes_exchange)
        if self.connection is not None:
            await self.connection.close()


@dataclass
class JetStreamBroker(BrokerUnderTest):
    kind: str = "nats"
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    nc: Client | None = None
    js: JetStreamContext | None = None

    @property
    def url(self) -> str:
        return NATS_URL

    @property
    def stream(self) -> str:
        return f"TEST_{self.suffix.upper()}_EVENTS"

    @property
    def dead_stream(self) -> str:
        return f"TEST_{self.suffix.upper()}_DEAD"

    @property
    def subjects(self) -> str:
        return f"test{self.suffix}.events.>"

    @property
    def dead_subject(self) -> str:
        return f"test{self.suffix}.dead"

    @property
    def outcomes_stream(self) -> str:
        return f"TEST_{self.suffix.upper()}_OUTCOMES"

    @property
    def outcomes_subject(self) -> str:
        return f"test{self.suffix}.outcomes"

    def broker_settings(self, url: str | None = None, *, outcomes: bool = False) -> BrokerSettings:
        return BrokerSettings(
            outcomes_nats=outcomes,
            outcomes_nats_stream=self.outcomes_stream,
            outcomes_nats_subject=self.outcomes_subject,
            nats_url=url or NATS_URL,
            nats_stream=self.stream,
            nats_subjects=self.subjects,
            nats_dead_stream=self.dead_stream,
            nats_dead_subject=self.dead_subject,
            # Short, so a message whose ack died with a connection comes back soon.
            nats_ack_wait=5.0,
            bridge_backoff=0.1,
        )

    def env(self, url: str | None = None) -> dict[str, str]:
        return {
            "SEQUENCER_NATS_URL": url or NATS_URL,
            "SEQUENCER_NATS_STREAM": self.stream,
            "SEQUENCER_NATS_SUBJECTS": self.subjects,
            "SEQUENCER_NATS_DEAD_STREAM": self.dead_stream,
            "SEQUENCER_NATS_DEAD_SUBJECT": self.dead_subject,
            "SEQUENCER_NATS_ACK_WAIT": "5",
            "SEQUENCER_BRIDGE_BACKOFF": "0.1",
        }

    def outcomes_env(self) -> dict[str, str]:
        return {
            "SEQUENCER_OUTCOMES_NATS": "true",
            "SEQUENCER_OUTCOMES_NATS_STREAM": self.outcomes_stream,
            "SEQUENCER_OUTCOMES_NATS_SUBJECT": self.outcomes_subject,
        }

    async def outcomes_stored(self) -> int:
        assert self.js is not None
        info = await self.js.stream_info(self.outcomes_stream)
        return int(info.state.messages)

    async def open(self) -> None:
        self.nc = await nats.connect(NATS_URL)
        self.js = self.nc.jetstream()
        # JetStream itself drops a second publish of one Nats-Msg-Id inside the stream's
        # duplicate window; the shortest window lets a test store duplicates on purpose, so
        # they reach the sequencer (which must replay them).
        await self.js.add_stream(
            api.StreamConfig(name=self.stream, subjects=[self.subjects], duplicate_window=0.1, max_age=3600)
        )
        await self.js.add_stream(
            api.StreamConfig(name=self.dead_stream, subjects=[f"{self.dead_subject}.>"], max_age=3600)
        )
        await self.js.add_stream(
            api.StreamConfig(name=self.outcomes_stream, subjects=[f"{self.outcomes_subject}.>"], max_age=3600)
        )

    async def publish(self, body: bytes, *, key: str | None, content_type: str | None = PROTOBUF) -> None:
        assert self.js is not None
        headers: dict[str, Any] = {}
        if key is not None:
            headers["Nats-Msg-Id"] = key
        if content_type is not None:
            headers["Content-Type"] = content_type
        subject = self.subjects[:-1] + "in"
        while True:
            ack = await self.js.publish(subject, body, headers=headers or None, stream=self.stream, timeout=10)
            if not ack.duplicate:
                return
            # Inside the duplicate window: store it once the window has passed.
            await asyncio.sleep(0.15)

    async def dead_letters(self, count: int, timeout: float = 30.0) -> list[DeadLetter]:
        assert self.js is not None
        sub = await self.js.pull_subscribe(f"{self.dead_subject}.>", stream=self.dead_stream)
        found: list[DeadLetter] = []
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while len(found) < count:
                try:
                    messages = await sub.fetch(count - len(found), timeout=1)
                except nats.errors.TimeoutError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise AssertionError(
                            f"{len(found)} dead letters in {self.dead_stream}, expected {count}"
                        ) from None
                    continue
                for message in messages:
                    await message.ack()
                    headers = dict(message.headers or {})
                    found.append(DeadLetter(message.data, headers, headers.get("x-original-msg-id"), message.subject))
        finally:
            await sub.unsubscribe()
        return found

    async def outcomes(self, until: Any, timeout: float = 120.0) -> list[Outcome]:
        assert self.js is not None
        sub = await self.js.pull_subscribe(f"{self.outcomes_subject}.>", stream=self.outcomes_stream)
        found: list[Outcome] = []
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while not until(found):
                try:
                    messages = await sub.fetch(100, timeout=1)
                except nats.errors.TimeoutError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise AssertionError(
                            f"{len(found)} outcomes in {self.outcomes_stream} before the timeout"
                        ) from None
                    continue
                for message in messages:
                    await message.ack()
                    found.append(Outcome((message.headers or {}).get("Nats-Msg-Id", ""), message.subject, message.data))
        finally:
            await sub.unsubscribe()
        return found

    async def close(self) -> None:
        if self.js is not None:
            for name in (self.stream, self.dead_stream, self.outcomes_stream):
                with contextlib.suppress(Exception):
                    await self.js.delete_stream(name)
        if self.nc is not None:
            await self.nc.close()


def make_broker(kind: str) -> BrokerUnderTest:
    return RabbitBroker() if kind == "amqp" else JetStreamBroker()


class TcpProxy:
    """A loopback TCP proxy to a broker. `cut()` closes every connection through it and stops
    listening, so reconnection attempts are refused (a real connection fault the client sees,
    while the shared broker keeps running); `restore()` listens on the same port again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    @classmethod
    def to_url(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or (5672 if parts.scheme == "amqp" else 4222))

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def url_for(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
            writer.close()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()
        pipes = list(self._pipes)
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


async def publish_without_message_id(url: str, queue: str, body: bytes, content_type: str) -> None:
    """Publishes one message with no message_id, as a pika or Java producer may. aio-pika (aiormq)
    cannot: it fills a random message_id into every message that lacks one. So this speaks
    AMQP 0-9-1 itself (pamqp's frames, publisher confirms) to the real broker."""
    from urllib.parse import unquote

    from pamqp import commands, frame
    from pamqp import header as amqp_header
    from pamqp.body import ContentBody
    from pamqp.exceptions import UnmarshalingException

    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 5672)
    buffer = b""

    async def receive(kind: type) -> Any:
        nonlocal buffer
        while True:
            try:
                used, _channel, value = frame.unmarshal(buffer)
            except UnmarshalingException:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                assert chunk, "the broker closed the connection"
                buffer += chunk
                continue
            buffer = buffer[used:]
            if isinstance(value, kind):
                return value

    def send(value: Any, channel: int = 0) -> None:
        writer.write(frame.marshal(value, channel))

    try:
        send(amqp_header.ProtocolHeader())
        await receive(commands.Connection.Start)
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        send(commands.Connection.StartOk(client_properties={}, response=f"\0{user}\0{password}"))
        tune = await receive(commands.Connection.Tune)
        send(commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
        send(commands.Connection.Open(virtual_host=unquote(parts.path[1:]) or "/"))
        await receive(commands.Connection.OpenOk)
        send(commands.Channel.Open(), 1)
        await receive(commands.Channel.OpenOk)
        send(commands.Confirm.Select(), 1)
        await receive(commands.Confirm.SelectOk)
        send(commands.Basic.Publish(exchange="", routing_key=queue), 1)
        properties = commands.Basic.Properties(content_type=content_type, delivery_mode=2)
        send(amqp_header.ContentHeader(0, len(body), properties), 1)
        send(ContentBody(body), 1)
        await receive(commands.Basic.Ack)
        send(commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0))
        await receive(commands.Connection.CloseOk)
    finally:
        writer.close()
