"""SPEC 8's property: any interleaving, duplication and permutation of entities' events,
submitted concurrently with retries, ends in exactly the state of in-order, exactly-once
application. Real sequencer and ledger servers, real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.domain import SHIPMENT_KINDS, Rejection, ShipmentStatus, next_status
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from tests.support import INVENTORY, SHIPMENT, System, inventory_event, shipment_event

APPLIED, REJECTED = events_pb2.EVENT_STATE_APPLIED, events_pb2.EVENT_STATE_REJECTED
TERMINAL = {APPLIED, REJECTED}


def shipment_oracle(kinds: list[str]) -> tuple[list[int], ShipmentStatus | None]:
    """Outcomes and final status of applying the kinds in MSI order, exactly once."""
    status: ShipmentStatus | None = None
    outcomes: list[int] = []
    for kind in kinds:
        result = next_status(status, kind)
        if isinstance(result, Rejection):
            outcomes.append(REJECTED)
        else:
            outcomes.append(APPLIED)
            status = result
    return outcomes, status


def inventory_oracle(ops: list[tuple[str, int]]) -> tuple[list[int], dict[str, int]]:
    """A minimal model of receive / move A->B / adjust down, for in-order application."""
    on_hand = {"A": 0, "B": 0}
    outcomes: list[int] = []
    for op, quantity in ops:
        if op == "received":
            on_hand["A"] += quantity
        elif on_hand["A"] < quantity:
            outcomes.append(REJECTED)
            continue
        elif op == "moved":
            on_hand["A"] -= quantity
            on_hand["B"] += quantity
        else:
            on_hand["A"] -= quantity
        outcomes.append(APPLIED)
    return outcomes, {k: v for k, v in on_hand.items() if v}


def inventory_events(sku: str, ops: list[tuple[str, int]]) -> list[events_pb2.Event]:
    built = []
    for n, (op, quantity) in enumerate(ops, start=1):
        if op == "received":
            built.append(inventory_event(sku, n, "inventory_received", location="A", quantity=quantity))
        elif op == "moved":
            built.append(
                inventory_event(sku, n, "inventory_moved", from_location="A", to_location="B", quantity=quantity)
            )
        else:
            built.append(inventory_event(sku, n, "inventory_adjusted", location="A", delta=-quantity, reason="count"))
    return built


streams = st.fixed_dictionaries(
    {
        "shipments": st.lists(
            st.lists(st.sampled_from(SHIPMENT_KINDS), min_size=1, max_size=8), min_size=1, max_size=3
        ),
        "inventory": st.lists(
            st.tuples(st.sampled_from(["received", "moved", "adjusted"]), st.integers(1, 5)), min_size=1, max_size=10
        ),
    }
)


@settings(
    # A quick smoke in `make test`; PROPERTY_EXAMPLES=500 for a long run.
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=streams, data=st.data())
async def test_any_interleaving_ends_in_the_in_order_state(system: System, plan: dict[str, Any], data: Any) -> None:
    run = uuid.uuid4().hex[:8]
    expected: dict[tuple[int, str], list[int]] = {}
    events: list[events_pb2.Event] = []
    final_status: dict[str, ShipmentStatus | None] = {}
    for i, kinds in enumerate(plan["shipments"]):
        shipment_id = f"P{run}-{i}"
        events += [shipment_event(shipment_id, n, kind) for n, kind in enumerate(kinds, start=1)]
        expected[(SHIPMENT, shipment_id)], final_status[shipment_id] = shipment_oracle(kinds)
    sku = f"K{run}"
    events += inventory_events(sku, plan["inventory"])
    expected[(INVENTORY, sku)], balances = inventory_oracle(plan["inventory"])

    # Every event once with its own key, plus retries (same key) and duplicates (new key).
    submissions = [(e, f"{e.entity_id}/{e.sequence}") for e in events]
    extra = data.draw(st.lists(st.sampled_from(submissions), max_size=len(submissions)))
    submissions += [(e, key if data.draw(st.booleans()) else f"{key}/dup") for e, key in extra]
    submissions = data.draw(st.permutations(submissions))

    async def submit(event: events_pb2.Event, key: str) -> sequencer_pb2.SubmitEventResponse:
        return await system.submit(event, key)  # type: ignore[no-any-return]

    async def submit_batch(chunk: list[tuple[events_pb2.Event, str]]) -> list[sequencer_pb2.SubmitEventResponse]:
        requests = [sequencer_pb2.SubmitEventRequest(event=e, request_id=k) for e, k in chunk]
        reply = await system.sequencer.SubmitEvents(sequencer_pb2.SubmitEventsRequest(requests=requests), timeout=10)
        assert all(r.WhichOneof("outcome") == "response" for r in reply.results), reply
        return [r.response for r in reply.results]

    # Some runs send everything as SubmitEvent, others in SubmitEvents chunks, concurrently.
    size = data.draw(st.integers(0, len(submissions)), label="batch size (0: single calls)")
    if size == 0:
        replies = await asyncio.gather(*(submit(e, k) for e, k in submissions))
    else:
        chunks = [submissions[i : i + size] for i in range(0, len(submissions), size)]
        replies = [r for part in await asyncio.gather(*(submit_batch(c) for c in chunks)) for r in part]
    by_msi: dict[tuple[int, str, int], set[str]] = {}
    for (event, _key), reply in zip(submissions, replies, strict=True):
        assert reply.state in {
            events_pb2.EVENT_STATE_QUEUED,
            events_pb2.EVENT_STATE_PARKED,
            events_pb2.EVENT_STATE_DUPLICATE,
            *TERMINAL,
        }
        by_msi.setdefault((event.entity_type, event.entity_id, event.sequence), set()).add(reply.transaction_id)
    # One transaction per MSI, whichever copy of it won.
    assert all(len(ids) == 1 for ids in by_msi.values())

    for (entity_type, entity_id, sequence), ids in by_msi.items():
        status = await system.wait_terminal(next(iter(ids)))
        assert status.state == expected[(entity_type, entity_id)][sequence - 1], (entity_id, sequence)

    for (entity_type, entity_id), outcomes in expected.items():
        history = await system.history(entity_type, entity_id)
        assert [h.sequence for h in history] == list(range(1, len(outcomes) + 1))
        entity = (
            await system.admin.GetEntity(
                sequencer_pb2.GetEntityRequest(
                    entity=events_pb2.EntityRef(entity_type=entity_type, entity_id=entity_id)  # type: ignore[arg-type]
                ),
                timeout=5,
            )
        ).entity
        assert entity.watermark == len(outcomes) and entity.parked_count == 0
    for shipment_id, final in final_status.items():
        if final is None:
            continue
        shipment = await system.shipment(shipment_id)
        assert shipment.status == int(final) and shipment.version == len(expected[(SHIPMENT, shipment_id)])
    item = (await system.ledger.GetInventoryItem(ledger_pb2.GetInventoryItemRequest(sku=sku), timeout=5)).item
    assert {b.location: b.on_hand for b in item.balances if b.on_hand} == balances
