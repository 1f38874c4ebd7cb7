"""One transaction's items decided in request order, in memory, with no I/O.

The service reads every item's head in one statement after the locks (repository.load_heads),
hands the heads to a `Pending`, asks it about each item in request order, and writes what it
collected in one statement (repository.record_events). The exactly-once rules live here
(DUPLICATE with the original outcome, SEQUENCE_CONFLICT, OUT_OF_ORDER, a rejection or a skip
consuming the MSI); the business rules stay in domain.py. Each item sees the effect of the
items before it in the same transaction, exactly as if each were its own ApplyEvent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from ledger import domain, errors
from ledger.domain import Outcome
from ledger.repository import Changes, HeadQuery, HistoryRecord, ItemHead, OpenedReservation, VersionMove


@dataclass(frozen=True)
class ApplyResult:
    outcome: Outcome
    # For DUPLICATE: what the first processing answered.
    original_outcome: Outcome | None
    reason: str
    reason_detail: str
    version: int
    processed_at: dt.datetime


@dataclass(frozen=True)
class ParsedEvent:
    """An ApplyEventRequest checked and translated into domain terms."""

    entity_type: int
    entity_id: str
    sequence: int
    kind: str
    source: str
    occurred_at: dt.datetime | None
    payload_hash: bytes
    skip_reason: str
    shipment: domain.ShipmentEvent | None = None
    inventory: domain.InventoryCommand | None = None


@dataclass(frozen=True)
class Item:
    """One event of a call, with what its history row keeps besides the event."""

    event: ParsedEvent
    correlation_id: str
    transaction_id: str

    @property
    def entity(self) -> tuple[int, str]:
        return (self.event.entity_type, self.event.entity_id)

    def head_query(self) -> HeadQuery:
        """What the item needs read under the lock (for a skip, the head alone)."""
        ev = self.event
        if ev.inventory is None:
            return HeadQuery(ev.entity_type, ev.entity_id, ev.sequence)
        locations, reservation_id = domain.touched(ev.inventory)
        return HeadQuery(ev.entity_type, ev.entity_id, ev.sequence, locations, reservation_id)


@dataclass
class _Entity:
    """An entity's state as the transaction has it so far: read under the lock, then moved by
    each of its items."""

    expected: int
    version: int
    shipment: domain.Shipment | None = None
    inventory: domain.InventoryState = field(default_factory=domain.InventoryState)


@dataclass(frozen=True)
class _Processed:
    payload_hash: bytes
    kind: str
    result: ApplyResult


def _duplicate(outcome: Outcome, reason: str, detail: str, version: int, at: dt.datetime) -> ApplyResult:
    return ApplyResult(Outcome.DUPLICATE, outcome, reason, detail, version, at)


class Pending:
    """The items of one transaction, decided one after another against the heads read under the
    transaction's locks; `changes` is what the transaction then writes."""

    def __init__(self, items: Sequence[Item], heads: Sequence[ItemHead]) -> None:
        self.changes = Changes()
        self._entities: dict[tuple[int, str], _Entity] = {}
        # MSIs processed before the transaction (from the heads) and by it (from `apply`).
        self._before: dict[tuple[int, str, int], HistoryRecord] = {}
        self._now: dict[tuple[int, str, int], _Processed] = {}
        for item, head in zip(items, heads, strict=True):
            entity = self._entities.get(item.entity)
            if entity is None:
                entity = self._entities[item.entity] = _Entity(head.version, head.version, head.shipment)
            if head.balances or head.reservation is not None:
                # Every row read comes from the same snapshot, so the items' reads agree.
                reservations = dict(entity.inventory.reservations)
                if head.reservation is not None:
                    reservations[head.reservation.reservation_id] = head.reservation
                entity.inventory = domain.InventoryState({**entity.inventory.balances, **head.balances}, reservations)
            if head.previous is not None:
                self._before[(*item.entity, item.event.sequence)] = head.previous

    def apply(self, item: Item, now: dt.datetime) -> ApplyResult:
        """The item's result as ApplyEvent would answer it after the items before it; a refusal
        (OUT_OF_ORDER, SEQUENCE_CONFLICT) raises and the transaction must roll back."""
        ev = item.event
        key = (ev.entity_type, ev.entity_id, ev.sequence)
        earlier = self._now.get(key)
        if earlier is not None:
            self._check_same_payload(ev, earlier.payload_hash, earlier.kind)
            first = earlier.result
            return _duplicate(first.outcome, first.reason, first.reason_detail, first.version, first.processed_at)
        previous = self._before.get(key)
        if previous is not None:
            self._check_same_payload(ev, previous.payload_hash, previous.kind)
            return _duplicate(
                previous.outcome, previous.reason, previous.reason_detail, previous.sequence, previous.processed_at
            )
        entity = self._entities[item.entity]
        if ev.sequence != entity.version + 1:
            raise errors.OutOfOrder(
                f"{ev.entity_id} is at version {entity.version}: expected MSI {entity.version + 1}, "
                f"received {ev.sequence}",
                expected_sequence=entity.version + 1,
                received_sequence=ev.sequence,
            )
        rejection: domain.Rejection | None = None
        if ev.skip_reason:
            outcome = Outcome.SKIPPED
        else:
            rejection = self._decide(ev, entity, now)
            outcome = Outcome.APPLIED if rejection is None else Outcome.REJECTED
        reason = rejection.reason if rejection else ""
        detail = rejection.detail if rejection else ev.skip_reason
        # A rejection or a skip consumes the MSI too: the version always moves to it.
        entity.version = ev.sequence
        self.changes.versions[item.entity] = VersionMove(
            ev.entity_type, ev.entity_id, entity.expected, ev.sequence, now
        )
        self.changes.history.append(
            HistoryRecord(
                entity_type=ev.entity_type,
                entity_id=ev.entity_id,
                sequence=ev.sequence,
                kind=ev.kind,
                outcome=outcome,
                reason=reason,
                reason_detail=detail,
                correlation_id=item.correlation_id,
                transaction_id=item.transaction_id,
                source=ev.source,
                occurred_at=ev.occurred_at,
                processed_at=now,
                payload_hash=ev.payload_hash,
            )
        )
        result = ApplyResult(outcome, None, reason, detail, ev.sequence, now)
        self._now[key] = _Processed(ev.payload_hash, ev.kind, result)
        return result

    @staticmethod
    def _check_same_payload(ev: ParsedEvent, payload_hash: bytes, kind: str) -> None:
        # A skip of an MSI processed already changes nothing (the MSI is consumed either way),
        # so it answers the original outcome, like a re-sent event; only an event with another
        # payload is a conflict (a producer bug).
        if ev.skip_reason:
            return
        if payload_hash != ev.payload_hash:
            raise errors.SequenceConflict(
                f"MSI {ev.sequence} of {ev.entity_id} was already processed with a different payload",
                sequence=ev.sequence,
                processed_kind=kind,
            )

    def _decide(self, ev: ParsedEvent, entity: _Entity, now: dt.datetime) -> domain.Rejection | None:
        """Applies the domain rule to the entity's state so far: the rejection if the rule
        refuses, else None, with the new state kept and queued for writing."""
        if ev.shipment is not None:
            shipment = domain.apply_shipment(ev.entity_id, entity.shipment, ev.shipment, now)
            if isinstance(shipment, domain.Rejection):
                return shipment
            entity.shipment = self.changes.shipments[ev.entity_id] = shipment
            return None
        assert ev.inventory is not None
        effect = domain.decide_inventory(entity.inventory, ev.inventory)
        if isinstance(effect, domain.Rejection):
            return effect
        entity.inventory = domain.apply_effect(entity.inventory, effect)
        sku = ev.entity_id
        for location, balance in effect.balances.items():
            self.changes.balances[(sku, location)] = (balance, now)
        r = effect.reservation
        if r is not None:
            key = (sku, r.reservation_id)
            if not r.released:
                self.changes.opened[key] = OpenedReservation(sku, r, now)
            elif key in self.changes.opened:
                # Opened and released by this transaction: one insert with both times.
                opened = self.changes.opened[key]
                self.changes.opened[key] = OpenedReservation(sku, r, opened.created_at, now)
            else:
                self.changes.released[key] = now
        return None
