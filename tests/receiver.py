"""A real webhook receiver for the tests: an aiohttp server on 127.0.0.1, port 0.

It verifies every request with the Standard Webhooks library's own verifier (the way a
receiver would), records what came, and answers as the test scripts it: `answer(request_number,
webhook_id)` returns a status, optionally with headers, or awaits to hold a request open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

Answer = Callable[[int, str], Awaitable[tuple[int, dict[str, str]]]]


async def always_ok(_n: int, _webhook_id: str) -> tuple[int, dict[str, str]]:
    return 200, {}


@dataclass
class Received:
    webhook_id: str
    headers: dict[str, str]
    body: dict[str, Any]
    verified: bool

    @property
    def key(self) -> tuple[int, str, int, str]:
        """(entity type, entity id, MSI, type): what the delivery reports."""
        data = self.body["data"]
        entity = data["entity"]
        return (
            ENTITY_TYPES[entity["entityType"]],
            entity["entityId"],
            int(data["sequence"]),
            self.body["type"],
        )


ENTITY_TYPES = {"ENTITY_TYPE_SHIPMENT": 1, "ENTITY_TYPE_INVENTORY_ITEM": 2}


@dataclass
class Receiver:
    answer: Answer = always_ok
    secret: str = ""
    received: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _sock: socket.socket | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def bind(self) -> Receiver:
        """Takes a port, not yet accepting: connections are refused until `start` (the
        receiver is down, and its address is known and kept)."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        return self

    async def start(self) -> Receiver:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._sock is not None:
            self._sock.close()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = False
        body: dict[str, Any] = json.loads(raw)
        if self.secret:
            try:
                Webhook(self.secret).verify(raw, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        self.received.append(Received(headers["webhook-id"], headers, body, verified))
        self.arrived.set()
        if self.secret and not verified:
            return web.Response(status=400)
        status, extra = await self.answer(len(self.received), headers["webhook-id"])
        return web.Response(status=status, headers=extra)

    def ids(self) -> list[str]:
        return [r.webhook_id for r in self.received]

    def distinct(self) -> dict[str, Received]:
        """The deliveries as a deduplicating receiver keeps them: one per webhook-id."""
        return {r.webhook_id: r for r in self.received}

    async def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"receiver: condition not met; got {[r.key for r in self.received]}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.1)
