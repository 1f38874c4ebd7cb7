"""Exactness audit of one workload, straight from both services' tables: every submitted event
terminal, the ledger equal to an in-order model computed here, nothing applied twice."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench.database import Database
from bench.model import INVENTORY, SHIPMENT, fold_inventory, fold_shipment
from logistics.events.v1 import events_pb2

APPLIED = int(events_pb2.EVENT_STATE_APPLIED)
TERMINAL = (APPLIED, int(events_pb2.EVENT_STATE_REJECTED), int(events_pb2.EVENT_STATE_SKIPPED))
LEDGER_APPLIED = 1  # logistics.ledger.v1.ApplyOutcome APPLIED, as stored in entity_history
MAX_PROBLEMS = 20


@dataclass
class Audit:
    problems: list[str] = field(default_factory=list)
    checked_entities: int = 0
    checked_events: int = 0

    @property
    def passed(self) -> bool:
        return not self.problems

    def fail(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append("... (more problems not listed)")

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": "PASS" if self.passed else "FAIL",
            "entities": self.checked_entities,
            "events": self.checked_events,
            "problems": self.problems,
        }


def accepted(result: dict[str, Any]) -> dict[tuple[int, int], list[Any]]:
    """(entity index, MSI) -> the first answered submission that created it."""
    first: dict[tuple[int, int], list[Any]] = {}
    for record in result["requests"]:
        entity, sequence, tx, _sent, _lat, _state, replayed, error, _phase = record
        if error or replayed or not tx:
            continue
        first.setdefault((entity, sequence), record)
    return first


def sequencer_rows(db: Database, prefix: str) -> dict[tuple[str, int], tuple[str, int, float | None]]:
    """(entity id, MSI) -> (transaction id, state, processed_at epoch) for a workload's entities."""
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT entity_id, sequence, transaction_id::text, state, extract(epoch FROM processed_at)::float8 "
            "FROM sequencer.events WHERE left(entity_id, %s) = %s",
            (len(prefix) + 1, prefix + "-"),
        ).fetchall()
    return {(r[0], int(r[1])): (r[2], int(r[3]), r[4]) for r in rows}


def pending(db: Database, prefix: str) -> tuple[int, int]:
    """(terminal, total) events of a workload in the sequencer."""
    with db.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state = ANY(%s)), count(*) FROM sequencer.events "
            "WHERE left(entity_id, %s) = %s",
            (list(TERMINAL), len(prefix) + 1, prefix + "-"),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def run_audit(db: Database, prefix: str, result: dict[str, Any], rows: dict[tuple[str, int], Any]) -> Audit:
    audit = Audit()
    entities = result["entities"]
    failed = [r for r in result["requests"] if r[7]]
    if failed:
        codes = sorted({r[7] for r in failed})
        audit.fail(f"{len(failed)} submissions got no answer after retries ({', '.join(codes)})")
    for problem in result.get("mismatches", []):
        audit.fail(f"replay: {problem}")
    for problem in result.get("storm", {}).get("bad_rounds", []):
        audit.fail(f"duplicate storm: {problem}")

    first = accepted(result)
    highest_held: dict[str, int] = defaultdict(int)
    for entity_id, sequence in rows:
        highest_held[entity_id] = max(highest_held[entity_id], sequence)
    by_entity: dict[int, set[int]] = defaultdict(set)
    for entity, sequence in first:
        by_entity[entity].add(sequence)

    with db.connect() as conn:
        ids = [entities[i][1] for i in by_entity]
        seq_entities = {
            r[0]: (int(r[1]), int(r[2]))
            for r in conn.execute(
                "SELECT entity_id, watermark, parked_count FROM sequencer.entities WHERE entity_id = ANY(%s)", (ids,)
            )
        }
        gaps = {r[0] for r in conn.execute("SELECT entity_id FROM sequencer.gaps WHERE entity_id = ANY(%s)", (ids,))}
        versions = {
            r[0]: int(r[1])
            for r in conn.execute(
                "SELECT entity_id, version FROM ledger.entity_versions WHERE entity_id = ANY(%s)", (ids,)
            )
        }
        history: dict[str, tuple[int, int, int, int]] = {
            r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4]))
            for r in conn.execute(
                "SELECT entity_id, count(*), count(DISTINCT sequence), max(sequence), "
                "count(*) FILTER (WHERE outcome <> %s) FROM ledger.entity_history WHERE entity_id = ANY(%s) "
                "GROUP BY entity_id",
                (LEDGER_APPLIED, ids),
            )
        }
        balances: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
        for sku, location, on_hand, reserved in conn.execute(
            "SELECT sku, location, on_hand, reserved FROM ledger.inventory_balances WHERE sku = ANY(%s)", (ids,)
        ):
            balances[sku][location] = (int(on_hand), int(reserved))
        shipments = {
            r[0]: int(r[1])
            for r in conn.execute(
                "SELECT shipment_id, status FROM ledger.shipments WHERE shipment_id = ANY(%s)", (ids,)
            )
        }

    for index, sequences in by_entity.items():
        entity_type, entity_id, specs = entities[index]
        n = len(sequences)
        audit.checked_entities += 1
        audit.checked_events += n
        if sequences != set(range(1, n + 1)):
            audit.fail(
                f"{entity_id}: accepted MSIs are not 1..{n}: missing {sorted(set(range(1, n + 1)) - sequences)[:5]}"
            )
            continue
        for sequence in range(1, n + 1):
            record = first[(index, sequence)]
            row = rows.get((entity_id, sequence))
            if row is None:
                audit.fail(f"{entity_id}#{sequence}: accepted ({record[2]}) but not in sequencer.events")
            elif row[0] != record[2]:
                audit.fail(f"{entity_id}#{sequence}: transaction {record[2]} answered, {row[0]} stored")
            elif row[1] != APPLIED:
                audit.fail(f"{entity_id}#{sequence}: state {events_pb2.EventState.Name(row[1])}, not APPLIED")
        if highest_held[entity_id] > n:
            audit.fail(
                f"{entity_id}: sequencer holds MSI {highest_held[entity_id]} that no answered submission created"
            )
        watermark, parked = seq_entities.get(entity_id, (0, -1))
        if watermark != n or parked != 0 or entity_id in gaps:
            audit.fail(
                f"{entity_id}: sequencer watermark {watermark} (want {n}), parked {parked}, gap {entity_id in gaps}"
            )
        if versions.get(entity_id) != n:
            audit.fail(f"{entity_id}: ledger version {versions.get(entity_id)}, want {n}")
        count, distinct, highest, not_applied = history.get(entity_id, (0, 0, 0, 0))
        if count != n or distinct != n or highest != n:
            audit.fail(f"{entity_id}: ledger history has {count} rows ({distinct} MSIs, max {highest}); want {n}")
        if not_applied:
            audit.fail(f"{entity_id}: {not_applied} history rows are not APPLIED (the model rejects nothing)")
        if entity_type == INVENTORY:
            want = {loc: qty for loc, qty in fold_inventory(specs[:n]).items()}
            have = balances.get(entity_id, {})
            got = {loc: on_hand for loc, (on_hand, _reserved) in have.items()}
            if any(got.get(loc, 0) != qty for loc, qty in want.items()) or any(
                qty != want.get(loc, 0) for loc, qty in got.items()
            ):
                audit.fail(f"{entity_id}: on_hand {got}, in-order model says {want}")
            if any(reserved for _on_hand, reserved in have.values()):
                audit.fail(f"{entity_id}: reserved stock where the model reserves none")
        elif entity_type == SHIPMENT:
            want_status = fold_shipment(specs[:n])
            if shipments.get(entity_id) != want_status:
                audit.fail(f"{entity_id}: shipment status {shipments.get(entity_id)}, model says {want_status}")
    return audit


#: Codes an overload must never answer because of the load (SPEC 12: INTERNAL, UNAVAILABLE; and
#: no transport answer: CANCELLED is what grpc core says when its queue of calls overflows).
OVERLOAD_FORBIDDEN = ("INTERNAL", "UNAVAILABLE", "UNKNOWN", "CANCELLED")


def overload_audit(audit: Audit, figures: dict[str, Any]) -> None:
    """What the overload workload adds to the audit: no INTERNAL/UNAVAILABLE under load, and
    every request refused during the load admitted when re-sent later with its key."""
    for code in OVERLOAD_FORBIDDEN:
        if figures["errors"].get(code):
            audit.fail(f"overload: {figures['errors'][code]} calls answered {code} under load")
    if figures["late_admitted"] != figures["late"]:
        audit.fail(f"overload: {figures['late'] - figures['late_admitted']} refused requests never admitted later")
