"""Hypothesis: any sequence of inventory commands keeps every invariant, and the rules refuse
exactly what a naive reference (apply, then check) finds illegal."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import domain
from ledger.domain import Adjust, Balance, InventoryState, Move, Reason, Receive, Rejection, Release, Reserve
from ledger.errors import InvalidEvent

LOCATIONS = ["A", "B", "C"]
RESERVATIONS = ["r1", "r2", "r3", "r4"]
quantity = st.integers(min_value=1, max_value=30)
location = st.sampled_from(LOCATIONS)

commands = st.one_of(
    st.builds(Receive, location, quantity),
    st.builds(Adjust, location, st.integers(min_value=-30, max_value=30).filter(bool), st.just("count")),
    st.builds(Reserve, location, quantity, st.sampled_from(RESERVATIONS)),
    st.builds(Release, st.sampled_from(RESERVATIONS)),
    st.builds(Move, location, location, quantity),
)


def reference(
    balances: dict[str, list[int]], reservations: dict[str, tuple[str, int, bool]], command: domain.InventoryCommand
) -> str | None:
    """Applies naively to the mutable copies; returns the reason the result is illegal, if any."""
    match command:
        case Receive(loc, q):
            balances.setdefault(loc, [0, 0])[0] += q
        case Adjust(loc, d, _):
            balances.setdefault(loc, [0, 0])[0] += d
        case Reserve(loc, q, rid):
            if rid in reservations:
                return Reason.RESERVATION_EXISTS
            balances.setdefault(loc, [0, 0])[1] += q
            reservations[rid] = (loc, q, True)
        case Release(rid):
            if rid not in reservations or not reservations[rid][2]:
                return Reason.UNKNOWN_RESERVATION
            loc, q, _ = reservations[rid]
            balances[loc][1] -= q
            reservations[rid] = (loc, q, False)
        case Move(src, dst, q):
            if src == dst:
                return Reason.SAME_LOCATION
            balances.setdefault(src, [0, 0])[0] -= q
            balances.setdefault(dst, [0, 0])[0] += q
    if any(not 0 <= reserved <= on_hand for on_hand, reserved in balances.values()):
        return Reason.INSUFFICIENT_STOCK
    return None


@settings(max_examples=300)
@given(st.lists(commands, max_size=40))
def test_rules_keep_invariants_and_match_the_reference(sequence: list[domain.InventoryCommand]) -> None:
    state = InventoryState()
    for command in sequence:
        balances = {loc: [b.on_hand, b.reserved] for loc, b in state.balances.items()}
        reservations = {r.reservation_id: (r.location, r.quantity, not r.released) for r in state.reservations.values()}
        expected_rejection = reference(balances, reservations, command)
        result = domain.decide_inventory(state, command)
        if expected_rejection is not None:
            assert isinstance(result, Rejection)
            assert result.reason == expected_rejection
            continue
        assert not isinstance(result, Rejection), result
        state = domain.apply_effect(state, result)
        assert {loc: [b.on_hand, b.reserved] for loc, b in state.balances.items()} == balances
        assert all(b.is_valid() for b in state.balances.values())
        # Reserved units at a location are exactly the open reservations there.
        for loc, b in state.balances.items():
            open_here = [r.quantity for r in state.reservations.values() if r.location == loc and not r.released]
            assert b.reserved == sum(open_here)


@given(st.lists(commands, max_size=30))
def test_moves_conserve_the_total(sequence: list[domain.InventoryCommand]) -> None:
    state = InventoryState()
    for command in sequence:
        before = sum(b.on_hand for b in state.balances.values())
        result = domain.decide_inventory(state, command)
        if isinstance(result, Rejection):
            continue
        state = domain.apply_effect(state, result)
        after = sum(b.on_hand for b in state.balances.values())
        match command:
            case Receive(_, q):
                assert after == before + q
            case Adjust(_, d, _):
                assert after == before + d
            case _:
                assert after == before


def test_the_balance_limit_is_a_rejection_not_an_overflow() -> None:
    state = InventoryState({"A": Balance(domain.MAX_BALANCE, 0)})
    result = domain.decide_inventory(state, Receive("A", 1))
    assert isinstance(result, Rejection)
    assert result.reason == Reason.BALANCE_LIMIT


@pytest.mark.parametrize(
    "command",
    [
        Receive("A", 0),
        Receive("A", -1),
        Receive("A", 1_000_000_001),
        Receive("", 1),
        Adjust("A", 0, "count"),
        Adjust("A", -1_000_000_001, "count"),
        Adjust("A", 1_000_000_001, "count"),
        Adjust("A", 5, ""),
        Reserve("A", 0, "r1"),
        Reserve("A", 1, ""),
        Reserve("A", 2**63 - 1, "r1"),
        Release(""),
        Move("A", "B", 0),
        Move("A", "", 1),
        Move("A", "B", -5),
    ],
)
def test_malformed_commands_are_invalid(command: domain.InventoryCommand) -> None:
    with pytest.raises(InvalidEvent):
        domain.validate_inventory(command)


@pytest.mark.parametrize(
    "command",
    [Receive("A", 1_000_000_000), Adjust("A", -1_000_000_000, "damage"), Move("A", "B", 1), Release("r")],
)
def test_well_formed_commands_pass(command: domain.InventoryCommand) -> None:
    domain.validate_inventory(command)
