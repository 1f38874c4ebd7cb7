"""The ledger's statements: read and write rows, nothing else (no commits, no side effects).

Every function takes the caller's connection, so the service decides what one transaction is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import RowMapping, and_, func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.errors import Retryable
from ledger import domain, queries
from ledger.models import entity_history, entity_versions, inventory_balances, inventory_reservations, shipments

SHIPMENT = 1
INVENTORY_ITEM = 2

lock_entity = queries.lock_entity
lock_entities = queries.lock_entities


@dataclass(frozen=True)
class HistoryRecord:
    """One processed MSI of an entity, as kept in the history."""

    entity_type: int
    entity_id: str
    sequence: int
    kind: str
    outcome: domain.Outcome
    reason: str
    reason_detail: str
    correlation_id: str
    transaction_id: str
    source: str
    occurred_at: dt.datetime | None
    processed_at: dt.datetime
    payload_hash: bytes


@dataclass(frozen=True)
class InventoryView:
    sku: str
    version: int
    balances: Sequence[tuple[str, domain.Balance]]
    reservations: Sequence[domain.Reservation]
    updated_at: dt.datetime | None


def _entity(table_type: int, entity_id: str) -> dict[str, object]:
    return {"entity_type": table_type, "entity_id": entity_id}


async def get_version(conn: AsyncConnection, entity_type: int, entity_id: str) -> int:
    """The entity's version (last MSI processed); 0 for an entity never seen."""
    version = await conn.scalar(
        select(entity_versions.c.version).where(
            entity_versions.c.entity_type == entity_type, entity_versions.c.entity_id == entity_id
        )
    )
    return int(version or 0)


@dataclass(frozen=True)
class EntityHead:
    """What an event is checked against: the entity's version and, if this MSI was processed
    already, its history row."""

    version: int
    previous: HistoryRecord | None


def _record(m: RowMapping, entity_type: int, entity_id: str, sequence: int) -> HistoryRecord:
    """A history row (alone, or joined into a head read) as a HistoryRecord."""
    return HistoryRecord(
        entity_type=entity_type,
        entity_id=entity_id,
        sequence=sequence,
        kind=m["kind"],
        outcome=domain.Outcome(m["outcome"]),
        reason=m["reason"],
        reason_detail=m["reason_detail"],
        correlation_id=m["correlation_id"],
        transaction_id=m["transaction_id"],
        source=m["source"],
        occurred_at=m["occurred_at"],
        processed_at=m["processed_at"],
        payload_hash=bytes(m["payload_hash"]),
    )


def _head(m: RowMapping, entity_type: int, entity_id: str) -> EntityHead:
    processed = m["processed_sequence"]
    previous = None if processed is None else _record(m, entity_type, entity_id, processed)
    return EntityHead(int(m["version"]), previous)


async def load_head(conn: AsyncConnection, entity_type: int, entity_id: str, sequence: int) -> EntityHead:
    """The version and this MSI's history row; run after the entity lock, never within it."""
    row = (await conn.execute(queries.LOAD_HEAD, {**_entity(entity_type, entity_id), "sequence": sequence})).one()
    return _head(row._mapping, entity_type, entity_id)


@dataclass(frozen=True)
class StateWrite:
    """A write of the new state, made in the statement that moves the version (named SQL of
    queries.py and its parameters)."""

    sql: str
    params: dict[str, Any]


async def record_event(
    conn: AsyncConnection, expected: int, record: HistoryRecord, writes: Sequence[StateWrite] = ()
) -> None:
    """Writes the new state, moves the version from `expected` to the record's MSI and appends
    the record, in one statement that fails as a whole unless the compare-and-set matches."""
    params: dict[str, Any] = {
        "entity_type": record.entity_type,
        "entity_id": record.entity_id,
        "sequence": record.sequence,
        "expected": expected,
        "kind": record.kind,
        "outcome": int(record.outcome),
        "reason": record.reason,
        "reason_detail": record.reason_detail,
        "correlation_id": record.correlation_id,
        "transaction_id": record.transaction_id,
        "source": record.source,
        "occurred_at": record.occurred_at,
        "processed_at": record.processed_at,
        "payload_hash": record.payload_hash,
    }
    for write in writes:
        params.update(write.params)
    statement = queries.record_event(tuple(write.sql for write in writes))
    if (await conn.execute(statement, params)).first() is None:
        # Only possible if something wrote the entity without its lock: the state writes roll
        # back with the transaction and the caller re-sends (UNAVAILABLE, reason TRANSIENT).
        raise Retryable("entity version moved concurrently", entity_id=record.entity_id)


def _history_record(row: object) -> HistoryRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return _record(m, m["entity_type"], m["entity_id"], m["sequence"])


async def list_history(
    conn: AsyncConnection, entity_type: int, entity_id: str, after: int, limit: int
) -> list[HistoryRecord]:
    """Up to `limit` entries with sequence > `after`, oldest first (keyset pagination)."""
    h = entity_history.c
    rows = await conn.execute(
        select(entity_history)
        .where(h.entity_type == entity_type, h.entity_id == entity_id, h.sequence > after)
        .order_by(h.sequence)
        .limit(limit)
    )
    return [_history_record(row) for row in rows]


async def has_history(conn: AsyncConnection, entity_type: int, entity_id: str) -> bool:
    h = entity_history.c
    found = await conn.scalar(select(literal(1)).where(h.entity_type == entity_type, h.entity_id == entity_id).limit(1))
    return found is not None


# --- shipments -------------------------------------------------------------------------------


_SHIPMENT_FIELDS: Final = tuple(c.name for c in shipments.c)


def _shipment(m: RowMapping) -> domain.Shipment:
    values = {name: m[name] for name in _SHIPMENT_FIELDS}
    values["status"] = domain.ShipmentStatus(values["status"])
    return domain.Shipment(**values)


async def load_shipment_head(
    conn: AsyncConnection, shipment_id: str, sequence: int
) -> tuple[EntityHead, domain.Shipment | None]:
    """The head and the shipment (None before its first event), in one read after the lock."""
    row = (
        await conn.execute(queries.LOAD_SHIPMENT_HEAD, {**_entity(SHIPMENT, shipment_id), "sequence": sequence})
    ).one()
    m = row._mapping
    return _head(m, SHIPMENT, shipment_id), None if m["shipment_id"] is None else _shipment(m)


def shipment_write(shipment: domain.Shipment) -> StateWrite:
    """Every field is written; the key and the creation time never change."""
    return StateWrite(queries.SAVE_SHIPMENT, {**shipment.__dict__, "status": int(shipment.status)})


async def get_shipment_view(conn: AsyncConnection, shipment_id: str) -> tuple[domain.Shipment, int] | None:
    """The shipment and its version (which also counts rejected and skipped MSIs)."""
    v = entity_versions.c
    row = (
        await conn.execute(
            select(shipments, func.coalesce(v.version, 0).label("version"))
            .select_from(
                shipments.outerjoin(
                    entity_versions,
                    and_(v.entity_type == SHIPMENT, v.entity_id == shipments.c.shipment_id),
                )
            )
            .where(shipments.c.shipment_id == shipment_id)
        )
    ).first()
    if row is None:
        return None
    return _shipment(row._mapping), int(row._mapping["version"])


# --- inventory -------------------------------------------------------------------------------


async def load_inventory_head(
    conn: AsyncConnection, sku: str, sequence: int, locations: Sequence[str], reservation_id: str | None
) -> tuple[EntityHead, domain.InventoryState]:
    """The head and the part of the item a command touches: those locations and that
    reservation (and, for a release, the reservation's location), in one read after the lock."""
    rows = (
        await conn.execute(
            queries.LOAD_INVENTORY_HEAD,
            {
                **_entity(INVENTORY_ITEM, sku),
                "sequence": sequence,
                "locations": list(locations),
                "reservation_id": reservation_id,
            },
        )
    ).all()
    first = rows[0]._mapping
    reservations: dict[str, domain.Reservation] = {}
    if reservation_id is not None and first["reservation_location"] is not None:
        reservations[reservation_id] = domain.Reservation(
            reservation_id,
            first["reservation_location"],
            first["reservation_quantity"],
            released=first["reservation_released"],
        )
    balances = {row.location: domain.Balance(row.on_hand, row.reserved) for row in rows if row.location is not None}
    return _head(first, INVENTORY_ITEM, sku), domain.InventoryState(balances, reservations)


def inventory_writes(sku: str, effect: domain.InventoryEffect, at: dt.datetime) -> list[StateWrite]:
    """The new values of the touched rows (computed under the entity lock)."""
    writes: list[StateWrite] = []
    if effect.balances:
        touched = sorted(effect.balances.items())
        params = {
            "sku": sku,
            "updated_at": at,
            "locations": [loc for loc, _ in touched],
            "on_hand": [b.on_hand for _, b in touched],
            "reserved": [b.reserved for _, b in touched],
        }
        writes.append(StateWrite(queries.SAVE_BALANCES, params))
    r = effect.reservation
    if r is None:
        return writes
    if r.released:
        writes.append(
            StateWrite(queries.RELEASE_RESERVATION, {"sku": sku, "reservation_id": r.reservation_id, "at": at})
        )
    else:
        params = {
            "sku": sku,
            "reservation_id": r.reservation_id,
            "location": r.location,
            "quantity": r.quantity,
            "at": at,
        }
        writes.append(StateWrite(queries.OPEN_RESERVATION, params))
    return writes


async def get_inventory_view(conn: AsyncConnection, sku: str, location: str | None) -> InventoryView | None:
    """Balances (by location, byte order) and open reservations; None for a SKU never seen."""
    version = await get_version(conn, INVENTORY_ITEM, sku)
    if version == 0:
        return None
    b = inventory_balances.c
    query = select(b.location, b.on_hand, b.reserved, b.updated_at).where(b.sku == sku)
    if location is not None:
        query = query.where(b.location == location)
    rows = list(await conn.execute(query.order_by(b.location.collate("C"))))
    balances = [(row.location, domain.Balance(row.on_hand, row.reserved)) for row in rows]
    if location is not None and not balances:
        balances = [(location, domain.Balance())]
    r = inventory_reservations.c
    rquery = select(r.reservation_id, r.location, r.quantity).where(r.sku == sku, r.released_at.is_(None))
    if location is not None:
        rquery = rquery.where(r.location == location)
    reservations = [
        domain.Reservation(row.reservation_id, row.location, row.quantity)
        for row in await conn.execute(rquery.order_by(r.reservation_id.collate("C")))
    ]
    updated = [row.updated_at for row in rows]
    return InventoryView(sku, version, balances, reservations, max(updated) if updated else None)
