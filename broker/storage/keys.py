"""The byte layout of every RocksDB key and value. This is an on-disk contract: change it only with
a migration.

    key                                               value
    ------------------------------------------------  --------------------------------------------
    b"M" + b"format_version"                          u64 BE: the layout of this directory (FORMAT below)
    b"M" + b"next_stream_id"                          u64 BE: next stream id to hand out (ids are never reused)
    b"S" + project + b"\0" + stream name (utf-8)       JSON StreamConfig (with its stream_id and project)
    b"H" + stream_id u64 + partition u32              u64 BE next_seq + i64 BE last_ts (the high-water mark)
    b"T" + stream_id u64 + partition u32              u64 BE first retained seq (absent = 0)
    b"R" + stream_id u64 + partition u32 + first_seq  one appended batch: its records first_seq ..
           u64                                        first_seq + count - 1 (the batch layout below)
    b"X" + core-defined key                           core-defined value: apps, checkpoints, the cursor
                                                      key (layout in broker/core/apps.py); opaque here

All integers in keys are fixed-width big-endian, so byte order is numeric order: one partition's
batches are one contiguous prefix scan in sequence order, and a stream's keys of a kind are one
range (delete_range drops a stream). The high-water mark "H" is written in the same WriteBatch as
the records it covers, so after a crash the two always agree; it is kept apart from the records so
a trim can never lower it and a sequence number is never reused.

Batch value ("R"): every AppendBatch is one value, so an append costs one put per batch instead of
one per record, and a read decodes a batch with a few struct calls and slices. All of a batch's
records share one timestamp (the store stamps a batch, never a record).

    header     u32 count n, i64 timestamp ms, u8 key mode       (">IqB", 13 bytes)
    offsets    (n + 1) x u32: offsets[0] is where the payload blob starts in the value, and
               record i's payload is value[offsets[i]:offsets[i + 1]]
    keys       key mode 0: no key section (every record has key None)
               key mode 1: (n + 1) x u32 key offsets k in code points (k[0] = 0), then the keys
                           joined as one utf-8 blob up to offsets[0]:
                           key i = blob.decode()[k[i]:k[i + 1]]
               key mode 2: as mode 1 (a None key is stored as ""), but n bytes sit between the
                           key offsets and the blob: byte i is 1 when key i is None
    payloads   the records' payloads back to back, up to the end of the value

Integers in values are big-endian too. Consequences the store relies on:
* Reads can start inside a batch: seek_for_prev(record_key(start)) within the partition finds the
  batch holding `start`; records before `start` in it are skipped.
* Trim deletes only whole batches below the cut. A batch straddling the cut stays stored, and its
  records below the trim point are never returned: "T" (first retained seq) is the truth, not
  the lowest stored key.
* seq_at_time binary-searches batches by their one timestamp.

Format history (FORMAT is checked when the store opens; a directory of another format is refused
with a clear message, never read):
1  (no "format_version" key) streams keyed by name alone; until 2026-11 "R" keys held one record
   each. Never deployed, so there is no migration; such a directory must be recreated.
2  projects: stream keys are project + NUL + name (both [A-Za-z0-9_-], so NUL cannot occur in
   either); apps and checkpoints are keyed by project too (broker/core/apps.py).
"""
from __future__ import annotations

import struct
from bisect import bisect_right
from itertools import accumulate, repeat
from typing import Iterable, Sequence

from broker.model import BATCH_HEADER_BYTES, Packed, Record

FORMAT = 2
FORMAT_VERSION = b"Mformat_version"
NEXT_STREAM_ID = b"Mnext_stream_id"
STREAM = b"S"
HWM = b"H"
TRIM = b"T"
RECORD = b"R"
META = b"X"

_PART = struct.Struct(">QI")
_REC = struct.Struct(">QIQ")
_HWM_VALUE = struct.Struct(">Qq")
_BATCH_HEADER = struct.Struct(">IqB")
assert _BATCH_HEADER.size == BATCH_HEADER_BYTES   # Packed counts its offsets from it
U64 = struct.Struct(">Q")

KEYS_NONE, KEYS_ALL, KEYS_MIXED = 0, 1, 2   # the batch header's key mode


def stream_key(project: str, stream_name: str) -> bytes:
    return STREAM + project.encode() + b"\0" + stream_name.encode()


def partition_key(kind: bytes, stream_id: int, partition: int) -> bytes:
    return kind + _PART.pack(stream_id, partition)


def record_key(stream_id: int, partition: int, seq: int) -> bytes:
    """The key of the batch whose first record is `seq` (and the seek target for any seq)."""
    return RECORD + _REC.pack(stream_id, partition, seq)


def record_seq(key: bytes) -> int:
    """The first seq of the batch stored under `key`."""
    return U64.unpack_from(key, 13)[0]


def stream_range(kind: bytes, stream_id: int) -> tuple[bytes, bytes]:
    """[start, end) covering every key of `kind` that belongs to the stream."""
    return kind + U64.pack(stream_id), kind + U64.pack(stream_id + 1)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix` (an exclusive upper bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\xff" * (len(prefix) + 1)
    return stripped[:-1] + bytes([stripped[-1] + 1])


def encode_hwm(next_seq: int, last_ts: int) -> bytes:
    return _HWM_VALUE.pack(next_seq, last_ts)


def decode_hwm(value: bytes) -> tuple[int, int]:
    next_seq, last_ts = _HWM_VALUE.unpack(value)
    return next_seq, last_ts


# -- batch values ------------------------------------------------------------------------------------


def encode_batch(timestamp_ms: int, items: Sequence[tuple[str | None, bytes]]) -> bytes:
    """One batch value (layout in the module docstring). `items` must not be empty; a Packed is
    this layout already, but for its header."""
    if type(items) is Packed:
        return b"".join((_BATCH_HEADER.pack(items.n, timestamp_ms, KEYS_NONE), items.offsets, items.blob))
    n = len(items)
    pkeys, datas = zip(*items)
    nones = pkeys.count(None)
    if nones == n:
        mode, key_section = KEYS_NONE, b""
    else:
        names = [k or "" for k in pkeys] if nones else pkeys
        mode = KEYS_MIXED if nones else KEYS_ALL
        mask = bytes([k is None for k in pkeys]) if nones else b""
        key_section = (struct.pack(f">{n + 1}I", *accumulate(map(len, names), initial=0)) + mask
                       + "".join(names).encode())
    start = _BATCH_HEADER.size + 4 * (n + 1) + len(key_section)
    offsets = struct.pack(f">{n + 1}I", *accumulate(map(len, datas), initial=start))
    return b"".join((_BATCH_HEADER.pack(n, timestamp_ms, mode), offsets, key_section, *datas))


def batch_header(value: bytes) -> tuple[int, int]:
    """(record count, timestamp ms) of a batch value."""
    count, ts, _ = _BATCH_HEADER.unpack_from(value)
    return count, ts


def decode_batch(value: bytes, first_seq: int, lo: int, hi: int, budget: int,
                 at_least_one: bool) -> tuple[list[Record], int]:
    """Records lo..hi-1 (indexes into the batch stored at `first_seq`, 0 <= lo < hi <= count),
    stopping before their payloads would total more than `budget` bytes - but returning record
    `lo` regardless when `at_least_one`. Returns (records, payload bytes returned); fewer records
    than hi - lo means the budget ran out."""
    n, ts, mode = _BATCH_HEADER.unpack_from(value)
    offsets, end = _within_budget(value, n, lo, hi, budget, at_least_one)
    if end <= lo:
        return [], 0
    datas = [value[a:b] for a, b in zip(offsets[lo:end], offsets[lo + 1:end + 1])]
    pkeys: Iterable[str | None]
    if mode == KEYS_NONE:
        pkeys = repeat(None)
    else:
        at = _BATCH_HEADER.size + 4 * (n + 1)
        ends = struct.unpack_from(f">{n + 1}I", value, at)
        at += 4 * (n + 1)
        if mode == KEYS_ALL:
            names = value[at:offsets[0]].decode()
            pkeys = [names[a:b] for a, b in zip(ends[lo:end], ends[lo + 1:end + 1])]
        else:
            mask = value[at:at + n]
            names = value[at + n:offsets[0]].decode()
            pkeys = [None if none else names[a:b]
                     for none, a, b in zip(mask[lo:end], ends[lo:end], ends[lo + 1:end + 1])]
    # tuple.__new__ builds the NamedTuple without running its Python-level __new__ per record
    records = list(map(tuple.__new__, repeat(Record),
                       zip(range(first_seq + lo, first_seq + end), repeat(ts), pkeys, datas)))
    return records, offsets[end] - offsets[lo]


def batch_payloads(value: bytes, lo: int, hi: int, budget: int,
                   at_least_one: bool) -> tuple[list[bytes], int, int]:
    """As decode_batch, the payloads only: (payloads, the batch's timestamp, bytes returned)."""
    n, ts, _ = _BATCH_HEADER.unpack_from(value)
    offsets, end = _within_budget(value, n, lo, hi, budget, at_least_one)
    if end <= lo:
        return [], ts, 0
    return [value[a:b] for a, b in zip(offsets[lo:end], offsets[lo + 1:end + 1])], ts, offsets[end] - offsets[lo]


def _within_budget(value: bytes, n: int, lo: int, hi: int, budget: int,
                   at_least_one: bool) -> tuple[tuple[int, ...], int]:
    """The batch's payload offsets, and the end (exclusive) of records lo.. that fit `budget`."""
    offsets = struct.unpack_from(f">{n + 1}I", value, _BATCH_HEADER.size)
    end = bisect_right(offsets, offsets[lo] + budget, lo, hi + 1) - 1 if budget >= 0 else lo
    if end == lo and at_least_one:
        end = lo + 1
    return offsets, end
