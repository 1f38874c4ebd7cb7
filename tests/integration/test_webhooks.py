"""Webhooks (SPEC 14) against real servers and a real HTTP receiver on 127.0.0.1: what arrives,
signed and in MSI order; retries, a receiver that is away, 410; the admin RPCs' refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import uuid
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text

from common.auth import SecuritySettings
from common.clock import ManualClock
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.sweeper import Sweeper
from tests.receiver import Receiver
from tests.support import INVENTORY, SHIPMENT, System, error_info, inventory_event, shipment_event, trailing

ADMIN = {"timeout": 10}
APPLIED, REJECTED, SKIPPED = "event.applied", "event.rejected", "event.skipped"


def fast(settings: Any, **overrides: Any) -> Any:
    values = {"webhook_retry_schedule": (0.0, 0.2, 0.2, 0.2, 0.2), "webhook_poll_interval": 0.1, "webhook_timeout": 2.0}
    return dataclasses.replace(settings, **{**values, **overrides})


async def subscribe(system: System, url: str, key: str | None = None, **fields: Any) -> Any:
    call = system.admin.CreateWebhookSubscription(
        sequencer_pb2.CreateWebhookSubscriptionRequest(url=url, **fields),
        metadata=(("idempotency-key", key or uuid.uuid4().hex),),
        **ADMIN,
    )
    reply = await call
    return reply.subscription, await trailing(call)


async def deliveries(system: System, subscription_id: str) -> list[Any]:
    reply = await system.admin.ListWebhookDeliveries(
        sequencer_pb2.ListWebhookDeliveriesRequest(subscription_id=subscription_id, page_size=500), **ADMIN
    )
    return list(reply.deliveries)


def rows(database_url: str, sql: str) -> list[Any]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        engine.dispose()


def in_msi_order(receiver: Receiver) -> bool:
    """Per entity, the MSIs arrive in order (a resend repeats the latest, never an older one)."""
    last: dict[tuple[int, str], int] = {}
    for r in receiver.received:
        entity_type, entity_id, sequence, _ = r.key
        if sequence < last.get((entity_type, entity_id), 0):
            return False
        last[(entity_type, entity_id)] = sequence
    return True


@pytest.fixture
async def receiver() -> Any:
    receiver = await Receiver().start()
    yield receiver
    await receiver.stop()


async def test_every_reported_outcome_arrives_signed_and_in_msi_order(
    database_url: str, sequencer_settings: Any, receiver: Receiver
) -> None:
    system = await System.start(database_url, fast(sequencer_settings))
    try:
        sub, _ = await subscribe(system, receiver.url, entity_type=SHIPMENT, description="erp")
        assert sub.secret.startswith("whsec_") and len(sub.secret) > len("whsec_") + 32
        assert sub.state == sequencer_pb2.WEBHOOK_SUBSCRIPTION_STATE_ACTIVE
        assert list(sub.states) == [3, 4, 6, 7]
        receiver.secret = sub.secret
        expected: set[tuple[int, str, int, str]] = set()
        for n in range(3):
            sid = f"WH-{n}"
            for seq, kind in enumerate(["shipment_created", "shipment_picked", "shipment_packed"], start=1):
                await system.submit(shipment_event(sid, seq, kind))
                expected.add((SHIPMENT, sid, seq, APPLIED))
            # Illegal after packed: REJECTED, the MSI consumed.
            await system.submit(shipment_event(sid, 4, "shipment_created"))
            expected.add((SHIPMENT, sid, 4, REJECTED))
        # A gap skipped by an operator: 2 is SKIPPED, 3 applied after it.
        await system.submit(shipment_event("WH-SKIP", 1, "shipment_created"))
        await system.submit(shipment_event("WH-SKIP", 3, "shipment_picked"))
        await system.admin.SkipSequence(
            sequencer_pb2.SkipSequenceRequest(
                entity=events_pb2.EntityRef(entity_type=SHIPMENT, entity_id="WH-SKIP"), sequence=2, reason="lost"
            ),
            metadata=(("idempotency-key", "skip-wh"),),
            **ADMIN,
        )
        expected |= {(SHIPMENT, "WH-SKIP", 1, APPLIED), (SHIPMENT, "WH-SKIP", 2, SKIPPED)}
        expected.add((SHIPMENT, "WH-SKIP", 3, APPLIED))
        # Another entity type: filtered out by the subscription.
        await system.submit(inventory_event("SKU-WH", 1, "inventory_received", quantity=5, location="A1"))

        await receiver.wait_for(lambda r: {x.key for x in r.received} >= expected)
        last = await system.submit(inventory_event("SKU-WH", 2, "inventory_received", quantity=1, location="A1"))
        status = await system.wait_terminal(last.transaction_id)
        assert status.state == events_pb2.EVENT_STATE_APPLIED
        await receiver.wait_for(lambda r: len(r.distinct()) >= len(expected))

        assert {r.key for r in receiver.received} == expected
        assert all(r.verified for r in receiver.received)
        assert len(receiver.distinct()) == len(expected)
        assert in_msi_order(receiver)
        first = receiver.received[0]
        assert first.body["data"]["transactionId"]
        assert set(first.headers) >= {"webhook-id", "webhook-timestamp", "webhook-signature"}
        listed = await deliveries(system, sub.id)
        assert len(listed) == len(expected)
        assert {d.state for d in listed} == {sequencer_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED}
        assert {d.id for d in listed} == set(receiver.distinct())
        assert all(d.attempts == 1 and d.last_http_status == 200 for d in listed)
        registry = system.sequencer_app.metrics
        assert registry.webhook_deliveries.labels("delivered")._value.get() == len(expected)
    finally:
        await system.stop()


async def test_a_500_then_200_is_delivered_by_a_retry_with_the_same_webhook_id(
    database_url: str, sequencer_settings: Any
) -> None:
    seen: dict[str, int] = {}

    async def flaky(_n: int, webhook_id: str) -> tuple[int, dict[str, str]]:
        seen[webhook_id] = seen.get(webhook_id, 0) + 1
        return (500, {}) if seen[webhook_id] == 1 else (200, {})

    receiver = await Receiver(answer=flaky).start()
    system = await System.start(database_url, fast(sequencer_settings))
    try:
        sub, _ = await subscribe(system, receiver.url)
        receiver.secret = sub.secret
        await system.submit(shipment_event("FLAKY", 1, "shipment_created"))
        await system.submit(shipment_event("FLAKY", 2, "shipment_picked"))
        await receiver.wait_for(lambda r: len(r.received) >= 4)
        ids = receiver.ids()
        # Each delivery twice in a row, the same id both times; the second waits for the first.
        assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]
        assert [r.key[2] for r in receiver.received] == [1, 1, 2, 2]
        assert all(r.verified for r in receiver.received)
        listed = {d.id: d for d in await deliveries(system, sub.id)}
        await _until_delivered(system, sub.id, 2)
        listed = {d.id: d for d in await deliveries(system, sub.id)}
        assert all(d.attempts == 2 and d.last_http_status == 200 for d in listed.values())
        assert all(d.state == sequencer_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED for d in listed.values())
        statuses = sorted(r[0] for r in rows(database_url, "SELECT http_status FROM sequencer.outbox_attempts"))
        assert statuses == [200, 200, 500, 500]
    finally:
        await system.stop()
        await receiver.stop()


async def _until_delivered(system: System, subscription_id: str, count: int) -> None:
    for _ in range(200):
        listed = await deliveries(system, subscription_id)
        done = [d for d in listed if d.state == sequencer_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED]
        if len(done) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not delivered: {listed}")


async def test_a_receiver_that_is_down_for_a_while_gets_everything_once_it_is_back(
    database_url: str, sequencer_settings: Any
) -> None:
    receiver = Receiver().bind()  # the port is taken but refuses connections: the receiver is down
    system = await System.start(database_url, fast(sequencer_settings, webhook_retry_schedule=(0.0,) + (0.3,) * 40))
    try:
        sub, _ = await subscribe(system, receiver.url)
        receiver.secret = sub.secret
        expected = set()
        for sid in ("DOWN-A", "DOWN-B"):
            for seq, kind in enumerate(["shipment_created", "shipment_picked", "shipment_packed"], start=1):
                await system.submit(shipment_event(sid, seq, kind))
                expected.add((SHIPMENT, sid, seq, APPLIED))
        # Attempts fail while it is down (connection refused), recorded with their error.
        for _ in range(200):
            listed = await deliveries(system, sub.id)
            if any(d.attempts >= 2 for d in listed):
                break
            await asyncio.sleep(0.05)
        failing = [d for d in listed if d.attempts >= 1]
        assert failing and all(d.last_error and d.last_http_status == 0 for d in failing)
        assert all(d.state == sequencer_pb2.WEBHOOK_DELIVERY_STATE_PENDING for d in listed)
        assert receiver.received == []
        await receiver.start()
        await receiver.wait_for(lambda r: {x.key for x in r.received} == expected)
        await _until_delivered(system, sub.id, len(expected))
        assert len(receiver.distinct()) == len(expected)
        assert all(r.verified for r in receiver.received)
        assert in_msi_order(receiver)
    finally:
        await system.stop()
        await receiver.stop()


async def test_410_disables_the_subscription_with_an_alert(
    database_url: str, sequencer_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    both_done = asyncio.Event()

    async def gone(_n: int, _id: str) -> tuple[int, dict[str, str]]:
        await both_done.wait()  # answered once both deliveries exist
        return 410, {}

    receiver = await Receiver(answer=gone).start()
    system = await System.start(database_url, fast(sequencer_settings))
    try:
        sub, _ = await subscribe(system, receiver.url)
        receiver.secret = sub.secret
        with caplog.at_level(logging.ERROR, logger="sequencer.dispatcher"):
            await system.submit(shipment_event("GONE", 1, "shipment_created"))
            second = await system.submit(shipment_event("GONE", 2, "shipment_picked"))
            await system.wait_terminal(second.transaction_id)
            both_done.set()
            await receiver.wait_for(lambda r: len(r.received) >= 1)
            listed: list[Any] = []
            for _ in range(200):
                reply = await system.admin.ListWebhookSubscriptions(
                    sequencer_pb2.ListWebhookSubscriptionsRequest(), **ADMIN
                )
                if reply.subscriptions[0].state == sequencer_pb2.WEBHOOK_SUBSCRIPTION_STATE_DISABLED:
                    break
                await asyncio.sleep(0.05)
            disabled = reply.subscriptions[0]
            assert disabled.state == sequencer_pb2.WEBHOOK_SUBSCRIPTION_STATE_DISABLED
            assert disabled.disabled_reason == "RECEIVER_GONE" and disabled.HasField("disabled_at")
            assert any(r.getMessage() == "webhook subscription disabled" for r in caplog.records)
        await system.wait_terminal((await system.submit(shipment_event("GONE", 3, "shipment_packed"))).transaction_id)
        listed = await deliveries(system, sub.id)
        # The first got 410; the second was failed with the subscription; the third was never written.
        assert len(receiver.received) == 1
        assert [d.sequence for d in listed] == [2, 1]
        assert {d.state for d in listed} == {sequencer_pb2.WEBHOOK_DELIVERY_STATE_FAILED}
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await system.admin.RedeliverWebhook(
                sequencer_pb2.RedeliverWebhookRequest(delivery_id=listed[0].id), **ADMIN
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(refused.value).reason == "WEBHOOK_SUBSCRIPTION_DISABLED"
    finally:
        both_done.set()
        await system.stop()
        await receiver.stop()


async def test_redeliver_sends_a_delivered_one_again_and_delete_stops_them(
    database_url: str, sequencer_settings: Any, receiver: Receiver
) -> None:
    system = await System.start(database_url, fast(sequencer_settings))
    try:
        sub, _ = await subscribe(system, receiver.url)
        receiver.secret = sub.secret
        await system.submit(shipment_event("AGAIN", 1, "shipment_created"))
        await receiver.wait_for(lambda r: len(r.received) == 1)
        await _until_delivered(system, sub.id, 1)
        (delivery,) = await deliveries(system, sub.id)
        reply = await system.admin.RedeliverWebhook(
            sequencer_pb2.RedeliverWebhookRequest(delivery_id=delivery.id), **ADMIN
        )
        assert reply.delivery.state == sequencer_pb2.WEBHOOK_DELIVERY_STATE_PENDING
        await receiver.wait_for(lambda r: len(r.received) == 2)
        assert receiver.ids() == [delivery.id, delivery.id] and all(r.verified for r in receiver.received)

        await system.admin.DeleteWebhookSubscription(sequencer_pb2.DeleteWebhookSubscriptionRequest(id=sub.id), **ADMIN)
        listed = await system.admin.ListWebhookSubscriptions(sequencer_pb2.ListWebhookSubscriptionsRequest(), **ADMIN)
        assert list(listed.subscriptions) == []
        await system.wait_terminal((await system.submit(shipment_event("AGAIN", 2, "shipment_picked"))).transaction_id)
        assert rows(database_url, "SELECT count(*) FROM sequencer.outbox_deliveries") == [(0,)]
        for call in (
            system.admin.DeleteWebhookSubscription(sequencer_pb2.DeleteWebhookSubscriptionRequest(id=sub.id), **ADMIN),
            system.admin.ListWebhookDeliveries(
                sequencer_pb2.ListWebhookDeliveriesRequest(subscription_id=sub.id), **ADMIN
            ),
            system.admin.RedeliverWebhook(sequencer_pb2.RedeliverWebhookRequest(delivery_id=delivery.id), **ADMIN),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await call
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(missing.value).reason in ("WEBHOOK_SUBSCRIPTION_NOT_FOUND", "WEBHOOK_DELIVERY_NOT_FOUND")
    finally:
        await system.stop()


async def test_create_is_idempotent_and_the_secret_is_shown_once(system: System, database_url: str) -> None:
    url = "http://127.0.0.1:9/hooks"
    first, meta = await subscribe(system, url, key="sub-1", description="wms")
    again, replay_meta = await subscribe(system, url, key="sub-1", description="wms")
    assert first.secret.startswith("whsec_") and "idempotency-replayed" not in meta
    assert again.id == first.id and again.secret == "" and replay_meta["idempotency-replayed"] == "true"
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await subscribe(system, url, key="sub-1", description="other")
    assert error_info(reused.value).reason == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(grpc.aio.AioRpcError) as keyless:
        await system.admin.CreateWebhookSubscription(sequencer_pb2.CreateWebhookSubscriptionRequest(url=url), **ADMIN)
    assert keyless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(keyless.value).reason == "IDEMPOTENCY_KEY_MISSING"
    listed = await system.admin.ListWebhookSubscriptions(sequencer_pb2.ListWebhookSubscriptionsRequest(), **ADMIN)
    assert [s.id for s in listed.subscriptions] == [first.id] and listed.subscriptions[0].secret == ""
    record = await system.admin.GetIdempotencyRecord(
        sequencer_pb2.GetIdempotencyRecordRequest(idempotency_key="sub-1"), **ADMIN
    )
    assert first.secret.encode() not in record.record.response
    raw = first.secret.removeprefix("whsec_").encode()
    stored = b"".join(bytes(r[0]) for r in rows(database_url, "SELECT response FROM sequencer.idempotency_keys"))
    assert raw not in stored


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hooks",
        "https://10.0.0.1/hooks",
        "https://metadata.internal/latest",
        "ftp://127.0.0.1/hooks",
        "http://user:pw@127.0.0.1/hooks",
        "not a url",
    ],
)
async def test_a_target_off_the_allow_list_is_refused_and_nothing_is_stored(
    system: System, database_url: str, url: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await subscribe(system, url)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).reason == "WEBHOOK_TARGET_NOT_ALLOWED"
    assert rows(database_url, "SELECT count(*) FROM sequencer.outbox_subscriptions") == [(0,)]
    assert rows(database_url, "SELECT count(*) FROM sequencer.idempotency_keys") == [(0,)]


async def test_states_outside_the_outcomes_are_refused(system: System) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await subscribe(system, "http://127.0.0.1:9/h", states=[events_pb2.EVENT_STATE_QUEUED])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).reason == "INVALID_ARGUMENT"


async def test_with_credentials_only_admins_subscribe_and_only_listed_hosts(
    database_url: str, sequencer_settings: Any, tmp_path: Any
) -> None:
    tokens = {"ops": ("ops-token-1", ["admin"]), "erp": ("erp-token-2", ["submitter", "reader"])}
    identities = tmp_path / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {"caller": c, "roles": roles, "token_sha256": hashlib.sha256(t.encode()).hexdigest()}
                    for c, (t, roles) in tokens.items()
                ]
            }
        )
    )
    settings = dataclasses.replace(
        sequencer_settings,
        security=SecuritySettings(identities_file=str(identities)),
        webhook_allowed_hosts=("hooks.example.com",),
    )
    system = System()
    await system.start_sequencer(settings, run_forwarder=False, run_dispatcher=False)
    try:

        async def create(caller: str, url: str) -> Any:
            return await system.admin.CreateWebhookSubscription(
                sequencer_pb2.CreateWebhookSubscriptionRequest(url=url),
                metadata=(("authorization", f"Bearer {tokens[caller][0]}"), ("idempotency-key", uuid.uuid4().hex)),
                **ADMIN,
            )

        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await create("erp", "https://hooks.example.com/h")
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Outside development mode loopback is not special: only the listed hosts.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await create("ops", "http://127.0.0.1:9/h")
        assert error_info(refused.value).reason == "WEBHOOK_TARGET_NOT_ALLOWED"
        created = await create("ops", "https://hooks.example.com/h")
        assert created.subscription.url == "https://hooks.example.com/h"
        assert rows(database_url, "SELECT count(*) FROM sequencer.outbox_subscriptions") == [(1,)]
    finally:
        await system.stop()


async def test_a_blocked_event_is_pushed_then_its_skip_and_successor_in_order(
    database_url: str, sequencer_settings: Any, receiver: Receiver
) -> None:
    system = await System.start(database_url, fast(sequencer_settings, block_after=1))
    try:
        sub, _ = await subscribe(system, receiver.url, entity_type=INVENTORY)
        receiver.secret = sub.secret
        sku = "SKU-WH-BLOCK"
        # MSI 1 applied straight at the ledger, then MSI 1 with another payload: SEQUENCE_CONFLICT.
        direct = inventory_event(sku, 1, "inventory_received", location="DOCK", quantity=7)
        await system.ledger.ApplyEvent(
            ledger_pb2.ApplyEventRequest(event=direct, transaction_id=str(uuid.uuid4())), timeout=5
        )
        await system.submit(inventory_event(sku, 1, "inventory_received", location="DOCK", quantity=1))
        await system.submit(inventory_event(sku, 2, "inventory_received", location="DOCK", quantity=2))
        await receiver.wait_for(lambda r: len(r.received) >= 1)
        blocked = receiver.received[0]
        assert blocked.key == (INVENTORY, sku, 1, "event.blocked") and blocked.verified
        assert blocked.body["data"]["ledgerCode"] and blocked.body["data"]["reason"] == "SEQUENCE_CONFLICT"
        await system.admin.SkipSequence(
            sequencer_pb2.SkipSequenceRequest(
                entity=events_pb2.EntityRef(entity_type=INVENTORY, entity_id=sku), sequence=1, reason="applied twice"
            ),
            metadata=(("idempotency-key", "skip-blocked-wh"),),
            **ADMIN,
        )
        await receiver.wait_for(lambda r: len(r.distinct()) >= 3)
        assert [r.key for r in receiver.distinct().values()] == [
            (INVENTORY, sku, 1, "event.blocked"),
            (INVENTORY, sku, 1, "event.skipped"),
            (INVENTORY, sku, 2, "event.applied"),
        ]
        assert in_msi_order(receiver)
    finally:
        await system.stop()


async def test_the_sweeper_deletes_finished_deliveries_past_retention_and_keeps_pending_ones(
    database_url: str, sequencer_settings: Any, receiver: Receiver
) -> None:
    down = Receiver().bind()
    system = await System.start(database_url, fast(sequencer_settings, outbox_retention=60.0))
    try:
        live, _ = await subscribe(system, receiver.url)
        away, _ = await subscribe(system, down.url)
        await system.submit(shipment_event("SWEEP", 1, "shipment_created"))
        await _until_delivered(system, live.id, 1)
        for _ in range(200):  # the receiver that is away has refused an attempt
            (waiting,) = await deliveries(system, away.id)
            if waiting.attempts:
                break
            await asyncio.sleep(0.05)
        assert waiting.attempts >= 1
        sweeper = Sweeper(system.sequencer_app.engine, system.sequencer_settings, ManualClock(dt.datetime.now(dt.UTC)))
        assert await sweeper.sweep_outbox_once() == 0  # nothing is past its retention yet
        later = ManualClock(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120))
        sweeper = Sweeper(system.sequencer_app.engine, system.sequencer_settings, later)
        assert await sweeper.sweep_outbox_once() == 1
        assert await deliveries(system, live.id) == []
        (pending,) = await deliveries(system, away.id)
        assert pending.state == sequencer_pb2.WEBHOOK_DELIVERY_STATE_PENDING
        assert rows(database_url, "SELECT count(DISTINCT delivery_id) FROM sequencer.outbox_attempts") == [(1,)]
    finally:
        await system.stop()
        await down.stop()


async def test_a_stopping_sequencer_hands_back_its_claims(database_url: str, sequencer_settings: Any) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold(_n: int, _id: str) -> tuple[int, dict[str, str]]:
        arrived.set()
        await release.wait()
        return 200, {}

    receiver = await Receiver(answer=hold).start()
    system = await System.start(database_url, fast(sequencer_settings, webhook_timeout=30.0))
    try:
        await subscribe(system, receiver.url)
        await system.submit(shipment_event("HANDBACK", 1, "shipment_created"))
        await asyncio.wait_for(arrived.wait(), 30)
        assert rows(database_url, "SELECT count(*) FROM sequencer.outbox_deliveries WHERE claimed_by IS NOT NULL") == [
            (1,)
        ]
        app, system.sequencer_app = system.sequencer_app, None
        await app.stop(0)
        # Pending, unclaimed: any replica sends it now, not after the lease.
        assert rows(database_url, "SELECT status, claimed_by, attempts FROM sequencer.outbox_deliveries") == [
            (1, None, 0)
        ]
    finally:
        release.set()
        await system.stop()
        await receiver.stop()


async def test_two_replicas_send_each_delivery_once_and_one_per_entity_at_a_time(
    database_url: str, sequencer_settings: Any
) -> None:
    from sequencer.server import build_server

    in_flight: dict[tuple[int, str], int] = {}
    most: dict[tuple[int, str], int] = {}
    receiver = Receiver()

    async def slow(n: int, _id: str) -> tuple[int, dict[str, str]]:
        entity = receiver.received[n - 1].key[:2]
        in_flight[entity] = in_flight.get(entity, 0) + 1
        most[entity] = max(most.get(entity, 0), in_flight[entity])
        await asyncio.sleep(0.02)
        in_flight[entity] -= 1
        return 200, {}

    receiver.answer = slow
    await receiver.start()
    settings = fast(sequencer_settings)
    system = await System.start(database_url, settings)
    other = await build_server(system.sequencer_settings, run_forwarder=False)
    try:
        sub, _ = await subscribe(system, receiver.url)
        receiver.secret = sub.secret
        expected = set()
        for seq, kind in enumerate(["shipment_created", "shipment_picked", "shipment_packed"], start=1):
            for n in range(6):
                await system.submit(shipment_event(f"TWO-{n}", seq, kind))
                expected.add((SHIPMENT, f"TWO-{n}", seq, APPLIED))
        await receiver.wait_for(lambda r: {x.key for x in r.received} == expected)
        await _until_delivered(system, sub.id, len(expected))
        assert len(receiver.received) == len(expected)  # no delivery sent twice
        assert set(most.values()) == {1}  # one per entity at a time, across both replicas
        assert in_msi_order(receiver)
    finally:
        await other.stop(0)
        await system.stop()
        await receiver.stop()


async def test_retry_after_is_honoured_on_503(database_url: str, sequencer_settings: Any) -> None:
    async def busy(_n: int, _id: str) -> tuple[int, dict[str, str]]:
        return 503, {"Retry-After": "30"}

    receiver = await Receiver(answer=busy).start()
    system = await System.start(database_url, fast(sequencer_settings))
    try:
        sub, _ = await subscribe(system, receiver.url)
        await system.submit(shipment_event("BUSY", 1, "shipment_created"))
        for _ in range(200):
            (delivery,) = await deliveries(system, sub.id) or [None]
            if delivery is not None and delivery.attempts:
                break
            await asyncio.sleep(0.05)
        assert delivery.last_http_status == 503 and delivery.state == sequencer_pb2.WEBHOOK_DELIVERY_STATE_PENDING
        ((wait,),) = rows(
            database_url,
            "SELECT extract(epoch FROM d.next_attempt_at - a.attempted_at) FROM sequencer.outbox_deliveries d "
            "JOIN sequencer.outbox_attempts a ON a.delivery_id = d.id",
        )
        assert wait >= 30  # the schedule alone says 0.2 s
        assert len(receiver.received) == 1
    finally:
        await system.stop()
        await receiver.stop()


async def test_a_subscription_failing_for_the_disable_after_time_is_disabled(
    database_url: str, sequencer_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(_n: int, _id: str) -> tuple[int, dict[str, str]]:
        return 500, {}

    receiver = await Receiver(answer=broken).start()
    system = await System.start(
        database_url, fast(sequencer_settings, webhook_retry_schedule=(0.0,) + (0.2,) * 50, webhook_disable_after=1.0)
    )
    try:
        sub, _ = await subscribe(system, receiver.url)
        with caplog.at_level(logging.ERROR, logger="sequencer.dispatcher"):
            await system.submit(shipment_event("BROKEN", 1, "shipment_created"))
            for _ in range(300):
                reply = await system.admin.ListWebhookSubscriptions(
                    sequencer_pb2.ListWebhookSubscriptionsRequest(), **ADMIN
                )
                if reply.subscriptions[0].state == sequencer_pb2.WEBHOOK_SUBSCRIPTION_STATE_DISABLED:
                    break
                await asyncio.sleep(0.05)
        (disabled,) = reply.subscriptions
        assert disabled.state == sequencer_pb2.WEBHOOK_SUBSCRIPTION_STATE_DISABLED
        assert disabled.disabled_reason == "FAILING_TOO_LONG"
        alert = next(r for r in caplog.records if r.getMessage() == "webhook subscription disabled")
        assert alert.levelno == logging.ERROR and getattr(alert, "reason", None) == "FAILING_TOO_LONG"
        (delivery,) = await deliveries(system, sub.id)
        assert delivery.state == sequencer_pb2.WEBHOOK_DELIVERY_STATE_FAILED and delivery.attempts >= 2
    finally:
        await system.stop()
        await receiver.stop()
