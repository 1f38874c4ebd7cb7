"""The HTTP/JSON API of SPEC 13 with a real HTTP client (aiohttp) against real servers.

A ledger and a sequencer run in-process on port 0 (tests.support.System); every request goes
over a loopback TCP socket to the sequencer's HTTP listener, which calls its own gRPC server.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.api import annotations_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from openapi_spec_validator import validate
from sqlalchemy import func, select

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.http import openapi, routes
from sequencer.http.problems import STATUS_BY_CODE, STATUS_BY_REASON, from_rpc_error
from sequencer.http.server import idempotency_key
from sequencer.models import events, idempotency_keys
from tests.http_support import Http, assert_problem, block_an_event, event_json, start_http
from tests.support import shipment_event, trailing

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[Http]:
    api = await start_http(database_url)
    yield api
    await api.session.close()
    await api.system.stop()


async def counts(api: Http) -> tuple[int, int]:
    async with api.system.sequencer_app.engine.connect() as conn:
        held = await conn.scalar(select(func.count()).select_from(events))
        keys = await conn.scalar(select(func.count()).select_from(idempotency_keys))
    return int(held), int(keys)


async def test_submit_answers_202_with_location_then_the_status_route_reads_it(http: Http) -> None:
    status, headers, body = await http.request(
        "POST", "/v1/events", body=event_json("SHP-H1", 1), Idempotency_Key='"h1-1"', X_Correlation_Id="corr-h1"
    )
    assert status == 202, body
    assert body["state"] == "EVENT_STATE_QUEUED" and body["correlationId"] == "corr-h1"
    assert headers["Location"] == f"/v1/transactions/{body['transactionId']}"
    assert headers["X-Correlation-Id"] == "corr-h1"
    assert "Idempotency-Expires-At" in headers and "Idempotency-Replayed" not in headers
    # Prefer: wait on the status route waits until terminal.
    status, headers, read = await http.request("GET", headers["Location"], Prefer="wait=20")
    assert status == 200 and read["status"]["state"] == "EVENT_STATE_APPLIED", read
    assert headers["Preference-Applied"] == "wait=20"
    status, _, read = await http.request("GET", f"/v1/transactions/{body['transactionId']}")
    assert status == 200 and read["status"]["transactionId"] == body["transactionId"]
    assert read["status"]["entity"] == {"entityType": "ENTITY_TYPE_SHIPMENT", "entityId": "SHP-H1"}


async def test_prefer_wait_answers_200_once_terminal(http: Http) -> None:
    status, headers, body = await http.request(
        "POST", "/v1/events", body=event_json("SHP-H2", 1), Idempotency_Key="h2-1", Prefer="respond-async, wait=20"
    )
    assert status == 200 and body["state"] == "EVENT_STATE_APPLIED", body
    assert headers["Preference-Applied"] == "wait=20"
    # A parked event does not become terminal within a short wait: 202.
    status, headers, body = await http.request(
        "POST", "/v1/events", body=event_json("SHP-H2", 3, "shipment_packed"), Idempotency_Key="h2-3", Prefer="wait=1"
    )
    assert status == 202 and body["state"] == "EVENT_STATE_PARKED" and body["awaitingSequence"] == "2", body


async def test_a_replay_answers_the_same_status_and_body_with_replay_headers(http: Http) -> None:
    first = await http.request("POST", "/v1/events", body=event_json("SHP-H3", 1), Idempotency_Key="h3-1")
    again = await http.request("POST", "/v1/events", body=event_json("SHP-H3", 1), Idempotency_Key='"h3-1"')
    assert again[0] == first[0] == 202 and again[2] == first[2]
    assert again[1]["Idempotency-Replayed"] == "true"
    assert again[1]["Idempotency-First-Seen-At"] and again[1]["Idempotency-Expires-At"]
    assert again[1]["Location"] == first[1]["Location"]
    # The same key with another payload: 422, nothing runs.
    before = await counts(http)
    status, _, body = await http.request(
        "POST", "/v1/events", body=event_json("SHP-H3", 1, order_id="OTHER"), Idempotency_Key="h3-1"
    )
    assert_problem(status, body, 422, "IDEMPOTENCY_KEY_REUSED")
    assert await counts(http) == before


async def test_a_key_first_used_over_http_replays_over_grpc(http: Http) -> None:
    status, _, body = await http.request("POST", "/v1/events", body=event_json("SHP-H4", 1), Idempotency_Key="h4-1")
    assert status == 202
    request = sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-H4", 1, "shipment_created"))
    call = http.system.sequencer.SubmitEvent(request, metadata=(("idempotency-key", "h4-1"),), timeout=10)
    reply = await call
    assert (await trailing(call))["idempotency-replayed"] == "true"
    assert routes.render(reply) == json.dumps(body, separators=(",", ":")).encode()
    assert await counts(http) == (1, 1)


async def test_a_key_first_used_over_grpc_replays_over_http(http: Http) -> None:
    request = sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-H5", 1, "shipment_created"))
    call = http.system.sequencer.SubmitEvent(request, metadata=(("idempotency-key", "h5-1"),), timeout=10)
    reply = await call
    status, headers, raw = await http.raw_post("/v1/events", event_json("SHP-H5", 1), Idempotency_Key="h5-1")
    assert status == 202 and headers["Idempotency-Replayed"] == "true"
    assert raw == routes.render(reply)  # byte for byte the stored answer, rendered
    assert await counts(http) == (1, 1)


async def test_fifty_concurrent_posts_with_one_key_execute_once(http: Http) -> None:
    answers = await asyncio.gather(
        *(http.raw_post("/v1/events", event_json("SHP-H6", 1), Idempotency_Key="h6-one") for _ in range(50))
    )
    assert {status for status, _, _ in answers} == {202}
    assert len({raw for _, _, raw in answers}) == 1, "every answer carries the same body"
    replayed = [headers.get("Idempotency-Replayed") == "true" for _, headers, _ in answers]
    assert replayed.count(False) == 1 and replayed.count(True) == 49
    assert await counts(http) == (1, 1)


async def test_ledger_reads_and_entity_paths(http: Http) -> None:
    await http.request("POST", "/v1/events", body=event_json("SHP-H7", 1), Idempotency_Key="h7-1", Prefer="wait=20")
    status, _, body = await http.request("GET", "/v1/shipments/SHP-H7")
    assert (
        status == 200 and body["shipment"]["status"] == "SHIPMENT_STATUS_CREATED" and body["shipment"]["version"] == "1"
    )
    for entity_type in ("ENTITY_TYPE_SHIPMENT", "shipment", "SHIPMENT", "1"):
        status, _, body = await http.request("GET", f"/v1/entities/{entity_type}/SHP-H7/history")
        assert status == 200 and [e["sequence"] for e in body["entries"]] == ["1"], body
        status, _, body = await http.request("GET", f"/v1/entities/{entity_type}/SHP-H7")
        assert status == 200 and body["entity"]["watermark"] == "1", body
    received = {
        "event": {
            "entityType": "ENTITY_TYPE_INVENTORY_ITEM",
            "entityId": "SKU-H7",
            "sequence": "1",
            "inventoryReceived": {"location": "A1", "quantity": "5"},
        }
    }
    status, _, body = await http.request(
        "POST", "/v1/events", body=received, Idempotency_Key="h7-sku", Prefer="wait=20"
    )
    assert status == 200 and body["state"] == "EVENT_STATE_APPLIED", body
    status, _, body = await http.request("GET", "/v1/inventory-items/SKU-H7")
    assert status == 200 and body["item"]["balances"][0]["onHand"] == "5", body
    status, _, body = await http.request("GET", "/v1/entities/inventory-item/SKU-H7/history?page_size=1")
    assert status == 200 and len(body["entries"]) == 1
    status, _, body = await http.request("GET", "/v1/shipments/NOPE")
    assert status == 404 and body["reason"], body
    status, _, body = await http.request("GET", "/v1/entities/pallet/X")
    assert_problem(status, body, 400, "MALFORMED_REQUEST")


async def test_gaps_parked_and_skip(http: Http) -> None:
    status, _, parked = await http.request(
        "POST", "/v1/events", body=event_json("SHP-H8", 2, "shipment_picked"), Idempotency_Key="h8-2"
    )
    assert status == 202 and parked["state"] == "EVENT_STATE_PARKED"
    status, _, body = await http.request("GET", "/v1/gaps?page_size=10")
    assert status == 200
    assert [g["entity"]["entityId"] for g in body["gaps"]] == ["SHP-H8"] and body["gaps"][0]["awaitingSequence"] == "1"
    status, _, body = await http.request("GET", "/v1/parked-events?entity.entity_type=shipment&entity.entity_id=SHP-H8")
    assert status == 200 and [p["transactionId"] for p in body["parkedEvents"]] == [parked["transactionId"]]
    path = "/v1/entities/shipment/SHP-H8/sequences/1:skip"
    status, _, body = await http.request("POST", path, body={"reason": "lost upstream"})
    assert_problem(status, body, 400, "IDEMPOTENCY_KEY_MISSING")
    status, _headers, body = await http.request(
        "POST", path, body={"reason": "lost upstream"}, Idempotency_Key="skip-1"
    )
    assert status == 200 and body["watermark"] and body["status"]["sequence"] in ("1", "2"), body
    again = await http.request("POST", path, body={"reason": "lost upstream"}, Idempotency_Key="skip-1")
    assert again[2] == body and again[1]["Idempotency-Replayed"] == "true"
    # The body may repeat a path field only with the same value.
    status, _, problem = await http.request(
        "POST", path, body={"reason": "x", "sequence": "7"}, Idempotency_Key="skip-2"
    )
    assert_problem(status, problem, 400, "MALFORMED_REQUEST")
    status, _, read = await http.request("GET", f"/v1/transactions/{parked['transactionId']}", Prefer="wait=20")
    assert read["status"]["state"] == "EVENT_STATE_APPLIED", read


async def test_blocked_events_listed_retried_and_skipped(database_url: str) -> None:
    api = await start_http(database_url, block_after=2)
    try:
        accepted = await block_an_event(api, "SKU-HB")
        status, _, listed = await api.request("GET", "/v1/blocked-events")
        assert status == 200 and [b["transactionId"] for b in listed["blockedEvents"]] == [accepted["transactionId"]]
        assert listed["blockedEvents"][0]["reason"] == "SEQUENCE_CONFLICT"
        status, _, entity = await api.request("GET", "/v1/entities/inventory-item/SKU-HB")
        assert entity["entity"]["blockedSequence"] == "1"
        base = "/v1/entities/inventory-item/SKU-HB/sequences"
        status, _, problem = await api.request("POST", f"{base}/2:retry", body={"reason": "x"}, Idempotency_Key="r-2")
        assert_problem(status, problem, 409, "NOT_BLOCKED")
        status, _, retried = await api.request(
            "POST", f"{base}/1:retry", body={"reason": "ledger fixed?"}, Idempotency_Key="r-1"
        )
        assert status == 200 and retried["status"]["state"] == "EVENT_STATE_QUEUED", retried
        again = await api.request("POST", f"{base}/1:retry", body={"reason": "ledger fixed?"}, Idempotency_Key="r-1")
        assert again[2] == retried and again[1]["Idempotency-Replayed"] == "true"
        for _ in range(300):
            _, _, read = await api.request("GET", f"/v1/transactions/{accepted['transactionId']}")
            if read["status"]["state"] == "EVENT_STATE_BLOCKED":
                break
            await asyncio.sleep(0.1)
        status, _, skipped = await api.request(
            "POST", f"{base}/1:skip", body={"reason": "the ledger holds its own MSI 1"}, Idempotency_Key="s-1"
        )
        assert status == 200, skipped
        status, _, final = await api.request("GET", f"/v1/transactions/{accepted['transactionId']}", Prefer="wait=20")
        assert final["status"]["state"] == "EVENT_STATE_SKIPPED"
        status, _, listed = await api.request("GET", "/v1/blocked-events")
        assert listed["blockedEvents"] == []
    finally:
        await api.session.close()
        await api.system.stop()


async def grpc_answer(http: Http, route: routes.Route, request: Any) -> grpc.StatusCode:
    ledger = route.service == routes.LEDGER_SERVICE
    port = http.system.ledger_app.port if ledger else http.system.sequencer_app.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as target:
        rpc = target.unary_unary(
            route.path,
            request_serializer=route.request_class.SerializeToString,
            response_deserializer=route.response_class.FromString,
        )
        try:
            await rpc(request, metadata=(("idempotency-key", "same-as-http"),), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/webhook-subscriptions", None),
        ("POST", "/v1/webhook-subscriptions", {"url": "https://example.invalid/hook"}),
        ("DELETE", "/v1/webhook-subscriptions/nope", None),
        ("GET", "/v1/webhook-subscriptions/nope/deliveries", None),
        ("POST", "/v1/webhook-deliveries/nope:redeliver", {}),
        ("POST", "/v1/entities/shipment/SHP-H9/sequences/1:retry", {"reason": "fixed"}),
        ("POST", "/v1/events:batch", {"requests": [{**event_json("SHP-H9", 1), "requestId": "b-1"}]}),
        ("GET", "/v1/idempotency-records/nope", None),
    ],
)
async def test_every_other_route_answers_what_its_rpc_answers(http: Http, method: str, path: str, body: Any) -> None:
    """Routes of RPCs other branches implement: the HTTP answer is the gRPC answer, mapped (an
    RPC not implemented here yet is UNIMPLEMENTED or, unlisted in the role policy, refused)."""
    found = routes.match(routes.load_routes(), method, path)
    raw = json.dumps(body).encode() if body is not None else b""
    request = routes.build_request(found.route, found.params, [], raw)
    code = await grpc_answer(http, found.route, request)
    status, _, answer = await http.request(method, path, body=body, Idempotency_Key="same-as-http")
    if code == grpc.StatusCode.OK:
        assert status == 200, answer
    else:
        assert status == STATUS_BY_REASON.get(answer["reason"], STATUS_BY_CODE[code]), (code, answer)


async def test_bad_requests_are_problems_never_500(http: Http) -> None:
    good = event_json("SHP-H10", 1)
    cases: list[tuple[str, str, bytes | None, dict[str, str], int, str]] = [
        ("POST", "/v1/events", json.dumps(good).encode(), {}, 400, "IDEMPOTENCY_KEY_MISSING"),
        (
            "POST",
            "/v1/events",
            json.dumps(good).encode(),
            {"Idempotency-Key": '"unterminated'},
            400,
            "IDEMPOTENCY_KEY_INVALID",
        ),
        (
            "POST",
            "/v1/events",
            json.dumps(good).encode(),
            {"Idempotency-Key": "has space"},
            400,
            "IDEMPOTENCY_KEY_INVALID",
        ),
        ("POST", "/v1/events", b"{not json", {"Idempotency-Key": "k"}, 400, "MALFORMED_REQUEST"),
        ("POST", "/v1/events", b"[1, 2]", {"Idempotency-Key": "k"}, 400, "MALFORMED_REQUEST"),
        ("POST", "/v1/events", b'{"event": {"sequence": "abc"}}', {"Idempotency-Key": "k"}, 400, "MALFORMED_REQUEST"),
        ("POST", "/v1/events", b'{"event": {"entityId": 5}}', {"Idempotency-Key": "k"}, 400, "MALFORMED_REQUEST"),
        (
            "POST",
            "/v1/events",
            b'{"event": {"entityType": "PALLET"}}',
            {"Idempotency-Key": "k"},
            400,
            "MALFORMED_REQUEST",
        ),
        ("POST", "/v1/events", b'{"evnt": {}}', {"Idempotency-Key": "k"}, 400, "MALFORMED_REQUEST"),
        ("POST", "/v1/events", b'{"event": ' * 5000, {"Idempotency-Key": "k"}, 400, "MALFORMED_REQUEST"),
        ("POST", "/v1/events", b'{"event": {}}', {"Idempotency-Key": "k"}, 400, "INVALID_EVENT"),
        (
            "POST",
            "/v1/events",
            b"{}",
            {"Idempotency-Key": "k", "Content-Type": "text/plain"},
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        ("POST", "/v1/events", b" " * (5 * 1024 * 1024) + b"{}", {"Idempotency-Key": "k"}, 413, "REQUEST_TOO_LARGE"),
        ("GET", "/v1/nothing-here", None, {}, 404, "ROUTE_NOT_FOUND"),
        ("GET", "/", None, {}, 404, "ROUTE_NOT_FOUND"),
        ("DELETE", "/v1/events", None, {}, 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/v1/gaps?page_size=ten", None, {}, 400, "MALFORMED_REQUEST"),
        ("GET", "/v1/gaps?bogus=1", None, {}, 400, "MALFORMED_REQUEST"),
        ("GET", "/v1/transactions/%FF", None, {}, 400, "MALFORMED_REQUEST"),
        ("GET", "/v1/transactions/nope", None, {}, 400, "INVALID_ARGUMENT"),
        ("GET", f"/v1/transactions/{uuid.uuid4()}", None, {}, 404, "EVENT_NOT_FOUND"),
        ("GET", "/v1/gaps", b"{}", {}, 400, "MALFORMED_REQUEST"),
    ]
    before = await counts(http)
    for method, path, raw, headers, expected, reason in cases:
        status, answer_headers, body = await http.request(method, path, raw=raw, **headers)
        assert_problem(status, body, expected, reason)
        assert answer_headers["X-Correlation-Id"] == body["correlation_id"]
        if expected == 405:
            assert answer_headers["Allow"] == "POST"
    assert await counts(http) == before


async def test_sequence_conflict_is_409(http: Http) -> None:
    await http.request("POST", "/v1/events", body=event_json("SHP-H11", 1), Idempotency_Key="h11-a")
    status, _, body = await http.request(
        "POST", "/v1/events", body=event_json("SHP-H11", 1, order_id="ORD-OTHER"), Idempotency_Key="h11-b"
    )
    assert_problem(status, body, 409, "SEQUENCE_CONFLICT")


async def test_parked_limit_is_429_with_retry_after(database_url: str) -> None:
    api = await start_http(database_url, parked_limit=1)
    try:
        status, _, _ = await api.request(
            "POST", "/v1/events", body=event_json("SHP-H12", 3, "shipment_packed"), Idempotency_Key="h12-3"
        )
        assert status == 202
        status, headers, body = await api.request(
            "POST", "/v1/events", body=event_json("SHP-H12", 4, "shipment_loaded"), Idempotency_Key="h12-4"
        )
        assert_problem(status, body, 429, "PARKED_LIMIT_REACHED")
        assert int(headers["Retry-After"]) >= 1
    finally:
        await api.session.close()
        await api.system.stop()


async def test_an_unreachable_ledger_is_503_and_not_ready(http: Http) -> None:
    status, _, body = await http.request("GET", "/readyz")
    assert status == 200 and body == {"status": "ready", "checks": {"database": "ok", "ledger": "ok"}}
    status, _, body = await http.request("GET", "/healthz")
    assert status == 200
    await http.system.ledger_app.stop(0)
    http.system.ledger_app = None
    status, headers, body = await http.request("GET", "/v1/shipments/SHP-1")
    assert_problem(status, body, 503, "UNAVAILABLE")
    assert headers["Retry-After"] == "1"
    status, headers, body = await http.request("GET", "/readyz")
    assert_problem(status, body, 503, "NOT_READY")
    assert body["metadata"]["database"] == "ok" and body["metadata"]["ledger"].startswith("unreachable")
    status, _, _ = await http.request("GET", "/healthz")
    assert status == 200


def _rpc_error(code: grpc.StatusCode, *details: Any) -> grpc.aio.AioRpcError:
    status = status_pb2.Status(code=code.value[0], message="from the server")
    for detail in details:
        status.details.add().Pack(detail)
    trailing_metadata = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing_metadata, "from the server")


def test_the_status_table_of_spec_13() -> None:
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(2500)
    cases = [
        (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_MISSING", 400, None),
        (grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED", 422, None),
        (grpc.StatusCode.FAILED_PRECONDITION, "SEQUENCE_CONFLICT", 409, None),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", 401, None),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", 403, None),
        (grpc.StatusCode.NOT_FOUND, "ENTITY_NOT_FOUND", 404, None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "CALLER_OVERLOADED", 429, "3"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "BACKLOG_FULL", 429, "3"),
        (grpc.StatusCode.UNAVAILABLE, "TRANSIENT", 503, "3"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", 504, None),
        (grpc.StatusCode.INTERNAL, "INTERNAL", 500, None),
    ]
    for code, reason, expected, retry_after in cases:
        info = error_details_pb2.ErrorInfo(reason=reason, domain="sequencer.logistics", metadata={"k": "v"})
        extra = [retry] if retry_after else []
        problem = from_rpc_error(_rpc_error(code, info, *extra))
        assert (problem.status, problem.reason, problem.metadata) == (expected, reason, {"k": "v"})
        assert problem.headers.get("Retry-After") == retry_after
        if expected == 401:
            assert problem.headers["WWW-Authenticate"].startswith("Bearer")
        if expected == 500:
            assert problem.detail == "internal error"
    # A status without details (the channel's own): from the code alone.
    bare = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "late")
    assert from_rpc_error(bare).status == 504
    assert code_pb2.OK == 0


def test_idempotency_key_header_accepts_the_sf_string_and_the_bare_key() -> None:
    assert idempotency_key(['"abc"']) == "abc"
    assert idempotency_key(["abc"]) == "abc"
    assert idempotency_key(['"a\\"b"']) == 'a"b'
    assert idempotency_key(['  "order-1:v2"  ']) == "order-1:v2"


async def test_the_openapi_document_validates_lists_every_route_and_matches_the_committed_one(http: Http) -> None:
    status, _, served = await http.request("GET", "/openapi.json")
    assert status == 200
    validate(served)
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == committed == openapi.build()
    annotated = set()
    for file in routes.FILES:
        for service in file.services_by_name.values():
            for rpc in service.methods:
                if rpc.GetOptions().HasExtension(annotations_pb2.http):
                    rule = rpc.GetOptions().Extensions[annotations_pb2.http]
                    kind = rule.WhichOneof("pattern")
                    annotated.add((kind, getattr(rule, kind)))
    documented = {(m, p) for p, ops in served["paths"].items() for m in ops}
    assert annotated <= documented
    assert documented - annotated == {("get", "/healthz"), ("get", "/readyz")}


async def test_served_routes_equal_the_annotations(http: Http) -> None:
    """Every annotation (read here from the descriptors, independently of routes.py) is served:
    a request to its path reaches its RPC (the HTTP metric carries its template, the gRPC metric
    its method); a path no annotation names is ROUTE_NOT_FOUND."""
    annotated: list[tuple[str, str, str]] = []
    for file in (sequencer_pb2.DESCRIPTOR, ledger_pb2.DESCRIPTOR, events_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for rpc in service.methods:
                if rpc.GetOptions().HasExtension(annotations_pb2.http):
                    rule = rpc.GetOptions().Extensions[annotations_pb2.http]
                    kind = rule.WhichOneof("pattern")
                    annotated.append((kind.upper(), getattr(rule, kind), f"/{service.full_name}/{rpc.name}"))
    assert len(annotated) == 18
    served = {(r.http_method, r.template) for r in routes.load_routes()}
    assert served == {(m, t) for m, t, _ in annotated}
    for method, template, rpc_path in annotated:
        path = template
        for name in ("entity.entity_type",):
            path = path.replace("{" + name + "}", "shipment")
        for name in ("sequence",):
            path = path.replace("{" + name + "}", "1")
        while "{" in path:
            start, end = path.index("{"), path.index("}")
            path = path[:start] + "x1" + path[end + 1 :]
        status, _, body = await http.request(method, path, raw=b"{}" if method == "POST" else None)
        assert body.get("reason") not in ("ROUTE_NOT_FOUND", "METHOD_NOT_ALLOWED"), (template, body)
        sample = http.registry.get_sample_value(
            "http_server_requests_total", {"method": method, "route": template, "status_code": str(status)}
        )
        assert sample and sample >= 1, (template, status)
        if not rpc_path.startswith("/logistics.ledger"):
            grpc_service, _, grpc_method = rpc_path.lstrip("/").partition("/")
            assert any(
                s.labels.get("grpc_service") == grpc_service
                and s.labels.get("grpc_method") == grpc_method
                and s.value >= 1
                for metric in http.registry.collect()
                if metric.name == "grpc_server_handled"
                for s in metric.samples
                if s.name == "grpc_server_handled_total"
            ), rpc_path
    status, _, body = await http.request("GET", "/v1/events")
    assert_problem(status, body, 405, "METHOD_NOT_ALLOWED")
    status, _, body = await http.request("GET", "/v1/entities/shipment/x/watch")
    assert_problem(status, body, 404, "ROUTE_NOT_FOUND")
    sample = http.registry.get_sample_value(
        "http_server_requests_total", {"method": "GET", "route": "unmatched", "status_code": "404"}
    )
    assert sample == 1
    # The 405 above and this 404: requests no route took are labelled "unmatched", never by path.
    assert (
        http.registry.get_sample_value(
            "http_server_request_duration_seconds_count", {"method": "GET", "route": "unmatched"}
        )
        == 2
    )


async def test_credentials_and_roles_over_http(database_url: str, tmp_path: Path) -> None:
    import hashlib

    from common.auth import SecuritySettings

    tokens = {"wms": ("submitter", "reader"), "bi": ("reader",), "ops": ("admin",)}
    ids = [
        {"caller": c, "roles": list(r), "token_sha256": hashlib.sha256(f"{c}-token".encode()).hexdigest()}
        for c, r in tokens.items()
    ]
    (tmp_path / "ids.json").write_text(json.dumps({"identities": ids}))
    api = await start_http(database_url, security=SecuritySettings(identities_file=str(tmp_path / "ids.json")))
    try:
        body = event_json("SHP-H13", 2, "shipment_picked")
        status, headers, problem = await api.request("POST", "/v1/events", body=body, Idempotency_Key="h13")
        assert_problem(status, problem, 401, "UNAUTHENTICATED")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, problem = await api.request(
            "POST", "/v1/events", body=body, Idempotency_Key="h13", Authorization="Bearer wrong"
        )
        assert_problem(status, problem, 401, "UNAUTHENTICATED")
        status, _, problem = await api.request(
            "POST", "/v1/events", body=body, Idempotency_Key="h13", Authorization="Bearer bi-token"
        )
        assert_problem(status, problem, 403, "PERMISSION_DENIED")
        status, _, accepted = await api.request(
            "POST", "/v1/events", body=body, Idempotency_Key="h13", Authorization="Bearer wms-token"
        )
        assert status == 202
        # The key is the caller's: the same key from another caller is another request.
        call = api.system.sequencer.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-H13", 2, "shipment_picked")),
            metadata=(("idempotency-key", "h13"), ("authorization", "Bearer wms-token")),
            timeout=10,
        )
        assert json.loads(routes.render(await call)) == accepted
        assert (await trailing(call))["idempotency-replayed"] == "true"
        status, _, problem = await api.request("GET", "/v1/gaps", Authorization="Bearer wms-token")
        assert_problem(status, problem, 403, "PERMISSION_DENIED")
        status, _, gaps = await api.request("GET", "/v1/gaps", Authorization="Bearer ops-token")
        assert status == 200 and gaps["gaps"][0]["entity"]["entityId"] == "SHP-H13"
        # Ledger reads need credentials the sequencer accepts, and pass them on.
        status, _, problem = await api.request("GET", "/v1/shipments/SHP-H13")
        assert_problem(status, problem, 401, "UNAUTHENTICATED")
        status, _, problem = await api.request("GET", "/v1/shipments/SHP-H13", Authorization="Bearer bi-token")
        assert status == 404, problem  # the ledger (development mode here) has no such shipment yet
    finally:
        await api.session.close()
        await api.system.stop()


async def test_http_metrics_use_route_templates(http: Http) -> None:
    _status, _, body = await http.request("POST", "/v1/events", body=event_json("SHP-H14", 1), Idempotency_Key="h14")
    await http.request("GET", f"/v1/transactions/{body['transactionId']}")
    assert (
        http.registry.get_sample_value(
            "http_server_requests_total", {"method": "POST", "route": "/v1/events", "status_code": "202"}
        )
        == 1
    )
    assert (
        http.registry.get_sample_value(
            "http_server_requests_total",
            {"method": "GET", "route": "/v1/transactions/{transaction_id}", "status_code": "200"},
        )
        == 1
    )
    names = {s.labels.get("route") for m in http.registry.collect() for s in m.samples if "route" in s.labels}
    assert not any(body["transactionId"] in (n or "") for n in names)
    assert uuid.UUID(body["transactionId"])


async def test_https_with_the_servers_certificate_and_bearer_tokens(database_url: str, tmp_path: Path) -> None:
    """With SEQUENCER_TLS_CERT/KEY the HTTP listener serves HTTPS with the same certificate; the
    local hop to gRPC needs no TLS of its own (a private Unix socket)."""
    import hashlib
    import ssl

    from common.auth import SecuritySettings
    from tests.certs import make_certificates

    certs = make_certificates(tmp_path / "tls", [])
    ids = [{"caller": "wms", "roles": ["submitter", "reader"], "token_sha256": hashlib.sha256(b"t-wms").hexdigest()}]
    (tmp_path / "ids.json").write_text(json.dumps({"identities": ids}))
    security = SecuritySettings(
        identities_file=str(tmp_path / "ids.json"), tls_cert=certs.server.cert, tls_key=certs.server.key
    )
    api = await start_http(database_url, security=security)
    context = ssl.create_default_context(cafile=certs.ca)
    try:
        base = f"https://localhost:{api.system.sequencer_app.http_port}"
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(base + "/healthz") as answer:
                assert answer.status == 200
            headers = {"Idempotency-Key": "tls-1", "Authorization": "Bearer t-wms"}
            async with session.post(base + "/v1/events", json=event_json("SHP-TLS", 1), headers=headers) as answer:
                assert answer.status == 202, await answer.text()
        with pytest.raises(aiohttp.ClientError):
            async with api.session.get(f"http://localhost:{api.system.sequencer_app.http_port}/healthz") as answer:
                await answer.read()
    finally:
        await api.session.close()
        await api.system.stop()


def test_an_exposed_http_listener_needs_tls_and_tokens() -> None:
    from common.settings import ConfigError
    from sequencer.config import Settings

    base = {"DATABASE_URL": "postgresql://u@h/db", "SEQUENCER_HTTP_ADDR": "0.0.0.0:8080"}
    with pytest.raises(ConfigError, match="SEQUENCER_HTTP_ADDR"):
        Settings.from_env(base)
    with pytest.raises(ConfigError, match="SEQUENCER_HTTP_ADDR"):
        Settings.from_env({**base, "SEQUENCER_TLS_CERT": "c.pem", "SEQUENCER_TLS_KEY": "k.pem"})
    assert Settings.from_env({**base, "SEQUENCER_ALLOW_INSECURE": "true"}).http_addr == "0.0.0.0:8080"
    assert Settings.from_env({"DATABASE_URL": "postgresql://u@h/db"}).http_addr == "127.0.0.1:8080"


async def test_one_correlation_id_in_the_http_and_the_grpc_log_lines(
    http: Http, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO)
    status, headers, body = await http.request(
        "POST", "/v1/events", body=event_json("SHP-LOG", 1), Idempotency_Key="log-1", X_Correlation_Id="corr-log-1"
    )
    assert status == 202 and headers["X-Correlation-Id"] == body["correlationId"] == "corr-log-1"
    http_lines = [r for r in caplog.records if r.name == "sequencer.http.server" and r.getMessage() == "http"]

    def submit_lines() -> list[logging.LogRecord]:
        return [
            r for r in caplog.records if r.getMessage() == "rpc" and str(getattr(r, "rpc", "")).endswith("/SubmitEvent")
        ]

    rpc_lines = submit_lines()
    assert [(getattr(r, "route", None), getattr(r, "correlation_id", None)) for r in http_lines] == [
        ("/v1/events", "corr-log-1")
    ]
    assert [getattr(r, "correlation_id", None) for r in rpc_lines] == ["corr-log-1"]
    # Without one, the HTTP layer makes one and both lines carry it.
    caplog.clear()
    _, headers, body = await http.request("POST", "/v1/events", body=event_json("SHP-LOG", 2), Idempotency_Key="log-2")
    generated = headers["X-Correlation-Id"]
    assert generated and body["correlationId"] == generated
    http_lines = [r for r in caplog.records if r.getMessage() == "http"]
    assert {getattr(r, "correlation_id", None) for r in [*http_lines, *submit_lines()]} == {generated}


async def test_a_database_outage_is_503_transient_with_retry_after_and_not_ready(tmp_path: Path) -> None:
    """PostgreSQL stopped (`pg_ctl stop -m immediate`, a crash): writes and reads over HTTP answer
    503 TRANSIENT with Retry-After, never 500; /readyz says the database is unreachable, /healthz
    still answers; once it is back, the same request succeeds."""
    from common.migrate import upgrade
    from tests.cluster import Cluster

    cluster = Cluster()
    try:
        await asyncio.to_thread(cluster.start)
        for service in ("ledger", "sequencer"):
            await asyncio.to_thread(upgrade, ROOT / service / "migrations", cluster.url, service)
        api = await start_http(cluster.url)
        try:
            status, _, _ = await api.request(
                "POST", "/v1/events", body=event_json("OUT-H1", 1), Idempotency_Key="out-1", Prefer="wait=20"
            )
            assert status == 200
            await asyncio.to_thread(cluster.stop)
            for method, path, body, key in [
                ("POST", "/v1/events", event_json("OUT-H1", 2, "shipment_picked"), "out-2"),
                ("GET", "/v1/gaps", None, ""),
                ("GET", "/v1/entities/shipment/OUT-H1", None, ""),
                ("GET", "/v1/shipments/OUT-H1", None, ""),
            ]:
                headers: dict[str, str] = {"Idempotency_Key": key} if key else {}
                status, answer_headers, problem = await api.request(method, path, body=body, **headers)  # type: ignore[arg-type]
                assert_problem(status, problem, 503, "TRANSIENT")
                assert int(answer_headers["Retry-After"]) >= 1
            status, _, problem = await api.request("GET", "/readyz")
            assert_problem(status, problem, 503, "NOT_READY")
            assert problem["metadata"]["database"].startswith("unreachable") and problem["metadata"]["ledger"] == "ok"
            assert (await api.request("GET", "/healthz"))[0] == 200
            await asyncio.to_thread(cluster.start)
            for _ in range(100):
                status, _, after = await api.request(
                    "POST", "/v1/events", body=event_json("OUT-H1", 2, "shipment_picked"), Idempotency_Key="out-2"
                )
                if status != 503:
                    break
                await asyncio.sleep(0.2)
            assert status == 202 and after["state"] in ("EVENT_STATE_QUEUED", "EVENT_STATE_APPLIED"), after
        finally:
            await api.session.close()
            await api.system.stop()
    finally:
        await asyncio.to_thread(cluster.remove)


async def test_a_caller_over_its_in_flight_limit_gets_429_with_retry_after(database_url: str) -> None:
    """SEQUENCER_MAX_INFLIGHT_PER_CALLER (SPEC 12) holds over HTTP too (the same admission, by
    construction): with one slot, a request waiting (`Prefer: wait`) on a parked event holds it,
    and the next request of that caller is 429 CALLER_OVERLOADED, Retry-After from RetryInfo."""
    api = await start_http(database_url, max_inflight_per_caller=1)
    try:
        waiting = asyncio.create_task(
            api.request(
                "POST",
                "/v1/events",
                body=event_json("SHP-FLOW", 2, "shipment_picked"),
                Idempotency_Key="flow-2",
                Prefer="wait=15",
            )
        )
        async with api.system.sequencer_app.engine.connect() as conn:
            for _ in range(200):
                if await conn.scalar(select(func.count()).select_from(events)):
                    break
                await asyncio.sleep(0.05)
        status, headers, problem = await api.request(
            "POST", "/v1/events", body=event_json("SHP-FLOW", 3, "shipment_packed"), Idempotency_Key="flow-3"
        )
        assert_problem(status, problem, 429, "CALLER_OVERLOADED")
        assert int(headers["Retry-After"]) >= 1
        assert not waiting.done(), "the first request still holds its slot"
        waiting.cancel()
    finally:
        await api.session.close()
        await api.system.stop()


async def test_garbage_on_every_route_is_a_4xx_problem_never_500(http: Http) -> None:
    garbage: list[bytes] = [
        b"\xff\xfe\x00garbage",
        b"null",
        b'"a string"',
        b"[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]",
        b'{"event": {"sequence": 1e400}}',
        b'{"requests": [1, 2, 3], "reason": {"nested": true}}',
        b'{"event": {"entityId": "\\u0000"}, "requestId": "\\ud800"}',
        json.dumps({"x" * 300: "y" * 10_000}).encode(),
    ]
    before = await counts(http)
    for route in routes.load_routes():
        path = route.template
        for variable in route.variables:
            path = path.replace("{" + variable + "}", "%E2%82%AC%00")
        for raw in garbage if route.body else []:
            status, _, body = await http.request(route.http_method, path, raw=raw, Idempotency_Key="garbage-1")
            assert 400 <= status < 500, (route.template, raw[:40], body)
        status, _, body = await http.request(route.http_method, path + "?%ZZ=%ZZ&a[]=1", Idempotency_Key="garbage-2")
        assert 400 <= status < 500, (route.template, body)
    assert await counts(http) == before


async def test_a_taken_http_port_fails_the_start_cleanly(http: Http) -> None:
    import dataclasses

    from sequencer.server import build_server

    taken = dataclasses.replace(
        http.system.sequencer_settings, http_addr=f"127.0.0.1:{http.system.sequencer_app.http_port}"
    )
    with pytest.raises(OSError):
        await build_server(taken)
    # The running one is unaffected.
    assert (await http.request("GET", "/healthz"))[0] == 200
