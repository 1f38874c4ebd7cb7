"""The ledger's Prometheus series (one registry per process, passed in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from common.metrics import RpcMetrics


class LedgerMetrics:
    """The ledger's Prometheus metrics, in the registry the server owns (no globals)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rpc = RpcMetrics(registry, "ledger")
        self.outcomes = Counter("ledger_outcomes", "ApplyEvent results, by outcome", ["outcome"], registry=registry)
