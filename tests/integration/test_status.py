"""SPEC 1.3 and issue 7: poll, stream, or wait; correlation ids; metrics that move."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from tests.support import SHIPMENT, System, shipment_event

APPLIED = events_pb2.EVENT_STATE_APPLIED
PARKED = events_pb2.EVENT_STATE_PARKED
QUEUED = events_pb2.EVENT_STATE_QUEUED


async def collect(stream: Any, until: int, timeout: float = 15.0) -> list[int]:
    states: list[int] = []

    async def run() -> None:
        async for reply in stream:
            states.append(reply.status.state)
            if reply.status.state == until:
                return

    await asyncio.wait_for(run(), timeout)
    return states


async def test_watch_sees_parked_queued_applied(system: System) -> None:
    await system.submit(shipment_event("SHP-W1", 1, "shipment_created"))
    loaded = await system.submit(shipment_event("SHP-W1", 3, "shipment_loaded"))
    assert loaded.state == PARKED
    stream = system.sequencer.WatchEventStatus(
        sequencer_pb2.WatchEventStatusRequest(transaction_id=loaded.transaction_id), timeout=30
    )
    watching = asyncio.create_task(collect(stream, APPLIED))
    await asyncio.sleep(0.3)
    await system.submit(shipment_event("SHP-W1", 2, "shipment_picked"))
    states = await watching
    assert states[0] == PARKED and states[-1] == APPLIED
    assert QUEUED in states or len(states) == 2  # QUEUED may be brief, but never out of order
    order: list[int] = [PARKED, QUEUED, APPLIED]
    assert states == sorted(states, key=lambda state: order.index(state))


async def test_watch_on_replica_a_sees_change_made_by_replica_b(system: System) -> None:
    """Two sequencer replicas on one database: B's change reaches A's watcher (NOTIFY)."""
    import dataclasses

    from sequencer.server import build_server

    replica_b = await build_server(dataclasses.replace(system.sequencer_settings, listen_addr="127.0.0.1:0"))
    try:
        entity = events_pb2.EntityRef(entity_type=SHIPMENT, entity_id="SHP-W2")
        stream = system.sequencer.WatchEventStatus(sequencer_pb2.WatchEventStatusRequest(entity=entity), timeout=30)
        watching = asyncio.create_task(collect(stream, APPLIED))
        await asyncio.sleep(0.5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica_b.port}") as channel:
            reply = await sequencer_pb2_grpc.SequencerServiceStub(channel).SubmitEvent(
                sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-W2", 1, "shipment_created")),
                metadata=(("idempotency-key", "w2"),),
                timeout=5,
            )
        states = await watching
        assert states[-1] == APPLIED and reply.transaction_id
        stream.cancel()
    finally:
        await replica_b.stop(0)


async def test_cancelling_a_hundred_watchers_leaks_nothing(system: System) -> None:
    app = system.sequencer_app
    reply = await system.submit(shipment_event("SHP-W3", 2, "shipment_picked"))  # stays parked
    notifier = app.notifier
    before_subscribers = len(notifier.subscribers)
    before_tasks = len(asyncio.all_tasks())
    streams = [
        system.sequencer.WatchEventStatus(
            sequencer_pb2.WatchEventStatusRequest(transaction_id=reply.transaction_id), timeout=60
        )
        for _ in range(100)
    ]
    for stream in streams:
        first = await stream.read()
        assert first.status.state == PARKED
    assert len(notifier.subscribers) == before_subscribers + 100
    for stream in streams:
        stream.cancel()

    def settled() -> bool:
        # Background work (the forwarder's poll, the gap monitor) may hold a task or a
        # connection for a moment; a leak holds them for good.
        return (
            len(notifier.subscribers) == before_subscribers
            and len(asyncio.all_tasks()) <= before_tasks + 2
            and app.engine.pool.checkedout() == 0
        )

    for _ in range(200):  # up to 10 s
        if settled():
            break
        await asyncio.sleep(0.05)
    assert len(notifier.subscribers) == before_subscribers
    assert len(asyncio.all_tasks()) <= before_tasks + 2
    assert app.engine.pool.checkedout() == 0


async def test_watchers_per_caller_are_limited(database_url: str, sequencer_settings: Any) -> None:
    import dataclasses

    system = await System.start(database_url, dataclasses.replace(sequencer_settings, watchers_per_caller=2))
    try:
        reply = await system.submit(shipment_event("SHP-W4", 2, "shipment_picked"))
        request = sequencer_pb2.WatchEventStatusRequest(transaction_id=reply.transaction_id)
        open_streams = [system.sequencer.WatchEventStatus(request, timeout=30) for _ in range(2)]
        for stream in open_streams:
            await stream.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await system.sequencer.WatchEventStatus(request, timeout=5).read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = system.sequencer.WatchEventStatus(request, metadata=(("x-client-id", "other"),), timeout=30)
        assert (await other.read()).status.state == PARKED
        for stream in [*open_streams, other]:
            stream.cancel()
    finally:
        await system.stop()


async def test_bounded_wait_returns_terminal_or_accepted_state(system: System) -> None:
    wait = duration_pb2.Duration(seconds=5)
    applied = await system.submit(shipment_event("SHP-W5", 1, "shipment_created"), wait_for_terminal=wait)
    assert applied.state == APPLIED
    parked = await system.submit(
        shipment_event("SHP-W5", 3, "shipment_loaded"), wait_for_terminal=duration_pb2.Duration(nanos=300_000_000)
    )
    assert parked.state == PARKED and parked.awaiting_sequence == 2
    # Never longer than the caller's deadline: a 10 s wait inside a 1 s deadline still answers.
    reply = await system.sequencer.SubmitEvent(
        sequencer_pb2.SubmitEventRequest(
            event=shipment_event("SHP-W5", 5, "shipment_delivered"), wait_for_terminal=duration_pb2.Duration(seconds=10)
        ),
        metadata=(("idempotency-key", "w5-5"),),
        timeout=1.0,
    )
    assert reply.state == PARKED


async def test_status_by_idempotency_key_is_scoped_to_the_caller(system: System) -> None:
    reply = await system.sequencer.SubmitEvent(
        sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-W6", 1, "shipment_created")),
        metadata=(("idempotency-key", "mine"), ("x-client-id", "wms")),
        timeout=5,
    )
    found = await system.sequencer.GetEventStatus(
        sequencer_pb2.GetEventStatusRequest(idempotency_key="mine"), metadata=(("x-client-id", "wms"),), timeout=5
    )
    assert found.status.transaction_id == reply.transaction_id
    assert found.status.idempotency_key == "mine"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.sequencer.GetEventStatus(
            sequencer_pb2.GetEventStatusRequest(idempotency_key="mine"), metadata=(("x-client-id", "erp"),), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_correlation_id_follows_the_event(system: System, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO)
    call = system.sequencer.SubmitEvent(
        sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-W7", 1, "shipment_created")),
        metadata=(("idempotency-key", "w7"), ("x-correlation-id", "corr-w7")),
        timeout=5,
    )
    reply = await call
    assert reply.correlation_id == "corr-w7"
    assert dict(await call.trailing_metadata())["x-correlation-id"] == "corr-w7"
    status = await system.wait_terminal(reply.transaction_id)
    assert status.correlation_id == "corr-w7"
    history = await system.history(SHIPMENT, "SHP-W7")
    assert history[0].correlation_id == "corr-w7"
    mine = [r for r in caplog.records if getattr(r, "correlation_id", None) == "corr-w7"]
    rpcs = {getattr(r, "rpc", "") for r in mine if r.getMessage() == "rpc"}
    assert "/logistics.sequencer.v1.SequencerService/SubmitEvent" in rpcs
    assert "/logistics.ledger.v1.LedgerService/ApplyEvents" in rpcs
    forwarded = [r for r in mine if r.getMessage() == "event forwarded"]
    assert forwarded and getattr(forwarded[0], "transaction_id", None) == reply.transaction_id
    # The JSON line of the sequencer's RPC carries entity, MSI, transaction and correlation ids.
    from common.logs import JsonFormatter

    submit = next(r for r in mine if getattr(r, "rpc", "").endswith("SubmitEvent"))
    import json

    line = json.loads(JsonFormatter("sequencer").format(submit))
    assert {"service", "rpc", "code", "latency_ms", "entity_id", "sequence", "transaction_id", "correlation_id"} <= set(
        line
    )


async def test_generated_correlation_id_is_echoed(system: System) -> None:
    call = system.sequencer.SubmitEvent(
        sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-W8", 1, "shipment_created")),
        metadata=(("idempotency-key", "w8"),),
        timeout=5,
    )
    reply = await call
    assert reply.correlation_id and dict(await call.trailing_metadata())["x-correlation-id"] == reply.correlation_id


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def value(text: str, series: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(series):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_correlation_id_is_in_initial_and_trailing_metadata_even_on_errors(system: System) -> None:
    call = system.sequencer.SubmitEvent(
        sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-W9", 1, "shipment_created")),
        metadata=(("x-correlation-id", "corr-err"),),  # no key: rejected
        timeout=5,
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert dict(await call.initial_metadata())["x-correlation-id"] == "corr-err"
    assert dict(await call.trailing_metadata())["x-correlation-id"] == "corr-err"
