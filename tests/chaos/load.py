"""The campaign's load: entity streams with an in-order model, and a producer that retries.

Every event gets one idempotency key, kept across its retries (a careful integration's
behaviour). Each round takes a few entities, makes the next events of each, shuffles them (an
entity's later MSIs often arrive first and park) and submits them either as one
`SubmitEvents` batch (each item with its own key in `request_id`) or as concurrent
`SubmitEvent` calls. Now and then an acknowledged event is sent again, with its key (it must
replay the same transaction) and with a new key (it must answer DUPLICATE, naming the
original). Only gRPC: the load knows nothing of the services' tables."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.rpc import status_pb2

from bench.model import INVENTORY, SHIPMENT, SHIPMENT_CHAIN, Spec, to_event
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc

# What a caller retries with the same key: the service was away or slow, or a transaction lost a
# serialization race. Anything else is a wrong answer for this load (it makes only legal events).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
ACCEPTED = frozenset({events_pb2.EVENT_STATE_PARKED, events_pb2.EVENT_STATE_QUEUED})
CODES = {code.value[0]: code for code in grpc.StatusCode}
MAX_PROBLEMS = 30


@dataclass
class Stream:
    """One entity's events in MSI order, made by its one logical producer so that each is legal
    in order: withdrawals never exceed the stock the earlier events brought (out of order, the
    ledger would refuse them), and a shipment walks its chain once."""

    entity_type: int
    entity_id: str
    events: list[events_pb2.Event] = field(default_factory=list)
    # MSI -> the transaction id its first accepted answer named.
    acked: dict[int, str] = field(default_factory=dict)
    on_hand: int = 0

    @property
    def finished(self) -> bool:
        return self.entity_type == SHIPMENT and len(self.events) >= len(SHIPMENT_CHAIN)

    def next_event(self, rng: random.Random) -> events_pb2.Event:
        """The stream's next event (the bench's event builder): the shipment's next step, or a
        receipt or a withdrawal the stock so far covers."""
        sequence = len(self.events) + 1
        spec: Spec
        if self.entity_type == SHIPMENT:
            spec = ["ship", SHIPMENT_CHAIN[sequence - 1]]
        elif self.on_hand > 0 and rng.random() < 0.3:
            spec = ["adj", "A", -rng.randint(1, self.on_hand)]
        else:
            spec = ["recv", "A", rng.randint(1, 20)]
        if spec[0] != "ship":
            self.on_hand += int(spec[2])
        event = to_event(self.entity_type, self.entity_id, sequence, spec)
        self.events.append(event)
        return event

    def key(self, sequence: int) -> str:
        return f"{self.entity_id}:{sequence}"


def model_on_hand(events: list[events_pb2.Event]) -> int:
    """Stock at location A after applying `events` in order, once each."""
    total = 0
    for event in events:
        kind = event.WhichOneof("payload")
        if kind == "inventory_received":
            total += event.inventory_received.quantity
        elif kind == "inventory_adjusted":
            total += event.inventory_adjusted.delta
    return total


def model_shipment_status(events: list[events_pb2.Event]) -> int:
    """The shipment's status after its chain's prefix `events`, applied in order."""
    if not events:
        return 0
    step = SHIPMENT_CHAIN[len(events) - 1].removeprefix("shipment_").upper()
    return int(ledger_pb2.ShipmentStatus.Value(f"SHIPMENT_STATUS_{step}"))


class Producer:
    """Submits with retries across whichever sequencer addresses `addresses()` names (a killed
    replica's address stays there until its successor starts, as a stale client list would)."""

    def __init__(self, addresses: Callable[[], list[str]], rng: random.Random, call_timeout: float = 5.0) -> None:
        self.addresses = addresses
        self.rng = rng
        self.call_timeout = call_timeout
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        self.counts["unexpected answers"] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def _stub(self) -> sequencer_pb2_grpc.SequencerServiceStub:
        live = self.addresses()
        for gone in set(self.channels) - set(live):
            # With a grace: a call of another task may still be on it (cancelled, it would
            # answer CANCELLED, which no caller retries).
            closing = asyncio.create_task(self.channels.pop(gone).close(grace=self.call_timeout))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        address = self.rng.choice(live)
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        return sequencer_pb2_grpc.SequencerServiceStub(self.channels[address])

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()
        await asyncio.gather(*self._closing)

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(1.0, 0.05 * 2**attempt) * (0.5 + self.rng.random()))

    def _ack(self, stream: Stream, sequence: int, reply: sequencer_pb2.SubmitEventResponse) -> None:
        if reply.state not in ACCEPTED:
            self.problem(
                f"{stream.entity_id}#{sequence}: first submission answered {events_pb2.EventState.Name(reply.state)}"
            )
            return
        known = stream.acked.setdefault(sequence, reply.transaction_id)
        if known != reply.transaction_id:
            self.problem(f"{stream.entity_id}#{sequence}: a retry answered {reply.transaction_id}, first {known}")

    async def submit(self, stream: Stream, event: events_pb2.Event, key: str | None = None) -> None:
        """One SubmitEvent, retried with the same key until it is answered."""
        key = key or stream.key(event.sequence)
        attempt = 0
        while True:
            self.counts["SubmitEvent calls"] += 1
            try:
                reply = await self._stub().SubmitEvent(
                    sequencer_pb2.SubmitEventRequest(event=event),
                    metadata=(("idempotency-key", key),),
                    timeout=self.call_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    self.problem(f"{key}: SubmitEvent {exc.code().name}: {exc.details()}")
                    return
                self.counts["retries"] += 1
                attempt += 1
                await self._backoff(attempt)
                continue
            if key == stream.key(event.sequence):
                self._ack(stream, event.sequence, reply)
            else:
                self._check_duplicate(stream, event.sequence, reply)
            return

    async def submit_batch(self, items: list[tuple[Stream, events_pb2.Event]]) -> None:
        """One SubmitEvents; a failed call is sent again whole, items that failed transiently
        again on their own keys, until every item is answered."""
        attempt = 0
        while items:
            self.counts["SubmitEvents calls"] += 1
            self.counts["SubmitEvents items"] += len(items)
            request = sequencer_pb2.SubmitEventsRequest(
                requests=[sequencer_pb2.SubmitEventRequest(event=e, request_id=s.key(e.sequence)) for s, e in items]
            )
            try:
                reply = await self._stub().SubmitEvents(request, timeout=self.call_timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    self.problem(f"SubmitEvents of {len(items)} items: {exc.code().name}: {exc.details()}")
                    return
                self.counts["retries"] += 1
                attempt += 1
                await self._backoff(attempt)
                continue
            again: list[tuple[Stream, events_pb2.Event]] = []
            for (stream, event), result in zip(items, reply.results, strict=True):
                if result.WhichOneof("outcome") == "response":
                    self._ack(stream, event.sequence, result.response)
                    continue
                error: status_pb2.Status = result.error
                code = CODES.get(error.code, grpc.StatusCode.UNKNOWN)
                if code in RETRYABLE:
                    again.append((stream, event))
                else:
                    self.problem(f"{stream.key(event.sequence)}: SubmitEvents item {code.name}: {error.message}")
            if again:
                self.counts["retries"] += 1
                attempt += 1
                await self._backoff(attempt)
            items = again

    def _check_duplicate(self, stream: Stream, sequence: int, reply: sequencer_pb2.SubmitEventResponse) -> None:
        original = stream.acked.get(sequence)
        if reply.state != events_pb2.EVENT_STATE_DUPLICATE or reply.transaction_id != original:
            self.problem(
                f"{stream.entity_id}#{sequence} again with a new key: {events_pb2.EventState.Name(reply.state)} "
                f"{reply.transaction_id}, want DUPLICATE {original}"
            )

    async def resend(self, stream: Stream) -> None:
        """An acknowledged event again: with its key (a replay of the same transaction), or
        with a new key (DUPLICATE, naming the original transaction)."""
        if not stream.acked:
            return
        sequence = self.rng.choice(sorted(stream.acked))
        event = stream.events[sequence - 1]
        if self.rng.random() < 0.5:
            self.counts["replays sent"] += 1
            await self.submit(stream, event)
        else:
            self.counts["duplicates sent"] += 1
            await self.submit(stream, event, key=f"{stream.key(sequence)}:again:{self.rng.random():.6f}")


class Pacer:
    """Holds the load to a steady rate: above what the pipeline applies, the backlog (and the
    audit's wait) would grow without bound."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next = 0.0

    async def take(self, events: int) -> None:
        now = asyncio.get_running_loop().time()
        start = max(self.next, now)
        self.next = start + events / self.rate
        await asyncio.sleep(start - now)


class Load:
    """Rounds of submissions by `workers` tasks until `stop()`; each entity is in one round at a
    time, so its events are made in order even when they are sent out of order.

    `backlog()` (events accepted and not yet processed, None when unknown) holds new rounds
    back while it exceeds `max_backlog`: on a busy machine the pipeline may apply less than
    `rate`, and an unbounded backlog would make the audit wait for minutes."""

    def __init__(
        self,
        producer: Producer,
        rng: random.Random,
        *,
        entities: int = 24,
        workers: int = 12,
        rate: float = 80.0,
        batch_share: float = 0.4,
        resend_share: float = 0.1,
        backlog: Callable[[], Awaitable[int | None]] | None = None,
        max_backlog: int = 1000,
    ) -> None:
        self.producer = producer
        self.rng = rng
        self.workers = workers
        self.pacer = Pacer(rate)
        self.batch_share = batch_share
        self.resend_share = resend_share
        self.streams: list[Stream] = []
        self.idle: list[Stream] = []
        self._made = 0
        for _ in range(entities):
            self.idle.append(self._new_stream())
        self.backlog = backlog
        self.max_backlog = max_backlog
        self.held = 0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _new_stream(self) -> Stream:
        self._made += 1
        kind, prefix = (SHIPMENT, "SHP") if self._made % 3 == 0 else (INVENTORY, "SKU")
        stream = Stream(kind, f"{prefix}-{self._made:05d}")
        self.streams.append(stream)
        return stream

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"load-{n}") for n in range(self.workers)]
        if self.backlog is not None:
            self._watch = asyncio.create_task(self._watch_backlog(), name="load-backlog")

    async def _watch_backlog(self) -> None:
        assert self.backlog is not None
        while not self._stopping.is_set():
            held = await self.backlog()
            self.held = 0 if held is None else held  # unknown (database away): no brake
            await asyncio.sleep(0.5)

    async def stop(self, drain: float) -> None:
        """Lets every round finish (each event answered) within `drain` seconds."""
        self._stopping.set()
        if self.backlog is not None:
            await self._watch
        done, pending = await asyncio.wait(self._tasks, timeout=drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        if pending:
            self.producer.problem(f"{len(pending)} rounds still unanswered after {drain:.0f} s of draining")

    async def _work(self) -> None:
        while not self._stopping.is_set():
            if self.held > self.max_backlog:
                self.producer.counts["held back (backlog)"] += 1
                await asyncio.sleep(0.2)
                continue
            picked = [self.idle.pop(self.rng.randrange(len(self.idle))) for _ in range(min(len(self.idle), 3))]
            if not picked:
                await asyncio.sleep(0.05)
                continue
            items = [
                (s, s.next_event(self.rng)) for s in picked for _ in range(self.rng.randint(1, 4)) if not s.finished
            ]
            self.rng.shuffle(items)
            try:
                await self.pacer.take(len(items))
                if self.rng.random() < self.batch_share:
                    await self.producer.submit_batch(items)
                else:
                    await asyncio.gather(*(self.producer.submit(s, e) for s, e in items))
                if self.rng.random() < self.resend_share:
                    await self.producer.resend(self.rng.choice(picked))
            finally:
                self.idle.extend(s if not s.finished else self._new_stream() for s in picked)
