"""Rows -> record data: check and coerce values against a stream's columns, one JSON object per row.

Each row becomes one UTF-8 JSON object (orjson) holding every column of `columns_of(schema)` in
schema order, `_tp_time` included. A stream without a schema is seen as `raw string, _tp_time`;
its rows are written as the `raw` text's bytes (the record's append time is its `_tp_time`, so a
given `_tp_time` is checked and then not stored).

Work is column-wise: a column whose values all have the expected JSON type is checked with one
pass of C-level builtins (`set(map(type, ...))`, `min`, `max`) and kept as is; only columns that
need coercion (nulls, ints into float columns, datetimes) go value by value. A bad value raises
ClientError(BAD_ROW, row=<0-based>, column=<name>, detail=...) for the first bad value in row
order (ties: column order), and nothing is returned for the request.

Coercion decisions (ClickHouse/proton JSON insert semantics, strict where a silent conversion
would change the data):
- int/uint: JSON integers, range-checked per width and sign. Integral floats (3.0, what pandas
  sends for an int column) are accepted up to 2^53 in magnitude, beyond which a float no longer
  names one integer; true/false are 1/0 (ClickHouse reads bools as numbers). Strings ("12"),
  fractional floats and out-of-range values are refused.
- float32/float64: any JSON number or true/false, stored as a float; values outside float32's
  range are refused (proton would store inf). No rounding to float32 at ingest: the text kept is
  what was sent, a query reads it as float32.
- bool: true/false and the integers 0/1; anything else (including "true") is refused.
- string: strings; numbers, bools, objects and arrays are kept as their JSON text (proton's
  input_format_json_read_{numbers,bools,objects,arrays}_as_strings defaults).
- datetime64(3)/datetime: ISO 8601 `YYYY-MM-DD[(T| )HH:MM[:SS[.fraction]]][Z|+HH[:MM]]` (what
  Python's isoformat() and the Timeplus text form both are), a bare date meaning midnight. Text
  without an offset is UTC, whatever zone the column declares: records hold UTC text and queries
  show it, so reading naive input in the column's zone (as ClickHouse does) would make a value read
  back differ from the value written, and a record re-ingested shift. Offsets are converted to UTC;
  digits beyond milliseconds (beyond seconds for `datetime`) are truncated.
  Numbers are epoch time: seconds when |n| < 1e11, milliseconds otherwise (1e11 s is past the
  year 5000, so a millisecond timestamp is never mistaken for seconds after March 1973); float
  seconds keep their milliseconds. Range: datetime64 1900-01-01..2299-12-31, datetime
  1970-01-01..2106-02-07 06:28:15 UTC (proton's ranges); outside is refused, not clamped.
- date: `YYYY-MM-DD` text only, 1970-01-01..2149-06-06; a datetime text is refused rather than
  silently cut to its day.
- json: any JSON value. A string holding a JSON object or array is parsed (ClickHouse reads an
  object column from such strings); any other string stays a JSON string.
- null or a missing column: a nullable column stores null; any other column stores its type's
  default (0, 0.0, false, "", {}, 1970-01-01[ 00:00:00[.000]]), as proton does; declared
  `default` expressions are not evaluated. `_tp_time` null or missing takes the stream's
  event_time_column value when it has one (and it is not null), else the request's ingest time.
"""
from __future__ import annotations

import math
import re
import reprlib
from datetime import UTC as UTC_ZONE
from datetime import date, datetime, timedelta
from typing import Any, Callable, Sequence

import orjson

from broker.errors import ErrorCode, client_error
from broker.model import StreamSchema
from broker.rows.schema import RAW, TP_TIME, columns_of
from broker.rows.types import ColumnType, parse_type

_EPOCH = datetime(1970, 1, 1)
_DATETIME64_RANGE = (datetime(1900, 1, 1), datetime(2299, 12, 31, 23, 59, 59, 999999))
_DATETIME_RANGE = (_EPOCH, datetime(2106, 2, 7, 6, 28, 15))
_DATE_RANGE = (date(1970, 1, 1), date(2149, 6, 6))
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT_EXACT = 2.0**53            # integral floats beyond this do not name one integer
EPOCH_MS_FROM = 1e11              # |epoch number| at and above which it is milliseconds
_DT_TEXT = re.compile(r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?)?(?:Z|[+-]\d\d(?::?\d\d)?)?",
                      re.ASCII)
_CANONICAL_MS = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", re.ASCII)
_DATE_TEXT = re.compile(r"\d{4}-\d\d-\d\d", re.ASCII)
# a date then an offset: fromisoformat takes any character after a date for the separator, so it
# read `2024-05-01+05:00` as 05:00 (the offset as the time of day); it is midnight at that offset
_DATE_OFFSET = re.compile(r"(\d{4}-\d\d-\d\d)(Z|[+-].*)", re.ASCII)
_CACHE_MAX = 100_000              # parsed datetime texts kept per column kind, for every stream at once
# text -> stored form, one map for datetime (True) and one for datetime64 columns, shared by every
# stream's encoder: a map per column held up to ~19 MB each (distinct texts such as isoformat()'s),
# for the broker's life, times every typed stream ingested into
_PARSED: dict[bool, dict[str, str]] = {True: {}, False: {}}

NoneType = type(None)


class _Bad(Exception):
    """A value a column refuses; `detail` says what and why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _BadAt(Exception):
    def __init__(self, row: int, detail: str) -> None:
        super().__init__(detail)
        self.row = row
        self.detail = detail


def _describe(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode() if _dumpable(value) else _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# what orjson cannot write (a lone surrogate, nesting past 255 levels) described by reprlib, whose
# depth is bounded: repr() of a value nested ~1000 deep raised RecursionError, a 500 for a bad row
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 60, 80, 80


def _dumpable(value: Any) -> bool:
    try:
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return False
    return True


def _json_kind(value: Any) -> str:
    return {str: "a string", bool: "a bool", int: "an integer", float: "a float", dict: "an object",
            list: "an array", NoneType: "null"}.get(type(value), type(value).__name__)


# -- datetimes -------------------------------------------------------------------------------------

def format_ms(ms: int) -> str:
    """Epoch milliseconds -> the datetime64(3) text form, UTC."""
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(" ", "milliseconds")


class _Times:
    """Parses datetime values for one column; remembers texts already parsed."""

    def __init__(self, ctype: ColumnType) -> None:
        self.seconds = ctype.kind == "datetime"
        self.lo, self.hi = _DATETIME_RANGE if self.seconds else _DATETIME64_RANGE
        self.spec = "seconds" if self.seconds else "milliseconds"
        self.cache = _PARSED[self.seconds]
        # the common case: text already in the stored form needs only a calendar check
        self.canonical_ok = not self.seconds

    def text(self, s: str) -> str:
        hit = self.cache.get(s)
        if hit is not None:
            return hit
        if _DT_TEXT.fullmatch(s) is None:
            raise _Bad(f"{_describe(s)} is not a datetime: use ISO 8601 (2024-05-01T12:00:00.123Z) or "
                       "YYYY-MM-DD HH:MM:SS[.fff]")
        date_offset = _DATE_OFFSET.fullmatch(s)
        try:
            dt = datetime.fromisoformat(f"{date_offset[1]}T00:00{date_offset[2]}" if date_offset else s)
            if dt.tzinfo is not None:
                dt = dt.astimezone(UTC_ZONE).replace(tzinfo=None)
        except (ValueError, OverflowError) as e:
            raise _Bad(f"{_describe(s)} is not a valid datetime ({e})") from None
        out = self._checked(dt, s)
        if len(self.cache) >= _CACHE_MAX:
            self.cache.clear()
        self.cache[s] = out
        return out

    def canonical(self, s: str) -> str:
        """Fast path for text already in the stored form (the usual case for data read back)."""
        if self.canonical_ok and len(s) == 23 and _CANONICAL_MS.fullmatch(s) is not None:
            try:
                dt = datetime.fromisoformat(s)
            except ValueError as e:
                raise _Bad(f"{_describe(s)} is not a valid datetime ({e})") from None
            if not self.lo <= dt <= self.hi:
                raise self._range(s)
            return s
        return self.text(s)

    def number(self, n: float) -> str:
        if not math.isfinite(n):
            raise _Bad(f"{n} is not a datetime")
        if abs(n) < EPOCH_MS_FROM:
            ms = n * 1000 if type(n) is int else round(n * 1_000_000) // 1000
        else:
            ms = n if type(n) is int else math.floor(n)
        try:
            dt = _EPOCH + timedelta(milliseconds=int(ms))
        except OverflowError:
            raise self._range(n) from None
        return self._checked(dt, n)

    def _checked(self, dt: datetime, given: object) -> str:
        if not self.lo <= dt <= self.hi:
            raise self._range(given)
        return dt.isoformat(" ", self.spec)

    def _range(self, given: object) -> _Bad:
        return _Bad(f"{_describe(given)} is outside the {'datetime' if self.seconds else 'datetime64'} range "
                    f"{self.lo.isoformat(' ')} .. {self.hi.isoformat(' ', self.spec)} UTC")


# -- columns ---------------------------------------------------------------------------------------

_Column = Sequence[Any]


class _Codec:
    """How one column checks and converts its values: `fast` (a whole column, C-level checks; None
    when the column needs value-by-value work) and `one` (a single value; raises _Bad)."""

    def __init__(self, name: str, ctype: ColumnType) -> None:
        self.name = name
        self.ctype = ctype
        self.nullable = ctype.nullable
        kind = ctype.kind
        self.times = _Times(ctype) if kind in ("datetime64", "datetime") else None
        self.default: Any = None if ctype.nullable else _DEFAULTS[kind]
        self.fast: Callable[[_Column], list | None] = getattr(self, f"_fast_{kind}", self._fast_none)
        self._one: Callable[[Any], Any] = getattr(self, f"_one_{kind}")
        bits = ctype.bits if kind in ("int", "uint") else 64
        self.lo: int = 0 if kind == "uint" else -(2 ** (bits - 1))
        self.hi: int = 2**bits - 1 if kind == "uint" else 2 ** (bits - 1) - 1
        self.f32 = kind == "float" and ctype.bits == 32

    def column(self, values: _Column) -> list:
        """Every value converted; _BadAt at the first bad one."""
        out = self.fast(values)
        if out is not None:
            return out
        one = self.one
        try:
            return [one(v) for v in values]
        except _Bad:
            for i, v in enumerate(values):
                try:
                    one(v)
                except _Bad as e:
                    raise _BadAt(i, e.detail) from None
            raise  # pragma: no cover  # `one` is deterministic

    def one(self, value: Any) -> Any:
        if value is None:
            return self.default
        return self._one(value)

    def _refuse(self, value: Any, why: str = "") -> _Bad:
        return _Bad(f"{_json_kind(value)} {_describe(value)} is not a {self.ctype.text}{why}")

    # fast paths: a list when every value already has the stored JSON type (None: go one by one)
    def _fast_none(self, values: _Column) -> list | None:
        return None

    def _fast_string(self, values: _Column) -> list | None:
        if set(map(type, values)) <= {str}:
            return values if type(values) is list else list(values)
        return None

    def _fast_int(self, values: _Column) -> list | None:
        if set(map(type, values)) <= {int} and (not values or (self.lo <= min(values) and max(values) <= self.hi)):
            return list(values)
        return None

    _fast_uint = _fast_int

    def _fast_float(self, values: _Column) -> list | None:
        types = set(map(type, values))
        if not types <= {float, int}:
            return None
        try:
            out = list(values) if types <= {float} else list(map(float, values))
        except OverflowError:
            return None
        if not all(map(math.isfinite, out)):
            return None
        if self.f32 and out and not (-_FLOAT32_MAX <= min(out) and max(out) <= _FLOAT32_MAX):
            return None
        return out

    def _fast_bool(self, values: _Column) -> list | None:
        return list(values) if set(map(type, values)) <= {bool} else None

    def _fast_datetime64(self, values: _Column) -> list | None:
        if not set(map(type, values)) <= {str}:
            return None
        times = self.times
        assert times is not None
        try:
            return list(map(times.canonical, values))
        except _Bad:
            return None   # found again, with its row, by the value-by-value pass

    def _fast_json(self, values: _Column) -> list | None:
        return list(values) if set(map(type, values)) <= {dict, list, int, float, bool} else None

    # one value (never None: `one` handles null)
    def _one_string(self, v: Any) -> Any:
        t = type(v)
        if t is str:
            return v
        if t is bool:
            return "true" if v else "false"
        if t in (int, float, dict, list):
            return self._dumps(v)
        raise self._refuse(v)

    def _one_int(self, v: Any) -> Any:
        t = type(v)
        if t is int:
            n = v
        elif t is bool:
            n = int(v)
        elif t is float:
            # a JSON integer past 64 bits reads as a float (-2^63 - 1 as -2^63: a 64-bit one never does)
            if v.is_integer() and (not self.lo <= v <= self.hi or (self.lo < 0 and v <= -2**63)):
                raise _Bad(f"{_describe(v)} is outside the {self.ctype.text} range {self.lo} .. {self.hi}")
            if not (v.is_integer() and abs(v) <= _FLOAT_EXACT):
                raise self._refuse(v, " (only whole numbers up to 2^53 are taken from floats)")
            n = int(v)
        else:
            raise self._refuse(v, " (send a JSON number)" if t is str else "")
        if not self.lo <= n <= self.hi:
            raise _Bad(f"{n} is outside the {self.ctype.text} range {self.lo} .. {self.hi}")
        return n

    _one_uint = _one_int

    def _one_float(self, v: Any) -> Any:
        t = type(v)
        if t not in (float, int, bool):
            raise self._refuse(v, " (send a JSON number)" if t is str else "")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f) or (self.f32 and abs(f) > _FLOAT32_MAX):
            raise _Bad(f"{_describe(v)} is outside the {self.ctype.text} range")
        return f

    def _one_bool(self, v: Any) -> Any:
        t = type(v)
        if t is bool:
            return v
        if t is int and v in (0, 1):
            return v == 1
        raise self._refuse(v, " (send true/false or 0/1)")

    def _one_datetime64(self, v: Any) -> Any:
        times = self.times
        assert times is not None
        t = type(v)
        if t is str:
            return times.text(v)
        if t is int or t is float:
            return times.number(v)
        raise self._refuse(v)

    _one_datetime = _one_datetime64
    _fast_datetime = _fast_datetime64

    def _one_date(self, v: Any) -> Any:
        if type(v) is not str or _DATE_TEXT.fullmatch(v) is None:
            raise self._refuse(v, " (send YYYY-MM-DD)")
        try:
            d = date.fromisoformat(v)
        except ValueError as e:
            raise _Bad(f"{_describe(v)} is not a valid date ({e})") from None
        if not _DATE_RANGE[0] <= d <= _DATE_RANGE[1]:
            raise _Bad(f"{v} is outside the date range {_DATE_RANGE[0]} .. {_DATE_RANGE[1]}")
        return v

    def _one_json(self, v: Any) -> Any:
        if type(v) is str and v[:1] in ("{", "["):
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError:
                return v
        if type(v) in (str, dict, list, int, float, bool):
            return v
        raise self._refuse(v)

    def _dumps(self, v: Any) -> str:
        try:
            return orjson.dumps(v).decode()
        except orjson.JSONEncodeError as e:
            raise _Bad(f"{_json_kind(v)} that cannot be written as JSON ({e})") from None


_DEFAULTS: dict[str, Any] = {
    "string": "", "int": 0, "uint": 0, "float": 0.0, "bool": False, "datetime64": "1970-01-01 00:00:00.000",
    "datetime": "1970-01-01 00:00:00", "date": "1970-01-01", "json": {},
}


# -- the encoder -----------------------------------------------------------------------------------

class RowEncoder:
    """Checks and encodes rows for one stream. Cheap to build; reusable across requests (it keeps
    a cache of parsed datetime texts)."""

    def __init__(self, schema: StreamSchema | None) -> None:
        self.schema = schema
        self.raw_only = schema is None
        self.columns = columns_of(schema)
        self.names: tuple[str, ...] = tuple(c.name for c in self.columns)
        self._codecs = [_Codec(c.name, parse_type(c.type)) for c in self.columns]
        self._by_name = {c.name: c for c in self._codecs}
        tp = self._by_name[TP_TIME]
        # _tp_time is filled in, never defaulted to the epoch: convert it as if nullable
        tp.default = None
        self._tp_index = self.names.index(TP_TIME)
        event = schema.event_time_column if schema is not None else ""
        self._event = self._by_name.get(event) if event and event != TP_TIME else None
        raw = self._by_name.get(RAW)
        self._raw = raw if raw is not None and raw.ctype.kind == "string" else None
        if self.raw_only and raw is not None:
            raw.default = None   # a row of a schemaless stream without raw has nothing to write

    @property
    def takes_text(self) -> bool:
        """Whether texts() can write: the stream has a string column `raw`."""
        return self._raw is not None

    # -- the three entry points --------------------------------------------------------------------

    def compact(self, columns: list, data: list, now_ms: int) -> list[bytes]:
        """`{"columns": [...], "data": [[...], ...]}`: each row a list with a value per listed column."""
        if type(columns) is not list or not columns or not set(map(type, columns)) <= {str}:
            raise _invalid("columns must be a non-empty list of column names")
        if len(set(columns)) != len(columns):
            dup = next(c for i, c in enumerate(columns) if c in columns[:i])
            raise _invalid(f"column [{dup}] is listed twice in columns")
        unknown = [c for c in columns if c not in self._by_name]
        if unknown:
            raise _invalid(f"unknown column [{unknown[0]}] in columns; the stream has: {', '.join(self.names)}")
        if type(data) is not list:
            raise _body("data must be a list of rows")
        width = len(columns)
        if not set(map(type, data)) <= {list, tuple} or not all(len(r) == width for r in data):
            for i, r in enumerate(data):
                if type(r) not in (list, tuple):
                    raise _body(f"row {i} must be a list of values, not {_json_kind(r)}")
                if len(r) != width:
                    raise _body(f"row {i} has {len(r)} values for {width} columns")
        values = dict(zip(columns, zip(*data))) if data else dict.fromkeys(columns, ())
        return self._encode(values, len(data), now_ms)

    def objects(self, rows: list, now_ms: int) -> list[bytes]:
        """One JSON object per row: keys matched to columns, unknown keys ignored, missing ones null."""
        if not set(map(type, rows)) <= {dict}:
            i, r = next((i, r) for i, r in enumerate(rows) if type(r) is not dict)
            raise _body(f"row {i} must be a JSON object, not {_json_kind(r)}")
        values: dict[str, _Column] = {}
        for name in self.names:
            col = [r.get(name) for r in rows]
            if col.count(None) != len(col):
                values[name] = col
        return self._encode(values, len(rows), now_ms)

    def texts(self, lines: list[str], now_ms: int) -> list[bytes]:
        """Each text one row, in column `raw` (the raw and lines formats)."""
        if self._raw is None:
            raise _invalid("the raw and lines formats need a string column named raw; this stream has: "
                           + ", ".join(self.names))
        if self.raw_only:
            return self._raw_records(lines)
        return self._encode({RAW: lines}, len(lines), now_ms)

    # -- shared ------------------------------------------------------------------------------------

    def _encode(self, values: dict[str, _Column], n: int, now_ms: int) -> list[bytes]:
        out: list[list] = []
        first: tuple[int, int, str] | None = None   # (row, column index, detail) of the first bad value
        for index, codec in enumerate(self._codecs):
            given = values.get(codec.name)
            if given is None:
                out.append([codec.default] * n)
                continue
            try:
                out.append(codec.column(given))
            except _BadAt as e:
                if first is None or (e.row, index) < first[:2]:
                    first = (e.row, index, e.detail)
                out.append([])
        if first is not None:
            row, index, detail = first
            raise client_error(ErrorCode.BAD_ROW, row=row, column=self.names[index], detail=detail)
        if self.raw_only:
            return self._raw_records(out[self.names.index(RAW)])
        out[self._tp_index] = self._tp_times(out[self._tp_index], out, values, n, now_ms)
        names = self.names
        try:
            # copied out of orjson's buffer at once: a bytes object orjson returns keeps the ~4 KiB
            # it was written in (200k rows held 800 MiB), and the copy lets the next dump reuse it
            return [bytes(memoryview(orjson.dumps(dict(zip(names, row))))) for row in zip(*out)]
        except orjson.JSONEncodeError:
            raise self._unwritable(out) from None

    def _tp_times(self, given: list, out: list[list], values: dict[str, _Column], n: int, now_ms: int) -> list:
        """_tp_time per row: the given value, else the event-time column's as sent (not the
        default a null or missing one is stored as: rows were stamped 1970), else the ingest time."""
        if n and given.count(None) == 0:
            return given
        now = format_ms(now_ms)
        fallback: Sequence[Any] = [now] * n
        event = self._event
        if event is not None:
            sent = values.get(event.name)
            times = [None] * n if sent is None else \
                [None if s is None else t for s, t in zip(sent, out[self._codecs.index(event)])]
            if event.ctype.kind == "datetime":   # stored to the second; _tp_time keeps milliseconds
                times = [None if t is None else t + ".000" for t in times]
            fallback = [now if t is None else t for t in times]
        if given.count(None) == n:
            return list(fallback)
        return [f if g is None else g for g, f in zip(given, fallback)]

    def _raw_records(self, raws: list) -> list[bytes]:
        if None in raws:
            raise client_error(ErrorCode.BAD_ROW, row=raws.index(None), column=RAW,
                               detail="a stream without a schema needs a raw value in every row")
        try:
            return [s.encode() for s in raws]
        except UnicodeEncodeError as e:
            bad = next(i for i, s in enumerate(raws) if not _encodable(s))
            raise client_error(ErrorCode.BAD_ROW, row=bad, column=RAW, detail=f"not valid text ({e.reason})") \
                from None

    def _unwritable(self, out: list[list]) -> Exception:
        for i, row in enumerate(zip(*out)):
            for name, value in zip(self.names, row):
                try:
                    orjson.dumps(value)
                except orjson.JSONEncodeError as e:
                    return client_error(ErrorCode.BAD_ROW, row=i, column=name,
                                        detail=f"the value cannot be written as JSON ({e})")
        return client_error(ErrorCode.BAD_BODY, detail="a row cannot be written as JSON")  # pragma: no cover


def taken_value(ctype: ColumnType) -> Callable[[Any], Any]:
    """A JSON value -> what ingest stores for it in a column of `ctype` (an int, float or bool
    column: its number or bool), None where ingest would refuse it. The query side reads records
    other doors wrote with it, so one object reads alike whichever door wrote it."""
    codec = _Codec("", ctype)
    one = codec._one

    def take(value: Any) -> Any:
        if value is None:
            return None
        try:
            return one(value)
        except _Bad:
            return None
    return take


def _encodable(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def _invalid(detail: str) -> Exception:
    return client_error(ErrorCode.INVALID_REQUEST, detail=detail)


def _body(detail: str) -> Exception:
    return client_error(ErrorCode.BAD_BODY, detail=detail)
