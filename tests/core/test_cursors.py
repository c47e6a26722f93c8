"""Cursors (broker/core/cursors.py): opaque, tamper-evident, expiring, at most 512 characters."""
from __future__ import annotations

import base64
import hashlib
import hmac
import string
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.core.cursors import CursorPosition, decode_cursor, encode_cursor
from broker.errors import BrokerError, ErrorCode

SECRET = b"test-secret-0123456789"
TTL = 5 * 60 * 1000
NOW = 1_700_000_000_000
URLSAFE = string.ascii_letters + string.digits + "-_"

positions = st.builds(CursorPosition, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                      st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1))
secrets = st.binary(min_size=1, max_size=64)
# The same examples on every run: the suite must be deterministic.
deterministic = settings(derandomize=True)


def code_of(secret: bytes, token: object, now: int = NOW, ttl: int = TTL) -> ErrorCode:
    with pytest.raises(BrokerError) as exc_info:
        decode_cursor(secret, token, now, ttl)
    return exc_info.value.code


def reencode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_of(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


@deterministic
@given(secrets, positions)
def test_round_trip(secret: bytes, pos: CursorPosition) -> None:
    token = encode_cursor(secret, pos)
    assert decode_cursor(secret, token, pos.issued_ms, TTL) == pos


@deterministic
@given(secrets, positions)
def test_cursor_is_short_and_url_safe(secret: bytes, pos: CursorPosition) -> None:
    token = encode_cursor(secret, pos)
    assert 1 <= len(token) <= 512
    assert set(token) <= set(URLSAFE)


def test_distinct_positions_give_distinct_cursors() -> None:
    base = CursorPosition(3, 1, 10, NOW)
    variants = [base, base._replace(stream_id=4), base._replace(partition=2), base._replace(seq=11),
                base._replace(issued_ms=NOW + 1)]
    assert len({encode_cursor(SECRET, p) for p in variants}) == len(variants)


@pytest.mark.parametrize("pos", [CursorPosition(1, 0, 0, NOW), CursorPosition(7, 3, 123456789, NOW),
                                 CursorPosition(2**64 - 1, 2**32 - 1, 2**63 - 1, NOW)])
def test_every_single_character_change_is_rejected(pos: CursorPosition) -> None:
    """Exhaustive: every position, every other character (url-safe, the standard-base64 aliases
    '+' and '/', padding, whitespace, non-ASCII)."""
    token = encode_cursor(SECRET, pos)
    accepted = []
    for i, original in enumerate(token):
        for replacement in URLSAFE + "+/=. \n~é":
            if replacement == original:
                continue
            forged = token[:i] + replacement + token[i + 1:]
            try:
                decode_cursor(SECRET, forged, NOW, TTL)
            except BrokerError as exc:
                assert exc.code is ErrorCode.INVALID_CURSOR, (forged, exc.code)
            else:
                accepted.append(forged)
    assert accepted == []


@deterministic
@given(positions.map(lambda p: p._replace(issued_ms=NOW)), st.data())
def test_random_single_character_change_is_rejected(pos: CursorPosition, data: st.DataObject) -> None:
    token = encode_cursor(SECRET, pos)
    i = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters().filter(lambda c: c != token[i]))
    assert code_of(SECRET, token[:i] + replacement + token[i + 1:]) is ErrorCode.INVALID_CURSOR


def test_every_single_bit_flip_of_the_bytes_is_rejected() -> None:
    token = encode_cursor(SECRET, CursorPosition(9, 2, 77, NOW))
    raw = raw_of(token)
    assert decode_cursor(SECRET, reencode(raw), NOW, TTL) == CursorPosition(9, 2, 77, NOW)  # the harness is sound
    for i in range(len(raw)):
        for bit in range(8):
            flipped = raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:]
            assert code_of(SECRET, reencode(flipped)) is ErrorCode.INVALID_CURSOR, (i, bit)


@pytest.mark.parametrize("edit", ["append_char", "insert_space", "append_newline", "drop_last", "drop_first",
                                  "add_padding", "double"])
def test_lengthened_or_shortened_cursor_is_rejected(edit: str) -> None:
    token = encode_cursor(SECRET, CursorPosition(1, 0, 5, NOW))
    forged = {
        "append_char": token + "A",
        "insert_space": token[:20] + " " + token[20:],
        "append_newline": token + "\n",
        "drop_last": token[:-1],
        "drop_first": token[1:],
        "add_padding": token + "==",
        "double": token + token,
    }[edit]
    assert code_of(SECRET, forged) is ErrorCode.INVALID_CURSOR


def test_a_validly_signed_body_with_another_version_is_rejected() -> None:
    body = struct.pack(">BQIQq", 2, 1, 0, 5, NOW)
    tag = hmac.new(SECRET, body, hashlib.sha256).digest()[:16]
    assert code_of(SECRET, reencode(body + tag)) is ErrorCode.INVALID_CURSOR
    body1 = struct.pack(">BQIQq", 1, 1, 0, 5, NOW)   # the same construction at version 1 is accepted
    tag1 = hmac.new(SECRET, body1, hashlib.sha256).digest()[:16]
    assert decode_cursor(SECRET, reencode(body1 + tag1), NOW, TTL) == CursorPosition(1, 0, 5, NOW)


@deterministic
@given(secrets, secrets, positions.map(lambda p: p._replace(issued_ms=NOW)))
def test_a_cursor_from_another_secret_is_rejected(secret: bytes, other: bytes, pos: CursorPosition) -> None:
    # b"k" and b"k\0" are the same HMAC key (short keys are zero-padded): not another secret
    assume(hmac.new(secret, b"", hashlib.sha256).digest() != hmac.new(other, b"", hashlib.sha256).digest())
    assert code_of(other, encode_cursor(secret, pos)) is ErrorCode.INVALID_CURSOR


def test_expiry_is_checked_against_the_issue_time() -> None:
    token = encode_cursor(SECRET, CursorPosition(1, 0, 5, NOW))
    assert decode_cursor(SECRET, token, NOW, TTL).seq == 5
    assert decode_cursor(SECRET, token, NOW + TTL, TTL).seq == 5            # exactly at the TTL: still valid
    assert code_of(SECRET, token, now=NOW + TTL + 1) is ErrorCode.CURSOR_EXPIRED
    assert code_of(SECRET, token, now=NOW + 24 * 3_600_000) is ErrorCode.CURSOR_EXPIRED
    assert code_of(SECRET, token, now=NOW + 10, ttl=9) is ErrorCode.CURSOR_EXPIRED
    assert ErrorCode.CURSOR_EXPIRED.dis_code == "DIS.4225"


def test_a_forged_cursor_is_invalid_even_when_it_would_also_be_expired() -> None:
    token = encode_cursor(b"another broker", CursorPosition(1, 0, 5, NOW))
    assert code_of(SECRET, token, now=NOW + 10 * TTL) is ErrorCode.INVALID_CURSOR


@pytest.mark.parametrize("token", [
    "", "abc", "!!!!", "A" * 60, "A" * 61, "=" * 60, "AQ", "AQ==", "cursor", "é" * 60, "A" * 513,
    " " * 60, "\x00" * 60,
])
def test_garbage_strings_are_invalid(token: str) -> None:
    assert code_of(SECRET, token) is ErrorCode.INVALID_CURSOR


@pytest.mark.parametrize("token", [None, 0, 123, 1.5, b"bytes", ["a"], {"a": 1}, True])
def test_non_strings_are_invalid(token: object) -> None:
    assert code_of(SECRET, token) is ErrorCode.INVALID_CURSOR


def test_an_otherwise_valid_cursor_longer_than_512_is_invalid() -> None:
    token = encode_cursor(SECRET, CursorPosition(1, 0, 5, NOW))
    assert code_of(SECRET, token + "A" * (513 - len(token))) is ErrorCode.INVALID_CURSOR


@deterministic
@given(st.text(max_size=600))
def test_arbitrary_text_is_invalid_and_never_crashes(token: str) -> None:
    assert code_of(SECRET, token) is ErrorCode.INVALID_CURSOR


@deterministic
@given(st.binary(min_size=1, max_size=100))
def test_arbitrary_bytes_encoded_as_a_cursor_are_invalid(raw: bytes) -> None:
    assert code_of(SECRET, reencode(raw)) is ErrorCode.INVALID_CURSOR
