"""Helpers the tests share: event builders, real servers on port 0, ErrorInfo extraction."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2

SHIPMENT = events_pb2.ENTITY_TYPE_SHIPMENT
INVENTORY = events_pb2.ENTITY_TYPE_INVENTORY_ITEM

SHIPMENT_PAYLOADS: dict[str, Any] = {
    "shipment_created": events_pb2.ShipmentCreated(order_id="ORD-1", origin="AMS", destination="BER"),
    "shipment_picked": events_pb2.ShipmentPicked(warehouse_id="WH-1"),
    "shipment_packed": events_pb2.ShipmentPacked(package_count=2),
    "shipment_loaded": events_pb2.ShipmentLoaded(vehicle_id="TRUCK-7"),
    "shipment_shipped": events_pb2.ShipmentShipped(carrier="DHL", tracking_number="TRK-1"),
    "shipment_delivered": events_pb2.ShipmentDelivered(received_by="front desk"),
    "shipment_cancelled": events_pb2.ShipmentCancelled(reason="customer request"),
}


def shipment_event(entity_id: str, sequence: int, kind: str, **fields: Any) -> events_pb2.Event:
    payload = type(SHIPMENT_PAYLOADS[kind])()
    payload.CopyFrom(SHIPMENT_PAYLOADS[kind])
    for name, value in fields.items():
        setattr(payload, name, value)
    event = events_pb2.Event(entity_type=SHIPMENT, entity_id=entity_id, sequence=sequence, source="tests")
    getattr(event, kind).CopyFrom(payload)
    return event


def inventory_event(sku: str, sequence: int, kind: str, **fields: Any) -> events_pb2.Event:
    payload_type = {
        "inventory_received": events_pb2.InventoryReceived,
        "inventory_adjusted": events_pb2.InventoryAdjusted,
        "inventory_reserved": events_pb2.InventoryReserved,
        "inventory_released": events_pb2.InventoryReleased,
        "inventory_moved": events_pb2.InventoryMoved,
    }[kind]
    event = events_pb2.Event(entity_type=INVENTORY, entity_id=sku, sequence=sequence, source="tests")
    getattr(event, kind).CopyFrom(payload_type(**fields))
    return event


def submit_request(event: events_pb2.Event, **kwargs: Any) -> sequencer_pb2.SubmitEventRequest:
    return sequencer_pb2.SubmitEventRequest(event=event, **kwargs)


def error_info(exc: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo detail of a failed call (fails the test when absent)."""
    trailing = exc.trailing_metadata() or ()  # type: ignore[union-attr]
    raw = next(v for k, v in trailing if k == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status details")


async def trailing(call: Any) -> dict[str, str]:
    """Trailing metadata of a finished grpc.aio call, as a dict of its text entries."""
    return {k: v for k, v in (await call.trailing_metadata() or ()) if isinstance(v, str)}


def with_overrides(settings: Any, **overrides: Any) -> Any:
    return dataclasses.replace(settings, **overrides)
