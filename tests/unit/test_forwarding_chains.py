"""What the forwarder sends per entity: the queued direct successor and the consecutive held
events right after it, nothing past a missing MSI, nothing without a queued head."""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from sequencer.forwarding import chains
from sequencer.states import PARKED, QUEUED


class Row(NamedTuple):
    entity_type: int
    entity_id: str
    watermark: int
    sequence: int
    state: int
    transaction_id: uuid.UUID
    event: bytes
    correlation_id: str
    skip_reason: str | None
    traceparent: str | None = None


def rows(entity_id: str, watermark: int, held: list[tuple[int, int]]) -> list[Any]:
    return [Row(2, entity_id, watermark, s, state, uuid.uuid4(), b"", "c", None) for s, state in held]


def test_a_queued_head_and_its_consecutive_parked_successors() -> None:
    found = chains(rows("A", 4, [(5, QUEUED), (6, PARKED), (7, PARKED), (9, PARKED)]))
    assert [e.sequence for e in found[(2, "A")]] == [5, 6, 7]


def test_nothing_without_a_queued_direct_successor() -> None:
    assert chains(rows("B", 4, [(6, PARKED), (7, PARKED)])) == {}
    assert chains(rows("C", 4, [(5, PARKED), (6, PARKED)])) == {}


def test_entities_apart() -> None:
    found = chains([*rows("D", 0, [(1, QUEUED)]), *rows("E", 10, [(11, QUEUED), (12, PARKED)])])
    assert {k: [e.sequence for e in v] for k, v in found.items()} == {(2, "D"): [1], (2, "E"): [11, 12]}
