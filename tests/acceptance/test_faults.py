"""Fault tests with real subprocesses (SPEC 8): kill -9 of the sequencer mid-forward, the ledger
down for a while under load, two sequencer replicas on one database (one then killed). In each: nothing lost,
nothing applied twice, per-entity order kept."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from common.db import libpq_url
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from tests.processes import ServiceProcess, start_ledger, start_sequencer
from tests.support import inventory_event

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def quantity(sku: str, sequence: int) -> int:
    return (sum(map(ord, sku)) + sequence * 7) % 13 + 1


def stream(sku: str, count: int) -> list[events_pb2.Event]:
    return [
        inventory_event(sku, n, "inventory_received", location="DOCK", quantity=quantity(sku, n))
        for n in range(1, count + 1)
    ]


class Producer:
    """Submits events with one key per event, retrying transient failures with the same key
    (as a careful integration would), across whichever sequencer addresses are alive."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.answers: dict[str, sequencer_pb2.SubmitEventResponse] = {}
        self.attempts = 0

    async def submit(self, event: events_pb2.Event, deadline: float = 60.0) -> None:
        key = f"{event.entity_id}:{event.sequence}"
        give_up = time.monotonic() + deadline
        while True:
            self.attempts += 1
            address = random.choice(self.addresses)
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = sequencer_pb2_grpc.SequencerServiceStub(channel)
                    self.answers[key] = await stub.SubmitEvent(
                        sequencer_pb2.SubmitEventRequest(event=event), metadata=(("idempotency-key", key),), timeout=5
                    )
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.1)

    async def run(self, events: list[events_pb2.Event], concurrency: int = 16) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(event: events_pb2.Event) -> None:
            async with gate:
                await self.submit(event)

        await asyncio.gather(*(one(e) for e in events))


def audit(database_url: str, streams: dict[str, list[events_pb2.Event]], timeout: float = 60.0) -> None:
    """Waits until every event is terminal, then checks the ledger equals in-order,
    exactly-once application."""
    expected_total = sum(len(s) for s in streams.values())
    deadline = time.monotonic() + timeout
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        while True:
            open_events = conn.execute("SELECT count(*) FROM sequencer.events WHERE state IN (1, 2)").fetchone()
            total = conn.execute("SELECT count(*) FROM sequencer.events").fetchone()
            assert open_events is not None and total is not None
            if open_events[0] == 0 and total[0] == expected_total:
                break
            assert time.monotonic() < deadline, f"{open_events[0]} events still open, {total[0]}/{expected_total} held"
            time.sleep(0.2)
        states: dict[int, int] = dict(
            conn.execute("SELECT state, count(*) FROM sequencer.events GROUP BY state").fetchall()
        )
        assert states == {events_pb2.EVENT_STATE_APPLIED: expected_total}
        for sku, events in streams.items():
            history = [
                r[0]
                for r in conn.execute(
                    "SELECT sequence FROM ledger.entity_history WHERE entity_id = %s ORDER BY processed_at, sequence",
                    (sku,),
                ).fetchall()
            ]
            assert history == list(range(1, len(events) + 1)), f"{sku}: processed out of order or twice: {history}"
            row = conn.execute(
                "SELECT b.on_hand, v.version FROM ledger.inventory_balances b JOIN ledger.entity_versions v "
                "ON v.entity_id = b.sku WHERE b.sku = %s AND b.location = 'DOCK'",
                (sku,),
            ).fetchone()
            assert row == (sum(e.inventory_received.quantity for e in events), len(events)), sku


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


async def test_kill_9_of_the_sequencer_mid_forward(database_url: str, processes: list[ServiceProcess]) -> None:
    ledger = start_ledger(database_url)
    processes.append(ledger)
    lease = {"SEQUENCER_FORWARDER_LEASE": "2"}
    first = start_sequencer(database_url, ledger.port, **lease)
    processes.append(first)
    streams = {f"SKU-K{i}": stream(f"SKU-K{i}", 40) for i in range(8)}
    events = [e for s in streams.values() for e in s]
    random.Random(7).shuffle(events)  # out of order too: parking and releasing under fire
    producer = Producer([first.address])
    half = len(events) // 2
    await producer.run(events[:half])
    first.wait_log(lambda e: e.get("msg") == "event forwarded")
    first.kill()  # mid-forward: the chains released by the first half are still being applied
    second = start_sequencer(database_url, ledger.port, **lease)
    processes.append(second)
    producer.addresses = [second.address]
    await producer.run(events)  # everything again, same keys: the first half replays
    audit(database_url, streams)
    replayed = sum(1 for e in second.logs if e.get("msg") == "rpc" and e.get("replayed") is True)
    assert replayed >= half


async def test_ledger_down_for_a_while_under_load(database_url: str, processes: list[ServiceProcess]) -> None:
    ledger = start_ledger(database_url)
    processes.append(ledger)
    sequencer = start_sequencer(database_url, ledger.port, SEQUENCER_FORWARDER_RETRY_BUDGET="1")
    processes.append(sequencer)
    streams = {f"SKU-L{i}": stream(f"SKU-L{i}", 30) for i in range(6)}
    events = [e for s in streams.values() for e in s]
    producer = Producer([sequencer.address])
    load = asyncio.create_task(producer.run(events, concurrency=4))
    await asyncio.sleep(0.3)
    port = ledger.port
    ledger.kill()
    await asyncio.sleep(2.5)  # accepted meanwhile, queued and parked durably
    restarted = start_ledger(database_url, port=port)
    processes.append(restarted)
    await load
    audit(database_url, streams)
    assert any(e.get("msg") == "ledger did not apply the event; backing off" for e in sequencer.logs)


async def test_two_sequencer_replicas_share_one_database(database_url: str, processes: list[ServiceProcess]) -> None:
    ledger = start_ledger(database_url)
    processes.append(ledger)
    lease = {"SEQUENCER_FORWARDER_LEASE": "2"}
    replicas = [start_sequencer(database_url, ledger.port, **lease) for _ in range(2)]
    processes.extend(replicas)
    streams = {f"SKU-R{i}": stream(f"SKU-R{i}", 40) for i in range(6)}
    rng = random.Random(11)
    first_halves = {sku: events[:20] for sku, events in streams.items()}
    first = [e for s in first_halves.values() for e in s]
    rng.shuffle(first)
    producer = Producer([r.address for r in replicas])
    await producer.run(first, concurrency=24)  # both replicas accept and forward, concurrently
    audit(database_url, first_halves)

    # One replica dies holding its leases (no hand-back); the survivor takes its entities over
    # once the leases expire, and a resubmission of everything replays the first halves.
    gone, survivor = replicas
    gone.kill()
    everything = [e for s in streams.values() for e in s]
    rng.shuffle(everything)
    producer.addresses = [survivor.address]
    await producer.run(everything, concurrency=24)
    audit(database_url, streams)

    forwarded: dict[tuple[str, int], int] = {}
    for replica in replicas:
        for entry in replica.logs:
            if entry.get("msg") == "event forwarded":
                key = (entry["entity_id"], entry["sequence"])
                forwarded[key] = forwarded.get(key, 0) + 1
    # No event was forwarded twice (one forwarder per entity), and every second-half event was
    # forwarded by the survivor, including for entities the dead replica had leased.
    assert len(forwarded) == len(everything) and set(forwarded.values()) == {1}
    by_survivor = {(e["entity_id"], e["sequence"]) for e in survivor.logs if e.get("msg") == "event forwarded"}
    assert {(e.entity_id, e.sequence) for e in everything if e.sequence > 20} <= by_survivor
