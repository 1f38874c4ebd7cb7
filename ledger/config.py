"""The ledger's settings, read once from the environment (prefix LEDGER_) and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from common.auth import SecuritySettings
from common.settings import Env, database_url

LOCK_STRATEGIES = ("advisory", "row")


@dataclass(frozen=True)
class Settings:
    database_url: str
    listen_addr: str = "127.0.0.1:50052"
    metrics_addr: str = "127.0.0.1:9465"
    db_pool_size: int = 10
    shutdown_grace: float = 5.0
    log_level: str = "INFO"
    # Per-entity serialisation: advisory locks (default) or a row lock on the version row
    # (for Citus, where advisory locks are node-local).
    lock_strategy: str = "advisory"
    # Most events one ApplyEvents call may carry (the sequencer's forwarder batches below it).
    max_batch: int = 500
    security: SecuritySettings = field(default_factory=SecuritySettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = Env("LEDGER_", environ)
        settings = cls(
            database_url=database_url(environ),
            listen_addr=env.address("LISTEN_ADDR", "127.0.0.1:50052"),
            metrics_addr=env.address("METRICS_ADDR", "127.0.0.1:9465"),
            db_pool_size=env.int("DB_POOL_SIZE", 10, minimum=1, maximum=500),
            shutdown_grace=env.seconds("SHUTDOWN_GRACE", 5.0),
            log_level=env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            lock_strategy=env.choice("LOCK_STRATEGY", "advisory", LOCK_STRATEGIES),
            max_batch=env.int("MAX_BATCH", 500, minimum=1, maximum=10_000),
            security=SecuritySettings.from_env(env),
        )
        env.reject_unknown()
        settings.security.check_exposure(settings.listen_addr, "LEDGER_")
        return settings
