"""The transport-independent half of both clients: keys, metadata, results, errors, retries.

`aio.py` and `sync.py` only differ in how they wait (await vs block); everything they decide
is decided here once, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import importlib.resources
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import tenacity
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from logistics.client import errors, results
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2

log = logging.getLogger("logistics.client")

IDEMPOTENCY_KEY_HEADER = "idempotency-key"
CORRELATION_HEADER = "x-correlation-id"
CLIENT_ID_HEADER = "x-client-id"
AUTHORIZATION_HEADER = "authorization"
REPLAYED_HEADER = "idempotency-replayed"
EXPIRES_AT_HEADER = "idempotency-expires-at"
STATUS_DETAILS_HEADER = "grpc-status-details-bin"

#: States after which an event's status never changes again.
TERMINAL_STATES = frozenset(
    {events_pb2.EVENT_STATE_APPLIED, events_pb2.EVENT_STATE_REJECTED, events_pb2.EVENT_STATE_SKIPPED}
)

#: Deadline of a read (status, entity, page) when the caller gives none.
DEFAULT_TIMEOUT = 10.0
#: Deadline of a status stream when the caller gives none (streams need one too).
DEFAULT_WATCH_TIMEOUT = 600.0
#: Unary calls one client has on the wire at once; more wait in the client (within their
#: deadline). Under the server's HTTP/2 streams per connection (`*_MAX_CONCURRENT_STREAMS`,
#: 1000), so a burst is queued here instead of refused by the transport (docs/flow-control.md).
DEFAULT_MAX_CONCURRENT_CALLS = 100
#: ErrorInfo reasons of admission refusals (SPEC 12): retried after the RetryInfo delay.
OVERLOAD_REASONS = frozenset({"CALLER_OVERLOADED", "BACKLOG_FULL"})
#: The wait after an overload refusal that carried no RetryInfo.
DEFAULT_OVERLOAD_DELAY = 1.0

Metadata = tuple[tuple[str, str], ...]
#: An entity: an EntityRef, an `EntityKey`, or a `(entity type number, entity id)` tuple.
EntityLike = events_pb2.EntityRef | tuple[int, str]


# Service config (channel-level retries), shipped beside this module.


@functools.cache
def service_config_json() -> str:
    """The channel's service config; one file, read through importlib.resources so it works
    from a wheel or a zip as well as from the source tree."""
    return importlib.resources.files("logistics.client").joinpath("service_config.json").read_text("utf-8")


def channel_options(extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Options for channels the clients create: the retry service config, retries enabled."""
    return [("grpc.service_config", service_config_json()), ("grpc.enable_retries", 1), *extra]


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


# Retries above the channel: bounded, backed off with jitter, inside the overall deadline.


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How the client retries a call; the defaults are the shipped service config's numbers.

    The channel's own retryPolicy covers UNAVAILABLE below the client; this policy also covers
    what the channel does not retry (DEADLINE_EXCEEDED of one attempt, interceptors, proxies),
    and always with the same idempotency key, so a retry can only ever replay.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    )
    #: Attempts of one call while the server refuses it as overloaded (CALLER_OVERLOADED,
    #: BACKLOG_FULL): each waits at least the server's RetryInfo delay; the deadline bounds them too.
    max_overload_attempts: int = 30
    #: The longest RetryInfo delay honoured as given (a longer one is cut to this).
    max_retry_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_overload_attempts < 1:
            raise ValueError("max_attempts and max_overload_attempts must be at least 1")
        if self.max_retry_delay < 0:
            raise ValueError("max_retry_delay must not be negative")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff or self.backoff_multiplier < 1:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff <= max_backoff, multiplier >= 1")

    @classmethod
    def from_service_config(cls) -> RetryPolicy:
        """The shipped service config's retryPolicy, plus DEADLINE_EXCEEDED (client side only)."""
        config = json.loads(service_config_json())
        policy = config["methodConfig"][0]["retryPolicy"]
        codes = {grpc.StatusCode[name] for name in policy["retryableStatusCodes"]}
        return cls(
            max_attempts=int(policy["maxAttempts"]),
            initial_backoff=_seconds(policy["initialBackoff"]),
            max_backoff=_seconds(policy["maxBackoff"]),
            backoff_multiplier=float(policy["backoffMultiplier"]),
            retryable_codes=frozenset({*codes, grpc.StatusCode.DEADLINE_EXCEEDED}),
        )

    def backoff(self, attempt: int) -> float:
        """Full-jitter backoff before re-opening a stream after its `attempt`-th failure."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.backoff_multiplier ** max(0, attempt - 1))
        return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not cryptography

    def is_retryable(self, exc: BaseException) -> bool:
        """A failed attempt worth another: a retryable code, batch items that failed with one, or
        an admission refusal (retried after its RetryInfo delay)."""
        return isinstance(exc, PendingItems) or self.retries(status_code(exc)) or overload_delay(exc) is not None

    def wait_after(self, retry_state: tenacity.RetryCallState) -> float:
        """The sleep before the next attempt. After an overload refusal: at least its RetryInfo
        delay, growing by backoff_multiplier with each further attempt of the call (so callers
        refused again and again back off instead of returning every 0.1 s), capped at
        max_retry_delay, plus up to 20% jitter so refused callers do not return in step. Else
        full-jitter exponential backoff."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        delay = overload_delay(exc) if exc is not None else None
        if delay is not None:
            grown = delay * self.backoff_multiplier ** max(0, retry_state.attempt_number - 1)
            return min(grown, self.max_retry_delay) * random.uniform(1.0, 1.2)  # noqa: S311 - jitter
        return float(self._backoff_wait(retry_state))

    @functools.cached_property
    def _backoff_wait(self) -> tenacity.wait.wait_base:
        # Full jitter: a random wait in [0, initial * multiplier ** (n - 1)], capped.
        return tenacity.wait_random_exponential(
            multiplier=self.initial_backoff, max=self.max_backoff, exp_base=self.backoff_multiplier
        )

    def stop_after_attempts(self, retry_state: tenacity.RetryCallState) -> bool:
        """Gives up after max_attempts, or max_overload_attempts while the server says overloaded."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        overloaded = exc is not None and overload_delay(exc) is not None
        limit = self.max_overload_attempts if overloaded else self.max_attempts
        return retry_state.attempt_number >= limit

    def retries(self, code: grpc.StatusCode | None) -> bool:
        """Whether a failure with `code` is retried: one answer for whole calls and batch items."""
        return code in self.retryable_codes

    def tenacity_kwargs(self, deadline: float) -> dict[str, Any]:
        """Arguments for tenacity.Retrying / AsyncRetrying: the one retry loop of both clients."""
        return {
            "stop": StopAfterAttempts(self) | StopBeforeDeadline(deadline),
            "wait": self.wait_after,
            "retry": tenacity.retry_if_exception(self.is_retryable),
            "before_sleep": _log_retry,
            "reraise": True,
        }


class StopAfterAttempts(tenacity.stop.stop_base):
    """The policy's attempt limits (ordinary failures, overload refusals) as a tenacity stop."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.policy.stop_after_attempts(retry_state)


class StopBeforeDeadline(tenacity.stop.stop_base):
    """Stops when the next attempt would start at or after the overall deadline (monotonic)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return time.monotonic() + retry_state.upcoming_sleep >= self.deadline


def _log_retry(retry_state: tenacity.RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    code = status_code(exc) if exc is not None else None
    log.info(
        "retrying call",
        extra={
            "attempt": retry_state.attempt_number,
            "code": code.name if code else None,
            "pending_items": exc.count if isinstance(exc, PendingItems) else None,
            "sleep_s": round(retry_state.upcoming_sleep, 3),
        },
    )


def deadline_after(timeout: float) -> float:
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    return time.monotonic() + timeout


def remaining(deadline: float) -> float:
    """The time left until `deadline`: the deadline of the next attempt (never negative)."""
    return max(0.0, deadline - time.monotonic())


# Keys and metadata.


def new_idempotency_key() -> str:
    """A fresh key: a random UUID, inside the server's key charset and length."""
    return str(uuid.uuid4())


def new_correlation_id() -> str:
    """One id for all attempts of one logical call, so the server logs tie them together."""
    return uuid.uuid4().hex


def call_metadata(
    client_id: str | None,
    *,
    token: str | None = None,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
) -> Metadata:
    """The metadata of one logical call (identical on every attempt).

    `token` goes out as `authorization: Bearer <token>`; `client_id` as `x-client-id`, which
    names the key scope only on a development server (no credentials configured).
    """
    pairs: list[tuple[str, str]] = []
    if token:
        pairs.append((AUTHORIZATION_HEADER, f"Bearer {token}"))
    if idempotency_key is not None:
        pairs.append((IDEMPOTENCY_KEY_HEADER, idempotency_key))
    if correlation_id:
        pairs.append((CORRELATION_HEADER, correlation_id))
    if client_id:
        pairs.append((CLIENT_ID_HEADER, client_id))
    return tuple(pairs)


class CallerIdentity:
    """Who the client calls as: the metadata every call of the async and sync clients carries."""

    client_id: str | None
    token: str | None

    def _metadata(self, idempotency_key: str | None = None, correlation_id: str | None = None) -> Metadata:
        return call_metadata(
            self.client_id,
            token=self.token,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id or new_correlation_id(),
        )


def text_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The text entries of received metadata (first value wins)."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            found.setdefault(key, value)
    return found


def entity_ref(entity: EntityLike) -> events_pb2.EntityRef:
    if isinstance(entity, events_pb2.EntityRef):
        return entity
    entity_type, entity_id = entity
    return events_pb2.EntityRef(entity_type=events_pb2.EntityType.ValueType(entity_type), entity_id=entity_id)


# Requests and results.


def submit_request(
    event: events_pb2.Event, wait_for_terminal: float | dt.timedelta | None
) -> sequencer_pb2.SubmitEventRequest:
    request = sequencer_pb2.SubmitEventRequest(event=event)
    if wait_for_terminal is not None:
        seconds = (
            wait_for_terminal.total_seconds() if isinstance(wait_for_terminal, dt.timedelta) else wait_for_terminal
        )
        if seconds < 0:
            raise ValueError("wait_for_terminal must not be negative")
        request.wait_for_terminal.SetInParent()
        request.wait_for_terminal.FromTimedelta(dt.timedelta(seconds=seconds))
    return request


def status_request(transaction_id: str | None, idempotency_key: str | None) -> sequencer_pb2.GetEventStatusRequest:
    if bool(transaction_id) == bool(idempotency_key):
        raise ValueError("give exactly one of transaction_id or idempotency_key")
    return sequencer_pb2.GetEventStatusRequest(
        transaction_id=transaction_id or "", idempotency_key=idempotency_key or ""
    )


def watch_request(transaction_id: str | None, entity: EntityLike | None) -> sequencer_pb2.WatchEventStatusRequest:
    if bool(transaction_id) == (entity is not None):
        raise ValueError("give exactly one of transaction_id or entity")
    if transaction_id:
        return sequencer_pb2.WatchEventStatusRequest(transaction_id=transaction_id)
    assert entity is not None
    return sequencer_pb2.WatchEventStatusRequest(entity=entity_ref(entity))


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    """The accepted event plus what the idempotency layer said about it."""

    response: sequencer_pb2.SubmitEventResponse
    #: True when the server answered with the stored response of an earlier attempt.
    replayed: bool
    correlation_id: str
    idempotency_key: str
    #: When the server forgets the key (a retry after that is a new request).
    expires_at: dt.datetime | None
    #: How many attempts this call took (1 = no retry).
    attempts: int = 1

    @property
    def transaction_id(self) -> str:
        return self.response.transaction_id

    @property
    def state(self) -> results.EventState:
        """The state as an IntEnum member: equal to the wire number, printed by name."""
        return results.event_state(self.response.state)

    @property
    def terminal(self) -> bool:
        return self.response.state in TERMINAL_STATES


def parse_timestamp(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def submit_result(
    response: sequencer_pb2.SubmitEventResponse,
    trailing: Mapping[str, str],
    *,
    idempotency_key: str,
    correlation_id: str,
    attempts: int,
) -> SubmitResult:
    return SubmitResult(
        response=response,
        replayed=trailing.get(REPLAYED_HEADER, "").lower() == "true",
        correlation_id=trailing.get(CORRELATION_HEADER) or response.correlation_id or correlation_id,
        idempotency_key=idempotency_key,
        expires_at=parse_timestamp(trailing.get(EXPIRES_AT_HEADER)),
        attempts=attempts,
    )


# Batches: SubmitEvents.

#: Items per SubmitEvents call: the server's limit (`SEQUENCER_MAX_BATCH`, 500); `submit_many`
#: splits longer inputs into several calls.
MAX_BATCH = 500
#: Overall deadline of one `submit_many` (every call it makes, retries included) by default.
DEFAULT_BATCH_TIMEOUT = 30.0

#: One item's answer from `submit_many`: its result, or its failure as the typed exception that
#: `submit` would have raised for it (returned, not raised).
SubmitOutcome = SubmitResult | errors.LogisticsError


class PendingItems(Exception):
    """Some items of an answered SubmitEvents call failed transiently.

    Raised inside an attempt, so the one retry loop (`RetryPolicy.tenacity_kwargs`) re-sends
    those items, and only those, with their keys, within the same attempts and deadline as a
    failed call. When the loop gives up, `submit_many` returns their last errors as results.
    """

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} items failed transiently")
        self.count = count


class SubmitBatch:
    """The state of one `submit_many`: keys, the split into calls, and every item's outcome.

    Both clients only send what `calls()` hands them and wait; everything else (which items a
    follow-up call carries, how an item's answer becomes a result or a typed error, whether an
    item is retried) is decided here.
    """

    def __init__(
        self,
        events: Iterable[events_pb2.Event],
        keys: Sequence[str | None] | None,
        policy: RetryPolicy,
        *,
        correlation_id: str | None,
        timeout: float,
    ) -> None:
        events = list(events)
        given = list(keys) if keys is not None else [None] * len(events)
        if len(given) != len(events):
            raise ValueError(f"got {len(given)} keys for {len(events)} events")
        #: One key per item, kept across every retry (a fresh UUID where none was given).
        self.keys = [key if key is not None else new_idempotency_key() for key in given]
        self.requests = [
            sequencer_pb2.SubmitEventRequest(event=event, request_id=key)
            for event, key in zip(events, self.keys, strict=True)
        ]
        self.policy = policy
        self.correlation_id = correlation_id or new_correlation_id()
        self.deadline = deadline_after(timeout)
        self._outcomes: list[SubmitOutcome | None] = [None] * len(events)

    def calls(self) -> Iterator[BatchCall]:
        """The calls to make, in input order, each of at most MAX_BATCH items."""
        for start in range(0, len(self.requests), MAX_BATCH):
            yield BatchCall(self, range(start, min(start + MAX_BATCH, len(self.requests))))

    def record(self, index: int, outcome: SubmitOutcome) -> None:
        self._outcomes[index] = outcome

    def outcomes(self) -> list[SubmitOutcome]:
        """Every item's outcome, in input order (call once every call has been made)."""
        missing = [i for i, outcome in enumerate(self._outcomes) if outcome is None]
        if missing:
            raise AssertionError(f"items {missing[:5]} have no outcome")
        return [outcome for outcome in self._outcomes if outcome is not None]


class BatchCall:
    """One SubmitEvents call and its follow-ups: the items still waiting for a final answer."""

    def __init__(self, batch: SubmitBatch, indexes: Iterable[int]) -> None:
        self.batch = batch
        self.pending = list(indexes)
        self.answered = False

    @contextlib.contextmanager
    def settle(self) -> Iterator[None]:
        """Wraps the retry loop of this call: how it may end without an answer for every item.

        Items still failing transiently when the loop gives up keep their last errors as their
        outcomes. A call that fails as a whole raises, like `submit` (auth, too many items, the
        server unreachable until the deadline), unless an earlier attempt answered: then only
        transiently failed items were left, and they keep the errors they got.
        """
        try:
            yield
        except PendingItems:
            pass
        except errors.LogisticsError as exc:
            if not self.answered:
                raise
            log.info(
                "follow-up call failed; its items keep their last errors",
                extra={"code": exc.code.name, "items": len(self.pending)},
            )

    def request(self) -> sequencer_pb2.SubmitEventsRequest:
        """The items of the next attempt: all of them first, then those that failed transiently."""
        return sequencer_pb2.SubmitEventsRequest(requests=[self.batch.requests[i] for i in self.pending])

    def answer(self, response: sequencer_pb2.SubmitEventsResponse, trailing: Mapping[str, str], attempt: int) -> None:
        """Records each item's outcome; raises PendingItems when some should be sent again."""
        if len(response.results) != len(self.pending):
            raise errors.InternalError(
                f"SubmitEvents answered {len(response.results)} results for {len(self.pending)} requests",
                code=grpc.StatusCode.INTERNAL,
                correlation_id=trailing.get(CORRELATION_HEADER, ""),
            )
        self.answered = True
        correlation_id = trailing.get(CORRELATION_HEADER) or self.batch.correlation_id
        again: list[int] = []
        for index, item in zip(self.pending, response.results, strict=True):
            outcome = item_outcome(
                item, idempotency_key=self.batch.keys[index], correlation_id=correlation_id, attempts=attempt
            )
            self.batch.record(index, outcome)
            if isinstance(outcome, errors.LogisticsError) and self.batch.policy.retries(outcome.code):
                again.append(index)
        self.pending = again
        if again:
            raise PendingItems(len(again))


def item_outcome(
    item: sequencer_pb2.SubmitEventsResult, *, idempotency_key: str, correlation_id: str, attempts: int
) -> SubmitOutcome:
    """A batch item's answer as the result or the typed error `submit` would give for it."""
    kind = item.WhichOneof("outcome")
    if kind == "response":
        return SubmitResult(
            response=item.response,
            replayed=item.replayed,
            correlation_id=item.response.correlation_id or correlation_id,
            idempotency_key=idempotency_key,
            expires_at=None,  # a batch answer carries no per-item expiry
            attempts=attempts,
        )
    if kind == "error":
        return status_error(item.error, correlation_id=correlation_id, idempotency_key=idempotency_key)
    return errors.LogisticsError(
        "SubmitEvents answered an item with neither a response nor an error",
        code=grpc.StatusCode.UNKNOWN,
        correlation_id=correlation_id,
        idempotency_key=idempotency_key,
    )


# Errors.


def status_code(exc: BaseException | None) -> grpc.StatusCode | None:
    """The gRPC code of a failed call (sync grpc.RpcError or grpc.aio.AioRpcError)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return exc.code()
    return None


def received_trailing(exc: grpc.RpcError) -> list[tuple[str, str | bytes]]:
    """Trailing metadata of a failed call as (key, value) pairs, sync or asyncio alike."""
    raw: Any = exc.trailing_metadata() if isinstance(exc, (grpc.aio.AioRpcError, grpc.Call)) else ()
    return [(str(key), value) for key, value in raw or ()]


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    """google.rpc.Status from `grpc-status-details-bin`, checked against the call's own status."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(exc)
    except ValueError:
        # Code or message disagree with the details (a proxy rewrote one): still use the details.
        raw = next((v for k, v in received_trailing(exc) if k == STATUS_DETAILS_HEADER), None)
        status = status_pb2.Status.FromString(raw) if isinstance(raw, bytes) else None
    return status


def retry_info_delay(status: status_pb2.Status | None) -> float | None:
    """The google.rpc.RetryInfo delay of a status, in seconds (None: it carries none)."""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def overload_delay(exc: BaseException | None) -> float | None:
    """How long to wait before retrying a call the server refused as overloaded (RESOURCE_EXHAUSTED
    with reason CALLER_OVERLOADED or BACKLOG_FULL); None for any other failure."""
    if not isinstance(exc, grpc.RpcError) or status_code(exc) != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = _rich_status(exc)
    info = error_info(status)
    if info is None or info.reason not in OVERLOAD_REASONS:
        return None
    delay = retry_info_delay(status)
    return DEFAULT_OVERLOAD_DELAY if delay is None else max(0.0, delay)


def error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def typed_error(
    code: grpc.StatusCode,
    message: str,
    info: error_details_pb2.ErrorInfo | None,
    *,
    correlation_id: str = "",
    idempotency_key: str = "",
    retry_delay: float | None = None,
) -> errors.LogisticsError:
    """The typed exception for a failure, chosen by its ErrorInfo reason, else by its code: the
    one status-to-exception mapping, for failed calls and failed batch items alike."""
    reason = info.reason if info is not None else ""
    cls = errors.REASONS.get(reason, errors.LogisticsError) if reason else errors.CODES.get(code, errors.LogisticsError)
    return cls(
        message or code.name,
        code=code,
        reason=reason,
        metadata=dict(info.metadata) if info is not None else {},
        domain=info.domain if info is not None else "",
        correlation_id=correlation_id,
        idempotency_key=idempotency_key,
        retry_delay=retry_delay,
    )


def map_error(exc: grpc.RpcError) -> errors.LogisticsError:
    """The typed exception for a failed call."""
    code = status_code(exc) or grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, (grpc.aio.AioRpcError, grpc.Call)) else ""
    trailing = text_metadata(received_trailing(exc))
    status = _rich_status(exc)
    return typed_error(
        code,
        details or "",
        error_info(status),
        correlation_id=trailing.get(CORRELATION_HEADER, ""),
        retry_delay=retry_info_delay(status),
    )


_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status code number (UNKNOWN for numbers gRPC lacks)."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_error(
    status: status_pb2.Status, *, correlation_id: str = "", idempotency_key: str = ""
) -> errors.LogisticsError:
    """The typed exception for a google.rpc.Status that arrived as data (a batch item's error)."""
    return typed_error(
        grpc_code(status.code),
        status.message,
        error_info(status),
        correlation_id=correlation_id,
        idempotency_key=idempotency_key,
        retry_delay=retry_info_delay(status),
    )


def reopen_after(policy: RetryPolicy, exc: BaseException) -> bool:
    """Whether `wait()` re-opens its status stream after `exc` (False: the deadline ran out).

    Raises the typed error when the failure is not transient.
    """
    code = status_code(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return False
    if not policy.is_retryable(exc):
        assert isinstance(exc, grpc.RpcError)
        raise map_error(exc) from exc
    return True


def queued_past_deadline() -> errors.DeadlineExceededError:
    """The error of a call whose deadline ran out while it waited for one of the client's slots."""
    return errors.DeadlineExceededError(
        "the deadline ran out while the call waited for a free slot (max_concurrent_calls)",
        code=grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def wait_timed_out(transaction_id: str, last: sequencer_pb2.EventStatus | None) -> errors.DeadlineExceededError:
    """The error `wait()` raises when the event is not terminal in time."""
    state = events_pb2.EventState.Name(last.state) if last is not None else "UNKNOWN"
    return errors.DeadlineExceededError(
        f"transaction {transaction_id} is still {state}",
        code=grpc.StatusCode.DEADLINE_EXCEEDED,
        metadata={"transaction_id": transaction_id, "state": state},
    )
