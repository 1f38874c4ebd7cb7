"""SPEC 4 at the gRPC surface of a real sequencer on real PostgreSQL (no ledger needed)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from common.clock import ManualClock
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from sequencer.models import events, idempotency_keys
from sequencer.server import App, build_server
from tests.support import error_info, shipment_event, submit_request, trailing, with_overrides


@pytest.fixture
async def app(sequencer_settings: Any) -> AsyncIterator[App]:
    app = await build_server(sequencer_settings, run_forwarder=False)
    yield app
    await app.stop(0)


@pytest.fixture
async def stub(app: App) -> AsyncIterator[sequencer_pb2_grpc.SequencerServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield sequencer_pb2_grpc.SequencerServiceStub(channel)


async def count(app: App, table: Any) -> int:
    async with app.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def test_first_request_is_queued_and_stored(app: App, stub: Any) -> None:
    call = stub.SubmitEvent(
        submit_request(shipment_event("SHP-1", 1, "shipment_created")),
        metadata=(("idempotency-key", "k-1"),),
        timeout=5,
    )
    reply = await call
    assert reply.state == events_pb2.EVENT_STATE_QUEUED
    assert reply.transaction_id and reply.correlation_id
    meta = await trailing(call)
    assert "idempotency-replayed" not in meta
    assert "idempotency-expires-at" in meta
    assert await count(app, idempotency_keys) == 1
    assert await count(app, events) == 1


async def test_retry_replays_byte_identical_response(app: App, stub: Any) -> None:
    request = submit_request(shipment_event("SHP-2", 1, "shipment_created"))
    a = await stub.SubmitEvent(request, metadata=(("idempotency-key", "k-2"),), timeout=5)
    second = stub.SubmitEvent(request, metadata=(("idempotency-key", "k-2"),), timeout=5)
    b = await second
    assert a.SerializeToString() == b.SerializeToString()
    meta = await trailing(second)
    assert meta["idempotency-replayed"] == "true"
    assert "idempotency-first-seen-at" in meta and "idempotency-expires-at" in meta
    assert await count(app, events) == 1


async def test_request_id_and_x_idempotency_key_are_accepted(app: App, stub: Any) -> None:
    event = shipment_event("SHP-3", 1, "shipment_created")
    a = await stub.SubmitEvent(submit_request(event, request_id="k-3"), timeout=5)
    second = stub.SubmitEvent(submit_request(event), metadata=(("x-idempotency-key", "k-3"),), timeout=5)
    b = await second
    assert a == b and (await trailing(second))["idempotency-replayed"] == "true"


async def test_metadata_and_request_id_must_agree(app: App, stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitEvent(
            submit_request(shipment_event("SHP-4", 1, "shipment_created"), request_id="a"),
            metadata=(("idempotency-key", "b"),),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "IDEMPOTENCY_KEY_INVALID"
    assert await count(app, events) == 0


async def test_missing_key_is_rejected_and_nothing_stored(app: App, stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitEvent(submit_request(shipment_event("SHP-5", 1, "shipment_created")), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "IDEMPOTENCY_KEY_MISSING"
    assert await count(app, idempotency_keys) == 0 and await count(app, events) == 0


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "ünïcode", "semi;colon"])
async def test_malformed_keys_are_rejected(app: App, stub: Any, key: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitEvent(
            submit_request(shipment_event("SHP-6", 1, "shipment_created"), request_id=key),
            metadata=(("idempotency-key", key),) if key and key.isascii() else (),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = "IDEMPOTENCY_KEY_MISSING" if key == "" else "IDEMPOTENCY_KEY_INVALID"
    assert error_info(caught.value).reason == expected
    assert await count(app, events) == 0


async def test_key_of_255_characters_is_accepted(app: App, stub: Any) -> None:
    reply = await stub.SubmitEvent(
        submit_request(shipment_event("SHP-7", 1, "shipment_created"), request_id="k" * 255), timeout=5
    )
    assert reply.state == events_pb2.EVENT_STATE_QUEUED


async def test_same_key_other_payload_names_the_fields(app: App, stub: Any) -> None:
    await stub.SubmitEvent(submit_request(shipment_event("SHP-8", 1, "shipment_created"), request_id="k-8"), timeout=5)
    other = shipment_event("SHP-8", 1, "shipment_created", order_id="ORD-OTHER")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitEvent(submit_request(other, request_id="k-8"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "IDEMPOTENCY_KEY_REUSED"
    assert info.metadata["fields"] == "event.shipment_created.order_id"
    assert await count(app, events) == 1


async def test_two_callers_may_share_a_key_string(app: App, stub: Any) -> None:
    a = await stub.SubmitEvent(
        submit_request(shipment_event("SHP-9", 1, "shipment_created"), request_id="shared"),
        metadata=(("x-client-id", "wms"),),
        timeout=5,
    )
    b = await stub.SubmitEvent(
        submit_request(shipment_event("SHP-10", 1, "shipment_created"), request_id="shared"),
        metadata=(("x-client-id", "erp"),),
        timeout=5,
    )
    assert a.transaction_id != b.transaction_id
    assert await count(app, events) == 2 and await count(app, idempotency_keys) == 2


async def test_invalid_event_is_not_stored_and_key_stays_usable(app: App, stub: Any) -> None:
    bad = events_pb2.Event(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="SHP-11", sequence=1)
    bad.inventory_received.location = "A"
    bad.inventory_received.quantity = 5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitEvent(submit_request(bad, request_id="k-11"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_EVENT"
    good = await stub.SubmitEvent(
        submit_request(shipment_event("SHP-11", 1, "shipment_created"), request_id="k-11"), timeout=5
    )
    assert good.state == events_pb2.EVENT_STATE_QUEUED


async def test_fifty_concurrent_identical_requests_execute_once(app: App) -> None:
    request = submit_request(shipment_event("SHP-12", 1, "shipment_created"), request_id="storm")
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for _ in range(50)]
    try:
        calls = [sequencer_pb2_grpc.SequencerServiceStub(c).SubmitEvent(request, timeout=30) for c in channels]
        replies = await asyncio.gather(*calls)
        replayed = [(await trailing(c)).get("idempotency-replayed") == "true" for c in calls]
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    assert len({r.SerializeToString() for r in replies}) == 1
    assert sum(replayed) == 49
    assert await count(app, events) == 1 and await count(app, idempotency_keys) == 1


async def test_waiter_whose_deadline_passes_gets_deadline_exceeded(app: App, stub: Any) -> None:
    """A request blocked behind another holder of its key gives up at its deadline."""
    from sequencer import mailbox

    async with app.engine.begin() as conn:
        # The ingress's own lock step holds the key's lock until this transaction ends.
        params = mailbox.lock_params(
            keys=[("default", "held-key")], submitted=[], row_lock=False, lock_timeout="0", now=dt.datetime.now(dt.UTC)
        )
        await conn.exec_driver_sql(mailbox.LOCK_SUBMISSIONS, params)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitEvent(
                submit_request(shipment_event("SHP-13", 1, "shipment_created"), request_id="held-key"),
                timeout=1.0,
            )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reply = await stub.SubmitEvent(
        submit_request(shipment_event("SHP-13", 1, "shipment_created"), request_id="held-key"), timeout=5
    )
    assert reply.state == events_pb2.EVENT_STATE_QUEUED


async def test_replay_survives_a_restart(sequencer_settings: Any) -> None:
    request = submit_request(shipment_event("SHP-14", 1, "shipment_created"), request_id="k-14")
    first_app = await build_server(sequencer_settings, run_forwarder=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first_app.port}") as channel:
        first = await sequencer_pb2_grpc.SequencerServiceStub(channel).SubmitEvent(request, timeout=5)
    await first_app.stop(0)
    second_app = await build_server(sequencer_settings, run_forwarder=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second_app.port}") as channel:
            call = sequencer_pb2_grpc.SequencerServiceStub(channel).SubmitEvent(request, timeout=5)
            second = await call
            assert (await trailing(call))["idempotency-replayed"] == "true"
    finally:
        await second_app.stop(0)
    assert first.SerializeToString() == second.SerializeToString()


async def test_database_answers_every_retry_without_the_answer_cache(sequencer_settings: Any) -> None:
    """With no in-process cache, every retry is answered from the stored record: for an event
    the in-order step accepted (QUEUED) and for one the general path accepted (PARKED)."""
    app = await build_server(with_overrides(sequencer_settings, answer_cache_size=0), run_forwarder=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = sequencer_pb2_grpc.SequencerServiceStub(channel)
            for sequence, key, state in (
                (1, "k-nc-1", events_pb2.EVENT_STATE_QUEUED),
                (3, "k-nc-3", events_pb2.EVENT_STATE_PARKED),
            ):
                request = submit_request(shipment_event("SHP-NC", sequence, "shipment_created"), request_id=key)
                first = await stub.SubmitEvent(request, timeout=5)
                assert first.state == state
                for _ in range(2):
                    call = stub.SubmitEvent(request, timeout=5)
                    assert (await call).SerializeToString() == first.SerializeToString()
                    assert (await trailing(call))["idempotency-replayed"] == "true"
                other = shipment_event("SHP-NC", sequence, "shipment_created", order_id="ORD-OTHER")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.SubmitEvent(submit_request(other, request_id=key), timeout=5)
                assert error_info(caught.value).reason == "IDEMPOTENCY_KEY_REUSED"
        assert await count(app, events) == 2
        assert await count(app, idempotency_keys) == 2
    finally:
        await app.stop(0)


async def test_expiry_sweeper_and_msi_rules_after_expiry(sequencer_settings: Any) -> None:
    clock = ManualClock()
    settings = sequencer_settings.__class__(**{**sequencer_settings.__dict__, "idempotency_retention": 3600.0})
    app = await build_server(settings, clock=clock, run_forwarder=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = sequencer_pb2_grpc.SequencerServiceStub(channel)
            request = submit_request(shipment_event("SHP-15", 2, "shipment_picked"), request_id="k-15")
            first = await stub.SubmitEvent(request, timeout=5)
            assert first.state == events_pb2.EVENT_STATE_PARKED
            clock.advance(3601)
            from sequencer.sweeper import Sweeper

            assert await Sweeper(app.engine, settings, clock).sweep_once() == 1
            assert await count(app, idempotency_keys) == 0
            call = stub.SubmitEvent(request, timeout=5)
            again = await call
            # A new request now, but the MSI is already held: harmless.
            assert "idempotency-replayed" not in await trailing(call)
            assert again.state == events_pb2.EVENT_STATE_DUPLICATE
            assert again.transaction_id == first.transaction_id
            assert await count(app, events) == 1
    finally:
        await app.stop(0)


@settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=24),
    order=st.randoms(use_true_random=False),
)
async def test_property_one_execution_per_key(app: App, plan: list[tuple[int, int]], order: Any) -> None:
    """Any sequence of (key, payload) submissions, repeated and interleaved and concurrent:
    exactly one execution per distinct key, and every answer consistent with it."""
    run = uuid.uuid4().hex[:8]
    payloads = [shipment_event(f"IP{run}-{p}", 1, "shipment_created") for p in range(4)]
    order.shuffle(plan)
    calls = [(k, p, app_stub_call(app, submit_request(payloads[p], request_id=f"{run}-k{k}"))) for k, p in plan]
    outcomes = await asyncio.gather(*(c for _, _, c in calls), return_exceptions=True)
    winners: dict[int, tuple[int, bytes]] = {}
    for (key, payload, _), outcome in zip(calls, outcomes, strict=True):
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert error_info(outcome).reason == "IDEMPOTENCY_KEY_REUSED", outcome
            continue
        assert not isinstance(outcome, BaseException), outcome
        winner = winners.setdefault(key, (payload, outcome.SerializeToString()))
        assert winner == (payload, outcome.SerializeToString())  # one execution, replayed byte for byte
    for (key, payload, _), outcome in zip(calls, outcomes, strict=True):
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert key in winners and winners[key][0] != payload
    async with app.engine.connect() as conn:
        keys = await conn.scalar(
            select(func.count())
            .select_from(idempotency_keys)
            .where(idempotency_keys.c.idempotency_key.like(f"{run}-%"))
        )
        held = await conn.scalar(select(func.count()).select_from(events).where(events.c.entity_id.like(f"IP{run}-%")))
    assert keys == len(winners)
    assert held == len({payload for payload, _ in winners.values()})


async def app_stub_call(app: App, request: sequencer_pb2.SubmitEventRequest) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        return await sequencer_pb2_grpc.SequencerServiceStub(channel).SubmitEvent(request, timeout=30)
