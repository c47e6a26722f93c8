"""Shared fixtures for the query engine tests: a catalogue of streams and record makers."""
from __future__ import annotations

from datetime import UTC, datetime

import orjson

from broker.errors import ErrorCode, client_error
from broker.model import ColumnDef, Record

TP = ColumnDef("_tp_time", "datetime64(3, 'UTC')")
STREAMS: dict[str, tuple[ColumnDef, ...]] = {
    "foo": (ColumnDef("raw", "string"), TP),   # schemaless: what columns_of(None) gives
    "t": (ColumnDef("s", "string"), ColumnDef("i", "int64"), ColumnDef("f", "float64"),
          ColumnDef("b", "bool"), ColumnDef("ts", "datetime64(3)"), ColumnDef("d", "date"),
          ColumnDef("j", "json"), ColumnDef("n", "nullable(int32)"), ColumnDef("u", "uint8"), TP),
    "w": (ColumnDef("i8", "int8"), ColumnDef("i", "int64"), ColumnDef("u", "uint64"), ColumnDef("f", "float64"),
          ColumnDef("s", "string"), TP),   # integers at their types' limits
}


def lookup(name: str) -> tuple[ColumnDef, ...]:
    if name not in STREAMS:
        raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=name)
    return STREAMS[name]


def text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def row(seq: int, ms: int, **values: object) -> Record:
    """A typed-stream record as broker/rows writes it, `_tp_time` = ms."""
    return Record(seq, ms, None, orjson.dumps({"_tp_time": text(ms), **values}))


def raw(seq: int, data: bytes, ms: int = 1_700_000_000_000) -> Record:
    return Record(seq, ms, None, data)
