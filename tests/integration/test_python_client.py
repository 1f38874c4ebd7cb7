"""The asyncio client against a REAL sequencer and ledger (127.0.0.1:0, fresh migrated database).

Lost replies are simulated for real: a grpc.aio client interceptor lets the call reach the
server and finish there, then reports UNAVAILABLE to the client, as a broken connection would
after the server committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from logistics import client as lc
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from tests.support import SHIPMENT, System, shipment_event

APPLIED = lc.EventState.APPLIED
PARKED = lc.EventState.PARKED
QUEUED = lc.EventState.QUEUED
DUPLICATE = lc.EventState.DUPLICATE
WAIT = 20.0

SUBMIT_METHOD = "/logistics.sequencer.v1.SequencerService/SubmitEvent"
LIFECYCLE = ["shipment_created", "shipment_picked", "shipment_packed", "shipment_loaded", "shipment_shipped"]


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method: str | bytes = details.method
    return method.decode() if isinstance(method, bytes) else method


class LoseFirstReply(grpc.aio.UnaryUnaryClientInterceptor):
    """Lets the first SubmitEvent run to completion on the server, then drops its reply."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.timeouts: list[float | None] = []
        self.lost_reply: sequencer_pb2.SubmitEventResponse | None = None

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        if _method(client_call_details) != SUBMIT_METHOD:
            return call
        self.metadata.append({k: v for k, v in client_call_details.metadata or () if isinstance(v, str)})
        self.timeouts.append(client_call_details.timeout)
        if self.lost_reply is None:
            self.lost_reply = await call  # the server executed the request and answered ...
            raise grpc.aio.AioRpcError(  # ... but the answer never reaches the caller
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="reply lost"
            )
        return call


class CountCalls(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the unary calls per method (proves that pagination really walked several pages)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: Any, request: Any
    ) -> Any:
        name = _method(client_call_details).rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return await continuation(client_call_details, request)


def ref(entity_id: str) -> events_pb2.EntityRef:
    return events_pb2.EntityRef(entity_type=SHIPMENT, entity_id=entity_id)


def target(port: int) -> str:
    return f"127.0.0.1:{port}"


@pytest.fixture
async def counter() -> CountCalls:
    return CountCalls()


@pytest.fixture
async def sequencer(system: System, counter: CountCalls) -> AsyncIterator[lc.SequencerClient]:
    async with lc.SequencerClient(
        target(system.sequencer_app.port), client_id="it-client", interceptors=[counter]
    ) as client:
        yield client


@pytest.fixture
async def ledger(system: System, counter: CountCalls) -> AsyncIterator[lc.LedgerClient]:
    async with lc.LedgerClient(target(system.ledger_app.port), interceptors=[counter]) as client:
        yield client


async def test_retry_after_a_lost_reply_executes_once_and_the_second_answer_is_a_replay(
    system: System, ledger: lc.LedgerClient
) -> None:
    lose = LoseFirstReply()
    channel = lc.create_channel(target(system.sequencer_app.port), interceptors=[lose])
    client = lc.SequencerClient(channel=channel)
    try:
        event = shipment_event("SHP-LOST", 1, "shipment_created")
        result = await client.submit(event, timeout=WAIT)

        # Two attempts, one key, one correlation id; each attempt bounded by the time left.
        assert len(lose.metadata) == 2 and result.attempts == 2
        first, second = lose.metadata
        assert first["idempotency-key"] == second["idempotency-key"] == result.idempotency_key
        assert first["x-correlation-id"] == second["x-correlation-id"]
        first_timeout, second_timeout = lose.timeouts
        assert first_timeout is not None and second_timeout is not None
        assert second_timeout < first_timeout <= WAIT

        # The second answer is the stored first one, marked as a replay.
        assert result.replayed is True
        assert lose.lost_reply is not None
        assert result.response.SerializeToString() == lose.lost_reply.SerializeToString()
        assert result.state == QUEUED
        assert result.expires_at is not None

        # Exactly one event exists and was applied once.
        final = await client.wait(result.transaction_id, timeout=WAIT)
        assert final.state == APPLIED and final.entity_version == 1
        entity = await client.get_entity((SHIPMENT, "SHP-LOST"))
        assert entity.watermark == 1 and entity.parked_count == 0
        assert [(h.sequence, h.transaction_id) async for h in ledger.history(ref("SHP-LOST"))] == [
            (1, result.transaction_id)
        ]
        record = await client.get_idempotency_record(result.idempotency_key)
        assert record.transaction_id == result.transaction_id and record.state == events_pb2.EVENT_STATE_APPLIED
        by_key = await client.get_status(idempotency_key=result.idempotency_key)
        assert by_key.transaction_id == result.transaction_id

        # Contrast: a new key for the same event is not a replay but a DUPLICATE of the original.
        again = await client.submit(event, timeout=WAIT)
        assert again.replayed is False and again.attempts == 1
        assert again.state == DUPLICATE and again.transaction_id == result.transaction_id
    finally:
        await client.close()
        await channel.close()


async def test_out_of_order_submit_then_wait_gives_applied(
    sequencer: lc.SequencerClient, ledger: lc.LedgerClient
) -> None:
    later = await sequencer.submit(shipment_event("SHP-OOO", 2, "shipment_picked"))
    assert later.state == PARKED and later.response.awaiting_sequence == 1
    assert later.replayed is False and later.attempts == 1
    assert later.correlation_id  # echoed by the server
    parked = await sequencer.get_status(transaction_id=later.transaction_id)
    assert parked.state == PARKED

    first = await sequencer.submit(shipment_event("SHP-OOO", 1, "shipment_created"))
    assert first.state == QUEUED

    final = await sequencer.wait(later.transaction_id, timeout=WAIT)
    assert final.state == APPLIED and final.entity_version == 2
    shipment = await ledger.get_shipment("SHP-OOO")
    assert shipment.status == ledger_pb2.SHIPMENT_STATUS_PICKED and shipment.version == 2


async def test_submit_can_wait_for_the_terminal_state(sequencer: lc.SequencerClient) -> None:
    result = await sequencer.submit(shipment_event("SHP-W", 1, "shipment_created"), wait_for_terminal=10, timeout=15)
    assert result.state == APPLIED and result.terminal


async def test_watch_streams_a_transaction_until_terminal(sequencer: lc.SequencerClient) -> None:
    later = await sequencer.submit(shipment_event("SHP-WATCH", 2, "shipment_picked"))

    async def collect() -> list[int]:
        return [s.state async for s in sequencer.watch(transaction_id=later.transaction_id, timeout=WAIT)]

    watching = asyncio.create_task(collect())
    await sequencer.submit(shipment_event("SHP-WATCH", 1, "shipment_created"))
    states = await watching
    assert states[0] == PARKED and states[-1] == APPLIED


async def test_pagination_helpers_walk_every_page(
    system: System, sequencer: lc.SequencerClient, ledger: lc.LedgerClient, counter: CountCalls
) -> None:
    for i in range(5):  # five entities, each waiting for MSI 1
        await sequencer.submit(shipment_event(f"SHP-GAP-{i}", 2, "shipment_picked"))
    for sequence in range(2, 7):  # one entity holding MSIs 2..6
        await sequencer.submit(shipment_event("SHP-PARK", sequence, LIFECYCLE[sequence - 2]))
    for sequence, kind in enumerate(LIFECYCLE, start=1):
        last = await sequencer.submit(shipment_event("SHP-HIST", sequence, kind))
    await sequencer.wait(last.transaction_id, timeout=WAIT)
    counter.calls.clear()

    gaps = [g async for g in sequencer.list_gaps(page_size=2)]
    assert sorted(g.entity.entity_id for g in gaps) == sorted([*(f"SHP-GAP-{i}" for i in range(5)), "SHP-PARK"])
    assert counter.calls["ListGaps"] == 3

    parked = [p async for p in sequencer.list_parked_events(ref("SHP-PARK"), page_size=2)]
    assert [p.event.sequence for p in parked] == [2, 3, 4, 5, 6]
    assert counter.calls["ListParkedEvents"] == 3
    everything = [p async for p in sequencer.list_parked_events(page_size=4)]
    assert len(everything) == 10 and counter.calls["ListParkedEvents"] == 3 + 3

    history = [h async for h in ledger.history(ref("SHP-HIST"), page_size=2)]
    assert [(h.sequence, h.kind) for h in history] == list(enumerate(LIFECYCLE, start=1))
    assert counter.calls["ListEntityHistory"] == 3


async def test_same_key_different_payload_raises_key_reused(sequencer: lc.SequencerClient) -> None:
    event = shipment_event("SHP-REUSE", 1, "shipment_created")
    first = await sequencer.submit(event, idempotency_key="order-42:v1")
    replay = await sequencer.submit(event, idempotency_key="order-42:v1")
    assert replay.replayed is True and replay.transaction_id == first.transaction_id

    changed = shipment_event("SHP-REUSE", 1, "shipment_created", origin="ELSEWHERE")
    with pytest.raises(lc.IdempotencyKeyReusedError) as caught:
        await sequencer.submit(changed, idempotency_key="order-42:v1")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert caught.value.fields == ["event.shipment_created.origin"]
    assert caught.value.correlation_id


async def test_reused_msi_with_a_different_payload_raises_sequence_conflict(sequencer: lc.SequencerClient) -> None:
    await sequencer.submit(shipment_event("SHP-CONF", 1, "shipment_created"))
    with pytest.raises(lc.SequenceConflictError) as caught:
        await sequencer.submit(shipment_event("SHP-CONF", 1, "shipment_created", origin="ELSEWHERE"))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.metadata["sequence"] == "1" and caught.value.metadata["entity_id"] == "SHP-CONF"


async def test_keys_are_scoped_by_client_id(system: System) -> None:
    address = target(system.sequencer_app.port)
    async with lc.SequencerClient(address, client_id="wms-a") as a, lc.SequencerClient(address, client_id="wms-b") as b:
        from_a = await a.submit(shipment_event("SHP-A", 1, "shipment_created"), idempotency_key="shared-key")
        from_b = await b.submit(shipment_event("SHP-B", 1, "shipment_created"), idempotency_key="shared-key")
        assert not from_a.replayed and not from_b.replayed
        assert from_a.transaction_id != from_b.transaction_id
        assert (await b.get_status(idempotency_key="shared-key")).transaction_id == from_b.transaction_id


async def test_request_errors_are_typed(sequencer: lc.SequencerClient, ledger: lc.LedgerClient) -> None:
    with pytest.raises(lc.IdempotencyKeyInvalidError):
        await sequencer.submit(shipment_event("SHP-X", 1, "shipment_created"), idempotency_key="no spaces allowed")
    no_payload = events_pb2.Event(entity_type=SHIPMENT, entity_id="SHP-X", sequence=1, source="tests")
    with pytest.raises(lc.InvalidEventError) as invalid:
        await sequencer.submit(no_payload)
    assert invalid.value.field
    with pytest.raises(lc.EventNotFoundError):
        await sequencer.get_status(transaction_id=str(uuid.uuid4()))
    with pytest.raises(lc.InvalidArgumentError):
        await sequencer.get_status(transaction_id="not-a-uuid")
    with pytest.raises(lc.EventNotFoundError):
        await sequencer.wait(str(uuid.uuid4()), timeout=WAIT)
    with pytest.raises(lc.ShipmentNotFoundError):
        await ledger.get_shipment("SHP-NOPE")
    with pytest.raises(lc.InventoryItemNotFoundError):
        await ledger.get_inventory_item("SKU-NOPE")


async def test_skip_sequence_releases_successors_and_is_idempotent(sequencer: lc.SequencerClient) -> None:
    parked = await sequencer.submit(shipment_event("SHP-SKIP", 2, "shipment_created"))
    assert parked.state == PARKED

    skipped = await sequencer.skip_sequence(ref("SHP-SKIP"), 1, "lost upstream", idempotency_key="skip-1")
    again = await sequencer.skip_sequence(ref("SHP-SKIP"), 1, "lost upstream", idempotency_key="skip-1")
    assert again == skipped  # the replay of the stored response
    assert skipped.status.sequence == 1 and skipped.status.idempotency_key == "skip-1"
    skip_final = await sequencer.wait(skipped.status.transaction_id, timeout=WAIT)
    assert skip_final.state == lc.EventState.SKIPPED and skip_final.reason == "lost upstream"

    final = await sequencer.wait(parked.transaction_id, timeout=WAIT)
    assert final.state == APPLIED and final.entity_version == 2
    with pytest.raises(lc.NotAGapError):
        await sequencer.skip_sequence(ref("SHP-SKIP"), 1, "again, with a new key")


async def test_wait_times_out_with_a_typed_error(sequencer: lc.SequencerClient) -> None:
    parked = await sequencer.submit(shipment_event("SHP-STUCK", 2, "shipment_picked"))
    with pytest.raises(lc.DeadlineExceededError) as caught:
        await sequencer.wait(parked.transaction_id, timeout=0.3)
    assert caught.value.metadata == {"transaction_id": parked.transaction_id, "state": "EVENT_STATE_PARKED"}
    assert (await sequencer.get_status(transaction_id=parked.transaction_id)).state == PARKED


@pytest.fixture
async def secured_sequencer(sequencer_settings: Any, tmp_path: Any) -> AsyncIterator[int]:
    """A sequencer that requires bearer tokens: `wms` may submit and read, `ops` is an admin."""
    from common.auth import SecuritySettings
    from sequencer.server import build_server

    identities = {
        "identities": [
            {
                "caller": "wms",
                "roles": ["submitter", "reader"],
                "token_sha256": hashlib.sha256(b"wms-token").hexdigest(),
            },
            {"caller": "ops", "roles": ["admin"], "token_sha256": hashlib.sha256(b"ops-token").hexdigest()},
        ]
    }
    path = tmp_path / "identities.json"
    path.write_text(json.dumps(identities))
    settings = dataclasses.replace(sequencer_settings, security=SecuritySettings(identities_file=str(path)))
    app = await build_server(settings)
    yield app.port
    await app.stop(0)


async def test_bearer_tokens_and_access_errors(secured_sequencer: int) -> None:
    address = target(secured_sequencer)
    event = shipment_event("SHP-AUTH", 2, "shipment_created")
    async with (
        lc.SequencerClient(address) as anonymous,
        lc.SequencerClient(address, token="wrong") as impostor,
        lc.SequencerClient(address, token="wms-token", client_id="ignored-with-credentials") as wms,
        lc.SequencerClient(address, token="ops-token") as ops,
    ):
        with pytest.raises(lc.UnauthenticatedError) as caught:
            await anonymous.submit(event)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(lc.UnauthenticatedError):
            await impostor.submit(event)

        result = await wms.submit(event, idempotency_key="auth-key")
        assert result.state == PARKED
        with pytest.raises(lc.PermissionDeniedError) as denied:
            await wms.get_entity(ref("SHP-AUTH"))
        assert isinstance(denied.value, lc.AccessError) and denied.value.metadata["required_roles"] == "admin"

        entity = await ops.get_entity(ref("SHP-AUTH"))
        assert entity.parked_count == 1 and entity.awaiting_sequence == 1
        record = await ops.get_idempotency_record("auth-key", caller_id="wms")
        assert record.caller_id == "wms" and record.transaction_id == result.transaction_id


def mixed_batch() -> tuple[list[events_pb2.Event], list[str | None]]:
    """One of each item outcome: queued, parked, duplicate, invalid, conflict, key reused."""
    events = [
        shipment_event("SHP-MANY-Q", 1, "shipment_created"),  # QUEUED
        shipment_event("SHP-MANY-P", 2, "shipment_picked"),  # PARKED, waits for MSI 1
        shipment_event("SHP-MANY-D", 1, "shipment_created"),  # DUPLICATE of an earlier submit
        events_pb2.Event(entity_type=SHIPMENT, entity_id="SHP-MANY-X", sequence=1, source="tests"),  # no payload
        shipment_event("SHP-MANY-D", 1, "shipment_created", origin="ELSEWHERE"),  # SEQUENCE_CONFLICT
        shipment_event("SHP-MANY-K", 1, "shipment_created", origin="ELSEWHERE"),  # key first used otherwise
    ]
    keys: list[str | None] = [None, "many-parked", None, None, None, "many-reused"]
    return events, keys


async def test_submit_many_answers_each_item_and_a_resent_batch_replays(
    system: System, sequencer: lc.SequencerClient, ledger: lc.LedgerClient
) -> None:
    original = await sequencer.submit(shipment_event("SHP-MANY-D", 1, "shipment_created"))
    await sequencer.submit(shipment_event("SHP-MANY-K", 1, "shipment_created"), idempotency_key="many-reused")
    events, keys = mixed_batch()

    first = await sequencer.submit_many(events, keys, timeout=WAIT)
    queued, parked, duplicate, invalid, conflict, reused = first
    assert isinstance(queued, lc.SubmitResult) and queued.state == QUEUED and not queued.replayed
    assert isinstance(parked, lc.SubmitResult) and parked.state == PARKED and parked.response.awaiting_sequence == 1
    assert parked.idempotency_key == "many-parked" and not parked.replayed
    assert isinstance(duplicate, lc.SubmitResult) and duplicate.state == DUPLICATE
    assert duplicate.transaction_id == original.transaction_id
    assert type(invalid) is lc.InvalidEventError and invalid.field
    assert type(conflict) is lc.SequenceConflictError and conflict.metadata["entity_id"] == "SHP-MANY-D"
    assert type(reused) is lc.IdempotencyKeyReusedError and reused.idempotency_key == "many-reused"
    assert reused.fields == ["event.shipment_created.origin"]
    generated = [r.idempotency_key for r in first]
    assert generated[1] == "many-parked" and len(set(generated)) == len(generated)

    # The same batch again, same keys: every accepted item is its stored answer, marked replayed,
    # and every refused item is refused the same way; the blocking client says the same.
    again = await sequencer.submit_many(events, generated, timeout=WAIT)
    blocking = lc.SyncSequencerClient(target(system.sequencer_app.port), client_id="it-client")
    try:
        from_sync = await asyncio.to_thread(blocking.submit_many, events, generated, timeout=WAIT)
    finally:
        blocking.close()
    for resent in (again, from_sync):
        assert len(resent) == len(first)
        for before, after in zip(first, resent, strict=True):
            assert after.idempotency_key == before.idempotency_key
            if isinstance(before, lc.SubmitResult):
                assert isinstance(after, lc.SubmitResult) and after.replayed is True
                assert after.response.SerializeToString() == before.response.SerializeToString()
            else:
                assert type(after) is type(before) and isinstance(after, lc.LogisticsError)
                assert (after.code, after.reason) == (before.code, before.reason)

    # Executed once: one history row for the queued entity, one parked event for the other.
    final = await sequencer.wait(queued.transaction_id, timeout=WAIT)
    assert final.state == APPLIED and final.entity_version == 1
    assert [h.transaction_id async for h in ledger.history(ref("SHP-MANY-Q"))] == [queued.transaction_id]
    assert [p.transaction_id async for p in sequencer.list_parked_events(ref("SHP-MANY-P"))] == [parked.transaction_id]
