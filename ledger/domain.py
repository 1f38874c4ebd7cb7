"""The ledger's business rules, pure: no I/O, no protobuf, no clock.

A rule either produces the entity's next state or a `Rejection` (reason code + detail). A
rejection is an outcome, not an error: the service records it and the MSI is consumed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from common.limits import MAX_QUANTITY
from ledger.errors import InvalidEvent

# MAX_QUANTITY (common.limits) bounds a quantity or delta of one event: the ledger never trusts
# the sequencer's checks, and both check the same numbers.

# Largest balance a location may hold: far from BIGINT overflow, so arithmetic never wraps.
MAX_BALANCE: Final = 1 << 62


class Outcome(enum.IntEnum):
    """Same numbers as logistics.ledger.v1.ApplyOutcome (stored in the history)."""

    APPLIED = 1
    REJECTED = 2
    DUPLICATE = 3
    SKIPPED = 4


class Reason:
    """Rejection reason codes (ErrorInfo-style UPPER_SNAKE_CASE), part of the public contract."""

    ILLEGAL_TRANSITION: Final = "ILLEGAL_TRANSITION"
    INSUFFICIENT_STOCK: Final = "INSUFFICIENT_STOCK"
    RESERVATION_EXISTS: Final = "RESERVATION_EXISTS"
    UNKNOWN_RESERVATION: Final = "UNKNOWN_RESERVATION"
    SAME_LOCATION: Final = "SAME_LOCATION"
    BALANCE_LIMIT: Final = "BALANCE_LIMIT"


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


# --------------------------------------------------------------------------------------------
# Shipments


class ShipmentStatus(enum.IntEnum):
    """Same numbers as logistics.ledger.v1.ShipmentStatus (stored in shipments.status)."""

    CREATED = 1
    PICKED = 2
    PACKED = 3
    LOADED = 4
    SHIPPED = 5
    DELIVERED = 6
    CANCELLED = 7

    @property
    def label(self) -> str:
        return f"SHIPMENT_STATUS_{self.name}"


S = ShipmentStatus

SHIPMENT_KINDS: Final = (
    "shipment_created",
    "shipment_picked",
    "shipment_packed",
    "shipment_loaded",
    "shipment_shipped",
    "shipment_delivered",
    "shipment_cancelled",
)
INVENTORY_KINDS: Final = (
    "inventory_received",
    "inventory_adjusted",
    "inventory_reserved",
    "inventory_released",
    "inventory_moved",
)

# The whole shipment state machine: (current status, or None before the first event, event kind)
# -> next status. A pair that is not here is an illegal transition. PACKED is optional
# (PICKED -> LOADED); CANCELLED is reachable from every state before SHIPPED.
TRANSITIONS: Final[Mapping[tuple[ShipmentStatus | None, str], ShipmentStatus]] = MappingProxyType(
    {
        (None, "shipment_created"): S.CREATED,
        (None, "shipment_picked"): S.PICKED,
        (S.CREATED, "shipment_picked"): S.PICKED,
        (S.CREATED, "shipment_cancelled"): S.CANCELLED,
        (S.PICKED, "shipment_packed"): S.PACKED,
        (S.PICKED, "shipment_loaded"): S.LOADED,
        (S.PICKED, "shipment_cancelled"): S.CANCELLED,
        (S.PACKED, "shipment_loaded"): S.LOADED,
        (S.PACKED, "shipment_cancelled"): S.CANCELLED,
        (S.LOADED, "shipment_shipped"): S.SHIPPED,
        (S.LOADED, "shipment_cancelled"): S.CANCELLED,
        (S.SHIPPED, "shipment_delivered"): S.DELIVERED,
    }
)


def next_status(current: ShipmentStatus | None, kind: str) -> ShipmentStatus | Rejection:
    """Looks the transition up in TRANSITIONS; anything else is ILLEGAL_TRANSITION."""
    to = TRANSITIONS.get((current, kind))
    if to is None:
        origin = current.label if current is not None else "(no shipment)"
        return Rejection(Reason.ILLEGAL_TRANSITION, f"{origin} -> {kind}")
    return to


@dataclass(frozen=True)
class Shipment:
    shipment_id: str
    status: ShipmentStatus
    created_at: dt.datetime
    updated_at: dt.datetime
    order_id: str = ""
    origin: str = ""
    destination: str = ""
    warehouse_id: str = ""
    package_count: int = 0
    vehicle_id: str = ""
    carrier: str = ""
    tracking_number: str = ""
    delivered_at: dt.datetime | None = None
    received_by: str = ""
    cancel_reason: str = ""


SHIPMENT_DATA_FIELDS: Final = frozenset(
    f.name for f in dataclasses.fields(Shipment) if f.name not in {"shipment_id", "status", "created_at", "updated_at"}
)


@dataclass(frozen=True)
class ShipmentEvent:
    """One shipment event: its kind and the fields it sets (names of Shipment fields)."""

    kind: str
    changes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.changes) - SHIPMENT_DATA_FIELDS
        if self.kind not in SHIPMENT_KINDS or unknown:
            raise ValueError(f"not a shipment event: {self.kind} {sorted(unknown)}")


def apply_shipment(
    shipment_id: str, current: Shipment | None, event: ShipmentEvent, at: dt.datetime
) -> Shipment | Rejection:
    """The shipment after `event`, or why it cannot happen (state then stays as it was)."""
    status = next_status(current.status if current is not None else None, event.kind)
    if isinstance(status, Rejection):
        return status
    base = current if current is not None else Shipment(shipment_id, status, created_at=at, updated_at=at)
    return dataclasses.replace(base, status=status, updated_at=at, **event.changes)


# --------------------------------------------------------------------------------------------
# Inventory


@dataclass(frozen=True)
class Balance:
    on_hand: int = 0
    reserved: int = 0

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    def is_valid(self) -> bool:
        return 0 <= self.reserved <= self.on_hand <= MAX_BALANCE


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    location: str
    quantity: int
    released: bool = False


@dataclass(frozen=True)
class Receive:
    location: str
    quantity: int


@dataclass(frozen=True)
class Adjust:
    location: str
    delta: int
    reason: str


@dataclass(frozen=True)
class Reserve:
    location: str
    quantity: int
    reservation_id: str


@dataclass(frozen=True)
class Release:
    reservation_id: str


@dataclass(frozen=True)
class Move:
    from_location: str
    to_location: str
    quantity: int


InventoryCommand = Receive | Adjust | Reserve | Release | Move


def _require_quantity(name: str, value: int, *, signed: bool = False) -> None:
    if signed:
        if value == 0 or abs(value) > MAX_QUANTITY:
            raise InvalidEvent(f"{name} must be non-zero with |{name}| <= {MAX_QUANTITY}", field=name)
    elif not 0 < value <= MAX_QUANTITY:
        raise InvalidEvent(f"{name} must be in [1, {MAX_QUANTITY}]", field=name)


def _require_text(name: str, value: str) -> None:
    if not value.strip():
        raise InvalidEvent(f"{name} is required", field=name)


def validate_inventory(command: InventoryCommand) -> None:
    """Refuses malformed commands (INVALID_EVENT) before any state is read."""
    match command:
        case Receive(location, quantity):
            _require_text("location", location)
            _require_quantity("quantity", quantity)
        case Adjust(location, delta, reason):
            _require_text("location", location)
            _require_quantity("delta", delta, signed=True)
            _require_text("reason", reason)
        case Reserve(location, quantity, reservation_id):
            _require_text("location", location)
            _require_quantity("quantity", quantity)
            _require_text("reservation_id", reservation_id)
        case Release(reservation_id):
            _require_text("reservation_id", reservation_id)
        case Move(from_location, to_location, quantity):
            _require_text("from_location", from_location)
            _require_text("to_location", to_location)
            _require_quantity("quantity", quantity)


@dataclass(frozen=True)
class InventoryState:
    """An item's balances and reservations; possibly only the part a command touches."""

    balances: Mapping[str, Balance] = field(default_factory=dict)
    reservations: Mapping[str, Reservation] = field(default_factory=dict)

    def balance(self, location: str) -> Balance:
        return self.balances.get(location, Balance())


@dataclass(frozen=True)
class InventoryEffect:
    """What an applied command changes: new balances of the touched locations, and the
    reservation it opened or released (its new value)."""

    balances: Mapping[str, Balance]
    reservation: Reservation | None = None


def _insufficient(location: str, needed: int, balance: Balance) -> Rejection:
    return Rejection(
        Reason.INSUFFICIENT_STOCK,
        f"{location}: needs {needed} available, has {balance.available} "
        f"(on_hand {balance.on_hand}, reserved {balance.reserved})",
    )


def _too_much(location: str) -> Rejection:
    return Rejection(Reason.BALANCE_LIMIT, f"{location}: on_hand would exceed {MAX_BALANCE}")


def decide_inventory(state: InventoryState, command: InventoryCommand) -> InventoryEffect | Rejection:
    """The effect of a valid command, or why it would break an invariant (on_hand >= 0,
    0 <= reserved <= on_hand) or a reservation rule."""
    match command:
        case Receive(location, quantity):
            b = state.balance(location)
            if b.on_hand + quantity > MAX_BALANCE:
                return _too_much(location)
            return InventoryEffect({location: Balance(b.on_hand + quantity, b.reserved)})
        case Adjust(location, delta, _):
            b = state.balance(location)
            if delta < 0 and b.available < -delta:
                return _insufficient(location, -delta, b)
            if b.on_hand + delta > MAX_BALANCE:
                return _too_much(location)
            return InventoryEffect({location: Balance(b.on_hand + delta, b.reserved)})
        case Reserve(location, quantity, reservation_id):
            if reservation_id in state.reservations:
                return Rejection(Reason.RESERVATION_EXISTS, f"reservation {reservation_id!r} already exists")
            b = state.balance(location)
            if b.available < quantity:
                return _insufficient(location, quantity, b)
            return InventoryEffect(
                {location: Balance(b.on_hand, b.reserved + quantity)},
                Reservation(reservation_id, location, quantity),
            )
        case Release(reservation_id):
            r = state.reservations.get(reservation_id)
            if r is None or r.released:
                state_name = "unknown" if r is None else "already released"
                return Rejection(Reason.UNKNOWN_RESERVATION, f"reservation {reservation_id!r} is {state_name}")
            b = state.balance(r.location)
            return InventoryEffect(
                {r.location: Balance(b.on_hand, b.reserved - r.quantity)},
                dataclasses.replace(r, released=True),
            )
        case Move(from_location, to_location, quantity):
            if from_location == to_location:
                return Rejection(Reason.SAME_LOCATION, f"cannot move from {from_location} to itself")
            src, dst = state.balance(from_location), state.balance(to_location)
            if src.available < quantity:
                return _insufficient(from_location, quantity, src)
            if dst.on_hand + quantity > MAX_BALANCE:
                return _too_much(to_location)
            return InventoryEffect(
                {
                    from_location: Balance(src.on_hand - quantity, src.reserved),
                    to_location: Balance(dst.on_hand + quantity, dst.reserved),
                }
            )
    raise TypeError(f"not an inventory command: {command!r}")  # pragma: no cover


def apply_effect(state: InventoryState, effect: InventoryEffect) -> InventoryState:
    """The state after an effect; what the repository writes, as a pure function."""
    reservations = dict(state.reservations)
    if effect.reservation is not None:
        reservations[effect.reservation.reservation_id] = effect.reservation
    return InventoryState({**state.balances, **effect.balances}, reservations)


def touched(command: InventoryCommand) -> tuple[tuple[str, ...], str | None]:
    """The locations and the reservation id a command reads, so only those rows are loaded."""
    match command:
        case Receive(location, _) | Adjust(location, _, _):
            return (location,), None
        case Reserve(location, _, reservation_id):
            return (location,), reservation_id
        case Release(reservation_id):
            return (), reservation_id
        case Move(from_location, to_location, _):
            return (from_location, to_location), None
    raise TypeError(f"not an inventory command: {command!r}")  # pragma: no cover
