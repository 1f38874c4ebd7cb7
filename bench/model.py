"""Event streams for the workloads and the in-order model the audit compares the ledger with.

An event is described by a small JSON-able spec; `to_event` turns it into the protobuf the
producer submits, and `fold_*` replay specs in MSI order in plain Python (no service code), so
the audit checks the services against an independent model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from logistics.events.v1 import events_pb2

SHIPMENT = int(events_pb2.ENTITY_TYPE_SHIPMENT)
INVENTORY = int(events_pb2.ENTITY_TYPE_INVENTORY_ITEM)

# The full shipment chain (PACKED included); a stream of a shipment ends after delivery.
SHIPMENT_CHAIN = (
    "shipment_created",
    "shipment_picked",
    "shipment_packed",
    "shipment_loaded",
    "shipment_shipped",
    "shipment_delivered",
)
# ledger.v1.ShipmentStatus numbers after each step of the chain (CREATED=1 .. DELIVERED=6).
SHIPMENT_STATUS = {kind: number for number, kind in enumerate(SHIPMENT_CHAIN, start=1)}
LOCATIONS = ("A", "B")

Spec = list[Any]


@dataclass
class Stream:
    """One entity's events, generated in MSI order by its one logical producer. The generator
    keeps the in-order state so every event it makes is legal (nothing is rejected)."""

    entity_type: int
    entity_id: str
    rng: random.Random
    specs: list[Spec] = field(default_factory=list)
    on_hand: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.entity_type == SHIPMENT and len(self.specs) >= len(SHIPMENT_CHAIN)

    def next_spec(self) -> tuple[int, Spec]:
        """Makes the next event: (its MSI, its spec)."""
        spec: Spec
        if self.entity_type == SHIPMENT:
            spec = ["ship", SHIPMENT_CHAIN[len(self.specs)]]
        else:
            roll = self.rng.random()
            loc = self.rng.choice(LOCATIONS)
            have = self.on_hand.get(loc, 0)
            if roll < 0.5 or have == 0:
                spec = ["recv", loc, self.rng.randint(1, 100)]
            elif roll < 0.8:
                spec = ["adj", loc, self.rng.randint(-have, 50) or 1]
            else:
                other = LOCATIONS[1 - LOCATIONS.index(loc)]
                spec = ["move", loc, other, self.rng.randint(1, have)]
            _apply_inventory(self.on_hand, spec)
        self.specs.append(spec)
        return len(self.specs), spec

    def event(self, sequence: int) -> events_pb2.Event:
        return to_event(self.entity_type, self.entity_id, sequence, self.specs[sequence - 1])


def to_event(entity_type: int, entity_id: str, sequence: int, spec: Spec) -> events_pb2.Event:
    event = events_pb2.Event(entity_type=entity_type, entity_id=entity_id, sequence=sequence, source="bench")  # type: ignore[arg-type]
    kind = spec[0]
    if kind == "ship":
        step = spec[1]
        if step == "shipment_created":
            event.shipment_created.order_id = f"ORD-{entity_id}"
            event.shipment_created.origin = "AMS"
            event.shipment_created.destination = "BER"
        elif step == "shipment_picked":
            event.shipment_picked.warehouse_id = "WH-1"
        elif step == "shipment_packed":
            event.shipment_packed.package_count = 2
        elif step == "shipment_loaded":
            event.shipment_loaded.vehicle_id = "TRUCK-7"
        elif step == "shipment_shipped":
            event.shipment_shipped.carrier = "DHL"
            event.shipment_shipped.tracking_number = f"TRK-{entity_id}"
        else:
            event.shipment_delivered.received_by = "front desk"
    elif kind == "recv":
        event.inventory_received.location = spec[1]
        event.inventory_received.quantity = spec[2]
    elif kind == "adj":
        event.inventory_adjusted.location = spec[1]
        event.inventory_adjusted.delta = spec[2]
        event.inventory_adjusted.reason = "cycle count"
    elif kind == "move":
        event.inventory_moved.from_location = spec[1]
        event.inventory_moved.to_location = spec[2]
        event.inventory_moved.quantity = spec[3]
    else:
        raise ValueError(f"unknown spec {spec!r}")
    return event


def _apply_inventory(on_hand: dict[str, int], spec: Spec) -> None:
    kind = spec[0]
    if kind in ("recv", "adj"):
        on_hand[spec[1]] = on_hand.get(spec[1], 0) + spec[2]
    elif kind == "move":
        on_hand[spec[1]] = on_hand.get(spec[1], 0) - spec[3]
        on_hand[spec[2]] = on_hand.get(spec[2], 0) + spec[3]
    if any(value < 0 for value in on_hand.values()):
        raise ValueError(f"{spec!r} would make on_hand negative: the model would reject it")


def fold_inventory(specs: list[Spec]) -> dict[str, int]:
    """on_hand per location after applying the specs in order, from nothing."""
    on_hand: dict[str, int] = {}
    for spec in specs:
        _apply_inventory(on_hand, spec)
    return on_hand


def fold_shipment(specs: list[Spec]) -> int:
    """The shipment status number after the chain's prefix `specs`."""
    status = 0
    for position, spec in enumerate(specs):
        if spec[0] != "ship" or spec[1] != SHIPMENT_CHAIN[position]:
            raise ValueError(f"not the shipment chain at MSI {position + 1}: {spec!r}")
        status = SHIPMENT_STATUS[spec[1]]
    return status
