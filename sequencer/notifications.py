"""LISTEN for the sequencer's NOTIFY hints: event state changes, from any replica.

A hint, never the source of truth: a lost notification only delays things until the next poll.
LISTEN needs a session-level connection, so it does not work through a transaction-pooling
PgBouncer; the poll still does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg

from common.db import libpq_url
from sequencer import hints

log = logging.getLogger(__name__)

Subscriber = Callable[[hints.Hint], None]


class Notifier:
    def __init__(self, database_url: str) -> None:
        self.url = libpq_url(database_url)
        self.subscribers: set[Subscriber] = set()
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        self.subscribers.add(callback)
        return lambda: self.subscribers.discard(callback)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="notify-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _dispatch(self, message: hints.Hint) -> None:
        for callback in list(self.subscribers):
            try:
                callback(message)
            except Exception:  # a subscriber's bug must not stop the listener
                log.exception("notification subscriber failed")

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {hints.CHANNEL}")
                    self.connected.set()
                    delay = 0.1
                    # Anything may have changed while we were not listening.
                    self._dispatch(hints.Hint("", resync=True))
                    async for note in conn.notifies():
                        hint = hints.decode(note.payload)
                        if hint is None:
                            log.warning("malformed notification ignored")
                        else:
                            self._dispatch(hint)
            except (psycopg.Error, OSError):
                self.connected.clear()
                log.warning("notification listener lost its connection; reconnecting", extra={"delay": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
