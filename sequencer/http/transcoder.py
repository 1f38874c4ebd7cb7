"""Calls the RPC a route names, over gRPC, with the caller's headers as metadata.

The sequencer's own RPCs go to its gRPC server over a private Unix socket; the ledger's reads go
to the ledger over a channel with the sequencer's ledger TLS settings but without its token, so
the ledger sees the caller's credentials. Everything a gRPC caller gets (authentication, roles,
the idempotency scope and fingerprint, correlation ids, logs, gRPC metrics) is therefore the same
for an HTTP caller, by construction. The few HTTP-only behaviours of SPEC 13 (202 and Location,
`Prefer: wait`) are the named exceptions below.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.auth import Authenticator
from common.errors import Unauthenticated
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.http.problems import Problem, from_rpc_error
from sequencer.http.routes import LEDGER_SERVICE, Route, render
from sequencer.states import TERMINAL

SUBMIT_EVENT = "/logistics.sequencer.v1.SequencerService/SubmitEvent"
GET_EVENT_STATUS = "/logistics.sequencer.v1.SequencerService/GetEventStatus"
WATCH_EVENT_STATUS = "/logistics.sequencer.v1.SequencerService/WatchEventStatus"
# The longest `Prefer: wait=N` honoured, in seconds (a longer one is cut to this, and
# Preference-Applied says so).
MAX_WAIT = 60
_WAIT = re.compile(r"^\s*wait\s*=\s*(\d{1,9})\s*$", re.IGNORECASE)
# Response metadata passed back as headers (gRPC name -> HTTP name).
RESPONSE_HEADERS = {
    "x-correlation-id": "X-Correlation-Id",
    "idempotency-replayed": "Idempotency-Replayed",
    "idempotency-first-seen-at": "Idempotency-First-Seen-At",
    "idempotency-expires-at": "Idempotency-Expires-At",
}


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def prefer_wait(values: Sequence[str]) -> int | None:
    """The `wait` preference of RFC 7240 (`Prefer: wait=10`, possibly among others)."""
    for value in values:
        for preference in value.split(","):
            found = _WAIT.match(preference.split(";", 1)[0])
            if found:
                return min(int(found.group(1)), MAX_WAIT)
    return None


def _headers(pairs: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs or ():
        name = RESPONSE_HEADERS.get(key)
        if name and isinstance(value, str):
            out[name] = value
    return out


class Transcoder:
    def __init__(
        self,
        loopback: grpc.aio.Channel,
        ledger: grpc.aio.Channel,
        authenticator: Authenticator,
        timeout: float,
        *,
        ledger_has_client_certificate: bool,
    ) -> None:
        self.loopback = loopback
        self.ledger = ledger
        self.authenticator = authenticator
        self.timeout = timeout
        self.ledger_has_client_certificate = ledger_has_client_certificate

    def _ledger_check(self, metadata: Sequence[tuple[str, str]]) -> None:
        """Ledger reads carry the caller's bearer token to the ledger. It is checked here too, so
        the sequencer's HTTP listener never serves more than its own credentials allow, and never
        lets the channel's client certificate (the sequencer's identity) stand in for a caller."""
        has_token = any(k == "authorization" for k, _ in metadata)
        if not self.authenticator.development:
            try:
                self.authenticator.authenticate(metadata, ())
            except Unauthenticated as exc:
                raise Problem(401, exc.reason, exc.message) from exc
        if self.ledger_has_client_certificate and not has_token:
            raise Problem(401, "UNAUTHENTICATED", "ledger reads over HTTP need an `Authorization: Bearer` token")

    async def unary(
        self,
        path: str,
        request: Any,
        response_class: Any,
        metadata: list[tuple[str, str]],
        *,
        ledger: bool = False,
        timeout: float | None = None,
    ) -> tuple[Any, dict[str, str]]:
        """One unary call (the sequencer's own, or with `ledger` the ledger's): its response and
        the response headers it maps to; a failure raises the Problem it maps to."""
        if ledger:
            self._ledger_check(metadata)
        rpc = (self.ledger if ledger else self.loopback).unary_unary(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_class.FromString,
        )
        call = rpc(request, metadata=metadata, timeout=timeout or self.timeout)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            problem = from_rpc_error(exc)
            problem.headers.update(_headers(exc.initial_metadata()))
            problem.headers.update(_headers(exc.trailing_metadata()))
            raise problem from None
        return response, {**_headers(await call.initial_metadata()), **_headers(await call.trailing_metadata())}

    async def call(self, route: Route, request: Any, metadata: list[tuple[str, str]], prefer: Sequence[str]) -> Answer:
        wait = prefer_wait(prefer)
        if route.path == GET_EVENT_STATUS and wait:
            return await self._watch(request, metadata, wait)
        applied: dict[str, str] = {}
        timeout = self.timeout
        if route.path == SUBMIT_EVENT and wait is not None:
            if not request.HasField("wait_for_terminal"):
                request.wait_for_terminal.FromSeconds(wait)
            applied["Preference-Applied"] = f"wait={wait}"
        if route.path == SUBMIT_EVENT and request.HasField("wait_for_terminal"):
            timeout += request.wait_for_terminal.ToTimedelta().total_seconds()
        response, headers = await self.unary(
            route.path,
            request,
            route.response_class,
            metadata,
            ledger=route.service == LEDGER_SERVICE,
            timeout=timeout,
        )
        headers.update(applied)
        status = 200
        if route.path == SUBMIT_EVENT:
            assert isinstance(response, sequencer_pb2.SubmitEventResponse)
            headers["Location"] = f"/v1/transactions/{response.transaction_id}"
            status = 200 if response.state in TERMINAL else 202
        return Answer(status, render(response), headers)

    async def _watch(self, request: Any, metadata: list[tuple[str, str]], wait: int) -> Answer:
        """GET /v1/transactions/{id} with `Prefer: wait=N`: the status once terminal, or as it
        stands after N seconds (the watch stream's first message is the current status)."""
        assert isinstance(request, sequencer_pb2.GetEventStatusRequest)
        rpc = self.loopback.unary_stream(
            WATCH_EVENT_STATUS,
            request_serializer=sequencer_pb2.WatchEventStatusRequest.SerializeToString,
            response_deserializer=sequencer_pb2.WatchEventStatusResponse.FromString,
        )
        call = rpc(
            sequencer_pb2.WatchEventStatusRequest(transaction_id=request.transaction_id),
            metadata=metadata,
            timeout=self.timeout + wait,
        )
        last: sequencer_pb2.EventStatus | None = None
        headers: dict[str, str] = {"Preference-Applied": f"wait={wait}"}
        try:
            async with asyncio.timeout(wait):
                async for item in call:
                    last = item.status
                    if last.state in TERMINAL:
                        break
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as exc:
            problem = from_rpc_error(exc)
            problem.headers.update(_headers(exc.initial_metadata()))
            raise problem from None
        finally:
            call.cancel()
        if last is None:
            raise Problem(504, "DEADLINE_EXCEEDED", "no status within the wait")
        return Answer(200, render(sequencer_pb2.GetEventStatusResponse(status=last)), headers)
