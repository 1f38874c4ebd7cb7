"""The one table from ledger errors to gRPC status codes (ErrorInfo domain below).

Order matters: the first matching class wins, so subclasses come before their bases.
"""

from __future__ import annotations

import grpc

from common.interceptors import ErrorTable, ServiceInterceptor
from common.metrics import RpcMetrics
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
    errors.Retryable: grpc.StatusCode.UNAVAILABLE,
}


def build_interceptor(metrics: RpcMetrics) -> ServiceInterceptor:
    return ServiceInterceptor(ERROR_TABLE, DOMAIN, metrics)
