"""Helpers for tests of the HTTP/JSON listener: a real HTTP client against real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import uuid
from typing import Any

import aiohttp
from google.protobuf import json_format
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from logistics.ledger.v1 import ledger_pb2
from tests.support import System, inventory_event, sequencer_test_settings, shipment_event

PROBLEM = "application/problem+json"


@dataclasses.dataclass
class Http:
    system: System
    session: aiohttp.ClientSession
    base: str
    registry: CollectorRegistry

    async def request(
        self, method: str, path: str, *, body: Any = None, raw: bytes | None = None, **headers: str
    ) -> tuple[int, CIMultiDict[str], Any]:
        """One request; the answer's status, headers and JSON body (every answer is JSON)."""
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        payload = io.BytesIO(data) if data is not None and len(data) > 1024 * 1024 else data
        async with self.session.request(method, self.base + path, data=payload, headers=sent) as answer:
            text = await answer.read()
            kind = answer.headers.get("Content-Type", "")
            assert kind.startswith(("application/json", PROBLEM)), (answer.status, kind, text[:200])
            if answer.status >= 400:
                assert kind.startswith(PROBLEM), (answer.status, text[:200])
            return answer.status, CIMultiDict(answer.headers), json.loads(text)

    async def raw_post(self, path: str, body: Any, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
        """A POST whose answer body is kept as bytes (to compare replays byte for byte)."""
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        async with self.session.post(self.base + path, json=body, headers=sent) as answer:
            return answer.status, CIMultiDict(answer.headers), await answer.read()


def event_json(entity_id: str, sequence: int, kind: str = "shipment_created", **payload: Any) -> dict[str, Any]:
    event = shipment_event(entity_id, sequence, kind, **payload)
    return {"event": json_format.MessageToDict(event)}


def assert_problem(status: int, body: dict[str, Any], expected_status: int, reason: str) -> None:
    assert status == expected_status, body
    assert body["status"] == expected_status and body["reason"] == reason, body
    assert body["type"].endswith(reason) and body["title"] and isinstance(body["detail"], str), body
    assert isinstance(body["metadata"], dict), body
    assert "Traceback" not in json.dumps(body)


async def start_http(database_url: str, **overrides: Any) -> Http:
    registry = CollectorRegistry()
    settings = dataclasses.replace(sequencer_test_settings(database_url), **overrides)
    system = await System.start(database_url, settings, registry=registry)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    return Http(system, session, f"http://127.0.0.1:{system.sequencer_app.http_port}", registry)


async def block_an_event(api: Http, sku: str) -> dict[str, Any]:
    """A BLOCKED event (SPEC 11): the ledger already holds another MSI 1 of this SKU (applied
    straight at the ledger, as development mode allows), then MSI 1 comes over HTTP. Needs a
    sequencer with a small SEQUENCER_BLOCK_AFTER. Returns the submit answer."""
    direct = inventory_event(sku, 1, "inventory_received", location="DOCK", quantity=7)
    await api.system.ledger.ApplyEvent(
        ledger_pb2.ApplyEventRequest(event=direct, transaction_id=str(uuid.uuid4())), timeout=5
    )
    body = {
        "event": json_format.MessageToDict(inventory_event(sku, 1, "inventory_received", location="DOCK", quantity=1))
    }
    status, _, accepted = await api.request("POST", "/v1/events", body=body, Idempotency_Key=f"{sku}-1")
    assert status == 202, accepted
    for _ in range(300):
        _, _, read = await api.request("GET", f"/v1/transactions/{accepted['transactionId']}")
        if read["status"]["state"] == "EVENT_STATE_BLOCKED":
            return dict(accepted)
        await asyncio.sleep(0.1)
    raise AssertionError(f"never blocked: {read}")
