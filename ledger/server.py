"""Builds and runs the ledger's grpc.aio server: servicer, health, reflection, interceptor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from common.auth import Authenticator
from common.db import make_engine, require_migrated
from common.grpc_metrics import MetricsInterceptor
from common.grpc_server import add_health_and_reflection, bind, bounded, new_server, serve, served_methods, set_serving
from ledger.config import Settings
from ledger.interceptors import build_interceptor
from ledger.metrics import LedgerMetrics
from ledger.service import Ledger
from ledger.servicer import LedgerServicer
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAMES = (ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,)


@dataclass
class App:
    """A started ledger: the server, its port, and what must be stopped with it."""

    server: grpc.aio.Server
    port: int
    engine: AsyncEngine
    health: health.aio.HealthServicer
    service: Ledger
    metrics: LedgerMetrics
    authenticator: Authenticator

    async def stop(self, grace: float = 1.0) -> None:
        await set_serving(self.health, SERVICE_NAMES, False)
        await bounded(self.server.stop(grace), grace + 5, "grpc server")
        await self.close()

    async def close(self) -> None:
        await self.engine.dispose()


async def build_server(settings: Settings, *, registry: CollectorRegistry | None = None) -> App:
    """Builds, starts and returns the server (no globals: tests run several on port 0)."""
    registry = registry or CollectorRegistry()
    authenticator = Authenticator.from_file(settings.security.identities_file)
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, application_name="ledger")
    try:
        await require_migrated(engine, MIGRATIONS, "ledger")
    except BaseException:
        await engine.dispose()
        raise
    metrics = LedgerMetrics(registry)
    service = Ledger(engine, metrics, lock_strategy=settings.lock_strategy, max_batch=settings.max_batch)
    server = new_server(
        [
            MetricsInterceptor(metrics.grpc, served_methods(SERVICE_NAMES)),
            build_interceptor(authenticator, settings.security.max_message_bytes),
        ],
        settings.security,
    )
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerServicer(service), server)
    health_servicer = add_health_and_reflection(server, SERVICE_NAMES)
    port = bind(server, settings.listen_addr, settings.security)
    await server.start()
    app = App(server, port, engine, health_servicer, service, metrics, authenticator)
    await set_serving(health_servicer, SERVICE_NAMES, True)
    return app


async def main() -> None:
    settings = Settings.from_env()
    await serve("ledger", settings, build_server, SERVICE_NAMES, lock_strategy=settings.lock_strategy)
