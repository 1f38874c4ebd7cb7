"""The operator recipes of docs/operator-recipes.md, run verbatim against real services.

Every ```sh block of the document is a `buf curl` command (over server reflection) against the
default ports; this test substitutes the ports of a real ledger and sequencer started as
subprocesses, runs the blocks in document order with bash, and checks their JSON answers. So the
documented lines are the tested lines. Each block is followed by the same call in grpcurl syntax
(run with grpcurl 1.8.6 by tests/acceptance/test_docs_run.py); the pairing is checked here.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.rpc import error_details_pb2

from tests.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
RECIPES_MD = ROOT / "docs" / "operator-recipes.md"
SEQUENCER_DEFAULT = "127.0.0.1:50051"
LEDGER_DEFAULT = "127.0.0.1:50052"
COMMAND_TIMEOUT = 30.0
POLL_DEADLINE = 15.0

EXPECTED_RECIPES = [
    "list-services-sequencer",
    "list-services-sequencer-v1alpha",
    "list-services-ledger",
    "health-sequencer",
    "health-ledger",
    "submit-event",
    "event-status",
    "submit-without-key",
    "submit-out-of-order",
    "list-gaps",
    "list-parked",
    "skip-sequence",
    "event-status-released",
    "get-entity",
    "get-shipment",
    "entity-history",
    "submit-events",
]
SEQUENCER_SERVICES = {
    "logistics.sequencer.v1.SequencerService",
    "logistics.sequencer.v1.SequencerAdminService",
    "grpc.health.v1.Health",
}
SHIPMENT = {"entityType": "ENTITY_TYPE_SHIPMENT", "entityId": "SHP-1001"}

_BLOCK = re.compile(r"^```([A-Za-z0-9_-]+)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_NAME = re.compile(r"^# recipe: ([a-z0-9-]+)\n")


@dataclass(frozen=True)
class Recipe:
    name: str
    command: str
    grpcurl: str


def load_recipes() -> dict[str, Recipe]:
    blocks = [(m.group(1), m.group(2)) for m in _BLOCK.finditer(RECIPES_MD.read_text(encoding="utf-8"))]
    recipes: dict[str, Recipe] = {}
    for i, (lang, body) in enumerate(blocks):
        if lang != "sh":
            continue
        match = _NAME.match(body)
        assert match, f"a sh block without a '# recipe: <name>' first line:\n{body}"
        name = match.group(1)
        assert name not in recipes, f"recipe {name} appears twice"
        assert i + 1 < len(blocks) and blocks[i + 1][0] == "grpcurl", f"recipe {name} has no grpcurl block after it"
        recipes[name] = Recipe(name, body[match.end() :].strip(), blocks[i + 1][1].strip())
    return recipes


def _words(command: str) -> list[str]:
    return shlex.split(command.replace("\\\n", " "))


def _option_values(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == flag]


def test_every_recipe_is_documented_for_buf_curl_and_grpcurl() -> None:
    recipes = load_recipes()
    assert list(recipes) == EXPECTED_RECIPES
    for recipe in recipes.values():
        words = _words(recipe.command)
        assert words[:7] == [
            "npx",
            "--no-install",
            "buf",
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
        ], recipe.name
        target = words[-1]
        assert target.startswith((f"http://{SEQUENCER_DEFAULT}", f"http://{LEDGER_DEFAULT}")), recipe.name
        g = _words(recipe.grpcurl)
        assert g[:2] == ["grpcurl", "-plaintext"], recipe.name
        host = target.removeprefix("http://").split("/", 1)[0]
        assert host in g, f"{recipe.name}: grpcurl talks to another address"
        if "--list-services" in words:
            assert g[-1] == "list", recipe.name
            continue
        method = target.split("/", 3)[3]
        assert g[-1] == method, f"{recipe.name}: grpcurl calls {g[-1]}, buf curl calls {method}"
        # The same headers and the same request body in both syntaxes.
        assert _option_values(g, "-H") == _option_values(words, "-H"), recipe.name
        bodies = [json.loads(b) for b in _option_values(words, "-d")]
        assert [json.loads(b) for b in _option_values(g, "-d")] == bodies, recipe.name


class Runner:
    def __init__(self, sequencer: ServiceProcess, ledger: ServiceProcess) -> None:
        self.sequencer = sequencer
        self.ledger = ledger

    def localise(self, command: str) -> str:
        assert SEQUENCER_DEFAULT in command or LEDGER_DEFAULT in command, command
        return command.replace(SEQUENCER_DEFAULT, self.sequencer.address).replace(LEDGER_DEFAULT, self.ledger.address)

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", self.localise(command)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def ok(self, command: str) -> str:
        result = self.run(command)
        assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def json(self, command: str) -> dict[str, Any]:
        answer = json.loads(self.ok(command))
        assert isinstance(answer, dict)
        return answer

    def poll(self, command: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Runs a read-only recipe until its answer satisfies `done` (bounded, not a timing check)."""
        deadline = time.monotonic() + POLL_DEADLINE
        while True:
            answer = self.json(command)
            if done(answer):
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"never reached the expected answer; last: {answer}")
            time.sleep(0.1)


def _services(listing: str) -> set[str]:
    return {line.strip() for line in listing.splitlines() if line.strip()}


def _error_json(stderr: str) -> dict[str, Any]:
    """buf curl prints a failed call's status as a JSON object on stderr (npm may add warnings)."""
    start = stderr.index("{")
    error, _ = json.JSONDecoder().raw_decode(stderr[start:])
    assert isinstance(error, dict)
    return error


def _error_reasons(error: dict[str, Any]) -> list[str]:
    reasons = []
    for detail in error.get("details", []):
        if detail.get("type") == "google.rpc.ErrorInfo":
            value = detail["value"]
            info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
            reasons.append(info.reason)
    return reasons


def test_operator_recipes_against_running_services(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    run = Runner(*services)
    r = load_recipes()

    # Discovery over both reflection protocols.
    assert _services(run.ok(r["list-services-sequencer"].command)) >= SEQUENCER_SERVICES
    assert _services(run.ok(r["list-services-sequencer-v1alpha"].command)) >= SEQUENCER_SERVICES
    ledger_listing = r["list-services-ledger"].command
    for protocol in ("grpc-v1", "grpc-v1alpha"):
        listing = ledger_listing.replace("--list-services", f"--reflect-protocol {protocol} --list-services")
        assert {"logistics.ledger.v1.LedgerService", "grpc.health.v1.Health"} <= _services(run.ok(listing))

    assert run.json(r["health-sequencer"].command) == {"status": "SERVING"}
    assert run.json(r["health-ledger"].command) == {"status": "SERVING"}

    # Submit MSI 1 and follow it to APPLIED.
    submitted = run.json(r["submit-event"].command)
    assert submitted["state"] == "EVENT_STATE_QUEUED"
    assert submitted["transactionId"]
    status = run.poll(r["event-status"].command, lambda a: a["status"]["state"] == "EVENT_STATE_APPLIED")["status"]
    assert status["transactionId"] == submitted["transactionId"]
    assert status["entity"] == SHIPMENT
    assert status["sequence"] == "1"
    assert status["entityVersion"] == "1"
    assert status["idempotencyKey"] == "ops-SHP-1001-1"

    # The same submission again is a replay of the stored answer, not a second execution.
    assert run.json(r["submit-event"].command) == submitted

    # No key: refused with INVALID_ARGUMENT / IDEMPOTENCY_KEY_MISSING, and nothing stored.
    refused = run.run(r["submit-without-key"].command)
    assert refused.returncode != 0
    error = _error_json(refused.stderr)
    assert error["code"] == "invalid_argument"
    assert _error_reasons(error) == ["IDEMPOTENCY_KEY_MISSING"]

    # MSI 3 before MSI 2: parked, and the gap is listed.
    parked = run.json(r["submit-out-of-order"].command)
    assert parked["state"] == "EVENT_STATE_PARKED"
    assert parked["awaitingSequence"] == "2"
    gaps = run.json(r["list-gaps"].command)["gaps"]
    assert [(g["entity"], g["awaitingSequence"], g["parkedCount"]) for g in gaps] == [(SHIPMENT, "2", 1)]
    held = run.json(r["list-parked"].command)["parkedEvents"]
    assert [(p["transactionId"], p["event"]["sequence"]) for p in held] == [(parked["transactionId"], "3")]

    # Skip MSI 2 (audited): MSI 3 is released and applied, the gap is gone.
    skipped = run.json(r["skip-sequence"].command)
    assert skipped["status"]["sequence"] == "2"
    assert skipped["status"]["reason"] == "MSI 2 lost upstream, ticket OPS-42"
    assert skipped["status"]["idempotencyKey"] == "ops-skip-SHP-1001-2"
    released = run.poll(r["event-status-released"].command, lambda a: a["status"]["state"] == "EVENT_STATE_APPLIED")[
        "status"
    ]
    assert released["transactionId"] == parked["transactionId"]
    assert released["entityVersion"] == "3"
    assert run.json(r["list-gaps"].command).get("gaps", []) == []
    entity = run.json(r["get-entity"].command)["entity"]
    assert entity["entity"] == SHIPMENT
    assert entity["watermark"] == "3"
    assert entity.get("parkedCount", 0) == 0

    # The ledger: MSI 1 applied, MSI 2 skipped (version advanced, state untouched), MSI 3 applied.
    shipment = run.json(r["get-shipment"].command)["shipment"]
    assert shipment["shipmentId"] == "SHP-1001"
    assert shipment["status"] == "SHIPMENT_STATUS_PICKED"
    assert shipment["version"] == "3"
    assert shipment["orderId"] == "ORD-1001"
    history = run.json(r["entity-history"].command)["entries"]
    assert [(e["sequence"], e["outcome"]) for e in history] == [
        ("1", "APPLY_OUTCOME_APPLIED"),
        ("2", "APPLY_OUTCOME_SKIPPED"),
        ("3", "APPLY_OUTCOME_APPLIED"),
    ]

    # A batch: each item answered as SubmitEvent would answer it; the same batch again replays.
    batch = run.json(r["submit-events"].command)["results"]
    assert batch[0]["response"]["state"] == "EVENT_STATE_QUEUED"
    # MSI 2 waits behind MSI 1 (PARKED), unless MSI 1 was already applied when it was decided.
    assert batch[1]["response"]["state"] in ("EVENT_STATE_PARKED", "EVENT_STATE_QUEUED")
    assert not any(item.get("replayed") for item in batch)
    again = run.json(r["submit-events"].command)["results"]
    assert [item["response"] for item in again] == [item["response"] for item in batch]
    assert all(item["replayed"] for item in again)
