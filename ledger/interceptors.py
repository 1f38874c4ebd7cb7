"""The one table from ledger errors to gRPC status codes (ErrorInfo domain below).

The table is looked up along an error's MRO (common.interceptors.status_for): the most specific
class listed wins. tests/unit/test_error_tables.py checks every error class has a code.
"""

from __future__ import annotations

import grpc

from common.auth import Authenticator
from common.interceptors import ErrorTable, ServiceInterceptor
from ledger import errors

DOMAIN = "ledger.logistics"

ERROR_TABLE: ErrorTable = {
    errors.InvalidEvent: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidPageToken: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SequenceConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfOrder: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ShipmentNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InventoryItemNotFound: grpc.StatusCode.NOT_FOUND,
    errors.EntityNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.DeadlineReached: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Retryable: grpc.StatusCode.UNAVAILABLE,
}


_LEDGER = "/logistics.ledger.v1.LedgerService/"

# Which roles may call which RPC: ApplyEvent only the sequencer's identity; reads need `reader`.
POLICY: dict[str, frozenset[str]] = {
    _LEDGER + "ApplyEvent": frozenset({"sequencer"}),
    _LEDGER + "ApplyEvents": frozenset({"sequencer"}),
    _LEDGER + "GetShipment": frozenset({"reader", "admin"}),
    _LEDGER + "GetInventoryItem": frozenset({"reader", "admin"}),
    _LEDGER + "ListEntityHistory": frozenset({"reader", "admin"}),
}


def build_interceptor(authenticator: Authenticator, max_message_bytes: int | None = None) -> ServiceInterceptor:
    return ServiceInterceptor(ERROR_TABLE, DOMAIN, authenticator, POLICY, max_message_bytes=max_message_bytes)
