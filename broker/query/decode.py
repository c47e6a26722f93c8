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
from typing import Callable, Collection, Sequence

import orjson
import polars as pl

from broker.query import dtypes
from broker.query.compile import parse_time

TP_TIME = "_tp_time"
STORED_TIME = "%Y-%m-%d %H:%M:%S%.3f"   # how broker/rows writes datetime64(3) values


class BatchDecoder:
    def __init__(self, columns: dict[str, str], needed: Sequence[str]) -> None:
        self.types = {name: columns[name] for name in needed}
        self.wire = {name: dtypes.wire_dtype(t) for name, t in self.types.items()}
        self.times = [name for name, t in self.types.items() if dtypes.is_time(t)]
        self.narrow = {name: dtypes.polars_dtype(t) for name, t in self.types.items()
                       if not dtypes.is_time(t) and dtypes.polars_dtype(t) != self.wire[name]}
        self.skipped = 0   # records of the last decode() that were not JSON objects

    def decode(self, datas: Sequence[bytes], stamps: Callable[[], pl.Series], raw: bool,
               times_now: Collection[str] | None = None) -> pl.DataFrame:
        """A frame of the needed columns, a row per record; `stamps()` gives the records' append
        times (ms, Int64), asked for only when a column needs them. Time columns not in
        `times_now` (default: all) stay text until `parse_times`: parsing is the costly part of a
        decode, so a filter that does not read them runs first and leaves fewer to parse."""
        self.skipped = 0
        if raw:
            return self._raw(datas, stamps)
        if not self.types:   # count(*) and the like: no column is read, every record is a row
            return pl.DataFrame(height=len(datas))
        df, keep = self._parse(datas, 0, len(datas))
        now = self.times if times_now is None else [n for n in self.times if n in times_now]
        if now:
            df = self._times(df, now)
        if self.narrow:   # out of range for the column's type: null
            df = df.with_columns(pl.col(n).cast(d, strict=False) for n, d in self.narrow.items())
        if TP_TIME in self.types and (TP_TIME in now or df.get_column(TP_TIME).null_count()):
            times = stamps()
            if keep is not None:
                times = times.gather(keep)
            appended = pl.from_epoch(times, "ms")
            if TP_TIME not in now:   # still text: fill it with text of the stored form
                appended = appended.dt.strftime(STORED_TIME)
            df = df.with_columns(pl.coalesce(pl.col(TP_TIME), appended))
        return df

    def parse_times(self, df: pl.DataFrame, names: Collection[str]) -> pl.DataFrame:
        """Parse the time columns among `names` that decode() left as text."""
        todo = [n for n in self.times if n in names and df.schema.get(n) == pl.String]
        return self._times(df, todo) if todo else df

    def _times(self, df: pl.DataFrame, names: Sequence[str]) -> pl.DataFrame:
        """Parse time columns: one strict format first (what broker/rows stores), the general
        parse (ISO `T`, `Z`, other precisions, from other doors) only if a value needed it."""
        fast = []
        for name in names:
            fmt = "%Y-%m-%d" if dtypes.kind(self.types[name]) == "date" else STORED_TIME
            fast.append(pl.col(name).str.strptime(
                pl.Date if fmt == "%Y-%m-%d" else pl.Datetime("ms"), fmt, strict=False))
        parsed = df.select(fast)
        slow = [name for name in names
                if parsed.get_column(name).null_count() != df.get_column(name).null_count()]
        if slow:
            parsed = parsed.with_columns(df.select(
                parse_time(pl.col(name)) if dtypes.kind(self.types[name]) != "date"
                else parse_time(pl.col(name)).dt.date() for name in slow))
        return df.with_columns(parsed)

    def _parse(self, datas: Sequence[bytes], lo: int, hi: int) -> tuple[pl.DataFrame, pl.Series | None]:
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

    def _raw(self, datas: Sequence[bytes], stamps: Callable[[], pl.Series]) -> pl.DataFrame:
        cols: dict[str, pl.Series] = {}
        if "raw" in self.types:
            binary = pl.Series("raw", datas, dtype=pl.Binary)
            try:
                cols["raw"] = binary.cast(pl.String)
            except pl.exceptions.ComputeError:   # invalid UTF-8 somewhere: decode with replacement
                cols["raw"] = pl.Series("raw", [d.decode("utf-8", "replace") for d in datas])
        if TP_TIME in self.types:
            cols[TP_TIME] = pl.from_epoch(stamps().alias(TP_TIME), "ms")
        return pl.DataFrame(cols) if cols else pl.DataFrame(height=len(datas))


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
