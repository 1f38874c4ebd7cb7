"""The sequencer's settings, read once from the environment (prefix SEQUENCER_) and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from common.auth import SecuritySettings, is_loopback
from common.settings import ConfigError, Env, database_url
from sequencer.idempotency import CALLER_PATTERN
from sequencer.sealing import SecretBox

LOCK_STRATEGIES = ("advisory", "row")
# Seconds before each attempt of a webhook delivery (Svix's schedule): immediately, 5 s, 5 min,
# 30 min, 2 h, 5 h, 10 h, 10 h; each delay but the first gets jitter.
WEBHOOK_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


def seconds_list(env: Env, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """A comma-separated list of non-negative seconds (at least one)."""
    raw = env.str(name, "")
    if not raw:
        return default
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError as exc:
        raise ConfigError(f"{env.prefix}{name} must be comma-separated seconds, got {raw!r}") from exc
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"{env.prefix}{name} must list one or more non-negative seconds, got {raw!r}")
    return values


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
    # The outcome stream (sequencer/outcomes.py), each publisher beside its broker's URL.
    outcomes_nats: bool = False
    outcomes_nats_stream: str = "LOGISTICS_OUTCOMES"
    outcomes_nats_subject: str = "logistics.outcomes"
    outcomes_amqp: bool = False
    outcomes_amqp_exchange: str = "logistics.outcomes"
    # A replica's claim on an outcome delivery: a publisher killed mid-publish leaves it, and
    # another publishes the delivery again once it has run out. Far above a publish's 5 s limit.
    outcomes_lease: float = 30.0

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
            outcomes_nats=env.bool("OUTCOMES_NATS", False),
            outcomes_nats_stream=env.str("OUTCOMES_NATS_STREAM", "LOGISTICS_OUTCOMES"),
            outcomes_nats_subject=env.str("OUTCOMES_NATS_SUBJECT", "logistics.outcomes"),
            outcomes_amqp=env.bool("OUTCOMES_AMQP", False),
            outcomes_amqp_exchange=env.str("OUTCOMES_AMQP_EXCHANGE", "logistics.outcomes"),
            outcomes_lease=env.seconds("OUTCOMES_LEASE", 30.0, minimum=1.0),
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
        if self.outcomes_nats and not self.nats_url:
            raise ConfigError("SEQUENCER_OUTCOMES_NATS needs SEQUENCER_NATS_URL")
        if self.outcomes_amqp and not self.amqp_url:
            raise ConfigError("SEQUENCER_OUTCOMES_AMQP needs SEQUENCER_AMQP_URL")
        subject = self.outcomes_nats_subject
        if not subject or subject.endswith(".") or "*" in subject or ">" in subject:
            raise ConfigError(f"SEQUENCER_OUTCOMES_NATS_SUBJECT must be a plain subject prefix, got {subject!r}")


@dataclass(frozen=True)
class Settings:
    database_url: str
    listen_addr: str = "127.0.0.1:50051"
    metrics_addr: str = "127.0.0.1:9464"
    # The HTTP/JSON listener (SPEC 13). From the environment it defaults to 127.0.0.1:8080; a
    # Settings built in code (tests, embedding) has none unless given one ("" = off).
    http_addr: str = ""
    # The largest HTTP request body read (JSON is larger than the binary message it carries:
    # 4 MiB of JSON for SEQUENCER_MAX_MESSAGE_BYTES' 1 MiB message), and the deadline of the gRPC
    # call an HTTP request makes (plus any `Prefer: wait`).
    http_max_body_bytes: int = 4 * 1024 * 1024
    http_timeout: float = 30.0
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
    # Flow control (SPEC 12): requests one caller may have in flight, accepted events not yet
    # processed (PARKED + QUEUED + BLOCKED) before submissions are refused, and how often that
    # is counted.
    max_inflight_per_caller: int = 512
    max_backlog: int = 100_000
    backlog_refresh_interval: float = 1.0
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
    # Webhooks (docs/webhooks.md). Hosts a subscription may target (comma-separated; `*.` a
    # subdomain wildcard); empty: none, except loopback in development mode.
    webhook_allowed_hosts: tuple[str, ...] = ()
    webhook_retry_schedule: tuple[float, ...] = WEBHOOK_RETRY_SCHEDULE
    webhook_timeout: float = 15.0
    # A subscription whose every attempt failed for this long is disabled (and alerted).
    webhook_disable_after: float = 5 * 86400.0
    # 32 bytes, base64: seals the signing secrets at rest (AES-GCM). Empty: stored unsealed.
    webhook_secret_key: str = ""
    webhook_poll_interval: float = 1.0
    # Deliveries in flight per replica, and how long a replica's claim on one lasts.
    webhook_concurrency: int = 8
    webhook_lease: float = 60.0
    # Finished (delivered or failed) outbox deliveries older than this are deleted, with their
    # attempts, by the sweeper (every sink's).
    outbox_retention: float = 7 * 86400.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = Env("SEQUENCER_", environ)
        settings = cls(
            database_url=database_url(environ),
            listen_addr=env.address("LISTEN_ADDR", "127.0.0.1:50051"),
            metrics_addr=env.address("METRICS_ADDR", "127.0.0.1:9464"),
            http_addr=env.address("HTTP_ADDR", "127.0.0.1:8080"),
            http_max_body_bytes=env.int(
                "HTTP_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024, maximum=256 * 1024 * 1024
            ),
            http_timeout=env.seconds("HTTP_TIMEOUT", 30.0, minimum=0.1),
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
            max_inflight_per_caller=env.int("MAX_INFLIGHT_PER_CALLER", 512, minimum=1, maximum=1_000_000),
            max_backlog=env.int("MAX_BACKLOG", 100_000, minimum=1, maximum=1_000_000_000),
            backlog_refresh_interval=env.seconds("BACKLOG_REFRESH_INTERVAL", 1.0, minimum=0.05),
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
            webhook_allowed_hosts=tuple(
                h.strip().lower() for h in env.str("WEBHOOK_ALLOWED_HOSTS", "").split(",") if h.strip()
            ),
            webhook_retry_schedule=seconds_list(env, "WEBHOOK_RETRY_SCHEDULE", WEBHOOK_RETRY_SCHEDULE),
            webhook_timeout=env.seconds("WEBHOOK_TIMEOUT", 15.0, minimum=0.1),
            webhook_disable_after=env.seconds("WEBHOOK_DISABLE_AFTER", 5 * 86400.0, minimum=1.0),
            webhook_secret_key=env.str("WEBHOOK_SECRET_KEY", ""),
            webhook_poll_interval=env.seconds("WEBHOOK_POLL_INTERVAL", 1.0, minimum=0.01),
            webhook_concurrency=env.int("WEBHOOK_CONCURRENCY", 8, minimum=1, maximum=256),
            webhook_lease=env.seconds("WEBHOOK_LEASE", 60.0, minimum=1.0),
            outbox_retention=env.seconds("OUTBOX_RETENTION", 7 * 86400.0, minimum=1.0),
        )
        env.reject_unknown()
        if bool(settings.ledger_tls_cert) != bool(settings.ledger_tls_key):
            raise ConfigError("SEQUENCER_LEDGER_TLS_CERT and SEQUENCER_LEDGER_TLS_KEY go together")
        if settings.ledger_tls_cert and not settings.ledger_tls_ca:
            raise ConfigError("SEQUENCER_LEDGER_TLS_CERT needs SEQUENCER_LEDGER_TLS_CA")
        if settings.webhook_lease <= settings.webhook_timeout:
            raise ConfigError(
                "SEQUENCER_WEBHOOK_LEASE must exceed SEQUENCER_WEBHOOK_TIMEOUT (a claim outlives its attempt)"
            )
        if settings.webhook_secret_key:
            SecretBox.from_setting(settings.webhook_secret_key)
        settings.security.check_exposure(settings.listen_addr, "SEQUENCER_")
        check_http_exposure(settings)
        return settings


def check_http_exposure(settings: Settings) -> None:
    """A non-loopback HTTP listener needs TLS and bearer tokens (client certificates are not
    read over HTTP), unless SEQUENCER_ALLOW_INSECURE says otherwise."""
    security = settings.security
    if not settings.http_addr or security.allow_insecure or is_loopback(settings.http_addr):
        return
    if not (security.tls and security.identities_file):
        raise ConfigError(
            f"SEQUENCER_HTTP_ADDR {settings.http_addr} is not loopback: configure TLS (SEQUENCER_TLS_CERT/KEY) and "
            "bearer tokens (SEQUENCER_IDENTITIES_FILE), or set SEQUENCER_ALLOW_INSECURE=true"
        )
