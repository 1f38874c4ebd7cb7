"""The shipment state machine, pair by pair, against a table written from SPEC section 6."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from ledger import domain
from ledger.domain import Reason, Rejection, ShipmentEvent, ShipmentStatus
from logistics.events.v1 import events_pb2

S = ShipmentStatus
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(hours=1)

# Written independently of ledger.domain.TRANSITIONS: the legal moves, everything else illegal.
LEGAL: dict[tuple[ShipmentStatus | None, str], ShipmentStatus] = {
    (None, "shipment_created"): S.CREATED,
    (None, "shipment_picked"): S.PICKED,
    (S.CREATED, "shipment_picked"): S.PICKED,
    (S.PICKED, "shipment_packed"): S.PACKED,
    (S.PICKED, "shipment_loaded"): S.LOADED,  # PACKED is optional
    (S.PACKED, "shipment_loaded"): S.LOADED,
    (S.LOADED, "shipment_shipped"): S.SHIPPED,
    (S.SHIPPED, "shipment_delivered"): S.DELIVERED,
    **{(state, "shipment_cancelled"): S.CANCELLED for state in (S.CREATED, S.PICKED, S.PACKED, S.LOADED)},
}

STATES: list[ShipmentStatus | None] = [None, *ShipmentStatus]
# Every shipment event of the contract (the Event payload oneof), independent of the domain code.
KINDS = [f.name for f in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields if f.name.startswith("shipment_")]
PAIRS = list(itertools.product(STATES, KINDS))


def _name(state: ShipmentStatus | None) -> str:
    return "none" if state is None else state.name


def test_every_kind_of_the_proto_is_covered() -> None:
    assert sorted(domain.SHIPMENT_KINDS) == sorted(KINDS)
    assert len(PAIRS) == 8 * 7


@pytest.mark.parametrize(("state", "kind"), PAIRS, ids=[f"{_name(s)}-{k}" for s, k in PAIRS])
def test_transition(state: ShipmentStatus | None, kind: str) -> None:
    result = domain.next_status(state, kind)
    if (state, kind) in LEGAL:
        assert result == LEGAL[(state, kind)]
    else:
        assert isinstance(result, Rejection)
        assert result.reason == Reason.ILLEGAL_TRANSITION
        origin = "(no shipment)" if state is None else f"SHIPMENT_STATUS_{state.name}"
        assert result.detail == f"{origin} -> {kind}"


def test_the_table_allows_nothing_beyond_the_spec() -> None:
    assert dict(domain.TRANSITIONS) == LEGAL


@pytest.mark.parametrize(("state", "kind"), PAIRS, ids=[f"{_name(s)}-{k}" for s, k in PAIRS])
def test_apply_shipment_changes_state_only_when_legal(state: ShipmentStatus | None, kind: str) -> None:
    current = None if state is None else domain.Shipment("S1", state, created_at=T0, updated_at=T0, order_id="O1")
    result = domain.apply_shipment("S1", current, ShipmentEvent(kind), T1)
    if (state, kind) in LEGAL:
        assert isinstance(result, domain.Shipment)
        assert result.status == LEGAL[(state, kind)]
        assert result.updated_at == T1
        assert result.created_at == (T1 if current is None else T0)
        assert result.order_id == ("" if current is None else "O1")
    else:
        assert isinstance(result, Rejection)


def test_a_full_lifecycle_keeps_every_field() -> None:
    events = [
        ShipmentEvent("shipment_created", {"order_id": "O1", "origin": "AMS", "destination": "BER"}),
        ShipmentEvent("shipment_picked", {"warehouse_id": "W1"}),
        ShipmentEvent("shipment_packed", {"package_count": 3}),
        ShipmentEvent("shipment_loaded", {"vehicle_id": "V9"}),
        ShipmentEvent("shipment_shipped", {"carrier": "DHL", "tracking_number": "TN1"}),
        ShipmentEvent("shipment_delivered", {"delivered_at": T1, "received_by": "Ann"}),
    ]
    shipment: domain.Shipment | None = None
    for event in events:
        result = domain.apply_shipment("S1", shipment, event, T0)
        assert isinstance(result, domain.Shipment)
        shipment = result
    assert shipment is not None
    assert (shipment.status, shipment.order_id, shipment.origin, shipment.destination) == (
        S.DELIVERED,
        "O1",
        "AMS",
        "BER",
    )
    assert (shipment.warehouse_id, shipment.package_count, shipment.vehicle_id) == ("W1", 3, "V9")
    assert (shipment.carrier, shipment.tracking_number, shipment.delivered_at, shipment.received_by) == (
        "DHL",
        "TN1",
        T1,
        "Ann",
    )


def test_an_event_cannot_set_fields_outside_the_shipment() -> None:
    with pytest.raises(ValueError):
        ShipmentEvent("shipment_created", {"status": S.DELIVERED})
    with pytest.raises(ValueError):
        ShipmentEvent("inventory_received")
