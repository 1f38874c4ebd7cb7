"""Prometheus metrics both services expose; each process owns its registry (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """The process (CPU, memory, file descriptors), platform (Python version) and GC
    collectors, which the default registry has and a registry of our own does not."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def serve_metrics(registry: CollectorRegistry, address: str) -> int:
    """Starts the /metrics HTTP endpoint in a daemon thread; returns the bound port
    (address host:port; port 0 picks a free one, which the start-up log line reports)."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return int(server.server_port)
