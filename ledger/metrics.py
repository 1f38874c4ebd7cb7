"""The ledger's Prometheus series (one registry per process, passed in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from common.grpc_metrics import GrpcServerMetrics
from common.metrics import add_runtime_collectors


class LedgerMetrics:
    """The ledger's Prometheus metrics, in the registry the server owns (no globals)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        add_runtime_collectors(registry)
        self.grpc = GrpcServerMetrics(registry)
        self.outcomes = Counter("ledger_outcomes", "ApplyEvent results, by outcome", ["outcome"], registry=registry)
