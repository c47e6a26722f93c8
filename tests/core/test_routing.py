"""Partition routing (broker/core/routing.py) against the DIS formula of shared/spec/dis-api.md
section 6, written out independently here: the hash is MD5's first 8 bytes read as a signed
big-endian 64-bit integer with the sign bit cleared (what the Java producer computes)."""
from __future__ import annotations

import hashlib
import re
import struct
from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.core import routing

MAX = 2**63 - 1
hashes = st.integers(0, MAX)
counts = st.integers(1, 300)
# The same examples on every run: the suite must be deterministic.
deterministic = settings(derandomize=True)


def spec_hash(key: str) -> int:
    (signed,) = struct.unpack(">q", hashlib.md5(key.encode("utf-8")).digest()[:8])
    return signed & 0x7FFFFFFFFFFFFFFF


# -- key_hash --------------------------------------------------------------------------------------


@deterministic
@given(st.text())
@example("")
@example("ключ-🔑")
def test_key_hash_is_the_spec_formula(key: str) -> None:
    h = routing.key_hash(key)
    assert h == spec_hash(key)
    assert 0 <= h <= MAX


@pytest.mark.parametrize("key, expected", [
    # MD5("") = d41d8cd98f00b204..., sign bit cleared: 0x541d8cd98f00b204
    ("", 0x541D8CD98F00B204),
    # MD5("abc") = 900150983cd24fb0..., sign bit cleared: 0x100150983cd24fb0
    ("abc", 0x100150983CD24FB0),
    # MD5("a") = 0cc175b9c0f1b6a8...: the sign bit is already clear
    ("a", 0x0CC175B9C0F1B6A8),
])
def test_key_hash_known_vectors(key: str, expected: int) -> None:
    assert routing.key_hash(key) == expected


# -- hash ranges and partition choice --------------------------------------------------------------


@pytest.mark.parametrize("count, expected", [
    (1, [(0, 9223372036854775807)]),
    (2, [(0, 4611686018427387903), (4611686018427387904, 9223372036854775807)]),
    # avg = 3074457345618258602; 3 * avg = 2^63 - 2, so the last partition takes the sliver
    (3, [(0, 3074457345618258602), (3074457345618258603, 6148914691236517204),
         (6148914691236517205, 9223372036854775807)]),
])
def test_hash_ranges_known_vectors(count: int, expected: list[tuple[int, int]]) -> None:
    assert routing.hash_ranges(count) == expected


@pytest.mark.parametrize("count", range(1, 301))
def test_hash_ranges_are_contiguous_over_the_whole_space(count: int) -> None:
    ranges = routing.hash_ranges(count)
    assert len(ranges) == count
    assert ranges[0][0] == 0
    assert ranges[-1][1] == MAX
    for (lo, hi), (next_lo, _) in pairwise(ranges):
        assert lo <= hi
        assert next_lo == hi + 1
    assert ranges[-1][0] <= ranges[-1][1]
    # the edges of every range route to that range's partition
    for p, (lo, hi) in enumerate(ranges):
        assert routing.partition_for_hash(lo, count) == p
        assert routing.partition_for_hash(hi, count) == p


@deterministic
@given(hashes, counts)
@example(0, 1)
@example(MAX, 1)
@example(MAX, 3)
@example(MAX, 7)
@example(9223372036854775806, 3)
@example(3074457345618258602, 3)
@example(3074457345618258603, 3)
def test_partition_for_hash_is_in_range_and_agrees_with_hash_ranges(h: int, count: int) -> None:
    p = routing.partition_for_hash(h, count)
    assert 0 <= p < count
    lo, hi = routing.hash_ranges(count)[p]
    assert lo <= h <= hi


@deterministic
@given(st.text(), counts)
def test_a_key_always_routes_to_the_same_partition(key: str, count: int) -> None:
    p = routing.partition_for_hash(routing.key_hash(key), count)
    assert p == routing.partition_for_hash(spec_hash(key), count)
    lo, hi = routing.hash_ranges(count)[p]
    assert lo <= spec_hash(key) <= hi


# -- partition ids ---------------------------------------------------------------------------------


@deterministic
@given(st.integers(0, 9_999_999_999))
def test_parse_partition_id_accepts_both_forms(n: int) -> None:
    assert routing.parse_partition_id(str(n), 4) == n
    assert routing.parse_partition_id(routing.format_partition_id(n), 4) == n


@pytest.mark.parametrize("text, expected", [
    ("2", 2), ("0", 0), ("shardId-0000000002", 2), ("shardId-0000000000", 0), ("shardId-2", 2),
    ("0000000002", 2),
])
def test_parse_partition_id_examples(text: str, expected: int) -> None:
    assert routing.parse_partition_id(text, 4) == expected


@pytest.mark.parametrize("text", [
    "", " ", "abc", "-1", "+1", "2.0", "1e3", "0x2", "shardId-", "shardId--1", "shardId-0000000002x",
    "shard-0000000002", "Id-2", "12345678901", "shardId-00000000002", "2 2", " 2", "2 ", "\t2", "2\n",
    " shardId-0000000002",
    "٢",                      # ARABIC-INDIC DIGIT TWO: a digit to Unicode, not a partition id
    "shardId-٠٠٠٠٠٠٠٠٠٢",
    "２",                      # FULLWIDTH DIGIT TWO
])
def test_parse_partition_id_rejects_garbage(text: str) -> None:
    assert routing.parse_partition_id(text, 4) is None


@deterministic
@given(st.text())
def test_parse_partition_id_accepts_only_the_ascii_forms(text: str) -> None:
    result = routing.parse_partition_id(text, 4)
    m = re.fullmatch(r"(?:shardId-)?([0-9]{1,10})", text, re.IGNORECASE | re.ASCII)
    assert result == (int(m.group(1)) if m else None)


def test_parse_partition_id_takes_ints_and_rejects_other_non_strings() -> None:
    assert routing.parse_partition_id(2, 4) == 2              # the gRPC door's integer partition ids
    assert routing.parse_partition_id(0, 4) == 0
    for value in (None, -1, 10**10, True, 2.0, b"2", ["2"]):
        assert routing.parse_partition_id(value, 4) is None


# -- explicit hash keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("1", 1), ("9223372036854775807", MAX), ("4611686018427387904", 2**62),
    ("9223372036854775808", None), ("18446744073709551615", None), ("99999999999999999999", None),
    ("-1", None), ("abc", None), ("", None), (" 1", None), ("1 ", None), ("+1", None), ("1.0", None),
    ("0x10", None), ("٣", None), ("１", None),
    # leading zeros, as Java's Long.parseLong reads them (DIS producers route by it)
    ("0000000000000000000005", 5), ("00", 0), ("0" * 5000 + "9223372036854775807", MAX),
    ("0" * 30 + "9223372036854775808", None), ("0" * 4 + "1" * 5000, None),
])
def test_parse_hash_key_edges(text: str, expected: int | None) -> None:
    assert routing.parse_hash_key(text) == expected


@deterministic
@given(hashes)
def test_parse_hash_key_round_trips_the_whole_space(h: int) -> None:
    assert routing.parse_hash_key(str(h)) == h


@deterministic
@given(st.integers(MAX + 1, 10**19 - 1) | st.integers(max_value=-1))
def test_parse_hash_key_rejects_outside_the_space(n: int) -> None:
    assert routing.parse_hash_key(str(n)) is None


@deterministic
@given(st.text())
def test_parse_hash_key_never_accepts_anything_but_ascii_decimal(text: str) -> None:
    result = routing.parse_hash_key(text)
    if result is not None:
        assert re.fullmatch(r"[0-9]+", text, re.ASCII)
        assert int(text) == result <= MAX


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=60), st.integers(1, 300))
def test_key_router_memo_agrees_with_the_hash_even_when_it_starts_over(keys: list[str], n: int) -> None:
    router = routing.KeyRouter(n, max_entries=7)   # tiny: the memo is cleared many times
    for key in keys + keys[::-1]:
        assert router(key) == routing.partition_for_hash(routing.key_hash(key), n)


@pytest.mark.parametrize("src", [1, 2, 3, 7, 64, 255, 256])
def test_segment_parents_are_exactly_the_overlapping_old_partitions(src: int) -> None:
    """segments() finds parents arithmetically; the definition is every old range overlapping the new one."""
    from broker.core.routing import hash_range, hash_ranges, partition_for_hash

    for target in (1, 2, 3, 5, 64, 200, 256):
        for p in range(target):
            lo, hi = hash_range(p, target)
            assert (lo, hi) == hash_ranges(target)[p]
            scanned = [q for q, (qlo, qhi) in enumerate(hash_ranges(src)) if qlo <= hi and lo <= qhi]
            assert scanned == list(range(partition_for_hash(lo, src), partition_for_hash(hi, src) + 1))
