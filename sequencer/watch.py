"""Status streams and bounded waits, woken by NOTIFY from any replica, with a poll behind it.

Each watcher has a small bounded queue of hints; a slow watcher loses hints, not correctness,
because it re-reads the status from the database whenever it wakes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, Callable, Iterator

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.errors import TooManyWatchers
from sequencer.hints import Change, Hint
from sequencer.notifications import Notifier
from sequencer.reads import Reads
from sequencer.states import TERMINAL
from sequencer.validation import validate_entity

POLL_SECONDS = 1.0
QUEUE_SIZE = 64


class Watches:
    def __init__(self, reads: Reads, notifier: Notifier, per_caller_limit: int) -> None:
        self.reads = reads
        self.notifier = notifier
        self.per_caller_limit = per_caller_limit
        self.watchers: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def _subscription(self, match: Callable[[Change], bool]) -> Iterator[asyncio.Queue[Hint]]:
        queue: asyncio.Queue[Hint] = asyncio.Queue(QUEUE_SIZE)

        def deliver(message: Hint) -> None:
            if message.resync or any(match(c) for c in message.changes):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(message)

        unsubscribe = self.notifier.subscribe(deliver)
        try:
            yield queue
        finally:
            unsubscribe()

    @contextlib.contextmanager
    def _slot(self, caller: str) -> Iterator[None]:
        if self.watchers[caller] >= self.per_caller_limit:
            raise TooManyWatchers(
                f"caller {caller} already has {self.per_caller_limit} open watches", limit=self.per_caller_limit
            )
        self.watchers[caller] += 1
        try:
            yield
        finally:
            self.watchers[caller] -= 1
            if self.watchers[caller] <= 0:
                del self.watchers[caller]

    @staticmethod
    async def _next_hint(queue: asyncio.Queue[Hint], timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.get(), timeout)
        while not queue.empty():
            queue.get_nowait()

    async def wait_terminal(self, transaction_id: str, timeout: float) -> sequencer_pb2.EventStatus:
        """The status once terminal, or the latest status when `timeout` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._subscription(lambda c: c.transaction_id == transaction_id) as queue:
            while True:
                status = await self.reads.get_status(transaction_id)
                remaining = deadline - loop.time()
                if status.state in TERMINAL or remaining <= 0:
                    return status
                await self._next_hint(queue, min(POLL_SECONDS, remaining))

    async def watch_transaction(
        self, caller: str, transaction_id: str, scope: str | None
    ) -> AsyncGenerator[sequencer_pb2.EventStatus, None]:
        """The current status at once, then every change, ending after a terminal state."""
        with self._slot(caller), self._subscription(lambda c: c.transaction_id == transaction_id) as queue:
            last: sequencer_pb2.EventStatus | None = None
            while True:
                status = await self.reads.get_status(transaction_id, scope)
                if last is None or status.state != last.state or status.awaiting_sequence != last.awaiting_sequence:
                    yield status
                    last = status
                if status.state in TERMINAL:
                    return
                await self._next_hint(queue, POLL_SECONDS)

    async def watch_entity(
        self, caller: str, entity: events_pb2.EntityRef
    ) -> AsyncGenerator[sequencer_pb2.EventStatus, None]:
        """Every status change of the entity's events from now on (an ops view); never ends."""
        validate_entity(entity.entity_type, entity.entity_id, prefix="entity")
        et, eid = entity.entity_type, entity.entity_id
        seen: dict[str, int] = {}
        since = self.reads.clock.now() - dt.timedelta(seconds=1)
        with self._slot(caller), self._subscription(lambda c: c.entity_type == et and c.entity_id == eid) as queue:
            for status in await self.reads.entity_statuses(et, eid, None):
                seen[status.transaction_id] = status.state
            while True:
                await self._next_hint(queue, POLL_SECONDS)
                checked_at = self.reads.clock.now()
                for status in await self.reads.entity_statuses(et, eid, since):
                    if seen.get(status.transaction_id) != status.state:
                        seen[status.transaction_id] = status.state
                        yield status
                since = checked_at - dt.timedelta(seconds=1)
