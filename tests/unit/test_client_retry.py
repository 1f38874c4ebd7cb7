"""The hand-written client's retries and error mapping, with grpcio-testing playing the server.

The sync client runs in a thread; the test takes each RPC it sends from the grpc_testing channel
and terminates it, so every attempt, its metadata and its outcome are under the test's control.
Both sides wait with a bound, so a wrong number of attempts fails the test instead of hanging it.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
import tenacity
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from logistics import client as lc
from logistics.client import _common
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2

SERVICE = sequencer_pb2.DESCRIPTOR.services_by_name["SequencerService"]
SUBMIT = SERVICE.methods_by_name["SubmitEvent"]
GET_STATUS = SERVICE.methods_by_name["GetEventStatus"]
WATCH = SERVICE.methods_by_name["WatchEventStatus"]
FAST = lc.RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.01)
RESULT_WAIT = 10.0

T = TypeVar("T")


def event(sequence: int = 1) -> events_pb2.Event:
    e = events_pb2.Event(
        entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="SHP-U", sequence=sequence, source="unit"
    )
    e.shipment_created.order_id = "ORD-1"
    return e


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
    """Runs the blocking client call in a daemon thread (abandoned, not joined, if a test fails)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def take_unary_unary(channel: Any, method: Any) -> tuple[Any, Any, Any]:
    """The next RPC the client sent; fails (instead of hanging) when none arrives."""
    taken: tuple[Any, Any, Any] = in_thread(channel.take_unary_unary, method).result(RESULT_WAIT)
    return taken


def take_unary_stream(channel: Any, method: Any) -> tuple[Any, Any, Any]:
    taken: tuple[Any, Any, Any] = in_thread(channel.take_unary_stream, method).result(RESULT_WAIT)
    return taken


def rich_error(
    code: grpc.StatusCode, reason: str, message: str, **metadata: str
) -> tuple[tuple[tuple[str, Any], ...], grpc.StatusCode, str]:
    """(trailing metadata, code, details) as the servers' interceptor sends them."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain="sequencer.logistics", metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
    trailing = (("x-correlation-id", "corr-err"), *status.trailing_metadata)
    return trailing, status.code, status.details


def as_dict(metadata: Any) -> dict[str, Any]:
    return {k: v for k, v in metadata}


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def client(channel: Any) -> lc.SyncSequencerClient:
    return lc.SyncSequencerClient(channel=channel, client_id="erp-1", retry=FAST)


ACCEPTED = sequencer_pb2.SubmitEventResponse(
    transaction_id="tx-1", state=events_pb2.EVENT_STATE_QUEUED, correlation_id="corr-1"
)


def test_unavailable_then_ok_retries_with_the_same_key(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit, event(), timeout=30)

    first_md, first_request, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    second_md, second_request, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(
        ACCEPTED,
        (
            ("x-correlation-id", "corr-1"),
            ("idempotency-replayed", "true"),
            ("idempotency-expires-at", "2030-01-02T03:04:05+00:00"),
        ),
        grpc.StatusCode.OK,
        "",
    )
    result = future.result(RESULT_WAIT)

    first, second = as_dict(first_md), as_dict(second_md)
    key = first["idempotency-key"]
    assert key and second["idempotency-key"] == key == result.idempotency_key
    assert first["x-correlation-id"] == second["x-correlation-id"]
    assert first["x-client-id"] == second["x-client-id"] == "erp-1"
    assert first_request == second_request and first_request.event == event()
    assert not first_request.request_id  # the key travels in metadata only
    assert result.response == ACCEPTED and result.transaction_id == "tx-1"
    assert result.replayed is True
    assert result.attempts == 2
    assert result.correlation_id == "corr-1"
    assert result.expires_at is not None and result.expires_at.isoformat() == "2030-01-02T03:04:05+00:00"


def test_deadline_exceeded_attempt_is_retried_with_the_same_key(channel: Any) -> None:
    client = lc.SyncSequencerClient(channel=channel, token="s3cret", retry=FAST)
    future = in_thread(client.submit, event(), idempotency_key="order-7:v1", timeout=30)

    first_md, _, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(None, (), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    second_md, _, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(ACCEPTED, (("x-correlation-id", "corr-1"),), grpc.StatusCode.OK, "")
    result = future.result(RESULT_WAIT)

    assert as_dict(first_md)["idempotency-key"] == as_dict(second_md)["idempotency-key"] == "order-7:v1"
    assert as_dict(first_md)["authorization"] == as_dict(second_md)["authorization"] == "Bearer s3cret"
    assert "x-client-id" not in as_dict(first_md)
    assert result.idempotency_key == "order-7:v1"
    assert result.replayed is False and result.expires_at is None and result.attempts == 2


def test_retries_are_bounded_and_the_last_failure_is_typed(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit, event(), timeout=30)

    keys = []
    for _ in range(FAST.max_attempts):
        metadata, _, rpc = take_unary_unary(channel, SUBMIT)
        keys.append(as_dict(metadata)["idempotency-key"])
        rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "still down")

    with pytest.raises(lc.UnavailableError) as caught:
        future.result(RESULT_WAIT)
    assert len(set(keys)) == 1
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "" and caught.value.details == "still down"
    assert isinstance(caught.value, lc.RetryableError)
    assert isinstance(caught.value.__cause__, grpc.RpcError)


# Every reason the servers send, with the status code they send it under.
REASON_CASES = [
    ("IDEMPOTENCY_KEY_MISSING", grpc.StatusCode.INVALID_ARGUMENT, lc.IdempotencyKeyMissingError),
    ("IDEMPOTENCY_KEY_INVALID", grpc.StatusCode.INVALID_ARGUMENT, lc.IdempotencyKeyInvalidError),
    ("IDEMPOTENCY_KEY_REUSED", grpc.StatusCode.FAILED_PRECONDITION, lc.IdempotencyKeyReusedError),
    ("INVALID_EVENT", grpc.StatusCode.INVALID_ARGUMENT, lc.InvalidEventError),
    ("INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, lc.InvalidArgumentError),
    ("SEQUENCE_CONFLICT", grpc.StatusCode.FAILED_PRECONDITION, lc.SequenceConflictError),
    ("PARKED_LIMIT_REACHED", grpc.StatusCode.RESOURCE_EXHAUSTED, lc.ParkedLimitReachedError),
    ("NOT_A_GAP", grpc.StatusCode.FAILED_PRECONDITION, lc.NotAGapError),
    ("EVENT_NOT_FOUND", grpc.StatusCode.NOT_FOUND, lc.EventNotFoundError),
    ("ENTITY_NOT_FOUND", grpc.StatusCode.NOT_FOUND, lc.EntityNotFoundError),
    ("IDEMPOTENCY_RECORD_NOT_FOUND", grpc.StatusCode.NOT_FOUND, lc.IdempotencyRecordNotFoundError),
    ("TOO_MANY_WATCHERS", grpc.StatusCode.RESOURCE_EXHAUSTED, lc.TooManyWatchersError),
    ("INTERNAL", grpc.StatusCode.INTERNAL, lc.InternalError),
    ("SHIPMENT_NOT_FOUND", grpc.StatusCode.NOT_FOUND, lc.ShipmentNotFoundError),
    ("INVENTORY_ITEM_NOT_FOUND", grpc.StatusCode.NOT_FOUND, lc.InventoryItemNotFoundError),
    ("OUT_OF_ORDER", grpc.StatusCode.FAILED_PRECONDITION, lc.OutOfOrderError),
    ("INVALID_PAGE_TOKEN", grpc.StatusCode.INVALID_ARGUMENT, lc.InvalidPageTokenError),
    ("MALFORMED_REQUEST", grpc.StatusCode.INVALID_ARGUMENT, lc.MalformedRequestError),
    ("UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, lc.UnauthenticatedError),
    ("PERMISSION_DENIED", grpc.StatusCode.PERMISSION_DENIED, lc.PermissionDeniedError),
]


@pytest.mark.parametrize(("reason", "code", "expected"), REASON_CASES)
def test_error_info_reason_maps_to_its_exception_without_a_retry(
    channel: Any, client: lc.SyncSequencerClient, reason: str, code: grpc.StatusCode, expected: type[Exception]
) -> None:
    future = in_thread(client.submit, event(), timeout=30)
    _, _, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(None, *rich_error(code, reason, "told you so", field="event.entity_id"))

    # A retry would block on a second RPC nobody answers, so the result would not arrive.
    with pytest.raises(expected) as caught:
        future.result(RESULT_WAIT)
    error = caught.value
    assert type(error) is expected
    assert isinstance(error, lc.LogisticsError)
    assert error.code == code and error.reason == reason
    assert error.metadata == {"field": "event.entity_id"}
    assert error.details == "told you so" and error.domain == "sequencer.logistics"
    assert error.correlation_id == "corr-err"


def test_transient_and_deadline_reasons_are_retried(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit, event(), timeout=30)
    _, _, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(None, *rich_error(grpc.StatusCode.UNAVAILABLE, "TRANSIENT", "serialization failure"))
    _, _, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(None, *rich_error(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "lock wait"))
    _, _, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(None, *rich_error(grpc.StatusCode.UNAVAILABLE, "TRANSIENT", "serialization failure"))

    with pytest.raises(lc.TransientError) as caught:
        future.result(RESULT_WAIT)
    assert caught.value.reason == "TRANSIENT" and caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_key_reused_names_the_differing_fields(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit, event(), idempotency_key="k-1", timeout=30)
    _, _, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(
        None,
        *rich_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            "IDEMPOTENCY_KEY_REUSED",
            "different request",
            fields="event.sequence,event.shipment_created.order_id",
        ),
    )
    with pytest.raises(lc.IdempotencyKeyReusedError) as caught:
        future.result(RESULT_WAIT)
    assert caught.value.fields == ["event.sequence", "event.shipment_created.order_id"]
    assert isinstance(caught.value, lc.ConflictError)


def test_unknown_reason_becomes_the_base_error(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.get_status, transaction_id="tx-9")
    _, request, rpc = take_unary_unary(channel, GET_STATUS)
    rpc.terminate(None, *rich_error(grpc.StatusCode.FAILED_PRECONDITION, "BRAND_NEW_REASON", "new rule", a="1"))

    with pytest.raises(lc.LogisticsError) as caught:
        future.result(RESULT_WAIT)
    assert type(caught.value) is lc.LogisticsError
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "BRAND_NEW_REASON"
    assert caught.value.metadata == {"a": "1"} and caught.value.message == "new rule"
    assert request.transaction_id == "tx-9"


def test_status_without_error_info_maps_by_code(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.get_status, idempotency_key="k-2")
    _, request, rpc = take_unary_unary(channel, GET_STATUS)
    rpc.terminate(None, (), grpc.StatusCode.PERMISSION_DENIED, "no")
    with pytest.raises(lc.LogisticsError) as caught:
        future.result(RESULT_WAIT)
    assert type(caught.value) is lc.LogisticsError
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and caught.value.reason == ""
    assert request.idempotency_key == "k-2" and not request.transaction_id


def test_asyncio_errors_map_the_same_way() -> None:
    trailing, code, details = rich_error(grpc.StatusCode.FAILED_PRECONDITION, "SEQUENCE_CONFLICT", "msi reused")
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)
    mapped = _common.map_error(error)
    assert type(mapped) is lc.SequenceConflictError
    assert mapped.code == code and mapped.details == "msi reused" and mapped.correlation_id == "corr-err"
    assert _common.map_error(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None)).code == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_every_server_reason_has_a_class() -> None:
    reasons = {case[0] for case in REASON_CASES} | {"TRANSIENT", "DEADLINE_EXCEEDED"} | set(_common.OVERLOAD_REASONS)
    assert set(lc.errors.REASONS) == reasons


def status(state: int) -> sequencer_pb2.WatchEventStatusResponse:
    return sequencer_pb2.WatchEventStatusResponse(
        status=sequencer_pb2.EventStatus(transaction_id="tx-1", state=state)  # type: ignore[arg-type]
    )


def test_wait_reopens_a_broken_stream_until_terminal(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.wait, "tx-1", timeout=30)

    _, request, rpc = take_unary_stream(channel, WATCH)
    assert request.transaction_id == "tx-1"
    rpc.send_response(status(events_pb2.EVENT_STATE_PARKED))
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "stream broke")
    _, request, rpc = take_unary_stream(channel, WATCH)
    rpc.send_response(status(events_pb2.EVENT_STATE_QUEUED))
    rpc.send_response(status(events_pb2.EVENT_STATE_APPLIED))

    final = future.result(RESULT_WAIT)
    assert final.state == lc.EventState.APPLIED and final.transaction_id == "tx-1"
    rpc.cancelled()  # the client hung up once it had the terminal status


def test_wait_raises_a_typed_error_for_an_unknown_transaction(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.wait, "tx-404", timeout=30)
    _, _, rpc = take_unary_stream(channel, WATCH)
    rpc.terminate(*rich_error(grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND", "no such transaction"))
    with pytest.raises(lc.EventNotFoundError):
        future.result(RESULT_WAIT)


def test_get_status_needs_exactly_one_target(client: lc.SyncSequencerClient) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.get_status()
    with pytest.raises(ValueError, match="exactly one"):
        client.get_status(transaction_id="tx", idempotency_key="k")


def test_retries_stop_before_the_overall_deadline() -> None:
    """No sleep may carry the next attempt past the deadline; the attempt gets what is left."""
    stop = _common.StopBeforeDeadline(time.monotonic() + 60)
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.upcoming_sleep = 0.5
    assert not stop(state)
    state.upcoming_sleep = 61.0
    assert stop(state)
    assert _common.StopBeforeDeadline(time.monotonic() - 1)(tenacity.RetryCallState(tenacity.Retrying(), None, (), {}))

    deadline = _common.deadline_after(5.0)
    assert 0 < _common.remaining(deadline) <= 5.0
    assert _common.remaining(time.monotonic() - 1) == 0.0
    with pytest.raises(ValueError):
        _common.deadline_after(0)


def test_backoff_is_jittered_within_the_exponential_ceiling() -> None:
    policy = lc.RetryPolicy()
    for attempt, ceiling in ((1, 0.05), (2, 0.1), (3, 0.2), (10, 2.0)):
        assert all(0.0 <= policy.backoff(attempt) <= ceiling for _ in range(50))


def test_service_config_is_shipped_and_matches_the_default_policy() -> None:
    config = json.loads(lc.service_config_json())
    method = config["methodConfig"][0]
    assert {n["service"] for n in method["name"]} == {
        "logistics.sequencer.v1.SequencerService",
        "logistics.sequencer.v1.SequencerAdminService",
        "logistics.ledger.v1.LedgerService",
    }
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    policy = lc.RetryPolicy.from_service_config()
    assert (policy.max_attempts, policy.initial_backoff, policy.max_backoff, policy.backoff_multiplier) == (
        4,
        0.05,
        2.0,
        2.0,
    )
    assert policy.retryable_codes == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    options = dict(lc.channel_options())
    assert options["grpc.enable_retries"] == 1
    assert json.loads(options["grpc.service_config"]) == config


def test_generated_keys_are_fresh_and_fit_the_server_charset() -> None:
    from sequencer.idempotency import validate_key

    keys = {lc.new_idempotency_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        validate_key(key)


# submit_many: SubmitEvents with one key per item, item outcomes in input order.

SUBMIT_MANY = SERVICE.methods_by_name["SubmitEvents"]


def events(count: int) -> list[events_pb2.Event]:
    return [event(sequence) for sequence in range(1, count + 1)]


def item_error(code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> sequencer_pb2.SubmitEventsResult:
    """A failed item as the server sends it: google.rpc.Status with an ErrorInfo detail."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="sequencer.logistics", metadata=metadata))
    return sequencer_pb2.SubmitEventsResult(
        error=status_pb2.Status(code=code.value[0], message=message, details=[detail])
    )


def item_ok(transaction_id: str, state: int = events_pb2.EVENT_STATE_QUEUED, replayed: bool = False) -> Any:
    response = sequencer_pb2.SubmitEventResponse(transaction_id=transaction_id, state=state)  # type: ignore[arg-type]
    return sequencer_pb2.SubmitEventsResult(response=response, replayed=replayed)


def answer(rpc: Any, *results: sequencer_pb2.SubmitEventsResult) -> None:
    rpc.terminate(
        sequencer_pb2.SubmitEventsResponse(results=results),
        (("x-correlation-id", "corr-batch"),),
        grpc.StatusCode.OK,
        "",
    )


TRANSIENT_ITEM = (grpc.StatusCode.UNAVAILABLE, "TRANSIENT", "serialization failure")


def test_submit_many_returns_one_outcome_per_item_in_input_order(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit_many, events(3), [None, "order-7:v1", None], timeout=30)

    metadata, request, rpc = take_unary_unary(channel, SUBMIT_MANY)
    answer(
        rpc,
        item_ok("tx-1"),
        item_error(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT", "no payload", field="event.payload"),
        item_ok("tx-3", events_pb2.EVENT_STATE_PARKED, replayed=True),
    )
    # A retry of the non-transient item would block on a call nobody answers: no result then.
    first, invalid, parked = future.result(RESULT_WAIT)

    sent = as_dict(metadata)
    assert "idempotency-key" not in sent  # refused on a batch call: keys travel per item
    assert sent["x-client-id"] == "erp-1" and sent["x-correlation-id"]
    assert [r.event for r in request.requests] == events(3)
    keys = [r.request_id for r in request.requests]
    assert keys[1] == "order-7:v1" and keys[0] and keys[2] and len(set(keys)) == 3
    assert not any(r.HasField("wait_for_terminal") for r in request.requests)

    assert isinstance(first, lc.SubmitResult) and isinstance(parked, lc.SubmitResult)
    assert (first.transaction_id, first.state, first.replayed, first.attempts) == (
        "tx-1",
        lc.EventState.QUEUED,
        False,
        1,
    )
    assert first.idempotency_key == keys[0] and first.correlation_id == "corr-batch"
    assert (parked.transaction_id, parked.state, parked.replayed) == ("tx-3", lc.EventState.PARKED, True)
    assert parked.idempotency_key == keys[2]

    assert type(invalid) is lc.InvalidEventError
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT and invalid.reason == "INVALID_EVENT"
    assert invalid.field == "event.payload" and invalid.details == "no payload"
    assert invalid.domain == "sequencer.logistics" and invalid.correlation_id == "corr-batch"
    assert invalid.idempotency_key == "order-7:v1"


@pytest.mark.parametrize(("reason", "code", "expected"), REASON_CASES)
def test_item_errors_map_to_the_exceptions_submit_raises(
    channel: Any, client: lc.SyncSequencerClient, reason: str, code: grpc.StatusCode, expected: type[Exception]
) -> None:
    future = in_thread(client.submit_many, events(2), timeout=30)
    _, _, rpc = take_unary_unary(channel, SUBMIT_MANY)
    answer(rpc, item_ok("tx-1"), item_error(code, reason, "told you so", a="1"))

    ok, error = future.result(RESULT_WAIT)
    assert isinstance(ok, lc.SubmitResult)
    assert type(error) is expected
    assert isinstance(error, lc.LogisticsError)
    assert error.code == code and error.reason == reason and error.metadata == {"a": "1"}


def test_transient_items_are_sent_again_alone_with_their_keys(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit_many, events(4), timeout=30)

    first_md, first, rpc = take_unary_unary(channel, SUBMIT_MANY)
    answer(
        rpc,
        item_ok("tx-1"),
        item_error(*TRANSIENT_ITEM),
        item_error(grpc.StatusCode.FAILED_PRECONDITION, "SEQUENCE_CONFLICT", "msi reused"),
        item_error(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "lock wait"),
    )
    second_md, second, rpc = take_unary_unary(channel, SUBMIT_MANY)
    answer(rpc, item_ok("tx-2"), item_ok("tx-4", replayed=True))
    done, retried, conflict, replayed = future.result(RESULT_WAIT)

    # The follow-up carries only the transient items, byte for byte, keys included.
    assert list(second.requests) == [first.requests[1], first.requests[3]]
    assert as_dict(first_md)["x-correlation-id"] == as_dict(second_md)["x-correlation-id"]
    assert isinstance(done, lc.SubmitResult) and done.attempts == 1 and done.transaction_id == "tx-1"
    assert isinstance(retried, lc.SubmitResult) and retried.attempts == 2
    assert retried.idempotency_key == first.requests[1].request_id and not retried.replayed
    assert type(conflict) is lc.SequenceConflictError  # not transient: returned, not retried
    assert conflict.idempotency_key == first.requests[2].request_id
    assert isinstance(replayed, lc.SubmitResult) and replayed.replayed and replayed.transaction_id == "tx-4"


def test_a_failed_call_is_sent_again_whole_with_the_same_keys(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit_many, events(2), timeout=30)

    _, first, rpc = take_unary_unary(channel, SUBMIT_MANY)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, second, rpc = take_unary_unary(channel, SUBMIT_MANY)
    answer(rpc, item_ok("tx-1", replayed=True), item_ok("tx-2", replayed=True))
    results = future.result(RESULT_WAIT)

    assert second == first
    assert [r.idempotency_key for r in results if isinstance(r, lc.SubmitResult)] == [
        r.request_id for r in first.requests
    ]
    assert all(isinstance(r, lc.SubmitResult) and r.replayed and r.attempts == 2 for r in results)


def test_transient_items_keep_their_last_error_when_attempts_run_out(
    channel: Any, client: lc.SyncSequencerClient
) -> None:
    future = in_thread(client.submit_many, events(2), timeout=30)

    _, first, rpc = take_unary_unary(channel, SUBMIT_MANY)
    answer(rpc, item_ok("tx-1"), item_error(*TRANSIENT_ITEM))
    keys = []
    for _ in range(FAST.max_attempts - 1):  # follow-ups fail too: transient item, then the whole call
        _, request, rpc = take_unary_unary(channel, SUBMIT_MANY)
        keys.append([r.request_id for r in request.requests])
        if len(keys) == 1:
            answer(rpc, item_error(*TRANSIENT_ITEM))
        else:
            rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "down")
    done, failed = future.result(RESULT_WAIT)

    assert keys == [[first.requests[1].request_id]] * (FAST.max_attempts - 1)
    assert isinstance(done, lc.SubmitResult)
    assert type(failed) is lc.TransientError and isinstance(failed, lc.RetryableError)
    assert failed.idempotency_key == first.requests[1].request_id  # re-send it later with this key


def test_a_call_level_refusal_raises(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit_many, events(2), timeout=30)
    _, _, rpc = take_unary_unary(channel, SUBMIT_MANY)
    rpc.terminate(None, *rich_error(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "who are you"))
    with pytest.raises(lc.UnauthenticatedError) as caught:
        future.result(RESULT_WAIT)
    assert caught.value.idempotency_key == ""  # a failure of the call, not of an item


def test_an_answer_with_the_wrong_number_of_results_raises(channel: Any, client: lc.SyncSequencerClient) -> None:
    future = in_thread(client.submit_many, events(2), timeout=30)
    _, _, rpc = take_unary_unary(channel, SUBMIT_MANY)
    answer(rpc, item_ok("tx-1"))
    with pytest.raises(lc.InternalError, match="1 results for 2 requests"):
        future.result(RESULT_WAIT)


def test_inputs_longer_than_the_batch_limit_are_split_in_order(channel: Any, client: lc.SyncSequencerClient) -> None:
    count = 2 * lc.MAX_BATCH + 1
    future = in_thread(client.submit_many, events(count), timeout=30)

    sizes = []
    for _ in range(3):
        _, request, rpc = take_unary_unary(channel, SUBMIT_MANY)
        sizes.append(len(request.requests))
        # Each answer names its item, so the test sees that outcomes land in input order.
        answer(rpc, *(item_ok(f"tx-{r.event.sequence}-{r.request_id}") for r in request.requests))
    results = future.result(RESULT_WAIT)

    assert sizes == [lc.MAX_BATCH, lc.MAX_BATCH, 1]
    assert len(results) == count
    for sequence, result in enumerate(results, start=1):
        assert isinstance(result, lc.SubmitResult)
        assert result.transaction_id == f"tx-{sequence}-{result.idempotency_key}"
    assert len({r.idempotency_key for r in results if isinstance(r, lc.SubmitResult)}) == count


def test_submit_many_checks_its_arguments_before_any_call(client: lc.SyncSequencerClient) -> None:
    assert client.submit_many([]) == []  # nothing to send: no call (none is answered here)
    with pytest.raises(ValueError, match="2 keys for 1 events"):
        client.submit_many(events(1), ["a", "b"])


# Flow control (SPEC 12): admission refusals carry a google.rpc.RetryInfo the client honours.


def overload_error(reason: str, delay_s: float | None) -> tuple[tuple[tuple[str, Any], ...], grpc.StatusCode, str]:
    """RESOURCE_EXHAUSTED with ErrorInfo `reason` and, when given, a RetryInfo of `delay_s`."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain="sequencer.logistics", metadata={"limit": "8"})
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if delay_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(delay_s * 1e9))
        details.append(any_pb2.Any())
        details[1].Pack(retry)
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message="busy", details=details))
    return (("x-correlation-id", "corr-err"), *status.trailing_metadata), status.code, status.details


def aio_error(reason: str, delay_s: float | None) -> grpc.aio.AioRpcError:
    trailing, code, details = overload_error(reason, delay_s)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


@pytest.mark.parametrize("reason", sorted(_common.OVERLOAD_REASONS))
def test_overload_refusal_is_retried_with_the_same_key(
    channel: Any, client: lc.SyncSequencerClient, reason: str
) -> None:
    future = in_thread(client.submit, event(), timeout=30)
    first_md, first_request, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(None, *overload_error(reason, 0.01))
    second_md, second_request, rpc = take_unary_unary(channel, SUBMIT)
    rpc.terminate(ACCEPTED, (("x-correlation-id", "corr-1"),), grpc.StatusCode.OK, "")

    result = future.result(RESULT_WAIT)
    assert as_dict(first_md)["idempotency-key"] == as_dict(second_md)["idempotency-key"] == result.idempotency_key
    assert first_request == second_request
    assert result.attempts == 2 and result.response == ACCEPTED


def test_overload_refusals_are_bounded_by_their_own_attempts(channel: Any) -> None:
    policy = lc.RetryPolicy(max_attempts=1, max_overload_attempts=3, initial_backoff=0.001, max_backoff=0.01)
    client = lc.SyncSequencerClient(channel=channel, retry=policy)
    future = in_thread(client.submit, event(), timeout=30)
    for _ in range(3):
        _, _, rpc = take_unary_unary(channel, SUBMIT)
        rpc.terminate(None, *overload_error("BACKLOG_FULL", 0.01))
    with pytest.raises(lc.BacklogFullError) as caught:
        future.result(RESULT_WAIT)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_delay == pytest.approx(0.01)
    assert isinstance(caught.value, lc.ResourceExhaustedError)


def test_the_wait_follows_retry_info_with_jitter_and_a_cap() -> None:
    policy = lc.RetryPolicy(max_retry_delay=2.0)

    def state_after(exc: BaseException, attempt: int = 1) -> tenacity.RetryCallState:
        retry_state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        retry_state.attempt_number = attempt
        retry_state.set_exception((type(exc), exc, None))
        return retry_state

    waits = [policy.wait_after(state_after(aio_error("CALLER_OVERLOADED", 0.5))) for _ in range(50)]
    assert all(0.5 <= w <= 0.6 for w in waits) and len(set(waits)) > 1
    assert all(2.0 <= policy.wait_after(state_after(aio_error("BACKLOG_FULL", 60.0))) <= 2.4 for _ in range(20))
    # Refused again and again, the call backs off past the delay (x2 each time), to the cap.
    assert 1.0 <= policy.wait_after(state_after(aio_error("CALLER_OVERLOADED", 0.5), attempt=2)) <= 1.2
    assert 2.0 <= policy.wait_after(state_after(aio_error("CALLER_OVERLOADED", 0.5), attempt=5)) <= 2.4
    # No RetryInfo: the documented default; another RESOURCE_EXHAUSTED reason is no overload.
    assert _common.overload_delay(aio_error("BACKLOG_FULL", None)) == _common.DEFAULT_OVERLOAD_DELAY
    assert _common.overload_delay(aio_error("PARKED_LIMIT_REACHED", 0.5)) is None
    assert not policy.is_retryable(aio_error("PARKED_LIMIT_REACHED", 0.5))
    assert policy.is_retryable(aio_error("CALLER_OVERLOADED", 0.5))


def test_calls_past_max_concurrent_calls_wait_in_the_client_within_their_deadline(channel: Any) -> None:
    client = lc.SyncSequencerClient(channel=channel, retry=FAST, max_concurrent_calls=1)
    first = in_thread(client.submit, event(1), timeout=30)
    _, first_request, first_rpc = take_unary_unary(channel, SUBMIT)
    # The only slot is taken: this call waits in the client and its deadline runs out unsent.
    with pytest.raises(lc.DeadlineExceededError) as caught:
        client.submit(event(2), timeout=0.2)
    assert "max_concurrent_calls" in caught.value.details
    queued = in_thread(client.submit, event(3), timeout=30)
    first_rpc.terminate(ACCEPTED, (), grpc.StatusCode.OK, "")
    assert first.result(RESULT_WAIT).response == ACCEPTED
    # The slot freed, the queued call goes out (and the timed-out one never did).
    _, third_request, third_rpc = take_unary_unary(channel, SUBMIT)
    assert first_request.event.sequence == 1 and third_request.event.sequence == 3
    third_rpc.terminate(ACCEPTED, (), grpc.StatusCode.OK, "")
    assert queued.result(RESULT_WAIT).attempts == 1
