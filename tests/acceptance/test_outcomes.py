"""The outcome stream (SPEC 16) on the machine's real NATS JetStream and RabbitMQ: events
published to the broker's ingress come back as one APPLIED or REJECTED per event, per entity
in MSI order once deduplicated by id, named as docs/brokers.md says."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf import json_format

from bench.model import INVENTORY, Stream
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from tests.brokers import PROTOBUF, BrokerUnderTest, Outcome, make_broker
from tests.processes import start_ledger, start_sequencer
from tests.support import System, shipment_event, with_overrides

APPLIED = events_pb2.EVENT_STATE_APPLIED
REJECTED = events_pb2.EVENT_STATE_REJECTED
# A shipment's events: the third (shipped straight after picked) breaks the lifecycle and is
# REJECTED; the rejection consumes its MSI and the chain goes on.
SHIPMENT_KINDS = ("shipment_created", "shipment_picked", "shipment_shipped", "shipment_packed", "shipment_loaded")
SHIPMENT_STATES = (APPLIED, APPLIED, REJECTED, APPLIED, APPLIED)
TYPE_NAMES = {events_pb2.ENTITY_TYPE_SHIPMENT: "shipment", events_pb2.ENTITY_TYPE_INVENTORY_ITEM: "inventory_item"}


@pytest.fixture(params=["nats", "amqp"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerUnderTest]:
    broker = make_broker(str(request.param))
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


def unique(messages: list[Outcome]) -> list[Outcome]:
    """Arrival order, each id once (the stream is at least once)."""
    seen: set[str] = set()
    kept = []
    for message in messages:
        if message.msg_id not in seen:
            seen.add(message.msg_id)
            kept.append(message)
    return kept


Expected = dict[tuple[str, str], list[int]]


def scenario() -> tuple[list[tuple[str, sequencer_pb2.SubmitEventRequest]], Expected, int]:
    """Shipments with one rejection each and a few SKUs: the messages (keyed, 10 % twice,
    shuffled), each entity's expected outcome states in MSI order (by its subject token), and
    how many events there are."""
    rng = random.Random(16)
    expected: dict[tuple[str, str], list[int]] = {}
    requests: list[tuple[str, sequencer_pb2.SubmitEventRequest]] = []
    for i in range(8):
        entity_id = f"out-s.{i}"  # a dot, written %2E in subjects and routing keys
        for sequence, kind in enumerate(SHIPMENT_KINDS, start=1):
            requests.append(
                (
                    f"{entity_id}:{sequence}",
                    sequencer_pb2.SubmitEventRequest(event=shipment_event(entity_id, sequence, kind)),
                )
            )
        expected[("shipment", entity_id.replace(".", "%2E"))] = list(SHIPMENT_STATES)
    for i in range(4):
        stream = Stream(INVENTORY, f"out-k{i}", random.Random(rng.random()))
        for _ in range(15):
            sequence, _spec = stream.next_spec()
            requests.append(
                (f"{stream.entity_id}:{sequence}", sequencer_pb2.SubmitEventRequest(event=stream.event(sequence)))
            )
        expected[("inventory_item", stream.entity_id)] = [APPLIED] * 15
    total = sum(len(states) for states in expected.values())
    messages = requests + rng.sample(requests, len(requests) // 10)
    rng.shuffle(messages)
    return messages, expected, total


def check(received: list[Outcome], expected: Expected, total: int, kind: str) -> None:
    outcomes = unique(received)
    assert len(outcomes) == total
    by_entity: dict[tuple[str, str], list[sequencer_pb2.EventStatus]] = defaultdict(list)
    for message in outcomes:
        status = json_format.Parse(message.body, sequencer_pb2.EventStatus())
        state = {APPLIED: "applied", REJECTED: "rejected"}[status.state]
        assert message.msg_id == f"{status.transaction_id}:{state}"
        entity_type = TYPE_NAMES[status.entity.entity_type]
        token = status.entity.entity_id.replace(".", "%2E")
        if kind == "nats":
            assert message.where.endswith(f".outcomes.{entity_type}.{token}"), message.where
        else:
            assert message.where == f"{entity_type}.{token}.{state}"
        by_entity[(entity_type, token)].append(status)
    assert set(by_entity) == set(expected)
    for entity, statuses in by_entity.items():
        # Per entity: MSI 1, 2, 3 … in arrival order, each with its outcome.
        assert [s.sequence for s in statuses] == list(range(1, len(expected[entity]) + 1)), entity
        assert [s.state for s in statuses] == expected[entity], entity
        assert all(s.entity_version == s.sequence for s in statuses), entity
    rejected = [s for s in by_entity[("shipment", "out-s%2E0")] if s.state == REJECTED]
    assert len(rejected) == 1 and rejected[0].reason, rejected


async def test_one_outcome_per_event_per_entity_in_msi_order(
    database_url: str, sequencer_settings: Any, broker: BrokerUnderTest
) -> None:
    messages, expected, total = scenario()
    settings = with_overrides(sequencer_settings, brokers=broker.broker_settings(outcomes=True))
    system = await System.start(database_url, settings)
    try:
        publisher = system.sequencer_app.publishers[0]
        assert publisher.sink.name == broker.kind
        # The outcome subscription exists before the first event is processed.
        await asyncio.wait_for(publisher.ready.wait(), 30)
        for key, request in messages:
            await broker.publish(request.SerializeToString(), key=key, content_type=PROTOBUF)
        received = await broker.outcomes(lambda found: len(unique(found)) >= total)
    finally:
        await system.stop()
    check(received, expected, total, broker.kind)


async def test_kill_9_of_the_sequencer_while_it_publishes_loses_no_outcome(
    database_url: str, broker: BrokerUnderTest
) -> None:
    messages, expected, total = scenario()
    # Short leases: the second process takes over the killed one's claims soon.
    env = {
        **broker.env(),
        **broker.outcomes_env(),
        "SEQUENCER_OUTCOMES_LEASE": "2",
        "SEQUENCER_FORWARDER_LEASE": "2",
    }
    ledger = await asyncio.to_thread(start_ledger, database_url)
    try:
        first = await asyncio.to_thread(lambda: start_sequencer(database_url, ledger.port, keep=None, **env))
        try:
            # The first process has created its subscription once it consumes: no outcome of
            # these events can predate it.
            await asyncio.to_thread(first.wait_log, lambda e: e.get("msg") == "outcome publisher running", 30)
            for key, request in messages:
                await broker.publish(request.SerializeToString(), key=key, content_type=PROTOBUF)
            deadline = asyncio.get_running_loop().time() + 120
            while await broker.outcomes_stored() < 10:
                assert asyncio.get_running_loop().time() < deadline, "no outcome published"
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(first.kill)
        print("outcomes stored before the kill:", await broker.outcomes_stored(), "of", total)
        second = await asyncio.to_thread(lambda: start_sequencer(database_url, ledger.port, keep=None, **env))
        try:
            received = await broker.outcomes(lambda found: len(unique(found)) >= total)
        finally:
            await asyncio.to_thread(second.terminate)
    finally:
        await asyncio.to_thread(ledger.terminate)
    check(received, expected, total, broker.kind)
