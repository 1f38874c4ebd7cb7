"""Ingress validation of events: malformed events never enter the mailbox.

Rules are per payload kind, in one table, so a new kind is one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from common.limits import ENTITY_ID_PATTERN, MAX_ENTITY_ID, MAX_PACKAGE_COUNT, MAX_QUANTITY, MAX_SEQUENCE, MAX_TEXT
from logistics.events.v1 import events_pb2
from sequencer.errors import InvalidEvent

SHIPMENT = events_pb2.ENTITY_TYPE_SHIPMENT
INVENTORY = events_pb2.ENTITY_TYPE_INVENTORY_ITEM


def _required(path: str, value: str) -> None:
    if not value:
        raise InvalidEvent(f"{path} is required", field=path)


def _text(path: str, value: str, *, required: bool = False) -> None:
    if required:
        _required(path, value)
    if len(value) > MAX_TEXT:
        raise InvalidEvent(f"{path} is longer than {MAX_TEXT} characters", field=path)
    if value and not value.isprintable():
        raise InvalidEvent(f"{path} contains control characters", field=path)


def _positive(path: str, value: int) -> None:
    if value <= 0 or value > MAX_QUANTITY:
        raise InvalidEvent(f"{path} must be between 1 and {MAX_QUANTITY}, got {value}", field=path)


def _shipment_created(e: events_pb2.Event) -> None:
    p = e.shipment_created
    _text("event.shipment_created.order_id", p.order_id)
    _text("event.shipment_created.origin", p.origin)
    _text("event.shipment_created.destination", p.destination)


def _shipment_picked(e: events_pb2.Event) -> None:
    _text("event.shipment_picked.warehouse_id", e.shipment_picked.warehouse_id)


def _shipment_packed(e: events_pb2.Event) -> None:
    if e.shipment_packed.package_count > MAX_PACKAGE_COUNT:
        raise InvalidEvent(f"event.shipment_packed.package_count is above {MAX_PACKAGE_COUNT}", field="package_count")


def _shipment_loaded(e: events_pb2.Event) -> None:
    _text("event.shipment_loaded.vehicle_id", e.shipment_loaded.vehicle_id)


def _shipment_shipped(e: events_pb2.Event) -> None:
    _text("event.shipment_shipped.carrier", e.shipment_shipped.carrier, required=True)
    _text("event.shipment_shipped.tracking_number", e.shipment_shipped.tracking_number, required=True)


def _shipment_delivered(e: events_pb2.Event) -> None:
    _text("event.shipment_delivered.received_by", e.shipment_delivered.received_by)


def _shipment_cancelled(e: events_pb2.Event) -> None:
    _text("event.shipment_cancelled.reason", e.shipment_cancelled.reason, required=True)


def _inventory_received(e: events_pb2.Event) -> None:
    _text("event.inventory_received.location", e.inventory_received.location, required=True)
    _positive("event.inventory_received.quantity", e.inventory_received.quantity)


def _inventory_adjusted(e: events_pb2.Event) -> None:
    p = e.inventory_adjusted
    _text("event.inventory_adjusted.location", p.location, required=True)
    _text("event.inventory_adjusted.reason", p.reason, required=True)
    if p.delta == 0 or abs(p.delta) > MAX_QUANTITY:
        raise InvalidEvent(
            f"event.inventory_adjusted.delta must be non-zero and at most {MAX_QUANTITY} in size", field="delta"
        )


def _inventory_reserved(e: events_pb2.Event) -> None:
    p = e.inventory_reserved
    _text("event.inventory_reserved.location", p.location, required=True)
    _text("event.inventory_reserved.reservation_id", p.reservation_id, required=True)
    _positive("event.inventory_reserved.quantity", p.quantity)


def _inventory_released(e: events_pb2.Event) -> None:
    _text("event.inventory_released.reservation_id", e.inventory_released.reservation_id, required=True)


def _inventory_moved(e: events_pb2.Event) -> None:
    p = e.inventory_moved
    _text("event.inventory_moved.from_location", p.from_location, required=True)
    _text("event.inventory_moved.to_location", p.to_location, required=True)
    _positive("event.inventory_moved.quantity", p.quantity)
    if p.from_location == p.to_location:
        raise InvalidEvent("event.inventory_moved: from_location and to_location are the same", field="to_location")


# payload kind -> (the entity type it belongs to, its field rules)
RULES: dict[str, tuple[int, Callable[[events_pb2.Event], None]]] = {
    "shipment_created": (SHIPMENT, _shipment_created),
    "shipment_picked": (SHIPMENT, _shipment_picked),
    "shipment_packed": (SHIPMENT, _shipment_packed),
    "shipment_loaded": (SHIPMENT, _shipment_loaded),
    "shipment_shipped": (SHIPMENT, _shipment_shipped),
    "shipment_delivered": (SHIPMENT, _shipment_delivered),
    "shipment_cancelled": (SHIPMENT, _shipment_cancelled),
    "inventory_received": (INVENTORY, _inventory_received),
    "inventory_adjusted": (INVENTORY, _inventory_adjusted),
    "inventory_reserved": (INVENTORY, _inventory_reserved),
    "inventory_released": (INVENTORY, _inventory_released),
    "inventory_moved": (INVENTORY, _inventory_moved),
}


def validate_entity(entity_type: int, entity_id: str, prefix: str = "event") -> None:
    if entity_type not in (SHIPMENT, INVENTORY):
        raise InvalidEvent(f"{prefix}.entity_type must be SHIPMENT or INVENTORY_ITEM", field="entity_type")
    if not ENTITY_ID_PATTERN.fullmatch(entity_id):
        raise InvalidEvent(
            f"{prefix}.entity_id must be 1-{MAX_ENTITY_ID} characters of letters, digits and . _ : / # @ + -",
            field="entity_id",
        )


def validate_sequence(sequence: int, path: str = "event.sequence") -> None:
    if sequence < 1 or sequence > MAX_SEQUENCE:
        raise InvalidEvent(f"{path} must be between 1 and {MAX_SEQUENCE}", field="sequence")


def validate_event(event: events_pb2.Event, *, present: bool = True) -> None:
    """Raises InvalidEvent naming the first problem; returns when the event may be accepted."""
    if not present:
        raise InvalidEvent("event is required", field="event")
    validate_entity(event.entity_type, event.entity_id)
    validate_sequence(event.sequence)
    _text("event.source", event.source)
    if event.HasField("occurred_at") and not (0 <= event.occurred_at.nanos < 1_000_000_000):
        raise InvalidEvent("event.occurred_at is not a valid timestamp", field="occurred_at")
    kind = event.WhichOneof("payload")
    if kind is None:
        raise InvalidEvent("event.payload is required (one of the event kinds)", field="payload")
    entity_type, check = RULES[kind]
    if entity_type != event.entity_type:
        raise InvalidEvent(
            f"event kind {kind} does not belong to entity type {events_pb2.EntityType.Name(event.entity_type)}",
            field="payload",
        )
    check(event)
