"""NOTIFY hints: what changed, built and parsed here only.

A hint is a wake-up, never the source of truth (a poll catches a lost one). One NOTIFY per
committed batch carries its changes; PostgreSQL caps a payload at 8,000 bytes, so a batch whose
changes do not fit says `resync` instead and every listener re-reads what it watches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CHANNEL = "sequencer_events"
MAX_PAYLOAD = 7_900


@dataclass(frozen=True)
class Change:
    """An event of an entity entered a state; the transaction id when a watcher may know it."""

    entity_type: int
    entity_id: str
    state: int
    transaction_id: str | None = None


@dataclass(frozen=True)
class Hint:
    origin: str
    changes: tuple[Change, ...] = field(default_factory=tuple)
    resync: bool = False


def encode(origin: str, changes: Iterable[Change]) -> str:
    """One payload for a batch's changes: {"o": origin, "c": [[type, id, state, tx?], ...]}."""
    rows: list[list[Any]] = []
    seen: set[Change] = set()
    for change in changes:
        if change in seen:
            continue
        seen.add(change)
        row: list[Any] = [change.entity_type, change.entity_id, change.state]
        if change.transaction_id is not None:
            row.append(change.transaction_id)
        rows.append(row)
    payload = json.dumps({"o": origin, "c": rows}, separators=(",", ":"))
    if len(payload.encode()) > MAX_PAYLOAD:
        return json.dumps({"o": origin, "resync": True}, separators=(",", ":"))
    return payload


def decode(payload: str) -> Hint | None:
    """Parses a payload of any producer: a batch's list, or the single change the outcome step
    of migration 5c1f0e2a9b7d sends ({"x", "t", "e", "s", "o"}). None: not a hint of ours."""
    try:
        raw = json.loads(payload)
        origin = str(raw.get("o", ""))
        if raw.get("resync"):
            return Hint(origin, resync=True)
        if "c" in raw:
            changes = tuple(
                Change(int(r[0]), str(r[1]), int(r[2]), str(r[3]) if len(r) > 3 else None) for r in raw["c"]
            )
        else:
            changes = (Change(int(raw["t"]), str(raw["e"]), int(raw["s"]), str(raw["x"])),)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return Hint(origin, changes)
