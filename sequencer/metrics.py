"""The sequencer's Prometheus series (one registry per process, passed in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.grpc_metrics import GrpcClientMetrics, GrpcServerMetrics
from common.metrics import LATENCY_BUCKETS, add_runtime_collectors


class SequencerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        add_runtime_collectors(registry)
        self.grpc = GrpcServerMetrics(registry)
        # The forwarder's calls to the ledger (grpc_client_*).
        self.grpc_client = GrpcClientMetrics(registry)
        self.events = Counter("sequencer_events", "Events by the state they entered", ["state"], registry=registry)
        self.replays = Counter(
            "sequencer_idempotency_replays", "Requests answered from a stored idempotency record", registry=registry
        )
        self.parked = Gauge("sequencer_parked_events", "Events parked, waiting for a predecessor", registry=registry)
        self.gaps = Gauge("sequencer_gaps", "Entities waiting for a missing MSI", registry=registry)
        self.gaps_alerting = Gauge("sequencer_gaps_alerting", "Gaps older than the alert threshold", registry=registry)
        self.oldest_gap_age = Gauge(
            "sequencer_oldest_gap_age_seconds", "Age of the oldest open gap (0 when none)", registry=registry
        )
        self.blocked = Gauge(
            "sequencer_blocked_events", "Events the ledger refused past SEQUENCER_BLOCK_AFTER", registry=registry
        )
        self.backlog = Gauge(
            "sequencer_backlog_events",
            "Held events (PARKED, QUEUED, BLOCKED) as admission last counted them (SEQUENCER_MAX_BACKLOG bounds it)",
            registry=registry,
        )
        self.admission_refusals = Counter(
            "sequencer_admission_refusals",
            "Calls refused by flow control (SPEC 12), by reason: CALLER_OVERLOADED or BACKLOG_FULL",
            ["reason"],
            registry=registry,
        )
        for reason in ("CALLER_OVERLOADED", "BACKLOG_FULL"):
            self.admission_refusals.labels(reason)
        self.forward_retries = Counter(
            "sequencer_forwarder_retries",
            "ApplyEvents calls retried: after a transient failure, or a refusal counted towards blocking",
            registry=registry,
        )
        self.ledger_latency = Histogram(
            "sequencer_ledger_apply_latency_seconds",
            "Latency of ApplyEvents calls (one batch each) to the ledger",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ledger_outcomes = Counter(
            "sequencer_ledger_outcomes", "Ledger outcomes recorded, by outcome", ["outcome"], registry=registry
        )
        self.webhook_deliveries = Counter(
            "sequencer_webhook_deliveries",
            "Webhook delivery attempts by result: delivered (2xx), retrying (another attempt is due), "
            "failed (given up: schedule spent, 410, or the subscription disabled)",
            ["result"],
            registry=registry,
        )
        self.webhook_latency = Histogram(
            "sequencer_webhook_attempt_latency_seconds",
            "Time from sending a webhook to its answer (or the failure)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhook_oldest_undelivered_age = Gauge(
            "sequencer_webhook_oldest_undelivered_age_seconds",
            "Age of the oldest webhook delivery still pending on an active subscription (0 when none)",
            registry=registry,
        )
        self.keys_swept = Counter(
            "sequencer_idempotency_keys_swept", "Expired idempotency records deleted", registry=registry
        )
        # The broker doors (SPEC 16), by broker (`amqp`, `nats`).
        self.bridge_consumed = Counter(
            "sequencer_bridge_messages_consumed",
            "Messages taken from a broker queue or stream",
            ["broker"],
            registry=registry,
        )
        self.bridge_acked = Counter(
            "sequencer_bridge_messages_acked",
            "Messages acknowledged to the broker after the sequencer's commit (replays included)",
            ["broker"],
            registry=registry,
        )
        self.bridge_dead_lettered = Counter(
            "sequencer_bridge_messages_dead_lettered",
            "Messages refused for good and moved to the dead-letter destination, by ErrorInfo reason",
            ["broker", "reason"],
            registry=registry,
        )
        self.bridge_redelivered = Counter(
            "sequencer_bridge_messages_redelivered",
            "Messages the broker delivered again (after a crash, a lost connection or a requeue)",
            ["broker"],
            registry=registry,
        )
        self.bridge_requeued = Counter(
            "sequencer_bridge_messages_requeued",
            "Messages handed back to the broker after a back-off, on a transient failure",
            ["broker"],
            registry=registry,
        )
        for broker in ("amqp", "nats"):
            for series in (self.bridge_consumed, self.bridge_acked, self.bridge_redelivered, self.bridge_requeued):
                series.labels(broker)
        # The outcome stream (SPEC 16), by broker.
        self.outcomes_published = Counter(
            "sequencer_outcomes_published",
            "Outcomes published to a broker and confirmed by it (at least once: a repeat counts again)",
            ["broker"],
            registry=registry,
        )
        self.outcomes_publish_lag = Histogram(
            "sequencer_outcomes_publish_lag_seconds",
            "From the state change's commit (its outbox row) to the broker's confirm",
            ["broker"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
