"""The admission rules of SPEC 12 (sequencer/admission.py), pure: no server, no database."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from sequencer import queries, states
from sequencer.admission import Admission, Limits
from sequencer.errors import BacklogFull, CallerOverloaded
from sequencer.metrics import SequencerMetrics


def test_a_caller_holds_at_most_its_limit_and_a_finished_call_frees_its_slot() -> None:
    admission = Admission(Limits(max_inflight_per_caller=2, max_backlog=10))
    with admission.hold("wms"), admission.hold("wms"):
        with pytest.raises(CallerOverloaded) as caught, admission.hold("wms"):
            pass
        assert caught.value.retry_after > 0
        assert caught.value.metadata == {"caller": "wms", "limit": 2}
        with admission.hold("erp"):  # another caller has its own slots
            assert admission.inflight == {"wms": 2, "erp": 1}
    with admission.hold("wms"):
        assert admission.inflight == {"wms": 1}
    assert not admission.inflight


def test_a_refused_or_failed_call_leaves_no_slot_behind() -> None:
    admission = Admission(Limits(max_inflight_per_caller=1, max_backlog=10))
    with pytest.raises(RuntimeError), admission.hold("wms"):
        raise RuntimeError("the handler failed")
    assert not admission.inflight


def test_the_backlog_figure_never_undercounts_what_this_process_admitted() -> None:
    admission = Admission(Limits(max_inflight_per_caller=10, max_backlog=5, refresh_interval=0.5))
    admission.counted_now(3, 0)
    with admission.admitting(1):
        # A count that began now may not see this submission's row: it stays on top.
        admission.counted_now(3, admission.settled_since)
        assert admission.backlog == 4
    assert admission.backlog == 4  # finished after that count began: still added
    before = admission.settled_since
    admission.counted_now(4, before)  # a count that began after it finished has seen it
    assert admission.backlog == 4
    with admission.admitting(1):
        assert admission.backlog == 5
    with pytest.raises(BacklogFull) as caught, admission.admitting(1):
        pass
    assert caught.value.retry_after == 1.0
    assert caught.value.metadata == {"backlog": 5, "limit": 5}
    # A refused submission adds nothing.
    assert admission.unsettled == 0 and admission.backlog == 5


def test_a_call_is_admitted_while_the_backlog_is_under_the_bound_whatever_its_size() -> None:
    admission = Admission(Limits(max_inflight_per_caller=10, max_backlog=5))
    admission.counted_now(4, 0)
    with admission.admitting(500):
        assert admission.backlog == 504
    with pytest.raises(BacklogFull), admission.admitting(1):
        pass


def test_the_count_statement_counts_exactly_the_held_states() -> None:
    """COUNT_HELD names its states as literals (so the partial index matches); they are HELD."""
    found = re.search(r"state IN \(([\d, ]+)\)", str(queries.COUNT_HELD))
    assert found is not None
    assert {int(n) for n in found.group(1).split(",")} == {int(s) for s in states.HELD}


def test_refusals_and_the_backlog_figure_are_exported() -> None:
    registry = CollectorRegistry()
    admission = Admission(Limits(max_inflight_per_caller=1, max_backlog=2), SequencerMetrics(registry))

    def refusals(reason: str) -> float | None:
        return registry.get_sample_value("sequencer_admission_refusals_total", {"reason": reason})

    assert refusals("CALLER_OVERLOADED") == refusals("BACKLOG_FULL") == 0.0  # pre-initialised
    with admission.hold("wms"), pytest.raises(CallerOverloaded), admission.hold("wms"):
        pass
    admission.counted_now(2, 0)
    with pytest.raises(BacklogFull), admission.admitting(1):
        pass
    assert refusals("CALLER_OVERLOADED") == refusals("BACKLOG_FULL") == 1.0
    assert registry.get_sample_value("sequencer_backlog_events") == 2.0
