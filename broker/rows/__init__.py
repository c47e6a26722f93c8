"""Typed rows of Timeplus streams: column types, schemas, checking and encoding rows, ingest formats.

No I/O and no broker state: the Timeplus door calls these between decoding a request and handing
the core one batch of record data. Import direction: api -> rows -> model, errors.
"""
from __future__ import annotations

from broker.rows.encode import RowEncoder, format_ms
from broker.rows.ingest import FORMATS, choose_format, decode
from broker.rows.schema import RAW, TP_TIME, TP_TIME_TYPE, build_schema, columns_of
from broker.rows.types import ColumnType, parse_type

__all__ = ["FORMATS", "RAW", "TP_TIME", "TP_TIME_TYPE", "ColumnType", "RowEncoder", "build_schema",
           "choose_format", "columns_of", "decode", "format_ms", "parse_type"]
