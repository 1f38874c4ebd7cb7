"""Helpers the tests share: event builders, real servers on port 0, ErrorInfo extraction."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc

SHIPMENT = events_pb2.ENTITY_TYPE_SHIPMENT
INVENTORY = events_pb2.ENTITY_TYPE_INVENTORY_ITEM

SHIPMENT_PAYLOADS: dict[str, Any] = {
    "shipment_created": events_pb2.ShipmentCreated(order_id="ORD-1", origin="AMS", destination="BER"),
    "shipment_picked": events_pb2.ShipmentPicked(warehouse_id="WH-1"),
    "shipment_packed": events_pb2.ShipmentPacked(package_count=2),
    "shipment_loaded": events_pb2.ShipmentLoaded(vehicle_id="TRUCK-7"),
    "shipment_shipped": events_pb2.ShipmentShipped(carrier="DHL", tracking_number="TRK-1"),
    "shipment_delivered": events_pb2.ShipmentDelivered(received_by="front desk"),
    "shipment_cancelled": events_pb2.ShipmentCancelled(reason="customer request"),
}


def shipment_event(entity_id: str, sequence: int, kind: str, **fields: Any) -> events_pb2.Event:
    payload = type(SHIPMENT_PAYLOADS[kind])()
    payload.CopyFrom(SHIPMENT_PAYLOADS[kind])
    for name, value in fields.items():
        setattr(payload, name, value)
    event = events_pb2.Event(entity_type=SHIPMENT, entity_id=entity_id, sequence=sequence, source="tests")
    getattr(event, kind).CopyFrom(payload)
    return event


def inventory_event(sku: str, sequence: int, kind: str, **fields: Any) -> events_pb2.Event:
    payload_type = {
        "inventory_received": events_pb2.InventoryReceived,
        "inventory_adjusted": events_pb2.InventoryAdjusted,
        "inventory_reserved": events_pb2.InventoryReserved,
        "inventory_released": events_pb2.InventoryReleased,
        "inventory_moved": events_pb2.InventoryMoved,
    }[kind]
    event = events_pb2.Event(entity_type=INVENTORY, entity_id=sku, sequence=sequence, source="tests")
    getattr(event, kind).CopyFrom(payload_type(**fields))
    return event


def submit_request(event: events_pb2.Event, **kwargs: Any) -> sequencer_pb2.SubmitEventRequest:
    return sequencer_pb2.SubmitEventRequest(event=event, **kwargs)


def error_info(exc: grpc.aio.AioRpcError | grpc.RpcError, domain: str | None = None) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo detail of a failed call (fails the test when absent, or when it
    names another domain than `domain`)."""
    trailing: Any = exc.trailing_metadata() or ()
    raw = next(v for k, v in trailing if k == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert domain is None or info.domain == domain, info
            return info
    raise AssertionError("no ErrorInfo in the status details")


async def trailing(call: Any) -> dict[str, str]:
    """Trailing metadata of a finished grpc.aio call, as a dict of its text entries."""
    return {k: v for k, v in (await call.trailing_metadata() or ()) if isinstance(v, str)}


def sequencer_test_settings(database_url: str) -> Any:
    """The sequencer's settings for tests: port 0 everywhere, a quick poll and retry budget; the
    ledger target is replaced by tests that start a ledger."""
    from sequencer.config import Settings

    return Settings(
        database_url=database_url,
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        # Never the default 127.0.0.1:8080: tests run side by side.
        http_addr="127.0.0.1:0",
        ledger_target="127.0.0.1:1",
        forwarder_poll_interval=0.2,
        forwarder_retry_budget=1.0,
        ledger_timeout=2.0,
    )


def with_overrides(settings: Any, **overrides: Any) -> Any:
    return dataclasses.replace(settings, **overrides)


class System:
    """A running ledger + sequencer pair and typed stubs for both (always with deadlines)."""

    def __init__(self) -> None:
        self.ledger_app: Any = None
        self.sequencer_app: Any = None
        # Stubs on grpc.aio channels (the generated types describe sync calls).
        self.ledger: Any = None
        self.sequencer: Any = None
        self.admin: Any = None
        self.channels: list[grpc.aio.Channel] = []

    @classmethod
    async def start(
        cls,
        database_url: str,
        sequencer_settings: Any,
        *,
        lock_strategy: str = "advisory",
        registry: Any = None,
        **ledger: Any,
    ) -> System:
        from ledger.config import Settings as LedgerSettings
        from ledger.server import build_server as build_ledger

        system = cls()
        system.ledger_app = await build_ledger(
            LedgerSettings(
                database_url=database_url,
                listen_addr="127.0.0.1:0",
                metrics_addr="127.0.0.1:0",
                lock_strategy=lock_strategy,
                **ledger,
            )
        )
        settings = dataclasses.replace(
            sequencer_settings,
            ledger_target=f"127.0.0.1:{system.ledger_app.port}",
            lock_strategy=lock_strategy,
        )
        await system.start_sequencer(settings, **({"registry": registry} if registry is not None else {}))
        system.ledger = ledger_pb2_grpc.LedgerServiceStub(system._channel(system.ledger_app.port))
        return system

    async def start_sequencer(self, settings: Any, **kwargs: Any) -> None:
        from sequencer.server import build_server

        self.sequencer_settings = settings
        self.sequencer_app = await build_server(settings, **kwargs)
        channel = self._channel(self.sequencer_app.port)
        self.sequencer = sequencer_pb2_grpc.SequencerServiceStub(channel)
        self.admin = sequencer_pb2_grpc.SequencerAdminServiceStub(channel)

    def _channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return channel

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        if self.sequencer_app is not None:
            await self.sequencer_app.stop(0)
        if self.ledger_app is not None:
            await self.ledger_app.stop(0)

    async def submit(self, event: events_pb2.Event, key: str | None = None, **kwargs: Any) -> Any:
        key = key or f"{event.entity_id}-{event.sequence}-{uuid.uuid4().hex[:8]}"
        return await self.sequencer.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=event, **kwargs),
            metadata=(("idempotency-key", key),),
            timeout=10,
        )

    async def status(self, transaction_id: str) -> sequencer_pb2.EventStatus:
        reply = await self.sequencer.GetEventStatus(
            sequencer_pb2.GetEventStatusRequest(transaction_id=transaction_id), timeout=5
        )
        status: sequencer_pb2.EventStatus = reply.status
        return status

    async def wait_terminal(self, transaction_id: str, timeout: float = 30.0) -> sequencer_pb2.EventStatus:
        """Polls the public status until terminal (how a caller without streams would)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            status = await self.status(transaction_id)
            if status.state in TERMINAL_STATES:
                return status
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{transaction_id} still {events_pb2.EventState.Name(status.state)}")
            await asyncio.sleep(0.02)

    async def shipment(self, shipment_id: str) -> Any:
        reply = await self.ledger.GetShipment(ledger_pb2.GetShipmentRequest(shipment_id=shipment_id), timeout=5)
        return reply.shipment

    async def history(self, entity_type: int, entity_id: str) -> list[Any]:
        entries: list[Any] = []
        token = ""
        while True:
            reply = await self.ledger.ListEntityHistory(
                ledger_pb2.ListEntityHistoryRequest(
                    entity=events_pb2.EntityRef(entity_type=entity_type, entity_id=entity_id),  # type: ignore[arg-type]
                    page_size=100,
                    page_token=token,
                ),
                timeout=5,
            )
            entries.extend(reply.entries)
            token = reply.next_page_token
            if not token:
                return entries


TERMINAL_STATES = {
    events_pb2.EVENT_STATE_APPLIED,
    events_pb2.EVENT_STATE_REJECTED,
    events_pb2.EVENT_STATE_SKIPPED,
}
