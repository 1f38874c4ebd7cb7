"""Batched ingress: SubmitEvents item by item, and the group commit that serves SubmitEvent and
SubmitEvents alike (SPEC 10). Real servers, real PostgreSQL, both lock strategies."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import func, select

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from sequencer.models import events, idempotency_keys
from tests.support import SHIPMENT, System, error_info, shipment_event

QUEUED, PARKED = events_pb2.EVENT_STATE_QUEUED, events_pb2.EVENT_STATE_PARKED
DUPLICATE, APPLIED = events_pb2.EVENT_STATE_DUPLICATE, events_pb2.EVENT_STATE_APPLIED
CHAIN = ["shipment_created", "shipment_picked", "shipment_packed", "shipment_loaded", "shipment_shipped"]


def item(event: events_pb2.Event, key: str) -> sequencer_pb2.SubmitEventRequest:
    return sequencer_pb2.SubmitEventRequest(event=event, request_id=key)


async def submit_batch(system: System, items: list[sequencer_pb2.SubmitEventRequest], **kwargs: Any) -> Any:
    reply = await system.sequencer.SubmitEvents(sequencer_pb2.SubmitEventsRequest(requests=items), timeout=10, **kwargs)
    assert len(reply.results) == len(items)
    return reply.results


def reason(result: Any) -> tuple[int, str]:
    """The item's error as (gRPC code, ErrorInfo reason)."""
    assert result.WhichOneof("outcome") == "error"
    status: status_pb2.Status = result.error
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details)
    return status.code, info.reason


async def counts(system: System) -> tuple[int, int]:
    async with system.sequencer_app.engine.connect() as conn:
        held = await conn.scalar(select(func.count()).select_from(events))
        keys = await conn.scalar(select(func.count()).select_from(idempotency_keys))
    return int(held or 0), int(keys or 0)


async def test_one_batch_answers_each_item_as_it_would_be_answered_alone(system: System) -> None:
    """Valid, invalid, reused key, duplicate MSI, conflicting MSI and out-of-order MSI in one
    call: each item gets its own answer, and only the valid ones change anything."""
    await system.submit(shipment_event("B-DUP", 1, "shipment_created"), key="first-dup")
    await system.submit(shipment_event("B-REUSE", 1, "shipment_created"), key="reused")
    before = await counts(system)
    invalid = events_pb2.Event(entity_type=SHIPMENT, entity_id="B-BAD", sequence=1)  # no payload
    batch = [
        item(shipment_event("B-NEW", 1, "shipment_created"), "new-1"),
        item(invalid, "bad-1"),
        item(shipment_event("B-REUSE", 1, "shipment_created", order_id="OTHER"), "reused"),
        item(shipment_event("B-DUP", 1, "shipment_created"), "second-dup"),
        item(shipment_event("B-DUP", 1, "shipment_created", order_id="OTHER"), "conflict-1"),
        item(shipment_event("B-LATE", 3, "shipment_loaded"), "late-3"),
        sequencer_pb2.SubmitEventRequest(event=shipment_event("B-NOKEY", 1, "shipment_created")),
    ]
    results = await submit_batch(system, batch)

    assert results[0].response.state == QUEUED and not results[0].replayed
    assert reason(results[1]) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_EVENT")
    assert reason(results[2]) == (grpc.StatusCode.FAILED_PRECONDITION.value[0], "IDEMPOTENCY_KEY_REUSED")
    assert results[3].response.state == DUPLICATE and results[3].response.transaction_id
    assert reason(results[4]) == (grpc.StatusCode.FAILED_PRECONDITION.value[0], "SEQUENCE_CONFLICT")
    assert results[5].response.state == PARKED and results[5].response.awaiting_sequence == 1
    assert reason(results[6]) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "IDEMPOTENCY_KEY_MISSING")
    held, keys = await counts(system)
    # New rows: B-NEW 1 and B-LATE 3; new key records: new-1, second-dup, late-3.
    assert (held, keys) == (before[0] + 2, before[1] + 3)

    # The same batch again: every stored answer replays byte-identical, refusals stay refusals
    # and still store nothing.
    again = await submit_batch(system, batch)
    for index in (0, 3, 5):
        assert again[index].replayed
        assert again[index].response.SerializeToString() == results[index].response.SerializeToString()
    for index in (1, 2, 4, 6):
        assert reason(again[index]) == reason(results[index])
    assert await counts(system) == (held, keys)


async def test_a_key_replays_across_single_and_batched_calls(system: System) -> None:
    event = shipment_event("B-X", 1, "shipment_created")
    single = await system.submit(event, key="cross-1")
    batched = await submit_batch(
        system, [item(event, "cross-1"), item(shipment_event("B-X", 2, "shipment_picked"), "cross-2")]
    )
    assert batched[0].replayed and batched[0].response.SerializeToString() == single.SerializeToString()
    call = system.sequencer.SubmitEvent(
        sequencer_pb2.SubmitEventRequest(event=shipment_event("B-X", 2, "shipment_picked")),
        metadata=(("idempotency-key", "cross-2"),),
        timeout=5,
    )
    reply = await call
    assert reply.SerializeToString() == batched[1].response.SerializeToString()
    assert dict(await call.trailing_metadata())["idempotency-replayed"] == "true"


async def test_the_same_key_twice_in_one_batch_executes_once(system: System) -> None:
    event = shipment_event("B-TWICE", 1, "shipment_created")
    results = await submit_batch(system, [item(event, "twice"), item(event, "twice")])
    assert [r.replayed for r in results] == [False, True]
    assert results[0].response.SerializeToString() == results[1].response.SerializeToString()
    assert await counts(system) == (1, 1)


async def test_batch_call_level_refusals(system: System) -> None:
    event = shipment_event("B-CALL", 1, "shipment_created")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit_batch(system, [item(event, "k1")], metadata=(("idempotency-key", "k1"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "IDEMPOTENCY_KEY_INVALID"
    too_many = [item(shipment_event(f"B-MANY-{i}", 1, "shipment_created"), f"many-{i}") for i in range(501)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit_batch(system, too_many)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    waiting = sequencer_pb2.SubmitEventRequest(event=event, request_id="k2")
    waiting.wait_for_terminal.FromSeconds(1)
    results = await submit_batch(system, [waiting])
    assert reason(results[0]) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_ARGUMENT")
    assert await counts(system) == (0, 0)
    assert list(await submit_batch(system, [])) == []


async def test_a_full_batch_is_accepted_in_order(system: System) -> None:
    """500 items (more than one group-commit batch) across 100 entities, chains in MSI order."""
    items = [
        item(shipment_event(f"B-FULL-{e}", n + 1, kind), f"full-{e}-{n}")
        for e in range(100)
        for n, kind in enumerate(CHAIN)
    ]
    results = await submit_batch(system, items)
    states = [r.response.state for r in results]
    assert all(s in (QUEUED, PARKED, APPLIED) for s in states), states
    for entity in (0, 42, 99):
        statuses = [await system.wait_terminal(r.response.transaction_id) for r in results[entity * 5 : entity * 5 + 5]]
        assert [s.state for s in statuses] == [APPLIED] * 5
    shipment = await system.shipment("B-FULL-42")
    assert shipment.version == 5


async def test_single_and_batched_submissions_interleaved_end_in_order(
    database_url: str, sequencer_settings: Any, lock_strategy: str
) -> None:
    """Several connections submit one entity's events (shuffled, retried, duplicated) as
    SubmitEvent and SubmitEvents at once: one transaction per MSI, applied in MSI order."""
    system = await System.start(database_url, sequencer_settings, lock_strategy=lock_strategy)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{system.sequencer_app.port}") for _ in range(4)]
    try:
        stubs = [sequencer_pb2_grpc.SequencerServiceStub(c) for c in channels]
        rng = random.Random(7)
        entity_ids = [f"I-{lock_strategy}-{n}" for n in range(3)]
        plan = [(shipment_event(eid, n + 1, kind), f"{eid}/{n}") for eid in entity_ids for n, kind in enumerate(CHAIN)]
        plan += [(e, k) for e, k in rng.sample(plan, 8)]  # retries with the same key
        plan += [(e, f"{k}/dup") for e, k in rng.sample(plan, 4)]  # duplicates under new keys
        rng.shuffle(plan)

        async def send(index: int, chunk: list[tuple[events_pb2.Event, str]]) -> list[Any]:
            stub: Any = stubs[index % len(stubs)]
            if index % 2:
                reply = await stub.SubmitEvents(
                    sequencer_pb2.SubmitEventsRequest(requests=[item(e, k) for e, k in chunk]), timeout=10
                )
                return [(e, r.response) for (e, _k), r in zip(chunk, reply.results, strict=True)]
            replies = await asyncio.gather(*(stub.SubmitEvent(item(e, k), timeout=10) for e, k in chunk))
            return list(zip([e for e, _ in chunk], replies, strict=True))

        chunks = [plan[i : i + 3] for i in range(0, len(plan), 3)]
        answered = [pair for part in await asyncio.gather(*(send(i, c) for i, c in enumerate(chunks))) for pair in part]
        by_msi: dict[tuple[str, int], set[str]] = {}
        for event, response in answered:
            assert response.state in (QUEUED, PARKED, DUPLICATE, APPLIED), response
            by_msi.setdefault((event.entity_id, event.sequence), set()).add(response.transaction_id)
        assert all(len(ids) == 1 for ids in by_msi.values()), by_msi
        for ids in by_msi.values():
            assert (await system.wait_terminal(next(iter(ids)))).state == APPLIED
        for eid in entity_ids:
            history = await system.history(SHIPMENT, eid)
            assert [h.sequence for h in history] == [1, 2, 3, 4, 5]
            assert (await system.shipment(eid)).version == 5
    finally:
        await asyncio.gather(*(c.close() for c in channels))
        await system.stop()


async def test_concurrent_batches_over_shared_entities_never_deadlock(
    database_url: str, sequencer_settings: Any, lock_strategy: str
) -> None:
    """Batches that name the same entities and keys in different orders, from two replicas
    sharing one database, all commit: locks are taken in one sorted order."""
    system = await System.start(database_url, sequencer_settings, lock_strategy=lock_strategy)
    from sequencer.server import build_server

    replica = await build_server(system.sequencer_settings, run_forwarder=False)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in (system.sequencer_app.port, replica.port)]
    try:
        stubs: list[Any] = [sequencer_pb2_grpc.SequencerServiceStub(c) for c in channels]
        entity_ids = [f"D-{lock_strategy}-{n}" for n in range(6)]
        requests = [item(shipment_event(eid, 1, "shipment_created"), f"d-{eid}") for eid in entity_ids]
        calls = []
        for n in range(8):
            order = list(requests)
            random.Random(n).shuffle(order)
            calls.append(stubs[n % 2].SubmitEvents(sequencer_pb2.SubmitEventsRequest(requests=order), timeout=20))
        replies = await asyncio.gather(*calls)
        answers: dict[str, set[bytes]] = {}
        for reply in replies:
            for result in reply.results:
                assert result.WhichOneof("outcome") == "response", result
                answers.setdefault(result.response.transaction_id, set()).add(result.response.SerializeToString())
        # One execution per key: six transactions, each answered identically everywhere.
        assert len(answers) == 6 and all(len(a) == 1 for a in answers.values())
        held, keys = await counts(system)
        assert (held, keys) == (6, 6)
        executed = sum(not r.replayed for reply in replies for r in reply.results)
        assert executed == 6
        assert uuid.UUID(next(iter(answers)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
        await replica.stop(0)
        await system.stop()
