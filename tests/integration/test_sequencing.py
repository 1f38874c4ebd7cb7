"""SPEC 5 end to end: real sequencer and ledger servers over loopback gRPC, real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from tests.support import SHIPMENT, System, error_info, inventory_event, shipment_event

APPLIED = events_pb2.EVENT_STATE_APPLIED
PARKED = events_pb2.EVENT_STATE_PARKED
QUEUED = events_pb2.EVENT_STATE_QUEUED


def ref(entity_id: str, entity_type: int = SHIPMENT) -> events_pb2.EntityRef:
    return events_pb2.EntityRef(entity_type=entity_type, entity_id=entity_id)  # type: ignore[arg-type]


@pytest.fixture
async def strategy_system(database_url: str, sequencer_settings: Any, lock_strategy: str) -> Any:
    system = await System.start(database_url, sequencer_settings, lock_strategy=lock_strategy)
    yield system
    await system.stop()


async def test_shipped_overtaking_loaded_is_parked_until_loaded_arrives(strategy_system: System) -> None:
    """The seed scenario: Picked(1), then Shipped(3) before Loaded(2)."""
    s = strategy_system
    picked = await s.submit(shipment_event("SHP-1", 1, "shipment_picked"))
    assert picked.state == QUEUED
    await s.wait_terminal(picked.transaction_id)
    shipped = await s.submit(shipment_event("SHP-1", 3, "shipment_shipped"))
    assert shipped.state == PARKED and shipped.awaiting_sequence == 2

    gaps = (await s.admin.ListGaps(sequencer_pb2.ListGapsRequest(), timeout=5)).gaps
    assert [(g.entity.entity_id, g.awaiting_sequence, g.parked_count) for g in gaps] == [("SHP-1", 2, 1)]
    parked = await s.admin.ListParkedEvents(sequencer_pb2.ListParkedEventsRequest(entity=ref("SHP-1")), timeout=5)
    assert [p.event.sequence for p in parked.parked_events] == [3]
    await asyncio.sleep(0.3)  # give a (wrong) forwarder every chance to apply it early
    shipment = await s.shipment("SHP-1")
    assert shipment.status == ledger_pb2.SHIPMENT_STATUS_PICKED and shipment.version == 1
    assert (await s.status(shipped.transaction_id)).awaiting_sequence == 2

    loaded = await s.submit(shipment_event("SHP-1", 2, "shipment_loaded"))
    assert loaded.state == QUEUED
    final = await s.wait_terminal(shipped.transaction_id)
    assert final.state == APPLIED and final.entity_version == 3
    shipment = await s.shipment("SHP-1")
    assert shipment.status == ledger_pb2.SHIPMENT_STATUS_SHIPPED and shipment.version == 3
    assert shipment.carrier == "DHL"
    assert [(h.sequence, h.kind) for h in await s.history(SHIPMENT, "SHP-1")] == [
        (1, "shipment_picked"),
        (2, "shipment_loaded"),
        (3, "shipment_shipped"),
    ]
    assert (await s.admin.ListGaps(sequencer_pb2.ListGapsRequest(), timeout=5)).gaps == []
    entity = (await s.admin.GetEntity(sequencer_pb2.GetEntityRequest(entity=ref("SHP-1")), timeout=5)).entity
    assert entity.watermark == 3 and entity.parked_count == 0 and entity.last_outcome == APPLIED


async def test_duplicate_and_conflicting_msi(system: System) -> None:
    first = await system.submit(shipment_event("SHP-2", 1, "shipment_created"))
    again = await system.submit(shipment_event("SHP-2", 1, "shipment_created"))  # new key, same event
    assert again.state == events_pb2.EVENT_STATE_DUPLICATE
    assert again.transaction_id == first.transaction_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.submit(shipment_event("SHP-2", 1, "shipment_created", origin="ELSEWHERE"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "SEQUENCE_CONFLICT"
    await system.wait_terminal(first.transaction_id)
    late = await system.submit(shipment_event("SHP-2", 1, "shipment_created"))
    assert late.state == events_pb2.EVENT_STATE_DUPLICATE
    assert len(await system.history(SHIPMENT, "SHP-2")) == 1


async def test_rejection_consumes_the_msi_and_the_chain_goes_on(system: System) -> None:
    created = await system.submit(shipment_event("SHP-3", 1, "shipment_created"))
    illegal = await system.submit(shipment_event("SHP-3", 2, "shipment_delivered"))
    picked = await system.submit(shipment_event("SHP-3", 3, "shipment_picked"))
    assert (await system.wait_terminal(created.transaction_id)).state == APPLIED
    rejected = await system.wait_terminal(illegal.transaction_id)
    assert rejected.state == events_pb2.EVENT_STATE_REJECTED
    assert rejected.reason == "ILLEGAL_TRANSITION"
    assert (await system.wait_terminal(picked.transaction_id)).state == APPLIED
    shipment = await system.shipment("SHP-3")
    assert shipment.status == ledger_pb2.SHIPMENT_STATUS_PICKED and shipment.version == 3


async def test_inventory_stream_and_insufficient_stock(system: System) -> None:
    events = [
        inventory_event("SKU-1", 1, "inventory_received", location="A", quantity=10),
        inventory_event("SKU-1", 2, "inventory_reserved", location="A", quantity=4, reservation_id="R1"),
        inventory_event("SKU-1", 3, "inventory_moved", from_location="A", to_location="B", quantity=7),
        inventory_event("SKU-1", 4, "inventory_moved", from_location="A", to_location="B", quantity=6),
    ]
    replies = [await system.submit(e) for e in reversed(events)]
    states = [(await system.wait_terminal(r.transaction_id)).state for r in reversed(replies)]
    assert states == [APPLIED, APPLIED, events_pb2.EVENT_STATE_REJECTED, APPLIED]
    reply = await system.ledger.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku="SKU-1"), timeout=5)
    balances = {b.location: (b.on_hand, b.reserved, b.available) for b in reply.item.balances}
    assert balances == {"A": (4, 4, 0), "B": (6, 0, 6)}
    assert reply.item.version == 4


async def test_parking_cap_is_per_entity(database_url: str, sequencer_settings: Any) -> None:
    import dataclasses

    system = await System.start(database_url, dataclasses.replace(sequencer_settings, parked_limit=3))
    try:
        for seq in (2, 3, 4):
            assert (await system.submit(shipment_event("SHP-4", seq, "shipment_picked"))).state == PARKED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await system.submit(shipment_event("SHP-4", 5, "shipment_picked"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "PARKED_LIMIT_REACHED"
        other = await system.submit(shipment_event("SHP-5", 2, "shipment_picked"))
        assert other.state == PARKED
    finally:
        await system.stop()


async def test_skip_sequence_releases_successors_and_is_audited(system: System) -> None:
    first = await system.submit(shipment_event("SHP-6", 1, "shipment_created"))
    await system.wait_terminal(first.transaction_id)
    loaded = await system.submit(shipment_event("SHP-6", 3, "shipment_picked"))
    assert loaded.state == PARKED

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.admin.SkipSequence(
            sequencer_pb2.SkipSequenceRequest(entity=ref("SHP-6"), sequence=4, reason="lost"),
            metadata=(("idempotency-key", "skip-a"),),
            timeout=5,
        )
    assert error_info(caught.value).reason == "NOT_A_GAP"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.admin.SkipSequence(
            sequencer_pb2.SkipSequenceRequest(entity=ref("SHP-6"), sequence=2, reason="lost"), timeout=5
        )
    assert error_info(caught.value).reason == "IDEMPOTENCY_KEY_MISSING"

    skip = await system.admin.SkipSequence(
        sequencer_pb2.SkipSequenceRequest(entity=ref("SHP-6"), sequence=2, reason="WMS lost it, ticket 42"),
        metadata=(("idempotency-key", "skip-1"), ("x-client-id", "ops-alice")),
        timeout=5,
    )
    skipped = await system.wait_terminal(skip.status.transaction_id)
    assert skipped.state == events_pb2.EVENT_STATE_SKIPPED and skipped.reason == "WMS lost it, ticket 42"
    assert (await system.wait_terminal(loaded.transaction_id)).state == APPLIED
    shipment = await system.shipment("SHP-6")
    assert shipment.status == ledger_pb2.SHIPMENT_STATUS_PICKED and shipment.version == 3
    history = await system.history(SHIPMENT, "SHP-6")
    assert [(h.sequence, h.outcome) for h in history] == [
        (1, ledger_pb2.APPLY_OUTCOME_APPLIED),
        (2, ledger_pb2.APPLY_OUTCOME_SKIPPED),
        (3, ledger_pb2.APPLY_OUTCOME_APPLIED),
    ]
    late = await system.submit(shipment_event("SHP-6", 2, "shipment_picked"))
    assert late.state == events_pb2.EVENT_STATE_SKIPPED


async def test_gap_is_alerted_once_past_the_threshold(system: System, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    await system.submit(shipment_event("SHP-7", 2, "shipment_picked"))
    monitor = system.sequencer_app.gaps
    assert await monitor.check() == 0
    monitor.settings = dataclasses.replace(monitor.settings, gap_alert_after=0.0)
    system.sequencer_app.reads.settings = monitor.settings
    with caplog.at_level(logging.WARNING, logger="sequencer.gaps"):
        assert await monitor.check() == 1
        assert await monitor.check() == 0  # alerted once, still listed
    record = next(r for r in caplog.records if r.getMessage() == "gap older than alert threshold")
    assert record.entity_id == "SHP-7" and record.awaiting_sequence == 1  # type: ignore[attr-defined]
    gaps = (await system.admin.ListGaps(sequencer_pb2.ListGapsRequest(), timeout=5)).gaps
    assert gaps[0].alerting and gaps[0].awaiting_sequence == 1


async def test_ledger_outage_then_recovery(database_url: str, sequencer_settings: Any) -> None:
    """Events accepted while the ledger is down are applied, in order, once it is back."""
    system = await System.start(database_url, sequencer_settings)
    try:
        port = system.ledger_app.port
        await system.ledger_app.stop(0)
        replies = [
            await system.submit(shipment_event("SHP-8", n, k))
            for n, k in [(1, "shipment_created"), (2, "shipment_picked"), (3, "shipment_loaded")]
        ]
        assert [r.state for r in replies] == [QUEUED, PARKED, PARKED]
        await asyncio.sleep(1.5)
        assert (await system.status(replies[0].transaction_id)).state == QUEUED
        from ledger.config import Settings as LedgerSettings
        from ledger.server import build_server

        system.ledger_app = await build_server(
            LedgerSettings(database_url=database_url, listen_addr=f"127.0.0.1:{port}", metrics_addr="127.0.0.1:0")
        )
        final = await system.wait_terminal(replies[2].transaction_id, timeout=20)
        assert final.state == APPLIED and final.entity_version == 3
        assert [h.sequence for h in await system.history(SHIPMENT, "SHP-8")] == [1, 2, 3]
    finally:
        await system.stop()


async def test_parked_behind_an_event_in_flight_awaits_the_watermark_successor(
    database_url: str, sequencer_settings: Any
) -> None:
    """No gap, but a predecessor not yet processed: the parked event names what it waits for."""
    import dataclasses

    system = await System.start(database_url, dataclasses.replace(sequencer_settings, ledger_target="127.0.0.1:1"))
    try:
        # The ledger is unreachable: MSI 1 stays QUEUED, so the watermark stays 0.
        await system.sequencer_app.stop(0)
        await system.start_sequencer(dataclasses.replace(system.sequencer_settings, ledger_target="127.0.0.1:1"))
        first = await system.submit(shipment_event("SHP-9", 1, "shipment_created"))
        second = await system.submit(shipment_event("SHP-9", 2, "shipment_picked"))
        fourth = await system.submit(shipment_event("SHP-9", 4, "shipment_shipped"))
        assert first.state == QUEUED
        assert (second.state, second.awaiting_sequence) == (PARKED, 1)
        assert (fourth.state, fourth.awaiting_sequence) == (PARKED, 3)
        assert (await system.status(second.transaction_id)).awaiting_sequence == 1
        assert (await system.status(fourth.transaction_id)).awaiting_sequence == 3
        gaps = (await system.admin.ListGaps(sequencer_pb2.ListGapsRequest(), timeout=5)).gaps
        assert [(g.entity.entity_id, g.awaiting_sequence) for g in gaps] == [("SHP-9", 3)]
    finally:
        await system.stop()


async def lease_of(system: System, entity_id: str) -> tuple[str | None, Any, Any]:
    from sqlalchemy import select

    from sequencer.models import entities

    async with system.sequencer_app.engine.connect() as conn:
        row = (
            await conn.execute(
                select(entities.c.lease_owner, entities.c.lease_until, entities.c.lease_taken_at).where(
                    entities.c.entity_id == entity_id
                )
            )
        ).one()
    return row.lease_owner, row.lease_until, row.lease_taken_at


@pytest.mark.parametrize("max_hold", [3600.0, 0.0])
async def test_a_long_held_lease_is_handed_back_when_the_chain_ends(
    database_url: str, sequencer_settings: Any, max_hold: float
) -> None:
    """A replica keeps a busy entity's lease between chains, but once it has held the lease
    longer than SEQUENCER_FORWARDER_LEASE_MAX_HOLD it hands it back at the chain's end, so any
    replica may claim the entity next."""
    import dataclasses
    import datetime as dt

    from sequencer import repository as repo

    settings = dataclasses.replace(sequencer_settings, forwarder_lease_max_hold=max_hold)
    system = await System.start(database_url, settings)
    try:
        first = await system.submit(shipment_event("SHP-HO", 1, "shipment_created"))
        assert (await system.wait_terminal(first.transaction_id)).state == APPLIED
        owner, until, taken_at = await lease_of(system, "SHP-HO")
        now = dt.datetime.now(dt.UTC)
        async with system.sequencer_app.engine.begin() as conn:
            other_claimed = await repo.claim_named(
                conn, [(SHIPMENT, "SHP-HO")], "another-replica", now, now + dt.timedelta(seconds=30)
            )
        if max_hold > 0:
            assert owner == system.sequencer_app.forwarder.owner and until > now and taken_at <= now
            assert not other_claimed
        else:
            assert (owner, until, taken_at) == (None, None, None)
            assert other_claimed
            assert (await lease_of(system, "SHP-HO"))[0] == "another-replica"
    finally:
        await system.stop()
