"""The blocking client for code without an event loop (scripts, WSGI apps, batch jobs).

It decides nothing itself: keys, metadata, results, errors and the retry policy come from
`_common`, exactly as for the asyncio client; only the waiting differs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import tenacity

from logistics.client import _common
from logistics.client._common import (
    DEFAULT_BATCH_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_TIMEOUT,
    TERMINAL_STATES,
    Metadata,
    RetryPolicy,
    SubmitOutcome,
    SubmitResult,
)
from logistics.client.config import ClientConfig
from logistics.client.results import Status
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc

__all__ = ["SyncSequencerClient", "create_channel"]

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ResultT = TypeVar("ResultT")


def create_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Iterable[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A grpc.Channel with the shipped retry service config (retries enabled)."""
    channel_options = _common.channel_options(options)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=channel_options)
    return grpc.insecure_channel(target, options=channel_options)


class SyncSequencerClient(_common.CallerIdentity):
    """SequencerService with keys, retries, deadlines and typed errors, blocking."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        client_id: str | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] = (),
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
    ) -> None:
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target or channel")
        if max_concurrent_calls < 1:
            raise ValueError("max_concurrent_calls must be at least 1")
        # Calls on the wire at once from all threads sharing this client (as in the asyncio one).
        self._slots = threading.BoundedSemaphore(max_concurrent_calls)
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            channel = create_channel(target, credentials=credentials, options=options)
        self.channel = channel
        self.client_id = client_id
        self.token = token
        self.retry = retry or RetryPolicy.from_service_config()
        self._sequencer = sequencer_pb2_grpc.SequencerServiceStub(channel)

    @classmethod
    def from_env(cls, config: ClientConfig | None = None, **overrides: Any) -> SyncSequencerClient:
        """A client configured by the LOGISTICS_* environment (see `logistics.client.config`)."""
        config = config or ClientConfig.from_env()
        return cls(config.sequencer, **{**config.client_kwargs(), **overrides})

    def close(self) -> None:
        """Closes the channel if this client created it (a passed-in channel stays open)."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> SyncSequencerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        timeout: float,
        metadata: Metadata | None = None,
    ) -> tuple[ResponseT, dict[str, str], int]:
        """One logical call: attempts with identical metadata, each bounded by the time left."""
        return self._attempts(
            method,
            lambda: request,
            lambda response, trailing, attempt: (response, trailing, attempt),
            deadline=_common.deadline_after(timeout),
            metadata=metadata if metadata is not None else self._metadata(),
        )

    def _attempts(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: Callable[[], RequestT],
        answer: Callable[[ResponseT, dict[str, str], int], ResultT],
        *,
        deadline: float,
        metadata: Metadata,
    ) -> ResultT:
        """The one retry loop: each attempt sends `request()` and hands the reply to `answer`,
        which may ask for another attempt (a batch with transiently failed items)."""
        try:
            for attempt in tenacity.Retrying(**self.retry.tenacity_kwargs(deadline)):
                with attempt, self._slot(deadline):
                    response, call = method.with_call(request(), timeout=_common.remaining(deadline), metadata=metadata)
                    trailing = _common.text_metadata(call.trailing_metadata())
                    return answer(response, trailing, attempt.retry_state.attempt_number)
        except grpc.RpcError as exc:
            raise _common.map_error(exc) from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    @contextlib.contextmanager
    def _slot(self, deadline: float) -> Iterator[None]:
        """One of the client's call slots for one attempt, waited for until the deadline."""
        if not self._slots.acquire(timeout=_common.remaining(deadline)):
            raise _common.queued_past_deadline()
        try:
            yield
        finally:
            self._slots.release()

    def submit(
        self,
        event: events_pb2.Event,
        *,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        wait_for_terminal: float | dt.timedelta | None = None,
        timeout: float = 10.0,
    ) -> SubmitResult:
        """Submits one event, retrying transient failures with one key so a retry only replays."""
        key = idempotency_key if idempotency_key is not None else _common.new_idempotency_key()
        correlation_id = correlation_id or _common.new_correlation_id()
        response, trailing, attempts = self._unary(
            self._sequencer.SubmitEvent,
            _common.submit_request(event, wait_for_terminal),
            timeout=timeout,
            metadata=self._metadata(key, correlation_id),
        )
        return _common.submit_result(
            response, trailing, idempotency_key=key, correlation_id=correlation_id, attempts=attempts
        )

    def submit_many(
        self,
        events: Iterable[events_pb2.Event],
        keys: Sequence[str | None] | None = None,
        *,
        correlation_id: str | None = None,
        timeout: float = DEFAULT_BATCH_TIMEOUT,
    ) -> list[SubmitOutcome]:
        """Submits many events with SubmitEvents: one outcome per event, in input order (as
        the asyncio client's `submit_many`)."""
        batch = _common.SubmitBatch(events, keys, self.retry, correlation_id=correlation_id, timeout=timeout)
        metadata = self._metadata(correlation_id=batch.correlation_id)
        for call in batch.calls():
            with call.settle():
                self._attempts(
                    self._sequencer.SubmitEvents, call.request, call.answer, deadline=batch.deadline, metadata=metadata
                )
        return batch.outcomes()

    def get_status(
        self,
        *,
        transaction_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Status:
        request = _common.status_request(transaction_id, idempotency_key)
        reply, _, _ = self._unary(self._sequencer.GetEventStatus, request, timeout=timeout)
        return Status.of(reply.status)

    def wait(self, transaction_id: str, timeout: float = 30.0) -> Status:
        """The event's status once terminal; re-opens a broken WatchEventStatus stream.

        Raises DeadlineExceededError when the event is not terminal within `timeout`.
        """
        deadline = _common.deadline_after(timeout)
        request = _common.watch_request(transaction_id, None)
        last: sequencer_pb2.EventStatus | None = None
        failures = 0
        while (left := _common.remaining(deadline)) > 0:
            call = self._sequencer.WatchEventStatus(request, timeout=left, metadata=self._metadata())
            try:
                for reply in call:
                    last = reply.status
                    if last.state in TERMINAL_STATES:
                        return Status.of(last)
            except grpc.RpcError as exc:
                if not _common.reopen_after(self.retry, exc):
                    break
            finally:
                call.cancel()
            failures += 1
            time.sleep(min(self.retry.backoff(failures), _common.remaining(deadline)))
        raise _common.wait_timed_out(transaction_id, last)
