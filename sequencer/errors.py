"""The sequencer's errors. Each carries an ErrorInfo reason; interceptors.py maps them to codes."""

from __future__ import annotations

from common.errors import DeadlineReached, DomainError, InvalidArgument, NotFound, Overloaded, Retryable

__all__ = [
    "BacklogFull",
    "CallerOverloaded",
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
    "Overloaded",
    "ParkedLimitReached",
    "Retryable",
    "SequenceConflict",
    "SequencerError",
    "TooManyWatchers",
    "WebhookDeliveryNotFound",
    "WebhookSubscriptionDisabled",
    "WebhookSubscriptionNotFound",
    "WebhookTargetNotAllowed",
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


class WebhookTargetNotAllowed(SequencerError, InvalidArgument):
    """The subscription's URL is malformed or its host is not on SEQUENCER_WEBHOOK_ALLOWED_HOSTS."""

    reason = "WEBHOOK_TARGET_NOT_ALLOWED"


class WebhookSubscriptionNotFound(SequencerError, NotFound):
    reason = "WEBHOOK_SUBSCRIPTION_NOT_FOUND"


class WebhookDeliveryNotFound(SequencerError, NotFound):
    reason = "WEBHOOK_DELIVERY_NOT_FOUND"


class WebhookSubscriptionDisabled(SequencerError):
    """The delivery's subscription is disabled: nothing is sent for it (create a new one)."""

    reason = "WEBHOOK_SUBSCRIPTION_DISABLED"


class CallerOverloaded(SequencerError, Overloaded):
    """The caller already has SEQUENCER_MAX_INFLIGHT_PER_CALLER requests in flight (SPEC 12)."""

    reason = "CALLER_OVERLOADED"
    # In-flight requests end within milliseconds: a short wait frees a slot.
    default_retry_after = 0.1


class BacklogFull(SequencerError, Overloaded):
    """Accepted events not yet processed reached SEQUENCER_MAX_BACKLOG (SPEC 12)."""

    reason = "BACKLOG_FULL"
    # The backlog drains at the ledger's pace and is counted about once a second.
    default_retry_after = 1.0
