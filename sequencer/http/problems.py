"""Errors as `application/problem+json` (RFC 9457), and the one table from gRPC status to HTTP.

The gRPC answer is the source: its code picks the HTTP status, its ErrorInfo gives `reason` and
`metadata`, its RetryInfo (when present) gives `Retry-After`. Errors of the HTTP layer itself
(no route, bad JSON, too large) use the same shape.
"""

from __future__ import annotations

import http
import json
import math
from collections.abc import Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

CONTENT_TYPE = "application/problem+json"
# `type` names the problem by its ErrorInfo reason; a URN, as no page is served per reason.
TYPE_PREFIX = "urn:logistics:problem:"

# gRPC code -> HTTP status, with the reasons that SPEC 13 maps more precisely.
STATUS_BY_CODE: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    # A request that conflicts with the current state of the entity (e.g. NOT_A_GAP).
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
}
STATUS_BY_REASON: Mapping[str, int] = {
    # The IETF idempotency-key draft: a key reused with another payload is 422.
    "IDEMPOTENCY_KEY_REUSED": 422,
    "SEQUENCE_CONFLICT": 409,
}
# Answers a client should retry after a while: they carry Retry-After.
RETRY_AFTER_STATUSES = frozenset({429, 503})
DEFAULT_RETRY_AFTER = 1


class Problem(Exception):
    """An HTTP error answer; raised by the HTTP layer, or built from a failed gRPC call."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.metadata = dict(metadata or {})
        self.headers = dict(headers or {})
        if status in RETRY_AFTER_STATUSES:
            self.headers.setdefault("Retry-After", str(retry_after or DEFAULT_RETRY_AFTER))
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", 'Bearer realm="logistics"')

    def body(self, correlation_id: str = "", instance: str = "") -> bytes:
        document: dict[str, Any] = {
            "type": TYPE_PREFIX + self.reason,
            "title": http.HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
            "reason": self.reason,
            "metadata": self.metadata,
        }
        if instance:
            document["instance"] = instance
        if correlation_id:
            document["correlation_id"] = correlation_id
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _details(trailing: Any) -> status_pb2.Status | None:
    for key, value in trailing or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 - unreadable details: answer from the code alone
                return None
    return None


def from_rpc_error(error: grpc.aio.AioRpcError) -> Problem:
    """The problem for a failed gRPC call: status from the code (or the reason), ErrorInfo
    reason and metadata, Retry-After from RetryInfo."""
    code = error.code()
    reason = code.name
    metadata: dict[str, str] = {}
    retry_after: int | None = None
    detail = error.details() or code.name
    status = _details(error.trailing_metadata())
    if status is not None:
        for item in status.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if item.Is(info.DESCRIPTOR) and item.Unpack(info):
                reason = info.reason or reason
                metadata = dict(info.metadata)
            elif item.Is(retry.DESCRIPTOR) and item.Unpack(retry):
                retry_after = max(1, math.ceil(retry.retry_delay.ToTimedelta().total_seconds()))
    http_status = STATUS_BY_REASON.get(reason, STATUS_BY_CODE.get(code, 500))
    if http_status == 500:
        # The server's INTERNAL answer is already generic; a local one (the channel's) may not be.
        detail = "internal error"
    return Problem(http_status, reason, detail, metadata=metadata, retry_after=retry_after)
