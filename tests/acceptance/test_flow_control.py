"""Flow control (SPEC 12) against REAL servers: a burst past a caller's in-flight limit and a
backlog past its bound are answered RESOURCE_EXHAUSTED with a reason and a google.rpc.RetryInfo,
store nothing, and the refused keys succeed when retried later; every admitted event is applied
exactly once, in order. And a burst of 3,000 calls on one channel of the shipped client is never
refused at the transport.

No timing assertions: the holders that fill a caller's slots are SubmitEvent calls with a long
`wait_for_terminal` on parked events (they stay in flight until cancelled), and the backlog is
filled with the ledger unreachable, so every refusal here is certain, not a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy.engine import make_url

from logistics import client as lc
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from tests.support import SHIPMENT, System, error_info, shipment_event

APPLIED = events_pb2.EVENT_STATE_APPLIED
CALLER = "burst"
LIFECYCLE = ["shipment_created", "shipment_picked", "shipment_packed"]


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def rows(database_url: str) -> tuple[int, int]:
    """(events rows, idempotency records) in the sequencer's tables."""
    async with await psycopg.AsyncConnection.connect(libpq(database_url)) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM sequencer.events), (SELECT count(*) FROM sequencer.idempotency_keys)"
        )
        found = await cur.fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


def retry_delay(exc: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a failed call (fails the test when there is none)."""
    raw = next(v for k, v in exc.trailing_metadata() or () if k == "grpc-status-details-bin")
    for detail in status_pb2.Status.FromString(raw).details:
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            delay: duration_pb2.Duration = info.retry_delay
            return float(delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo in the status details")


def metadata(key: str | None = None) -> tuple[tuple[str, str], ...]:
    pairs = [("x-client-id", CALLER)]
    if key is not None:
        pairs.append(("idempotency-key", key))
    return tuple(pairs)


def assert_overloaded(exc: BaseException, reason: str) -> None:
    assert isinstance(exc, grpc.aio.AioRpcError), repr(exc)
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
    assert error_info(exc, "sequencer.logistics").reason == reason
    assert retry_delay(exc) > 0


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def holders(system: System, count: int) -> AsyncIterator[None]:
    """`count` SubmitEvent calls of the caller that stay in flight (a parked event, a long
    wait_for_terminal) until the block ends, filling its in-flight slots."""
    admission = system.sequencer_app.admission
    before = admission.inflight[CALLER]
    tasks = []
    for i in range(count):
        event = shipment_event(f"HOLD-{i}-{before}", 2, "shipment_picked")
        request = sequencer_pb2.SubmitEventRequest(event=event)
        request.wait_for_terminal.FromSeconds(60)
        tasks.append(
            asyncio.ensure_future(
                system.sequencer.SubmitEvent(request, metadata=metadata(f"hold-{i}-{before}"), timeout=90)
            )
        )
    await wait_until(lambda: admission.inflight[CALLER] >= before + count, "the holders to be in flight")
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_until(lambda: admission.inflight[CALLER] <= before, "the holders' slots to be freed")


async def outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return exc


class Codes(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the code of every attempt the client makes (to see a refusal happen)."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        self.codes.append(await call.code())
        return call


async def test_a_burst_past_the_in_flight_limit_is_refused_cleanly_and_retried_later(
    database_url: str, sequencer_settings: Any
) -> None:
    settings = dataclasses.replace(sequencer_settings, max_inflight_per_caller=4)
    system = await System.start(database_url, settings)
    codes = Codes()
    client = lc.SequencerClient(f"127.0.0.1:{system.sequencer_app.port}", client_id=CALLER, interceptors=[codes])
    try:
        async with holders(system, 4):
            # In flight, and stored: their events are parked, their waits go on.
            for _ in range(500):
                if (held := await rows(database_url)) == (4, 4):
                    break
                await asyncio.sleep(0.02)
            assert held == (4, 4)
            events = [shipment_event(f"BURST-{i}", 1, "shipment_created") for i in range(60)]
            keys = [f"burst-{i}" for i in range(60)]
            answers = await asyncio.gather(
                *(
                    outcome(
                        system.sequencer.SubmitEvent(
                            sequencer_pb2.SubmitEventRequest(event=e), metadata=metadata(k), timeout=10
                        )
                    )
                    for e, k in zip(events, keys, strict=True)
                )
            )
            for answer in answers:
                assert_overloaded(answer, "CALLER_OVERLOADED")
            # Every RPC of the caller is bounded, reads and admin included; another caller is not.
            read = await outcome(
                system.sequencer.GetEventStatus(
                    sequencer_pb2.GetEventStatusRequest(idempotency_key="burst-0"), metadata=metadata(), timeout=10
                )
            )
            assert_overloaded(read, "CALLER_OVERLOADED")
            gaps = await outcome(
                system.admin.ListGaps(sequencer_pb2.ListGapsRequest(), metadata=metadata(), timeout=10)
            )
            assert_overloaded(gaps, "CALLER_OVERLOADED")
            other = await system.admin.ListGaps(
                sequencer_pb2.ListGapsRequest(), metadata=(("x-client-id", "someone-else"),), timeout=10
            )
            assert len(other.gaps) == 4  # the holders' parked events
            # Nothing of the refused calls was stored.
            assert await rows(database_url) == held

            # The shipped client waits out the refusal and retries with the same key.
            late = asyncio.ensure_future(client.submit(events[0], idempotency_key=keys[0], timeout=60))
            await wait_until(lambda: grpc.StatusCode.RESOURCE_EXHAUSTED in codes.codes, "a refused attempt")
        result = await late
        assert result.attempts >= 2 and result.idempotency_key == keys[0]
        assert codes.codes[-1] == grpc.StatusCode.OK
        assert set(codes.codes[:-1]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}

        # Later, the refused keys all succeed, and each event is applied exactly once.
        for event, key in zip(events, keys, strict=True):
            reply = await system.sequencer.SubmitEvent(
                sequencer_pb2.SubmitEventRequest(event=event), metadata=metadata(key), timeout=10
            )
            status = await system.wait_terminal(reply.transaction_id)
            assert status.state == APPLIED
        for event in events:
            history = await system.history(SHIPMENT, event.entity_id)
            assert [h.sequence for h in history] == [1]
    finally:
        await client.close()
        await system.stop()


async def test_a_full_backlog_refuses_submissions_until_it_drains(database_url: str, sequencer_settings: Any) -> None:
    settings = dataclasses.replace(sequencer_settings, max_backlog=6, backlog_refresh_interval=0.05)
    system = await System.start(database_url, settings)
    try:
        # The ledger unreachable: accepted events stay held (QUEUED, and PARKED behind them).
        await system.sequencer_app.stop(0)
        await system.start_sequencer(dataclasses.replace(system.sequencer_settings, ledger_target="127.0.0.1:1"))
        # Fill it. The figure is conservative (what a count may not have seen yet is added), so a
        # refusal may come before 6 rows, then passes; once 6 are held, every submission is refused.
        candidates = [
            shipment_event(f"BL-{i}", sequence, kind) for i in range(4) for sequence, kind in enumerate(LIFECYCLE, 1)
        ]
        admitted: dict[str, list[int]] = {}
        refused: list[events_pb2.Event] = []
        for event in candidates:
            while True:
                answer = await outcome(system.submit(event, key=f"late-{event.entity_id}-{event.sequence}"))
                if not isinstance(answer, grpc.aio.AioRpcError):
                    admitted.setdefault(event.entity_id, []).append(event.sequence)
                    break
                assert_overloaded(answer, "BACKLOG_FULL")
                if (await rows(database_url))[0] >= 6:
                    refused.append(event)
                    break
                await asyncio.sleep(0.05)
        full = await rows(database_url)
        assert full == (6, 6) and sum(len(s) for s in admitted.values()) == 6
        refused += [shipment_event(f"BL-NEW-{i}", 1, LIFECYCLE[0]) for i in range(3)]
        for event in refused:
            answer = await outcome(system.submit(event, key=f"late-{event.entity_id}-{event.sequence}"))
            assert_overloaded(answer, "BACKLOG_FULL")
        batch = sequencer_pb2.SubmitEventsRequest(
            requests=[
                sequencer_pb2.SubmitEventRequest(event=e, request_id=f"late-{e.entity_id}-{e.sequence}")
                for e in refused
            ]
        )
        answer = await outcome(system.sequencer.SubmitEvents(batch, timeout=10))
        assert_overloaded(answer, "BACKLOG_FULL")
        # After a count, the figure still says full (the held rows are counted, not guessed).
        admission = system.sequencer_app.admission
        admission.counted_once = False
        await wait_until(lambda: admission.counted_once, "a backlog count")
        assert admission.backlog >= 6
        answer = await outcome(system.submit(refused[0], key=f"late-{refused[0].entity_id}-{refused[0].sequence}"))
        assert_overloaded(answer, "BACKLOG_FULL")
        # The shipped client retries as told, then gives up with the typed error; nothing stored.
        policy = lc.RetryPolicy(max_overload_attempts=2, max_retry_delay=0.05)
        async with lc.SequencerClient(f"127.0.0.1:{system.sequencer_app.port}", retry=policy) as client:
            with pytest.raises(lc.BacklogFullError) as caught:
                await client.submit(refused[-1], idempotency_key=f"late-{refused[-1].entity_id}-1")
        assert caught.value.retry_delay is not None and caught.value.retry_delay > 0
        assert await rows(database_url) == full

        # The ledger back: the backlog drains, and the refused keys succeed.
        await system.sequencer_app.stop(0)
        await system.start_sequencer(
            dataclasses.replace(system.sequencer_settings, ledger_target=f"127.0.0.1:{system.ledger_app.port}")
        )
        for event in refused:
            key = f"late-{event.entity_id}-{event.sequence}"
            for _ in range(200):
                answer = await outcome(system.submit(event, key=key))
                if not isinstance(answer, grpc.aio.AioRpcError):
                    break
                assert_overloaded(answer, "BACKLOG_FULL")
                await asyncio.sleep(retry_delay(answer))
            assert not isinstance(answer, grpc.aio.AioRpcError), answer
            admitted.setdefault(event.entity_id, []).append(event.sequence)
            await system.wait_terminal(answer.transaction_id)
        # Every admitted event applied exactly once, in MSI order.
        for entity_id, sequences in admitted.items():
            history = await system.history(SHIPMENT, entity_id)
            assert [h.sequence for h in history] == sorted(sequences), entity_id
            assert (await system.shipment(entity_id)).version == max(sequences)
    finally:
        await system.stop()


@pytest.mark.parametrize("channel_retries", [True, False], ids=["shipped-config", "channel-retries-off"])
async def test_three_thousand_concurrent_submissions_on_one_channel_are_never_refused_by_the_transport(
    system: System, channel_retries: bool
) -> None:
    """The issue's reproduction through the shipped client: one channel, 3,000 calls at once.
    With the channel's own retries off too, so a refused stream retried below the client could
    not hide: every call must succeed on its first attempt."""
    target = f"127.0.0.1:{system.sequencer_app.port}"
    channel = (
        lc.create_channel(target)
        if channel_retries
        else grpc.aio.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    )
    async with lc.SequencerClient(channel=channel, client_id="one-channel") as client:
        events = [shipment_event(f"MANY-{i}", 1, "shipment_created") for i in range(3000)]
        results = await asyncio.gather(
            *(client.submit(e, idempotency_key=f"many-{i}", timeout=300) for i, e in enumerate(events)),
            return_exceptions=True,
        )
    await channel.close()
    failures = Counter(str(r)[:120] for r in results if isinstance(r, BaseException))
    assert not failures, failures
    assert Counter(r.attempts for r in results if isinstance(r, lc.SubmitResult)) == {1: 3000}


async def test_a_burst_over_several_connections_meets_admission_not_the_transport(
    database_url: str, sequencer_settings: Any
) -> None:
    """3,000 calls at once over four connections (750 each, under the 1,000 streams a connection
    may hold): grpc core's queue of calls the server has not picked up yet would cancel some past
    1,000 by default; the servers allow more, so every call is answered by the service itself
    (here NOT_FOUND for an unknown key) or refused by admission, never CANCELLED or UNAVAILABLE."""
    settings = dataclasses.replace(sequencer_settings, max_inflight_per_caller=64)
    system = await System.start(database_url, settings)
    target = f"127.0.0.1:{system.sequencer_app.port}"
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    try:
        for channel in channels:
            await channel.channel_ready()
        stubs: list[Any] = [sequencer_pb2_grpc.SequencerServiceStub(c) for c in channels]
        request = sequencer_pb2.GetEventStatusRequest(idempotency_key="never-used")
        answers = await asyncio.gather(
            *(outcome(stubs[i % 4].GetEventStatus(request, metadata=metadata(), timeout=120)) for i in range(3000))
        )
        codes = Counter(a.code() for a in answers if isinstance(a, grpc.aio.AioRpcError))
        assert sum(codes.values()) == 3000
        assert set(codes) <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        for answer in answers:
            if answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert_overloaded(answer, "CALLER_OVERLOADED")
    finally:
        for channel in channels:
            await channel.close()
        await system.stop()
