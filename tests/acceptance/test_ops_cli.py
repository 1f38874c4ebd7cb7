"""`python -m ops`, the operator CLI, as a subprocess against a real sequencer and ledger.

Tables for people, `--json` that parses (proto3 JSON, as buf curl prints it), exit statuses that
say what happened, credentials from LOGISTICS_*, and a progress count on stderr only when stderr
is a terminal. RPCs the server under test does not implement (the blocked and webhook admin RPCs
land on other branches) are checked against what the server really answers: UNIMPLEMENTED is
exit 6 with a line that says so; an implemented RPC's output equals its direct answer.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.server
import json
import os
import pty
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import json_format

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from ops import cli
from tests.processes import ServiceProcess, start_ledger, start_sequencer
from tests.support import inventory_event, shipment_event

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
POLL_DEADLINE = 20.0


def ops(
    *args: str, address: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOGISTICS_")}
    environ.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]),
        LOGISTICS_SEQUENCER_ADDR=address,
        **(env or {}),
    )
    return subprocess.run(
        [sys.executable, "-m", "ops", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok_json(*args: str, address: str, env: dict[str, str] | None = None) -> Any:
    result = ops(*args, "--json", address=address, env=env)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", result.stderr  # no progress display into a pipe
    return json.loads(result.stdout)


def submit(address: str, shipment_id: str, sequence: int, kind: str) -> sequencer_pb2.SubmitEventResponse:
    with grpc.insecure_channel(address) as channel:
        reply: sequencer_pb2.SubmitEventResponse = sequencer_pb2_grpc.SequencerServiceStub(channel).SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event(shipment_id, sequence, kind)),
            metadata=(("idempotency-key", f"cli-{shipment_id}-{sequence}"),),
            timeout=10,
        )
    return reply


def direct(address: str, method: str, request: Any) -> Any:
    """Calls an admin RPC directly: its answer, or the grpc.RpcError it failed with."""
    with grpc.insecure_channel(address) as channel:
        stub = sequencer_pb2_grpc.SequencerAdminServiceStub(channel)
        try:
            return getattr(stub, method)(request, timeout=10)
        except grpc.RpcError as exc:
            return exc


def same_failure(result: subprocess.CompletedProcess[str], failure: grpc.RpcError) -> None:
    """The CLI failed as the direct call did: the exit status of its code, one line naming it."""
    code = failure.code()
    assert result.returncode == cli.EXIT_STATUSES.get(code, cli.EXIT_ERROR), result.stderr
    assert code.name in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_the_cli_walks_a_gap_from_listing_to_skip(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, _ = services
    address = sequencer.address
    shipment = f"SHP-CLI-{uuid.uuid4().hex[:8]}"
    first = submit(address, shipment, 1, "shipment_created")
    parked = submit(address, shipment, 3, "shipment_picked")
    assert parked.state == events_pb2.EVENT_STATE_PARKED

    # gaps: a table for people, JSON for scripts.
    table = ops("gaps", address=address)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["ENTITY", "AWAITING", "PARKED"]
    assert [row.split()[:3] for row in rows] == [[f"shipment/{shipment}", "2", "1"]]
    gaps = ok_json("gaps", address=address)["gaps"]
    assert [(g["entity"]["entityId"], g["awaitingSequence"], g["parkedCount"]) for g in gaps] == [(shipment, "2", 1)]

    held = ok_json("parked", "shipment", shipment, address=address)["parkedEvents"]
    assert [(p["transactionId"], p["event"]["sequence"]) for p in held] == [(parked.transaction_id, "3")]
    assert ok_json("parked", address=address)["parkedEvents"] == held

    entity = ok_json("entity", "shipment", shipment, address=address)["entity"]
    assert entity["parkedCount"] == 1 and entity["awaitingSequence"] == "2"
    text = ops("entity", "shipment", shipment, address=address)
    assert text.returncode == 0 and "parked:" in text.stdout and f"shipment/{shipment}" in text.stdout

    # status by transaction id and by key; the state is printed by name.
    status = ok_json("status", parked.transaction_id, address=address)["status"]
    assert status["state"] == "EVENT_STATE_PARKED" and status["awaitingSequence"] == "2"
    by_key = ok_json("status", "--key", f"cli-{shipment}-3", address=address)["status"]
    assert by_key["transactionId"] == parked.transaction_id
    assert "state:" in (line := ops("status", first.transaction_id, address=address).stdout) and (
        "QUEUED" in line or "APPLIED" in line
    )

    # skip MSI 2: the gap closes and MSI 3 is applied; the same command again replays.
    skipped = ops("skip", "shipment", shipment, "2", "--reason", "lost upstream, OPS-7", address=address)
    assert skipped.returncode == 0, skipped.stderr
    assert f"shipment/{shipment} MSI 2" in skipped.stdout
    again = ok_json("skip", "shipment", shipment, "2", "--reason", "lost upstream, OPS-7", address=address)
    # The stored answer of the first skip (its marker QUEUED for the ledger), replayed.
    assert again["status"]["sequence"] == "2" and again["status"]["reason"] == "lost upstream, OPS-7"
    assert again["status"]["idempotencyKey"] == f"ops-skip:SHIPMENT:{shipment}:2"

    # watch the released MSI 3 until it is terminal: one JSON line per status, then exit 0.
    watched = ops("watch", parked.transaction_id, "--json", address=address)
    assert watched.returncode == 0, watched.stderr
    states = [json.loads(line)["status"]["state"] for line in watched.stdout.splitlines()]
    assert states[-1] == "EVENT_STATE_APPLIED"
    assert ok_json("gaps", address=address)["gaps"] == []
    assert ops("gaps", address=address).stdout == "(none)\n"

    # A skip of an MSI that is no gap (another key) is refused: exit 4, the reason printed.
    refused = ops("skip", "shipment", shipment, "9", "--reason", "r", address=address)
    assert refused.returncode == cli.EXIT_REFUSED
    assert "FAILED_PRECONDITION NOT_A_GAP" in refused.stderr and refused.stderr.count("\n") == 1


def test_exit_statuses_say_what_happened(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, _ = services
    address = sequencer.address

    missing = ops("entity", "shipment", "SHP-NOBODY", address=address)
    assert missing.returncode == cli.EXIT_NOT_FOUND
    assert missing.stderr.startswith("entity: GetEntity failed: NOT_FOUND ENTITY_NOT_FOUND")
    assert ops("status", str(uuid.uuid4()), address=address).returncode == cli.EXIT_NOT_FOUND

    # Usage: argparse (2) and checks after parsing (2), nothing sent.
    assert ops("skip", "shipment", "SHP-1", address=address).returncode == cli.EXIT_USAGE
    assert ops("entity", "truck", "T-1", address=address).returncode == cli.EXIT_USAGE
    assert ops("status", address=address).returncode == cli.EXIT_USAGE
    assert ops("parked", "shipment", address=address).returncode == cli.EXIT_USAGE
    bad_env = ops("gaps", address=address, env={"LOGISTICS_TLS_CERT": "c.pem"})
    assert bad_env.returncode == cli.EXIT_USAGE and "LOGISTICS_TLS_KEY" in bad_env.stderr

    # Nothing listens on port 1: unavailable, within the call's deadline.
    down = ops("gaps", "--timeout", "2", "--sequencer", "127.0.0.1:1", address=address)
    assert down.returncode == cli.EXIT_UNAVAILABLE
    assert down.stderr.startswith("gaps: cannot reach the sequencer at 127.0.0.1:1 (UNAVAILABLE)")


COMMANDS = {
    "blocked": ["blocked"],
    "retry": ["retry", "shipment", "SHP-1", "1", "--reason", "ledger fixed"],
    "webhooks list": ["webhooks", "list"],
    "webhooks create": ["webhooks", "create", "http://127.0.0.1:9/hook", "--state", "applied"],
    "webhooks delete": ["webhooks", "delete", "sub-1"],
    "webhooks deliveries": ["webhooks", "deliveries", "sub-1"],
    "webhooks redeliver": ["webhooks", "redeliver", "d-1"],
    "gaps": ["gaps"],
    "entity": ["entity", "shipment", "SHP-1"],
}


@pytest.fixture
def bare_server() -> Iterator[str]:
    """A real gRPC server that serves none of the sequencer's services (as a server older than
    the CLI lacks its newer RPCs): every call answers UNIMPLEMENTED."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_rpc_the_server_lacks_is_exit_6_with_a_line_that_says_so(bare_server: str, name: str) -> None:
    result = ops(*COMMANDS[name], address=bare_server)
    assert result.returncode == cli.EXIT_UNIMPLEMENTED, result.stderr
    assert result.stderr == (
        f"{name}: the sequencer at {bare_server} does not implement {cli.RPCS[name]} "
        "(UNIMPLEMENTED): it is older than this CLI\n"
    )


def test_blocked_and_retry_as_the_server_answers_them(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, _ = services
    address = sequencer.address
    answer = direct(address, "ListBlockedEvents", sequencer_pb2.ListBlockedEventsRequest(page_size=cli.PAGE_SIZE))
    if isinstance(answer, grpc.RpcError):
        same_failure(ops("blocked", address=address), answer)
        same_failure(ops("blocked", "--json", address=address), answer)
    else:
        expected = {"blockedEvents": [json_format.MessageToDict(s) for s in answer.blocked_events]}
        assert ok_json("blocked", address=address) == expected

    shipment = f"SHP-CLI-{uuid.uuid4().hex[:8]}"
    submit(address, shipment, 1, "shipment_created")
    request = sequencer_pb2.RetryBlockedEventRequest(
        entity=events_pb2.EntityRef(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id=shipment),
        sequence=1,
        reason="probe",
        request_id=str(uuid.uuid4()),
    )
    answer = direct(address, "RetryBlockedEvent", request)
    retry = ops("retry", "shipment", shipment, "1", "--reason", "ledger fixed", address=address)
    # MSI 1 is not blocked: a server that implements the RPC refuses it, as the CLI must.
    assert isinstance(answer, grpc.RpcError), answer
    same_failure(retry, answer)


def test_webhooks_as_the_server_answers_them(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, _ = services
    address = sequencer.address
    answer = direct(address, "ListWebhookSubscriptions", sequencer_pb2.ListWebhookSubscriptionsRequest())
    if isinstance(answer, grpc.RpcError):
        same_failure(ops("webhooks", "list", address=address), answer)
        created = direct(
            address,
            "CreateWebhookSubscription",
            sequencer_pb2.CreateWebhookSubscriptionRequest(url="http://127.0.0.1:9/hook", request_id=str(uuid.uuid4())),
        )
        assert isinstance(created, grpc.RpcError)
        same_failure(ops("webhooks", "create", "http://127.0.0.1:9/hook", address=address), created)
        return
    before = ok_json("webhooks", "list", address=address)["subscriptions"]
    created = ok_json(
        "webhooks", "create", "http://127.0.0.1:9/hook", "--state", "applied", "--description", "cli", address=address
    )["subscription"]
    assert created["secret"].startswith("whsec_") and created["state"] == "WEBHOOK_SUBSCRIPTION_STATE_ACTIVE"
    assert created["states"] == ["EVENT_STATE_APPLIED"]
    listed = ok_json("webhooks", "list", address=address)["subscriptions"]
    assert [s["id"] for s in listed] == [*(s["id"] for s in before), created["id"]]
    assert ok_json("webhooks", "deliveries", created["id"], address=address)["deliveries"] == []
    assert ops("webhooks", "delete", created["id"], address=address).returncode == 0
    assert created["id"] not in [s["id"] for s in ok_json("webhooks", "list", address=address)["subscriptions"]]
    assert ops("webhooks", "redeliver", str(uuid.uuid4()), address=address).returncode == cli.EXIT_NOT_FOUND


def test_progress_goes_to_a_terminal_only(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, _ = services
    address = sequencer.address
    shipment = f"SHP-CLI-{uuid.uuid4().hex[:8]}"
    submit(address, shipment, 2, "shipment_picked")

    # stderr into a pipe: nothing but the table on stdout.
    piped = ops("gaps", address=address)
    assert piped.returncode == 0 and piped.stderr == ""

    # stderr on a terminal (a real pty): the count, and stdout unchanged.
    controller, terminal = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOGISTICS_")}
    environ.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops", "gaps", "--sequencer", address],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    stdout, _ = proc.communicate(timeout=TIMEOUT)
    seen = b""
    deadline = time.monotonic() + POLL_DEADLINE
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break  # the other side closed
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert proc.returncode == 0
    # The same table (the AGE column moves on between the two runs).
    assert [line.split()[:3] for line in stdout.splitlines()] == [
        line.split()[:3] for line in piped.stdout.splitlines()
    ]
    assert "gaps: 1, done" in seen.decode()


@pytest.fixture
def secured(database_url: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, str]]:
    """A sequencer that requires credentials: an admin token and a submitter token."""
    identities = tmp_path / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {"caller": "ops", "roles": ["admin"], "token_sha256": hashlib.sha256(b"admin-token").hexdigest()},
                    {"caller": "wms", "roles": ["submitter"], "token_sha256": hashlib.sha256(b"wms-token").hexdigest()},
                ]
            }
        )
    )
    ledger = start_ledger(database_url)
    try:
        sequencer = start_sequencer(database_url, ledger.port, SEQUENCER_IDENTITIES_FILE=str(identities))
        try:
            yield sequencer, "admin-token"
        finally:
            sequencer.terminate()
    finally:
        ledger.terminate()


def test_credentials_come_from_the_environment(secured: tuple[ServiceProcess, str], tmp_path: Path) -> None:
    sequencer, token = secured
    address = sequencer.address
    anonymous = ops("gaps", address=address)
    assert anonymous.returncode == cli.EXIT_ACCESS
    assert "UNAUTHENTICATED" in anonymous.stderr
    not_admin = ops("gaps", address=address, env={"LOGISTICS_TOKEN": "wms-token"})
    assert not_admin.returncode == cli.EXIT_ACCESS and "PERMISSION_DENIED" in not_admin.stderr
    assert ok_json("gaps", address=address, env={"LOGISTICS_TOKEN": token}) == {"gaps": []}
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    assert ok_json("gaps", address=address, env={"LOGISTICS_TOKEN_FILE": str(token_file)}) == {"gaps": []}


@pytest.fixture
def blocking(database_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """A sequencer that blocks an event after its first refused forwarding attempt."""
    ledger = start_ledger(database_url)
    try:
        sequencer = start_sequencer(database_url, ledger.port, SEQUENCER_BLOCK_AFTER="1")
        try:
            yield sequencer, ledger
        finally:
            sequencer.terminate()
    finally:
        ledger.terminate()


def poll_state(address: str, transaction_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + POLL_DEADLINE
    while True:
        status: dict[str, Any] = ok_json("status", transaction_id, address=address)["status"]
        if status["state"] == state or time.monotonic() > deadline:
            assert status["state"] == state, status
            return status
        time.sleep(0.2)


def test_a_blocked_event_is_listed_retried_and_skipped(blocking: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, ledger = blocking
    address = sequencer.address
    sku = f"SKU-CLI-{uuid.uuid4().hex[:8]}"
    # The ledger holds another payload at MSI 1 (applied directly: development mode allows it).
    with grpc.insecure_channel(ledger.address) as channel:
        ledger_pb2_grpc.LedgerServiceStub(channel).ApplyEvent(
            ledger_pb2.ApplyEventRequest(
                event=inventory_event(sku, 1, "inventory_received", location="DOCK", quantity=7),
                transaction_id=str(uuid.uuid4()),
            ),
            timeout=10,
        )
        with grpc.insecure_channel(address) as seq:
            accepted = sequencer_pb2_grpc.SequencerServiceStub(seq).SubmitEvent(
                sequencer_pb2.SubmitEventRequest(
                    event=inventory_event(sku, 1, "inventory_received", location="DOCK", quantity=1)
                ),
                metadata=(("idempotency-key", f"cli-{sku}-1"),),
                timeout=10,
            )
    blocked = poll_state(address, accepted.transaction_id, "EVENT_STATE_BLOCKED")
    assert blocked["reason"] == "SEQUENCE_CONFLICT" and blocked["ledgerCode"] == "FAILED_PRECONDITION"

    listed = ok_json("blocked", address=address)["blockedEvents"]
    assert [(b["transactionId"], b["reason"]) for b in listed] == [(accepted.transaction_id, "SEQUENCE_CONFLICT")]
    table = ops("blocked", address=address)
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["ENTITY", "MSI", "LEDGER"]
    assert [row.split()[:4] for row in rows] == [
        [f"inventory_item/{sku}", "1", "FAILED_PRECONDITION", "SEQUENCE_CONFLICT"]
    ]
    entity = ok_json("entity", "inventory", sku, address=address)["entity"]
    assert entity["blockedSequence"] == "1" and entity["blockedReason"] == "SEQUENCE_CONFLICT"

    # Retry: QUEUED again, refused again, BLOCKED again (the ledger still holds its own MSI 1).
    retried = ok_json("retry", "inventory", sku, "1", "--reason", "one more try, OPS-11", address=address)
    assert retried["status"]["transactionId"] == accepted.transaction_id
    assert retried["status"]["state"] in ("EVENT_STATE_QUEUED", "EVENT_STATE_BLOCKED")
    poll_state(address, accepted.transaction_id, "EVENT_STATE_BLOCKED")

    # Skip the blocked MSI: the entity moves on; nothing is listed as blocked any more.
    skipped = ops("skip", "inventory", sku, "1", "--reason", "the ledger holds its own MSI 1", address=address)
    assert skipped.returncode == 0, skipped.stderr
    poll_state(address, accepted.transaction_id, "EVENT_STATE_SKIPPED")
    assert ok_json("blocked", address=address) == {"blockedEvents": []}
    assert ops("blocked", address=address).stdout == "(none)\n"


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append({"id": self.headers["webhook-id"], "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP receiver on loopback (development mode allows loopback targets)."""
    received: list[dict[str, Any]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def test_a_webhook_is_delivered_listed_and_redelivered(
    services: tuple[ServiceProcess, ServiceProcess], receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    sequencer, _ = services
    address = sequencer.address
    url, received = receiver
    created = ok_json("webhooks", "create", url, "--state", "applied", "--key", "cli-hook-1", address=address)
    subscription = created["subscription"]
    shipment = f"SHP-HOOK-{uuid.uuid4().hex[:8]}"
    accepted = submit(address, shipment, 1, "shipment_created")
    poll_state(address, accepted.transaction_id, "EVENT_STATE_APPLIED")

    deadline = time.monotonic() + POLL_DEADLINE
    deliveries: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        deliveries = ok_json("webhooks", "deliveries", subscription["id"], address=address)["deliveries"]
        if deliveries and deliveries[0]["state"] == "WEBHOOK_DELIVERY_STATE_DELIVERED":
            break
        time.sleep(0.2)
    assert [(d["transactionId"], d["state"], d["lastHttpStatus"]) for d in deliveries] == [
        (accepted.transaction_id, "WEBHOOK_DELIVERY_STATE_DELIVERED", 204)
    ]
    assert [r["id"] for r in received] == [deliveries[0]["id"]]
    table = ops("webhooks", "deliveries", subscription["id"], address=address)
    assert table.returncode == 0 and "DELIVERED" in table.stdout and f"shipment/{shipment}" in table.stdout

    # Redeliver: the same delivery (same webhook-id) goes out again.
    again = ok_json("webhooks", "redeliver", deliveries[0]["id"], address=address)["delivery"]
    assert again["id"] == deliveries[0]["id"]
    deadline = time.monotonic() + POLL_DEADLINE
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r["id"] for r in received] == [deliveries[0]["id"]] * 2
    # The key makes `create` repeatable: the same command replays, no second subscription.
    replay = ok_json("webhooks", "create", url, "--state", "applied", "--key", "cli-hook-1", address=address)
    assert replay["subscription"]["id"] == subscription["id"]
