"""The hand-written Python client of the logistics sequencer and ledger.

It fills idempotency keys and reuses them on every retry, retries only what is safe
(UNAVAILABLE, DEADLINE_EXCEEDED) within the caller's overall deadline, sets a deadline on
every call, and turns `google.rpc.ErrorInfo` reasons into typed exceptions. `submit_many`
sends many events per SubmitEvents call, one key per item, and returns one outcome per event.

    from logistics.client import SequencerClient          # asyncio
    from logistics.client import SyncSequencerClient      # blocking
"""

from __future__ import annotations

from logistics.client._common import (
    MAX_BATCH,
    TERMINAL_STATES,
    RetryPolicy,
    SubmitOutcome,
    SubmitResult,
    channel_options,
    new_idempotency_key,
    service_config_json,
)
from logistics.client.aio import LedgerClient, SequencerClient, create_channel
from logistics.client.config import ClientConfig, ClientConfigError
from logistics.client.errors import (
    AccessError,
    BacklogFullError,
    CallerOverloadedError,
    ConflictError,
    DeadlineExceededError,
    EntityNotFoundError,
    EventNotFoundError,
    IdempotencyKeyInvalidError,
    IdempotencyKeyMissingError,
    IdempotencyKeyReusedError,
    IdempotencyRecordNotFoundError,
    InternalError,
    InvalidArgumentError,
    InvalidEventError,
    InvalidPageTokenError,
    InvalidRequestError,
    InventoryItemNotFoundError,
    LogisticsError,
    MalformedRequestError,
    NotAGapError,
    NotFoundError,
    OutOfOrderError,
    ParkedLimitReachedError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryableError,
    SequenceConflictError,
    ShipmentNotFoundError,
    TooManyWatchersError,
    TransientError,
    UnauthenticatedError,
    UnavailableError,
)
from logistics.client.results import EntityKey, EntityType, EventState, Status
from logistics.client.sync import SyncSequencerClient

__all__ = [
    "MAX_BATCH",
    "TERMINAL_STATES",
    "AccessError",
    "BacklogFullError",
    "CallerOverloadedError",
    "ClientConfig",
    "ClientConfigError",
    "ConflictError",
    "DeadlineExceededError",
    "EntityKey",
    "EntityNotFoundError",
    "EntityType",
    "EventNotFoundError",
    "EventState",
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
    "LedgerClient",
    "LogisticsError",
    "MalformedRequestError",
    "NotAGapError",
    "NotFoundError",
    "OutOfOrderError",
    "ParkedLimitReachedError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RetryableError",
    "SequenceConflictError",
    "SequencerClient",
    "ShipmentNotFoundError",
    "Status",
    "SubmitOutcome",
    "SubmitResult",
    "SyncSequencerClient",
    "TooManyWatchersError",
    "TransientError",
    "UnauthenticatedError",
    "UnavailableError",
    "channel_options",
    "create_channel",
    "new_idempotency_key",
    "service_config_json",
]
