"""Builds and runs the sequencer's grpc.aio server: servicers, health, reflection, interceptors,
and the background work (forwarder, webhook dispatcher, key sweeper, gap monitor, broker bridges,
outcome publishers)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from common.auth import Authenticator, current_identity
from common.clock import Clock, SystemClock
from common.db import make_engine, require_migrated
from common.grpc_metrics import ClientMetricsInterceptor, MetricsInterceptor, methods_of
from common.grpc_server import (
    add_health_and_reflection,
    bind,
    bounded,
    channel,
    new_server,
    serve,
    served_methods,
    set_serving,
)
from common.interceptors import Gate
from common.metrics import HttpMetrics
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from sequencer import outcomes, repository
from sequencer.admission import Admission, Limits
from sequencer.bridges import Bridges
from sequencer.config import Settings
from sequencer.dispatcher import Dispatcher
from sequencer.forwarder import Forwarder
from sequencer.forwarding import ForwardingStore
from sequencer.gaps import GapMonitor
from sequencer.http.dashboard import Dashboard, Throughput
from sequencer.http.server import HttpApi, HttpSettings
from sequencer.http.transcoder import Transcoder
from sequencer.idempotency import caller_scope
from sequencer.ingress import Ingress
from sequencer.interceptors import build_interceptor
from sequencer.interventions import Interventions
from sequencer.metrics import SequencerMetrics
from sequencer.notifications import Notifier
from sequencer.outcomes import OutcomePublisher
from sequencer.reads import Reads
from sequencer.servicer import AdminServicer, SequencerServicer
from sequencer.sweeper import Sweeper
from sequencer.watch import Watches
from sequencer.webhooks import Webhooks

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Open status streams have their own per-caller cap (SEQUENCER_WATCHERS_PER_CALLER) and last
# minutes: they would starve the in-flight slots of a caller's requests.
UNGATED = frozenset({"/logistics.sequencer.v1.SequencerService/WatchEventStatus"})
SERVICE_NAMES = (
    sequencer_pb2.DESCRIPTOR.services_by_name["SequencerService"].full_name,
    sequencer_pb2.DESCRIPTOR.services_by_name["SequencerAdminService"].full_name,
)
LEDGER_SERVICE = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name


@dataclass
class App:
    """A started sequencer: the server, its port, and what must be stopped with it."""

    server: grpc.aio.Server
    port: int
    engine: AsyncEngine
    health: health.aio.HealthServicer
    ingress: Ingress
    reads: Reads
    gaps: GapMonitor
    notifier: Notifier
    forwarder: Forwarder
    metrics: SequencerMetrics
    ledger_channel: grpc.aio.Channel
    authenticator: Authenticator
    admission: Admission
    dispatcher: Dispatcher
    bridges: Bridges = field(default_factory=Bridges)
    publishers: list[OutcomePublisher] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The HTTP/JSON listener (None when SEQUENCER_HTTP_ADDR is off), the channels it calls
    # through, and the private directory of the gRPC server's Unix socket it calls.
    http: HttpApi | None = None
    http_port: int = 0
    http_channels: list[grpc.aio.Channel] = field(default_factory=list)
    socket_dir: str = ""

    def listening_fields(self) -> dict[str, object]:
        """Extra fields of the start-up line: where the HTTP listener is."""
        return {"http_port": self.http_port} if self.http is not None else {}

    async def stop(self, grace: float = 1.0) -> None:
        await set_serving(self.health, SERVICE_NAMES, False)
        await self.drain()
        await bounded(self.server.stop(grace), grace + 5, "grpc server")
        await self.close()

    async def drain(self) -> None:
        """Stops the HTTP listener first: its requests are gRPC calls to this server."""
        if self.http is not None:
            await bounded(self.http.stop(), 10, "http listener")

    async def close(self) -> None:
        await self.drain()
        for http_channel in self.http_channels:
            await bounded(http_channel.close(), 5, "http channel")
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        # The broker doors before the ingress: deliveries not yet committed go back to the
        # broker, instead of being refused by a closing ingress.
        await bounded(self.bridges.close(), 10, "broker bridges")
        for task in self.tasks:
            task.cancel()
        await bounded(asyncio.gather(*self.tasks, return_exceptions=True), 5, "background tasks")
        await bounded(self.ingress.close(), 5, "ingress")
        await bounded(self.forwarder.close(), 5, "forwarder")
        await bounded(self.dispatcher.close(), 5, "webhook dispatcher")
        for publisher in self.publishers:
            await bounded(publisher.close(), 5, f"outcome publisher {publisher.sink.name}")
        await bounded(self.notifier.close(), 5, "notification listener")
        await bounded(self.ledger_channel.close(), 5, "ledger channel")
        await self.engine.dispose()


def admission_gate(admission: Admission) -> Gate:
    """The interceptor's gate: every RPC but the status streams holds one in-flight slot of its
    caller (the idempotency scope) while it is handled."""

    @contextlib.contextmanager
    def gate(method: str, metadata: tuple[Any, ...]) -> Iterator[None]:
        if method in UNGATED:
            yield
            return
        with admission.hold(caller_scope(current_identity(), metadata)):
            yield

    return gate


async def build_server(
    settings: Settings,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    run_forwarder: bool = True,
    run_dispatcher: bool = True,
) -> App:
    """Builds, starts and returns the server (no globals: tests run several on port 0)."""
    clock = clock or SystemClock()
    authenticator = Authenticator.from_file(settings.security.identities_file)
    registry = registry or CollectorRegistry()
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, application_name="sequencer")
    try:
        await require_migrated(engine, MIGRATIONS, "sequencer")
    except BaseException:
        await engine.dispose()
        raise
    metrics = SequencerMetrics(registry)
    notifier = Notifier(settings.database_url)
    # Names this process in its notifications, so it can ignore its own wake-ups.
    instance = uuid.uuid4().hex
    admission = Admission(
        Limits(settings.max_inflight_per_caller, settings.max_backlog, settings.backlog_refresh_interval), metrics
    )
    ingress = Ingress(settings.database_url, settings, clock, metrics, instance, admission)
    interventions = Interventions(engine, settings, clock, metrics, ingress.answers, instance)
    reads = Reads(engine, settings, clock)
    gaps = GapMonitor(engine, settings, clock, metrics)
    ledger_channel = channel(
        settings.ledger_target,
        ca=settings.ledger_tls_ca,
        cert=settings.ledger_tls_cert,
        key=settings.ledger_tls_key,
        server_name=settings.ledger_tls_server_name,
        token_file=settings.ledger_token_file,
        interceptors=[ClientMetricsInterceptor(metrics.grpc_client, methods_of([LEDGER_SERVICE]))],
    )
    store = ForwardingStore(engine, settings, clock, metrics, instance)
    ledger = ledger_pb2_grpc.LedgerServiceStub(ledger_channel)
    forwarder = Forwarder(ledger, store, notifier, settings, clock, metrics)
    if run_forwarder:
        ingress.on_queued = interventions.on_queued = forwarder.kick
    webhooks = Webhooks(engine, settings, clock, ingress.answers, development=authenticator.development)
    dispatcher = Dispatcher(engine, settings, clock, metrics, notifier, instance)
    webhooks.on_work = dispatcher.kick

    server = new_server(
        [
            MetricsInterceptor(metrics.grpc, served_methods(SERVICE_NAMES)),
            build_interceptor(authenticator, admission_gate(admission), settings.security.max_message_bytes),
        ],
        settings.security,
    )
    watches = Watches(reads, notifier, settings.watchers_per_caller)
    sequencer_pb2_grpc.add_SequencerServiceServicer_to_server(
        SequencerServicer(ingress, reads, watches, settings), server
    )
    sequencer_pb2_grpc.add_SequencerAdminServiceServicer_to_server(
        AdminServicer(reads, interventions, webhooks), server
    )
    health_servicer = add_health_and_reflection(server, SERVICE_NAMES)
    port = bind(server, settings.listen_addr, settings.security)
    socket_dir = ""
    if settings.http_addr:
        # The HTTP listener's calls come in here: a Unix socket in a directory only this user
        # can open, so it needs no TLS of its own and is never reachable from the network.
        socket_dir = tempfile.mkdtemp(prefix="sequencer-http-")
        server.add_insecure_port(f"unix:{socket_dir}/grpc.sock")
    # The backlog is counted before the first request is admitted, then about once a second.
    held = _held_counter(engine)
    await admission.refresh(held)
    await notifier.start()
    ingress.start()
    await server.start()
    app = App(
        server,
        port,
        engine,
        health_servicer,
        ingress,
        reads,
        gaps,
        notifier,
        forwarder,
        metrics,
        ledger_channel,
        authenticator,
        admission,
        dispatcher,
        socket_dir=socket_dir,
    )
    if settings.http_addr:
        try:
            await _start_http(app, settings, registry)
        except BaseException:
            # E.g. the HTTP port is taken: nothing started may outlive the failed start.
            await app.stop(0)
            raise
    app.tasks.append(asyncio.create_task(Sweeper(engine, settings, clock).run(), name="key-sweeper"))
    app.tasks.append(asyncio.create_task(gaps.run(), name="gap-monitor"))
    app.tasks.append(asyncio.create_task(admission.run(held), name="backlog-count"))
    if run_forwarder:
        app.tasks.append(asyncio.create_task(forwarder.run(), name="forwarder"))
    if run_dispatcher:
        app.tasks.append(asyncio.create_task(dispatcher.run(), name="webhook-dispatcher"))
    app.bridges = Bridges.build(ingress, settings.brokers, metrics)
    app.bridges.start()
    app.publishers = outcomes.build(settings.brokers, engine, clock, metrics, notifier, instance)
    for publisher in app.publishers:
        app.tasks.append(asyncio.create_task(publisher.run(), name=f"outcomes-{publisher.sink.name}"))
    await set_serving(health_servicer, SERVICE_NAMES, True)
    return app


def _held_counter(engine: AsyncEngine) -> Callable[[int], Awaitable[int]]:
    """The backlog count admission runs about once a second: one statement on a pooled connection."""

    async def count(cap: int) -> int:
        async with engine.connect() as conn:
            return await repository.count_held(conn, cap)

    return count


async def _start_http(app: App, settings: Settings, registry: CollectorRegistry) -> None:
    """The HTTP/JSON listener: its RPCs go to this server's Unix socket, its ledger reads to the
    ledger with the caller's credentials (the ledger channel's TLS settings, not its token)."""
    limits = [
        ("grpc.max_receive_message_length", settings.security.max_message_bytes),
        ("grpc.max_send_message_length", settings.security.max_message_bytes),
    ]
    loopback = grpc.aio.insecure_channel(f"unix:{app.socket_dir}/grpc.sock", options=limits)
    ledger = channel(
        settings.ledger_target,
        ca=settings.ledger_tls_ca,
        cert=settings.ledger_tls_cert,
        key=settings.ledger_tls_key,
        server_name=settings.ledger_tls_server_name,
    )
    app.http_channels += [loopback, ledger]
    transcoder = Transcoder(
        loopback,
        ledger,
        app.authenticator,
        settings.http_timeout,
        ledger_has_client_certificate=bool(settings.ledger_tls_cert),
    )

    async def readiness() -> dict[str, str]:
        return {"database": await _database_ready(app.engine), "ledger": await _ledger_ready(app.ledger_channel)}

    http_settings = HttpSettings(
        settings.http_addr,
        settings.http_max_body_bytes,
        settings.security.max_message_bytes,
        tls_cert=settings.security.tls_cert,
        tls_key=settings.security.tls_key,
    )
    dashboard = Dashboard(transcoder, app.reads.recent_rejections, Throughput(app.metrics.ledger_outcomes))
    app.http = HttpApi(http_settings, transcoder, HttpMetrics(registry), readiness, dashboard.install)
    app.http_port = await app.http.start()


async def _database_ready(engine: AsyncEngine) -> str:
    try:
        async with asyncio.timeout(2):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the name says which
        return f"unreachable ({type(exc).__name__})"
    return "ok"


async def _ledger_ready(ledger_channel: grpc.aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(ledger_channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.aio.AioRpcError as exc:
        return f"unreachable ({exc.code().name})"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return "ok"


async def main() -> None:
    settings = Settings.from_env()
    await serve("sequencer", settings, build_server, SERVICE_NAMES, ledger=settings.ledger_target)
