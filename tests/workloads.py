"""Event workloads published to a broker, and the check that the ledger ends in the in-order
state with every MSI applied exactly once (against bench/model.py, an independent model)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from bench.model import INVENTORY, SHIPMENT, Stream, fold_inventory, fold_shipment
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from tests.brokers import JSON, PROTOBUF


@dataclass(frozen=True)
class Message:
    key: str
    body: bytes
    content_type: str


@dataclass
class Workload:
    streams: list[Stream]
    messages: list[Message] = field(default_factory=list)
    duplicates: int = 0

    @property
    def events(self) -> int:
        return sum(len(s.specs) for s in self.streams)


def workload(prefix: str, *, shipments: int, skus: int, per_sku: int, duplicate_share: float, seed: int) -> Workload:
    """The events of a few shipments and SKUs, each a message keyed `<entity>:<msi>`, half of
    them protobuf and half proto3 JSON; then `duplicate_share` of them published twice, and all
    shuffled (delivery order must not matter)."""
    rng = random.Random(seed)
    streams = [Stream(SHIPMENT, f"{prefix}-s{i}", random.Random(rng.random())) for i in range(shipments)]
    streams += [Stream(INVENTORY, f"{prefix}-k{i}", random.Random(rng.random())) for i in range(skus)]
    load = Workload(streams)
    for stream in streams:
        count = 6 if stream.entity_type == SHIPMENT else per_sku
        for _ in range(count):
            sequence, _spec = stream.next_spec()
            request = sequencer_pb2.SubmitEventRequest(event=stream.event(sequence))
            key = f"{stream.entity_id}:{sequence}"
            if rng.random() < 0.5:
                load.messages.append(Message(key, request.SerializeToString(), PROTOBUF))
            else:
                load.messages.append(Message(key, json_format.MessageToJson(request).encode(), JSON))
    load.duplicates = round(len(load.messages) * duplicate_share)
    load.messages += rng.sample(load.messages, load.duplicates)
    rng.shuffle(load.messages)
    return load


async def _version(ledger: Any, stream: Stream) -> int:
    try:
        if stream.entity_type == SHIPMENT:
            reply = await ledger.GetShipment(ledger_pb2.GetShipmentRequest(shipment_id=stream.entity_id), timeout=5)
            return int(reply.shipment.version)
        reply = await ledger.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku=stream.entity_id), timeout=5)
        return int(reply.item.version)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise


async def wait_processed(ledger: Any, streams: list[Stream], timeout: float = 180.0) -> None:
    """Until every entity's ledger version reaches its last MSI (or the test fails)."""
    deadline = asyncio.get_running_loop().time() + timeout
    waiting = list(streams)
    while waiting:
        versions = await asyncio.gather(*(_version(ledger, s) for s in waiting))
        waiting = [s for s, v in zip(waiting, versions, strict=True) if v < len(s.specs)]
        if not waiting:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{len(waiting)} entities not processed, e.g. {waiting[0].entity_id}")
        await asyncio.sleep(0.2)


async def _history(ledger: Any, stream: Stream) -> list[Any]:
    from logistics.events.v1 import events_pb2

    entries: list[Any] = []
    token = ""
    while True:
        reply = await ledger.ListEntityHistory(
            ledger_pb2.ListEntityHistoryRequest(
                entity=events_pb2.EntityRef(entity_type=stream.entity_type, entity_id=stream.entity_id),  # type: ignore[arg-type]
                page_size=100,
                page_token=token,
            ),
            timeout=5,
        )
        entries.extend(reply.entries)
        token = reply.next_page_token
        if not token:
            return entries


async def assert_in_order_state(ledger: Any, streams: list[Stream]) -> None:
    """The ledger equals the in-order model, and each MSI is in the history once, applied."""
    for stream in streams:
        history = await _history(ledger, stream)
        sequences = sorted(int(e.sequence) for e in history)
        assert sequences == list(range(1, len(stream.specs) + 1)), (stream.entity_id, sequences)
        assert {e.outcome for e in history} == {ledger_pb2.APPLY_OUTCOME_APPLIED}, stream.entity_id
        if stream.entity_type == SHIPMENT:
            reply = await ledger.GetShipment(ledger_pb2.GetShipmentRequest(shipment_id=stream.entity_id), timeout=5)
            assert int(reply.shipment.status) == fold_shipment(stream.specs)
            assert reply.shipment.version == len(stream.specs)
        else:
            reply = await ledger.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku=stream.entity_id), timeout=5)
            on_hand = {b.location: int(b.on_hand) for b in reply.item.balances if b.on_hand or b.reserved}
            expected = {k: v for k, v in fold_inventory(stream.specs).items() if v}
            assert on_hand == expected, stream.entity_id
            assert reply.item.version == len(stream.specs)
