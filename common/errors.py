"""The root of both services' error hierarchies: a reason code, a message, and metadata."""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    """A rule the caller broke or a state the caller must know about; never a transport type.

    `reason` is the ErrorInfo reason (UPPER_SNAKE_CASE) and `metadata` its key/value details.
    """

    reason: ClassVar[str] = "UNSPECIFIED"

    def __init__(self, message: str, **metadata: Any) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class Retryable(DomainError):
    """A transient failure (serialization failure, deadlock, lost connection): safe to retry."""

    reason = "TRANSIENT"


class DeadlineReached(DomainError):
    """Waiting for a lock or a result outlived the caller's deadline."""

    reason = "DEADLINE_EXCEEDED"


class InvalidArgument(DomainError):
    """A field of the request is missing or malformed."""

    reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    reason = "NOT_FOUND"


class Unauthenticated(DomainError):
    """No valid credentials came with the call."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The caller is known but none of its roles allows this RPC."""

    reason = "PERMISSION_DENIED"


class MalformedRequest(DomainError):
    """The request bytes are not a valid message of the RPC's request type."""

    reason = "MALFORMED_REQUEST"


class RequestTooLarge(DomainError):
    """The request message is larger than the server's configured limit (*_MAX_MESSAGE_BYTES)."""

    reason = "REQUEST_TOO_LARGE"


class Overloaded(DomainError):
    """Admission refused the call for now (a flow-control bound, SPEC 12): nothing was stored,
    and the same request with the same key succeeds once the load drains. `retry_after` is the
    wait the answer's google.rpc.RetryInfo names."""

    reason = "OVERLOADED"
    #: Seconds to wait before retrying, when the raiser names none.
    default_retry_after: ClassVar[float] = 1.0

    def __init__(self, message: str, *, retry_after: float | None = None, **metadata: Any) -> None:
        super().__init__(message, **metadata)
        self.retry_after = self.default_retry_after if retry_after is None else retry_after
