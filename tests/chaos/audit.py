"""The end state against the in-order, exactly-once model, read from both services' tables.

It waits (up to a generous timeout) until the sequencer holds nothing parked or queued, then
judges every event the producer got an accepted answer for:
- lost: not APPLIED in the sequencer under the transaction id it was acknowledged with, or
  absent from the ledger's history as APPLIED;
- duplicated: a ledger history row (or a sequencer row) beyond one per acknowledged event;
- out of order: an MSI the ledger processed before its predecessor (its history timestamps);
- ledger mismatches: entities whose version, stock or shipment status is not what applying
  their acknowledged events once each, in MSI order, gives (a double application without a
  history row shows here);
- sequencer mismatches: entities whose watermark is not their last MSI, or that still park or
  have a gap."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.model import INVENTORY
from common.db import libpq_url
from logistics.events.v1 import events_pb2
from tests.chaos.load import Stream, model_on_hand, model_shipment_status

APPLIED = int(events_pb2.EVENT_STATE_APPLIED)
HELD = [int(events_pb2.EVENT_STATE_PARKED), int(events_pb2.EVENT_STATE_QUEUED)]
LEDGER_APPLIED = 1  # logistics.ledger.v1.ApplyOutcome APPLIED, as entity_history stores it
MAX_PROBLEMS = 30


@dataclass
class Findings:
    submitted: int = 0
    applied: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    ledger_mismatches: int = 0
    sequencer_mismatches: int = 0
    waited: float = 0.0
    problems: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    @property
    def failures(self) -> int:
        return self.lost + self.duplicated + self.out_of_order + self.ledger_mismatches + self.sequencer_mismatches


def wait_settled(conn: psycopg.Connection[Any], submitted: int, timeout: float) -> tuple[bool, str]:
    """Until nothing is parked or queued and every acknowledged event has its row."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state = ANY(%s)), count(*) FROM sequencer.events", (HELD,)
        ).fetchone()
        assert row is not None
        held, total = int(row[0]), int(row[1])
        if held == 0 and total >= submitted:
            return True, ""
        if time.monotonic() > deadline:
            return False, f"after {timeout:.0f} s still {held} events held, {total}/{submitted} stored"
        time.sleep(0.25)


def audit(database_url: str, streams: list[Stream], timeout: float) -> Findings:
    found = Findings(submitted=sum(len(s.acked) for s in streams))
    started = time.monotonic()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        settled, why = wait_settled(conn, found.submitted, timeout)
        found.waited = time.monotonic() - started
        if not settled:
            found.fail(why)
        events: dict[str, dict[int, tuple[str, int]]] = defaultdict(dict)
        for entity_id, sequence, tx, state in conn.execute(
            "SELECT entity_id, sequence, transaction_id::text, state FROM sequencer.events"
        ):
            events[entity_id][int(sequence)] = (tx, int(state))
        history: dict[str, list[tuple[int, int, Any]]] = defaultdict(list)
        for entity_id, sequence, outcome, processed_at in conn.execute(
            "SELECT entity_id, sequence, outcome, processed_at FROM ledger.entity_history ORDER BY entity_id, sequence"
        ):
            history[entity_id].append((int(sequence), int(outcome), processed_at))
        versions = {r[0]: int(r[1]) for r in conn.execute("SELECT entity_id, version FROM ledger.entity_versions")}
        stock: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
        for sku, location, on_hand, reserved in conn.execute(
            "SELECT sku, location, on_hand, reserved FROM ledger.inventory_balances"
        ):
            stock[sku][location] = (int(on_hand), int(reserved))
        shipments = {r[0]: int(r[1]) for r in conn.execute("SELECT shipment_id, status FROM ledger.shipments")}
        bookkeeping = {
            r[0]: (int(r[1]), int(r[2]))
            for r in conn.execute("SELECT entity_id, watermark, parked_count FROM sequencer.entities")
        }
        gaps = {r[0] for r in conn.execute("SELECT entity_id FROM sequencer.gaps")}

    for stream in streams:
        _judge(found, stream, events[stream.entity_id], history[stream.entity_id], versions, stock, shipments)
        n = len(stream.acked)
        if n and (bookkeeping.get(stream.entity_id) != (n, 0) or stream.entity_id in gaps):
            found.sequencer_mismatches += 1
            found.fail(
                f"{stream.entity_id}: sequencer (watermark, parked) {bookkeeping.get(stream.entity_id)}, "
                f"gap {stream.entity_id in gaps}; want ({n}, 0), no gap"
            )
    return found


def _judge(
    found: Findings,
    stream: Stream,
    events: dict[int, tuple[str, int]],
    history: list[tuple[int, int, Any]],
    versions: dict[str, int],
    stock: dict[str, dict[str, tuple[int, int]]],
    shipments: dict[str, int],
) -> None:
    name, acked = stream.entity_id, stream.acked
    n = len(acked)
    if set(acked) != set(range(1, n + 1)):
        found.fail(f"{name}: acknowledged MSIs are not 1..{n}: {sorted(acked)[:10]}")
    in_history: dict[int, list[int]] = defaultdict(list)
    for sequence, outcome, _at in history:
        in_history[sequence].append(outcome)
    for sequence, tx in sorted(acked.items()):
        row = events.get(sequence)
        outcomes = in_history.get(sequence, [])
        if row == (tx, APPLIED) and LEDGER_APPLIED in outcomes:
            found.applied += 1
            continue
        found.lost += 1
        state = events_pb2.EventState.Name(row[1]) if row else "absent"  # type: ignore[arg-type]
        held_tx = row[0] if row else "-"
        found.fail(f"{name}#{sequence} ({tx}): sequencer {state} as {held_tx}, ledger outcomes {outcomes}")
    extra = sum(len(o) - 1 for o in in_history.values()) + sum(1 for s in in_history if s not in acked)
    extra += sum(1 for s in events if s not in acked)
    if extra:
        found.duplicated += extra
        found.fail(f"{name}: {extra} rows beyond one per acknowledged MSI (MSIs {sorted(in_history)[-5:]})")
    for (before, _o, at_before), (after, _p, at_after) in itertools.pairwise(history):
        if at_after < at_before:
            found.out_of_order += 1
            found.fail(f"{name}: MSI {after} processed at {at_after}, before MSI {before} at {at_before}")
    applied = stream.events[:n]
    want: Any
    got: Any
    if stream.entity_type == INVENTORY:
        want = ({"A": model_on_hand(applied)} if n else {}, n)
        got = ({loc: qty for loc, (qty, _reserved) in stock.get(name, {}).items()}, versions.get(name, 0))
        if any(reserved for _qty, reserved in stock.get(name, {}).values()):
            got = (*got, "reserved stock")
    else:
        want = (model_shipment_status(applied), n)
        got = (shipments.get(name, 0), versions.get(name, 0))
    if got != want:
        found.ledger_mismatches += 1
        found.fail(f"{name}: ledger (state, version) {got}, the in-order model says {want}")
