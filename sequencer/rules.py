"""The sequencing rules of SPEC 5, decided once, here, for every submission (single or batched).

Pure: the caller reads an entity's bookkeeping under its lock, asks `Entity.decide` for each
submission in order, and writes what the decisions say. Each decision also updates the view, so
later submissions of the same entity in one batch get exactly the answer they would get alone,
one after another. No I/O, no grpc.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

from sequencer.states import BLOCKED, PARKED, QUEUED


class Verdict(enum.Enum):
    QUEUED = "queued"  # the direct successor: forwarded
    PARKED = "parked"  # beyond a gap: held until its predecessors are processed
    DUPLICATE = "duplicate"  # the MSI is held or processed with this payload
    SKIPPED = "skipped"  # an operator skipped this MSI; a late event is not applied
    CONFLICT = "conflict"  # the MSI is held with another payload: a producer bug
    PARKED_LIMIT = "parked_limit"  # the entity holds as many parked events as allowed
    NOT_MISSING = "not_missing"  # a skip of an MSI that is held (not blocked) or processed
    NOTHING_BEHIND = "nothing_behind"  # a skip of an MSI no held event waits behind
    UNBLOCKED = "unblocked"  # a skip or retry of the entity's BLOCKED event: it is QUEUED again
    NOT_BLOCKED = "not_blocked"  # a retry of an MSI that is not the entity's blocked event


@dataclass(frozen=True)
class HeldEvent:
    """An events row as the rules see it."""

    sequence: int
    transaction_id: uuid.UUID
    payload_hash: bytes
    skip_reason: str | None
    state: int


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    # The event's own transaction (new for QUEUED/PARKED), or the one holding the MSI.
    transaction_id: uuid.UUID | None = None
    # PARKED: what the event waits for.
    awaiting: int = 0

    @property
    def holds(self) -> bool:
        """True when the decision writes a new events row."""
        return self.verdict in (Verdict.QUEUED, Verdict.PARKED)


@dataclass
class Entity:
    """An entity's bookkeeping under its lock: watermark, parked count, and the rows it holds
    (every row above the watermark, plus the rows at MSIs being submitted)."""

    watermark: int
    parked_count: int
    held: dict[int, HeldEvent] = field(default_factory=dict)
    # Set once something new is held: the gap row must then be brought in step.
    changed: bool = False

    def decide(self, sequence: int, payload_hash: bytes, parked_limit: int, transaction_id: uuid.UUID) -> Decision:
        """The answer to submitting `sequence` with `payload_hash` now; a QUEUED or PARKED
        decision takes `transaction_id` and holds the event in this view."""
        existing = self.held.get(sequence)
        if existing is not None or sequence <= self.watermark:
            return _already_there(existing, payload_hash)
        if sequence == self.watermark + 1:
            self._hold(HeldEvent(sequence, transaction_id, payload_hash, None, QUEUED), parked=False)
            return Decision(Verdict.QUEUED, transaction_id)
        if self.parked_count >= parked_limit:
            return Decision(Verdict.PARKED_LIMIT)
        self._hold(HeldEvent(sequence, transaction_id, payload_hash, None, PARKED), parked=True)
        return Decision(Verdict.PARKED, transaction_id, awaiting=self.awaiting_for(sequence))

    def skip(self, sequence: int, transaction_id: uuid.UUID, marker_hash: bytes, reason: str) -> Decision:
        """An operator's skip of `sequence`: a gap (an MSI neither held nor processed, with
        something held behind it), whose skip marker is then held in its place like an event
        (QUEUED as the direct successor, else PARKED); or the entity's BLOCKED event, which is
        then forwarded as a skip (UNBLOCKED, its own transaction)."""
        blocked = self.blocked()
        if blocked is not None and blocked.sequence == sequence:
            return Decision(Verdict.UNBLOCKED, blocked.transaction_id)
        if sequence in self.held or sequence <= self.watermark:
            return Decision(Verdict.NOT_MISSING)
        if not any(s > sequence for s in self.held):
            return Decision(Verdict.NOTHING_BEHIND)
        parked = sequence != self.watermark + 1
        marker = HeldEvent(sequence, transaction_id, marker_hash, reason, PARKED if parked else QUEUED)
        self._hold(marker, parked=parked)
        if not parked:
            return Decision(Verdict.QUEUED, transaction_id)
        return Decision(Verdict.PARKED, transaction_id, awaiting=self.awaiting_for(sequence))

    def retry(self, sequence: int) -> Decision:
        """An operator's retry of `sequence`: only the entity's BLOCKED event goes again."""
        blocked = self.blocked()
        if blocked is None or blocked.sequence != sequence:
            return Decision(Verdict.NOT_BLOCKED)
        return Decision(Verdict.UNBLOCKED, blocked.transaction_id)

    def blocked(self) -> HeldEvent | None:
        """The event the entity is stopped at, if the ledger's refusals blocked it (always the
        direct successor of the watermark: only a QUEUED event is forwarded)."""
        head = self.held.get(self.watermark + 1)
        return head if head is not None and head.state == BLOCKED else None

    def _hold(self, event: HeldEvent, *, parked: bool) -> None:
        self.held[event.sequence] = event
        self.parked_count += 1 if parked else 0
        # Queuing the direct successor moves the gap only when something is parked behind it.
        self.changed = self.changed or parked or self.parked_count > 0

    def gap(self) -> int | None:
        """The lowest missing MSI above the watermark, when something held waits behind it."""
        above = [s for s in self.held if s > self.watermark]
        if not above:
            return None
        lowest = self.watermark + 1
        while lowest in self.held:
            lowest += 1
        return lowest if lowest < max(above) else None

    def awaiting_for(self, sequence: int) -> int:
        return awaiting(sequence, self.gap(), self.watermark)


def awaiting(sequence: int, gap: int | None, watermark: int) -> int:
    """What a parked event waits for: the entity's missing MSI when one lies below it, else the
    next MSI to be processed (its predecessors are all held, the first on its way)."""
    return gap if gap is not None and gap < sequence else watermark + 1


def _already_there(existing: HeldEvent | None, payload_hash: bytes) -> Decision:
    """The MSI is held or processed: the same payload is a DUPLICATE, another a conflict."""
    if existing is None:
        # Processed long ago and no longer held: harmless, never applied twice.
        return Decision(Verdict.DUPLICATE)
    if existing.skip_reason is not None:
        return Decision(Verdict.SKIPPED, existing.transaction_id)
    if existing.payload_hash != payload_hash:
        return Decision(Verdict.CONFLICT, existing.transaction_id)
    return Decision(Verdict.DUPLICATE, existing.transaction_id)
