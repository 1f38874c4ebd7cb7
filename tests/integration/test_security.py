"""Issue 10 over real TLS and real tokens: who may call what, and what they may see."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from common.auth import SecuritySettings
from common.settings import ConfigError
from ledger.config import Settings as LedgerSettings
from ledger.server import build_server as build_ledger
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from sequencer.config import Settings as SequencerSettings
from sequencer.models import events, idempotency_keys
from sequencer.server import build_server as build_sequencer
from tests.certs import Certificates, make_certificates
from tests.support import error_info, shipment_event

TOKENS = {"wms": "wms-secret-1", "erp": "erp-secret-2", "bi": "bi-secret-3", "ops": "ops-secret-4"}
ROLES = {"wms": ["submitter", "reader"], "erp": ["submitter"], "bi": ["reader"], "ops": ["admin"]}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass
class Secured:
    certs: Certificates
    sequencer_port: int  # TLS, bearer tokens
    mtls_port: int  # a second replica requiring client certificates
    ledger_port: int  # mutual TLS only
    sequencer_app: Any
    ledger_app: Any
    mtls_app: Any
    channels: list[grpc.aio.Channel] = dataclasses.field(default_factory=list)

    def channel(self, port: int, *, token: str | None = None, client: str | None = None) -> grpc.aio.Channel:
        pair = self.certs.clients[client] if client else None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.certs.ca).read_bytes(),
            private_key=Path(pair.key).read_bytes() if pair else None,
            certificate_chain=Path(pair.cert).read_bytes() if pair else None,
        )
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        channel = grpc.aio.secure_channel(f"localhost:{port}", credentials)
        self.channels.append(channel)
        return channel

    def sequencer(self, **kwargs: Any) -> sequencer_pb2_grpc.SequencerServiceStub:
        port = self.mtls_port if kwargs.get("client") else self.sequencer_port
        return sequencer_pb2_grpc.SequencerServiceStub(self.channel(port, **kwargs))

    def admin(self, **kwargs: Any) -> sequencer_pb2_grpc.SequencerAdminServiceStub:
        port = self.mtls_port if kwargs.get("client") else self.sequencer_port
        return sequencer_pb2_grpc.SequencerAdminServiceStub(self.channel(port, **kwargs))

    def ledger(self, **kwargs: Any) -> ledger_pb2_grpc.LedgerServiceStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel(self.ledger_port, **kwargs))

    async def counts(self) -> tuple[int, int]:
        async with self.sequencer_app.engine.connect() as conn:
            held = await conn.scalar(select(func.count()).select_from(events))
            keys = await conn.scalar(select(func.count()).select_from(idempotency_keys))
        return int(held), int(keys)


@pytest.fixture
async def secured(database_url: str, tmp_path: Path) -> AsyncIterator[Secured]:
    certs = make_certificates(tmp_path / "tls", ["wms-mtls", "sequencer", "bi-reader"])
    sequencer_ids = [{"caller": c, "roles": ROLES[c], "token_sha256": sha(t)} for c, t in TOKENS.items()]
    sequencer_ids.append({"caller": "wms-mtls", "roles": ["submitter", "reader"], "subject": "CN=wms-mtls"})
    ledger_ids = [
        {"caller": "sequencer", "roles": ["sequencer"], "subject": "CN=sequencer"},
        {"caller": "bi", "roles": ["reader"], "subject": "CN=bi-reader"},
    ]
    (tmp_path / "sequencer-ids.json").write_text(json.dumps({"identities": sequencer_ids}))
    (tmp_path / "ledger-ids.json").write_text(json.dumps({"identities": ledger_ids}))

    def security(ids: str, *, mutual: bool) -> SecuritySettings:
        return SecuritySettings(
            identities_file=str(tmp_path / ids),
            tls_cert=certs.server.cert,
            tls_key=certs.server.key,
            tls_client_ca=certs.ca if mutual else "",
        )

    ledger_app = await build_ledger(
        LedgerSettings(
            database_url=database_url,
            listen_addr="127.0.0.1:0",
            metrics_addr="127.0.0.1:0",
            security=security("ledger-ids.json", mutual=True),
        )
    )
    settings = SequencerSettings(
        database_url=database_url,
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        ledger_target=f"localhost:{ledger_app.port}",
        forwarder_poll_interval=0.2,
        security=security("sequencer-ids.json", mutual=False),
        ledger_tls_ca=certs.ca,
        ledger_tls_cert=certs.clients["sequencer"].cert,
        ledger_tls_key=certs.clients["sequencer"].key,
    )
    sequencer_app = await build_sequencer(settings)
    mtls_app = await build_sequencer(
        dataclasses.replace(settings, security=security("sequencer-ids.json", mutual=True))
    )
    secured = Secured(certs, sequencer_app.port, mtls_app.port, ledger_app.port, sequencer_app, ledger_app, mtls_app)
    yield secured
    for channel in secured.channels:
        await channel.close()
    await mtls_app.stop(0)
    await sequencer_app.stop(0)
    await ledger_app.stop(0)


def submit(event: events_pb2.Event) -> sequencer_pb2.SubmitEventRequest:
    return sequencer_pb2.SubmitEventRequest(event=event, request_id=f"{event.entity_id}-{event.sequence}")


async def wait_applied(stub: sequencer_pb2_grpc.SequencerServiceStub, transaction_id: str) -> None:
    import asyncio

    for _ in range(300):
        reply = await stub.GetEventStatus(sequencer_pb2.GetEventStatusRequest(transaction_id=transaction_id), timeout=5)
        if reply.status.state == events_pb2.EVENT_STATE_APPLIED:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not applied")


async def expect(code: grpc.StatusCode, reason: str, call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    assert error_info(caught.value).reason == reason


async def test_calls_without_valid_credentials_are_refused(secured: Secured) -> None:
    request = submit(shipment_event("SEC-1", 1, "shipment_created"))
    await expect(
        grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", secured.sequencer().SubmitEvent(request, timeout=5)
    )
    await expect(
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        secured.sequencer(token="not-a-token").SubmitEvent(request, timeout=5),
    )
    await expect(
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        secured.sequencer().SubmitEvent(request, metadata=(("authorization", "Basic d21zOng="),), timeout=5),
    )
    assert await secured.counts() == (0, 0)


async def test_roles_limit_what_each_caller_may_do(secured: Secured) -> None:
    request = submit(shipment_event("SEC-2", 2, "shipment_picked"))
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        secured.sequencer(token=TOKENS["bi"]).SubmitEvent(request, timeout=5),
    )
    assert await secured.counts() == (0, 0)
    parked = await secured.sequencer(token=TOKENS["wms"]).SubmitEvent(request, timeout=5)
    assert parked.state == events_pb2.EVENT_STATE_PARKED
    entity = events_pb2.EntityRef(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="SEC-2")
    skip = sequencer_pb2.SkipSequenceRequest(entity=entity, sequence=1, reason="lost", request_id="skip-1")
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        secured.admin(token=TOKENS["wms"]).SkipSequence(skip, timeout=5),
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        secured.admin(token=TOKENS["wms"]).ListGaps(sequencer_pb2.ListGapsRequest(), timeout=5),
    )
    assert await secured.counts() == (1, 1)
    done = await secured.admin(token=TOKENS["ops"]).SkipSequence(skip, timeout=5)
    assert done.status.state in (events_pb2.EVENT_STATE_QUEUED, events_pb2.EVENT_STATE_SKIPPED)
    await wait_applied(secured.sequencer(token=TOKENS["wms"]), parked.transaction_id)
    # The skip is audited with the admin's authenticated identity.
    async with secured.sequencer_app.engine.connect() as conn:
        who = await conn.scalar(select(events.c.caller_id).where(events.c.skip_reason.is_not(None)))
    assert who == "ops"


async def test_callers_never_see_each_others_records(secured: Secured) -> None:
    wms = secured.sequencer(token=TOKENS["wms"])
    reply = await wms.SubmitEvent(
        submit(shipment_event("SEC-3", 1, "shipment_created")), metadata=(("x-client-id", "erp"),), timeout=5
    )
    erp = secured.sequencer(token=TOKENS["erp"])
    for request in (
        sequencer_pb2.GetEventStatusRequest(transaction_id=reply.transaction_id),
        sequencer_pb2.GetEventStatusRequest(idempotency_key="SEC-3-1"),
    ):
        await expect(grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND", erp.GetEventStatus(request, timeout=5))
    watch: Any = erp.WatchEventStatus(
        sequencer_pb2.WatchEventStatusRequest(transaction_id=reply.transaction_id), timeout=5
    )
    await expect(grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND", watch.read())
    await expect(
        grpc.StatusCode.NOT_FOUND,
        "IDEMPOTENCY_RECORD_NOT_FOUND",
        secured.admin(token=TOKENS["erp"]).GetIdempotencyRecord(
            sequencer_pb2.GetIdempotencyRecordRequest(idempotency_key="SEC-3-1"), timeout=5
        ),
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        secured.admin(token=TOKENS["erp"]).GetIdempotencyRecord(
            sequencer_pb2.GetIdempotencyRecordRequest(idempotency_key="SEC-3-1", caller_id="wms"), timeout=5
        ),
    )
    # The key was scoped by the token's identity, not by the self-declared x-client-id.
    record = await secured.admin(token=TOKENS["wms"]).GetIdempotencyRecord(
        sequencer_pb2.GetIdempotencyRecordRequest(idempotency_key="SEC-3-1"), timeout=5
    )
    assert record.record.caller_id == "wms"
    by_admin = await secured.admin(token=TOKENS["ops"]).GetIdempotencyRecord(
        sequencer_pb2.GetIdempotencyRecordRequest(idempotency_key="SEC-3-1", caller_id="wms"), timeout=5
    )
    assert by_admin.record.transaction_id == reply.transaction_id
    status = await secured.sequencer(token=TOKENS["ops"]).GetEventStatus(
        sequencer_pb2.GetEventStatusRequest(transaction_id=reply.transaction_id), timeout=5
    )
    assert status.status.transaction_id == reply.transaction_id


async def test_mutual_tls_identity_end_to_end(secured: Secured, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stub = secured.sequencer(client="wms-mtls")
    reply = await stub.SubmitEvent(submit(shipment_event("SEC-4", 1, "shipment_created")), timeout=5)
    # Forwarded to the ledger over mutual TLS as the sequencer's identity, and applied.
    await wait_applied(stub, reply.transaction_id)
    record = await secured.admin(client="wms-mtls").GetIdempotencyRecord(
        sequencer_pb2.GetIdempotencyRecordRequest(idempotency_key="SEC-4-1"), timeout=5
    )
    assert record.record.caller_id == "wms-mtls"
    shipment = await secured.ledger(client="bi-reader").GetShipment(
        ledger_pb2.GetShipmentRequest(shipment_id="SEC-4"), timeout=5
    )
    assert shipment.shipment.version == 1
    for token in TOKENS.values():
        assert all(token not in record.getMessage() and token not in str(record.__dict__) for record in caplog.records)


async def test_ledger_accepts_apply_only_from_the_sequencer(secured: Secured) -> None:
    request = ledger_pb2.ApplyEventRequest(event=shipment_event("SEC-5", 1, "shipment_created"))
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        secured.ledger(client="bi-reader").ApplyEvent(request, timeout=5),
    )
    # A client certificate the CA signed but no identity names: authenticated TLS, unknown caller.
    await expect(
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        secured.ledger(client="wms-mtls").ApplyEvent(request, timeout=5),
    )
    # No client certificate at all: the TLS handshake itself fails.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured.ledger().ApplyEvent(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    applied = await secured.ledger(client="sequencer").ApplyEvent(request, timeout=5)
    assert applied.outcome == ledger_pb2.APPLY_OUTCOME_APPLIED


async def test_health_stays_open_without_credentials(secured: Secured) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(secured.channel(secured.sequencer_port)).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_exposed_listener_needs_tls_and_credentials(tmp_path: Path) -> None:
    base = {"DATABASE_URL": "postgresql://u@h/db", "SEQUENCER_LISTEN_ADDR": "0.0.0.0:50051"}
    with pytest.raises(ConfigError, match="not loopback"):
        SequencerSettings.from_env(base)
    assert SequencerSettings.from_env({**base, "SEQUENCER_ALLOW_INSECURE": "true"}).security.allow_insecure
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"identities": [{"caller": "a", "roles": ["admin"], "token_sha256": sha("t")}]}))
    settings = SequencerSettings.from_env(
        {**base, "SEQUENCER_TLS_CERT": "c.pem", "SEQUENCER_TLS_KEY": "k.pem", "SEQUENCER_IDENTITIES_FILE": str(ids)}
    )
    assert settings.security.tls
    with pytest.raises(ConfigError):
        SequencerSettings.from_env({**base, "SEQUENCER_ALLOW_INSECURE": "true", "SEQUENCER_TLS_CERT": "c.pem"})


async def test_mutual_tls_from_the_python_client(secured: Secured) -> None:
    """The hand-written client with a client certificate: identity from the certificate."""
    from logistics.client import EventState, PermissionDeniedError, SequencerClient

    pair = secured.certs.clients["wms-mtls"]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(secured.certs.ca).read_bytes(),
        private_key=Path(pair.key).read_bytes(),
        certificate_chain=Path(pair.cert).read_bytes(),
    )
    async with SequencerClient(f"localhost:{secured.mtls_port}", credentials=credentials) as client:
        result = await client.submit(shipment_event("SEC-6", 1, "shipment_created"), idempotency_key="mtls-6")
        status = await client.wait(result.transaction_id, timeout=20)
        assert status.state == EventState.APPLIED
        record = await client.get_idempotency_record("mtls-6")
        assert record.caller_id == "wms-mtls"
        with pytest.raises(PermissionDeniedError):
            await client.skip_sequence((events_pb2.ENTITY_TYPE_SHIPMENT, "SEC-6"), 2, "not mine to skip")
