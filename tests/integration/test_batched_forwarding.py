"""Batched forwarding (SPEC 10): chains of one entity and many entities share one ApplyEvents
call, every outcome of a batch is recorded in one statement, and a refusal holds back only its
own entity. Real servers, real PostgreSQL, both lock strategies."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from common.clock import SystemClock
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from sequencer.forwarding import ForwardingStore
from sequencer.metrics import SequencerMetrics
from sequencer.models import entities, events
from sequencer.repository import Outcome
from sequencer.server import build_server
from tests.support import INVENTORY, System, inventory_event

APPLIED, QUEUED, PARKED = events_pb2.EVENT_STATE_APPLIED, events_pb2.EVENT_STATE_QUEUED, events_pb2.EVENT_STATE_PARKED


def receive(sku: str, sequence: int, quantity: int = 1) -> events_pb2.Event:
    return inventory_event(sku, sequence, "inventory_received", location="DOCK", quantity=quantity)


def ledger_calls(system: System) -> int:
    """ApplyEvents calls the sequencer made (its ledger latency histogram's count)."""
    for metric in system.sequencer_app.metrics.ledger_latency.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return int(sample.value)
    raise AssertionError("no ledger latency count")


@pytest.fixture
async def strategy_system(database_url: str, sequencer_settings: Any, lock_strategy: str) -> Any:
    system = await System.start(database_url, sequencer_settings, lock_strategy=lock_strategy)
    yield system
    await system.stop()


async def on_hand(system: System, sku: str) -> tuple[int, int]:
    reply = await system.ledger.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku=sku), timeout=5)
    return sum(b.on_hand for b in reply.item.balances), reply.item.version


async def test_a_parked_chain_moves_in_one_call(strategy_system: System) -> None:
    """MSIs 2..20 parked, then 1: the queued event and its 19 parked successors go to the ledger
    in one ApplyEvents call, applied in MSI order, each recorded once."""
    s = strategy_system
    parked = [await s.submit(receive("SKU-CHAIN", n, quantity=n)) for n in range(2, 21)]
    assert {p.state for p in parked} == {PARKED}
    before = ledger_calls(s)
    first = await s.submit(receive("SKU-CHAIN", 1, quantity=1))
    assert first.state == QUEUED
    assert (await s.wait_terminal(parked[-1].transaction_id)).state == APPLIED
    assert ledger_calls(s) - before == 1
    assert [h.sequence for h in await s.history(INVENTORY, "SKU-CHAIN")] == list(range(1, 21))
    assert await on_hand(s, "SKU-CHAIN") == (sum(range(1, 21)), 20)
    for reply in [first, *parked]:
        status = await s.status(reply.transaction_id)
        assert status.state == APPLIED and status.entity_version == status.sequence
    reply = await s.admin.GetEntity(
        sequencer_pb2.GetEntityRequest(entity=events_pb2.EntityRef(entity_type=INVENTORY, entity_id="SKU-CHAIN")),
        timeout=5,
    )
    assert reply.entity.watermark == 20 and reply.entity.parked_count == 0


async def test_many_entities_share_a_batch(strategy_system: System) -> None:
    """60 entities with queued work when a forwarder starts: its first claim takes them all,
    and one ApplyEvents call carries every event."""
    s = strategy_system
    settings = s.sequencer_settings
    await s.sequencer_app.stop(0)
    await s.start_sequencer(settings, run_forwarder=False)
    items = [
        sequencer_pb2.SubmitEventRequest(event=receive(f"SKU-MANY-{n}", 1, quantity=n + 1), request_id=f"many-{n}")
        for n in range(60)
    ]
    reply = await s.sequencer.SubmitEvents(sequencer_pb2.SubmitEventsRequest(requests=items), timeout=10)
    assert {r.response.state for r in reply.results} == {QUEUED}
    await s.sequencer_app.stop(0)
    await s.start_sequencer(settings)
    for result in reply.results:
        assert (await s.wait_terminal(result.response.transaction_id)).state == APPLIED
    assert ledger_calls(s) == 1
    for n in range(60):
        assert await on_hand(s, f"SKU-MANY-{n}") == (n + 1, 1)


async def test_batches_follow_a_ledger_that_takes_fewer_events(database_url: str, sequencer_settings: Any) -> None:
    """A ledger with LEDGER_MAX_BATCH 4 refuses the forwarder's larger batch naming its limit:
    the forwarder sends it in parts that fit, and everything applies, in order."""
    s = await System.start(database_url, sequencer_settings, max_batch=4)
    try:
        parked = [await s.submit(receive("SKU-FEW", n, quantity=n)) for n in range(2, 11)]
        await s.submit(receive("SKU-FEW", 1, quantity=1))
        items = [
            sequencer_pb2.SubmitEventRequest(event=receive(f"SKU-FEW-{n}", 1, quantity=1), request_id=f"few-{n}")
            for n in range(6)
        ]
        reply = await s.sequencer.SubmitEvents(sequencer_pb2.SubmitEventsRequest(requests=items), timeout=10)
        for tx_id in [parked[-1].transaction_id, *(r.response.transaction_id for r in reply.results)]:
            assert (await s.wait_terminal(tx_id)).state == APPLIED
        assert [h.sequence for h in await s.history(INVENTORY, "SKU-FEW")] == list(range(1, 11))
        assert await on_hand(s, "SKU-FEW") == (sum(range(1, 11)), 10)
        assert s.sequencer_app.forwarder.batch_limit == 4
    finally:
        await s.stop()


async def test_a_refused_entity_rests_while_the_others_go_on(system: System, caplog: pytest.LogCaptureFixture) -> None:
    """The ledger already holds MSI 1 of one SKU with another payload (sent to it directly):
    the batch that carries it is refused naming that item, and the other entities of the batch
    are applied at once; the refused one waits (it never applies the other payload), with the
    refusal counted towards blocking it."""
    caplog.set_level(logging.WARNING, logger="sequencer.forwarder")
    direct = ledger_pb2.ApplyEventRequest(event=receive("SKU-REFUSED", 1, quantity=7), transaction_id=str(uuid.uuid4()))
    await system.ledger.ApplyEvent(direct, timeout=5)
    items = [sequencer_pb2.SubmitEventRequest(event=receive("SKU-REFUSED", 1, quantity=1), request_id="refused")]
    items += [
        sequencer_pb2.SubmitEventRequest(event=receive(f"SKU-FINE-{n}", 1, quantity=2), request_id=f"fine-{n}")
        for n in range(5)
    ]
    reply = await system.sequencer.SubmitEvents(sequencer_pb2.SubmitEventsRequest(requests=items), timeout=10)
    for result in reply.results[1:]:
        assert (await system.wait_terminal(result.response.transaction_id, timeout=10)).state == APPLIED
    status = await system.status(reply.results[0].response.transaction_id)
    assert (status.state, status.reason, status.ledger_code) == (QUEUED, "SEQUENCE_CONFLICT", "FAILED_PRECONDITION")
    assert status.forward_attempts >= 1
    assert await on_hand(system, "SKU-REFUSED") == (7, 1)
    refusals = [r for r in caplog.records if r.getMessage().startswith("the ledger refused an event")]
    assert refusals and all(getattr(r, "entity_id", None) == "SKU-REFUSED" for r in refusals)


async def test_outcomes_are_recorded_once_and_release_the_next(
    database_url: str, sequencer_settings: Any, lock_strategy: str
) -> None:
    """The outcome statement itself: it records consecutive outcomes above the watermark,
    releases the next parked successor, renews the lease; recording the same outcomes again
    (another forwarder got there first) changes nothing."""
    settings = dataclasses.replace(sequencer_settings, lock_strategy=lock_strategy, forwarder_lease_max_hold=3600.0)
    app = await build_server(settings, run_forwarder=False)
    clock = SystemClock()
    store = ForwardingStore(app.engine, settings, clock, SequencerMetrics(CollectorRegistry()), "test")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = sequencer_pb2_grpc.SequencerServiceStub(channel)
            submitted = [
                await stub.SubmitEvent(
                    sequencer_pb2.SubmitEventRequest(event=receive("SKU-REC", n)),
                    metadata=(("idempotency-key", f"rec-{n}"),),
                    timeout=5,
                )
                for n in (1, 2, 3, 5)
            ]
        assert [r.state for r in submitted] == [QUEUED, PARKED, PARKED, PARKED]
        key = (INVENTORY, "SKU-REC")
        until = clock.now() + dt.timedelta(seconds=30)
        assert await store.claim([key], "me", until) == [key]
        found = await store.forwardable([key], per_entity=10)
        assert [e.sequence for e in found[key]] == [1, 2, 3]  # MSI 4 is missing: the run stops at 3
        found = await store.forwardable([key], per_entity=2)
        assert [e.sequence for e in found[key]] == [1, 2]
        sent = [(e, Outcome(*key, e.sequence, APPLIED, "", "", e.sequence)) for e in found[key]]
        (recorded,) = await store.record(sent, "me")
        assert (recorded.previous, recorded.watermark, recorded.lease_kept) == (0, 2, True)
        assert recorded.released == uuid.UUID(submitted[2].transaction_id)
        again = await store.record(sent, "me")
        assert [(r.previous, r.watermark, r.released) for r in again] == [(2, 2, None)]
        async with app.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(entities.c.watermark, entities.c.parked_count, entities.c.lease_owner).where(
                        entities.c.entity_id == "SKU-REC"
                    )
                )
            ).one()
            assert tuple(row) == (2, 1, "me")
            held = select(events.c.sequence, events.c.state).where(events.c.entity_id == "SKU-REC")
            states = dict((await conn.execute(held.order_by(events.c.sequence))).all())
            assert states == {1: APPLIED, 2: APPLIED, 3: QUEUED, 5: PARKED}
    finally:
        await app.stop(0)
