"""Partition choice, pure functions. Precedence: partition_id > explicit_hash_key >
hash(partition_key) > none (spread by the caller).

The hash and the ranges reproduce what DIS clients compute on their side (shared/spec/dis-api.md
section 6) so a client that groups records by partition agrees with the broker:
hash(key) = first 8 bytes of MD5(utf-8 key), big-endian, sign bit cleared;
avg = (2^63-1) // N; partition 0 = [0 : avg], partition i = [i*avg+1 : (i+1)*avg], and the last
partition also takes the sliver up to 2^63-1 that the integer division leaves over.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

from broker.core.limits import HASH_KEY_MAX
from broker.model import Segment, StreamConfig

_SHARD_ID = re.compile(r"(?:shardId-)?([0-9]{1,10})", re.IGNORECASE)  # ASCII digits only: \d takes "٢"


def format_partition_id(partition: int) -> str:
    return f"shardId-{partition:010d}"


def parse_partition_id(text: object, partition_count: int) -> int | None:
    """2, "2" or "shardId-0000000002" -> 2. None when malformed (surrounding whitespace too, as a
    sequence number or hash key with it is); the caller checks the range."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text if 0 <= text <= 9_999_999_999 else None
    m = _SHARD_ID.fullmatch(text) if isinstance(text, str) else None
    return int(m.group(1)) if m else None


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "big") & HASH_KEY_MAX


def partition_for_hash(h: int, partition_count: int) -> int:
    avg = HASH_KEY_MAX // partition_count
    i = h // avg
    if i > 0 and h % avg == 0:
        i -= 1
    return min(i, partition_count - 1)


def hash_range(partition: int, partition_count: int) -> tuple[int, int]:
    """Partition `partition`'s hash range of `partition_count`: [0, avg], then [i*avg+1, (i+1)*avg],
    the last one up to the top of the space (spec section 6)."""
    avg = HASH_KEY_MAX // partition_count
    lo = 0 if partition == 0 else partition * avg + 1
    return lo, HASH_KEY_MAX if partition == partition_count - 1 else (partition + 1) * avg


def hash_ranges(partition_count: int) -> list[tuple[int, int]]:
    return [hash_range(i, partition_count) for i in range(partition_count)]


def segments(config: StreamConfig, partition: int) -> list[Segment]:
    """The partition's segments after scale events, oldest first (none: never rescaled while it
    was ACTIVE). A segment's parents are the partitions of the layout before the event (other than
    this one) whose hash ranges overlap the partition's range after it, each with the seq where it
    ended. The reading rule: read every parent up to its end before reading the segment; then the
    records of one key come in the order they were written, across any number of scale events."""
    out = []
    for e in config.scale_events:
        if partition >= e.target_partition_count:
            continue
        # the ranges tile the hash space in order: the old partitions overlapping [lo, hi] are
        # exactly those from lo's to hi's (arithmetic, not a scan: a describe of 256 partitions
        # after 200 events must not hold the event loop)
        lo, hi = hash_range(partition, e.target_partition_count)
        first, last = partition_for_hash(lo, e.src_partition_count), partition_for_hash(hi, e.src_partition_count)
        parents = tuple((q, e.boundaries[q]) for q in range(first, last + 1) if q != partition)
        out.append(Segment(e.boundaries[partition], parents, e.timestamp_ms))
    return out


def parse_hash_key(text: str) -> int | None:
    """Decimal 0..2^63-1, else None."""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if value <= HASH_KEY_MAX else None


class KeyRouter:
    """`partition_for_hash(key_hash(key), N)` with a bounded memo. Producers reuse keys (customer
    ids, device ids), and the MD5 is most of what routing costs per record; a dict hit is a tenth
    of it. The memo is per partition count and simply starts over when full."""

    __slots__ = ("partition_count", "_memo", "_max_entries")

    def __init__(self, partition_count: int, max_entries: int = 65_536) -> None:
        self.partition_count = partition_count
        self._memo: dict[str, int] = {}
        self._max_entries = max_entries

    def __call__(self, key: str) -> int:
        p = self._memo.get(key)
        if p is None:
            if len(self._memo) >= self._max_entries:
                self._memo.clear()
            p = self._memo[key] = partition_for_hash(key_hash(key), self.partition_count)
        return p

    def route_all(self, keys: Sequence[str]) -> list[int]:
        """`[self(k) for k in keys]`, with the memo hits looked up by one C-level map."""
        partitions: list[int | None] = list(map(self._memo.get, keys))
        if None in partitions:
            partitions = [self(k) if p is None else p for k, p in zip(keys, partitions)]
        return partitions  # type: ignore[return-value]
