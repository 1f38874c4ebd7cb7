"""Reading settings from the environment: typed, validated at start-up, unknown keys rejected."""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping


class ConfigError(Exception):
    """A setting is missing, malformed or unknown; the process refuses to start."""


class Env:
    """Reads `PREFIX_NAME` variables and remembers which it read, so leftovers can be rejected."""

    def __init__(self, prefix: builtins.str, environ: Mapping[builtins.str, builtins.str] | None = None) -> None:
        self.prefix = prefix
        self.environ = dict(os.environ if environ is None else environ)
        self._seen: set[builtins.str] = set()

    def _raw(self, name: builtins.str) -> builtins.str | None:
        key = f"{self.prefix}{name}"
        self._seen.add(key)
        value = self.environ.get(key)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self._raw(name)
        return default if value is None else value

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int = 0,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = builtins.int(value)
        except ValueError as exc:
            raise ConfigError(f"{self.prefix}{name} must be an integer, got {value!r}") from exc
        if number < minimum or (maximum is not None and number > maximum):
            raise ConfigError(f"{self.prefix}{name} must be in [{minimum}, {maximum}], got {number}")
        return number

    def seconds(self, name: builtins.str, default: float, *, minimum: float = 0.0) -> float:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError as exc:
            raise ConfigError(f"{self.prefix}{name} must be a number of seconds, got {value!r}") from exc
        if number < minimum:
            raise ConfigError(f"{self.prefix}{name} must be >= {minimum}, got {number}")
        return number

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{self.prefix}{name} must be a boolean, got {value!r}")

    def address(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self.str(name, default)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{self.prefix}{name} must be host:port, got {value!r}")
        return value

    def choice(self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]) -> builtins.str:
        value = self.str(name, default)
        if value not in choices:
            raise ConfigError(f"{self.prefix}{name} must be one of {choices}, got {value!r}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(k for k in self.environ if k.startswith(self.prefix) and k not in self._seen)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")


def database_url(environ: Mapping[str, str] | None = None) -> str:
    """The shared DATABASE_URL, normalised to SQLAlchemy's psycopg 3 dialect."""
    env = os.environ if environ is None else environ
    url = env.get("DATABASE_URL", "").strip()
    if not url:
        raise ConfigError("DATABASE_URL is not set (make up sets it, or point it at a PostgreSQL server)")
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ConfigError("DATABASE_URL must be a postgresql:// URL")
