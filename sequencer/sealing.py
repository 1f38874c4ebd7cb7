"""Signing secrets at rest: sealed with AES-256-GCM under SEQUENCER_WEBHOOK_SECRET_KEY.

The dispatcher needs each secret itself (an HMAC key cannot be checked against a hash), so a
secret is stored encrypted when a key is configured, and as is otherwise; in both cases no RPC,
log line or metric ever shows it after CreateWebhookSubscription's response.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.settings import ConfigError

SEALED = b"v1"
PLAIN = b"p0"
NONCE_BYTES = 12


class UnsealError(Exception):
    """A stored secret cannot be opened with the configured key (the key changed or is missing)."""


class SecretBox:
    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key) if key is not None else None

    @classmethod
    def from_setting(cls, value: str) -> SecretBox:
        if not value:
            return cls(None)
        try:
            key = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("SEQUENCER_WEBHOOK_SECRET_KEY must be base64") from exc
        if len(key) != 32:
            raise ConfigError(f"SEQUENCER_WEBHOOK_SECRET_KEY must be 32 bytes of base64, got {len(key)} bytes")
        return cls(key)

    @property
    def sealing(self) -> bool:
        return self._aead is not None

    def seal(self, secret: str, associated: bytes) -> bytes:
        """The stored form; `associated` (the subscription id) binds it to its row."""
        if self._aead is None:
            return PLAIN + secret.encode()
        nonce = os.urandom(NONCE_BYTES)
        return SEALED + nonce + self._aead.encrypt(nonce, secret.encode(), associated)

    def open(self, stored: bytes, associated: bytes) -> str:
        if stored.startswith(PLAIN):
            return stored[len(PLAIN) :].decode()
        if not stored.startswith(SEALED) or self._aead is None:
            raise UnsealError("the secret is sealed and SEQUENCER_WEBHOOK_SECRET_KEY is not set")
        nonce = stored[len(SEALED) : len(SEALED) + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, stored[len(SEALED) + NONCE_BYTES :], associated).decode()
        except InvalidTag as exc:
            raise UnsealError("the secret does not open with SEQUENCER_WEBHOOK_SECRET_KEY (key changed?)") from exc
