"""Pure rules of idempotency keys: where the key comes from, what it may look like, and how two
requests under one key are compared."""

from __future__ import annotations

import hashlib
import re

from google.protobuf.message import Message

from sequencer.errors import IdempotencyKeyInvalid, IdempotencyKeyMissing

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
