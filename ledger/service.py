"""The ledger's use cases. Owns the transactions: one per ApplyEvent or ApplyEvents batch
(per entity of a batch with the row lock strategy), run by the common runner (common.db), holding
the entities' locks from the duplicate check to the history row. Reads go through
common.db.reading, so a database outage answers UNAVAILABLE on every RPC."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import db, logs
from common.clock import Clock, SystemClock
from common.errors import InvalidArgument
from common.interceptors import correlation_id
from common.limits import ENTITY_ID_PATTERN, MAX_ENTITY_ID, MAX_PACKAGE_COUNT, MAX_SEQUENCE, MAX_TEXT
from common.pages import decode_token, encode_token, page_size
from ledger import domain, errors, queries, repository
from ledger.batch import ApplyResult, Item, ParsedEvent, Pending
from ledger.domain import Outcome
from ledger.metrics import LedgerMetrics
from ledger.repository import HistoryRecord, InventoryView
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

SHIPMENT = events_pb2.ENTITY_TYPE_SHIPMENT
INVENTORY_ITEM = events_pb2.ENTITY_TYPE_INVENTORY_ITEM
SKIP_KIND: Final = "skip"


@dataclass(frozen=True)
class HistoryPage:
    entries: list[HistoryRecord]
    next_page_token: str


def _timestamp(message: object, field: str) -> dt.datetime | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    try:
        return getattr(message, field).ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]
    except (ValueError, OverflowError) as exc:
        raise errors.InvalidEvent(f"{field} is not a valid timestamp", field=field) from exc


def _shipment_event(e: events_pb2.Event, kind: str, occurred_at: dt.datetime | None) -> domain.ShipmentEvent:
    changes: dict[str, object]
    match kind:
        case "shipment_created":
            p = e.shipment_created
            changes = {"order_id": p.order_id, "origin": p.origin, "destination": p.destination}
        case "shipment_picked":
            changes = {"warehouse_id": e.shipment_picked.warehouse_id}
        case "shipment_packed":
            if e.shipment_packed.package_count > MAX_PACKAGE_COUNT:
                raise errors.InvalidEvent(f"package_count must be <= {MAX_PACKAGE_COUNT}", field="package_count")
            changes = {"package_count": e.shipment_packed.package_count}
        case "shipment_loaded":
            changes = {"vehicle_id": e.shipment_loaded.vehicle_id}
        case "shipment_shipped":
            changes = {"carrier": e.shipment_shipped.carrier, "tracking_number": e.shipment_shipped.tracking_number}
        case "shipment_delivered":
            # Without an explicit delivery time, the event time is the best evidence.
            delivered_at = _timestamp(e.shipment_delivered, "delivered_at") or occurred_at
            changes = {"delivered_at": delivered_at, "received_by": e.shipment_delivered.received_by}
        case "shipment_cancelled":
            changes = {"cancel_reason": e.shipment_cancelled.reason}
        case _:
            raise errors.InvalidEvent(f"{kind} is not a shipment event", field="payload")
    return domain.ShipmentEvent(kind, changes)


def _inventory_command(e: events_pb2.Event, kind: str) -> domain.InventoryCommand:
    command: domain.InventoryCommand
    match kind:
        case "inventory_received":
            command = domain.Receive(e.inventory_received.location, e.inventory_received.quantity)
        case "inventory_adjusted":
            p = e.inventory_adjusted
            command = domain.Adjust(p.location, p.delta, p.reason)
        case "inventory_reserved":
            r = e.inventory_reserved
            command = domain.Reserve(r.location, r.quantity, r.reservation_id)
        case "inventory_released":
            command = domain.Release(e.inventory_released.reservation_id)
        case "inventory_moved":
            m = e.inventory_moved
            command = domain.Move(m.from_location, m.to_location, m.quantity)
        case _:
            raise errors.InvalidEvent(f"{kind} is not an inventory event", field="payload")
    domain.validate_inventory(command)
    return command


def _check_text(message: Message, prefix: str = "") -> None:
    """Every text field of the event (its source and its payload's) within the common limit."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_STRING and len(value) > MAX_TEXT:
            raise errors.InvalidEvent(f"{path} is longer than {MAX_TEXT} characters", field=path)
        if field.type == field.TYPE_MESSAGE and not field.is_repeated:
            _check_text(value, f"{path}.")


def parse_event(request: ledger_pb2.ApplyEventRequest) -> ParsedEvent:
    """Checks everything about the request that needs no state; INVALID_EVENT otherwise.

    The sequencer validates at ingress too, but exactly-once effect must not depend on it.
    """
    if not request.HasField("event"):
        raise errors.InvalidEvent("event is required", field="event")
    e = request.event
    if e.entity_type not in (SHIPMENT, INVENTORY_ITEM):
        raise errors.InvalidEvent("entity_type must be SHIPMENT or INVENTORY_ITEM", field="entity_type")
    if not ENTITY_ID_PATTERN.fullmatch(e.entity_id):
        raise errors.InvalidEvent(
            f"entity_id must be 1-{MAX_ENTITY_ID} characters of letters, digits and . _ : / # @ + -",
            field="entity_id",
        )
    if not 1 <= e.sequence <= MAX_SEQUENCE:
        raise errors.InvalidEvent(f"sequence must be in [1, {MAX_SEQUENCE}]", field="sequence")
    _check_text(e)
    if len(request.skip_reason) > MAX_TEXT:
        raise errors.InvalidEvent(f"skip_reason is longer than {MAX_TEXT} characters", field="skip_reason")
    kind: str | None = e.WhichOneof("payload")
    skip_reason = request.skip_reason.strip()
    occurred_at = _timestamp(e, "occurred_at")
    serialized = e.SerializeToString(deterministic=True)
    shipment: domain.ShipmentEvent | None = None
    inventory: domain.InventoryCommand | None = None
    if skip_reason:
        if kind is not None:
            raise errors.InvalidEvent("a skipped MSI carries no payload", field="payload")
        # The skip marker: a skip of this event, whatever the wording of its reason.
        kind, digest = SKIP_KIND, hashlib.sha256(b"skip\x00" + serialized).digest()
    elif kind is None:
        raise errors.InvalidEvent("event has no payload and no skip_reason", field="payload")
    elif e.entity_type == SHIPMENT:
        if kind not in domain.SHIPMENT_KINDS:
            raise errors.InvalidEvent(f"{kind} does not apply to a shipment", field="payload")
        shipment, digest = _shipment_event(e, kind, occurred_at), hashlib.sha256(serialized).digest()
    else:
        if kind not in domain.INVENTORY_KINDS:
            raise errors.InvalidEvent(f"{kind} does not apply to an inventory item", field="payload")
        inventory, digest = _inventory_command(e, kind), hashlib.sha256(serialized).digest()
    return ParsedEvent(
        entity_type=int(e.entity_type),
        entity_id=e.entity_id,
        sequence=int(e.sequence),
        kind=kind,
        source=e.source,
        occurred_at=occurred_at,
        payload_hash=digest,
        skip_reason=skip_reason,
        shipment=shipment,
        inventory=inventory,
    )


def encode_page_token(last_sequence: int) -> str:
    return encode_token([last_sequence])


def decode_page_token(token: str) -> int:
    """The last sequence of the previous page (0 for the first); INVALID_PAGE_TOKEN for
    anything this service did not issue (the common token format, a history sort key)."""
    try:
        values = decode_token(token)
    except InvalidArgument as exc:
        raise errors.InvalidPageToken("page_token is malformed", field="page_token") from exc
    if values is None:
        return 0
    if len(values) != 1 or type(values[0]) is not int or not 0 < values[0] <= MAX_SEQUENCE:
        raise errors.InvalidPageToken("page_token is malformed", field="page_token")
    return values[0]


class Ledger:
    """Applies events exactly once per (entity, MSI) and answers queries."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: LedgerMetrics,
        *,
        lock_strategy: str = "advisory",
        max_attempts: int = 5,
        max_batch: int = 500,
        clock: Clock | None = None,
    ) -> None:
        if lock_strategy not in queries.LOCK_STRATEGIES:
            raise ValueError(f"unknown lock strategy {lock_strategy!r}")
        self.engine = engine
        self.metrics = metrics
        self.lock_strategy = lock_strategy
        self.max_attempts = max_attempts
        self.max_batch = max_batch
        self.clock = clock or SystemClock()

    async def apply_event(self, request: ledger_pb2.ApplyEventRequest) -> ApplyResult:
        """Applies, rejects, skips or recognises a duplicate, in one transaction under the
        entity's lock, so concurrent deliveries of one event have exactly one effect."""
        item = self._item(request)
        event = item.event
        logs.bind(
            entity_type=events_pb2.EntityType.Name(event.entity_type),  # type: ignore[arg-type]
            entity_id=event.entity_id,
            sequence=event.sequence,
            transaction_id=item.transaction_id,
            **({"correlation_id": item.correlation_id} if item.correlation_id else {}),
        )
        (result,) = await self._apply_items([item], batch=False)
        return result

    async def apply_events(self, requests: Sequence[ledger_pb2.ApplyEventRequest]) -> list[ApplyResult]:
        """Applies a batch as if each request were an ApplyEvent, one after another in request
        order, and answers one result per request in that order: one call instead of many,
        and on one PostgreSQL one commit.

        Refusals are all or nothing, so a retry of the whole batch is always safe: an invalid
        item (checked before any database work), more than `max_batch` items, or an item that
        is OUT_OF_ORDER or a SEQUENCE_CONFLICT fails the call with that item's error (its index
        in `index`, `requests[i]` in the message) and the batch's transaction rolls back. With
        the row lock strategy a transaction holds one entity's items (SPEC 10): entities before
        the refused one may stay committed, and a re-send answers them DUPLICATE. An empty
        batch answers an empty list.
        """
        if len(requests) > self.max_batch:
            raise errors.InvalidRequest(
                f"at most {self.max_batch} events per call, got {len(requests)}",
                field="requests",
                max_batch=self.max_batch,
            )
        items: list[Item] = []
        for index, request in enumerate(requests):
            try:
                items.append(self._item(request))
            except errors.LedgerError as exc:
                raise errors.in_batch(exc, index) from exc
        if not items:
            return []
        logs.bind(batch_size=len(items))
        return await self._apply_items(items, batch=True)

    def _item(self, request: ledger_pb2.ApplyEventRequest) -> Item:
        return Item(parse_event(request), request.correlation_id or correlation_id(), request.transaction_id)

    def _transactions(self, items: Sequence[Item]) -> list[list[int]]:
        """Which items share a transaction (as indexes, in request order): all of them on one
        PostgreSQL; one entity's each with the row strategy, the distributed mode, where a
        transaction over several entities would be a multi-shard two-phase commit (SPEC 10)."""
        if self.lock_strategy != "row":
            return [list(range(len(items)))]
        by_entity: dict[tuple[int, str], list[int]] = {}
        for index, item in enumerate(items):
            by_entity.setdefault(item.entity, []).append(index)
        return list(by_entity.values())

    async def _apply_items(self, items: Sequence[Item], *, batch: bool) -> list[ApplyResult]:
        """The one write path of ApplyEvent (a batch of one) and ApplyEvents: per transaction,
        every entity's lock in one sorted order (so batches never deadlock), every item's head
        in one read, each item decided in request order against the state so far (so an item
        sees what the ones before it did), and every write in one statement."""
        results: list[ApplyResult | None] = [None] * len(items)
        for group in self._transactions(items):

            async def work(conn: AsyncConnection, group: list[int] = group) -> list[ApplyResult]:
                members = [items[i] for i in group]
                await repository.lock_entities(conn, sorted({item.entity for item in members}), self.lock_strategy)
                # A statement of its own after the locks, so it sees what the previous holders
                # committed.
                pending = Pending(members, await repository.load_heads(conn, [m.head_query() for m in members]))
                done: list[ApplyResult] = []
                for index, item in zip(group, members, strict=True):
                    try:
                        done.append(pending.apply(item, self.clock.now()))
                    except errors.LedgerError as exc:
                        if not batch:
                            raise
                        raise errors.in_batch(exc, index) from exc
                await repository.record_events(conn, pending.changes)
                return done

            committed = await self._transaction(work)
            for index, result in zip(group, committed, strict=True):
                results[index] = result
            self._observe([items[i] for i in group], committed)
        return [r for r in results if r is not None]

    def _observe(self, items: Sequence[Item], results: Sequence[ApplyResult]) -> None:
        """Counts committed outcomes; a rejection is alerted too (the chain goes on)."""
        counts: dict[Outcome, int] = {}
        for item, result in zip(items, results, strict=True):
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
            if result.outcome is Outcome.REJECTED:
                # The event's own fields (a batch's log context names no single event).
                log.warning(
                    "event rejected",
                    extra={
                        "entity_type": logs.enum_name(events_pb2.EntityType, item.event.entity_type),
                        "entity_id": item.event.entity_id,
                        "sequence": item.event.sequence,
                        "transaction_id": item.transaction_id,
                        "correlation_id": item.correlation_id,
                        "reason": result.reason,
                        "reason_detail": result.reason_detail,
                    },
                )
        for outcome, count in counts.items():
            self.metrics.outcomes.labels(outcome.name).inc(count)

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Runs `work` in a transaction through the common runner: serialization failures and
        deadlocks run it again; when they persist, or the database is away, the caller gets
        Retryable (UNAVAILABLE, reason TRANSIENT) and re-sends with the same MSI."""
        return await db.transaction(self.engine, work, retries=self.max_attempts - 1)

    # --- queries ------------------------------------------------------------------------

    async def get_shipment(self, shipment_id: str) -> tuple[domain.Shipment, int]:
        if not shipment_id:
            raise errors.InvalidRequest("shipment_id is required", field="shipment_id")
        async with db.reading(self.engine) as conn:
            found = await repository.get_shipment_view(conn, shipment_id)
        if found is None:
            raise errors.ShipmentNotFound(f"shipment {shipment_id!r} not found", shipment_id=shipment_id)
        return found

    async def get_inventory_item(self, sku: str, location: str = "") -> InventoryView:
        """All locations (ordered by location) or just one; a SKU is known once any of its
        events was processed, even if every one was rejected."""
        if not sku:
            raise errors.InvalidRequest("sku is required", field="sku")
        async with db.reading(self.engine) as conn:
            view = await repository.get_inventory_view(conn, sku, location or None)
        if view is None:
            raise errors.InventoryItemNotFound(f"inventory item {sku!r} not found", sku=sku)
        return view

    async def list_history(self, entity_type: int, entity_id: str, requested_size: int, page_token: str) -> HistoryPage:
        """Oldest first, keyset-paginated by sequence, so pages stay stable while events arrive."""
        if entity_type not in (SHIPMENT, INVENTORY_ITEM) or not entity_id:
            raise errors.InvalidRequest("entity with a known type and an id is required", field="entity")
        size = page_size(requested_size)
        after = decode_page_token(page_token)
        async with db.reading(self.engine) as conn:
            rows = await repository.list_history(conn, entity_type, entity_id, after, size + 1)
            if not rows and not await repository.has_history(conn, entity_type, entity_id):
                raise errors.EntityNotFound(f"no history for {entity_id!r}", entity_id=entity_id)
        entries = rows[:size]
        token = encode_page_token(entries[-1].sequence) if len(rows) > size else ""
        return HistoryPage(entries, token)
