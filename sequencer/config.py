"""The sequencer's settings, read once from the environment (prefix SEQUENCER_) and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from common.auth import SecuritySettings
from common.settings import ConfigError, Env, database_url
from sequencer.idempotency import CALLER_PATTERN

LOCK_STRATEGIES = ("advisory", "row")


@dataclass(frozen=True)
class BrokerSettings:
    """The broker doors (SPEC 16), each off while its URL is empty: the ingress bridges and, in
    the same processes, the outcome publishers (docs/brokers.md)."""

    amqp_url: str = ""
    amqp_queue: str = "logistics.events"
    amqp_dead_queue: str = "logistics.events.dead"
    # Unacknowledged deliveries the broker hands the bridge at once (basic_qos): the memory bound
    # of a burst, and how many submissions one group commit can gather from the broker.
    amqp_prefetch: int = 256
    nats_url: str = ""
    nats_stream: str = "LOGISTICS_EVENTS"
    nats_subjects: str = "logistics.events.>"
    nats_consumer: str = "sequencer"
    nats_dead_stream: str = "LOGISTICS_DEAD"
    # A dead letter of `logistics.events.X` goes to `<prefix>.X`.
    nats_dead_subject: str = "logistics.dead"
    # The consumer's max_ack_pending and the most messages one pull asks for.
    nats_prefetch: int = 256
    # A NATS message not acknowledged within this long is redelivered (the consumer's ack_wait).
    nats_ack_wait: float = 60.0
    # The idempotency scope of every bridged message: (caller, message key).
    bridge_caller: str = "bridge"
    # Back-off before a transiently failed message is handed back, doubling per consecutive
    # failure up to the maximum.
    bridge_backoff: float = 0.5
    bridge_backoff_max: float = 15.0

    @classmethod
    def from_env(cls, env: Env) -> BrokerSettings:
        settings = cls(
            amqp_url=env.str("AMQP_URL", ""),
            amqp_queue=env.str("AMQP_QUEUE", "logistics.events"),
            amqp_dead_queue=env.str("AMQP_DEAD_QUEUE", "logistics.events.dead"),
            amqp_prefetch=env.int("AMQP_PREFETCH", 256, minimum=1, maximum=65_535),
            nats_url=env.str("NATS_URL", ""),
            nats_stream=env.str("NATS_STREAM", "LOGISTICS_EVENTS"),
            nats_subjects=env.str("NATS_SUBJECTS", "logistics.events.>"),
            nats_consumer=env.str("NATS_CONSUMER", "sequencer"),
            nats_dead_stream=env.str("NATS_DEAD_STREAM", "LOGISTICS_DEAD"),
            nats_dead_subject=env.str("NATS_DEAD_SUBJECT", "logistics.dead"),
            nats_prefetch=env.int("NATS_PREFETCH", 256, minimum=1, maximum=10_000),
            nats_ack_wait=env.seconds("NATS_ACK_WAIT", 60.0, minimum=1.0),
            bridge_caller=env.str("BRIDGE_CALLER", "bridge"),
            bridge_backoff=env.seconds("BRIDGE_BACKOFF", 0.5, minimum=0.01),
            bridge_backoff_max=env.seconds("BRIDGE_BACKOFF_MAX", 15.0, minimum=0.01),
        )
        settings.check()
        return settings

    def check(self) -> None:
        if not CALLER_PATTERN.fullmatch(self.bridge_caller):
            raise ConfigError("SEQUENCER_BRIDGE_CALLER may contain only letters, digits and . _ : @ - (1-128)")
        if not self.nats_subjects.endswith(".>") or len(self.nats_subjects) < 3:
            raise ConfigError(f"SEQUENCER_NATS_SUBJECTS must end with '.>', got {self.nats_subjects!r}")
        if self.nats_dead_subject.endswith(".") or "*" in self.nats_dead_subject or ">" in self.nats_dead_subject:
            raise ConfigError(
                f"SEQUENCER_NATS_DEAD_SUBJECT must be a plain subject prefix, got {self.nats_dead_subject!r}"
            )
        if self.amqp_dead_queue == self.amqp_queue:
            raise ConfigError("SEQUENCER_AMQP_DEAD_QUEUE must differ from SEQUENCER_AMQP_QUEUE")


@dataclass(frozen=True)
class Settings:
    database_url: str
    listen_addr: str = "127.0.0.1:50051"
    metrics_addr: str = "127.0.0.1:9464"
    ledger_target: str = "127.0.0.1:50052"
    # Deadline of one ApplyEvents call to the ledger.
    ledger_timeout: float = 5.0
    # How long an idempotency record is kept (48 h).
    idempotency_retention: float = 48 * 3600.0
    # Recently committed idempotency answers kept in memory for lock-free replays (0: none).
    answer_cache_size: int = 10_000
    sweep_interval: float = 60.0
    sweep_batch: int = 500
    # A gap older than this is alerted (log, metric, ListGaps.alerting).
    gap_alert_after: float = 60.0
    # Parked events one entity may hold; beyond: RESOURCE_EXHAUSTED for that entity.
    parked_limit: int = 1000
    lock_strategy: str = "advisory"
    # Group commit: connections that each commit one batch of waiting submissions at a time, and
    # the most submissions one batch takes.
    ingress_workers: int = 2
    ingress_batch: int = 256
    # The most items one SubmitEvents call may carry (SPEC 10).
    max_batch: int = 500
    # Batches in flight to the ledger, and the most events one batch (one ApplyEvents call)
    # carries: at most the ledger's LEDGER_MAX_BATCH.
    forwarder_concurrency: int = 2
    forwarder_batch: int = 256
    # The safety-net poll; NOTIFY and in-process wake-ups make forwarding prompt.
    forwarder_poll_interval: float = 1.0
    # How long a replica's claim on an entity's forwarding lasts without renewal.
    forwarder_lease: float = 30.0
    # A lease held this long is handed back when the entity's chain ends, so that busy entities
    # move between replicas too (a replica added later gets its share).
    forwarder_lease_max_hold: float = 60.0
    # How long one claim keeps retrying a failing ledger before letting go and backing off.
    forwarder_retry_budget: float = 20.0
    # Refusals retrying cannot fix (not transient, not an outcome) before an event is BLOCKED.
    block_after: int = 5
    watchers_per_caller: int = 100
    db_pool_size: int = 10
    shutdown_grace: float = 5.0
    log_level: str = "INFO"
    security: SecuritySettings = field(default_factory=SecuritySettings)
    brokers: BrokerSettings = field(default_factory=BrokerSettings)
    # The channel to the ledger: TLS roots (enables TLS), an optional client certificate for
    # mutual TLS, an optional server-name override, and the bearer token file it presents.
    ledger_tls_ca: str = ""
    ledger_tls_cert: str = ""
    ledger_tls_key: str = ""
    ledger_tls_server_name: str = ""
    ledger_token_file: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = Env("SEQUENCER_", environ)
        settings = cls(
            database_url=database_url(environ),
            listen_addr=env.address("LISTEN_ADDR", "127.0.0.1:50051"),
            metrics_addr=env.address("METRICS_ADDR", "127.0.0.1:9464"),
            ledger_target=env.address("LEDGER_TARGET", "127.0.0.1:50052"),
            ledger_timeout=env.seconds("LEDGER_TIMEOUT", 5.0, minimum=0.01),
            idempotency_retention=env.seconds("IDEMPOTENCY_RETENTION", 48 * 3600.0, minimum=1.0),
            answer_cache_size=env.int("ANSWER_CACHE_SIZE", 10_000, minimum=0, maximum=10_000_000),
            sweep_interval=env.seconds("SWEEP_INTERVAL", 60.0, minimum=0.01),
            sweep_batch=env.int("SWEEP_BATCH", 500, minimum=1, maximum=100_000),
            gap_alert_after=env.seconds("GAP_ALERT_AFTER", 60.0),
            parked_limit=env.int("PARKED_LIMIT", 1000, minimum=1),
            lock_strategy=env.choice("LOCK_STRATEGY", "advisory", LOCK_STRATEGIES),
            ingress_workers=env.int("INGRESS_WORKERS", 2, minimum=1, maximum=32),
            ingress_batch=env.int("INGRESS_BATCH", 256, minimum=1, maximum=10_000),
            max_batch=env.int("MAX_BATCH", 500, minimum=1, maximum=10_000),
            forwarder_concurrency=env.int("FORWARDER_CONCURRENCY", 2, minimum=1, maximum=64),
            forwarder_batch=env.int("FORWARDER_BATCH", 256, minimum=1, maximum=500),
            forwarder_poll_interval=env.seconds("FORWARDER_POLL_INTERVAL", 1.0, minimum=0.01),
            forwarder_lease=env.seconds("FORWARDER_LEASE", 30.0, minimum=1.0),
            forwarder_lease_max_hold=env.seconds("FORWARDER_LEASE_MAX_HOLD", 60.0, minimum=0.0),
            forwarder_retry_budget=env.seconds("FORWARDER_RETRY_BUDGET", 20.0, minimum=0.1),
            block_after=env.int("BLOCK_AFTER", 5, minimum=1, maximum=100),
            watchers_per_caller=env.int("WATCHERS_PER_CALLER", 100, minimum=1),
            db_pool_size=env.int("DB_POOL_SIZE", 10, minimum=1, maximum=500),
            shutdown_grace=env.seconds("SHUTDOWN_GRACE", 5.0),
            log_level=env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            security=SecuritySettings.from_env(env),
            brokers=BrokerSettings.from_env(env),
            ledger_tls_ca=env.str("LEDGER_TLS_CA", ""),
            ledger_tls_cert=env.str("LEDGER_TLS_CERT", ""),
            ledger_tls_key=env.str("LEDGER_TLS_KEY", ""),
            ledger_tls_server_name=env.str("LEDGER_TLS_SERVER_NAME", ""),
            ledger_token_file=env.str("LEDGER_TOKEN_FILE", ""),
        )
        env.reject_unknown()
        if bool(settings.ledger_tls_cert) != bool(settings.ledger_tls_key):
            raise ConfigError("SEQUENCER_LEDGER_TLS_CERT and SEQUENCER_LEDGER_TLS_KEY go together")
        if settings.ledger_tls_cert and not settings.ledger_tls_ca:
            raise ConfigError("SEQUENCER_LEDGER_TLS_CERT needs SEQUENCER_LEDGER_TLS_CA")
        settings.security.check_exposure(settings.listen_addr, "SEQUENCER_")
        return settings
