"""kill -9 of the sequencer while a webhook is in flight (SPEC 14): nothing is lost. The killed
replica's claim expires and another sequencer process sends the delivery again with the same
`webhook-id`; deduplicated by that id, the receiver holds exactly one delivery per outcome, and
per entity it saw the MSIs in order (a resend repeats the latest, never an older one)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from tests.processes import ServiceProcess, start_ledger, start_sequencer
from tests.receiver import Receiver
from tests.support import SHIPMENT, shipment_event


def start(database_url: str, ledger_port: int) -> ServiceProcess:
    return start_sequencer(
        database_url,
        ledger_port,
        SEQUENCER_WEBHOOK_RETRY_SCHEDULE=",".join(["0"] + ["0.2"] * 30),
        SEQUENCER_WEBHOOK_POLL_INTERVAL="0.2",
        # The killed replica's claim runs out 3 s after it was taken (an attempt's limit is shorter).
        SEQUENCER_WEBHOOK_TIMEOUT="2",
        SEQUENCER_WEBHOOK_LEASE="3",
        # The killed replica's forwarding leases run out soon too.
        SEQUENCER_FORWARDER_LEASE="2",
    )


KINDS = ["shipment_created", "shipment_picked", "shipment_packed", "shipment_loaded", "shipment_shipped"]
ENTITIES = [f"KILL-{n}" for n in range(4)]
HOLD_AT = 6


@pytest.fixture
def ledger(database_url: str) -> Iterator[ServiceProcess]:
    process = start_ledger(database_url)
    try:
        yield process
    finally:
        process.terminate()


def stubs(process: ServiceProcess) -> tuple[grpc.aio.Channel, Any, Any]:
    channel = grpc.aio.insecure_channel(process.address)
    sequencer = sequencer_pb2_grpc.SequencerServiceStub(channel)
    return channel, sequencer, sequencer_pb2_grpc.SequencerAdminServiceStub(channel)


async def test_kill_9_mid_delivery_loses_nothing(database_url: str, ledger: ServiceProcess) -> None:
    held = asyncio.Event()
    release = asyncio.Event()

    async def answer(n: int, _webhook_id: str) -> tuple[int, dict[str, str]]:
        if n == HOLD_AT:
            held.set()
            await release.wait()  # the sender is killed while waiting for this answer
        return 200, {}

    receiver = await Receiver(answer=answer).start()
    first = start(database_url, ledger.port)
    second: ServiceProcess | None = None
    channel, sequencer, admin = stubs(first)
    try:
        reply = await admin.CreateWebhookSubscription(
            sequencer_pb2.CreateWebhookSubscriptionRequest(url=receiver.url),
            metadata=(("idempotency-key", "kill-sub"),),
            timeout=10,
        )
        receiver.secret = reply.subscription.secret
        expected = set()
        for seq, kind in enumerate(KINDS, start=1):
            for entity in ENTITIES:
                await sequencer.SubmitEvent(
                    sequencer_pb2.SubmitEventRequest(event=shipment_event(entity, seq, kind)),
                    metadata=(("idempotency-key", f"{entity}-{seq}"),),
                    timeout=10,
                )
                expected.add((SHIPMENT, entity, seq, "event.applied"))
        await asyncio.wait_for(held.wait(), 30)
        in_flight = receiver.received[HOLD_AT - 1].webhook_id
        await asyncio.to_thread(first.kill)
        await channel.close()
        second = start(database_url, ledger.port)
        release.set()
        await receiver.wait_for(lambda r: {x.key for x in r.received} == expected, timeout=60)
        distinct = receiver.distinct()
        assert {r.key for r in distinct.values()} == expected
        assert len(distinct) == len(expected)
        assert all(r.verified for r in receiver.received)
        # The delivery in flight at the kill was sent again, with the same webhook-id.
        assert receiver.ids().count(in_flight) >= 2
        last: dict[str, int] = {}
        for r in receiver.received:
            _, entity, seq, _ = r.key
            assert seq >= last.get(entity, 0), f"{entity}: MSI {seq} after {last[entity]}"
            last[entity] = seq
        # Every event is terminal and every delivery recorded as delivered.
        channel, sequencer, admin = stubs(second)
        for _ in range(100):
            listed = await admin.ListWebhookDeliveries(
                sequencer_pb2.ListWebhookDeliveriesRequest(subscription_id=reply.subscription.id, page_size=100),
                timeout=10,
            )
            if {d.state for d in listed.deliveries} == {sequencer_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED}:
                break
            await asyncio.sleep(0.1)
        assert len(listed.deliveries) == len(expected)
        assert {d.state for d in listed.deliveries} == {sequencer_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED}
        assert {d.id for d in listed.deliveries} == set(distinct)
        assert all(d.event_type == "event.applied" for d in listed.deliveries)
        assert {events_pb2.ENTITY_TYPE_SHIPMENT} == {d.entity.entity_type for d in listed.deliveries}
    finally:
        release.set()
        await channel.close()
        if second is not None:
            second.terminate()
        first.kill()
        await receiver.stop()
