"""Flow control (SPEC 12): what the sequencer admits under peak load, decided here once.

Two bounds, both answered RESOURCE_EXHAUSTED with a google.rpc.RetryInfo before anything is
stored (the key stays usable):

- per caller, at most `max_inflight_per_caller` requests being handled at once, on every RPC
  except WatchEventStatus (open streams have their own cap, SEQUENCER_WATCHERS_PER_CALLER):
  `CALLER_OVERLOADED`. The count is this process's own (a replica admits its share).
- the backlog: accepted events not yet processed (rows PARKED or QUEUED, the work the pipeline
  still owes), at most `max_backlog`; SubmitEvent and SubmitEvents beyond it: `BACKLOG_FULL`.

The backlog figure is never counted per request. A background task counts the held rows with one
statement over a partial index (ix_events_held) every `refresh_interval`, capped just past the
bound so a huge backlog costs no more than a full one; between counts, every event this process
admits is added, so a burst between two counts cannot overshoot. Other replicas' admissions are
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_inflight_per_caller: int
    max_backlog: int
    refresh_interval: float = 1.0


class Admission:
    """The two bounds of one sequencer process."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.inflight: collections.Counter[str] = collections.Counter()
        # The last count of held events, and what this process admitted since that count began.
        self.counted = 0
        self.admitted_since = 0
        self.counted_once = False

    # --- per caller ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        """One in-flight request of `caller` for the duration of the block, or CallerOverloaded."""
        limit = self.limits.max_inflight_per_caller
        if self.inflight[caller] >= limit:
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
        """Held events as last counted, plus what this process admitted since."""
        return self.counted + self.admitted_since

    def admit_events(self, count: int) -> None:
        """Admits a submission of `count` events, or raises BacklogFull. A call is admitted while
        the backlog is under the bound, so it may overshoot by one call's items (SEQUENCER_MAX_BATCH
        at most); every admitted event counts until the next count sees it (or not: a DUPLICATE
        adds no row)."""
        limit = self.limits.max_backlog
        if self.backlog >= limit:
            raise BacklogFull(
                f"{self.backlog} accepted events are waiting to be applied (the bound is {limit}); "
                "retry after the delay in RetryInfo",
                backlog=self.backlog,
                limit=limit,
                retry_after=max(1.0, 2 * self.limits.refresh_interval),
            )
        self.admitted_since += count

    def counted_now(self, held: int, admitted_before: int) -> None:
        """Records a count of `held` events that began when `admitted_before` had been admitted
        since the previous count: what was admitted while it ran is kept on top of it."""
        self.counted = held
        self.admitted_since = max(0, self.admitted_since - admitted_before)
        self.counted_once = True

    async def run(self, count: Callable[[int], Awaitable[int]]) -> None:
        """Refreshes the backlog figure every refresh interval until cancelled. `count(cap)`
        returns the held events, counting at most `cap`. A failed count keeps the last figure
        (a database outage answers UNAVAILABLE on the submit path anyway)."""
        while True:
            before = self.admitted_since
            try:
                held = await count(self.limits.max_backlog + 1)
            except Exception as exc:  # noqa: BLE001 - the figure stays; the next count retries
                log.warning("backlog count failed", extra={"error": type(exc).__name__})
            else:
                self.counted_now(held, before)
            await asyncio.sleep(self.limits.refresh_interval)
