"""Partition choice, pure functions. Precedence: partition_id > explicit_hash_key >
hash(partition_key) > none (spread by the caller).

The hash and the ranges reproduce what DIS clients compute on their side (shared/spec/dis-api.md
section 6) so a client that groups records by partition agrees with the broker:
hash(key) = first 8 bytes of MD5(utf-8 key), big-endian, sign bit cleared;
avg = (2^63-1) // N; partition 0 = [0 : avg], partition i = [i*avg+1 : (i+1)*avg], and the last
partition also takes the sliver up to 2^63-1 that the integer division leaves over.
"""
from __future__ import annotations

import bisect
import hashlib
import re
from typing import Sequence

from broker.core.limits import HASH_KEY_MAX
from broker.model import ScaleEvent, Segment, StreamConfig

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
    ended; and, for a parent whose segment before the event holds no record, that segment's
    parents too, as far as their ranges overlap this partition's (transitively): a reader of that
    parent reads nothing there, so it never waited for them. (Without them a key routed 3 -> 1 -> 2
    over two events, nothing written to 1 between, came out of 2 before its record on 3.) The
    reading rule: read every parent up to its end before reading the segment; then the records of
    one key come in the order they were written, across any number of scale events."""
    events = config.scale_events
    if not events:
        return []
    h, n = _history(config.stream_id, events)
    # a config older than the history cached (a describe begun before a scale event, still
    # running after it): the segments the first n events made, the cache left as it is
    return h.out.get(partition, [])[:bisect.bisect_left(h.made_at.get(partition, []), n)]


class _History:
    """Every partition's segments after `events`, and what a next event needs to add its own: for
    each partition, the parents its current segment's reader waits for (`waited`: {partition:
    (end, lo, hi)}, `lo..hi` the part of the hash space through which that wait matters, a hull
    when several) and where that segment began (`began`). Extended in place (`add`): only the
    cache holds one, and it takes it out first."""

    __slots__ = ("events", "out", "made_at", "waited", "began", "size", "views")

    def __init__(self) -> None:
        self.events: tuple[ScaleEvent, ...] = ()
        self.out: dict[int, list[Segment]] = {}
        self.made_at: dict[int, list[int]] = {}   # the index of the event that made each of out's segments
        self.views: dict[int, tuple[ScaleEvent, ...]] = {}   # event tuples known to be prefixes of events
        self.waited: dict[int, dict[int, tuple[int, int, int]]] = {}
        self.began: dict[int, int] = {}
        self.size = 0   # segments

    def add(self, events: Sequence[ScaleEvent]) -> None:
        for e in events:
            self._add(e, len(self.events))
            self.events = (*self.events, e)

    def view(self, events: tuple[ScaleEvent, ...]) -> None:
        """Remember `events` (a prefix of this history) by identity: its next call is one lookup."""
        if len(self.views) >= 8:
            del self.views[next(iter(self.views))]
        self.views[id(events)] = events

    def _add(self, e: ScaleEvent, index: int) -> None:
        src, target = e.src_partition_count, e.target_partition_count
        made = {}
        for p in range(target):
            lo, hi = hash_range(p, target)
            parents: dict[int, tuple[int, int, int]] = {}
            # the ranges tile the hash space in order: the old partitions overlapping [lo, hi] are
            # exactly those from lo's to hi's (arithmetic, not a scan)
            for q in range(partition_for_hash(lo, src), partition_for_hash(hi, src) + 1):
                end = e.boundaries[q]
                q_lo, q_hi = hash_range(q, src)
                _merge(parents, q, end, max(lo, q_lo), min(hi, q_hi))
                if self.began.get(q, 0) == end:   # q's segment before this event holds no record
                    for r, (r_end, r_lo, r_hi) in self.waited.get(q, {}).items():
                        # an end of 0 waits for nothing (client/consumer.py: read)
                        if r_end > 0 and r_lo <= hi and lo <= r_hi:
                            _merge(parents, r, r_end, max(lo, r_lo), min(hi, r_hi))
            parents.pop(p, None)   # its own earlier records come before in its own order
            made[p] = parents
            self.out.setdefault(p, []).append(Segment(e.boundaries[p], tuple(sorted(
                (r, v[0]) for r, v in parents.items())), e.timestamp_ms))
            self.made_at.setdefault(p, []).append(index)
        for p, parents in made.items():   # after the loop: the event's parents are the old layout's
            self.waited[p], self.began[p] = parents, e.boundaries[p]
        self.size += target


def _history(stream_id: int, events: tuple[ScaleEvent, ...]) -> tuple[_History, int]:
    """The cached history of the stream whose events `events` are, and how many of its events they
    are. A newer config extends it by its new events alone (a scale event costs that event's work,
    not the whole history's); an older one is answered from it as its prefix, the cache unchanged
    (replaced by a rebuilt prefix, two describes across a scale event rebuilt it in turn on every
    partition: 3 minutes at 200 events, found by the review). Configs read again from a shared
    store are new objects that compare equal: found by the stream's id, and compared once."""
    key = stream_id or -id(events[0])   # configs made without a store id (tests): by their history
    n = len(events)
    h = _HISTORIES.get(key)
    if h is not None:
        if h.views.get(id(events)) is events:
            return h, n
        if n <= len(h.events) and h.events[:n] == events:
            h.view(events)
            return h, n
        if h.events != events[:len(h.events)]:
            h = None   # another history under that id (a stream made again): from the start
    if h is None:
        h = _History()
    _HISTORIES.pop(key, None)
    h.add(events[len(h.events):])
    h.view(events)
    while _HISTORIES and sum(c.size for c in _HISTORIES.values()) + h.size > _SEGMENTS_CACHED:
        del _HISTORIES[next(iter(_HISTORIES))]   # the least recently made first
    _HISTORIES[key] = h
    return h, n


# Histories cached, by stream: the recent ones holding at most this many segments in all (a
# history bigger than that is kept alone).
_HISTORIES: dict[int, _History] = {}
_SEGMENTS_CACHED = 200_000


def _merge(into: dict[int, tuple[int, int, int]], r: int, end: int, lo: int, hi: int) -> None:
    had = into.get(r)
    into[r] = (end, lo, hi) if had is None else (max(had[0], end), min(had[1], lo), max(had[2], hi))


def parse_hash_key(text: str) -> int | None:
    """Decimal 0..2^63-1, leading zeros allowed (Java's Long.parseLong, which DIS's producers
    route by, takes them), else None."""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0")
    if len(digits) > 19:   # never hand int() thousands of digits
        return None
    value = int(digits or "0")
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
