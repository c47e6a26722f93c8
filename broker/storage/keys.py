"""The byte layout of every RocksDB key. This is an on-disk contract: change it only with a
migration.

    key                                            value
    ---------------------------------------------  -----------------------------------------------
    b"M" + b"next_stream_id"                       u64 BE: next stream id to hand out (ids are never reused)
    b"S" + name (utf-8)                            JSON StreamConfig (with its stream_id)
    b"H" + stream_id u64 + partition u32           u64 BE next_seq + i64 BE last_ts (the high-water mark)
    b"T" + stream_id u64 + partition u32           u64 BE first retained seq (absent = 0)
    b"R" + stream_id u64 + partition u32 + seq u64 record: i64 BE timestamp ms, u16 BE key length
                                                   (0xFFFF = no key), key utf-8, payload bytes
    b"X" + core-defined key                        core-defined value: apps, checkpoints (layout in
                                                   broker/core/apps.py); the store treats it as opaque

All integers are fixed-width big-endian, so byte order is numeric order: one partition's records
are one contiguous prefix scan in sequence order, and a stream's keys of a kind are one range
(delete_range drops a stream). The high-water mark "H" is written in the same WriteBatch as the
records it covers, so after a crash the two always agree; it is kept apart from the records so a
trim can never lower it and a sequence number is never reused.
"""
from __future__ import annotations

import struct

NEXT_STREAM_ID = b"Mnext_stream_id"
STREAM = b"S"
HWM = b"H"
TRIM = b"T"
RECORD = b"R"
META = b"X"

_PART = struct.Struct(">QI")
_REC = struct.Struct(">QIQ")
_HWM_VALUE = struct.Struct(">Qq")
_REC_HEADER = struct.Struct(">qH")
NO_KEY = 0xFFFF
U64 = struct.Struct(">Q")


def stream_key(name: str) -> bytes:
    return STREAM + name.encode()


def partition_key(kind: bytes, stream_id: int, partition: int) -> bytes:
    return kind + _PART.pack(stream_id, partition)


def record_key(stream_id: int, partition: int, seq: int) -> bytes:
    return RECORD + _REC.pack(stream_id, partition, seq)


def record_seq(key: bytes) -> int:
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


def encode_record(timestamp_ms: int, key: str | None, data: bytes) -> bytes:
    if key is None:
        return _REC_HEADER.pack(timestamp_ms, NO_KEY) + data
    kb = key.encode()
    return _REC_HEADER.pack(timestamp_ms, len(kb)) + kb + data


def decode_record_ts(value: bytes) -> int:
    return _REC_HEADER.unpack_from(value)[0]


def decode_record(value: bytes) -> tuple[int, str | None, bytes]:
    ts, klen = _REC_HEADER.unpack_from(value)
    if klen == NO_KEY:
        return ts, None, value[10:]
    return ts, value[10:10 + klen].decode(), value[10 + klen:]
