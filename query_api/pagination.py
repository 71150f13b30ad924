"""Opaque keyset cursors: the sort key of the last item of a page, base64url-encoded JSON."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar.params import Parameter

from runtime.http import problem

MAX_LIMIT = 500
# The shape of a cursor; only a `next_cursor` the API gave is a cursor (400 for another value).
Cursor = Annotated[
    str | None,
    Parameter(
        min_length=1,
        max_length=2000,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="`next_cursor` of the previous page",
    ),
]


def encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


def decode_cursor(cursor: str | None, *types: type) -> tuple[Any, ...] | None:
    """Decode a cursor made by `encode_cursor` for a key of these types; 400 if it is not one."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return tuple(msgspec.json.decode(raw, type=tuple[*types]))  # type: ignore[valid-type]
    except (binascii.Error, ValueError, msgspec.MsgspecError) as exc:
        raise problem(
            400, "Invalid cursor", "pass back the next_cursor of a previous page"
        ) from exc


def page_of(rows: list[Any], limit: int, key: Any) -> tuple[list[Any], str | None]:
    """Rows were fetched with limit + 1: trim, and make the cursor from the last kept row."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(*key(rows[-1]))


def ts_key(ts: datetime, ident: str) -> tuple[str, str]:
    return (ts.isoformat(), str(ident))
