"""Thin gRPC servicers: proto in, domain call, proto out. Errors are mapped by interceptors.py."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator

from common.auth import authorize, current_identity
from common.errors import DomainError
from common.interceptors import Context, add_trailing_metadata, correlation_id
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from sequencer.config import Settings
from sequencer.errors import InvalidArgument
from sequencer.idempotency import KEY_HEADERS, Submission, caller_scope, resolve_key, validate_key
from sequencer.ingress import Ingress
from sequencer.interceptors import item_status
from sequencer.interventions import Interventions
from sequencer.reads import Reads
from sequencer.watch import Watches
from sequencer.webhooks import Webhooks

# Finer rules than the per-RPC policy: parts of an RPC that only admins may use.
ENTITY_WATCH = "WatchEventStatus(entity)"
CROSS_CALLER_KEY_LOOKUP = "GetIdempotencyRecord(caller_id)"
ADMIN_ONLY = {ENTITY_WATCH: frozenset({"admin"}), CROSS_CALLER_KEY_LOOKUP: frozenset({"admin"})}


def _metadata(context: Context, names: tuple[str, ...]) -> list[str]:
    return [str(v) for k, v in (context.invocation_metadata() or ()) if k in names]


def _caller(context: Context) -> str:
    """The idempotency and read scope: the authenticated caller; in development mode (no
    credentials configured, loopback only) the self-declared `x-client-id`."""
    return caller_scope(current_identity(), context.invocation_metadata() or ())


def _read_scope(context: Context) -> str | None:
    """Whose records a read may see: the caller's own, or everyone's for admins."""
    return None if "admin" in current_identity().roles else _caller(context)


def _publish(context: Context, result: Submission) -> None:
    """Idempotency metadata: expiry always; replay marker and first-execution time on replays."""
    pairs = [("idempotency-expires-at", result.expires_at.astimezone(dt.UTC).isoformat())]
    if result.replayed:
        pairs += [
            ("idempotency-replayed", "true"),
            ("idempotency-first-seen-at", result.first_seen_at.astimezone(dt.UTC).isoformat()),
        ]
    add_trailing_metadata(context, *pairs)


class SequencerServicer(sequencer_pb2_grpc.SequencerServiceServicer):
    def __init__(self, ingress: Ingress, reads: Reads, watches: Watches, settings: Settings) -> None:
        self.service = ingress
        self.reads = reads
        self.watches = watches
        self.settings = settings

    async def SubmitEvent(
        self, request: sequencer_pb2.SubmitEventRequest, context: Context
    ) -> sequencer_pb2.SubmitEventResponse:
        key = resolve_key(_metadata(context, KEY_HEADERS), request.request_id)
        caller = _caller(context)
        result = await self.service.submit(
            caller=caller,
            key=key,
            request=request,
            correlation_id=correlation_id(),
            timeout=context.time_remaining(),
        )
        _publish(context, result)
        response = result.response
        assert isinstance(response, sequencer_pb2.SubmitEventResponse)
        if request.HasField("wait_for_terminal") and response.transaction_id:
            wait = request.wait_for_terminal.ToTimedelta().total_seconds()
            remaining = context.time_remaining()
            if remaining is not None:
                wait = min(wait, max(0.0, remaining - 0.05))
            if wait > 0:
                status = await self.watches.wait_terminal(response.transaction_id, wait)
                if status is not None:
                    waited = sequencer_pb2.SubmitEventResponse()
                    waited.CopyFrom(response)
                    waited.state = status.state
                    waited.awaiting_sequence = status.awaiting_sequence
                    return waited
        return response

    async def SubmitEvents(
        self, request: sequencer_pb2.SubmitEventsRequest, context: Context
    ) -> sequencer_pb2.SubmitEventsResponse:
        outcomes = await self.service.submit_batch(
            caller=_caller(context),
            metadata_keys=_metadata(context, KEY_HEADERS),
            requests=list(request.requests),
            correlation_id=correlation_id(),
            timeout=context.time_remaining(),
        )
        results = []
        for outcome in outcomes:
            if isinstance(outcome, DomainError):
                results.append(sequencer_pb2.SubmitEventsResult(error=item_status(outcome)))
            else:
                assert isinstance(outcome.response, sequencer_pb2.SubmitEventResponse)
                results.append(sequencer_pb2.SubmitEventsResult(response=outcome.response, replayed=outcome.replayed))
        return sequencer_pb2.SubmitEventsResponse(results=results)

    async def GetEventStatus(
        self, request: sequencer_pb2.GetEventStatusRequest, context: Context
    ) -> sequencer_pb2.GetEventStatusResponse:
        if request.transaction_id:
            status = await self.reads.get_status(request.transaction_id, _read_scope(context))
        elif request.idempotency_key:
            validate_key(request.idempotency_key)
            status = await self.reads.get_status_by_key(_caller(context), request.idempotency_key)
        else:
            raise InvalidArgument("transaction_id or idempotency_key is required", field="transaction_id")
        return sequencer_pb2.GetEventStatusResponse(status=status)

    async def WatchEventStatus(
        self, request: sequencer_pb2.WatchEventStatusRequest, context: Context
    ) -> AsyncIterator[sequencer_pb2.WatchEventStatusResponse]:
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument("transaction_id or entity is required", field="target")
        stream: AsyncGenerator[sequencer_pb2.EventStatus, None]
        if target == "transaction_id":
            stream = self.watches.watch_transaction(_caller(context), request.transaction_id, _read_scope(context))
        else:
            # An entity's stream shows every caller's events: an operator's view.
            authorize(current_identity(), ENTITY_WATCH, ADMIN_ONLY)
            stream = self.watches.watch_entity(_caller(context), request.entity)
        async with contextlib.aclosing(stream) as statuses:
            async for status in statuses:
                yield sequencer_pb2.WatchEventStatusResponse(status=status)


class AdminServicer(sequencer_pb2_grpc.SequencerAdminServiceServicer):
    def __init__(self, reads: Reads, interventions: Interventions, webhooks: Webhooks) -> None:
        self.service = reads
        self.interventions = interventions
        self.webhooks = webhooks

    async def ListGaps(
        self, request: sequencer_pb2.ListGapsRequest, context: Context
    ) -> sequencer_pb2.ListGapsResponse:
        gaps, token = await self.service.list_gaps(request.page_size, request.page_token)
        return sequencer_pb2.ListGapsResponse(gaps=gaps, next_page_token=token)

    async def ListParkedEvents(
        self, request: sequencer_pb2.ListParkedEventsRequest, context: Context
    ) -> sequencer_pb2.ListParkedEventsResponse:
        entity = request.entity if request.HasField("entity") else None
        parked, token = await self.service.list_parked(entity, request.page_size, request.page_token)
        return sequencer_pb2.ListParkedEventsResponse(parked_events=parked, next_page_token=token)

    async def GetEntity(
        self, request: sequencer_pb2.GetEntityRequest, context: Context
    ) -> sequencer_pb2.GetEntityResponse:
        entity = await self.service.get_entity(request.entity.entity_type, request.entity.entity_id)
        return sequencer_pb2.GetEntityResponse(entity=entity)

    async def SkipSequence(
        self, request: sequencer_pb2.SkipSequenceRequest, context: Context
    ) -> sequencer_pb2.SkipSequenceResponse:
        key = resolve_key(_metadata(context, KEY_HEADERS), request.request_id)
        result = await self.interventions.skip_sequence(
            caller=_caller(context),
            key=key,
            request=request,
            correlation_id=correlation_id(),
            timeout=context.time_remaining(),
        )
        _publish(context, result)
        response = result.response
        assert isinstance(response, sequencer_pb2.SkipSequenceResponse)
        return response

    async def ListBlockedEvents(
        self, request: sequencer_pb2.ListBlockedEventsRequest, context: Context
    ) -> sequencer_pb2.ListBlockedEventsResponse:
        blocked, token = await self.service.list_blocked(request.page_size, request.page_token)
        return sequencer_pb2.ListBlockedEventsResponse(blocked_events=blocked, next_page_token=token)

    async def RetryBlockedEvent(
        self, request: sequencer_pb2.RetryBlockedEventRequest, context: Context
    ) -> sequencer_pb2.RetryBlockedEventResponse:
        key = resolve_key(_metadata(context, KEY_HEADERS), request.request_id)
        result = await self.interventions.retry_blocked(
            caller=_caller(context), key=key, request=request, timeout=context.time_remaining()
        )
        _publish(context, result)
        response = result.response
        assert isinstance(response, sequencer_pb2.RetryBlockedEventResponse)
        return response

    async def GetIdempotencyRecord(
        self, request: sequencer_pb2.GetIdempotencyRecordRequest, context: Context
    ) -> sequencer_pb2.GetIdempotencyRecordResponse:
        validate_key(request.idempotency_key)
        scope = _caller(context)
        if request.caller_id and request.caller_id != scope:
            authorize(current_identity(), CROSS_CALLER_KEY_LOOKUP, ADMIN_ONLY)
            scope = request.caller_id
        record = await self.service.get_key_record(scope, request.idempotency_key)
        return sequencer_pb2.GetIdempotencyRecordResponse(record=record)

    async def CreateWebhookSubscription(
        self, request: sequencer_pb2.CreateWebhookSubscriptionRequest, context: Context
    ) -> sequencer_pb2.CreateWebhookSubscriptionResponse:
        key = resolve_key(_metadata(context, KEY_HEADERS), request.request_id)
        result = await self.webhooks.create(caller=_caller(context), key=key, request=request)
        _publish(context, result)
        response = result.response
        assert isinstance(response, sequencer_pb2.CreateWebhookSubscriptionResponse)
        return response

    async def ListWebhookSubscriptions(
        self, request: sequencer_pb2.ListWebhookSubscriptionsRequest, context: Context
    ) -> sequencer_pb2.ListWebhookSubscriptionsResponse:
        subscriptions, token = await self.webhooks.list_subscriptions(request.page_size, request.page_token)
        return sequencer_pb2.ListWebhookSubscriptionsResponse(subscriptions=subscriptions, next_page_token=token)

    async def DeleteWebhookSubscription(
        self, request: sequencer_pb2.DeleteWebhookSubscriptionRequest, context: Context
    ) -> sequencer_pb2.DeleteWebhookSubscriptionResponse:
        await self.webhooks.delete(request.id)
        return sequencer_pb2.DeleteWebhookSubscriptionResponse()

    async def ListWebhookDeliveries(
        self, request: sequencer_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> sequencer_pb2.ListWebhookDeliveriesResponse:
        deliveries, token = await self.webhooks.list_deliveries(
            request.subscription_id, request.page_size, request.page_token
        )
        return sequencer_pb2.ListWebhookDeliveriesResponse(deliveries=deliveries, next_page_token=token)

    async def RedeliverWebhook(
        self, request: sequencer_pb2.RedeliverWebhookRequest, context: Context
    ) -> sequencer_pb2.RedeliverWebhookResponse:
        delivery = await self.webhooks.redeliver(request.delivery_id)
        return sequencer_pb2.RedeliverWebhookResponse(delivery=delivery)
