"""The HTTP/1.1 JSON listener (SPEC 13): aiohttp on the sequencer's own event loop.

Thin by design: match the route (routes.py, from the protos), build the request message, hand
it to the transcoder (gRPC), write the answer. Errors leave as problem+json, never as a stack
trace; anything unexpected is a generic 500 with the traceback in the log only.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from common.interceptors import MAX_CORRELATION_ID
from common.metrics import HttpMetrics
from sequencer.http import openapi
from sequencer.http.problems import CONTENT_TYPE as PROBLEM_TYPE
from sequencer.http.problems import Problem
from sequencer.http.routes import Route, build_request, load_routes, match
from sequencer.http.transcoder import Answer, Transcoder

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
# Request headers passed to gRPC as metadata (HTTP name, lower-case -> metadata key).
FORWARDED = {
    "authorization": "authorization",
    "x-correlation-id": "x-correlation-id",
    # Development mode only: the self-declared idempotency scope (as over gRPC).
    "x-client-id": "x-client-id",
    # W3C trace context, for the tracing of issue 17.
    "traceparent": "traceparent",
    "tracestate": "tracestate",
}
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
ROUTE_KEY = web.RequestKey("route", str)
CORRELATION_KEY = web.RequestKey("correlation_id", str)

Readiness = Callable[[], Awaitable[dict[str, str]]]


def idempotency_key(values: list[str]) -> str:
    """The `Idempotency-Key` header: an RFC 8941 sf-string (`"abc"`, as the IETF draft says) or,
    as many clients send it, the bare key (`abc`). The key's own rules are the sequencer's."""
    if len(values) > 1:
        raise Problem(400, "IDEMPOTENCY_KEY_INVALID", "Idempotency-Key is given more than once")
    value = values[0].strip()
    if not value.startswith('"'):
        return value
    out: list[str] = []
    escaped = False
    for index, char in enumerate(value[1:], start=1):
        if escaped:
            if char not in '"\\':
                break
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            if index != len(value) - 1:
                break
            return "".join(out)
        elif not 0x20 <= ord(char) < 0x7F:
            break
        else:
            out.append(char)
    raise Problem(400, "IDEMPOTENCY_KEY_INVALID", "Idempotency-Key is not a valid structured-field string")


def _metadata(request: web.Request, correlation_id: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = [("x-correlation-id", correlation_id)]
    for header, key in FORWARDED.items():
        if key == "x-correlation-id":
            continue
        values = request.headers.getall(header, [])
        for value in values:
            if not value.isascii() or not value.isprintable():
                raise Problem(400, "MALFORMED_REQUEST", f"header {header} must be printable ASCII")
            pairs.append((key, value))
    keys = request.headers.getall("idempotency-key", [])
    if keys:
        key = idempotency_key(keys)
        if not key.isascii() or not key.isprintable():
            raise Problem(400, "IDEMPOTENCY_KEY_INVALID", "Idempotency-Key must be printable ASCII")
        pairs.append(("idempotency-key", key))
    return pairs


def _correlation_id(request: web.Request) -> str:
    value = request.headers.get("x-correlation-id", "").strip()
    if 0 < len(value) <= MAX_CORRELATION_ID and value.isascii() and value.isprintable():
        return value
    return uuid.uuid4().hex


def _problem_response(problem: Problem, correlation_id: str, instance: str) -> web.Response:
    headers = {**problem.headers, "X-Correlation-Id": problem.headers.get("X-Correlation-Id", correlation_id)}
    return web.Response(
        status=problem.status,
        body=problem.body(correlation_id=headers["X-Correlation-Id"], instance=instance),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )


def _is_json(content_type: str) -> bool:
    return content_type == JSON_TYPE or (content_type.startswith("application/") and content_type.endswith("+json"))


@dataclass
class HttpSettings:
    address: str
    max_body_bytes: int
    max_message_bytes: int
    tls_cert: str = ""
    tls_key: str = ""


class HttpApi:
    """The aiohttp application and its runner; `start()` binds, `stop()` drains and closes."""

    def __init__(
        self,
        settings: HttpSettings,
        transcoder: Transcoder,
        metrics: HttpMetrics,
        readiness: Readiness,
        extra_routes: Callable[[web.Application], None] | None = None,
    ) -> None:
        self.settings = settings
        self.transcoder = transcoder
        self.metrics = metrics
        self.readiness = readiness
        self.routes: list[Route] = load_routes()
        self.document = openapi.render(openapi.build(self.routes))
        self.app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[self._observe])
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/openapi.json", self.openapi)
        if extra_routes is not None:
            extra_routes(self.app)
        self.app.router.add_route("*", "/{tail:.*}", self.transcode)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        host, _, port = self.settings.address.rpartition(":")
        context = None
        if self.settings.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        site = web.TCPSite(self.runner, host.strip("[]"), int(port), ssl_context=context, reuse_port=False)
        await site.start()
        # aiohttp exposes the bound port (port 0 in tests) only through the asyncio server.
        server = site._server
        assert isinstance(server, asyncio.Server) and server.sockets
        self.port = int(server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @web.middleware
    async def _observe(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        """Metrics and one log line per request, labelled by route template (never the raw path)."""
        started = time.perf_counter()
        request[ROUTE_KEY] = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.perf_counter() - started
            method = request.method if request.method in KNOWN_METHODS else "OTHER"
            route = request.get(ROUTE_KEY) or "unmatched"
            self.metrics.observe(method, route, status, elapsed)
            log.info(
                "http",
                extra={
                    "method": method,
                    "route": route,
                    "status_code": status,
                    "latency_ms": round(elapsed * 1000, 2),
                    "correlation_id": request.get(CORRELATION_KEY, ""),
                },
            )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = await self.readiness()
        if all(v == "ok" for v in checks.values()):
            return web.json_response({"status": "ready", "checks": checks})
        problem = Problem(503, "NOT_READY", "a dependency is not reachable", metadata=checks)
        return _problem_response(problem, uuid.uuid4().hex, "/readyz")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.document, content_type=JSON_TYPE)

    async def transcode(self, request: web.Request) -> web.Response:
        correlation_id = _correlation_id(request)
        request[CORRELATION_KEY] = correlation_id
        request[ROUTE_KEY] = "unmatched"
        path = request.rel_url.raw_path
        try:
            found = match(self.routes, request.method, path)
            request[ROUTE_KEY] = found.route.template
            answer = await self._answer(request, found.route, found.params, correlation_id)
        except Problem as problem:
            return _problem_response(problem, correlation_id, path)
        except Exception:  # the log gets the traceback, the caller a generic answer
            log.exception("unhandled error in the HTTP layer")
            return _problem_response(Problem(500, "INTERNAL", "internal error"), correlation_id, path)
        headers = {"X-Correlation-Id": correlation_id, **answer.headers}
        return web.Response(status=answer.status, body=answer.body, content_type=JSON_TYPE, headers=headers)

    async def _answer(self, request: web.Request, route: Route, params: dict[str, str], correlation_id: str) -> Answer:
        metadata = _metadata(request, correlation_id)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Problem(
                413,
                "REQUEST_TOO_LARGE",
                f"the body is larger than {self.settings.max_body_bytes} bytes",
                metadata={"max_body_bytes": str(self.settings.max_body_bytes)},
            ) from None
        if body.strip() and not _is_json(request.content_type):
            raise Problem(415, "UNSUPPORTED_MEDIA_TYPE", "the body must be application/json")
        message = build_request(route, params, request.rel_url.query.items(), body)
        if message.ByteSize() > self.settings.max_message_bytes:
            raise Problem(
                413,
                "REQUEST_TOO_LARGE",
                f"the request is larger than {self.settings.max_message_bytes} bytes as a message",
                metadata={"max_message_bytes": str(self.settings.max_message_bytes)},
            )
        return await self.transcoder.call(route, message, metadata, request.headers.getall("prefer", []))
