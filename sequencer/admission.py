"""Flow control (SPEC 12): what the sequencer admits under peak load, decided here once.

Two bounds, both answered RESOURCE_EXHAUSTED with a google.rpc.RetryInfo before anything is
stored (the key stays usable):

- per caller, at most `max_inflight_per_caller` requests being handled at once, on every RPC
  except WatchEventStatus (open streams have their own cap, SEQUENCER_WATCHERS_PER_CALLER):
  `CALLER_OVERLOADED`. The count is this process's own (a replica admits its share).
- the backlog: accepted events not yet processed (rows PARKED, QUEUED or BLOCKED: states.HELD,
  the work the pipeline still owes), at most `max_backlog`; SubmitEvent and SubmitEvents beyond it: `BACKLOG_FULL`.

The backlog figure is never counted per request. A background task counts the held rows with one
statement over a partial index (ix_events_held) every `refresh_interval`, capped just past the
bound so a huge backlog costs no more than a full one; on top of it, every event this process
admitted that the count may not have seen (its submission still in hand, or finished after the
count began) is added, so a burst between two counts cannot overshoot. Other replicas' admissions are
seen at the next count: the figure lags by at most one interval plus the count's own time.
No I/O here besides the count the server hands in; no grpc.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from sequencer.errors import BacklogFull, CallerOverloaded
from sequencer.metrics import SequencerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_inflight_per_caller: int
    max_backlog: int
    refresh_interval: float = 1.0


class Admission:
    """The two bounds of one sequencer process."""

    def __init__(self, limits: Limits, metrics: SequencerMetrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self.inflight: collections.Counter[str] = collections.Counter()
        # The last count of held events; events of submissions being handled; events of those
        # finished since the last count began (committed or not, it may not have seen them).
        self.counted = 0
        self.unsettled = 0
        self.settled_since = 0
        self.counted_once = False

    # --- per caller ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        """One in-flight request of `caller` for the duration of the block, or CallerOverloaded."""
        limit = self.limits.max_inflight_per_caller
        if self.inflight[caller] >= limit:
            self._refused(CallerOverloaded.reason)
            raise CallerOverloaded(
                f"caller {caller} already has {limit} requests in flight; retry after the delay in RetryInfo",
                caller=caller,
                limit=limit,
            )
        self.inflight[caller] += 1
        try:
            yield
        finally:
            self.inflight[caller] -= 1
            if self.inflight[caller] <= 0:
                del self.inflight[caller]

    # --- backlog ------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Held events as last counted, plus what this process admitted that the count may not
        have seen: submissions still being handled, and those finished since the count began."""
        return self.counted + self.unsettled + self.settled_since

    @contextlib.contextmanager
    def admitting(self, count: int) -> Iterator[None]:
        """Admits a submission of `count` events for the block (its handling), or raises
        BacklogFull. A call is admitted while the backlog is under the bound, so it may overshoot
        by one call's items (SEQUENCER_MAX_BATCH at most). Its events count until a count that
        began after the block ended has seen them (a DUPLICATE adds no row: it counts until then)."""
        limit = self.limits.max_backlog
        if self.backlog >= limit:
            self._refused(BacklogFull.reason)
            raise BacklogFull(
                f"{self.backlog} accepted events are waiting to be applied (the bound is {limit}); "
                "retry after the delay in RetryInfo",
                backlog=self.backlog,
                limit=limit,
                retry_after=max(1.0, 2 * self.limits.refresh_interval),
            )
        self.unsettled += count
        try:
            yield
        finally:
            self.unsettled -= count
            self.settled_since += count

    def counted_now(self, held: int, settled_before: int) -> None:
        """Records a count of `held` events that began when `settled_before` submissions had
        finished since the previous one: those it saw; the rest stay on top of it."""
        self.counted = held
        self.settled_since = max(0, self.settled_since - settled_before)
        self.counted_once = True
        if self.metrics is not None:
            self.metrics.backlog.set(held)

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.admission_refusals.labels(reason).inc()

    async def refresh(self, count: Callable[[int], Awaitable[int]]) -> None:
        """One count: `count(cap)` returns the held events, counting at most `cap`."""
        before = self.settled_since
        self.counted_now(await count(self.limits.max_backlog + 1), before)

    async def run(self, count: Callable[[int], Awaitable[int]]) -> None:
        """Refreshes the backlog figure every refresh interval until cancelled. A failed count
        keeps the last figure (a database outage answers UNAVAILABLE on the submit path anyway)."""
        while True:
            await asyncio.sleep(self.limits.refresh_interval)
            try:
                await self.refresh(count)
            except Exception as exc:  # noqa: BLE001 - the figure stays; the next count retries
                log.warning("backlog count failed", extra={"error": type(exc).__name__})
