"""Pure rules of idempotency keys: where the key comes from, what it may look like, how two
requests under one key are compared, and the replay cache of committed answers."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from common.auth import Identity
from sequencer.errors import IdempotencyKeyInvalid, IdempotencyKeyMissing, IdempotencyKeyReused

KEY_HEADERS = ("idempotency-key", "x-idempotency-key")
CALLER_HEADER = "x-client-id"
DEFAULT_CALLER = "default"
MAX_KEY_LENGTH = 255
# Letters, digits and URL-safe punctuation: UUIDs, ULIDs and "order-123:v2" style keys fit.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._:~@/+=-]{1,255}")
CALLER_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def resolve_key(metadata_keys: list[str], request_id: str) -> str:
    """The request's idempotency key, from metadata or request_id; checked before any lookup."""
    candidates = set(metadata_keys)
    if request_id:
        candidates.add(request_id)
    if not candidates:
        raise IdempotencyKeyMissing(
            "an idempotency key is required: set metadata `idempotency-key` or the `request_id` field"
        )
    if len(candidates) > 1:
        raise IdempotencyKeyInvalid(
            "the idempotency keys given in metadata and request_id differ; send one, or equal ones"
        )
    key = candidates.pop()
    validate_key(key)
    return key


def validate_key(key: str) -> None:
    if not key:
        raise IdempotencyKeyInvalid("the idempotency key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(
            f"the idempotency key is {len(key)} characters long; at most {MAX_KEY_LENGTH} are allowed",
            length=len(key),
        )
    if not KEY_PATTERN.fullmatch(key):
        raise IdempotencyKeyInvalid("the idempotency key may contain only letters, digits and . _ : ~ @ / + = -")


def resolve_caller(values: list[str]) -> str:
    """The caller scope of keys: `x-client-id`, until credentials bind identity."""
    if not values:
        return DEFAULT_CALLER
    caller = values[0]
    if not CALLER_PATTERN.fullmatch(caller):
        raise IdempotencyKeyInvalid("x-client-id may contain only letters, digits and . _ : @ - (1-128)")
    return caller


def caller_scope(identity: Identity, metadata: Iterable[tuple[str, Any]]) -> str:
    """The idempotency, read and admission scope: the authenticated caller; in development mode
    (no credentials configured, loopback only) the self-declared `x-client-id`."""
    if identity.via == "development":
        return resolve_caller([str(v) for k, v in metadata if k == CALLER_HEADER])
    return identity.caller


def fingerprint(request: Message) -> bytes:
    """SHA-256 over the deterministic serialization of the request (key fields already cleared)."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


def differing_fields(first: Message, second: Message, prefix: str = "") -> list[str]:
    """Field paths whose values differ between two messages of one type (for KEY_REUSED)."""
    paths: list[str] = []
    names = {f.name for f, _ in first.ListFields()} | {f.name for f, _ in second.ListFields()}
    for name in sorted(names):
        a, b = getattr(first, name), getattr(second, name)
        path = f"{prefix}{name}"
        field = first.DESCRIPTOR.fields_by_name[name]
        is_message = field.message_type is not None and not _is_repeated(field)
        if is_message and first.HasField(name) and second.HasField(name):
            paths.extend(differing_fields(a, b, f"{path}."))
        elif a != b:
            paths.append(path)
    return paths


def _is_repeated(field: object) -> bool:
    return bool(getattr(field, "is_repeated", False) or getattr(field, "label", 0) == 3)


@dataclass(frozen=True)
class StoredAnswer:
    """A committed idempotency record: what a retry of the key is compared with and answered."""

    method: str
    fingerprint: bytes
    request: bytes
    response: bytes
    created_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class Submission:
    """The answer to an idempotent request: the response and where it came from."""

    response: Message
    replayed: bool
    first_seen_at: dt.datetime
    expires_at: dt.datetime


def replay(
    record: StoredAnswer, key: str, method: str, keyless: Message, request_fp: bytes, response_type: type[Message]
) -> Message:
    """The stored response of a retry with the same request; a different request (another RPC,
    or another payload) is refused naming what differs, and nothing runs."""
    if record.method != method or record.fingerprint != request_fp:
        fields = (
            ["method"]
            if record.method != method
            else differing_fields(type(keyless).FromString(record.request), keyless)
        )
        raise IdempotencyKeyReused(
            f"idempotency key {key!r} was first used with a different request; differing fields: " + ", ".join(fields),
            fields=",".join(fields),
            first_seen_at=record.created_at.isoformat(),
        )
    return response_type.FromString(record.response)


class AnswerCache:
    """Recently committed answers, by (caller, key), least recently used dropped first.

    Safe because a committed record never changes before it expires; expired entries are
    never answered from here."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[tuple[str, str], StoredAnswer] = collections.OrderedDict()

    def get(self, caller: str, key: str, now: dt.datetime) -> StoredAnswer | None:
        answer = self._entries.get((caller, key))
        if answer is None:
            return None
        if answer.expires_at <= now:
            del self._entries[(caller, key)]
            return None
        self._entries.move_to_end((caller, key))
        return answer

    def put(self, caller: str, key: str, answer: StoredAnswer) -> StoredAnswer:
        if self.capacity > 0:
            self._entries[(caller, key)] = answer
            self._entries.move_to_end((caller, key))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return answer
