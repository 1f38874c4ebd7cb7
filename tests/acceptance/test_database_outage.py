"""A database outage is transient on every RPC of both services (SPEC 12): while PostgreSQL is
down each answers UNAVAILABLE with ErrorInfo reason TRANSIENT (never INTERNAL), and once it is
back the services work again without a restart.

The test owns its PostgreSQL cluster (tests/cluster.py: initdb into a temporary folder, a unix
socket in that folder only) and stops it with `pg_ctl stop -m immediate`, as a crash or
failover would. The RPCs come from the service descriptors, so a new RPC without a request
below fails the test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from common.migrate import upgrade
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from tests.cluster import Cluster
from tests.support import System, error_info, inventory_event, sequencer_test_settings, shipment_event

ROOT = Path(__file__).resolve().parents[2]
SERVICES = [
    sequencer_pb2.DESCRIPTOR.services_by_name["SequencerService"],
    sequencer_pb2.DESCRIPTOR.services_by_name["SequencerAdminService"],
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"],
]
TRANSIENT = "UNAVAILABLE/TRANSIENT"
RECOVERY = 20.0  # seconds the services may take to drop dead pooled connections


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A started cluster with both services' schemas migrated."""
    cluster = Cluster()
    try:
        cluster.start()
        for service in ("ledger", "sequencer"):
            upgrade(ROOT / service / "migrations", cluster.url, service)
        yield cluster
    finally:
        cluster.remove()


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", f"outage-{uuid.uuid4().hex}"),)


def requests(tx: str, key: str) -> dict[str, Callable[[], tuple[Message, Any]]]:
    """A valid request (and metadata) per RPC, naming what exists: the transaction `tx`
    submitted with `key` for shipment OUT-1. State-changing calls carry fresh keys."""
    shipment = events_pb2.EntityRef(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="OUT-1")
    seq = sequencer_pb2

    def apply(sku: str) -> ledger_pb2.ApplyEventRequest:
        event = inventory_event(sku, 1, "inventory_received", location="A", quantity=1)
        return ledger_pb2.ApplyEventRequest(event=event, transaction_id=str(uuid.uuid4()), correlation_id="outage")

    return {
        "SubmitEvent": lambda: (seq.SubmitEventRequest(event=shipment_event("OUT-1", 2, "shipment_picked")), _key()),
        "SubmitEvents": lambda: (
            seq.SubmitEventsRequest(
                requests=[
                    seq.SubmitEventRequest(
                        event=shipment_event("OUT-2", 1, "shipment_created"), request_id=f"outage-{uuid.uuid4().hex}"
                    ),
                    seq.SubmitEventRequest(
                        event=inventory_event("OUT-SKU", 1, "inventory_received", location="A", quantity=2),
                        request_id=f"outage-{uuid.uuid4().hex}",
                    ),
                ]
            ),
            None,
        ),
        "GetEventStatus": lambda: (seq.GetEventStatusRequest(transaction_id=tx), None),
        "WatchEventStatus": lambda: (seq.WatchEventStatusRequest(transaction_id=tx), None),
        "ListGaps": lambda: (seq.ListGapsRequest(page_size=10), None),
        "ListParkedEvents": lambda: (seq.ListParkedEventsRequest(entity=shipment, page_size=10), None),
        "GetEntity": lambda: (seq.GetEntityRequest(entity=shipment), None),
        "SkipSequence": lambda: (seq.SkipSequenceRequest(entity=shipment, sequence=2, reason="outage test"), _key()),
        "GetIdempotencyRecord": lambda: (seq.GetIdempotencyRecordRequest(idempotency_key=key), None),
        "ListBlockedEvents": lambda: (seq.ListBlockedEventsRequest(page_size=10), None),
        "RetryBlockedEvent": lambda: (
            seq.RetryBlockedEventRequest(entity=shipment, sequence=2, reason="outage test"),
            _key(),
        ),
        "CreateWebhookSubscription": lambda: (
            seq.CreateWebhookSubscriptionRequest(url="http://127.0.0.1:9/hooks"),
            _key(),
        ),
        "ListWebhookSubscriptions": lambda: (seq.ListWebhookSubscriptionsRequest(page_size=10), None),
        "DeleteWebhookSubscription": lambda: (seq.DeleteWebhookSubscriptionRequest(id=str(uuid.uuid4())), None),
        "ListWebhookDeliveries": lambda: (
            seq.ListWebhookDeliveriesRequest(subscription_id=str(uuid.uuid4()), page_size=10),
            None,
        ),
        "RedeliverWebhook": lambda: (seq.RedeliverWebhookRequest(delivery_id=str(uuid.uuid4())), None),
        "ApplyEvent": lambda: (apply("OUT-L1"), None),
        "ApplyEvents": lambda: (ledger_pb2.ApplyEventsRequest(requests=[apply("OUT-L2"), apply("OUT-L3")]), None),
        "GetShipment": lambda: (ledger_pb2.GetShipmentRequest(shipment_id="OUT-1"), None),
        "GetInventoryItem": lambda: (ledger_pb2.GetInventoryItemRequest(sku="OUT-SKU0"), None),
        "ListEntityHistory": lambda: (ledger_pb2.ListEntityHistoryRequest(entity=shipment, page_size=10), None),
    }


async def call(channel: grpc.aio.Channel, service: d.ServiceDescriptor, method: d.MethodDescriptor, build: Any) -> Any:
    """Calls one RPC by its descriptor: its response, or the first message of a stream."""
    request, metadata = build()
    path = f"/{service.full_name}/{method.name}"
    codec: Any = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": message_factory.GetMessageClass(method.output_type).FromString,
    }
    if method.server_streaming:
        stream: Any = channel.unary_stream(path, **codec)(request, metadata=metadata, timeout=10)
        try:
            return await stream.read()
        finally:
            stream.cancel()
    unary: Any = channel.unary_unary(path, **codec)
    return await unary(request, metadata=metadata, timeout=10)


def answer(exc: grpc.aio.AioRpcError) -> str:
    """CODE/REASON of a failed call ("-" when it carries no ErrorInfo, e.g. a deadline)."""
    try:
        reason = error_info(exc).reason
    except (StopIteration, AssertionError):
        reason = "-"
    return f"{exc.code().name}/{reason}"


def item_answers(reply: Any) -> set[str]:
    """How the items of a batch reply answered (a batch may answer per item, SPEC 10)."""
    answers = set()
    for result in getattr(reply, "results", ()):
        if result.WhichOneof("outcome") != "error":
            answers.add("OK")
            continue
        info = error_details_pb2.ErrorInfo()
        reason = next((info.reason for detail in result.error.details if detail.Unpack(info)), "-")
        answers.add(f"{_code(result.error.code)}/{reason}")
    return answers


def _code(number: int) -> str:
    return next(c.name for c in grpc.StatusCode if c.value[0] == number)


async def eventually(attempt: Callable[[], Any]) -> Any:
    """The first success of `attempt`, retrying UNAVAILABLE for up to RECOVERY seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY
    while True:
        try:
            return await attempt()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_every_rpc_is_unavailable_transient_while_the_database_is_down(cluster: Cluster) -> None:
    system = await System.start(cluster.url, sequencer_test_settings(cluster.url))
    try:
        key = f"outage-{uuid.uuid4().hex}"
        accepted = await system.submit(shipment_event("OUT-1", 1, "shipment_created"), key=key)
        assert (await system.wait_terminal(accepted.transaction_id)).state == events_pb2.EVENT_STATE_APPLIED
        builders = requests(accepted.transaction_id, key)
        methods = [(s, m) for s in SERVICES for m in s.methods]
        missing = sorted(m.name for _, m in methods if m.name not in builders)
        assert not missing, f"add a request for {missing} to requests()"

        await asyncio.to_thread(cluster.stop)
        ledger = grpc.aio.insecure_channel(f"127.0.0.1:{system.ledger_app.port}")
        sequencer = grpc.aio.insecure_channel(f"127.0.0.1:{system.sequencer_app.port}")
        system.channels += [ledger, sequencer]  # closed by system.stop()
        wrong: dict[str, str] = {}
        for service, method in methods:
            channel = ledger if service.full_name.startswith("logistics.ledger.") else sequencer
            try:
                reply = await call(channel, service, method, builders[method.name])
            except grpc.aio.AioRpcError as exc:
                if answer(exc) != TRANSIENT:
                    wrong[method.name] = f"{answer(exc)}: {exc.details()}"
            else:
                # A batch may answer OK with every item refused as transient; nothing else is.
                items = item_answers(reply)
                if items != {TRANSIENT}:
                    wrong[method.name] = f"OK, items {sorted(items)}: {reply}"
        assert not wrong, f"while PostgreSQL is down, these RPCs did not answer {TRANSIENT}: {wrong}"

        await asyncio.to_thread(cluster.start)
        again = await eventually(
            lambda: system.submit(shipment_event("OUT-1", 2, "shipment_picked"), key=f"{key}-after")
        )
        assert (await eventually(lambda: system.wait_terminal(again.transaction_id))).state == (
            events_pb2.EVENT_STATE_APPLIED
        )
        shipment = await eventually(lambda: system.shipment("OUT-1"))
        assert shipment.status == ledger_pb2.SHIPMENT_STATUS_PICKED
    finally:
        await system.stop()
