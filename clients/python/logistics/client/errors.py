"""Typed exceptions for failed calls, chosen by the `google.rpc.ErrorInfo` reason the servers send.

Callers catch what they can act on (`IdempotencyKeyReusedError`, `SequenceConflictError`, ...)
or a family (`InvalidRequestError`, `NotFoundError`, `RetryableError`, ...); anything unknown
arrives as the base `LogisticsError`, which always carries the gRPC code, the reason, the
ErrorInfo metadata and the server's message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import grpc

__all__ = [
    "CODES",
    "REASONS",
    "AccessError",
    "BacklogFullError",
    "CallerOverloadedError",
    "ConflictError",
    "DeadlineExceededError",
    "EntityNotFoundError",
    "EventNotFoundError",
    "IdempotencyKeyInvalidError",
    "IdempotencyKeyMissingError",
    "IdempotencyKeyReusedError",
    "IdempotencyRecordNotFoundError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidEventError",
    "InvalidPageTokenError",
    "InvalidRequestError",
    "InventoryItemNotFoundError",
    "LogisticsError",
    "MalformedRequestError",
    "NotAGapError",
    "NotFoundError",
    "OutOfOrderError",
    "ParkedLimitReachedError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryableError",
    "SequenceConflictError",
    "ShipmentNotFoundError",
    "TooManyWatchersError",
    "TransientError",
    "UnauthenticatedError",
    "UnavailableError",
]


class LogisticsError(Exception):
    """A failed call: gRPC `code`, ErrorInfo `reason` and `metadata`, and the server's message.

    `reason` is empty when the status carried no ErrorInfo (for example a connection failure
    or a deadline that ran out on the client side). `idempotency_key` names the item an error of
    `submit_many` belongs to (empty on errors of a whole call), so a caller can re-send that item
    with the same key.
    """

    #: The ErrorInfo reason a subclass stands for ("" for families and the base).
    REASON: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        domain: str = "",
        correlation_id: str = "",
        idempotency_key: str = "",
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.details = message
        self.domain = domain
        self.correlation_id = correlation_id
        self.idempotency_key = idempotency_key
        #: Seconds the server asked the caller to wait before retrying (google.rpc.RetryInfo).
        self.retry_delay = retry_delay

    @property
    def message(self) -> str:
        return self.details

    def __str__(self) -> str:
        label = f"{self.code.name} {self.reason}" if self.reason else self.code.name
        return f"{label}: {self.details}"


# Families: what a caller can do about the failure.


class InvalidRequestError(LogisticsError):
    """The request is malformed; sending it again unchanged fails again."""

    @property
    def field(self) -> str:
        """The offending field path, when the server named one."""
        return self.metadata.get("field", "")


class ConflictError(LogisticsError):
    """The request contradicts what the server already holds (FAILED_PRECONDITION)."""


class NotFoundError(LogisticsError):
    """The named transaction, entity or record does not exist (or not in the caller's scope)."""


class ResourceExhaustedError(LogisticsError):
    """A per-entity or per-caller limit was reached; retry later, after it drains."""


class RetryableError(LogisticsError):
    """A transient failure: the same request with the same idempotency key is safe to retry."""


class AccessError(LogisticsError):
    """The call lacks valid credentials, or the caller's roles do not allow it."""


class InternalError(LogisticsError):
    REASON = "INTERNAL"


class UnauthenticatedError(AccessError):
    """No valid credentials: a missing or unknown bearer token, or no client certificate."""

    REASON = "UNAUTHENTICATED"


class PermissionDeniedError(AccessError):
    """The caller is known, but none of its roles may call this RPC (`required_roles`)."""

    REASON = "PERMISSION_DENIED"


# Reasons.


class IdempotencyKeyMissingError(InvalidRequestError):
    REASON = "IDEMPOTENCY_KEY_MISSING"


class IdempotencyKeyInvalidError(InvalidRequestError):
    REASON = "IDEMPOTENCY_KEY_INVALID"


class InvalidEventError(InvalidRequestError):
    REASON = "INVALID_EVENT"


class InvalidArgumentError(InvalidRequestError):
    REASON = "INVALID_ARGUMENT"


class InvalidPageTokenError(InvalidRequestError):
    REASON = "INVALID_PAGE_TOKEN"


class MalformedRequestError(InvalidRequestError):
    """The request bytes did not parse as the RPC's request message."""

    REASON = "MALFORMED_REQUEST"


class IdempotencyKeyReusedError(ConflictError):
    """The key was first used with a different request; nothing ran."""

    REASON = "IDEMPOTENCY_KEY_REUSED"

    @property
    def fields(self) -> list[str]:
        """The request fields that differ from the key's first use."""
        return [f for f in self.metadata.get("fields", "").split(",") if f]


class SequenceConflictError(ConflictError):
    """The MSI is already held or processed with a different payload: a producer bug."""

    REASON = "SEQUENCE_CONFLICT"


class NotAGapError(ConflictError):
    REASON = "NOT_A_GAP"


class OutOfOrderError(ConflictError):
    REASON = "OUT_OF_ORDER"

    @property
    def expected_sequence(self) -> int | None:
        value = self.metadata.get("expected_sequence", "")
        return int(value) if value.isdigit() else None


class EventNotFoundError(NotFoundError):
    REASON = "EVENT_NOT_FOUND"


class EntityNotFoundError(NotFoundError):
    REASON = "ENTITY_NOT_FOUND"


class IdempotencyRecordNotFoundError(NotFoundError):
    REASON = "IDEMPOTENCY_RECORD_NOT_FOUND"


class ShipmentNotFoundError(NotFoundError):
    REASON = "SHIPMENT_NOT_FOUND"


class InventoryItemNotFoundError(NotFoundError):
    REASON = "INVENTORY_ITEM_NOT_FOUND"


class ParkedLimitReachedError(ResourceExhaustedError):
    REASON = "PARKED_LIMIT_REACHED"


class TooManyWatchersError(ResourceExhaustedError):
    REASON = "TOO_MANY_WATCHERS"


class CallerOverloadedError(ResourceExhaustedError):
    """The caller had too many requests in flight (SEQUENCER_MAX_INFLIGHT_PER_CALLER); nothing
    was stored. The client already retried after `retry_delay` until its deadline or attempts ran out."""

    REASON = "CALLER_OVERLOADED"


class BacklogFullError(ResourceExhaustedError):
    """The sequencer's backlog of events not yet applied is full (SEQUENCER_MAX_BACKLOG);
    nothing was stored. Retry later with the same key."""

    REASON = "BACKLOG_FULL"


class TransientError(RetryableError):
    """The server hit a transient failure (serialization failure, lost connection)."""

    REASON = "TRANSIENT"


class UnavailableError(RetryableError):
    """The server could not be reached, or the connection broke before an answer arrived."""


class DeadlineExceededError(RetryableError):
    """The deadline ran out (on the client, or while the server waited for a lock)."""

    REASON = "DEADLINE_EXCEEDED"


#: ErrorInfo reason -> exception class, for every reason the two services send.
REASONS: Mapping[str, type[LogisticsError]] = {
    cls.REASON: cls
    for cls in (
        IdempotencyKeyMissingError,
        IdempotencyKeyInvalidError,
        InvalidEventError,
        InvalidArgumentError,
        InvalidPageTokenError,
        MalformedRequestError,
        IdempotencyKeyReusedError,
        SequenceConflictError,
        NotAGapError,
        OutOfOrderError,
        EventNotFoundError,
        EntityNotFoundError,
        IdempotencyRecordNotFoundError,
        ShipmentNotFoundError,
        InventoryItemNotFoundError,
        ParkedLimitReachedError,
        TooManyWatchersError,
        CallerOverloadedError,
        BacklogFullError,
        TransientError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        InternalError,
    )
}

#: Status code -> class, for failures that carry no ErrorInfo at all (transport failures, a
#: deadline that ran out on the client). A reason this table does not know becomes the base class.
CODES: Mapping[grpc.StatusCode, type[LogisticsError]] = {
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}
