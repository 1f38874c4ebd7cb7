"""Where the services are and how to call them, from the environment (`LOGISTICS_*`).

One description for every Python caller that is configured rather than coded: the operator CLI
(`python -m ops`), scripts, the docs' examples. The variables are prefixed `LOGISTICS_`, not
`SEQUENCER_`/`LEDGER_`: the services reject unknown variables of their own prefixes, so a
client setting exported in the same shell must not look like one.

| variable | default | meaning |
|---|---|---|
| `LOGISTICS_SEQUENCER_ADDR` | `127.0.0.1:50051` | the sequencer's gRPC address |
| `LOGISTICS_LEDGER_ADDR` | `127.0.0.1:50052` | the ledger's gRPC address |
| `LOGISTICS_TOKEN` / `LOGISTICS_TOKEN_FILE` | (none) | bearer token (`authorization: Bearer …`) |
| `LOGISTICS_TLS_CA` | (none: plaintext) | CA bundle: the channel is TLS |
| `LOGISTICS_TLS_CERT` / `LOGISTICS_TLS_KEY` | (none) | client certificate (mutual TLS) |
| `LOGISTICS_TLS_SERVER_NAME` | (the address's host) | name checked against the server certificate |
| `LOGISTICS_CLIENT_ID` | (none) | `x-client-id`: the key scope on a development server only |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

PREFIX = "LOGISTICS_"
DEFAULT_SEQUENCER = "127.0.0.1:50051"
DEFAULT_LEDGER = "127.0.0.1:50052"


class ClientConfigError(ValueError):
    """A LOGISTICS_* variable is unusable (a file that cannot be read, a half-configured pair)."""


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    sequencer: str = DEFAULT_SEQUENCER
    ledger: str = DEFAULT_LEDGER
    token: str | None = None
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    client_id: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientConfig:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(PREFIX + name, "").strip()

        token = get("TOKEN")
        if not token and get("TOKEN_FILE"):
            token = _read(get("TOKEN_FILE"), "LOGISTICS_TOKEN_FILE").decode().strip()
        config = cls(
            sequencer=get("SEQUENCER_ADDR") or DEFAULT_SEQUENCER,
            ledger=get("LEDGER_ADDR") or DEFAULT_LEDGER,
            token=token or None,
            tls_ca=get("TLS_CA"),
            tls_cert=get("TLS_CERT"),
            tls_key=get("TLS_KEY"),
            tls_server_name=get("TLS_SERVER_NAME"),
            client_id=get("CLIENT_ID") or None,
        )
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ClientConfigError("LOGISTICS_TLS_CERT and LOGISTICS_TLS_KEY go together")
        if config.tls_cert and not config.tls_ca:
            raise ClientConfigError("LOGISTICS_TLS_CERT needs LOGISTICS_TLS_CA (a client certificate needs TLS)")
        return config

    def replace(self, **changes: Any) -> ClientConfig:
        """A copy with some fields changed (command-line flags over the environment)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS (mutual with a client certificate) when a CA is configured, else None: plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "LOGISTICS_TLS_CA"),
            private_key=_read(self.tls_key, "LOGISTICS_TLS_KEY") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "LOGISTICS_TLS_CERT") if self.tls_cert else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.tls and self.tls_server_name:
            return [("grpc.ssl_target_name_override", self.tls_server_name)]
        return []

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for SequencerClient / LedgerClient / SyncSequencerClient."""
        return {
            "token": self.token,
            "client_id": self.client_id,
            "credentials": self.credentials(),
            "options": self.channel_options(),
        }


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"{name}={path} cannot be read: {exc.strerror}") from exc
