"""The sequencer's errors. Each carries an ErrorInfo reason; interceptors.py maps them to codes."""

from __future__ import annotations

from common.errors import DeadlineReached, DomainError, InvalidArgument, NotFound, Retryable

__all__ = [
    "DeadlineReached",
    "EntityNotFound",
    "EventNotFound",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyRecordNotFound",
    "InvalidArgument",
    "InvalidEvent",
    "NotAGap",
    "ParkedLimitReached",
    "Retryable",
    "SequenceConflict",
    "SequencerError",
    "TooManyWatchers",
]


class SequencerError(DomainError):
    """Base of every sequencer-specific error."""


class IdempotencyKeyMissing(SequencerError, InvalidArgument):
    reason = "IDEMPOTENCY_KEY_MISSING"


class IdempotencyKeyInvalid(SequencerError, InvalidArgument):
    reason = "IDEMPOTENCY_KEY_INVALID"


class IdempotencyKeyReused(SequencerError):
    """The key was first used with a different request; `fields` names what differs."""

    reason = "IDEMPOTENCY_KEY_REUSED"


class InvalidEvent(SequencerError, InvalidArgument):
    """The event is malformed (missing fields, wrong kind for the entity type, bad numbers)."""

    reason = "INVALID_EVENT"


class SequenceConflict(SequencerError):
    """The MSI is already held or processed with a different payload: a producer bug."""

    reason = "SEQUENCE_CONFLICT"


class ParkedLimitReached(SequencerError):
    """This entity already holds the maximum number of parked events."""

    reason = "PARKED_LIMIT_REACHED"


class NotAGap(SequencerError):
    """SkipSequence named an MSI that is not missing (already held, processed, or past the end)."""

    reason = "NOT_A_GAP"


class NotBlocked(SequencerError):
    """RetryBlockedEvent named an MSI that is not its entity's BLOCKED event."""

    reason = "NOT_BLOCKED"


class EntityNotFound(SequencerError, NotFound):
    reason = "ENTITY_NOT_FOUND"


class EventNotFound(SequencerError, NotFound):
    reason = "EVENT_NOT_FOUND"


class IdempotencyRecordNotFound(SequencerError, NotFound):
    reason = "IDEMPOTENCY_RECORD_NOT_FOUND"


class TooManyWatchers(SequencerError):
    reason = "TOO_MANY_WATCHERS"
