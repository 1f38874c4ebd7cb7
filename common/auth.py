"""Who is calling, and what they may do.

Identity comes from credentials, never from a self-declared header: a bearer token (looked up
by its SHA-256 in the identities file and compared in constant time) or, under mutual TLS, the
client certificate's subject. With no identities configured and a loopback listener, every
caller is the development identity with every role (the zero-setup `make up` default); there,
and only there, `x-client-id` may name the idempotency scope.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import PermissionDenied, Unauthenticated
from common.settings import ConfigError, Env

ROLES = frozenset({"submitter", "reader", "admin", "sequencer"})
DEV_CALLER = "default"


@dataclass(frozen=True)
class Identity:
    caller: str
    roles: frozenset[str]
    # How it was established: "token", "mtls" or "development".
    via: str

    def has_any(self, roles: frozenset[str]) -> bool:
        return bool(self.roles & roles)


_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("identity")


def set_identity(identity: Identity) -> None:
    _identity.set(identity)


def current_identity() -> Identity:
    """The authenticated caller of the RPC being handled (set by the interceptor)."""
    return _identity.get()


@dataclass(frozen=True)
class SecuritySettings:
    """Transport security, credentials and hard limits of one server (prefix SEQUENCER_/LEDGER_)."""

    identities_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # With a client CA, client certificates are required (mutual TLS): grpc's Python server can
    # request a certificate only by requiring it. Token callers then need one too.
    tls_client_ca: str = ""
    allow_insecure: bool = False
    max_message_bytes: int = 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    # HTTP/2 streams one connection may hold. Above any caller's in-flight limit: a burst is
    # answered by admission (RESOURCE_EXHAUSTED + RetryInfo), not refused by the transport
    # (RST_STREAM REFUSED_STREAM, which the client sees as UNAVAILABLE). docs/flow-control.md.
    max_concurrent_streams: int = 1000
    keepalive_min_ping_interval: float = 10.0

    @classmethod
    def from_env(cls, env: Env) -> SecuritySettings:
        settings = cls(
            identities_file=env.str("IDENTITIES_FILE", ""),
            tls_cert=env.str("TLS_CERT", ""),
            tls_key=env.str("TLS_KEY", ""),
            tls_client_ca=env.str("TLS_CLIENT_CA", ""),
            allow_insecure=env.bool("ALLOW_INSECURE", False),
            max_message_bytes=env.int("MAX_MESSAGE_BYTES", 1024 * 1024, minimum=1024, maximum=64 * 1024 * 1024),
            max_metadata_bytes=env.int("MAX_METADATA_BYTES", 16 * 1024, minimum=1024, maximum=1024 * 1024),
            max_concurrent_streams=env.int("MAX_CONCURRENT_STREAMS", 1000, minimum=1, maximum=10_000),
            keepalive_min_ping_interval=env.seconds("KEEPALIVE_MIN_PING_INTERVAL", 10.0, minimum=0.1),
        )
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ConfigError(f"{env.prefix}TLS_CERT and {env.prefix}TLS_KEY go together")
        if settings.tls_client_ca and not settings.tls_cert:
            raise ConfigError(f"{env.prefix}TLS_CLIENT_CA needs {env.prefix}TLS_CERT and {env.prefix}TLS_KEY")
        return settings

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def check_exposure(self, listen_addr: str, prefix: str) -> None:
        """Refuses a non-loopback listener without TLS and credentials, unless told otherwise."""
        if self.allow_insecure or is_loopback(listen_addr):
            return
        if not (self.tls and (self.identities_file or self.tls_client_ca)):
            raise ConfigError(
                f"{prefix}LISTEN_ADDR {listen_addr} is not loopback: configure TLS ({prefix}TLS_CERT/KEY) and "
                f"credentials ({prefix}IDENTITIES_FILE or {prefix}TLS_CLIENT_CA), or set {prefix}ALLOW_INSECURE=true"
            )

    def grpc_options(self) -> list[tuple[str, Any]]:
        ping_ms = int(self.keepalive_min_ping_interval * 1000)
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            # grpc core queues calls the Python server has not picked up yet and, past 1,000 by
            # default, cancels some (CANCELLED, a transport answer to a burst). Room for ten
            # connections' worth of streams: a burst waits for the server's admission instead.
            ("grpc.server.max_pending_requests", 10 * self.max_concurrent_streams),
            ("grpc.server.max_pending_requests_hard_limit", 20 * self.max_concurrent_streams),
            # Keepalive enforcement: clients pinging more often than this are sent GOAWAY.
            ("grpc.http2.min_ping_interval_without_data_ms", ping_ms),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Authenticator:
    """Maps credentials to identities. Empty maps mean development mode."""

    tokens: list[tuple[bytes, Identity]] = field(default_factory=list)
    subjects: dict[str, Identity] = field(default_factory=dict)

    @property
    def development(self) -> bool:
        return not self.tokens and not self.subjects

    @classmethod
    def from_file(cls, path: str) -> Authenticator:
        """Reads {"identities": [{"caller": "wms", "roles": [...], "token_sha256": "<hex>"} |
        {"caller": ..., "roles": [...], "subject": "CN=..."}]}."""
        if not path:
            return cls()
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"identities file {path} cannot be read: {exc}") from exc
        auth = cls()
        for entry in document.get("identities", []):
            caller = str(entry.get("caller", ""))
            roles = frozenset(entry.get("roles", []))
            if not caller or not roles or not roles <= ROLES:
                raise ConfigError(f"identities file {path}: each entry needs a caller and roles from {sorted(ROLES)}")
            if "token_sha256" in entry:
                digest = bytes.fromhex(str(entry["token_sha256"]))
                if len(digest) != 32:
                    raise ConfigError(f"identities file {path}: token_sha256 of {caller} is not a SHA-256")
                auth.tokens.append((digest, Identity(caller, roles, "token")))
            elif "subject" in entry:
                auth.subjects[str(entry["subject"])] = Identity(caller, roles, "mtls")
            else:
                raise ConfigError(f"identities file {path}: {caller} needs token_sha256 or subject")
        if auth.development:
            raise ConfigError(f"identities file {path} names no identities")
        return auth

    def authenticate(self, metadata: Sequence[tuple[str, Any]], peer_subjects: Sequence[str]) -> Identity:
        if self.development:
            return Identity(DEV_CALLER, ROLES, "development")
        token = bearer_token(metadata)
        if token is not None:
            presented = hashlib.sha256(token.encode()).digest()
            found: Identity | None = None
            for digest, identity in self.tokens:  # every entry compared: no early exit to time
                if hmac.compare_digest(digest, presented):
                    found = identity
            if found is None:
                raise Unauthenticated("the bearer token is not valid")
            return found
        for subject in peer_subjects:
            if subject in self.subjects:
                return self.subjects[subject]
        raise Unauthenticated(
            "credentials are required: an `authorization: Bearer <token>` header or a client certificate"
        )


def bearer_token(metadata: Sequence[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("the authorization header must be `Bearer <token>`")
    return None


def authorize(identity: Identity, method: str, policy: Mapping[str, frozenset[str]]) -> None:
    """Raises unless one of the identity's roles may call the method (unknown methods: nobody)."""
    allowed = policy.get(method, frozenset())
    if not identity.has_any(allowed):
        raise PermissionDenied(
            f"caller {identity.caller} may not call {method.rsplit('/', 1)[-1]}",
            required_roles=",".join(sorted(allowed)),
        )
