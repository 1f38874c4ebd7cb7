"""The ledger over real gRPC on 127.0.0.1:0: queries, pagination, rich errors, health,
reflection; plus the error table and the settings."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import CollectorRegistry

from common.db import NotMigrated
from common.errors import DomainError
from common.interceptors import status_for
from common.settings import ConfigError
from ledger import errors
from ledger.config import Settings
from ledger.interceptors import DOMAIN, ERROR_TABLE
from ledger.server import App, build_server
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tests import support

TIMEOUT = 10.0
SHIPMENT = events_pb2.ENTITY_TYPE_SHIPMENT
ITEM = events_pb2.ENTITY_TYPE_INVENTORY_ITEM
SERVICE = "logistics.ledger.v1.LedgerService"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def app(database_url: str, registry: CollectorRegistry) -> AsyncIterator[App]:
    settings = Settings(database_url=database_url, listen_addr="127.0.0.1:0", metrics_addr="127.0.0.1:0")
    app = await build_server(settings, registry=registry)
    yield app
    await app.stop(0)


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> ledger_pb2_grpc.LedgerServiceAsyncStub:
    return ledger_pb2_grpc.LedgerServiceStub(channel)


def ev(entity_type: Any, entity_id: str, sequence: int, **payload: Any) -> ledger_pb2.ApplyEventRequest:
    e = events_pb2.Event(
        entity_type=entity_type, entity_id=entity_id, sequence=sequence, occurred_at=Timestamp(seconds=1)
    )
    for kind, message in payload.items():
        getattr(e, kind).CopyFrom(message)
    return ledger_pb2.ApplyEventRequest(event=e, transaction_id=f"tx-{entity_id}-{sequence}")


def receive(sku: str, seq: int, location: str, quantity: int) -> ledger_pb2.ApplyEventRequest:
    return ev(ITEM, sku, seq, inventory_received=events_pb2.InventoryReceived(location=location, quantity=quantity))


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    return support.error_info(exc, DOMAIN)


async def test_apply_and_get_shipment(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> None:
    created = ev(SHIPMENT, "S-1", 1, shipment_created=events_pb2.ShipmentCreated(order_id="O1", destination="BER"))
    call = stub.ApplyEvent(created, timeout=TIMEOUT, metadata=(("x-correlation-id", "corr-md"),))
    response = await call
    assert (response.outcome, response.version) == (ledger_pb2.APPLY_OUTCOME_APPLIED, 1)
    assert response.processed_at.seconds > 0
    assert ("x-correlation-id", "corr-md") in list(await call.trailing_metadata() or ())
    again = await stub.ApplyEvent(created, timeout=TIMEOUT)
    assert (again.outcome, again.original_outcome) == (
        ledger_pb2.APPLY_OUTCOME_DUPLICATE,
        ledger_pb2.APPLY_OUTCOME_APPLIED,
    )
    assert again.processed_at == response.processed_at
    picked = await stub.ApplyEvent(
        ev(SHIPMENT, "S-1", 2, shipment_picked=events_pb2.ShipmentPicked(warehouse_id="W1")), timeout=TIMEOUT
    )
    assert picked.outcome == ledger_pb2.APPLY_OUTCOME_APPLIED
    delivered = await stub.ApplyEvent(
        ev(SHIPMENT, "S-1", 3, shipment_delivered=events_pb2.ShipmentDelivered(received_by="Ann")), timeout=TIMEOUT
    )
    assert (delivered.outcome, delivered.reason, delivered.reason_detail) == (
        ledger_pb2.APPLY_OUTCOME_REJECTED,
        "ILLEGAL_TRANSITION",
        "SHIPMENT_STATUS_PICKED -> shipment_delivered",
    )

    shipment = (await stub.GetShipment(ledger_pb2.GetShipmentRequest(shipment_id="S-1"), timeout=TIMEOUT)).shipment
    assert shipment.status == ledger_pb2.SHIPMENT_STATUS_PICKED
    assert (shipment.version, shipment.order_id, shipment.destination, shipment.warehouse_id) == (3, "O1", "BER", "W1")
    assert not shipment.HasField("delivered_at")
    assert shipment.created_at.seconds > 0

    history = await stub.ListEntityHistory(
        ledger_pb2.ListEntityHistoryRequest(entity=events_pb2.EntityRef(entity_type=SHIPMENT, entity_id="S-1")),
        timeout=TIMEOUT,
    )
    assert [(e.sequence, e.kind, e.outcome) for e in history.entries] == [
        (1, "shipment_created", ledger_pb2.APPLY_OUTCOME_APPLIED),
        (2, "shipment_picked", ledger_pb2.APPLY_OUTCOME_APPLIED),
        (3, "shipment_delivered", ledger_pb2.APPLY_OUTCOME_REJECTED),
    ]
    # The request carried no correlation id: the one from the metadata is kept.
    assert history.entries[0].correlation_id == "corr-md"
    assert history.entries[0].transaction_id == "tx-S-1-1"
    assert history.entries[2].reason == "ILLEGAL_TRANSITION"
    assert history.next_page_token == ""


async def test_get_inventory_item_all_locations_or_one(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> None:
    requests = [
        receive("SKU-1", 1, "b-2", 5),
        receive("SKU-1", 2, "B-1", 7),
        receive("SKU-1", 3, "a-9", 1),
        ev(
            ITEM,
            "SKU-1",
            4,
            inventory_reserved=events_pb2.InventoryReserved(location="B-1", quantity=3, reservation_id="R1"),
        ),
        ev(
            ITEM,
            "SKU-1",
            5,
            inventory_moved=events_pb2.InventoryMoved(from_location="B-1", to_location="a-9", quantity=5),
        ),
    ]
    outcomes = [(await stub.ApplyEvent(r, timeout=TIMEOUT)).outcome for r in requests]
    assert outcomes[:4] == [ledger_pb2.APPLY_OUTCOME_APPLIED] * 4
    assert outcomes[4] == ledger_pb2.APPLY_OUTCOME_REJECTED  # only 4 of B-1's 7 are available

    item = (await stub.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku="SKU-1"), timeout=TIMEOUT)).item
    assert item.version == 5
    assert [(b.location, b.on_hand, b.reserved, b.available) for b in item.balances] == [
        ("B-1", 7, 3, 4),
        ("a-9", 1, 0, 1),
        ("b-2", 5, 0, 5),
    ]
    assert [(r.reservation_id, r.location, r.quantity) for r in item.reservations] == [("R1", "B-1", 3)]

    one = (
        await stub.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku="SKU-1", location="B-1"), timeout=TIMEOUT)
    ).item
    assert [(b.location, b.on_hand, b.reserved, b.available) for b in one.balances] == [("B-1", 7, 3, 4)]
    assert len(one.reservations) == 1
    other = (
        await stub.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku="SKU-1", location="b-2"), timeout=TIMEOUT)
    ).item
    assert [b.location for b in other.balances] == ["b-2"]
    assert list(other.reservations) == []


async def test_history_pages_walk_the_whole_history(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> None:
    for seq in range(1, 8):
        await stub.ApplyEvent(receive("SKU-P", seq, "A", seq), timeout=TIMEOUT)
    entity = events_pb2.EntityRef(entity_type=ITEM, entity_id="SKU-P")
    seen: list[int] = []
    pages = 0
    token = ""
    while True:
        page = await stub.ListEntityHistory(
            ledger_pb2.ListEntityHistoryRequest(entity=entity, page_size=3, page_token=token), timeout=TIMEOUT
        )
        pages += 1
        seen.extend(e.sequence for e in page.entries)
        assert len(page.entries) == (3 if page.next_page_token else 1)
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (list(range(1, 8)), 3)
    everything = await stub.ListEntityHistory(ledger_pb2.ListEntityHistoryRequest(entity=entity), timeout=TIMEOUT)
    assert [e.sequence for e in everything.entries] == seen


async def test_page_size_is_clamped_to_500(app: App, stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> None:
    for seq in range(1, 503):
        await app.service.apply_event(receive("SKU-BIG", seq, "A", 1))
    entity = events_pb2.EntityRef(entity_type=ITEM, entity_id="SKU-BIG")
    page = await stub.ListEntityHistory(
        ledger_pb2.ListEntityHistoryRequest(entity=entity, page_size=10_000), timeout=TIMEOUT
    )
    assert len(page.entries) == 500
    rest = await stub.ListEntityHistory(
        ledger_pb2.ListEntityHistoryRequest(entity=entity, page_size=10_000, page_token=page.next_page_token),
        timeout=TIMEOUT,
    )
    assert [e.sequence for e in rest.entries] == [501, 502]
    assert rest.next_page_token == ""
    default = await stub.ListEntityHistory(ledger_pb2.ListEntityHistoryRequest(entity=entity), timeout=TIMEOUT)
    assert len(default.entries) == 50


async def test_not_found_errors_carry_error_info(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetShipment(ledger_pb2.GetShipmentRequest(shipment_id="nope"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "SHIPMENT_NOT_FOUND"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku="nope"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "INVENTORY_ITEM_NOT_FOUND"

    entity = events_pb2.EntityRef(entity_type=ITEM, entity_id="nope")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListEntityHistory(ledger_pb2.ListEntityHistoryRequest(entity=entity), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "ENTITY_NOT_FOUND"


@pytest.mark.parametrize(
    ("page_size", "page_token", "reason"),
    [(-1, "", "INVALID_ARGUMENT"), (10, "not a token!", "INVALID_PAGE_TOKEN"), (10, "aDE6eA", "INVALID_PAGE_TOKEN")],
)
async def test_bad_history_requests_are_invalid_arguments(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub, page_size: int, page_token: str, reason: str
) -> None:
    await stub.ApplyEvent(receive("SKU-1", 1, "A", 1), timeout=TIMEOUT)
    entity = events_pb2.EntityRef(entity_type=ITEM, entity_id="SKU-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListEntityHistory(
            ledger_pb2.ListEntityHistoryRequest(entity=entity, page_size=page_size, page_token=page_token),
            timeout=TIMEOUT,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == reason


async def test_apply_event_errors_over_the_wire(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ApplyEvent(receive("SKU-1", 1, "A", 0), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_EVENT"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ApplyEvent(receive("SKU-1", 3, "A", 1), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert (info.reason, dict(info.metadata)) == ("OUT_OF_ORDER", {"expected_sequence": "1", "received_sequence": "3"})

    await stub.ApplyEvent(receive("SKU-1", 1, "A", 1), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ApplyEvent(receive("SKU-1", 1, "A", 2), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "SEQUENCE_CONFLICT"


async def test_metrics_count_outcomes_and_rpcs(
    registry: CollectorRegistry, stub: ledger_pb2_grpc.LedgerServiceAsyncStub
) -> None:
    await stub.ApplyEvent(receive("SKU-1", 1, "A", 1), timeout=TIMEOUT)
    await stub.ApplyEvent(receive("SKU-1", 1, "A", 1), timeout=TIMEOUT)
    assert registry.get_sample_value("ledger_outcomes_total", {"outcome": "APPLIED"}) == 1
    assert registry.get_sample_value("ledger_outcomes_total", {"outcome": "DUPLICATE"}) == 1
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "ApplyEvent"}
    assert registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 2


async def test_health_is_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("package", ["grpc.reflection.v1alpha", "grpc.reflection.v1"])
async def test_reflection_lists_the_service(channel: grpc.aio.Channel, package: str) -> None:
    call = channel.stream_stream(
        f"/{package}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
    names = [s.name async for r in call for s in r.list_services_response.service]
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


async def test_refuses_to_start_on_an_unmigrated_database(empty_database_url: str) -> None:
    settings = Settings(database_url=empty_database_url, listen_addr="127.0.0.1:0")
    with pytest.raises(NotMigrated):
        await build_server(settings, registry=CollectorRegistry())


# --- the error table and settings (no server needed) ------------------------------------------


def _error_classes() -> list[type[DomainError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, DomainError) and cls not in (DomainError, errors.LedgerError)
    ]


def test_every_error_class_is_in_the_table() -> None:
    classes = _error_classes()
    assert len(classes) >= 10
    missing = [cls.__name__ for cls in classes if cls not in ERROR_TABLE]
    assert missing == []


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_each_error_maps_to_its_own_row(cls: type[DomainError]) -> None:
    """The first match wins, so a subclass listed after its base would be mapped by the base."""
    status = status_for(cls("boom", key=1), ERROR_TABLE, DOMAIN)
    assert status.code == ERROR_TABLE[cls].value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (cls.reason, DOMAIN, {"key": "1"})


def test_settings_from_env() -> None:
    env = {"DATABASE_URL": "postgresql://u@h/db", "LEDGER_LOCK_STRATEGY": "row", "LEDGER_LISTEN_ADDR": "0.0.0.0:1"}
    with pytest.raises(ConfigError, match="not loopback"):
        Settings.from_env(env)  # exposed without TLS and credentials
    settings = Settings.from_env({**env, "LEDGER_ALLOW_INSECURE": "true"})
    assert (settings.lock_strategy, settings.listen_addr, settings.metrics_addr) == (
        "row",
        "0.0.0.0:1",
        "127.0.0.1:9465",
    )
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert Settings.from_env({"DATABASE_URL": "postgresql://u@h/db"}).listen_addr == "127.0.0.1:50052"


@pytest.mark.parametrize(
    "extra", [{"LEDGER_LOCK_STRATEGY": "mutex"}, {"LEDGER_LISTEN_ADRR": "x:1"}, {"LEDGER_DB_POOL_SIZE": "0"}]
)
def test_settings_reject_bad_and_unknown_keys(extra: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({"DATABASE_URL": "postgresql://u@h/db", **extra})
