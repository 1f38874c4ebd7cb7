"""The asyncio client: grpc.aio stubs plus idempotency keys, safe retries and typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Protocol, Self, TypeVar

import grpc
import tenacity

from logistics.client import _common
from logistics.client._common import (
    DEFAULT_BATCH_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_TIMEOUT,
    DEFAULT_WATCH_TIMEOUT,
    TERMINAL_STATES,
    EntityLike,
    Metadata,
    RetryPolicy,
    SubmitOutcome,
    SubmitResult,
)
from logistics.client.config import ClientConfig
from logistics.client.results import Status
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc

__all__ = ["LedgerClient", "SequencerClient", "create_channel"]

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ResultT = TypeVar("ResultT")
ItemT = TypeVar("ItemT")


class _PageRequest(Protocol):
    page_token: str


class _PageResponse(Protocol):
    @property
    def next_page_token(self) -> str: ...


PageRequestT = TypeVar("PageRequestT", bound=_PageRequest)
PageResponseT = TypeVar("PageResponseT", bound=_PageResponse)


def create_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    options: Iterable[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel with the shipped retry service config (retries enabled)."""
    channel_options = _common.channel_options(options)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=channel_options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=channel_options, interceptors=interceptors)


class _Client(_common.CallerIdentity):
    """Channel ownership, caller metadata and the one retry loop every unary call goes through."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        client_id: str | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        options: Iterable[tuple[str, Any]] = (),
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
    ) -> None:
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target or channel")
        if max_concurrent_calls < 1:
            raise ValueError("max_concurrent_calls must be at least 1")
        # Attempts on the wire at once; the rest queue here, within their deadline, instead of
        # being refused by the server's HTTP/2 stream limit (docs/flow-control.md).
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            channel = create_channel(target, credentials=credentials, interceptors=interceptors, options=options)
        self.channel = channel
        self.client_id = client_id
        self.token = token
        self.retry = retry or RetryPolicy.from_service_config()
        self._bind()

    #: Which address of a ClientConfig this client talks to.
    _service = "sequencer"

    @classmethod
    def from_env(cls, config: ClientConfig | None = None, **overrides: Any) -> Self:
        """A client configured by the LOGISTICS_* environment (address, token, TLS): see
        `logistics.client.config`."""
        config = config or ClientConfig.from_env()
        return cls(getattr(config, cls._service), **{**config.client_kwargs(), **overrides})

    def _bind(self) -> None:
        """Creates the service stubs on the channel (each client its own)."""

    async def close(self) -> None:
        """Closes the channel if this client created it (a passed-in channel stays open)."""
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        timeout: float,
        metadata: Metadata | None = None,
    ) -> tuple[ResponseT, dict[str, str], int]:
        """One logical call: attempts with identical metadata, each bounded by the time left."""
        return await self._attempts(
            method,
            lambda: request,
            lambda response, trailing, attempt: (response, trailing, attempt),
            deadline=_common.deadline_after(timeout),
            metadata=metadata if metadata is not None else self._metadata(),
        )

    async def _attempts(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: Callable[[], RequestT],
        answer: Callable[[ResponseT, dict[str, str], int], ResultT],
        *,
        deadline: float,
        metadata: Metadata,
    ) -> ResultT:
        """The one retry loop: each attempt sends `request()` and hands the reply to `answer`,
        which may ask for another attempt (a batch with transiently failed items)."""
        try:
            async for attempt in tenacity.AsyncRetrying(**self.retry.tenacity_kwargs(deadline)):
                with attempt:
                    async with self._slot(deadline):
                        call = method(request(), timeout=_common.remaining(deadline), metadata=metadata)
                        response = await call
                        trailing = _common.text_metadata(await call.trailing_metadata())
                    return answer(response, trailing, attempt.retry_state.attempt_number)
        except grpc.aio.AioRpcError as exc:
            raise _common.map_error(exc) from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    @contextlib.asynccontextmanager
    async def _slot(self, deadline: float) -> AsyncIterator[None]:
        """One of the client's call slots for one attempt, waited for until the deadline."""
        try:
            await asyncio.wait_for(self._slots.acquire(), _common.remaining(deadline))
        except TimeoutError as exc:
            raise _common.queued_past_deadline() from exc
        try:
            yield
        finally:
            self._slots.release()

    async def _pages(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[PageRequestT, PageResponseT],
        request: PageRequestT,
        items: Callable[[PageResponseT], Iterable[ItemT]],
        timeout: float,
    ) -> AsyncIterator[ItemT]:
        """Every item of every page; each page is its own call with its own deadline."""
        while True:
            reply, _, _ = await self._unary(method, request, timeout=timeout)
            for item in items(reply):
                yield item
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token


class SequencerClient(_Client):
    """SequencerService and SequencerAdminService with keys, retries, deadlines, typed errors."""

    def _bind(self) -> None:
        self._sequencer = sequencer_pb2_grpc.SequencerServiceStub(self.channel)
        self._admin = sequencer_pb2_grpc.SequencerAdminServiceStub(self.channel)

    async def submit(
        self,
        event: events_pb2.Event,
        *,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        wait_for_terminal: float | dt.timedelta | None = None,
        timeout: float = 10.0,
    ) -> SubmitResult:
        """Submits one event, retrying transient failures with one key so a retry only replays.

        Without `idempotency_key` a fresh UUID is used; keep `result.idempotency_key` if the
        caller may retry this submission itself later (after a crash, say).
        """
        key = idempotency_key if idempotency_key is not None else _common.new_idempotency_key()
        correlation_id = correlation_id or _common.new_correlation_id()
        response, trailing, attempts = await self._unary(
            self._sequencer.SubmitEvent,
            _common.submit_request(event, wait_for_terminal),
            timeout=timeout,
            metadata=self._metadata(key, correlation_id),
        )
        return _common.submit_result(
            response, trailing, idempotency_key=key, correlation_id=correlation_id, attempts=attempts
        )

    async def submit_many(
        self,
        events: Iterable[events_pb2.Event],
        keys: Sequence[str | None] | None = None,
        *,
        correlation_id: str | None = None,
        timeout: float = DEFAULT_BATCH_TIMEOUT,
    ) -> list[SubmitOutcome]:
        """Submits many events with SubmitEvents: one outcome per event, in input order.

        Each item gets its own key (`keys[i]`, else a fresh UUID), kept on every retry. An
        item's failure is returned as the typed exception `submit` would raise for it; items
        that failed transiently are sent again (alone) within `timeout`, which bounds the
        whole call. Raises only when a call fails as a whole (see `_common.BatchCall.settle`).
        """
        batch = _common.SubmitBatch(events, keys, self.retry, correlation_id=correlation_id, timeout=timeout)
        metadata = self._metadata(correlation_id=batch.correlation_id)
        for call in batch.calls():
            with call.settle():
                await self._attempts(
                    self._sequencer.SubmitEvents, call.request, call.answer, deadline=batch.deadline, metadata=metadata
                )
        return batch.outcomes()

    async def get_status(
        self,
        *,
        transaction_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Status:
        request = _common.status_request(transaction_id, idempotency_key)
        reply, _, _ = await self._unary(self._sequencer.GetEventStatus, request, timeout=timeout)
        return Status.of(reply.status)

    async def wait(self, transaction_id: str, timeout: float = 30.0) -> Status:
        """The event's status once terminal (APPLIED, REJECTED, SKIPPED).

        Follows WatchEventStatus (pushed, no polling); a broken stream is re-opened, and the
        server sends the current status first, so nothing is missed. Raises
        DeadlineExceededError when the event is not terminal within `timeout`.
        """
        deadline = _common.deadline_after(timeout)
        request = _common.watch_request(transaction_id, None)
        last: sequencer_pb2.EventStatus | None = None
        failures = 0
        while (left := _common.remaining(deadline)) > 0:
            call = self._sequencer.WatchEventStatus(request, timeout=left, metadata=self._metadata())
            try:
                async for reply in call:
                    last = reply.status
                    if last.state in TERMINAL_STATES:
                        return Status.of(last)
            except grpc.aio.AioRpcError as exc:
                if not _common.reopen_after(self.retry, exc):
                    break
            finally:
                call.cancel()
            failures += 1
            await asyncio.sleep(min(self.retry.backoff(failures), _common.remaining(deadline)))
        raise _common.wait_timed_out(transaction_id, last)

    async def watch(
        self,
        *,
        transaction_id: str | None = None,
        entity: EntityLike | None = None,
        timeout: float = DEFAULT_WATCH_TIMEOUT,
    ) -> AsyncIterator[Status]:
        """Status changes of one transaction (ending after a terminal state) or of one entity.

        An entity watch never ends by itself: it raises DeadlineExceededError at `timeout`.
        Use `contextlib.aclosing` when leaving the loop early.
        """
        request = _common.watch_request(transaction_id, entity)
        call = self._sequencer.WatchEventStatus(request, timeout=timeout, metadata=self._metadata())
        try:
            async for reply in call:
                yield Status.of(reply.status)
        except grpc.aio.AioRpcError as exc:
            raise _common.map_error(exc) from exc
        finally:
            call.cancel()

    # Admin.

    def list_gaps(self, *, page_size: int = 0, timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[sequencer_pb2.Gap]:
        """Every gap, oldest first, across all pages."""
        request = sequencer_pb2.ListGapsRequest(page_size=page_size)
        return self._pages(self._admin.ListGaps, request, lambda r: r.gaps, timeout)

    def list_parked_events(
        self, entity: EntityLike | None = None, *, page_size: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncIterator[sequencer_pb2.ParkedEvent]:
        """Every parked event (of one entity, or all), lowest MSI first, across all pages."""
        request = sequencer_pb2.ListParkedEventsRequest(page_size=page_size)
        if entity is not None:
            request.entity.CopyFrom(_common.entity_ref(entity))
        return self._pages(self._admin.ListParkedEvents, request, lambda r: r.parked_events, timeout)

    async def get_entity(self, entity: EntityLike, *, timeout: float = DEFAULT_TIMEOUT) -> sequencer_pb2.Entity:
        request = sequencer_pb2.GetEntityRequest(entity=_common.entity_ref(entity))
        reply, _, _ = await self._unary(self._admin.GetEntity, request, timeout=timeout)
        return reply.entity

    async def skip_sequence(
        self,
        entity: EntityLike,
        sequence: int,
        reason: str,
        idempotency_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> sequencer_pb2.SkipSequenceResponse:
        """Gives up on one missing MSI (audited) and releases its successors; keyed like submit."""
        key = idempotency_key if idempotency_key is not None else _common.new_idempotency_key()
        request = sequencer_pb2.SkipSequenceRequest(entity=_common.entity_ref(entity), sequence=sequence, reason=reason)
        reply, _, _ = await self._unary(
            self._admin.SkipSequence, request, timeout=timeout, metadata=self._metadata(key)
        )
        return reply

    def list_blocked_events(self, *, page_size: int = 0, timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[Status]:
        """Every BLOCKED event, oldest first, across all pages (SPEC 11)."""
        request = sequencer_pb2.ListBlockedEventsRequest(page_size=page_size)
        return self._pages(
            self._admin.ListBlockedEvents, request, lambda r: [Status.of(s) for s in r.blocked_events], timeout
        )

    async def retry_blocked_event(
        self,
        entity: EntityLike,
        sequence: int,
        reason: str,
        idempotency_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Status:
        """Sends a BLOCKED event to the ledger again (QUEUED; audited); keyed like submit."""
        key = idempotency_key if idempotency_key is not None else _common.new_idempotency_key()
        request = sequencer_pb2.RetryBlockedEventRequest(
            entity=_common.entity_ref(entity), sequence=sequence, reason=reason
        )
        reply, _, _ = await self._unary(
            self._admin.RetryBlockedEvent, request, timeout=timeout, metadata=self._metadata(key)
        )
        return Status.of(reply.status)

    def list_webhook_subscriptions(
        self, *, page_size: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncIterator[sequencer_pb2.WebhookSubscription]:
        request = sequencer_pb2.ListWebhookSubscriptionsRequest(page_size=page_size)
        return self._pages(self._admin.ListWebhookSubscriptions, request, lambda r: r.subscriptions, timeout)

    async def create_webhook_subscription(
        self,
        url: str,
        *,
        states: Iterable[int] = (),
        entity_type: int = 0,
        description: str = "",
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> sequencer_pb2.WebhookSubscription:
        """A new subscription; its `secret` is in this answer only. Keyed like submit."""
        key = idempotency_key if idempotency_key is not None else _common.new_idempotency_key()
        request = sequencer_pb2.CreateWebhookSubscriptionRequest(
            url=url,
            states=[events_pb2.EventState.ValueType(s) for s in states],
            entity_type=events_pb2.EntityType.ValueType(entity_type),
            description=description,
        )
        reply, _, _ = await self._unary(
            self._admin.CreateWebhookSubscription, request, timeout=timeout, metadata=self._metadata(key)
        )
        return reply.subscription

    async def delete_webhook_subscription(self, subscription_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        request = sequencer_pb2.DeleteWebhookSubscriptionRequest(id=subscription_id)
        await self._unary(self._admin.DeleteWebhookSubscription, request, timeout=timeout)

    def list_webhook_deliveries(
        self, subscription_id: str, *, page_size: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncIterator[sequencer_pb2.WebhookDelivery]:
        request = sequencer_pb2.ListWebhookDeliveriesRequest(subscription_id=subscription_id, page_size=page_size)
        return self._pages(self._admin.ListWebhookDeliveries, request, lambda r: r.deliveries, timeout)

    async def redeliver_webhook(
        self, delivery_id: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> sequencer_pb2.WebhookDelivery:
        request = sequencer_pb2.RedeliverWebhookRequest(delivery_id=delivery_id)
        reply, _, _ = await self._unary(self._admin.RedeliverWebhook, request, timeout=timeout)
        return reply.delivery

    async def get_idempotency_record(
        self, idempotency_key: str, *, caller_id: str = "", timeout: float = DEFAULT_TIMEOUT
    ) -> sequencer_pb2.IdempotencyRecord:
        """The key's record in the caller's scope (admins may name another `caller_id`)."""
        request = sequencer_pb2.GetIdempotencyRecordRequest(idempotency_key=idempotency_key, caller_id=caller_id)
        reply, _, _ = await self._unary(self._admin.GetIdempotencyRecord, request, timeout=timeout)
        return reply.record


class LedgerClient(_Client):
    """LedgerService reads: shipments, inventory items and entity histories."""

    _service = "ledger"

    def _bind(self) -> None:
        self._ledger = ledger_pb2_grpc.LedgerServiceStub(self.channel)

    async def get_shipment(self, shipment_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> ledger_pb2.Shipment:
        request = ledger_pb2.GetShipmentRequest(shipment_id=shipment_id)
        reply, _, _ = await self._unary(self._ledger.GetShipment, request, timeout=timeout)
        return reply.shipment

    async def get_inventory_item(
        self, sku: str, location: str = "", *, timeout: float = DEFAULT_TIMEOUT
    ) -> ledger_pb2.InventoryItem:
        request = ledger_pb2.GetInventoryItemRequest(sku=sku, location=location)
        reply, _, _ = await self._unary(self._ledger.GetInventoryItem, request, timeout=timeout)
        return reply.item

    def history(
        self, entity: EntityLike, *, page_size: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncIterator[ledger_pb2.HistoryEntry]:
        """The entity's processed events, oldest first, across all pages."""
        request = ledger_pb2.ListEntityHistoryRequest(entity=_common.entity_ref(entity), page_size=page_size)
        return self._pages(self._ledger.ListEntityHistory, request, lambda r: r.entries, timeout)
