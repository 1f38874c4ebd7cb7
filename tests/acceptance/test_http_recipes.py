"""The curl recipes of docs/http.md, run verbatim against real services.

Every ```sh block of the document is a curl command against the default HTTP address; this test
substitutes the address of a real sequencer (started as a subprocess with its HTTP listener on
port 0, beside a real ledger), runs the blocks in document order with bash, and checks their
answers. So the documented lines are the tested lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from tests.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
HTTP_MD = ROOT / "docs" / "http.md"
HTTP_DEFAULT = "127.0.0.1:8080"
COMMAND_TIMEOUT = 30.0
POLL_DEADLINE = 15.0

EXPECTED_RECIPES = [
    "healthz",
    "readyz",
    "openapi",
    "submit-event",
    "submit-reused-key",
    "submit-without-key",
    "idempotency-record",
    "event-status",
    "submit-out-of-order",
    "list-gaps",
    "list-parked",
    "get-entity",
    "skip-sequence",
    "submit-and-wait",
    "get-shipment",
    "entity-history",
    "submit-batch",
    "get-inventory-item",
    "list-blocked",
    "retry-blocked",
    "create-webhook",
    "list-webhooks",
    "list-webhook-deliveries",
    "redeliver-webhook",
    "delete-webhook",
]
SHIPMENT = {"entityType": "ENTITY_TYPE_SHIPMENT", "entityId": "SHP-2001"}
_BLOCK = re.compile(r"^```([A-Za-z0-9_-]+)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_NAME = re.compile(r"^# recipe: ([a-z0-9-]+)\n")


def load_recipes() -> dict[str, str]:
    recipes: dict[str, str] = {}
    for found in _BLOCK.finditer(HTTP_MD.read_text(encoding="utf-8")):
        lang, body = found.group(1), found.group(2)
        if lang not in ("sh", "bash"):
            continue
        name = _NAME.match(body)
        assert name, f"a sh block without a '# recipe: <name>' first line:\n{body}"
        assert name.group(1) not in recipes, f"recipe {name.group(1)} appears twice"
        recipes[name.group(1)] = body[name.end() :].strip()
    return recipes


class Runner:
    def __init__(self, sequencer: ServiceProcess) -> None:
        assert sequencer.http_port, "the sequencer did not report its HTTP port"
        self.address = f"127.0.0.1:{sequencer.http_port}"

    def run(self, command: str) -> str:
        assert HTTP_DEFAULT in command, command
        done = subprocess.run(
            ["bash", "-c", command.replace(HTTP_DEFAULT, self.address)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def json(self, command: str) -> dict[str, Any]:
        answer = json.loads(self.run(command))
        assert isinstance(answer, dict)
        return answer

    def response(self, command: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        """A `curl -i` recipe's status line, headers (lower-case names) and JSON body."""
        head, _, body = self.run(command).replace("\r\n", "\n").partition("\n\n")
        lines = head.splitlines()
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return status, headers, json.loads(body)

    def poll(self, command: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Runs a read-only recipe until its answer satisfies `done` (bounded, not a timing check)."""
        deadline = time.monotonic() + POLL_DEADLINE
        while True:
            answer = self.json(command)
            if done(answer) or time.monotonic() > deadline:
                return answer
            time.sleep(0.1)


def problem(answer: dict[str, Any], status: int, reason: str) -> None:
    assert answer["status"] == status and answer["reason"] == reason, answer
    assert answer["type"].endswith(reason) and answer["title"] and answer["detail"], answer


def test_every_recipe_is_a_curl_command_on_the_default_address() -> None:
    recipes = load_recipes()
    assert list(recipes) == EXPECTED_RECIPES
    for name, command in recipes.items():
        assert f"http://{HTTP_DEFAULT}/" in command, name
        assert "curl -sS" in command, name


def test_http_recipes_against_running_services(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    run = Runner(services[0])
    r = load_recipes()

    assert run.json(r["healthz"]) == {"status": "alive"}
    assert run.json(r["readyz"]) == {"status": "ready", "checks": {"database": "ok", "ledger": "ok"}}
    document = run.json(r["openapi"])
    validate(document)
    assert json.loads((ROOT / "docs" / "openapi.json").read_text()) == document

    status, headers, submitted = run.response(r["submit-event"])
    assert status == 202 and submitted["state"] == "EVENT_STATE_QUEUED"
    assert headers["location"] == f"/v1/transactions/{submitted['transactionId']}"
    assert "idempotency-expires-at" in headers and "idempotency-replayed" not in headers
    status, headers, again = run.response(r["submit-event"])
    assert status == 202 and again == submitted and headers["idempotency-replayed"] == "true"
    problem(run.json(r["submit-reused-key"]), 422, "IDEMPOTENCY_KEY_REUSED")
    problem(run.json(r["submit-without-key"]), 400, "IDEMPOTENCY_KEY_MISSING")

    record = run.json(r["idempotency-record"])["record"]
    assert record["transactionId"] == submitted["transactionId"] and record["idempotencyKey"] == "http-SHP-2001-1"
    status_answer = run.json(r["event-status"])["status"]
    assert status_answer["state"] == "EVENT_STATE_APPLIED" and status_answer["entityVersion"] == "1"

    parked = run.json(r["submit-out-of-order"])
    assert parked["state"] == "EVENT_STATE_PARKED" and parked["awaitingSequence"] == "2"
    gaps = run.json(r["list-gaps"])["gaps"]
    assert [(g["entity"], g["awaitingSequence"], g["parkedCount"]) for g in gaps] == [(SHIPMENT, "2", 1)]
    held = run.json(r["list-parked"])["parkedEvents"]
    assert [(p["transactionId"], p["event"]["sequence"]) for p in held] == [(parked["transactionId"], "3")]
    entity = run.json(r["get-entity"])["entity"]
    assert entity["watermark"] == "1" and entity["parkedCount"] == 1 and entity["awaitingSequence"] == "2"

    skipped = run.json(r["skip-sequence"])
    assert skipped["status"]["sequence"] == "2" and skipped["status"]["reason"] == "MSI 2 lost upstream, ticket OPS-43"
    entity = run.poll(r["get-entity"], lambda a: a["entity"]["watermark"] == "3")["entity"]
    assert entity["watermark"] == "3" and entity["parkedCount"] == 0
    assert run.json(r["list-gaps"])["gaps"] == []

    status, headers, waited = run.response(r["submit-and-wait"])
    assert status == 200 and waited["state"] == "EVENT_STATE_APPLIED", waited
    assert headers["preference-applied"] == "wait=10"

    shipment = run.json(r["get-shipment"])["shipment"]
    assert (shipment["status"], shipment["version"], shipment["orderId"]) == ("SHIPMENT_STATUS_PACKED", "4", "ORD-2001")
    history = run.json(r["entity-history"])["entries"]
    assert [(e["sequence"], e["outcome"]) for e in history] == [
        ("1", "APPLY_OUTCOME_APPLIED"),
        ("2", "APPLY_OUTCOME_SKIPPED"),
        ("3", "APPLY_OUTCOME_APPLIED"),
        ("4", "APPLY_OUTCOME_APPLIED"),
    ]

    batch = run.json(r["submit-batch"])["results"]
    assert [b["response"]["state"] for b in batch] == ["EVENT_STATE_QUEUED", "EVENT_STATE_PARKED"]
    item = run.poll(r["get-inventory-item"], lambda a: a.get("item", {}).get("version") == "2")["item"]
    assert item["version"] == "2"
    assert [(b["location"], b["onHand"], b["reserved"], b["available"]) for b in item["balances"]] == [
        ("A1", "10", "3", "7")
    ]

    assert run.json(r["list-blocked"]) == {"blockedEvents": [], "nextPageToken": ""}
    problem(run.json(r["retry-blocked"]), 409, "NOT_BLOCKED")
    created = run.json(r["create-webhook"])["subscription"]
    assert created["url"] == "http://127.0.0.1:9/hooks" and created["secret"].startswith("whsec_")
    assert created["state"] == "WEBHOOK_SUBSCRIPTION_STATE_ACTIVE"
    listed = run.json(r["list-webhooks"])["subscriptions"]
    assert [(s["id"], s["secret"]) for s in listed] == [(created["id"], "")]
    assert run.json(r["list-webhook-deliveries"])["deliveries"] == []
    problem(run.json(r["redeliver-webhook"]), 404, "WEBHOOK_DELIVERY_NOT_FOUND")
    assert run.json(r["delete-webhook"]) == {}
    assert run.json(r["list-webhooks"])["subscriptions"] == []
