"""The integration dashboard (SPEC 15): server-rendered, read-only HTML on the HTTP listener.

`/dashboard` shows open gaps with their age, blocked events, parked counts, recent rejections
and throughput; `/dashboard/entity?type=&id=` drills into one entity (watermark, parked events,
ledger history). Works without JavaScript (a `<meta http-equiv="refresh">` reloads it), no
external assets. Its reads are the admin RPCs, called like any HTTP request is (through the
transcoder, with the caller's credentials), so the gRPC role policy decides who may look; the
two things no RPC serves (the latest rejections, this replica's throughput) are read in-process
only after an admin RPC has succeeded for the caller.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import datetime as dt
import html
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.http.problems import Problem
from sequencer.http.routes import enum_value
from sequencer.http.transcoder import Transcoder

_ADMIN = "/logistics.sequencer.v1.SequencerAdminService/"
_LEDGER = "/logistics.ledger.v1.LedgerService/"
REFRESH_SECONDS = 10
# Throughput: one sample of the outcome counters every SAMPLE_SECONDS, WINDOW_MINUTES kept.
SAMPLE_SECONDS = 5.0
WINDOW_MINUTES = 15
LIST_LIMIT = 100
REJECTIONS_SHOWN = 20

Rejections = Callable[[int], Awaitable[list[sequencer_pb2.EventStatus]]]

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem;color:#1d2330;background:#f7f8fa}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.muted{color:#667085;font-size:.85rem}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #d0d5dd;padding:.3rem .5rem;text-align:left;font-size:.9rem;vertical-align:top}
th{background:#eef1f5}.alert{color:#b42318;font-weight:600}.ok{color:#067647}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#fff;border:1px solid #d0d5dd;padding:.6rem 1rem}
.card b{display:block;font-size:1.5rem}.bar{background:#5b8def;height:.8rem;display:inline-block}
form{margin:.5rem 0}input,select{padding:.2rem}code{font-size:.85rem}
"""


class Throughput:
    """Samples this replica's ledger-outcome counter, so the page can show outcomes per minute
    over the last minutes without a scan of the events table. Per replica, and empty right
    after a start: the page says so."""

    def __init__(self, outcomes: Counter) -> None:
        self.outcomes = outcomes
        self.samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque(
            maxlen=int(WINDOW_MINUTES * 60 / SAMPLE_SECONDS) + 2
        )
        self.task: asyncio.Task[None] | None = None

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.outcomes.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels.get("outcome", "")] = sample.value
        return out

    def sample(self) -> None:
        self.samples.append((time.time(), self.totals()))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_SECONDS)

    def per_minute(self) -> list[tuple[dt.datetime, dict[str, int] | None]]:
        """Outcomes per minute, oldest first: the counter's growth between minute boundaries
        (None for a minute before the first sample: not known, rather than zero)."""
        now = time.time()
        points = [*self.samples, (now, self.totals())]
        minutes: list[tuple[dt.datetime, dict[str, int] | None]] = []
        start = (now // 60 - (WINDOW_MINUTES - 1)) * 60
        for index in range(WINDOW_MINUTES):
            begin, end = start + index * 60, start + (index + 1) * 60
            inside = [p for p in points if begin <= p[0] < end] or []
            before = [p for p in points if p[0] < begin]
            first = before[-1][1] if before else (inside[0][1] if inside else None)
            last = inside[-1][1] if inside else None
            counts: dict[str, int] | None = None
            if first is not None and last is not None:
                counts = {name: int(value - first.get(name, 0.0)) for name, value in last.items()}
            minutes.append((dt.datetime.fromtimestamp(begin, dt.UTC), counts))
        return minutes


def _credentials(request: web.Request, development: bool) -> list[tuple[str, str]]:
    """A browser presents the admin token as the password of HTTP Basic (any user name), or as
    `Authorization: Bearer`; both become the bearer token of the admin RPCs."""
    value = request.headers.get("authorization", "")
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(rest.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Problem(401, "UNAUTHENTICATED", "malformed Basic credentials") from None
        return [("authorization", f"Bearer {password}")] if password else []
    if value:
        return [("authorization", value)]
    if not development:
        raise Problem(401, "UNAUTHENTICATED", "the dashboard needs admin credentials")
    return []


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ts(stamp: Any) -> str:
    if stamp is None or not stamp.seconds:
        return ""
    return str(stamp.ToDatetime(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _type_name(entity_type: int) -> str:
    name = events_pb2.EntityType.Name(entity_type)  # type: ignore[arg-type]
    return str(name).removeprefix("ENTITY_TYPE_").lower().replace("_", "-")


def _entity_link(entity: events_pb2.EntityRef) -> str:
    query = urllib.parse.urlencode({"type": _type_name(entity.entity_type), "id": entity.entity_id})
    return f'<a href="/dashboard/entity?{_e(query)}">{_e(_type_name(entity.entity_type))} {_e(entity.entity_id)}</a>'


def _state(state: int) -> str:
    return str(events_pb2.EventState.Name(state)).removeprefix("EVENT_STATE_")  # type: ignore[arg-type]


def _table(headers: Iterable[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str, *, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="muted">generated {now}'
        + (f"; reloads every {REFRESH_SECONDS} s" if refresh else "")
        + ' · <a href="/dashboard">overview</a></p>'
        + body
        + "</body></html>"
    )


class Dashboard:
    def __init__(self, transcoder: Transcoder, rejections: Rejections, throughput: Throughput) -> None:
        self.transcoder = transcoder
        self.rejections = rejections
        self.throughput = throughput

    def install(self, app: web.Application) -> None:
        app.router.add_get("/dashboard", self.overview)
        app.router.add_get("/dashboard/entity", self.entity)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self.throughput.task = asyncio.create_task(self.throughput.run(), name="dashboard-throughput")

    async def _stop(self, app: web.Application) -> None:
        if self.throughput.task is not None:
            self.throughput.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.throughput.task

    async def _admin(self, method: str, request: Any, response_class: Any, metadata: list[tuple[str, str]]) -> Any:
        response, _ = await self.transcoder.unary(_ADMIN + method, request, response_class, metadata)
        return response

    def _error(self, problem: Problem) -> web.Response:
        headers = {}
        if problem.status == 401:
            # A browser asks for credentials on a Basic challenge (the token as the password).
            headers["WWW-Authenticate"] = 'Basic realm="logistics dashboard", charset="UTF-8"'
        body = f'<p class="alert">{_e(problem.status)} {_e(problem.reason)}: {_e(problem.detail)}</p>'
        if problem.status in (401, 403):
            body += "<p>The dashboard needs an admin token: as the password of HTTP Basic, or as a Bearer token.</p>"
        return web.Response(
            status=problem.status,
            text=_page("Integration dashboard", body, refresh=False),
            content_type="text/html",
            headers=headers,
        )

    async def overview(self, request: web.Request) -> web.Response:
        try:
            metadata = _credentials(request, self.transcoder.authenticator.development)
            gaps = await self._admin(
                "ListGaps",
                sequencer_pb2.ListGapsRequest(page_size=LIST_LIMIT),
                sequencer_pb2.ListGapsResponse,
                metadata,
            )
            blocked = await self._admin(
                "ListBlockedEvents",
                sequencer_pb2.ListBlockedEventsRequest(page_size=LIST_LIMIT),
                sequencer_pb2.ListBlockedEventsResponse,
                metadata,
            )
            blocked_entities = []
            for status in blocked.blocked_events[:LIST_LIMIT]:
                entity = await self._admin(
                    "GetEntity",
                    sequencer_pb2.GetEntityRequest(entity=status.entity),
                    sequencer_pb2.GetEntityResponse,
                    metadata,
                )
                blocked_entities.append((status, entity.entity))
            # Admin RPCs answered for this caller: the in-process reads may follow.
            rejected = await self.rejections(REJECTIONS_SHOWN)
        except Problem as problem:
            return self._error(problem)
        body = self._summary(gaps, blocked_entities)
        body += self._jump()
        body += self._gaps(gaps)
        body += self._blocked(blocked_entities)
        body += self._rejections(rejected)
        body += self._throughput()
        return web.Response(
            text=_page("Integration dashboard", body, refresh=True), content_type="text/html", charset="utf-8"
        )

    @staticmethod
    def _summary(gaps: Any, blocked: list[tuple[Any, Any]]) -> str:
        alerting = sum(1 for g in gaps.gaps if g.alerting)
        parked = sum(g.parked_count for g in gaps.gaps) + sum(e.parked_count for _, e in blocked)
        more = " (first page)" if gaps.next_page_token else ""
        cards = [
            ("open gaps" + more, len(gaps.gaps), alerting > 0),
            ("alerting gaps", alerting, alerting > 0),
            ("blocked events", len(blocked), bool(blocked)),
            ("parked events", parked, False),
        ]
        inner = "".join(
            f'<div class="card" id="card-{_e(name.split(" ")[0])}-{_e(name.split(" ")[1])}">{_e(name)}'
            f'<b class="{"alert" if bad else "ok"}">{_e(count)}</b></div>'
            for name, count, bad in cards
        )
        return f'<div class="cards">{inner}</div>'

    @staticmethod
    def _jump() -> str:
        return (
            '<form method="get" action="/dashboard/entity"><label>Entity '
            '<select name="type"><option value="shipment">shipment</option>'
            '<option value="inventory-item">inventory item</option></select></label> '
            '<input name="id" placeholder="SHP-1 or SKU-1" required> <button type="submit">Show</button></form>'
        )

    @staticmethod
    def _gaps(gaps: Any) -> str:
        rows = [
            [
                _entity_link(g.entity),
                _e(g.awaiting_sequence),
                _e(g.parked_count),
                _e(_ts(g.first_seen_at)),
                f'<span class="{"alert" if g.alerting else ""}">{_e(_age(g.age.ToTimedelta().total_seconds()))}</span>',
                "alerting" if g.alerting else "",
            ]
            for g in gaps.gaps
        ]
        table = _table(
            ["entity", "awaiting MSI", "parked", "first seen", "age", ""],
            rows,
            "No open gaps: every entity is in order.",
        )
        return f'<h2 id="gaps">Open gaps</h2>{table}'

    @staticmethod
    def _blocked(blocked: list[tuple[Any, Any]]) -> str:
        rows = [
            [
                _entity_link(s.entity),
                _e(s.sequence),
                _e(s.reason),
                _e(s.ledger_code),
                _e(_ts(s.blocked_at)),
                _e(e.parked_count),
                _e(s.reason_detail),
                f"<code>{_e(s.transaction_id)}</code>",
            ]
            for s, e in blocked
        ]
        table = _table(
            ["entity", "MSI", "reason", "ledger code", "blocked since", "parked behind", "detail", "transaction"],
            rows,
            "No blocked events.",
        )
        return (
            f'<h2 id="blocked">Blocked events</h2>{table}<p class="muted">Operators decide with RetryBlockedEvent '
            "or SkipSequence (docs/blocked-events.md); this page is read-only.</p>"
        )

    @staticmethod
    def _rejections(rejected: list[sequencer_pb2.EventStatus]) -> str:
        rows = [
            [
                _entity_link(s.entity),
                _e(s.sequence),
                _e(s.reason),
                _e(s.reason_detail),
                _e(_ts(s.processed_at)),
                f"<code>{_e(s.transaction_id)}</code>",
            ]
            for s in rejected
        ]
        table = _table(["entity", "MSI", "reason", "detail", "processed", "transaction"], rows, "No rejections.")
        return f'<h2 id="rejections">Recent rejections</h2>{table}'

    def _throughput(self) -> str:
        minutes = self.throughput.per_minute()
        peak = max([sum(c.values()) for _, c in minutes if c is not None] + [1])
        rows = []
        for start, counts in minutes:
            if counts is None:
                rows.append(
                    [
                        _e(start.strftime("%H:%M")),
                        "&ndash;",
                        "&ndash;",
                        "&ndash;",
                        '<span class="muted">not sampled</span>',
                    ]
                )
                continue
            total = sum(counts.values())
            width = int(200 * total / peak)
            rows.append(
                [
                    _e(start.strftime("%H:%M")),
                    _e(counts.get("EVENT_STATE_APPLIED", 0)),
                    _e(counts.get("EVENT_STATE_REJECTED", 0)),
                    _e(total),
                    f'<span class="bar" style="width:{width}px"></span>',
                ]
            )
        table = _table(["minute (UTC)", "applied", "rejected", "all outcomes", ""], rows, "")
        return (
            f'<h2 id="throughput">Throughput, last {WINDOW_MINUTES} minutes</h2>{table}'
            '<p class="muted">Ledger outcomes recorded by this replica\'s forwarder, per minute '
            "(sampled in memory: empty right after a start; other replicas count their own).</p>"
        )

    async def _history(self, ref: events_pb2.EntityRef, metadata: list[tuple[str, str]]) -> Any:
        """The ledger's history of the entity; none yet (NOT_FOUND) is an empty one here."""
        try:
            history, _ = await self.transcoder.unary(
                _LEDGER + "ListEntityHistory",
                ledger_pb2.ListEntityHistoryRequest(entity=ref, page_size=LIST_LIMIT),
                ledger_pb2.ListEntityHistoryResponse,
                metadata,
                ledger=True,
            )
        except Problem as problem:
            if problem.status != 404:
                raise
            return ledger_pb2.ListEntityHistoryResponse()
        return history

    async def entity(self, request: web.Request) -> web.Response:
        kind = request.query.get("type", "")
        entity_id = request.query.get("id", "")
        try:
            metadata = _credentials(request, self.transcoder.authenticator.development)
            type_name = enum_value(events_pb2.EntityType.DESCRIPTOR, kind)
            if (
                type_name not in events_pb2.EntityType.DESCRIPTOR.values_by_name
                or type_name.endswith("UNSPECIFIED")
                or not entity_id
            ):
                raise Problem(400, "MALFORMED_REQUEST", "type (shipment, inventory-item) and id are required")
            ref = events_pb2.EntityRef(entity_type=events_pb2.EntityType.Value(type_name), entity_id=entity_id)
            entity = (
                await self._admin(
                    "GetEntity", sequencer_pb2.GetEntityRequest(entity=ref), sequencer_pb2.GetEntityResponse, metadata
                )
            ).entity
            parked = await self._admin(
                "ListParkedEvents",
                sequencer_pb2.ListParkedEventsRequest(entity=ref, page_size=LIST_LIMIT),
                sequencer_pb2.ListParkedEventsResponse,
                metadata,
            )
            history = await self._history(ref, metadata)
        except Problem as problem:
            return self._error(problem)
        title = f"Entity {_type_name(ref.entity_type)} {entity_id}"
        facts = [
            ("watermark (last MSI processed)", entity.watermark),
            ("parked events", entity.parked_count),
            ("awaiting MSI", entity.awaiting_sequence or "none"),
            (
                "oldest gap age",
                _age(entity.oldest_gap_age.ToTimedelta().total_seconds()) if entity.awaiting_sequence else "",
            ),
            ("last outcome", _state(entity.last_outcome) if entity.last_outcome else ""),
            ("last outcome reason", entity.last_outcome_reason),
            ("blocked at MSI", entity.blocked_sequence or "none"),
            ("blocked since", _ts(entity.blocked_since)),
            ("blocked reason", entity.blocked_reason),
            ("updated", _ts(entity.updated_at)),
        ]
        body = _table(
            ["", "value"], [[_e(k), f'<span id="fact-{i}">{_e(v)}</span>'] for i, (k, v) in enumerate(facts)], ""
        )
        parked_rows = [
            [
                _e(p.event.sequence),
                _e(p.event.WhichOneof("payload") or ""),
                _e(_ts(p.parked_at)),
                f"<code>{_e(p.transaction_id)}</code>",
            ]
            for p in parked.parked_events
        ]
        body += '<h2 id="parked">Parked events</h2>' + _table(
            ["MSI", "kind", "parked at", "transaction"], parked_rows, "Nothing parked."
        )
        history_rows = [
            [
                _e(h.sequence),
                _e(h.kind),
                _e(str(ledger_pb2.ApplyOutcome.Name(h.outcome)).removeprefix("APPLY_OUTCOME_")),
                _e(h.reason),
                _e(h.reason_detail),
                _e(_ts(h.processed_at)),
                f"<code>{_e(h.correlation_id)}</code>",
            ]
            for h in history.entries
        ]
        body += '<h2 id="history">Ledger history</h2>' + _table(
            ["MSI", "kind", "outcome", "reason", "detail", "processed", "correlation id"],
            history_rows,
            "The ledger has processed nothing for this entity yet.",
        )
        return web.Response(text=_page(title, body, refresh=True), content_type="text/html", charset="utf-8")
