"""The sequencer's settings, read once from the environment (prefix SEQUENCER_) and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from common.auth import SecuritySettings
from common.settings import ConfigError, Env, database_url

LOCK_STRATEGIES = ("advisory", "row")


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
