"""Prometheus metrics both services expose; each process owns its registry (no globals)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """The process (CPU, memory, file descriptors), platform (Python version) and GC
    collectors, which the default registry has and a registry of our own does not."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class HttpMetrics:
    """The HTTP listener's series (OpenTelemetry's HTTP semantic conventions, Prometheus style):
    `route` is the template (`/v1/transactions/{transaction_id}`), never the raw path, so the
    label set stays bounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_server_requests",
            "HTTP requests handled, by method, route template and status code",
            ["method", "route", "status_code"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_server_request_duration_seconds",
            "HTTP request handling time, by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, route: str, status_code: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status_code)).inc()
        self.duration.labels(method, route).observe(seconds)


def serve_metrics(registry: CollectorRegistry, address: str) -> int:
    """Starts the /metrics HTTP endpoint in a daemon thread; returns the bound port
    (address host:port; port 0 picks a free one, which the start-up log line reports)."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return int(server.server_port)
