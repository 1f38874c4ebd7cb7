"""Blocked events (SPEC 11): a ledger refusal that retrying cannot fix ends in BLOCKED after
SEQUENCER_BLOCK_AFTER attempts instead of looping; the entity stops there until an operator
retries or skips it, audited and idempotent. Real servers, real PostgreSQL, real TLS tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from common.auth import SecuritySettings
from ledger.config import Settings as LedgerSettings
from ledger.server import build_server as build_ledger
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.models import interventions
from tests.certs import make_certificates
from tests.support import INVENTORY, System, error_info, inventory_event, trailing

S = events_pb2.EventState
BLOCKED, PARKED, QUEUED, APPLIED, SKIPPED = (
    S.Value(f"EVENT_STATE_{n}") for n in ("BLOCKED", "PARKED", "QUEUED", "APPLIED", "SKIPPED")
)


def receive(sku: str, sequence: int, quantity: int) -> events_pb2.Event:
    return inventory_event(sku, sequence, "inventory_received", location="DOCK", quantity=quantity)


def ref(sku: str) -> events_pb2.EntityRef:
    return events_pb2.EntityRef(entity_type=INVENTORY, entity_id=sku)


async def wait_state(system: System, transaction_id: str, state: int, timeout: float) -> sequencer_pb2.EventStatus:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = await system.status(transaction_id)
        if status.state == state:
            return status
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{transaction_id} still {S.Name(status.state)} after {timeout} s: {status}")
        await asyncio.sleep(0.1)


async def conflict_at_msi_1(system: System, sku: str) -> Any:
    """The issue's reproduction: MSI 1 applied straight at the ledger (development mode allows
    it), then MSI 1 with another payload through the sequencer."""
    direct = ledger_pb2.ApplyEventRequest(event=receive(sku, 1, 7), transaction_id=str(uuid.uuid4()))
    await system.ledger.ApplyEvent(direct, timeout=5)
    return await system.submit(receive(sku, 1, 1))


async def test_a_conflict_blocks_within_a_minute_with_the_defaults(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    """Default settings (SEQUENCER_BLOCK_AFTER 5): BLOCKED with the ledger's reason well within
    60 s, visible in every view; successors submitted meanwhile stay parked."""
    caplog.set_level(logging.WARNING, logger="sequencer.forwarder")
    accepted = await conflict_at_msi_1(system, "SKU-BLOCK")
    assert accepted.state == QUEUED
    watch = system.sequencer.WatchEventStatus(
        sequencer_pb2.WatchEventStatusRequest(transaction_id=accepted.transaction_id), timeout=70
    )
    parked = [await system.submit(receive("SKU-BLOCK", n, n)) for n in (2, 3)]
    assert [p.state for p in parked] == [PARKED, PARKED]

    status = await wait_state(system, accepted.transaction_id, BLOCKED, timeout=60)
    assert (status.reason, status.ledger_code, status.forward_attempts) == (
        "SEQUENCE_CONFLICT",
        "FAILED_PRECONDITION",
        5,
    )
    assert "different payload" in status.reason_detail and status.HasField("blocked_at")
    seen = []
    async for reply in watch:
        seen.append(reply.status.state)
        if reply.status.state == BLOCKED:
            break
    watch.cancel()
    assert seen[0] == QUEUED and seen[-1] == BLOCKED

    for p in parked:
        assert (await system.status(p.transaction_id)).state == PARKED
    entity = (await system.admin.GetEntity(sequencer_pb2.GetEntityRequest(entity=ref("SKU-BLOCK")), timeout=5)).entity
    assert (entity.watermark, entity.blocked_sequence, entity.blocked_reason) == (0, 1, "SEQUENCE_CONFLICT")
    assert entity.blocked_since == status.blocked_at
    listed = await system.admin.ListBlockedEvents(sequencer_pb2.ListBlockedEventsRequest(), timeout=5)
    assert [b.transaction_id for b in listed.blocked_events] == [accepted.transaction_id]

    app = system.sequencer_app
    await app.gaps.check()
    assert app.metrics.blocked._value.get() == 1
    assert app.metrics.forward_retries._value.get() >= 5
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.getMessage().startswith("event blocked")]
    assert [(getattr(r, "reason", None), getattr(r, "sequence", None)) for r in errors] == [("SEQUENCE_CONFLICT", 1)]
    # Nothing was applied behind the ledger's back: it holds its own MSI 1 only.
    assert [
        (h.sequence, h.correlation_id != accepted.correlation_id) for h in await system.history(INVENTORY, "SKU-BLOCK")
    ] == [(1, True)]


@pytest.fixture
async def blocking_system(database_url: str, sequencer_settings: Any) -> Any:
    """Blocks after two refusals, so the operators' flows run quickly."""
    system = await System.start(database_url, dataclasses.replace(sequencer_settings, block_after=2))
    yield system
    await system.stop()


async def test_operators_retry_and_skip_a_blocked_event(blocking_system: System, database_url: str) -> None:
    """Retrying without fixing anything blocks again; a retry of another MSI is refused; both
    interventions replay on their keys; a skip releases the successors, which apply in order,
    and the audit trail says who did what and why."""
    system = blocking_system
    accepted = await conflict_at_msi_1(system, "SKU-OPS")
    parked = [await system.submit(receive("SKU-OPS", n, n)) for n in (2, 3)]
    await wait_state(system, accepted.transaction_id, BLOCKED, timeout=30)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await system.admin.RetryBlockedEvent(
            sequencer_pb2.RetryBlockedEventRequest(entity=ref("SKU-OPS"), sequence=2, reason="try", request_id="r-2"),
            timeout=5,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "NOT_BLOCKED"
    with pytest.raises(grpc.aio.AioRpcError) as missing_key:
        await system.admin.RetryBlockedEvent(
            sequencer_pb2.RetryBlockedEventRequest(entity=ref("SKU-OPS"), sequence=1, reason="try"), timeout=5
        )
    assert error_info(missing_key.value).reason == "IDEMPOTENCY_KEY_MISSING"

    retry = sequencer_pb2.RetryBlockedEventRequest(
        entity=ref("SKU-OPS"), sequence=1, reason="ledger fixed?", request_id="retry-1"
    )
    retried = await system.admin.RetryBlockedEvent(retry, timeout=5)
    assert (retried.status.state, retried.status.forward_attempts) == (QUEUED, 0)
    assert retried.status.transaction_id == accepted.transaction_id
    again = system.admin.RetryBlockedEvent(retry, timeout=5)
    assert await again == retried and (await trailing(again)).get("idempotency-replayed") == "true"
    await wait_state(system, accepted.transaction_id, BLOCKED, timeout=30)

    skip = sequencer_pb2.SkipSequenceRequest(
        entity=ref("SKU-OPS"), sequence=1, reason="ledger holds its own MSI 1", request_id="skip-1"
    )
    skipped = await system.admin.SkipSequence(skip, timeout=5)
    assert skipped.status.transaction_id == accepted.transaction_id
    final = await system.wait_terminal(accepted.transaction_id)
    assert (final.state, final.reason) == (SKIPPED, "ledger holds its own MSI 1")
    for p in parked:
        assert (await system.wait_terminal(p.transaction_id)).state == APPLIED
    assert [h.sequence for h in await system.history(INVENTORY, "SKU-OPS")] == [1, 2, 3]
    item = (await system.ledger.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku="SKU-OPS"), timeout=5)).item
    assert [(b.location, b.on_hand) for b in item.balances] == [("DOCK", 7 + 2 + 3)]
    listed = await system.admin.ListBlockedEvents(sequencer_pb2.ListBlockedEventsRequest(), timeout=5)
    assert list(listed.blocked_events) == []

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(interventions).order_by(interventions.c.at))).all()
    finally:
        await engine.dispose()
    assert [(r.action, r.sequence, r.reason, r.caller_id) for r in rows] == [
        ("retry", 1, "ledger fixed?", "default"),
        ("skip", 1, "ledger holds its own MSI 1", "default"),
    ]
    assert all(r.blocked_reason.startswith("FAILED_PRECONDITION: SEQUENCE_CONFLICT") for r in rows)


async def test_a_wrong_ledger_token_blocks_until_fixed_and_retried(
    database_url: str, sequencer_settings: Any, tmp_path: Path
) -> None:
    """A ledger that does not know the sequencer's token refuses every batch (UNAUTHENTICATED,
    no item index): the events block instead of looping; with the token fixed (the sequencer
    restarted with the right one), RetryBlockedEvent applies them."""
    certs = make_certificates(tmp_path / "tls", [])
    good, bad = "sequencer-token-good", "sequencer-token-wrong"
    ids = {"identities": [{"caller": "sequencer", "roles": ["sequencer"], "token_sha256": _sha(good)}]}
    (tmp_path / "ledger-ids.json").write_text(json.dumps(ids))
    (tmp_path / "good").write_text(good)
    (tmp_path / "bad").write_text(bad)
    ledger_app = await build_ledger(
        LedgerSettings(
            database_url=database_url,
            listen_addr="127.0.0.1:0",
            metrics_addr="127.0.0.1:0",
            security=SecuritySettings(
                identities_file=str(tmp_path / "ledger-ids.json"), tls_cert=certs.server.cert, tls_key=certs.server.key
            ),
        )
    )
    settings = dataclasses.replace(
        sequencer_settings,
        ledger_target=f"localhost:{ledger_app.port}",
        ledger_tls_ca=certs.ca,
        ledger_token_file=str(tmp_path / "bad"),
        block_after=2,
    )
    system = System()
    system.ledger_app = ledger_app
    try:
        await system.start_sequencer(settings)
        first = [await system.submit(receive(f"SKU-TOKEN-{n}", 1, 1)) for n in range(3)]
        for accepted in first:
            status = await wait_state(system, accepted.transaction_id, BLOCKED, timeout=30)
            assert (status.ledger_code, status.reason) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
        await system.sequencer_app.stop(0)
        await system.start_sequencer(dataclasses.replace(settings, ledger_token_file=str(tmp_path / "good")))
        for n, accepted in enumerate(first):
            retry = sequencer_pb2.RetryBlockedEventRequest(
                entity=ref(f"SKU-TOKEN-{n}"), sequence=1, reason="token fixed", request_id=f"token-{n}"
            )
            await system.admin.RetryBlockedEvent(retry, timeout=5)
            assert (await system.wait_terminal(accepted.transaction_id)).state == APPLIED
    finally:
        await system.stop()


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
