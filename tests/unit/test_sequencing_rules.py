"""The sequencing rules (sequencer/rules.py), the state numbers and the NOTIFY hints: pure,
no database. The integration and property tests check the same rules through real servers."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from logistics.events.v1 import events_pb2
from sequencer import hints, states
from sequencer.models import events
from sequencer.rules import Entity, HeldEvent, Verdict
from sequencer.states import APPLIED, BLOCKED, PARKED, QUEUED, SKIPPED

A, B = b"payload-a", b"payload-b"


def tx() -> uuid.UUID:
    return uuid.uuid4()


def test_state_numbers_are_the_contracts() -> None:
    for name in ("PARKED", "QUEUED", "APPLIED", "REJECTED", "DUPLICATE", "SKIPPED", "BLOCKED"):
        assert getattr(states, name) == events_pb2.EventState.Value(f"EVENT_STATE_{name}")
    assert states.state_name(states.QUEUED) == "EVENT_STATE_QUEUED"
    # Every state a row can take is allowed by the table's CHECK constraint, and the numbers
    # the proto enum defines are all covered by it.
    check = next(
        str(getattr(c, "sqltext", ""))
        for c in events.constraints
        if str(getattr(c, "name", "")).endswith("state_known")
    )
    low, high = (int(n) for n in check.split("BETWEEN")[1].split("AND"))
    assert all(low <= s <= high for s in states.HELD | states.TERMINAL)
    assert max(v.number for v in events_pb2.EventState.DESCRIPTOR.values) == high


def test_direct_successor_is_queued_and_later_ones_parked() -> None:
    entity = Entity(watermark=2, parked_count=0)
    assert entity.decide(3, A, 10, tx()).verdict is Verdict.QUEUED
    parked = entity.decide(5, A, 10, tx())
    assert (parked.verdict, parked.awaiting) == (Verdict.PARKED, 4)
    assert entity.parked_count == 1 and entity.gap() == 4 and entity.changed


def test_awaiting_names_the_gap_below_or_the_next_msi() -> None:
    entity = Entity(watermark=0, parked_count=0)
    assert entity.decide(3, A, 10, tx()).awaiting == 1
    assert entity.decide(2, A, 10, tx()).awaiting == 1
    entity.decide(1, A, 10, tx())
    # 1..3 held, nothing missing below 4: it waits for the next MSI to be processed.
    assert entity.gap() is None
    assert entity.decide(4, A, 10, tx()).awaiting == 1
    assert entity.decide(6, A, 10, tx()).awaiting == 5


def test_held_or_processed_msis() -> None:
    held = tx()
    entity = Entity(
        watermark=5,
        parked_count=0,
        held={4: HeldEvent(4, held, A, None, APPLIED), 6: HeldEvent(6, held, A, None, PARKED)},
    )
    assert entity.decide(4, A, 10, tx()).verdict is Verdict.DUPLICATE
    assert entity.decide(4, A, 10, tx()).transaction_id == held
    assert entity.decide(6, B, 10, tx()).verdict is Verdict.CONFLICT
    processed_long_ago = entity.decide(2, A, 10, tx())
    assert (processed_long_ago.verdict, processed_long_ago.transaction_id) == (Verdict.DUPLICATE, None)
    skipped = Entity(watermark=3, parked_count=0, held={3: HeldEvent(3, held, b"marker", "lost upstream", SKIPPED)})
    assert skipped.decide(3, A, 10, tx()).verdict is Verdict.SKIPPED


def test_parked_limit_refuses_only_new_parked_events() -> None:
    entity = Entity(watermark=0, parked_count=0)
    assert entity.decide(3, A, 1, tx()).verdict is Verdict.PARKED
    assert entity.decide(4, A, 1, tx()).verdict is Verdict.PARKED_LIMIT
    assert entity.decide(3, A, 1, tx()).verdict is Verdict.DUPLICATE  # held: still answered
    assert entity.decide(1, A, 1, tx()).verdict is Verdict.QUEUED  # the successor always goes


@given(st.lists(st.tuples(st.integers(1, 12), st.booleans()), max_size=40), st.integers(0, 3))
def test_each_msi_is_held_once_and_only_its_first_payload_wins(
    submissions: list[tuple[int, bool]], watermark: int
) -> None:
    entity = Entity(watermark=watermark, parked_count=0)
    first: dict[int, bytes] = {}
    for sequence, other in submissions:
        payload = B if other else A
        decision = entity.decide(sequence, payload, 1000, tx())
        if sequence <= watermark:
            assert decision.verdict is Verdict.DUPLICATE and decision.transaction_id is None
        elif sequence not in first:
            first[sequence] = payload
            expected = Verdict.QUEUED if sequence == watermark + 1 else Verdict.PARKED
            assert decision.verdict is expected
            if expected is Verdict.PARKED:
                missing = min(s for s in range(watermark + 1, 14) if s not in first)
                assert decision.awaiting == (missing if missing < sequence else watermark + 1)
        else:
            assert decision.verdict is (Verdict.DUPLICATE if first[sequence] == payload else Verdict.CONFLICT)
    above = sorted(first)
    missing = min(s for s in range(watermark + 1, 14) if s not in first)
    assert entity.gap() == (missing if above and missing < above[-1] else None)
    assert entity.parked_count == len([s for s in first if s != watermark + 1])


def test_hints_round_trip_and_fall_back_to_resync() -> None:
    changes = [hints.Change(1, "SHP-1", states.QUEUED), hints.Change(2, "SKU-1", states.PARKED, str(tx()))]
    decoded = hints.decode(hints.encode("me", changes + changes[:1]))
    assert decoded == hints.Hint("me", tuple(changes))
    legacy = hints.decode('{"x":"abc","t":1,"e":"SHP-1","s":3,"o":"other"}')
    assert legacy == hints.Hint("other", (hints.Change(1, "SHP-1", 3, "abc"),))
    many = [hints.Change(1, f"SHP-{n:06d}-{'x' * 40}", states.QUEUED) for n in range(400)]
    assert hints.decode(hints.encode("me", many)) == hints.Hint("me", resync=True)
    assert hints.decode("not json") is None and hints.decode('{"c": [[1]]}') is None


def test_only_a_gap_may_be_skipped_and_the_marker_takes_its_place() -> None:
    entity = Entity(watermark=2, parked_count=1, held={5: HeldEvent(5, tx(), A, None, PARKED)})
    assert entity.gap() == 3
    assert entity.skip(2, tx(), b"skip", "lost").verdict is Verdict.NOT_MISSING  # processed
    assert entity.skip(5, tx(), b"skip", "lost").verdict is Verdict.NOT_MISSING  # held
    assert entity.skip(6, tx(), b"skip", "lost").verdict is Verdict.NOTHING_BEHIND
    parked = entity.skip(4, tx(), b"skip", "lost")
    assert (parked.verdict, parked.awaiting) == (Verdict.PARKED, 3)
    assert entity.held[4].skip_reason == "lost" and entity.parked_count == 2 and entity.gap() == 3
    queued = entity.skip(3, tx(), b"skip", "lost")
    assert queued.verdict is Verdict.QUEUED and entity.parked_count == 2
    assert entity.gap() is None and entity.changed


def test_a_blocked_event_stops_its_entity_until_an_operator_skips_or_retries_it() -> None:
    blocked_tx = tx()
    entity = Entity(
        watermark=4,
        parked_count=1,
        held={5: HeldEvent(5, blocked_tx, A, None, BLOCKED), 6: HeldEvent(6, tx(), A, None, PARKED)},
    )
    assert entity.blocked() == entity.held[5]
    # Resubmissions of the blocked MSI are answered as for any held event; successors park.
    assert entity.decide(5, A, 10, tx()).verdict is Verdict.DUPLICATE
    assert entity.decide(5, B, 10, tx()).verdict is Verdict.CONFLICT
    assert entity.decide(7, A, 10, tx()).verdict is Verdict.PARKED
    # Only the blocked MSI may be retried; a skip of it forwards its own transaction as a skip.
    assert entity.retry(6).verdict is Verdict.NOT_BLOCKED
    assert entity.retry(5) == entity.skip(5, tx(), b"marker", "why")
    assert entity.retry(5).verdict is Verdict.UNBLOCKED and entity.retry(5).transaction_id == blocked_tx
    assert entity.skip(6, tx(), b"marker", "why").verdict is Verdict.NOT_MISSING
    # A queued (not blocked) head is neither retried nor skipped.
    moving = Entity(watermark=4, parked_count=0, held={5: HeldEvent(5, tx(), A, None, QUEUED)})
    assert moving.blocked() is None
    assert moving.retry(5).verdict is Verdict.NOT_BLOCKED
    assert moving.skip(5, tx(), b"marker", "why").verdict is Verdict.NOT_MISSING
