"""The load generator: a separate process (`python -m bench.loadgen SPEC OUT`) driving the
sequencer, or the echo server, over real gRPC with a fixed number of concurrent callers (a
soak also paces them to a fixed rate of events per second).

Every call has a deadline and an idempotency key (per item for SubmitEvents); transient failures
are retried with the SAME key, as a careful client would, so a retry can never double-apply. It
writes raw per-event and per-call records; the parent process turns them into rates, percentiles
and the audit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from bench import echo
from bench.model import INVENTORY, SHIPMENT, Stream
from bench.processes import peak_rss_mb
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc

CALLER = "bench"
DEADLINE = 10.0
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
ATTEMPTS = 5
PARKED = int(events_pb2.EVENT_STATE_PARKED)
#: Items per SubmitEvents call of the `batch` workload.
BATCH_ITEMS = 100
#: Entities per `batch` caller, in calls' worth: an entity's next MSI goes out two calls after
#: its previous one, so it rarely arrives before its predecessor is applied (and parks).
BATCH_ROUNDS = 2
CHANNEL_OPTIONS = [("grpc.max_concurrent_streams", 1000)]
#: A soak's pacer lets callers catch up at most this far behind schedule after a stall, so a
#: pause is followed by a short burst, never by minutes of flat-out load.
PACER_SLACK = 1.0


@dataclass
class Sent:
    """One logical request: what was sent and how it ended."""

    entity: int
    sequence: int
    key: str
    request: sequencer_pb2.SubmitEventRequest
    phase: str
    sent_at: float = 0.0
    latency: float = 0.0
    transaction_id: str = ""
    state: int = 0
    replayed: bool = False
    error: str = ""
    response: bytes = b""

    def forget(self) -> None:
        """Drops the request and the answer bytes once nothing compares them any more: a soak
        sends hundreds of thousands of events, and only their records are written out."""
        self.request = _BLANK
        self.response = b""

    def record(self) -> list[Any]:
        return [
            self.entity,
            self.sequence,
            self.transaction_id,
            round(self.sent_at, 6),
            round(self.latency, 6),
            self.state,
            int(self.replayed),
            self.error,
            self.phase,
        ]


_BLANK = sequencer_pb2.SubmitEventRequest()


@dataclass
class Call:
    """One logical call (SubmitEvent or SubmitEvents, retries included): the unit of ack latency."""

    sent_at: float
    latency: float
    items: int
    answered: int
    phase: str

    def record(self) -> list[Any]:
        return [round(self.sent_at, 6), round(self.latency, 6), self.items, self.answered, self.phase]


@dataclass
class Run:
    spec: dict[str, Any]
    stub: sequencer_pb2_grpc.SequencerServiceStub
    rng: random.Random
    streams: list[Stream] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    retried: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return str(self.spec["prefix"])

    def new_stream(self, entity_type: int, name: str) -> int:
        self.streams.append(Stream(entity_type, f"{self.prefix}-{name}", random.Random(self.rng.random())))  # noqa: S311
        return len(self.streams) - 1

    def request(self, index: int, sequence: int, phase: str = "main") -> Sent:
        stream = self.streams[index]
        key = f"{stream.entity_id}-{sequence}"
        request = sequencer_pb2.SubmitEventRequest(event=stream.event(sequence))
        return Sent(index, sequence, key, request, phase)

    async def submit(self, sent: Sent) -> Sent:
        """SubmitEvent with retries on transient codes (same key every time)."""
        metadata = (("idempotency-key", sent.key), ("x-client-id", CALLER))
        sent.sent_at = time.time()
        started = time.perf_counter()
        for attempt in range(ATTEMPTS):
            call = cast(
                "grpc.aio.UnaryUnaryCall[sequencer_pb2.SubmitEventRequest, sequencer_pb2.SubmitEventResponse]",
                self.stub.SubmitEvent(sent.request, metadata=metadata, timeout=DEADLINE),
            )
            try:
                response: sequencer_pb2.SubmitEventResponse = await call
                trailing = await call.trailing_metadata()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in TRANSIENT and attempt < ATTEMPTS - 1:
                    self.retried += 1
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                sent.error = exc.code().name
                break
            sent.transaction_id = response.transaction_id
            sent.state = int(response.state)
            sent.replayed = any(k == "idempotency-replayed" and v == "true" for k, v in (trailing or ()))
            sent.response = response.SerializeToString(deterministic=True)
            break
        sent.latency = time.perf_counter() - started
        self.sent.append(sent)
        self.calls.append(Call(sent.sent_at, sent.latency, 1, 0 if sent.error else 1, sent.phase))
        return sent

    async def submit_batch(self, batch: list[Sent]) -> None:
        """SubmitEvents, each item keyed in `request_id`; a failed call is sent again whole,
        items that failed transiently are sent again alone, with the same keys every time."""
        metadata = (("x-client-id", CALLER),)
        sent_at = time.time()
        started = time.perf_counter()
        for sent in batch:
            sent.request.request_id = sent.key
        pending = batch
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            request = sequencer_pb2.SubmitEventsRequest(requests=[s.request for s in pending])
            call = cast(
                "grpc.aio.UnaryUnaryCall[sequencer_pb2.SubmitEventsRequest, sequencer_pb2.SubmitEventsResponse]",
                self.stub.SubmitEvents(request, metadata=metadata, timeout=DEADLINE),
            )
            try:
                response: sequencer_pb2.SubmitEventsResponse = await call
            except grpc.aio.AioRpcError as exc:
                if exc.code() in TRANSIENT and not last:
                    self.retried += 1
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                for sent in pending:
                    sent.error = exc.code().name
                break
            if len(response.results) != len(pending):
                for sent in pending:
                    sent.error = "WRONG_RESULT_COUNT"
                break
            again = []
            for sent, item in zip(pending, response.results, strict=True):
                if item.WhichOneof("outcome") == "response":
                    sent.transaction_id = item.response.transaction_id
                    sent.state = int(item.response.state)
                    sent.replayed = item.replayed
                    sent.response = item.response.SerializeToString(deterministic=True)
                    sent.error = ""
                    continue
                code = _code(item.error.code)
                sent.error = code.name
                if code in TRANSIENT and not last:
                    again.append(sent)
            if not again:
                break
            self.retried += len(again)
            pending = again
            await asyncio.sleep(0.05 * 2**attempt)
        latency = time.perf_counter() - started
        for sent in batch:
            sent.sent_at = sent_at
            sent.latency = latency
        self.sent.extend(batch)
        answered = sum(1 for s in batch if not s.error)
        self.calls.append(Call(sent_at, latency, len(batch), answered, batch[0].phase if batch else "main"))

    def check_replay(self, first: Sent, again: Sent) -> None:
        if again.error:
            return
        if not again.replayed:
            self.mismatches.append(f"{again.key}: a re-send was not answered as a replay")
        elif again.response != first.response:
            self.mismatches.append(f"{again.key}: the replayed response differs from the first")


# --- workloads ------------------------------------------------------------------------------


_CODES = {code.value[0]: code for code in grpc.StatusCode}

#: The overload workload's client side: several connections (local subchannel pools), each with
#: at most OVERLOAD_SLOTS calls on the wire, as the shipped client does, so its open-loop burst
#: meets the server's admission, not the HTTP/2 stream limit of one connection. 640 in all: past
#: the per-caller limit (512), so admission is what answers the excess.
OVERLOAD_CHANNELS = 4
OVERLOAD_SLOTS = 160
#: Callers re-sending refused requests after the load phase (with their keys, as RetryInfo says).
OVERLOAD_LATE_CALLERS = 32
OVERLOAD_LATE_SECONDS = 180.0


def _code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def _entity_pool(run: Run, count: int, shipment_share: float = 0.2) -> list[int]:
    pool = []
    for i in range(count):
        if run.rng.random() < shipment_share:
            pool.append(run.new_stream(SHIPMENT, f"shp-{i}-0"))
        else:
            pool.append(run.new_stream(INVENTORY, f"inv-{i}"))
    return pool


@dataclass
class _Owned:
    """A producer's own entities, visited round-robin; a delivered shipment is replaced by a
    new one (its next generation), so every entity always has a next event."""

    run: Run
    own: list[int]
    generation: int = 0
    position: int = 0

    def next_index(self) -> int:
        slot = self.position % len(self.own)
        self.position += 1
        index = self.own[slot]
        stream = self.run.streams[index]
        if stream.finished:
            self.generation += 1
            name = stream.entity_id.removeprefix(f"{self.run.prefix}-").rsplit("-", 1)[0]
            index = self.own[slot] = self.run.new_stream(SHIPMENT, f"{name}-{self.generation}")
        return index


@dataclass(frozen=True)
class Mix:
    """What a stream producer does besides in-order submissions: the share of steps that send
    an entity's successor before its predecessor, and the share re-sent at once (same key)."""

    out_of_order: float = 0.0
    resend: float = 0.0


#: The stream workloads; `soak` mixes both kinds at lower shares, at a paced rate.
MIXES = {
    "warmup": Mix(),
    "in_order": Mix(),
    "out_of_order": Mix(out_of_order=0.25),
    "retries": Mix(resend=0.10),
    "soak": Mix(out_of_order=0.10, resend=0.05),
}


@dataclass
class Pacer:
    """A schedule shared by all callers: event n is due at start + n / rate. Callers that are
    on time wait for their slot; late ones go at once, up to PACER_SLACK behind."""

    rate: float
    due: float = field(default_factory=time.monotonic)

    async def wait(self, events: int) -> None:
        now = time.monotonic()
        self.due = max(self.due, now - PACER_SLACK)
        slot = self.due
        self.due += events / self.rate
        if slot > now:
            await asyncio.sleep(slot - now)


async def _producer(run: Run, own: list[int], deadline: float, mix: Mix, pacer: Pacer | None) -> None:
    """One logical producer: round-robins over its own entities, each in MSI order."""
    owned = _Owned(run, own)
    while time.monotonic() < deadline and own:
        index = owned.next_index()
        stream = run.streams[index]
        first, _ = stream.next_spec()
        room = not (stream.entity_type == SHIPMENT and stream.finished)
        # The random draws happen only for the shares a workload has, so each fixed-seed
        # workload generates the same events as before the shares became data.
        swap = bool(mix.out_of_order) and room and run.rng.random() < mix.out_of_order
        if pacer is not None:
            await pacer.wait(2 if swap else 1)
        step = []
        if swap:
            # Submit its successor first: parked, then released when this one arrives.
            second, _ = stream.next_spec()
            sent = await run.submit(run.request(index, second))
            step.append(sent)
            if sent.error:
                return
        sent = await run.submit(run.request(index, first))
        step.append(sent)
        if sent.error:
            return  # this producer's streams stop: a later MSI would only park behind the gap
        if mix.resend and run.rng.random() < mix.resend:
            again = await run.submit(run.request(index, first, phase="resend"))
            run.check_replay(sent, again)
            step.append(again)
        if run.spec.get("compact"):
            for done in step:
                done.forget()


async def streams_workload(run: Run, style: str) -> None:
    concurrency = int(run.spec["concurrency"])
    pool = _entity_pool(run, max(int(run.spec["entities"]), concurrency))
    deadline = time.monotonic() + float(run.spec["duration"])
    owners = [pool[w::concurrency] for w in range(concurrency)]
    rate = run.spec.get("rate")
    pacer = Pacer(float(rate)) if rate else None
    await asyncio.gather(*(_producer(run, own, deadline, MIXES[style], pacer) for own in owners))


async def _batch_producer(run: Run, own: list[int], deadline: float) -> None:
    """One logical producer sending SubmitEvents of BATCH_ITEMS events: its entities'
    next MSIs, round-robin, so one call spans BATCH_ITEMS entities, each in MSI order."""
    owned = _Owned(run, own)
    while time.monotonic() < deadline and own:
        batch = []
        for _ in range(BATCH_ITEMS):
            index = owned.next_index()
            sequence, _ = run.streams[index].next_spec()
            batch.append(run.request(index, sequence))
        await run.submit_batch(batch)
        if any(sent.error for sent in batch):
            return  # as in _producer: a later MSI of a failed entity would only park behind the gap


async def batch_workload(run: Run) -> None:
    concurrency = int(run.spec["concurrency"])
    pool = _entity_pool(run, max(int(run.spec["entities"]), concurrency * BATCH_ITEMS * BATCH_ROUNDS))
    deadline = time.monotonic() + float(run.spec["duration"])
    owners = [pool[w::concurrency] for w in range(concurrency)]
    await asyncio.gather(*(_batch_producer(run, own, deadline) for own in owners))


async def hot_set(run: Run) -> None:
    """10 entities, every caller on any of them: MSIs are taken at send time, so concurrent
    submissions of one entity may arrive out of order and park briefly."""
    pool = [run.new_stream(INVENTORY, f"hot-{i}") for i in range(10)]
    deadline = time.monotonic() + float(run.spec["duration"])

    async def caller() -> None:
        while time.monotonic() < deadline:
            index = run.rng.choice(pool)
            sequence, _ = run.streams[index].next_spec()
            await run.submit(run.request(index, sequence))

    await asyncio.gather(*(caller() for _ in range(int(run.spec["concurrency"]))))


TERMINAL = frozenset(
    {int(events_pb2.EVENT_STATE_APPLIED), int(events_pb2.EVENT_STATE_REJECTED), int(events_pb2.EVENT_STATE_SKIPPED)}
)


async def drained(run: Run, answered: list[Sent], timeout: float = 120.0) -> float:
    """Waits until each entity's last answered event is terminal (an entity applies in MSI
    order, so then all of its events are); returns the seconds waited."""
    last: dict[int, Sent] = {}
    for sent in answered:
        if sent.transaction_id and (sent.entity not in last or sent.sequence > last[sent.entity].sequence):
            last[sent.entity] = sent
    waiting = list(last.values())
    metadata = (("x-client-id", CALLER),)
    gate = asyncio.Semaphore(int(run.spec["concurrency"]))
    started = time.monotonic()

    async def open_(sent: Sent) -> bool:
        async with gate:
            call = cast(
                "grpc.aio.UnaryUnaryCall[sequencer_pb2.GetEventStatusRequest, sequencer_pb2.GetEventStatusResponse]",
                run.stub.GetEventStatus(
                    sequencer_pb2.GetEventStatusRequest(transaction_id=sent.transaction_id),
                    metadata=metadata,
                    timeout=DEADLINE,
                ),
            )
            reply: sequencer_pb2.GetEventStatusResponse = await call
        return int(reply.status.state) not in TERMINAL

    while waiting and time.monotonic() - started < timeout:
        still = await asyncio.gather(*(open_(s) for s in waiting))
        waiting = [s for s, is_open in zip(waiting, still, strict=True) if is_open]
        if waiting:
            await asyncio.sleep(0.2)
    return time.monotonic() - started


async def replay_burst(run: Run, seconds: float) -> dict[str, Any]:
    """Re-sends already answered requests (same key, same payload) at full concurrency: the
    replay path alone, once the backlog of the load phase has drained (else the burst would
    share the machine with the forwarder)."""
    answered = [s for s in run.sent if s.phase == "main" and not s.error]
    if not answered:
        return {"count": 0, "elapsed": 0.0}
    waited = await drained(run, answered)
    deadline = time.monotonic() + seconds
    started = time.perf_counter()

    async def caller() -> None:
        while time.monotonic() < deadline:
            first = run.rng.choice(answered)
            again = await run.submit(run.request(first.entity, first.sequence, phase="replay"))
            run.check_replay(first, again)

    await asyncio.gather(*(caller() for _ in range(int(run.spec["concurrency"]))))
    return {"elapsed": time.perf_counter() - started, "drain_wait": waited}


async def duplicate_storm(run: Run) -> dict[str, Any]:
    """Rounds of one key hit by `callers` concurrent identical requests: exactly one executes,
    every other caller gets its replay."""
    callers = int(run.spec.get("storm_callers", 100))
    bad: list[str] = []
    started = time.perf_counter()
    for r in range(int(run.spec["storm_rounds"])):
        index = run.new_stream(SHIPMENT, f"storm-{r}")
        sequence, _ = run.streams[index].next_spec()
        go = asyncio.Event()

        async def one(index: int = index, sequence: int = sequence, go: asyncio.Event = go) -> Sent:
            await go.wait()
            return await run.submit(run.request(index, sequence, phase="storm"))

        tasks = [asyncio.create_task(one()) for _ in range(callers)]
        await asyncio.sleep(0)
        go.set()
        results = await asyncio.gather(*tasks)
        executed = [s for s in results if not s.replayed and not s.error]
        answers = {s.response for s in results if not s.error}
        errors = [s.error for s in results if s.error]
        if len(executed) != 1 or len(answers) != 1 or errors:
            bad.append(f"round {r}: {len(executed)} executions, {len(answers)} distinct answers, errors {errors[:3]}")
    return {"elapsed": time.perf_counter() - started, "callers": callers, "bad_rounds": bad}


def _overload_refusal(exc: grpc.aio.AioRpcError) -> tuple[str, float] | None:
    """(reason, RetryInfo delay) of an admission refusal; None for any other failure."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    raw = next((v for k, v in exc.trailing_metadata() or () if k == "grpc-status-details-bin"), None)
    if not isinstance(raw, bytes):
        return None
    reason, delay = "", 1.0
    for detail in status_pb2.Status.FromString(raw).details:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return (reason, delay) if reason in ("CALLER_OVERLOADED", "BACKLOG_FULL") else None


async def overload(run: Run, stubs: list[Any]) -> dict[str, Any]:
    """Open loop: SubmitEvent calls issued at a fixed rate whatever the answers (never waiting
    for one before the next), each once. Refusals (CALLER_OVERLOADED, BACKLOG_FULL) and failures
    are counted; after the load phase, every request not admitted is sent again with its key,
    waiting as RetryInfo says, so the audit can check every admitted event applied once, in order.
    Ack latency counts from the scheduled arrival (client-side queueing included)."""
    rate = float(run.spec["rate"])
    duration = float(run.spec["duration"])
    pool = _entity_pool(run, max(int(run.spec["entities"]), int(rate)), shipment_share=0.0)
    slots = [asyncio.Semaphore(OVERLOAD_SLOTS) for _ in stubs]
    metadata_base = (("x-client-id", CALLER),)
    refusals: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    owed: list[Sent] = []
    tasks: set[asyncio.Task[None]] = set()
    max_client_inflight = 0
    inflight = 0
    expired = 0
    queue_waits: list[float] = []
    wire_latencies: list[float] = []
    refusal_latencies: list[float] = []

    async def arrival(sent: Sent, due: float, lane: int) -> None:
        nonlocal inflight, max_client_inflight, expired
        inflight += 1
        max_client_inflight = max(max_client_inflight, inflight)
        metadata = (("idempotency-key", sent.key), *metadata_base)
        try:
            async with slots[lane]:
                queued = time.monotonic() - due
                queue_waits.append(queued)
                if queued >= DEADLINE:
                    # Its deadline passed in this client's queue: never sent (re-sent later).
                    expired += 1
                    owed.append(sent)
                    return
                sent_at = time.monotonic()
                call = stubs[lane].SubmitEvent(sent.request, metadata=metadata, timeout=DEADLINE - queued)
                try:
                    response: sequencer_pb2.SubmitEventResponse = await call
                except grpc.aio.AioRpcError as exc:
                    refusal = _overload_refusal(exc)
                    if refusal is not None:
                        refusals[refusal[0]] += 1
                        refusal_latencies.append(time.monotonic() - sent_at)
                    else:
                        errors[exc.code().name] += 1
                    owed.append(sent)
                    return
                wire_latencies.append(time.monotonic() - sent_at)
            sent.latency = time.monotonic() - due
            sent.transaction_id = response.transaction_id
            sent.state = int(response.state)
            run.sent.append(sent)
            run.calls.append(Call(sent.sent_at, sent.latency, 1, 1, "main"))
        finally:
            inflight -= 1

    started = time.monotonic()
    issued = 0
    wall0 = time.time()
    while (now := time.monotonic()) < started + duration:
        due_count = int((now - started) * rate) + 1
        while issued < due_count:
            index = pool[issued % len(pool)]
            sequence, _ = run.streams[index].next_spec()
            sent = run.request(index, sequence)
            due = started + issued / rate
            sent.sent_at = wall0 + (due - started)
            task = asyncio.create_task(arrival(sent, due, issued % len(stubs)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            issued += 1
        await asyncio.sleep(0.001)
    offered_seconds = time.monotonic() - started
    if tasks:
        await asyncio.gather(*tasks)
    load_seconds = time.monotonic() - started

    # Later: every request not admitted, again with its key, until admitted (RetryInfo waits).
    late_started = time.monotonic()
    late_deadline = late_started + OVERLOAD_LATE_SECONDS
    queue = collections.deque(sorted(owed, key=lambda s: (s.entity, s.sequence)))
    late_refusals = 0

    async def late_caller() -> None:
        nonlocal late_refusals
        while queue and time.monotonic() < late_deadline:
            sent = queue.popleft()
            metadata = (("idempotency-key", sent.key), *metadata_base)
            while True:
                begun = time.perf_counter()
                try:
                    response: sequencer_pb2.SubmitEventResponse = await stubs[0].SubmitEvent(
                        sent.request, metadata=metadata, timeout=DEADLINE
                    )
                except grpc.aio.AioRpcError as exc:
                    refusal = _overload_refusal(exc)
                    if time.monotonic() >= late_deadline:
                        sent.error = exc.code().name
                        break
                    late_refusals += refusal is not None
                    await asyncio.sleep((refusal[1] if refusal else 0.2) * run.rng.uniform(1.0, 1.2))
                    continue
                sent.latency = time.perf_counter() - begun
                sent.transaction_id = response.transaction_id
                sent.state = int(response.state)
                sent.phase = "late"
                break
            run.sent.append(sent)
            run.calls.append(Call(sent.sent_at, sent.latency, 1, 0 if sent.error else 1, "late"))

    await asyncio.gather(*(late_caller() for _ in range(OVERLOAD_LATE_CALLERS)))
    for sent in queue:  # never re-sent: the late phase ran out of time
        sent.error = "NOT_RETRIED"
        run.sent.append(sent)
    return {
        "rate": rate,
        "issued": issued,
        "offered_seconds": offered_seconds,
        "load_seconds": load_seconds,
        "admitted": sum(1 for s in run.sent if s.phase == "main"),
        "refused": dict(refusals),
        "errors": dict(errors),
        "late": len(owed),
        "late_admitted": sum(1 for s in run.sent if s.phase == "late" and not s.error),
        "late_refusals": late_refusals,
        "late_seconds": time.monotonic() - late_started,
        "max_client_inflight": max_client_inflight,
        "expired_in_client_queue": expired,
        "client_queue_waits": queue_waits,
        "admitted_wire_latencies": wire_latencies,
        "refusal_latencies": refusal_latencies,
    }


async def echo_workload(spec: dict[str, Any]) -> dict[str, Any]:
    """The transport ceiling: the same callers, deadlines and metadata, against the echo server."""
    # A request of the size the pipeline sees: a typical SubmitEventRequest.
    sample = Stream(INVENTORY, "echo-inv-0", random.Random(1))  # noqa: S311
    sample.next_spec()
    payload = sequencer_pb2.SubmitEventRequest(event=sample.event(1)).SerializeToString()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) as channel:
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(echo.METHOD)
        await channel.channel_ready()
        deadline = time.monotonic() + float(spec["duration"])
        counter = 0

        async def caller() -> None:
            nonlocal counter
            while time.monotonic() < deadline:
                counter += 1
                metadata = (("idempotency-key", f"echo-{counter}"), ("x-client-id", CALLER))
                started = time.perf_counter()
                try:
                    await method(payload, metadata=metadata, timeout=DEADLINE)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(int(spec["concurrency"]))))
        elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "latencies": latencies, "errors": errors, "loadgen_peak_rss_mb": peak_rss_mb_self()}


def peak_rss_mb_self() -> float | None:
    return peak_rss_mb(os.getpid())


async def overload_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """The overload workload on its own connections (see OVERLOAD_CHANNELS)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(spec["target"], options=options) for _ in range(OVERLOAD_CHANNELS)]
    try:
        for channel in channels:
            await channel.channel_ready()
        # grpc.aio stubs (the generated types describe the sync ones).
        stubs: list[Any] = [sequencer_pb2_grpc.SequencerServiceStub(c) for c in channels]
        run = Run(spec, stubs[0], random.Random(int(spec["seed"])))  # noqa: S311
        started_wall = time.time()
        figures = await overload(run, stubs)
        elapsed = figures["load_seconds"]
    finally:
        for channel in channels:
            await channel.close()
    return {
        "started_wall": started_wall,
        "elapsed": elapsed,
        "requests": [s.record() for s in run.sent],
        "calls": [c.record() for c in run.calls],
        "entities": [[s.entity_type, s.entity_id, s.specs] for s in run.streams],
        "retried": figures["late"],
        "mismatches": [],
        "loadgen_peak_rss_mb": peak_rss_mb_self(),
        "overload": figures,
    }


async def pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["workload"] == "overload":
        return await overload_pipeline(spec)
    async with grpc.aio.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        run = Run(spec, sequencer_pb2_grpc.SequencerServiceStub(channel), random.Random(int(spec["seed"])))  # noqa: S311
        extra: dict[str, Any] = {}
        started_wall = time.time()
        started = time.perf_counter()
        workload = spec["workload"]
        if workload in MIXES:
            await streams_workload(run, workload)
        elif workload == "batch":
            await batch_workload(run)
        elif workload == "hot_set":
            await hot_set(run)
        elif workload == "duplicate_storm":
            extra["storm"] = await duplicate_storm(run)
        else:
            raise SystemExit(f"unknown workload {workload!r}")
        elapsed = time.perf_counter() - started
        if workload == "retries" and float(spec.get("replay_seconds", 0)) > 0:
            extra["replay_burst"] = await replay_burst(run, float(spec["replay_seconds"]))
    return {
        "started_wall": started_wall,
        "elapsed": elapsed,
        "requests": [s.record() for s in run.sent],
        "calls": [c.record() for c in run.calls],
        "entities": [[s.entity_type, s.entity_id, s.specs] for s in run.streams],
        "retried": run.retried,
        "mismatches": run.mismatches,
        "loadgen_peak_rss_mb": peak_rss_mb_self(),
        **extra,
    }


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    runner = echo_workload if spec["workload"] == "echo" else pipeline
    result = asyncio.run(runner(spec))
    Path(argv[1]).write_text(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
