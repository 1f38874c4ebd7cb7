"""LedgerService.ApplyEvents over real gRPC and real PostgreSQL: one call, one outcome per event
with exactly ApplyEvent's semantics, all-or-nothing refusals, sorted locks under concurrent
overlapping batches, the item cap, the role policy, and random splits against one-by-one."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from common.auth import SecuritySettings
from common.db import make_engine
from ledger import errors, queries
from ledger.batch import ApplyResult
from ledger.config import Settings
from ledger.domain import Outcome
from ledger.interceptors import DOMAIN
from ledger.metrics import LedgerMetrics
from ledger.server import App, build_server
from ledger.service import Ledger
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tests import support
from tests.support import INVENTORY, SHIPMENT, inventory_event, shipment_event

TIMEOUT = 10.0
APPLIED = ledger_pb2.APPLY_OUTCOME_APPLIED
REJECTED = ledger_pb2.APPLY_OUTCOME_REJECTED
DUPLICATE = ledger_pb2.APPLY_OUTCOME_DUPLICATE
SKIPPED = ledger_pb2.APPLY_OUTCOME_SKIPPED
NONE = ledger_pb2.APPLY_OUTCOME_UNSPECIFIED
Stub = Any  # a LedgerServiceStub on a grpc.aio channel (the generated types describe sync calls)


def req(event: events_pb2.Event, **kwargs: str) -> ledger_pb2.ApplyEventRequest:
    kwargs.setdefault("transaction_id", f"tx-{event.entity_id}-{event.sequence}")
    return ledger_pb2.ApplyEventRequest(event=event, **kwargs)


def ship(shipment_id: str, sequence: int, kind: str) -> ledger_pb2.ApplyEventRequest:
    return req(shipment_event(shipment_id, sequence, kind))


def recv(sku: str, sequence: int, quantity: int = 10, location: str = "A") -> ledger_pb2.ApplyEventRequest:
    return req(inventory_event(sku, sequence, "inventory_received", location=location, quantity=quantity))


def skip(entity_type: Any, entity_id: str, sequence: int, reason: str) -> ledger_pb2.ApplyEventRequest:
    event = events_pb2.Event(entity_type=entity_type, entity_id=entity_id, sequence=sequence, source="tests")
    return req(event, skip_reason=reason)


def batch(*requests: ledger_pb2.ApplyEventRequest) -> ledger_pb2.ApplyEventsRequest:
    return ledger_pb2.ApplyEventsRequest(requests=requests)


def summary(response: Any) -> tuple[Any, Any, str, int]:
    return (response.outcome, response.original_outcome, response.reason, response.version)


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    return support.error_info(exc, DOMAIN)


async def refused(call: Any) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), error_info(caught.value), caught.value.details() or ""


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def start(database_url: str, lock_strategy: str, registry: CollectorRegistry, **overrides: Any) -> App:
    settings = Settings(
        database_url=database_url,
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        lock_strategy=lock_strategy,
    )
    return await build_server(dataclasses.replace(settings, **overrides), registry=registry)


@pytest.fixture
async def app(database_url: str, lock_strategy: str, registry: CollectorRegistry) -> AsyncIterator[App]:
    app = await start(database_url, lock_strategy, registry)
    yield app
    await app.stop(0)


@pytest.fixture
async def stub(app: App) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


async def shipment(stub: Stub, shipment_id: str) -> Any:
    return (await stub.GetShipment(ledger_pb2.GetShipmentRequest(shipment_id=shipment_id), timeout=TIMEOUT)).shipment


async def item(stub: Stub, sku: str) -> Any:
    return (await stub.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku=sku), timeout=TIMEOUT)).item


async def history(stub: Stub, entity_type: Any, entity_id: str) -> list[tuple[int, str, Any, str]]:
    """(MSI, kind, outcome, reason) of every entry; [] for an entity without history."""
    entity = events_pb2.EntityRef(entity_type=entity_type, entity_id=entity_id)
    try:
        reply = await stub.ListEntityHistory(
            ledger_pb2.ListEntityHistoryRequest(entity=entity, page_size=500), timeout=TIMEOUT
        )
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return []
    return [(e.sequence, e.kind, e.outcome, e.reason) for e in reply.entries]


def balances(view: Any) -> dict[str, tuple[int, int]]:
    return {b.location: (b.on_hand, b.reserved) for b in view.balances}


# --- one call, single-event semantics ---------------------------------------------------------


async def test_successors_of_many_entities_in_one_call(stub: Stub, registry: CollectorRegistry) -> None:
    requests = [
        ship("S-1", 1, "shipment_created"),
        recv("SKU-1", 1, quantity=4),
        ship("S-2", 1, "shipment_picked"),
        recv("SKU-2", 1, quantity=9, location="B"),
        ship("S-3", 1, "shipment_created"),
    ]
    reply = await stub.ApplyEvents(batch(*requests), timeout=TIMEOUT)
    assert [summary(r) for r in reply.responses] == [(APPLIED, NONE, "", 1)] * 5
    assert all(r.processed_at.seconds > 0 for r in reply.responses)
    assert (await shipment(stub, "S-1")).status == ledger_pb2.SHIPMENT_STATUS_CREATED
    assert (await shipment(stub, "S-2")).warehouse_id == "WH-1"
    assert balances(await item(stub, "SKU-1")) == {"A": (4, 0)}
    assert balances(await item(stub, "SKU-2")) == {"B": (9, 0)}
    assert await history(stub, SHIPMENT, "S-3") == [(1, "shipment_created", APPLIED, "")]
    # Each item's outcome is counted, like five ApplyEvent calls.
    assert registry.get_sample_value("ledger_outcomes_total", {"outcome": "APPLIED"}) == 5


async def test_a_chain_of_one_entity_in_one_call(stub: Stub) -> None:
    kinds = ["shipment_created", "shipment_picked", "shipment_loaded", "shipment_shipped", "shipment_delivered"]
    reply = await stub.ApplyEvents(batch(*(ship("S-1", i, k) for i, k in enumerate(kinds, 1))), timeout=TIMEOUT)
    assert [summary(r) for r in reply.responses] == [(APPLIED, NONE, "", i) for i in range(1, 6)]
    s = await shipment(stub, "S-1")
    assert (s.status, s.version, s.order_id, s.vehicle_id, s.carrier, s.received_by) == (
        ledger_pb2.SHIPMENT_STATUS_DELIVERED,
        5,
        "ORD-1",
        "TRUCK-7",
        "DHL",
        "front desk",
    )
    assert [(seq, kind) for seq, kind, _, _ in await history(stub, SHIPMENT, "S-1")] == list(enumerate(kinds, 1))


async def test_duplicates_rejections_and_skips_answer_as_apply_event_would(stub: Stub) -> None:
    first = await stub.ApplyEvent(ship("S-1", 1, "shipment_created"), timeout=TIMEOUT)
    await stub.ApplyEvent(recv("SKU-1", 1, quantity=5), timeout=TIMEOUT)
    reserve = req(inventory_event("SKU-1", 2, "inventory_reserved", location="A", quantity=6, reservation_id="R1"))
    requests = [
        ship("S-1", 1, "shipment_created"),  # applied before this call
        ship("S-1", 2, "shipment_picked"),
        ship("S-1", 3, "shipment_delivered"),  # illegal from PICKED: rejected, the chain goes on
        ship("S-1", 4, "shipment_loaded"),
        reserve,  # only 5 on hand
        skip(INVENTORY, "SKU-1", 3, "lost upstream, ticket 7"),
        req(inventory_event("SKU-1", 4, "inventory_adjusted", location="A", delta=-2, reason="count")),
        ship("S-1", 2, "shipment_picked"),  # a re-send within the call
        reserve,  # a re-send of a rejection within the call
    ]
    reply = await stub.ApplyEvents(batch(*requests), timeout=TIMEOUT)
    responses = list(reply.responses)
    assert [summary(r) for r in responses] == [
        (DUPLICATE, APPLIED, "", 1),
        (APPLIED, NONE, "", 2),
        (REJECTED, NONE, "ILLEGAL_TRANSITION", 3),
        (APPLIED, NONE, "", 4),
        (REJECTED, NONE, "INSUFFICIENT_STOCK", 2),
        (SKIPPED, NONE, "", 3),
        (APPLIED, NONE, "", 4),
        (DUPLICATE, APPLIED, "", 2),
        (DUPLICATE, REJECTED, "INSUFFICIENT_STOCK", 2),
    ]
    assert responses[0].processed_at == first.processed_at
    assert responses[2].reason_detail == "SHIPMENT_STATUS_PICKED -> shipment_delivered"
    assert responses[5].reason_detail == "lost upstream, ticket 7"
    assert responses[8].reason_detail == responses[4].reason_detail
    assert responses[7].processed_at == responses[1].processed_at

    # The rejection and the skip left the state alone; the version counts them.
    s = await shipment(stub, "S-1")
    assert (s.status, s.version, s.vehicle_id) == (ledger_pb2.SHIPMENT_STATUS_LOADED, 4, "TRUCK-7")
    inventory = await item(stub, "SKU-1")
    assert (balances(inventory), list(inventory.reservations), inventory.version) == ({"A": (3, 0)}, [], 4)
    assert await history(stub, INVENTORY, "SKU-1") == [
        (1, "inventory_received", APPLIED, ""),
        (2, "inventory_reserved", REJECTED, "INSUFFICIENT_STOCK"),
        (3, "skip", SKIPPED, ""),
        (4, "inventory_adjusted", APPLIED, ""),
    ]
    # ApplyEvent agrees: each request sent alone now answers the batch's result as the original.
    for request, response in zip(requests, responses, strict=True):
        alone = await stub.ApplyEvent(request, timeout=TIMEOUT)
        original = response.original_outcome if response.outcome == DUPLICATE else response.outcome
        assert summary(alone) == (DUPLICATE, original, response.reason, response.version)
        assert (alone.reason_detail, alone.processed_at) == (response.reason_detail, response.processed_at)


async def test_an_empty_call_answers_nothing(stub: Stub) -> None:
    reply = await stub.ApplyEvents(batch(), timeout=TIMEOUT)
    assert list(reply.responses) == []


# --- refusals: all or nothing, safe to retry ---------------------------------------------------


async def test_an_out_of_order_item_refuses_the_call_and_changes_nothing(stub: Stub, lock_strategy: str) -> None:
    await stub.ApplyEvents(batch(ship("S-1", 1, "shipment_created"), recv("SKU-1", 1, quantity=3)), timeout=TIMEOUT)
    before = (await history(stub, SHIPMENT, "S-1"), await history(stub, INVENTORY, "SKU-1"))
    requests = [
        recv("SKU-1", 2, quantity=1),
        ship("S-1", 2, "shipment_picked"),
        ship("S-1", 3, "shipment_loaded"),
        ship("S-1", 5, "shipment_delivered"),  # S-1 waits for MSI 4
        recv("SKU-1", 3, quantity=1),
    ]
    code, info, message = await refused(stub.ApplyEvents(batch(*requests), timeout=TIMEOUT))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "OUT_OF_ORDER")
    assert dict(info.metadata) == {"expected_sequence": "4", "received_sequence": "5", "index": "3"}
    assert message.startswith("requests[3]: ")
    # Nothing of the refused entity stays, not even the items before the refused one.
    s = await shipment(stub, "S-1")
    assert (s.status, s.version) == (ledger_pb2.SHIPMENT_STATUS_CREATED, 1)
    assert await history(stub, SHIPMENT, "S-1") == before[0]
    inventory = await item(stub, "SKU-1")
    if lock_strategy == "advisory":
        # One transaction for the whole call: the other entity's items rolled back too.
        assert (balances(inventory), inventory.version) == ({"A": (3, 0)}, 1)
        assert await history(stub, INVENTORY, "SKU-1") == before[1]
    else:
        # One transaction per entity (SPEC 10): SKU-1's items came first and stayed committed.
        assert (balances(inventory), inventory.version) == ({"A": (5, 0)}, 3)

    # The forwarder's retry without the refused item: every item exactly once.
    retry = await stub.ApplyEvents(batch(*(r for i, r in enumerate(requests) if i != 3)), timeout=TIMEOUT)
    sku_outcome = APPLIED if lock_strategy == "advisory" else DUPLICATE
    assert [r.outcome for r in retry.responses] == [sku_outcome, APPLIED, APPLIED, sku_outcome]
    assert (balances(await item(stub, "SKU-1")), (await shipment(stub, "S-1")).version) == ({"A": (5, 0)}, 3)


async def test_a_conflicting_item_refuses_the_call(stub: Stub) -> None:
    await stub.ApplyEvent(recv("SKU-1", 1, quantity=3), timeout=TIMEOUT)
    code, info, _ = await refused(
        stub.ApplyEvents(batch(recv("SKU-1", 2), recv("SKU-1", 1, quantity=4)), timeout=TIMEOUT)
    )
    assert (code, info.reason, info.metadata["index"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SEQUENCE_CONFLICT",
        "1",
    )
    assert (await item(stub, "SKU-1")).version == 1


async def test_an_invalid_item_fails_the_call_before_any_work(stub: Stub) -> None:
    zero = req(inventory_event("SKU-1", 1, "inventory_received", location="A", quantity=0))
    code, info, message = await refused(
        stub.ApplyEvents(batch(ship("S-1", 1, "shipment_created"), zero), timeout=TIMEOUT)
    )
    assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT")
    assert dict(info.metadata) == {"field": "requests[1].quantity", "index": "1"}
    assert message.startswith("requests[1]: quantity")
    assert await history(stub, SHIPMENT, "S-1") == []

    nul = ship("S-1", 1, "shipment_created")
    nul.event.entity_id = "S\x001"
    code, info, _ = await refused(stub.ApplyEvents(batch(ship("S-2", 1, "shipment_created"), nul), timeout=TIMEOUT))
    assert (code, info.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "requests[1].event.entity_id")
    assert await history(stub, SHIPMENT, "S-2") == []


async def test_the_item_cap(database_url: str, registry: CollectorRegistry) -> None:
    app = await start(database_url, "advisory", registry, max_batch=3)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            four = [recv("SKU-1", i) for i in range(1, 5)]
            code, info, _ = await refused(stub.ApplyEvents(batch(*four), timeout=TIMEOUT))
            assert (code, info.reason, dict(info.metadata)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                {"field": "requests", "max_batch": "3"},
            )
            assert await history(stub, INVENTORY, "SKU-1") == []
            reply = await stub.ApplyEvents(batch(*four[:3]), timeout=TIMEOUT)
            assert [r.version for r in reply.responses] == [1, 2, 3]
    finally:
        await app.stop(0)


def test_the_cap_is_a_setting() -> None:
    env = {"DATABASE_URL": "postgresql://u@h/db"}
    assert Settings.from_env(env).max_batch == 500
    assert Settings.from_env({**env, "LEDGER_MAX_BATCH": "50"}).max_batch == 50


# --- concurrency -------------------------------------------------------------------------------


CHAIN = 4


def chains(skus: list[str]) -> list[ledger_pb2.ApplyEventRequest]:
    return [recv(sku, seq, quantity=seq) for sku in skus for seq in range(1, CHAIN + 1)]


async def one_by_one(stub: Stub, requests: list[ledger_pb2.ApplyEventRequest]) -> list[Any]:
    return [await stub.ApplyEvent(r, timeout=TIMEOUT) for r in requests]


WAITING = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")


async def waiters(engine: AsyncEngine, at_least: int) -> None:
    """Returns once `at_least` sessions wait for a lock (a condition polled, not a delay)."""
    while True:
        async with engine.connect() as conn:
            if int(await conn.scalar(WAITING) or 0) >= at_least:
                return
        await asyncio.sleep(0.01)


async def race(app: App, skus: list[str]) -> None:
    """Batches over skus[0:6] and skus[7:1:-1] from two channels, and skus[3] one by one, all
    released at once from a lock held on skus[3]: each batch already holds some of its locks and
    waits for the rest, which is where locks taken in two orders would deadlock."""
    first, second, alone = chains(skus[:6]), chains(skus[7:1:-1]), chains([skus[3]])
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as one,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as two,
    ):
        a, b = ledger_pb2_grpc.LedgerServiceStub(one), ledger_pb2_grpc.LedgerServiceStub(two)
        async with app.engine.begin() as holder:
            await queries.lock_entity(holder, INVENTORY, skus[3], app.service.lock_strategy)
            calls = asyncio.gather(
                a.ApplyEvents(batch(*first), timeout=TIMEOUT),
                b.ApplyEvents(batch(*second), timeout=TIMEOUT),
                one_by_one(a, alone),
            )
            await waiters(app.engine, 3)
        reply_a, reply_b, singles = await calls
        applied: dict[tuple[str, int], int] = {}
        for request, response in [
            *zip(first, reply_a.responses, strict=True),
            *zip(second, reply_b.responses, strict=True),
            *zip(alone, singles, strict=True),
        ]:
            assert response.outcome in (APPLIED, DUPLICATE)
            assert response.version == request.event.sequence
            if response.outcome == DUPLICATE:
                assert response.original_outcome == APPLIED
            key = (request.event.entity_id, request.event.sequence)
            applied[key] = applied.get(key, 0) + (response.outcome == APPLIED)
        assert (set(applied.values()), len(applied)) == ({1}, len(skus) * CHAIN)
        for sku in skus:
            view = await item(a, sku)
            assert (balances(view), view.version) == ({"A": (sum(range(1, CHAIN + 1)), 0)}, CHAIN)


async def test_concurrent_overlapping_batches_apply_each_event_once(app: App, caplog: pytest.LogCaptureFixture) -> None:
    """Two batches over overlapping entities, listed in opposite orders, from two channels, with
    single ApplyEvents of a shared entity beside them: no deadlock (PostgreSQL would break it
    and the ledger retry, so: no retry at all), each event applied exactly once, and the
    in-order result."""
    with caplog.at_level("INFO", logger="ledger.service"):
        for round_ in range(3):
            await race(app, [f"SKU-{round_}-{n}" for n in range(8)])
    assert [r for r in caplog.records if r.getMessage() == "transaction retried"] == []


# --- the role policy -------------------------------------------------------------------------------


async def test_only_the_sequencer_may_apply_batches(database_url: str, tmp_path: Path) -> None:
    tokens = {"sequencer": "seq-secret", "bi": "bi-secret"}
    identities = [
        {"caller": "sequencer", "roles": ["sequencer"], "token_sha256": hashlib.sha256(b"seq-secret").hexdigest()},
        {"caller": "bi", "roles": ["reader"], "token_sha256": hashlib.sha256(b"bi-secret").hexdigest()},
    ]
    path = tmp_path / "ledger-ids.json"
    path.write_text(json.dumps({"identities": identities}))
    app = await start(
        database_url, "advisory", CollectorRegistry(), security=SecuritySettings(identities_file=str(path))
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            call = batch(ship("S-1", 1, "shipment_created"))

            def as_(caller: str) -> tuple[tuple[str, str], ...]:
                return (("authorization", f"Bearer {tokens[caller]}"),)

            code, info, _ = await refused(stub.ApplyEvents(call, metadata=as_("bi"), timeout=TIMEOUT))
            assert (code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
            code, info, _ = await refused(stub.ApplyEvents(call, timeout=TIMEOUT))
            assert (code, info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
            reply = await stub.ApplyEvents(call, metadata=as_("sequencer"), timeout=TIMEOUT)
            assert [r.outcome for r in reply.responses] == [APPLIED]
    finally:
        await app.stop(0)


# --- random splits against one-by-one application ------------------------------------------------

LOCS = ["A", "B"]
RIDS = ["r1", "r2"]
qty = st.integers(min_value=1, max_value=15)
ops = st.one_of(
    st.builds(lambda loc, q: ("inventory_received", {"location": loc, "quantity": q}), st.sampled_from(LOCS), qty),
    st.builds(
        lambda loc, d: ("inventory_adjusted", {"location": loc, "delta": d, "reason": "count"}),
        st.sampled_from(LOCS),
        st.integers(min_value=-15, max_value=15).filter(bool),
    ),
    st.builds(
        lambda loc, q, r: ("inventory_reserved", {"location": loc, "quantity": q, "reservation_id": r}),
        st.sampled_from(LOCS),
        qty,
        st.sampled_from(RIDS),
    ),
    st.builds(lambda r: ("inventory_released", {"reservation_id": r}), st.sampled_from(RIDS)),
    st.builds(
        lambda src, dst, q: ("inventory_moved", {"from_location": src, "to_location": dst, "quantity": q}),
        st.sampled_from(LOCS),
        st.sampled_from(LOCS),
        qty,
    ),
    st.just(("skip", {})),
)


def op_request(sku: str, sequence: int, op: tuple[str, dict[str, Any]]) -> ledger_pb2.ApplyEventRequest:
    kind, fields = op
    if kind == "skip":
        return skip(INVENTORY, sku, sequence, "operator")
    return req(inventory_event(sku, sequence, kind, **fields), transaction_id=f"tx-{sequence}")


def comparable(result: ApplyResult) -> tuple[Outcome, Outcome | None, str, str, int]:
    return (result.outcome, result.original_outcome, result.reason, result.reason_detail, result.version)


async def state(ledger: Ledger, sku: str) -> Any:
    view = await ledger.get_inventory_item(sku)
    page = await ledger.list_history(INVENTORY, sku, 500, "")
    return (
        view.version,
        list(view.balances),
        list(view.reservations),
        [(e.sequence, e.kind, e.outcome, e.reason, e.reason_detail) for e in page.entries],
    )


async def split_matches_one_by_one(ledger: Ledger, sequence: list[Any], data: st.DataObject) -> None:
    one, split = f"SKU-{uuid.uuid4().hex[:8]}", f"SKU-{uuid.uuid4().hex[:8]}"
    expected = [comparable(await ledger.apply_event(op_request(one, i, op))) for i, op in enumerate(sequence, 1)]
    done = 0
    while done < len(sequence):
        size = data.draw(st.integers(min_value=1, max_value=len(sequence) - done), label="batch size")
        calls = [(seq, False) for seq in range(done + 1, done + size + 1)]
        # Re-sends of MSIs processed before their place in the call (earlier calls or earlier items).
        for _ in range(data.draw(st.integers(min_value=0, max_value=3), label="re-sends")):
            place = data.draw(st.integers(min_value=0, max_value=len(calls)), label="place")
            highest = max([done, *(seq for seq, _ in calls[:place])])
            if highest:
                calls.insert(place, (data.draw(st.integers(min_value=1, max_value=highest), label="msi"), True))
        results = await ledger.apply_events([op_request(split, seq, sequence[seq - 1]) for seq, _ in calls])
        for (seq, resent), result in zip(calls, results, strict=True):
            outcome, _, reason, detail, version = expected[seq - 1]
            if resent:
                assert comparable(result) == (Outcome.DUPLICATE, outcome, reason, detail, version)
            else:
                assert comparable(result) == expected[seq - 1]
        done += size
    one_state, split_state = await state(ledger, one), await state(ledger, split)
    assert split_state == one_state


def test_random_splits_end_as_one_by_one(database_url: str, lock_strategy: str) -> None:
    with asyncio.Runner() as runner:
        engine = make_engine(database_url, pool_size=2)
        ledger = Ledger(engine, LedgerMetrics(CollectorRegistry()), lock_strategy=lock_strategy)

        @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(ops, min_size=1, max_size=12), st.data())
        def check(sequence: list[Any], data: st.DataObject) -> None:
            runner.run(split_matches_one_by_one(ledger, sequence, data))

        try:
            check()
        finally:
            runner.run(engine.dispose())


# --- many entities and chains in one call against one-by-one application -------------------------

SHIPMENT_OPS = st.sampled_from([*support.SHIPMENT_PAYLOADS, "skip"])


def shipment_op_request(shipment_id: str, sequence: int, kind: str) -> ledger_pb2.ApplyEventRequest:
    if kind == "skip":
        return skip(SHIPMENT, shipment_id, sequence, "operator")
    return req(shipment_event(shipment_id, sequence, kind))


def without_times(shipment: Any) -> Any:
    return dataclasses.replace(shipment, created_at=None, updated_at=None, delivered_at=None)


async def entity_state(ledger: Ledger, entity_type: Any, entity_id: str) -> Any:
    """Everything the ledger keeps of an entity, but the processing times."""
    page = await ledger.list_history(entity_type, entity_id, 500, "")
    entries = [
        (e.sequence, e.kind, e.outcome, e.reason, e.reason_detail, e.correlation_id, e.transaction_id, e.source)
        for e in page.entries
    ]
    if entity_type == INVENTORY:
        view = await ledger.get_inventory_item(entity_id)
        return (view.version, list(view.balances), list(view.reservations), entries)
    try:
        shipment, version = await ledger.get_shipment(entity_id)
    except errors.ShipmentNotFound:
        return (None, entries)
    return (version, dataclasses.replace(without_times(shipment), shipment_id=""), entries)


async def mixed_batches_match_one_by_one(
    ledger: Ledger, streams: dict[tuple[Any, str], list[Any]], data: st.DataObject
) -> None:
    """The entities' streams interleaved at random (each entity's items in MSI order) and cut
    into calls at random, with re-sends of processed MSIs placed anywhere after them: every
    answer and every entity's final state equal those of ApplyEvent one by one."""
    run = uuid.uuid4().hex[:8]

    def build(prefix: str, entity: tuple[Any, str], sequence: int) -> ledger_pb2.ApplyEventRequest:
        entity_type, name = entity
        op = streams[entity][sequence - 1]
        entity_id = f"{prefix}-{run}-{name}"
        if entity_type == INVENTORY:
            request = op_request(entity_id, sequence, op)
        else:
            request = shipment_op_request(entity_id, sequence, op)
        request.transaction_id, request.correlation_id = f"tx-{name}-{sequence}", f"c-{name}-{sequence}"
        return request

    order: list[tuple[tuple[Any, str], int]] = []
    cursors = {entity: 0 for entity in streams}
    while any(cursors[e] < len(s) for e, s in streams.items()):
        entity = data.draw(st.sampled_from([e for e, s in streams.items() if cursors[e] < len(s)]), label="next")
        cursors[entity] += 1
        order.append((entity, cursors[entity]))

    expected = {key: comparable(await ledger.apply_event(build("one", *key))) for key in order}

    done = 0
    while done < len(order):
        size = data.draw(st.integers(min_value=1, max_value=len(order) - done), label="call size")
        calls = [(key, False) for key in order[done : done + size]]
        for _ in range(data.draw(st.integers(min_value=0, max_value=4), label="re-sends")):
            place = data.draw(st.integers(min_value=0, max_value=len(calls)), label="place")
            processed = order[:done] + [key for key, resent in calls[:place] if not resent]
            if processed:
                calls.insert(place, (data.draw(st.sampled_from(processed), label="re-send"), True))
        results = await ledger.apply_events([build("batch", *key) for key, _ in calls])
        firsts: dict[Any, ApplyResult] = {}
        for (key, resent), result in zip(calls, results, strict=True):
            outcome, _, reason, detail, version = expected[key]
            if resent:
                assert comparable(result) == (Outcome.DUPLICATE, outcome, reason, detail, version)
                if key in firsts:  # a re-send within the same call answers the first's time too
                    assert result.processed_at == firsts[key].processed_at
            else:
                assert comparable(result) == expected[key]
                firsts[key] = result
        done += size
    for entity_type, name in streams:
        one = await entity_state(ledger, entity_type, f"one-{run}-{name}")
        split = await entity_state(ledger, entity_type, f"batch-{run}-{name}")
        assert split == one, (entity_type, name)


def test_mixed_batches_end_as_one_by_one(database_url: str, lock_strategy: str) -> None:
    with asyncio.Runner() as runner:
        engine = make_engine(database_url, pool_size=2)
        ledger = Ledger(engine, LedgerMetrics(CollectorRegistry()), lock_strategy=lock_strategy)

        @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            st.lists(ops, min_size=1, max_size=8),
            st.lists(ops, min_size=0, max_size=8),
            st.lists(SHIPMENT_OPS, min_size=1, max_size=7),
            st.lists(SHIPMENT_OPS, min_size=0, max_size=7),
            st.data(),
        )
        def check(
            sku_a: list[Any], sku_b: list[Any], ship_a: list[str], ship_b: list[str], data: st.DataObject
        ) -> None:
            streams = {
                (INVENTORY, "a"): sku_a,
                (INVENTORY, "b"): sku_b,
                (SHIPMENT, "a"): ship_a,
                (SHIPMENT, "b"): ship_b,
            }
            runner.run(mixed_batches_match_one_by_one(ledger, {k: v for k, v in streams.items() if v}, data))

        try:
            check()
        finally:
            runner.run(engine.dispose())


async def test_a_reservation_opened_and_released_in_one_call(stub: Stub) -> None:
    """Item k+1 sees item k's reservation: released in the same call, then its id stays taken."""
    requests = [
        recv("SKU-1", 1, quantity=10),
        req(inventory_event("SKU-1", 2, "inventory_reserved", location="A", quantity=4, reservation_id="R1")),
        req(inventory_event("SKU-1", 3, "inventory_released", reservation_id="R1")),
        req(inventory_event("SKU-1", 4, "inventory_reserved", location="A", quantity=1, reservation_id="R1")),
        req(inventory_event("SKU-1", 5, "inventory_released", reservation_id="R1")),
        req(inventory_event("SKU-1", 6, "inventory_reserved", location="A", quantity=3, reservation_id="R2")),
    ]
    reply = await stub.ApplyEvents(batch(*requests), timeout=TIMEOUT)
    assert [(r.outcome, r.reason) for r in reply.responses] == [
        (APPLIED, ""),
        (APPLIED, ""),
        (APPLIED, ""),
        (REJECTED, "RESERVATION_EXISTS"),
        (REJECTED, "UNKNOWN_RESERVATION"),
        (APPLIED, ""),
    ]
    view = await item(stub, "SKU-1")
    assert (balances(view), [(r.reservation_id, r.quantity) for r in view.reservations]) == (
        {"A": (10, 3)},
        [("R2", 3)],
    )
    # R2 opened in the call before, released now (its row written before, updated now).
    release = req(inventory_event("SKU-1", 7, "inventory_released", reservation_id="R2"))
    reply = await stub.ApplyEvents(batch(release, recv("SKU-1", 8, quantity=1)), timeout=TIMEOUT)
    assert [r.outcome for r in reply.responses] == [APPLIED, APPLIED]
    view = await item(stub, "SKU-1")
    assert (balances(view), list(view.reservations)) == ({"A": (11, 0)}, [])


async def test_a_conflict_within_one_call_names_the_second_item(stub: Stub) -> None:
    requests = [recv("SKU-1", 1, quantity=3), ship("S-1", 1, "shipment_created"), recv("SKU-1", 1, quantity=4)]
    code, info, message = await refused(stub.ApplyEvents(batch(*requests), timeout=TIMEOUT))
    assert (code, info.reason, info.metadata["index"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SEQUENCE_CONFLICT",
        "2",
    )
    assert message.startswith("requests[2]: ")
    assert await history(stub, INVENTORY, "SKU-1") == []
    assert await history(stub, SHIPMENT, "S-1") == []


async def test_a_call_costs_three_statements_whatever_its_size(database_url: str, lock_strategy: str) -> None:
    """The locks, one read of every head, one write of everything: per transaction, not per
    item (with the row strategy, a transaction per entity, whose lock is two statements)."""
    engine = make_engine(database_url, pool_size=2)
    ledger = Ledger(engine, LedgerMetrics(CollectorRegistry()), lock_strategy=lock_strategy)
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    try:
        await ledger.apply_event(recv("SKU-0", 1))  # the pool's first connection, opened before counting
        event.listen(engine.sync_engine, "before_cursor_execute", count)
        requests = [
            *(recv(f"SKU-{n}", 1) for n in range(1, 33)),
            *(ship(f"S-{n}", 1, "shipment_created") for n in range(16)),
            *(recv("SKU-0", seq) for seq in range(2, 18)),
        ]
        results = await ledger.apply_events(requests)
        assert {r.outcome for r in results} == {Outcome.APPLIED}
        entities = 32 + 16 + 1
        assert len(statements) == (3 if lock_strategy == "advisory" else 4 * entities)
    finally:
        await engine.dispose()
