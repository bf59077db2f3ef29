"""Cursors for list views: an opaque string that says where the next page starts.

A page of jobs ends at some ``seq`` (jobs are listed newest first, by ``seq``); the next page is the jobs of smaller
seq. The cursor is that seq, versioned and base64url-encoded, so clients treat it as opaque and the server may change
what it holds (``v1:``) without breaking them: a cursor it cannot read is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import HTTPException, status

#: The response header carrying the next page's cursor (absent on the last page).
HEADER = "X-Scaleq-Next-Cursor"
_PREFIX = "v1:"


def encode(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}{seq}".encode()).decode().rstrip("=")


def decode(cursor: str) -> int:
    """The seq a cursor holds; HTTPException 422 (naming ``cursor``) when it is not one this server made."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        if not text.startswith(_PREFIX):
            raise ValueError(text)
        seq = int(text[len(_PREFIX) :])
        if not 0 <= seq < 1 << 63:
            raise ValueError(text)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": ["query", "cursor"], "msg": "is not a cursor this server gave", "type": "value_error"}],
        ) from exc
    return seq
