"""Opaque, tamper-evident, expiring partition cursors. Pure functions.

A cursor is base64url( version | stream_id u64 | partition u32 | seq u64 | issued_ms i64 | tag ),
where tag = first 16 bytes of HMAC-SHA256(secret, everything before it). 60 characters, well
within DIS's 512. The stream id (not the name) is inside, so a cursor cannot be edited into
another stream or partition without breaking the tag, and a cursor of a deleted stream stays dead
even if the name is recreated. Expiry is checked against `issued_ms` (DIS: 5 minutes).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import re
import struct
from typing import NamedTuple

from broker.errors import ErrorCode, client_error

_VERSION = 1
_BODY = struct.Struct(">BQIQq")
_TAG_LEN = 16
# Only the url-safe alphabet: the lenient base64 decoder would also take '+' '/' and skip
# whitespace or junk, so an edited token could otherwise still decode to a valid cursor.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


class CursorPosition(NamedTuple):
    stream_id: int
    partition: int
    seq: int          # the next record to return
    issued_ms: int


def encode_cursor(secret: bytes, pos: CursorPosition) -> str:
    body = _BODY.pack(_VERSION, pos.stream_id, pos.partition, pos.seq, pos.issued_ms)
    tag = hmac.digest(secret, body, "sha256")[:_TAG_LEN]   # one-shot, in C: no HMAC object per cursor
    return base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode()


def decode_cursor(secret: bytes, token: object, now_ms: int, ttl_ms: int | None) -> CursorPosition:
    """Raises INVALID_CURSOR (malformed or forged) or CURSOR_EXPIRED (`ttl_ms` None: never, for a
    cursor that only names its partition, the position coming from elsewhere)."""
    if not isinstance(token, str) or len(token) > 512 or not _TOKEN.fullmatch(token):
        raise client_error(ErrorCode.INVALID_CURSOR, detail="cursor is missing or malformed")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise client_error(ErrorCode.INVALID_CURSOR, detail="cursor is not valid base64") from None
    if len(raw) != _BODY.size + _TAG_LEN or raw[0] != _VERSION:
        raise client_error(ErrorCode.INVALID_CURSOR, detail="cursor is malformed")
    body, tag = raw[:_BODY.size], raw[_BODY.size:]
    if not hmac.compare_digest(tag, hmac.digest(secret, body, "sha256")[:_TAG_LEN]):
        raise client_error(ErrorCode.INVALID_CURSOR, detail="cursor was not issued by this broker")
    _, stream_id, partition, seq, issued_ms = _BODY.unpack(body)
    if ttl_ms is not None and now_ms - issued_ms > ttl_ms:
        raise client_error(ErrorCode.CURSOR_EXPIRED)
    return CursorPosition(stream_id, partition, seq, issued_ms)
