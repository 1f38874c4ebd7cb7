"""The ledger's statements: read and write rows, nothing else (no commits, no side effects).

Every function takes the caller's connection, so the service decides what one transaction is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, func, literal, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from common.db import RETRYABLE_SQLSTATES, sqlstate
from common.errors import Retryable
from ledger import domain, queries
from ledger.models import entity_history, entity_versions, inventory_balances, inventory_reservations, shipments

SHIPMENT = 1
INVENTORY_ITEM = 2

lock_entity = queries.lock_entity


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


def is_transient(exc: BaseException) -> bool:
    """Whether a driver error means "run the same transaction again": serialization failure,
    deadlock, or a lost connection (SQLSTATE class 08, or one SQLAlchemy invalidated)."""
    if not isinstance(exc, DBAPIError):
        return False
    state = sqlstate(exc) or ""
    return state in RETRYABLE_SQLSTATES or state.startswith("08") or exc.connection_invalidated


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


async def advance_version(
    conn: AsyncConnection, entity_type: int, entity_id: str, expected: int, version: int, at: dt.datetime
) -> None:
    row = await conn.execute(
        queries.ADVANCE_VERSION,
        {**_entity(entity_type, entity_id), "expected": expected, "version": version, "updated_at": at},
    )
    if row.first() is None:
        # Only possible if something wrote the entity without its lock: read again and retry.
        raise Retryable("entity version moved concurrently", entity_id=entity_id)


def _history_record(row: object) -> HistoryRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return HistoryRecord(
        entity_type=m["entity_type"],
        entity_id=m["entity_id"],
        sequence=m["sequence"],
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


async def get_history(conn: AsyncConnection, entity_type: int, entity_id: str, sequence: int) -> HistoryRecord | None:
    h = entity_history.c
    row = (
        await conn.execute(
            select(entity_history).where(h.entity_type == entity_type, h.entity_id == entity_id, h.sequence == sequence)
        )
    ).first()
    return None if row is None else _history_record(row)


async def insert_history(conn: AsyncConnection, record: HistoryRecord) -> None:
    await conn.execute(
        entity_history.insert().values(
            entity_type=record.entity_type,
            entity_id=record.entity_id,
            sequence=record.sequence,
            kind=record.kind,
            outcome=int(record.outcome),
            reason=record.reason,
            reason_detail=record.reason_detail,
            correlation_id=record.correlation_id,
            transaction_id=record.transaction_id,
            source=record.source,
            occurred_at=record.occurred_at,
            processed_at=record.processed_at,
            payload_hash=record.payload_hash,
        )
    )


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


def _shipment(row: object) -> domain.Shipment:
    m = dict(row._mapping)  # type: ignore[attr-defined]
    m.pop("version", None)
    m["status"] = domain.ShipmentStatus(m["status"])
    return domain.Shipment(**m)


async def load_shipment(conn: AsyncConnection, shipment_id: str) -> domain.Shipment | None:
    row = (await conn.execute(select(shipments).where(shipments.c.shipment_id == shipment_id))).first()
    return None if row is None else _shipment(row)


async def save_shipment(conn: AsyncConnection, shipment: domain.Shipment) -> None:
    values = {**shipment.__dict__, "status": int(shipment.status)}
    stmt = insert(shipments).values(**values)
    updates = {k: stmt.excluded[k] for k in values if k not in {"shipment_id", "created_at"}}
    await conn.execute(stmt.on_conflict_do_update(index_elements=[shipments.c.shipment_id], set_=updates))


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
    return _shipment(row), int(row._mapping["version"])


# --- inventory -------------------------------------------------------------------------------


async def load_inventory(
    conn: AsyncConnection, sku: str, locations: Sequence[str], reservation_id: str | None
) -> domain.InventoryState:
    """The part of an item a command touches: those locations and that reservation (and, for a
    release, the reservation's location)."""
    reservations: dict[str, domain.Reservation] = {}
    wanted = set(locations)
    if reservation_id is not None:
        r = inventory_reservations.c
        row = (
            await conn.execute(select(inventory_reservations).where(r.sku == sku, r.reservation_id == reservation_id))
        ).first()
        if row is not None:
            m = row._mapping
            reservations[reservation_id] = domain.Reservation(
                reservation_id, m["location"], m["quantity"], released=m["released_at"] is not None
            )
            wanted.add(m["location"])
    balances: dict[str, domain.Balance] = {}
    if wanted:
        b = inventory_balances.c
        rows = await conn.execute(
            select(b.location, b.on_hand, b.reserved).where(b.sku == sku, b.location.in_(sorted(wanted)))
        )
        balances = {row.location: domain.Balance(row.on_hand, row.reserved) for row in rows}
    return domain.InventoryState(balances, reservations)


async def save_inventory_effect(
    conn: AsyncConnection, sku: str, effect: domain.InventoryEffect, at: dt.datetime
) -> None:
    """Writes the new values of the touched rows (computed under the entity lock)."""
    if effect.balances:
        stmt = insert(inventory_balances).values(
            [
                {"sku": sku, "location": loc, "on_hand": b.on_hand, "reserved": b.reserved, "updated_at": at}
                for loc, b in sorted(effect.balances.items())
            ]
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[inventory_balances.c.sku, inventory_balances.c.location],
                set_={
                    "on_hand": stmt.excluded.on_hand,
                    "reserved": stmt.excluded.reserved,
                    "updated_at": stmt.excluded.updated_at,
                },
            )
        )
    r = effect.reservation
    if r is None:
        return
    if r.released:
        c = inventory_reservations.c
        await conn.execute(
            inventory_reservations.update()
            .where(c.sku == sku, c.reservation_id == r.reservation_id)
            .values(released_at=at)
        )
    else:
        await conn.execute(
            inventory_reservations.insert().values(
                sku=sku, reservation_id=r.reservation_id, location=r.location, quantity=r.quantity, created_at=at
            )
        )


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
