"""The HTTP layer's pure parts: templates, matching, request building, Prefer, entity types."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.http.problems import Problem
from sequencer.http.routes import build_request, compile_template, enum_value, load_routes, match
from sequencer.http.transcoder import MAX_WAIT, prefer_wait

ROUTES = load_routes()


def test_templates_compile_to_one_segment_variables_and_a_verb() -> None:
    pattern, variables = compile_template(
        "/v1/entities/{entity.entity_type}/{entity.entity_id}/sequences/{sequence}:skip"
    )
    assert variables == ("entity.entity_type", "entity.entity_id", "sequence")
    found = pattern.fullmatch("/v1/entities/shipment/SHP%2F1/sequences/3:skip")
    assert found is not None and found.group("v1") == "SHP%2F1"
    assert pattern.fullmatch("/v1/entities/shipment/a/b/sequences/3:skip") is None
    for unsupported in ("/v1/{name=shelves/*}", "/v1/**", "v1/no-slash", "/v1/a b"):
        with pytest.raises(ValueError):
            compile_template(unsupported)


def test_matching_prefers_the_literal_verb_and_decodes_path_values() -> None:
    assert match(ROUTES, "POST", "/v1/events:batch").route.rpc.name == "SubmitEvents"
    assert match(ROUTES, "POST", "/v1/events").route.rpc.name == "SubmitEvent"
    found = match(ROUTES, "GET", "/v1/entities/inventory-item/SKU%2F7/history")
    assert found.route.rpc.name == "ListEntityHistory"
    assert found.params == {"entity.entity_type": "inventory-item", "entity.entity_id": "SKU/7"}
    with pytest.raises(Problem) as not_allowed:
        match(ROUTES, "PUT", "/v1/events")
    assert (not_allowed.value.status, not_allowed.value.headers["Allow"]) == (405, "POST")
    with pytest.raises(Problem) as missing:
        match(ROUTES, "GET", "/v2/events")
    assert (missing.value.status, missing.value.reason) == (404, "ROUTE_NOT_FOUND")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ENTITY_TYPE_SHIPMENT", "ENTITY_TYPE_SHIPMENT"),
        ("shipment", "ENTITY_TYPE_SHIPMENT"),
        ("Shipment", "ENTITY_TYPE_SHIPMENT"),
        ("inventory-item", "ENTITY_TYPE_INVENTORY_ITEM"),
        ("INVENTORY_ITEM", "ENTITY_TYPE_INVENTORY_ITEM"),
        ("2", "2"),
        ("pallet", "pallet"),
    ],
)
def test_entity_types_by_name_short_name_or_number(text: str, expected: str) -> None:
    assert enum_value(events_pb2.EntityType.DESCRIPTOR, text) == expected


def test_requests_from_path_query_and_body() -> None:
    skip = match(ROUTES, "POST", "/v1/entities/shipment/SHP-1/sequences/4:skip")
    request = build_request(skip.route, skip.params, [], b'{"reason": "lost", "requestId": "k-1"}')
    assert request == sequencer_pb2.SkipSequenceRequest(
        entity=events_pb2.EntityRef(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="SHP-1"),
        sequence=4,
        reason="lost",
        request_id="k-1",
    )
    same = build_request(skip.route, skip.params, [], b'{"reason": "lost", "sequence": 4}')
    assert same.sequence == 4
    with pytest.raises(Problem, match="differs"):
        build_request(skip.route, skip.params, [], b'{"reason": "lost", "sequence": "5"}')
    with pytest.raises(Problem, match="in the body"):
        build_request(skip.route, skip.params, [("reason", "x")], b"{}")
    parked = match(ROUTES, "GET", "/v1/parked-events")
    request = build_request(
        parked.route,
        {},
        [("entity.entity_type", "inventory-item"), ("entity.entity_id", "SKU-1"), ("page_size", "5")],
        b"",
    )
    assert (request.entity.entity_type, request.entity.entity_id, request.page_size) == (2, "SKU-1", 5)
    for query in ([("page_size", "1"), ("page_size", "2")], [("entity", "x")], [("nope", "1")]):
        with pytest.raises(Problem) as refused:
            build_request(parked.route, {}, query, b"")
        assert refused.value.status == 400


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([], None),
        (["wait=5"], 5),
        (["respond-async, wait=10"], 10),
        (["wait=10; foo=bar"], 10),
        (["handling=lenient", "WAIT = 3"], 3),
        (["wait=100000"], MAX_WAIT),
        (["wait=-1"], None),
        (["wait=soon"], None),
    ],
)
def test_prefer_wait(headers: list[str], expected: int | None) -> None:
    assert prefer_wait(headers) == expected


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["event", "entityType", "entity_id", "sequence", "requestId", "waitForTerminal", "reason", "requests", "x"]
)


@settings(max_examples=300, deadline=None)
@given(
    route_index=st.integers(min_value=0, max_value=len(ROUTES) - 1),
    body=st.one_of(_json, st.dictionaries(_field_names, _json, max_size=4)),
    query=st.lists(st.tuples(_field_names, st.text(max_size=6)), max_size=3),
    path_value=st.text(min_size=1, max_size=6),
)
def test_any_input_builds_a_request_or_is_a_400_never_anything_else(
    route_index: int, body: object, query: list[tuple[str, str]], path_value: str
) -> None:
    route = ROUTES[route_index]
    params = {variable: path_value for variable in route.variables}
    raw = json.dumps(body).encode()
    try:
        request = build_request(route, params, query if not route.body else [], raw if route.body else b"")
    except Problem as problem:
        assert problem.status == 400 and problem.reason == "MALFORMED_REQUEST", problem.detail
    else:
        assert isinstance(request, route.request_class)
