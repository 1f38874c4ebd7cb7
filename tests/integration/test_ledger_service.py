"""The ledger service against real PostgreSQL: compare-and-set, idempotency, rejections, skips,
random inventory sequences against a reference model, and concurrent deliveries."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import logs
from common.db import make_engine
from ledger import domain, errors, repository
from ledger.batch import ApplyResult
from ledger.domain import Outcome
from ledger.metrics import LedgerMetrics
from ledger.models import entity_history, entity_versions
from ledger.service import Ledger
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2

SHIPMENT = events_pb2.ENTITY_TYPE_SHIPMENT
ITEM = events_pb2.ENTITY_TYPE_INVENTORY_ITEM
STRATEGIES = ["advisory", "row"]


def event(entity_type: int, entity_id: str, sequence: int, **payload: Any) -> events_pb2.Event:
    e = events_pb2.Event(
        entity_type=entity_type,  # type: ignore[arg-type]
        entity_id=entity_id,
        sequence=sequence,
        source="test",
        occurred_at=Timestamp(seconds=1_700_000_000),
    )
    for kind, message in payload.items():
        getattr(e, kind).CopyFrom(message)
    return e


def request(e: events_pb2.Event, **kwargs: str) -> ledger_pb2.ApplyEventRequest:
    kwargs.setdefault("correlation_id", "corr-1")
    kwargs.setdefault("transaction_id", str(uuid.uuid4()))
    return ledger_pb2.ApplyEventRequest(event=e, **kwargs)


def received(sku: str, seq: int, location: str = "A", quantity: int = 10) -> ledger_pb2.ApplyEventRequest:
    return request(
        event(ITEM, sku, seq, inventory_received=events_pb2.InventoryReceived(location=location, quantity=quantity))
    )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url, pool_size=10)
    yield engine
    await engine.dispose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(params=STRATEGIES)
def ledger(request: pytest.FixtureRequest, engine: AsyncEngine, registry: CollectorRegistry) -> Ledger:
    return Ledger(engine, LedgerMetrics(registry), lock_strategy=request.param)


async def history_count(engine: AsyncEngine, entity_id: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).where(entity_history.c.entity_id == entity_id)) or 0)


async def version_rows(engine: AsyncEngine, entity_id: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).where(entity_versions.c.entity_id == entity_id)) or 0)


# --- compare-and-set and idempotency --------------------------------------------------------


async def test_out_of_order_is_refused_with_the_expected_sequence(ledger: Ledger, engine: AsyncEngine) -> None:
    with pytest.raises(errors.OutOfOrder) as caught:
        await ledger.apply_event(received("SKU-1", 2))
    assert caught.value.metadata == {"expected_sequence": 1, "received_sequence": 2}
    assert await history_count(engine, "SKU-1") == 0
    assert await version_rows(engine, "SKU-1") == 0

    await ledger.apply_event(received("SKU-1", 1))
    with pytest.raises(errors.OutOfOrder) as caught:
        await ledger.apply_event(received("SKU-1", 3))
    assert caught.value.metadata["expected_sequence"] == 2
    assert (await ledger.get_inventory_item("SKU-1")).version == 1


async def test_a_resent_event_answers_the_original_result(ledger: Ledger, registry: CollectorRegistry) -> None:
    req = received("SKU-1", 1, quantity=7)
    first = await ledger.apply_event(req)
    again = await ledger.apply_event(req)
    assert first.outcome == Outcome.APPLIED
    assert again.outcome == Outcome.DUPLICATE
    assert again.original_outcome == Outcome.APPLIED
    assert (again.version, again.processed_at) == (first.version, first.processed_at) == (1, first.processed_at)
    view = await ledger.get_inventory_item("SKU-1")
    assert [(loc, b.on_hand) for loc, b in view.balances] == [("A", 7)]
    assert registry.get_sample_value("ledger_outcomes_total", {"outcome": "APPLIED"}) == 1
    assert registry.get_sample_value("ledger_outcomes_total", {"outcome": "DUPLICATE"}) == 1


async def test_an_old_event_resent_after_later_ones_is_still_a_duplicate(ledger: Ledger) -> None:
    for seq in (1, 2, 3):
        await ledger.apply_event(received("SKU-1", seq))
    again = await ledger.apply_event(received("SKU-1", 1))
    assert (again.outcome, again.original_outcome, again.version) == (Outcome.DUPLICATE, Outcome.APPLIED, 1)
    assert (await ledger.get_inventory_item("SKU-1")).balances[0][1].on_hand == 30


async def test_same_sequence_different_payload_is_a_conflict(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.apply_event(received("SKU-1", 1, quantity=5))
    with pytest.raises(errors.SequenceConflict):
        await ledger.apply_event(received("SKU-1", 1, quantity=6))
    # A skip of a processed MSI changes nothing: it answers the original outcome (the sequencer
    # skips a BLOCKED event this way when the ledger holds another at its MSI).
    skipped = await ledger.apply_event(request(event(ITEM, "SKU-1", 1), skip_reason="operator"))
    assert (skipped.outcome, skipped.original_outcome, skipped.version) == (Outcome.DUPLICATE, Outcome.APPLIED, 1)
    assert (await ledger.get_inventory_item("SKU-1")).balances[0][1].on_hand == 5
    assert await history_count(engine, "SKU-1") == 1


async def test_a_skip_advances_the_version_without_a_state_change(ledger: Ledger) -> None:
    skip = request(event(SHIPMENT, "S-1", 1), skip_reason="lost upstream, ticket 42")
    result = await ledger.apply_event(skip)
    assert (result.outcome, result.version, result.reason_detail) == (Outcome.SKIPPED, 1, "lost upstream, ticket 42")
    with pytest.raises(errors.ShipmentNotFound):
        await ledger.get_shipment("S-1")
    again = await ledger.apply_event(skip)
    assert (again.outcome, again.original_outcome) == (Outcome.DUPLICATE, Outcome.SKIPPED)
    created = await ledger.apply_event(
        request(event(SHIPMENT, "S-1", 2, shipment_created=events_pb2.ShipmentCreated(order_id="O1")))
    )
    assert created.outcome == Outcome.APPLIED
    shipment, version = await ledger.get_shipment("S-1")
    assert (shipment.order_id, version) == ("O1", 2)
    page = await ledger.list_history(SHIPMENT, "S-1", 0, "")
    assert [(e.sequence, e.kind, e.outcome) for e in page.entries] == [
        (1, "skip", Outcome.SKIPPED),
        (2, "shipment_created", Outcome.APPLIED),
    ]


async def test_a_rejection_consumes_the_sequence(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    packed = request(event(SHIPMENT, "S-1", 1, shipment_packed=events_pb2.ShipmentPacked(package_count=2)))
    with caplog.at_level("WARNING", logger="ledger.service"):
        result = await ledger.apply_event(packed)
    assert (result.outcome, result.reason, result.version) == (Outcome.REJECTED, "ILLEGAL_TRANSITION", 1)
    assert result.reason_detail == "(no shipment) -> shipment_packed"
    assert any(r.levelname == "WARNING" and getattr(r, "reason", None) == "ILLEGAL_TRANSITION" for r in caplog.records)
    with pytest.raises(errors.ShipmentNotFound):
        await ledger.get_shipment("S-1")
    again = await ledger.apply_event(packed)
    assert (again.outcome, again.original_outcome, again.reason) == (
        Outcome.DUPLICATE,
        Outcome.REJECTED,
        "ILLEGAL_TRANSITION",
    )
    with pytest.raises(errors.SequenceConflict):
        await ledger.apply_event(
            request(event(SHIPMENT, "S-1", 1, shipment_created=events_pb2.ShipmentCreated(order_id="O1")))
        )
    created = await ledger.apply_event(
        request(event(SHIPMENT, "S-1", 2, shipment_created=events_pb2.ShipmentCreated(order_id="O1")))
    )
    assert (created.outcome, created.version) == (Outcome.APPLIED, 2)


async def test_shipment_lifecycle_through_the_service(ledger: Ledger) -> None:
    steps: list[dict[str, Any]] = [
        {"shipment_created": events_pb2.ShipmentCreated(order_id="O1", origin="AMS", destination="BER")},
        {"shipment_picked": events_pb2.ShipmentPicked(warehouse_id="W1")},
        {"shipment_loaded": events_pb2.ShipmentLoaded(vehicle_id="V1")},
        {"shipment_cancelled": events_pb2.ShipmentCancelled(reason="too late")},
    ]
    outcomes = [
        (await ledger.apply_event(request(event(SHIPMENT, "S-1", i, **p)))).outcome for i, p in enumerate(steps, 1)
    ]
    assert outcomes == [Outcome.APPLIED] * 4
    shipment, version = await ledger.get_shipment("S-1")
    assert (shipment.status.name, shipment.vehicle_id, shipment.cancel_reason, version) == (
        "CANCELLED",
        "V1",
        "too late",
        4,
    )
    shipped = await ledger.apply_event(
        request(event(SHIPMENT, "S-1", 5, shipment_shipped=events_pb2.ShipmentShipped(carrier="DHL")))
    )
    assert (shipped.outcome, shipped.reason_detail) == (
        Outcome.REJECTED,
        "SHIPMENT_STATUS_CANCELLED -> shipment_shipped",
    )
    shipment, version = await ledger.get_shipment("S-1")
    assert (shipment.status.name, shipment.carrier, version) == ("CANCELLED", "", 5)


async def test_history_keeps_correlation_transaction_and_source(ledger: Ledger) -> None:
    req = received("SKU-1", 1)
    req.correlation_id = "corr-xyz"
    req.transaction_id = "tx-1"
    await ledger.apply_event(req)
    (entry,) = (await ledger.list_history(ITEM, "SKU-1", 10, "")).entries
    assert (entry.correlation_id, entry.transaction_id, entry.source, entry.kind) == (
        "corr-xyz",
        "tx-1",
        "test",
        "inventory_received",
    )
    assert entry.occurred_at is not None and entry.occurred_at.timestamp() == 1_700_000_000


def _bad_requests() -> list[tuple[str, ledger_pb2.ApplyEventRequest]]:
    ok = events_pb2.InventoryReceived(location="A", quantity=1)
    cases = [
        ("no event", ledger_pb2.ApplyEventRequest()),
        ("unspecified type", request(event(0, "X", 1, inventory_received=ok))),
        ("empty id", request(event(ITEM, "", 1, inventory_received=ok))),
        ("long id", request(event(ITEM, "x" * 256, 1, inventory_received=ok))),
        # The common limits (common.limits), the sequencer's too: 128 characters of a set.
        ("id of 129 characters", request(event(ITEM, "x" * 129, 1, inventory_received=ok))),
        ("id with a space", request(event(ITEM, "SKU 1", 1, inventory_received=ok))),
        (
            "long text",
            request(
                event(ITEM, "X", 1, inventory_received=events_pb2.InventoryReceived(location="A" * 257, quantity=1))
            ),
        ),
        ("long skip reason", request(event(ITEM, "X", 1), skip_reason="r" * 257)),
        ("sequence 0", request(event(ITEM, "X", 0, inventory_received=ok))),
        ("no payload", request(event(ITEM, "X", 1))),
        ("payload and skip", request(event(ITEM, "X", 1, inventory_received=ok), skip_reason="r")),
        ("shipment kind on item", request(event(ITEM, "X", 1, shipment_picked=events_pb2.ShipmentPicked()))),
        (
            "huge package count",
            request(event(SHIPMENT, "X", 1, shipment_packed=events_pb2.ShipmentPacked(package_count=2**32 - 1))),
        ),
        (
            "package count above 100,000",
            request(event(SHIPMENT, "X", 1, shipment_packed=events_pb2.ShipmentPacked(package_count=100_001))),
        ),
        ("item kind on shipment", request(event(SHIPMENT, "X", 1, inventory_received=ok))),
        (
            "zero quantity",
            request(event(ITEM, "X", 1, inventory_received=events_pb2.InventoryReceived(location="A"))),
        ),
        (
            "huge quantity",
            request(
                event(ITEM, "X", 1, inventory_received=events_pb2.InventoryReceived(location="A", quantity=10**9 + 1))
            ),
        ),
        (
            "zero delta",
            request(
                event(ITEM, "X", 1, inventory_adjusted=events_pb2.InventoryAdjusted(location="A", delta=0, reason="c"))
            ),
        ),
        (
            "negative move",
            request(
                event(
                    ITEM,
                    "X",
                    1,
                    inventory_moved=events_pb2.InventoryMoved(from_location="A", to_location="B", quantity=-1),
                )
            ),
        ),
    ]
    return cases


@pytest.mark.parametrize(("name", "req"), _bad_requests(), ids=[name for name, _ in _bad_requests()])
async def test_invalid_events_change_nothing(
    ledger: Ledger, engine: AsyncEngine, name: str, req: ledger_pb2.ApplyEventRequest
) -> None:
    with pytest.raises(errors.InvalidEvent) as caught:
        await ledger.apply_event(req)
    assert caught.value.reason == "INVALID_EVENT"
    assert await history_count(engine, "X") == 0
    assert await version_rows(engine, "X") == 0


async def test_events_at_the_common_limits_are_applied(ledger: Ledger) -> None:
    """What the sequencer accepts the ledger takes: an id of 128 characters of the whole
    allowed set, 100,000 packages, a quantity of 10^9."""
    entity_id = ("Az09._:/#@+-" * 11)[:128]
    packed = ledger_pb2.ApplyEventRequest(
        event=event(SHIPMENT, entity_id, 1, shipment_packed=events_pb2.ShipmentPacked(package_count=100_000)),
        skip_reason="",
    )
    assert (await ledger.apply_event(packed)).outcome is Outcome.REJECTED  # no shipment yet: a rule, not a limit
    big = received(entity_id, 1, location="L" * 256, quantity=10**9)
    assert (await ledger.apply_event(big)).outcome is Outcome.APPLIED


async def test_transient_failures_are_retried_then_reported_retryable(ledger: Ledger) -> None:
    """A real 40001 from PostgreSQL: retried; when it persists, the caller gets Retryable."""
    attempts = 0

    async def flaky(conn: AsyncConnection, fail_times: int) -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= fail_times:
            await conn.execute(text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"))
        return "done"

    assert await ledger._transaction(lambda conn: flaky(conn, 2)) == "done"
    assert attempts == 3
    attempts = 0
    with pytest.raises(errors.Retryable) as caught:
        await ledger._transaction(lambda conn: flaky(conn, 100))
    assert attempts == ledger.max_attempts
    assert caught.value.reason == "TRANSIENT"

    async def broken(conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT 1/0"))

    with pytest.raises(DBAPIError):  # not transient: no retry, surfaces as INTERNAL
        await ledger._transaction(broken)


async def test_a_failed_compare_and_set_writes_no_state(ledger: Ledger, engine: AsyncEngine) -> None:
    """The state writes share the compare-and-set's statement: when the version does not match
    (a writer without the lock), nothing of the change stays, not even the balances."""
    await ledger.apply_event(received("SKU-CAS", 1, quantity=10))
    record = repository.HistoryRecord(
        entity_type=ITEM,
        entity_id="SKU-CAS",
        sequence=2,
        kind="inventory_received",
        outcome=Outcome.APPLIED,
        reason="",
        reason_detail="",
        correlation_id="corr",
        transaction_id="tx",
        source="test",
        occurred_at=None,
        processed_at=dt.datetime.now(dt.UTC),
        payload_hash=b"h",
    )
    changes = repository.Changes(
        # The version is 1: a compare-and-set from 0 cannot match.
        versions={(ITEM, "SKU-CAS"): repository.VersionMove(ITEM, "SKU-CAS", 0, 2, record.processed_at)},
        history=[record],
        balances={("SKU-CAS", "A"): (domain.Balance(99, 0), record.processed_at)},
    )
    with pytest.raises(errors.Retryable):
        async with engine.begin() as conn:
            await repository.record_events(conn, changes)
    item = await ledger.get_inventory_item("SKU-CAS")
    assert [(location, balance.on_hand) for location, balance in item.balances] == [("A", 10)]
    assert await history_count(engine, "SKU-CAS") == 1


async def test_the_rpc_log_context_carries_the_event(ledger: Ledger) -> None:
    req = received("SKU-L", 1)
    req.transaction_id = "tx-9"
    await ledger.apply_event(req)
    fields = logs.log_context.get() or {}
    assert {k: fields.get(k) for k in ("entity_type", "entity_id", "sequence", "transaction_id")} == {
        "entity_type": "ENTITY_TYPE_INVENTORY_ITEM",
        "entity_id": "SKU-L",
        "sequence": 1,
        "transaction_id": "tx-9",
    }


# --- concurrency ------------------------------------------------------------------------------


async def test_concurrent_deliveries_of_one_event_apply_once(ledger: Ledger) -> None:
    req = received("SKU-C", 1, quantity=3)
    results = await asyncio.gather(*(ledger.apply_event(req) for _ in range(20)))
    outcomes = sorted(r.outcome.name for r in results)
    assert outcomes == ["APPLIED"] + ["DUPLICATE"] * 19
    assert all(r.version == 1 for r in results)
    view = await ledger.get_inventory_item("SKU-C")
    assert [(loc, b.on_hand) for loc, b in view.balances] == [("A", 3)]
    assert view.version == 1


async def test_concurrent_successors_apply_in_order_only(ledger: Ledger) -> None:
    """Sequences 1..10 raced against each other: the ones that arrive early are refused, and
    re-sending the refused ones in order completes the chain with each applied once."""
    reqs = [received("SKU-R", seq, quantity=seq) for seq in range(1, 11)]
    pending = list(reqs)
    while pending:
        results = await asyncio.gather(*(ledger.apply_event(r) for r in pending), return_exceptions=True)
        for result in results:
            if not isinstance(result, errors.OutOfOrder):
                assert isinstance(result, ApplyResult), result
                assert result.outcome in (Outcome.APPLIED, Outcome.DUPLICATE)
        pending = [r for r, res in zip(pending, results, strict=True) if isinstance(res, errors.OutOfOrder)]
    view = await ledger.get_inventory_item("SKU-R")
    assert (view.version, view.balances[0][1].on_hand) == (10, sum(range(1, 11)))


# --- random sequences against a reference model ------------------------------------------------

LOCS = ["A", "B", "C"]
RIDS = ["r1", "r2", "r3"]
qty = st.integers(min_value=1, max_value=20)
ops = st.one_of(
    st.tuples(st.just("received"), st.sampled_from(LOCS), qty),
    st.tuples(st.just("adjusted"), st.sampled_from(LOCS), st.integers(min_value=-20, max_value=20).filter(bool)),
    st.tuples(st.just("reserved"), st.sampled_from(LOCS), qty, st.sampled_from(RIDS)),
    st.tuples(st.just("released"), st.sampled_from(RIDS)),
    st.tuples(st.just("moved"), st.sampled_from(LOCS), st.sampled_from(LOCS), qty),
)


class Reference:
    """The inventory rules, restated as plainly as possible."""

    def __init__(self) -> None:
        self.balances: dict[str, tuple[int, int]] = {}
        self.reservations: dict[str, tuple[str, int]] = {}
        self.used_ids: set[str] = set()

    def apply(self, op: tuple[Any, ...]) -> str:
        """Returns "" when applied, else the rejection reason (and changes nothing)."""
        b = dict(self.balances)

        def get(loc: str) -> tuple[int, int]:
            return b.get(loc, (0, 0))

        match op:
            case ("received", loc, q):
                b[loc] = (get(loc)[0] + q, get(loc)[1])
            case ("adjusted", loc, d):
                if d < 0 and get(loc)[0] - get(loc)[1] < -d:
                    return "INSUFFICIENT_STOCK"
                b[loc] = (get(loc)[0] + d, get(loc)[1])
            case ("reserved", loc, q, rid):
                if rid in self.used_ids:
                    return "RESERVATION_EXISTS"
                if get(loc)[0] - get(loc)[1] < q:
                    return "INSUFFICIENT_STOCK"
                b[loc] = (get(loc)[0], get(loc)[1] + q)
                self.used_ids.add(rid)
                self.reservations[rid] = (loc, q)
            case ("released", rid):
                if rid not in self.reservations:
                    return "UNKNOWN_RESERVATION"
                loc, q = self.reservations.pop(rid)
                b[loc] = (get(loc)[0], get(loc)[1] - q)
            case ("moved", src, dst, q):
                if src == dst:
                    return "SAME_LOCATION"
                if get(src)[0] - get(src)[1] < q:
                    return "INSUFFICIENT_STOCK"
                b[src] = (get(src)[0] - q, get(src)[1])
                b[dst] = (get(dst)[0] + q, get(dst)[1])
        self.balances = b
        return ""


def to_payload(op: tuple[Any, ...]) -> dict[str, Any]:
    match op:
        case ("received", loc, q):
            return {"inventory_received": events_pb2.InventoryReceived(location=loc, quantity=q)}
        case ("adjusted", loc, d):
            return {"inventory_adjusted": events_pb2.InventoryAdjusted(location=loc, delta=d, reason="count")}
        case ("reserved", loc, q, rid):
            return {"inventory_reserved": events_pb2.InventoryReserved(location=loc, quantity=q, reservation_id=rid)}
        case ("released", rid):
            return {"inventory_released": events_pb2.InventoryReleased(reservation_id=rid)}
        case ("moved", src, dst, q):
            return {"inventory_moved": events_pb2.InventoryMoved(from_location=src, to_location=dst, quantity=q)}
    raise AssertionError(op)


async def run_sequence(ledger: Ledger, sequence: list[tuple[Any, ...]]) -> None:
    sku = f"SKU-{uuid.uuid4().hex[:8]}"
    model = Reference()
    for seq, op in enumerate(sequence, 1):
        expected_reason = model.apply(op)
        result = await ledger.apply_event(request(event(ITEM, sku, seq, **to_payload(op))))
        assert result.outcome == (Outcome.REJECTED if expected_reason else Outcome.APPLIED), (op, result)
        assert result.reason == expected_reason
        assert result.version == seq
        view = await ledger.get_inventory_item(sku)
        assert view.version == seq
        assert {loc: (b.on_hand, b.reserved) for loc, b in view.balances} == model.balances
        assert [loc for loc, _ in view.balances] == sorted(model.balances)
        assert {r.reservation_id: (r.location, r.quantity) for r in view.reservations} == model.reservations


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_sequences_match_the_reference_model(database_url: str, strategy: str) -> None:
    with asyncio.Runner() as runner:
        engine = make_engine(database_url, pool_size=2)
        ledger = Ledger(engine, LedgerMetrics(CollectorRegistry()), lock_strategy=strategy)

        @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(ops, min_size=1, max_size=15))
        def check(sequence: list[tuple[Any, ...]]) -> None:
            runner.run(run_sequence(ledger, sequence))

        try:
            check()
        finally:
            runner.run(engine.dispose())
