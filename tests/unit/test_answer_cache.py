"""The in-memory replay cache: bounded, least recently used out first, never past expiry."""

from __future__ import annotations

import datetime as dt

from sequencer.idempotency import AnswerCache, StoredAnswer

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def answer(expires_in: float) -> StoredAnswer:
    return StoredAnswer("m", b"f", b"q", b"r", NOW, NOW + dt.timedelta(seconds=expires_in))


def test_hits_until_expiry() -> None:
    cache = AnswerCache(10)
    cache.put("c", "k", answer(60))
    assert cache.get("c", "k", NOW) is not None
    assert cache.get("other", "k", NOW) is None
    assert cache.get("c", "k", NOW + dt.timedelta(seconds=60)) is None
    assert cache.get("c", "k", NOW) is None  # the expired entry was dropped


def test_capacity_drops_the_least_recently_used() -> None:
    cache = AnswerCache(2)
    cache.put("c", "a", answer(60))
    cache.put("c", "b", answer(60))
    assert cache.get("c", "a", NOW) is not None  # a is now the most recent
    cache.put("c", "c", answer(60))
    assert cache.get("c", "b", NOW) is None
    assert cache.get("c", "a", NOW) is not None and cache.get("c", "c", NOW) is not None


def test_zero_capacity_keeps_nothing() -> None:
    cache = AnswerCache(0)
    cache.put("c", "a", answer(60))
    assert cache.get("c", "a", NOW) is None
