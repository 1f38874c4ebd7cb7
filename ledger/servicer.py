"""LedgerService over gRPC: proto in, service call, proto out. Errors are the interceptor's job."""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ledger import domain, traces
from ledger.batch import ApplyResult
from ledger.repository import HistoryRecord
from ledger.service import Ledger
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc


def _ts(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _outcome(value: domain.Outcome | None) -> ledger_pb2.ApplyOutcome.ValueType:
    if value is None:
        return ledger_pb2.APPLY_OUTCOME_UNSPECIFIED
    return ledger_pb2.ApplyOutcome.Value(f"APPLY_OUTCOME_{value.name}")


def shipment_to_proto(shipment: domain.Shipment, version: int) -> ledger_pb2.Shipment:
    return ledger_pb2.Shipment(
        shipment_id=shipment.shipment_id,
        status=ledger_pb2.ShipmentStatus.Value(shipment.status.label),
        version=version,
        order_id=shipment.order_id,
        origin=shipment.origin,
        destination=shipment.destination,
        warehouse_id=shipment.warehouse_id,
        package_count=shipment.package_count,
        vehicle_id=shipment.vehicle_id,
        carrier=shipment.carrier,
        tracking_number=shipment.tracking_number,
        delivered_at=_ts(shipment.delivered_at),
        received_by=shipment.received_by,
        cancel_reason=shipment.cancel_reason,
        created_at=_ts(shipment.created_at),
        updated_at=_ts(shipment.updated_at),
    )


def result_to_proto(result: ApplyResult) -> ledger_pb2.ApplyEventResponse:
    return ledger_pb2.ApplyEventResponse(
        outcome=_outcome(result.outcome),
        original_outcome=_outcome(result.original_outcome),
        reason=result.reason,
        reason_detail=result.reason_detail,
        version=result.version,
        processed_at=_ts(result.processed_at),
    )


def history_to_proto(record: HistoryRecord) -> ledger_pb2.HistoryEntry:
    return ledger_pb2.HistoryEntry(
        sequence=record.sequence,
        kind=record.kind,
        outcome=_outcome(record.outcome),
        reason=record.reason,
        reason_detail=record.reason_detail,
        correlation_id=record.correlation_id,
        transaction_id=record.transaction_id,
        source=record.source,
        occurred_at=_ts(record.occurred_at),
        processed_at=_ts(record.processed_at),
    )


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def ApplyEvent(
        self,
        request: ledger_pb2.ApplyEventRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.ApplyEventRequest, ledger_pb2.ApplyEventResponse],
    ) -> ledger_pb2.ApplyEventResponse:
        with traces.applying([request]) as done:
            result = await self.ledger.apply_event(request)
            done([result])
        return result_to_proto(result)

    async def ApplyEvents(
        self,
        request: ledger_pb2.ApplyEventsRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.ApplyEventsRequest, ledger_pb2.ApplyEventsResponse],
    ) -> ledger_pb2.ApplyEventsResponse:
        with traces.applying(request.requests) as done:
            results = await self.ledger.apply_events(request.requests)
            done(results)
        return ledger_pb2.ApplyEventsResponse(responses=[result_to_proto(r) for r in results])

    async def GetShipment(
        self,
        request: ledger_pb2.GetShipmentRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.GetShipmentRequest, ledger_pb2.GetShipmentResponse],
    ) -> ledger_pb2.GetShipmentResponse:
        shipment, version = await self.ledger.get_shipment(request.shipment_id)
        return ledger_pb2.GetShipmentResponse(shipment=shipment_to_proto(shipment, version))

    async def GetInventoryItem(
        self,
        request: ledger_pb2.GetInventoryItemRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.GetInventoryItemRequest, ledger_pb2.GetInventoryItemResponse],
    ) -> ledger_pb2.GetInventoryItemResponse:
        view = await self.ledger.get_inventory_item(request.sku, request.location)
        item = ledger_pb2.InventoryItem(
            sku=view.sku,
            version=view.version,
            balances=[
                ledger_pb2.LocationBalance(
                    location=location, on_hand=b.on_hand, reserved=b.reserved, available=b.available
                )
                for location, b in view.balances
            ],
            reservations=[
                ledger_pb2.Reservation(reservation_id=r.reservation_id, location=r.location, quantity=r.quantity)
                for r in view.reservations
            ],
            updated_at=_ts(view.updated_at),
        )
        return ledger_pb2.GetInventoryItemResponse(item=item)

    async def ListEntityHistory(
        self,
        request: ledger_pb2.ListEntityHistoryRequest,
        context: grpc.aio.ServicerContext[ledger_pb2.ListEntityHistoryRequest, ledger_pb2.ListEntityHistoryResponse],
    ) -> ledger_pb2.ListEntityHistoryResponse:
        page = await self.ledger.list_history(
            request.entity.entity_type, request.entity.entity_id, request.page_size, request.page_token
        )
        return ledger_pb2.ListEntityHistoryResponse(
            entries=[history_to_proto(r) for r in page.entries], next_page_token=page.next_page_token
        )
