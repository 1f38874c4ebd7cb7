"""Prometheus metrics both services expose; each process owns its registry (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.requests = Counter(
            f"{service}_rpc_requests", "RPCs handled, by method and status code", ["method", "code"], registry=registry
        )
        self.latency = Histogram(
            f"{service}_rpc_latency_seconds",
            "RPC handling time, by method and status code",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)


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
