"""The ledger's statements: read and write rows, nothing else (no commits, no side effects).

Every function takes the caller's connection, so the service decides what one transaction is.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


# --- the write path: one read and one write per transaction -----------------------------------


@dataclass(frozen=True)
class HeadQuery:
    """What one item needs read: its entity, its MSI, and for an inventory command the
    locations and the reservation it touches."""

    entity_type: int
    entity_id: str
    sequence: int
    locations: tuple[str, ...] = ()
    reservation_id: str | None = None


@dataclass(frozen=True)
class ItemHead:
    """What one item is checked against, as read under the locks: its entity's version, the
    history row of its MSI if that was processed already, and the state its rule reads (the
    shipment, or the balances and the reservation that exist among those it touches)."""

    version: int
    previous: HistoryRecord | None
    shipment: domain.Shipment | None = None
    balances: Mapping[str, domain.Balance] = field(default_factory=dict)
    reservation: domain.Reservation | None = None


def _item_head(m: RowMapping, query: HeadQuery) -> ItemHead:
    processed = m["processed_sequence"]
    previous = None if processed is None else _record(m, query.entity_type, query.entity_id, processed)
    if query.entity_type == SHIPMENT:
        return ItemHead(int(m["version"]), previous, None if m["shipment_id"] is None else _shipment(m))
    balances: dict[str, domain.Balance] = {}
    for location, suffix in zip(query.locations, ("1", "2"), strict=False):
        if m[f"on_hand_{suffix}"] is not None:
            balances[location] = domain.Balance(m[f"on_hand_{suffix}"], m[f"reserved_{suffix}"])
    reservation = None
    if query.reservation_id is not None and m["reservation_location"] is not None:
        reservation = domain.Reservation(
            query.reservation_id,
            m["reservation_location"],
            m["reservation_quantity"],
            released=m["reservation_released"],
        )
        if m["reservation_on_hand"] is not None:
            balances[reservation.location] = domain.Balance(m["reservation_on_hand"], m["reservation_reserved"])
    return ItemHead(int(m["version"]), previous, None, balances, reservation)


def _json(rows: list[dict[str, Any]]) -> str:
    """Rows for queries' jsonb record sets; the values are already JSON-ready (ints, strings,
    None, timestamps as ISO 8601 text, bytea as its hex text)."""
    return json.dumps(rows, separators=(",", ":"))


def _ts(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


async def load_heads(conn: AsyncConnection, heads: Sequence[HeadQuery]) -> list[ItemHead]:
    """Every item's head in one read, in item order; run after the locks, never within them."""
    items = [
        {
            "n": n,
            "entity_type": q.entity_type,
            "entity_id": q.entity_id,
            "sequence": q.sequence,
            "location_1": q.locations[0] if q.locations else None,
            "location_2": q.locations[1] if len(q.locations) > 1 else None,
            "reservation_id": q.reservation_id,
        }
        for n, q in enumerate(heads)
    ]
    rows = (await conn.execute(queries.LOAD_HEADS, {"items": _json(items)})).all()
    return [_item_head(row._mapping, query) for row, query in zip(rows, heads, strict=True)]


@dataclass(frozen=True)
class VersionMove:
    """An entity's compare-and-set: from the version read under the lock to its last new MSI."""

    entity_type: int
    entity_id: str
    expected: int
    version: int
    updated_at: dt.datetime


@dataclass(frozen=True)
class OpenedReservation:
    sku: str
    reservation: domain.Reservation
    created_at: dt.datetime
    released_at: dt.datetime | None = None


@dataclass
class Changes:
    """Everything one transaction writes, each row once with its final value (keyed, so a later
    item's write of the same row replaces an earlier one's)."""

    versions: dict[tuple[int, str], VersionMove] = field(default_factory=dict)
    history: list[HistoryRecord] = field(default_factory=list)
    shipments: dict[str, domain.Shipment] = field(default_factory=dict)
    # (sku, location) -> the balance and when it was written.
    balances: dict[tuple[str, str], tuple[domain.Balance, dt.datetime]] = field(default_factory=dict)
    # Reservations the transaction opened, by (sku, reservation id).
    opened: dict[tuple[str, str], OpenedReservation] = field(default_factory=dict)
    # Reservations opened before the transaction that it released: (sku, reservation id) -> when.
    released: dict[tuple[str, str], dt.datetime] = field(default_factory=dict)


def _history_row(r: HistoryRecord) -> dict[str, Any]:
    return {
        "entity_type": r.entity_type,
        "entity_id": r.entity_id,
        "sequence": r.sequence,
        "kind": r.kind,
        "outcome": int(r.outcome),
        "reason": r.reason,
        "reason_detail": r.reason_detail,
        "correlation_id": r.correlation_id,
        "transaction_id": r.transaction_id,
        "source": r.source,
        "occurred_at": _ts(r.occurred_at),
        "processed_at": _ts(r.processed_at),
        "payload_hash": "\\x" + r.payload_hash.hex(),
    }


def _shipment_row(s: domain.Shipment) -> dict[str, Any]:
    row = dict(s.__dict__)
    row["status"] = int(s.status)
    for name in ("created_at", "updated_at", "delivered_at"):
        row[name] = _ts(row[name])
    return row


async def record_events(conn: AsyncConnection, changes: Changes) -> None:
    """Writes every new state, moves every version by compare-and-set and appends every history
    row, in one statement; raises Retryable (the transaction rolls back) unless every
    compare-and-set matched."""
    if not changes.versions:
        return  # duplicates only: nothing to write
    moves = [
        {
            "entity_type": m.entity_type,
            "entity_id": m.entity_id,
            "expected": m.expected,
            "version": m.version,
            "updated_at": _ts(m.updated_at),
        }
        for m in changes.versions.values()
    ]
    params = {"moves": _json(moves), "history": _json([_history_row(r) for r in changes.history])}
    writes: list[str] = []
    if changes.shipments:
        writes.append(queries.UPSERT_SHIPMENTS)
        params["shipments"] = _json([_shipment_row(s) for s in changes.shipments.values()])
    if changes.balances:
        writes.append(queries.UPSERT_BALANCES)
        balances = [
            {"sku": sku, "location": loc, "on_hand": b.on_hand, "reserved": b.reserved, "updated_at": _ts(at)}
            for (sku, loc), (b, at) in changes.balances.items()
        ]
        params["balances"] = _json(balances)
    if changes.opened:
        writes.append(queries.OPEN_RESERVATIONS)
        opened = [
            {
                "sku": o.sku,
                "reservation_id": o.reservation.reservation_id,
                "location": o.reservation.location,
                "quantity": o.reservation.quantity,
                "created_at": _ts(o.created_at),
                "released_at": _ts(o.released_at),
            }
            for o in changes.opened.values()
        ]
        params["opened"] = _json(opened)
    if changes.released:
        writes.append(queries.RELEASE_RESERVATIONS)
        released = [
            {"sku": sku, "reservation_id": rid, "released_at": _ts(at)} for (sku, rid), at in changes.released.items()
        ]
        params["released"] = _json(released)
    row = (await conn.execute(queries.record_events(tuple(writes)), params)).one()
    if row.advanced != len(moves) or row.recorded != len(changes.history):
        # Only possible if something wrote an entity without its lock: the state writes roll
        # back with the transaction and the caller re-sends (UNAVAILABLE, reason TRANSIENT).
        ids = ",".join(sorted({m.entity_id for m in changes.versions.values()}))
        raise Retryable("entity version moved concurrently", entity_id=ids)


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
