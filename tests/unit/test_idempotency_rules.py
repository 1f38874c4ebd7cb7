"""Pure rules of keys and event validation: no database, no network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import errors
from sequencer.idempotency import KEY_PATTERN, differing_fields, fingerprint, resolve_caller, resolve_key
from sequencer.validation import RULES, validate_event
from tests.support import inventory_event, shipment_event

KEY_ALPHABET = "ABCxyz019._:~@/+=-"


@given(st.text(alphabet=KEY_ALPHABET, min_size=1, max_size=255))
def test_keys_of_the_documented_charset_are_accepted(key: str) -> None:
    assert resolve_key([key], "") == key
    assert resolve_key([], key) == key
    assert resolve_key([key], key) == key


@given(st.text(min_size=1, max_size=300).filter(lambda k: not KEY_PATTERN.fullmatch(k)))
def test_keys_outside_the_charset_or_too_long_are_invalid(key: str) -> None:
    with pytest.raises(errors.IdempotencyKeyInvalid):
        resolve_key([key], "")


def test_missing_and_conflicting_keys() -> None:
    with pytest.raises(errors.IdempotencyKeyMissing):
        resolve_key([], "")
    with pytest.raises(errors.IdempotencyKeyInvalid):
        resolve_key(["a"], "b")
    with pytest.raises(errors.IdempotencyKeyInvalid):
        resolve_key(["a", "b"], "")


def test_caller_defaults_and_validation() -> None:
    assert resolve_caller([]) == "default"
    assert resolve_caller(["wms-1"]) == "wms-1"
    with pytest.raises(errors.IdempotencyKeyInvalid):
        resolve_caller(["bad caller"])


def test_fingerprint_ignores_nothing_but_is_deterministic() -> None:
    a = sequencer_pb2.SubmitEventRequest(event=shipment_event("S", 1, "shipment_created"))
    b = sequencer_pb2.SubmitEventRequest()
    b.ParseFromString(a.SerializeToString())
    assert fingerprint(a) == fingerprint(b)
    c = sequencer_pb2.SubmitEventRequest(event=shipment_event("S", 1, "shipment_created", origin="X"))
    assert fingerprint(a) != fingerprint(c)
    assert differing_fields(a, c) == ["event.shipment_created.origin"]
    d = sequencer_pb2.SubmitEventRequest(event=shipment_event("S", 2, "shipment_picked"))
    assert set(differing_fields(a, d)) == {"event.sequence", "event.shipment_created", "event.shipment_picked"}


def test_every_payload_kind_has_a_rule() -> None:
    kinds = {f.name for f in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields}
    assert kinds == set(RULES)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (events_pb2.Event(entity_id="X", sequence=1), "entity_type"),
        (shipment_event("", 1, "shipment_created"), "entity_id"),
        (shipment_event("has space", 1, "shipment_created"), "entity_id"),
        (shipment_event("x" * 129, 1, "shipment_created"), "entity_id"),
        (shipment_event("S", 0, "shipment_created"), "sequence"),
        (events_pb2.Event(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="S", sequence=1), "payload"),
        (
            inventory_event("S", 1, "inventory_received", location="A", quantity=1).__class__(
                entity_type=events_pb2.ENTITY_TYPE_SHIPMENT,
                entity_id="S",
                sequence=1,
                inventory_received=events_pb2.InventoryReceived(location="A", quantity=1),
            ),
            "payload",
        ),
        (shipment_event("S", 1, "shipment_shipped", carrier=""), "event.shipment_shipped.carrier"),
        (shipment_event("S", 1, "shipment_cancelled", reason=""), "event.shipment_cancelled.reason"),
        (inventory_event("K", 1, "inventory_received", location="A", quantity=0), "event.inventory_received.quantity"),
        (inventory_event("K", 1, "inventory_received", location="A", quantity=-5), "event.inventory_received.quantity"),
        (
            inventory_event("K", 1, "inventory_received", location="A", quantity=10**12),
            "event.inventory_received.quantity",
        ),
        (inventory_event("K", 1, "inventory_received", location="", quantity=1), "event.inventory_received.location"),
        (inventory_event("K", 1, "inventory_adjusted", location="A", delta=0, reason="x"), "delta"),
        (
            inventory_event("K", 1, "inventory_adjusted", location="A", delta=5, reason=""),
            "event.inventory_adjusted.reason",
        ),
        (
            inventory_event("K", 1, "inventory_reserved", location="A", quantity=1),
            "event.inventory_reserved.reservation_id",
        ),
        (inventory_event("K", 1, "inventory_released"), "event.inventory_released.reservation_id"),
        (inventory_event("K", 1, "inventory_moved", from_location="A", to_location="A", quantity=1), "to_location"),
    ],
)
def test_invalid_events_name_the_field(event: events_pb2.Event, field: str) -> None:
    with pytest.raises(errors.InvalidEvent) as caught:
        validate_event(event)
    assert caught.value.metadata["field"] == field


def test_valid_events_pass() -> None:
    validate_event(shipment_event("SHP-1", 1, "shipment_created"))
    validate_event(inventory_event("SKU-1", 1, "inventory_adjusted", location="A", delta=-3, reason="count"))
    validate_event(inventory_event("SKU-1", 2, "inventory_moved", from_location="A", to_location="B", quantity=3))
