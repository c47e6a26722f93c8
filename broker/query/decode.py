"""Records -> a Polars frame of the columns a query reads, one vectorised parse per batch.

A typed stream's record is a JSON object (broker/rows): the batch is parsed by `pl.read_ndjson`
over the joined record data with an explicit schema of the needed columns only. If that parse
fails (a record that is not a JSON object, a value of the wrong type, a record spanning lines),
the records that are JSON objects are parsed that way once more, without the others (so a value
reads the same whatever shares its batch), and if that fails too the batch is read leniently:
each record by `orjson.loads` into Python lists, one per needed column that is not a string, and
the frame built once from them; string columns are still read by Polars, which writes another
JSON value put in one its own way (~2 ms per 2000 records; bisecting down to the bad records and
building a frame per record cost ~1.3 s when every record was bad, as on a stream of plain
text). Not a JSON object -> skipped and counted (a query reading no column too: count(*) counts
the rows `select *` shows); a value that does not fit its column -> null. A
missing column is null (not the type's zero: a record put by another door may simply lack it), a missing
`_tp_time` is the record's append time. A schemaless stream is `raw` (the data as UTF-8, errors
replaced) and `_tp_time` (the append time). A query that reads a `json` column takes the lenient
read always: its text is then the value as stored, not as Polars would write it.
"""
from __future__ import annotations

import io
import re
from typing import Callable, Collection, Sequence

import orjson
import polars as pl

from broker.query import dtypes
from broker.query.compile import parse_time
from broker.rows.encode import EPOCH_MS_FROM, taken_value
from broker.rows.schema import RAW, TP_TIME
from broker.rows.types import parse_type

STORED_TIME = "%Y-%m-%d %H:%M:%S%.3f"   # how broker/rows writes datetime64(3) values
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")   # `\ud800`..`\udfff` in a JSON string


class BatchDecoder:
    def __init__(self, columns: dict[str, str], needed: Sequence[str]) -> None:
        self.types = {name: columns[name] for name in needed}
        self.wire = {name: dtypes.wire_dtype(t) for name, t in self.types.items()}
        self.times = [name for name, t in self.types.items() if dtypes.is_time(t)]
        self.narrow = {name: dtypes.polars_dtype(t) for name, t in self.types.items()
                       if not dtypes.is_time(t) and dtypes.polars_dtype(t) != self.wire[name]}
        self.skipped = 0   # records of the last decode() that were not JSON objects
        # Polars writes a nested value its own way (1.0 as 1, 1e20 in full, spaces after colons):
        # a json column's text comes from orjson instead, which keeps numbers as they were stored
        self.nested = any(dtypes.kind(t) == "json" for t in self.types.values())

    def decode(self, datas: Sequence[bytes], stamps: Callable[[], pl.Series], raw: bool,
               times_now: Collection[str] | None = None) -> pl.DataFrame:
        """A frame of the needed columns, a row per record; `stamps()` gives the records' append
        times (ms, Int64), asked for only when a column needs them. Time columns not in
        `times_now` (default: all) stay text until `parse_times`: parsing is the costly part of a
        decode, so a filter that does not read them runs first and leaves fewer to parse."""
        self.skipped = 0
        if raw:
            return self._raw(datas, stamps)
        if not self.types:   # count(*) and the like: no column is read, and a row is still a
            return pl.DataFrame(height=self._objects(datas))   # record that is a JSON object
        df, keep = self._parse(datas)
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
        parse (written_time: what ingest takes, from other doors) only if a value needed it."""
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
                written_time(pl.col(name)) if dtypes.kind(self.types[name]) != "date"
                else parse_time(pl.col(name)).dt.date() for name in slow))
        # a `datetime` holds whole seconds, as ingest stores it: another door's 12:00:00.999 kept
        # its milliseconds, hidden by the text but not by =, GROUP BY or to_datetime64
        seconds = [name for name in names if dtypes.kind(self.types[name]) == "datetime"]
        if seconds:
            parsed = parsed.with_columns(pl.col(name).dt.truncate("1s") for name in seconds)
        return df.with_columns(parsed)

    def _parse(self, datas: Sequence[bytes]) -> tuple[pl.DataFrame, pl.Series | None]:
        """Rows of the records and, if any record was skipped, the indexes of those kept."""
        if self.nested:
            return self._lenient(datas)
        df = self._fast(datas, checked=False)
        return (df, None) if df is not None else self._lenient(datas)

    def _fast(self, datas: Sequence[bytes], schema: dict[str, pl.DataType] | None = None,
              checked: bool = True) -> pl.DataFrame | None:
        """The records read by Polars with `schema` (the wire's), None if it cannot. `checked`:
        orjson has read every record as an object (_json_objects)."""
        joined = b"\n".join(datas)
        if joined.count(b"\n") != len(datas) - 1 or b"\r" in joined:
            # a record holding a line break: its lines would be rows of their own, and with an empty
            # record beside it the count could still match, every row after it shifted (the review)
            return None
        if not checked and _SURROGATE_ESCAPE.search(joined):
            # Polars reads a lone surrogate (`"\ud800x"`) as a NUL ("\x00x"), where orjson finds
            # the record not JSON: whether it was a row depended on what shared its batch. Such a
            # batch is first sorted by orjson; a pair (an escaped emoji) reads alike either way.
            return None
        try:
            df = pl.read_ndjson(io.BytesIO(joined), schema=schema or self.wire)
            if df.height == len(datas):
                return df
        except (Exception, pl.exceptions.PanicException):
            pass
        return None

    def _objects(self, datas: Sequence[bytes]) -> int:
        """How many of the records are JSON objects (the others counted as skipped): Polars' line
        reader checks that with a column to read (none read: it checks nothing), and only a batch
        it refuses is looked at record by record. A count(*) then counts the rows a `select *`
        shows (it counted every record)."""
        if self._fast(datas, {TP_TIME: pl.String()}, checked=False) is not None:
            return len(datas)
        keep, _ = self._json_objects(datas)
        return len(keep)

    def _json_objects(self, datas: Sequence[bytes]) -> tuple[list[int], list[dict]]:
        """The indexes of the records that are JSON objects, and the objects; the others are
        counted as skipped."""
        objs: list[dict] = []
        keep: list[int] = []
        for i, data in enumerate(datas):
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                keep.append(i)
                objs.append(obj)
        self.skipped += len(datas) - len(keep)
        return keep, objs

    def _lenient(self, datas: Sequence[bytes]) -> tuple[pl.DataFrame, pl.Series | None]:
        keep, objs = self._json_objects(datas)
        kept = None if len(keep) == len(datas) else pl.Series(keep, dtype=pl.UInt32)
        good = datas if kept is None else [datas[i] for i in keep]
        # line breaks in a JSON object lie between its tokens (a string holds them escaped): as
        # spaces, a record spanning lines reads the fast way too, as it would written on one line
        good = [d.replace(b"\r", b" ").replace(b"\n", b" ") if b"\n" in d or b"\r" in d else d for d in good]
        if not self.nested and (kept is not None or any(map(_SURROGATE_ESCAPE.search, good))):
            # what is left read as the fast read reads it: a value must not depend on whether a
            # record that is not JSON shares its batch (nor the fast read passed over for a `\ud83d`)
            df = self._fast(good)
            if df is not None:
                return df, kept
        # A value that does not fit its typed column: those columns are read here, and the
        # string columns still the fast way - Polars writes another JSON value put in one (by
        # another door) its own way, 1.0 as "1", and orjson would write it as it was stored: a
        # value read beside such a record read otherwise than alone (the review)
        strings = {} if self.nested else {n: d for n, d in self.wire.items() if d == pl.String()}
        fast_strings = self._fast(good, strings) if strings else None
        columns: dict[str, list] = {}
        for name, dtype in self.wire.items():
            if fast_strings is None or name not in strings:
                coerce = _coercer(dtype, self.types[name])
                columns[name] = [coerce(obj.get(name)) for obj in objs]
        df = pl.DataFrame(columns, schema={n: self.wire[n] for n in columns}, strict=False)
        if fast_strings is not None:
            df = fast_strings if not columns else \
                pl.concat([df, fast_strings], how="horizontal").select(list(self.wire))
        return df, kept

    def _raw(self, datas: Sequence[bytes], stamps: Callable[[], pl.Series]) -> pl.DataFrame:
        cols: dict[str, pl.Series] = {}
        if RAW in self.types:
            binary = pl.Series(RAW, datas, dtype=pl.Binary)
            try:
                cols[RAW] = binary.cast(pl.String)
            except pl.exceptions.ComputeError:   # invalid UTF-8 somewhere: decode with replacement
                cols[RAW] = pl.Series(RAW, [d.decode("utf-8", "replace") for d in datas])
        if TP_TIME in self.types:
            cols[TP_TIME] = pl.from_epoch(stamps().alias(TP_TIME), "ms")
        return pl.DataFrame(cols) if cols else pl.DataFrame(height=len(datas))


# `%#z`: an offset of hours only (`+05`, as PostgreSQL writes one) too
_ZONED_FORMATS = ("%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M%#z")
_DECIMAL_COMMA = r"(:\d\d),(\d)"   # 12:00:00,25: ISO 8601's decimal comma, which ingest takes
_DATE_OFFSET = r"^(\d{4}-\d\d-\d\d)([+-]\d)"   # a date with an offset: its midnight there, as ingest reads it
_NUMBER = r"^\s*-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?\s*$"
_MS_RANGE = (-2_208_988_800_000, 10_413_791_999_999)   # datetime64's, as ingest checks it


def written_time(text: pl.Expr) -> pl.Expr:
    """A time column's text as another door wrote it -> Datetime(ms), read as Timeplus ingest reads
    a time (broker/rows/encode.py): parse_time's ISO forms, an offset (`+05:00`, converted to UTC)
    or none of the seconds (`12:30`), and a JSON number as epoch time (seconds below 1e11, else
    milliseconds; null outside datetime64's range). Ingest wrote every one of these as its UTC
    text; put through DIS or gRPC they read as NULL, the same object another value by its door."""
    text = text.str.replace(_DECIMAL_COMMA, "${1}.${2}")
    norm = text.str.strip_chars().str.replace("T", " ", literal=True).str.strip_suffix("Z") \
        .str.replace(_DATE_OFFSET, "${1} 00:00${2}")
    zoned = [norm.str.strptime(pl.Datetime("ms", "UTC"), f, strict=False).dt.replace_time_zone(None)
             for f in _ZONED_FORMATS]
    number = pl.when(text.str.contains(_NUMBER)).then(text.str.strip_chars().cast(pl.Float64, strict=False))
    ms = pl.when(number.abs() < EPOCH_MS_FROM).then((number * 1_000_000).round(0) // 1000).otherwise(number.floor())
    epoch = pl.when(ms.is_between(*_MS_RANGE)).then(pl.from_epoch(ms.cast(pl.Int64, strict=False), "ms"))
    return pl.coalesce([parse_time(text), norm.str.strptime(pl.Datetime("ms"), "%Y-%m-%d %H:%M", strict=False),
                        *zoned, epoch])


def _coercer(dtype: pl.DataType, type_text: str) -> Callable[[object], object]:
    """JSON value -> the value of a column of `dtype` (the wire's for `type_text`): a string column
    takes any value, non-strings as JSON text; a number or bool column what ingest takes
    (encode.taken_value: 3.0 or true in an int column), None where ingest refuses it."""
    if dtype == pl.String():
        return _text_of
    if dtype == pl.Boolean() or dtype.is_integer() or dtype.is_float():
        return taken_value(parse_type(type_text))
    return lambda v: None


def _text_of(value: object) -> str | None:
    """A string column's value: a string as it is, any other JSON value as its JSON text; NULL for
    one orjson cannot write (nested past 255 levels, which ingest refuses too): its JSONEncodeError
    failed the whole query."""
    if isinstance(value, str) or value is None:
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return None
