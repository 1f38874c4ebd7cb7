"""The one table from sequencer errors to gRPC status codes (ErrorInfo domain below)."""

from __future__ import annotations

import grpc

from common.interceptors import ErrorTable, ServiceInterceptor
from common.metrics import RpcMetrics
from sequencer import errors

DOMAIN = "sequencer.logistics"

ERROR_TABLE: ErrorTable = {
    errors.IdempotencyKeyMissing: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IdempotencyKeyInvalid: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidEvent: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IdempotencyKeyReused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SequenceConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotAGap: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ParkedLimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManyWatchers: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.EntityNotFound: grpc.StatusCode.NOT_FOUND,
    errors.EventNotFound: grpc.StatusCode.NOT_FOUND,
    errors.IdempotencyRecordNotFound: grpc.StatusCode.NOT_FOUND,
    errors.DeadlineReached: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Retryable: grpc.StatusCode.UNAVAILABLE,
}


def build_interceptor(metrics: RpcMetrics) -> ServiceInterceptor:
    return ServiceInterceptor(ERROR_TABLE, DOMAIN, metrics)
