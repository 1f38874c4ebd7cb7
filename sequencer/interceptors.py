"""The one table from sequencer errors to gRPC status codes (ErrorInfo domain below)."""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from common.auth import Authenticator
from common.errors import DomainError
from common.interceptors import COMMON_TABLE, ErrorTable, Gate, ServiceInterceptor, status_for
from sequencer import errors

DOMAIN = "sequencer.logistics"

ERROR_TABLE: ErrorTable = {
    errors.IdempotencyKeyMissing: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IdempotencyKeyInvalid: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidEvent: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.WebhookTargetNotAllowed: grpc.StatusCode.INVALID_ARGUMENT,
    errors.WebhookSubscriptionDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    errors.WebhookSubscriptionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.WebhookDeliveryNotFound: grpc.StatusCode.NOT_FOUND,
    errors.IdempotencyKeyReused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SequenceConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotAGap: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotBlocked: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ParkedLimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManyWatchers: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.CallerOverloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.BacklogFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.EntityNotFound: grpc.StatusCode.NOT_FOUND,
    errors.EventNotFound: grpc.StatusCode.NOT_FOUND,
    errors.IdempotencyRecordNotFound: grpc.StatusCode.NOT_FOUND,
    errors.DeadlineReached: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Retryable: grpc.StatusCode.UNAVAILABLE,
}


_SEQ = "/logistics.sequencer.v1.SequencerService/"
_ADMIN = "/logistics.sequencer.v1.SequencerAdminService/"
ANYONE_KNOWN = frozenset({"submitter", "reader", "admin"})

# Which roles may call which RPC; anything not listed is denied.
POLICY: dict[str, frozenset[str]] = {
    _SEQ + "SubmitEvent": frozenset({"submitter"}),
    _SEQ + "SubmitEvents": frozenset({"submitter"}),
    # Reads are scoped to the caller's own records (admins see all), so any known role may ask.
    _SEQ + "GetEventStatus": ANYONE_KNOWN,
    _SEQ + "WatchEventStatus": ANYONE_KNOWN,
    _ADMIN + "ListGaps": frozenset({"admin"}),
    _ADMIN + "ListParkedEvents": frozenset({"admin"}),
    _ADMIN + "GetEntity": frozenset({"admin"}),
    _ADMIN + "SkipSequence": frozenset({"admin"}),
    _ADMIN + "ListBlockedEvents": frozenset({"admin"}),
    _ADMIN + "RetryBlockedEvent": frozenset({"admin"}),
    _ADMIN + "CreateWebhookSubscription": frozenset({"admin"}),
    _ADMIN + "ListWebhookSubscriptions": frozenset({"admin"}),
    _ADMIN + "DeleteWebhookSubscription": frozenset({"admin"}),
    _ADMIN + "ListWebhookDeliveries": frozenset({"admin"}),
    _ADMIN + "RedeliverWebhook": frozenset({"admin"}),
    _ADMIN + "GetIdempotencyRecord": ANYONE_KNOWN,
}


def build_interceptor(
    authenticator: Authenticator, gate: Gate | None = None, max_message_bytes: int | None = None
) -> ServiceInterceptor:
    """The interceptor with this service's table and policy, the admission gate (SPEC 12) and
    the request size limit."""
    return ServiceInterceptor(ERROR_TABLE, DOMAIN, authenticator, POLICY, gate, max_message_bytes)


def item_status(error: DomainError) -> status_pb2.Status:
    """One batch item's refusal, as SubmitEvent would have failed with it."""
    return status_for(error, {**COMMON_TABLE, **ERROR_TABLE}, DOMAIN)
