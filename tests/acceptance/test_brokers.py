"""The broker ingress bridges (SPEC 16) against the machine's real RabbitMQ and NATS JetStream:
every test runs for both brokers, with queue, stream and subject names of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format
from prometheus_client import Counter as PromCounter

from bench.database import libpq
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2
from tests.brokers import JSON, PROTOBUF, BrokerUnderTest, RabbitBroker, TcpProxy, make_broker
from tests.processes import start_ledger, start_sequencer
from tests.support import System, shipment_event, with_overrides
from tests.workloads import assert_in_order_state, wait_processed, workload

BROKERS = ["amqp", "nats"]


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerUnderTest]:
    broker = make_broker(str(request.param))
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


def count(metric: PromCounter, **labels: str) -> float:
    """A counter's value for the given labels (summed over the others)."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def start_system(
    database_url: str, sequencer_settings: Any, broker: BrokerUnderTest, url: str | None = None
) -> System:
    settings = with_overrides(sequencer_settings, brokers=broker.broker_settings(url))
    system = await System.start(database_url, settings)
    bridges = system.sequencer_app.bridges
    bridge = bridges.amqp if broker.kind == "amqp" else bridges.nats
    await asyncio.wait_for(bridge.ready.wait(), 30)
    return system


async def test_a_burst_out_of_order_with_duplicates_ends_in_the_in_order_state(
    database_url: str, sequencer_settings: Any, broker: BrokerUnderTest
) -> None:
    load = workload(broker.kind, shipments=20, skus=22, per_sku=40, duplicate_share=0.1, seed=18)
    assert load.events == 1000
    system = await start_system(database_url, sequencer_settings, broker)
    try:
        for message in load.messages:
            await broker.publish(message.body, key=message.key, content_type=message.content_type)
        await wait_processed(system.ledger, load.streams)
        await assert_in_order_state(system.ledger, load.streams)
        metrics = system.sequencer_app.metrics
        # Every message is consumed and acknowledged (duplicates as replays), none dead.
        assert count(metrics.bridge_acked, broker=broker.kind) >= len(load.messages)
        assert count(metrics.bridge_dead_lettered, broker=broker.kind) == 0
        # The duplicates reached the sequencer, which replayed them instead of running them.
        assert count(metrics.replays) >= load.duplicates
    finally:
        await system.stop()


async def test_bad_messages_land_in_the_dead_letter_destination_with_their_reasons(
    database_url: str, sequencer_settings: Any, broker: BrokerUnderTest
) -> None:
    good = shipment_event("dl-1", 1, "shipment_created")
    other = shipment_event("dl-1", 1, "shipment_picked")
    parked = shipment_event("dl-2", 2, "shipment_picked")
    conflicting = shipment_event("dl-2", 2, "shipment_packed")
    invalid = shipment_event("dl-3", 1, "shipment_created")
    invalid.shipment_created.origin = "x" * 5000

    def body(event: Any) -> bytes:
        return bytes(sequencer_pb2.SubmitEventRequest(event=event).SerializeToString())

    system = await start_system(database_url, sequencer_settings, broker)
    try:
        await broker.publish(body(good), key="dl-good", content_type=PROTOBUF)
        await broker.publish(body(parked), key="dl-parked", content_type=PROTOBUF)
        await system.wait_terminal((await wait_for_status(system, "dl-good")).transaction_id)
        assert (await wait_for_status(system, "dl-parked")).state == events_pb2.EVENT_STATE_PARKED
        bad = {
            # no key at all
            "IDEMPOTENCY_KEY_MISSING": (body(good), None, PROTOBUF),
            "INVALID_EVENT": (
                json_format.MessageToJson(sequencer_pb2.SubmitEventRequest(event=invalid)).encode(),
                "dl-invalid",
                JSON,
            ),
            "MALFORMED_REQUEST": (b"\xff\xfe not a protobuf", "dl-garbage", PROTOBUF),
            # the good message's key with another payload
            "IDEMPOTENCY_KEY_REUSED": (body(other), "dl-good", PROTOBUF),
            # the parked message's MSI with another payload, under a new key
            "SEQUENCE_CONFLICT": (body(conflicting), "dl-other", PROTOBUF),
        }
        for payload, key, content_type in bad.values():
            await broker.publish(payload, key=key, content_type=content_type)
        dead = await broker.dead_letters(len(bad))
        by_reason = {letter.headers["x-error-reason"]: letter for letter in dead}
        assert set(by_reason) == set(bad)
        for reason, (payload, key, _type) in bad.items():
            letter = by_reason[reason]
            assert letter.body == payload, reason
            assert letter.headers["x-error-message"], reason
            if key is not None:  # (aio-pika gives every message it publishes a message_id)
                assert letter.key == key, reason
        assert "origin" in by_reason["INVALID_EVENT"].headers["x-error-message"]
        # Nothing of the refused messages was stored or applied.
        shipment = await system.shipment("dl-1")
        assert (shipment.version, shipment.order_id) == (1, "ORD-1")
        metrics = system.sequencer_app.metrics
        assert count(metrics.bridge_dead_lettered, broker=broker.kind) == len(bad)
    finally:
        await system.stop()


async def wait_for_status(system: System, key: str, timeout: float = 30.0) -> sequencer_pb2.EventStatus:
    """The bridged event's status, by its key in the bridge's caller scope, once accepted."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            reply = await system.sequencer.GetEventStatus(
                sequencer_pb2.GetEventStatusRequest(idempotency_key=key),
                metadata=(("x-client-id", "bridge"),),
                timeout=5,
            )
            if reply.status.transaction_id:
                status: sequencer_pb2.EventStatus = reply.status
                return status
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.1)


async def test_the_bridge_reconnects_after_its_connection_drops(
    database_url: str, sequencer_settings: Any, broker: BrokerUnderTest
) -> None:
    load = workload(f"{broker.kind}-rc", shipments=4, skus=4, per_sku=20, duplicate_share=0.1, seed=7)
    half = len(load.messages) // 2
    proxy = TcpProxy.to_url(broker.url)
    await proxy.start()
    system = await start_system(database_url, sequencer_settings, broker, url=proxy.url_for(broker.url))
    try:
        for message in load.messages[:half]:
            await broker.publish(message.body, key=message.key, content_type=message.content_type)
        consumed = system.sequencer_app.metrics.bridge_consumed
        await wait_until(lambda: count(consumed, broker=broker.kind) >= half)
        await proxy.cut()
        # Published while the bridge has no connection: the broker keeps them.
        for message in load.messages[half:]:
            await broker.publish(message.body, key=message.key, content_type=message.content_type)
        await asyncio.sleep(1.5)
        await proxy.restore()
        await wait_processed(system.ledger, load.streams)
        await assert_in_order_state(system.ledger, load.streams)
        # The bridge came back through a new connection.
        assert proxy.accepted >= 2
    finally:
        await system.stop()
        await proxy.close()


async def wait_until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


def accepted_keys(database_url: str) -> int:
    """Idempotency records the bridge's caller has committed (how far consumption got)."""
    with psycopg.connect(libpq(database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM sequencer.idempotency_keys WHERE caller_id = 'bridge'").fetchone()
    assert row is not None
    return int(row[0])


async def test_kill_9_of_the_sequencer_while_it_consumes_loses_nothing(
    database_url: str, broker: BrokerUnderTest
) -> None:
    load = workload(f"{broker.kind}-k9", shipments=10, skus=10, per_sku=54, duplicate_share=0.1, seed=9)
    assert load.events == 600
    for message in load.messages:
        await broker.publish(message.body, key=message.key, content_type=message.content_type)
    # A small prefetch keeps many messages unacknowledged in the broker while the first process
    # consumes, so the kill lands among them.
    # A short forwarding lease lets the second process take over the killed one's entities soon.
    env = {
        **broker.env(),
        "SEQUENCER_AMQP_PREFETCH": "32",
        "SEQUENCER_NATS_PREFETCH": "32",
        "SEQUENCER_FORWARDER_LEASE": "2",
    }
    ledger = await asyncio.to_thread(start_ledger, database_url)
    channel = grpc.aio.insecure_channel(ledger.address)
    try:
        first = await asyncio.to_thread(lambda: start_sequencer(database_url, ledger.port, keep=None, **env))
        try:
            await wait_until(lambda: accepted_keys(database_url) >= 100, timeout=120)
        finally:
            await asyncio.to_thread(first.kill)
        print("accepted before the kill:", accepted_keys(database_url), "of", load.events)
        second = await asyncio.to_thread(lambda: start_sequencer(database_url, ledger.port, keep=None, **env))
        try:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            await wait_processed(stub, load.streams)
            await assert_in_order_state(stub, load.streams)
        finally:
            await asyncio.to_thread(second.terminate)
    finally:
        await channel.close()
        await asyncio.to_thread(ledger.terminate)


async def test_a_database_outage_hands_messages_back_until_it_ends(
    database_url: str, sequencer_settings: Any, broker: BrokerUnderTest
) -> None:
    load = workload(f"{broker.kind}-db", shipments=3, skus=3, per_sku=10, duplicate_share=0.1, seed=5)
    # The sequencer reaches PostgreSQL through a proxy the test cuts: a real outage for it alone.
    proxy = TcpProxy.to_url(database_url)
    await proxy.start()
    settings = with_overrides(sequencer_settings, database_url=proxy.url_for(database_url))
    system = await start_system(database_url, settings, broker)
    try:
        metrics = system.sequencer_app.metrics
        await proxy.cut()
        for message in load.messages:
            await broker.publish(message.body, key=message.key, content_type=message.content_type)
        # Consumed while the database is away: handed back to the broker, nothing dead-lettered.
        await wait_until(lambda: count(metrics.bridge_requeued, broker=broker.kind) >= 1)
        await proxy.restore()
        await wait_processed(system.ledger, load.streams)
        await assert_in_order_state(system.ledger, load.streams)
        assert count(metrics.bridge_redelivered, broker=broker.kind) >= 1
        assert count(metrics.bridge_dead_lettered, broker=broker.kind) == 0
    finally:
        await system.stop()
        await proxy.close()


async def test_a_full_backlog_hands_messages_back_instead_of_dead_lettering_them(
    database_url: str, sequencer_settings: Any, broker: BrokerUnderTest
) -> None:
    # Flow control (SPEC 12) refuses submissions beyond a tiny backlog with BACKLOG_FULL: for a
    # bridge that is "later", never "dead". Each event is its entity's first, so the backlog
    # drains as the ledger applies them (docs/brokers.md: parked events can hold a full backlog).
    events = [shipment_event(f"{broker.kind}-bl-{i}", 1, "shipment_created") for i in range(40)]
    settings = with_overrides(sequencer_settings, max_backlog=5, backlog_refresh_interval=0.1)
    system = await start_system(database_url, settings, broker)
    try:
        for event in events:
            body = sequencer_pb2.SubmitEventRequest(event=event).SerializeToString()
            await broker.publish(body, key=f"{event.entity_id}:1", content_type=PROTOBUF)
        for event in events:
            await system.wait_terminal((await wait_for_status(system, f"{event.entity_id}:1")).transaction_id)
        for event in events:
            shipment = await system.shipment(event.entity_id)
            assert shipment.version == 1
        metrics = system.sequencer_app.metrics
        assert count(metrics.bridge_dead_lettered, broker=broker.kind) == 0
        print("handed back:", count(metrics.bridge_requeued, broker=broker.kind))
    finally:
        await system.stop()


async def test_an_operators_quorum_queue_is_consumed_as_it_is(database_url: str, sequencer_settings: Any) -> None:
    # Redeclaring a quorum queue as a classic one is refused by RabbitMQ: the bridge uses what
    # exists.
    broker = RabbitBroker(queue_arguments={"x-queue-type": "quorum"})
    await broker.open()
    try:
        system = await start_system(database_url, sequencer_settings, broker)
        try:
            event = shipment_event("quorum-1", 1, "shipment_created")
            body = sequencer_pb2.SubmitEventRequest(event=event).SerializeToString()
            await broker.publish(body, key="quorum-1:1", content_type=PROTOBUF)
            await system.wait_terminal((await wait_for_status(system, "quorum-1:1")).transaction_id)
            assert (await system.shipment("quorum-1")).version == 1
        finally:
            await system.stop()
    finally:
        await broker.close()
