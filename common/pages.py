"""One page-token format and page-size rule for every paginated read (AIP-158): the token is
the sort key of the last row served, opaque to callers (URL-safe base64 of a JSON list)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from common.errors import InvalidArgument

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode()


def decode_token(token: str) -> list[Any] | None:
    """The sort key a token names; None for the first page; INVALID_ARGUMENT when malformed."""
    if not token:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token is malformed", field="page_token") from exc
    if not isinstance(values, list):
        raise InvalidArgument("page_token is malformed", field="page_token")
    return values
