"""Records -> a Polars frame of the columns a query reads, one vectorised parse per batch.

A typed stream's record is a JSON object (broker/rows): the batch is parsed by `pl.read_ndjson`
over the joined record data with an explicit schema of the needed columns only. If that parse
fails (a record that is not a JSON object, a value of the wrong type, a record spanning lines),
the batch is bisected so only the bad records take the slow path, where each is loaded on its own:
not a JSON object -> skipped and counted; a value that does not fit its column -> null. A missing
column is null (not the type's zero: a record put by another door may simply lack it), a missing
`_tp_time` is the record's append time. A schemaless stream is `raw` (the data as UTF-8, errors
replaced) and `_tp_time` (the append time).
"""
from __future__ import annotations

import io
from typing import Sequence

import orjson
import polars as pl

from broker.model import Record
from broker.query import dtypes
from broker.query.compile import parse_time

TP_TIME = "_tp_time"


class BatchDecoder:
    def __init__(self, columns: dict[str, str], needed: Sequence[str]) -> None:
        self.types = {name: columns[name] for name in needed}
        self.wire = {name: dtypes.wire_dtype(t) for name, t in self.types.items()}
        self.times = [name for name, t in self.types.items() if dtypes.is_time(t)]
        self.narrow = {name: dtypes.polars_dtype(t) for name, t in self.types.items()
                       if not dtypes.is_time(t) and dtypes.polars_dtype(t) != self.wire[name]}
        self.skipped = 0   # records of the last decode() that were not JSON objects

    def decode(self, records: Sequence[Record], raw: bool) -> pl.DataFrame:
        self.skipped = 0
        if raw:
            return self._raw(records)
        if not self.types:   # count(*) and the like: no column is read, every record is a row
            return pl.DataFrame(height=len(records))
        datas = [r.data for r in records]
        df, keep = self._parse(datas, 0, len(datas))
        if self.times:
            df = self._times(df)
        if self.narrow:   # out of range for the column's type: null
            df = df.with_columns(pl.col(n).cast(d, strict=False) for n, d in self.narrow.items())
        if TP_TIME in self.types:
            stamps = pl.Series("__ts", [r.timestamp_ms for r in records], dtype=pl.Int64)
            if keep is not None:
                stamps = stamps.gather(keep)
            df = df.with_columns(pl.coalesce(pl.col(TP_TIME), pl.from_epoch(stamps, "ms")))
        return df

    def _times(self, df: pl.DataFrame) -> pl.DataFrame:
        """Parse time columns: one strict format first (what broker/rows stores), the general
        parse (ISO `T`, `Z`, other precisions, from other doors) only if a value needed it."""
        fast = []
        for name in self.times:
            fmt = "%Y-%m-%d" if dtypes.kind(self.types[name]) == "date" else "%Y-%m-%d %H:%M:%S%.3f"
            fast.append(pl.col(name).str.strptime(
                pl.Date if fmt == "%Y-%m-%d" else pl.Datetime("ms"), fmt, strict=False))
        parsed = df.select(fast)
        slow = [name for name in self.times
                if parsed.get_column(name).null_count() != df.get_column(name).null_count()]
        if slow:
            parsed = parsed.with_columns(df.select(
                parse_time(pl.col(name)) if dtypes.kind(self.types[name]) != "date"
                else parse_time(pl.col(name)).dt.date() for name in slow))
        return df.with_columns(parsed)

    def _parse(self, datas: list[bytes], lo: int, hi: int) -> tuple[pl.DataFrame, pl.Series | None]:
        """Rows of datas[lo:hi] and, if any record was skipped, the indexes of those kept."""
        try:
            df = pl.read_ndjson(io.BytesIO(b"\n".join(datas[lo:hi])), schema=self.wire)
            if df.height == hi - lo:
                return df, None
        except (Exception, pl.exceptions.PanicException):   # bisect: only bad records go slow
            pass
        if hi - lo == 1:
            row = self._lenient(datas[lo])
            if row is None:
                self.skipped += 1
                return pl.DataFrame(schema=self.wire), pl.Series([], dtype=pl.UInt32)
            return row, None
        mid = (lo + hi) // 2
        (a, ka), (b, kb) = self._parse(datas, lo, mid), self._parse(datas, mid, hi)
        keep = None
        if ka is not None or kb is not None:
            keep = pl.concat([
                ka if ka is not None else pl.Series(range(mid - lo), dtype=pl.UInt32),
                (kb if kb is not None else pl.Series(range(hi - mid), dtype=pl.UInt32)) + (mid - lo),
            ]).cast(pl.UInt32)
        return pl.concat([a, b]), keep

    def _lenient(self, data: bytes) -> pl.DataFrame | None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        cols = {}
        for name, dtype in self.wire.items():
            value = _coerce(obj.get(name), dtype)
            try:
                cols[name] = pl.Series(name, [value], dtype=dtype, strict=False)
            except Exception:   # a value that does not fit its column is null
                cols[name] = pl.Series(name, [None], dtype=dtype)
        return pl.DataFrame(cols)

    def _raw(self, records: Sequence[Record]) -> pl.DataFrame:
        cols: dict[str, pl.Series] = {}
        if "raw" in self.types:
            binary = pl.Series("raw", [r.data for r in records], dtype=pl.Binary)
            try:
                cols["raw"] = binary.cast(pl.String)
            except pl.exceptions.ComputeError:   # invalid UTF-8 somewhere: decode with replacement
                cols["raw"] = pl.Series("raw", [r.data.decode("utf-8", "replace") for r in records])
        if TP_TIME in self.types:
            cols[TP_TIME] = pl.from_epoch(
                pl.Series(TP_TIME, [r.timestamp_ms for r in records], dtype=pl.Int64), "ms")
        return pl.DataFrame(cols) if cols else pl.DataFrame(height=len(records))


def _coerce(value: object, dtype: pl.DataType) -> object:
    """A JSON value for a column of `dtype`, or None where it does not fit (1.5 for an int)."""
    if value is None:
        return None
    if dtype == pl.String():
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if dtype == pl.Boolean():
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if dtype.is_integer():
        return value if isinstance(value, int) else None
    if dtype.is_float():
        return value if isinstance(value, (int, float)) else None
    return None
