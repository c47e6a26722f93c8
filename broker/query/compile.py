"""sqlglot expressions -> typed Polars expressions, compiled once per query.

`ExprCompiler.compile(node)` returns a `Typed` (a Polars expression and its canonical type), or
raises the client error a user can act on (unknown column or function, type mismatch, unsupported
construct) before any data is read. Semantics follow Timeplus: `/` divides as floats, LIKE is
case-sensitive and ILIKE is not, `::int` / `::float` are int32 / float32, and a cast that cannot
convert gives null rather than failing the stream.

`raw:key` is Timeplus's json_extract_string: a JSON string is its unquoted text; JSON null, a
missing key or a record that is not JSON is ''; any other value (number, bool, object, array) is
its JSON text as ClickHouse's JSONExtractRaw gives it, i.e. re-serialised compactly rather than
copied byte for byte: `1.50` reads as `1.5`, `1e3` as `1000.0`, `{"x": [1]}` as `{"x":[1]}`, an
integer beyond 64 bits as a float. (Keeping the exact source text would need a JSON scanner of our
own per row; the value, which is what a `::float` or a comparison reads, is the same.)
`round(x, n)` is ClickHouse's: floats round half to even, integers half away from zero at n < 0
(`round(15, -1)` is 20; a result that does not fit the integer type is null).
Nullability is typed as ClickHouse's: an operator or function of a nullable operand or NULL is
`nullable(T)` (`n + 1`, `n = 1` a `nullable(bool)`, `n::string`), if/multi_if/CASE when a result
is, coalesce when every argument is; IS NULL and count are not.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Callable

import polars as pl
from sqlglot import exp

from broker.errors import ErrorCode, client_error
from broker.query import dtypes
from broker.query.dtypes import DATETIME64, NULL, is_numeric, kind
from broker.query.sqltext import INTERVAL_FN, JSON_FN

NOW_COLUMN = "__now"   # the decoder adds it per batch when a query calls now()

_NO_VALUE = object()

# sqlglot's ClickHouse data types -> canonical types (Timeplus: `int` is int32, `float` float32).
_CAST_TYPES: dict[object, str] = {
    exp.DataType.Type.TINYINT: "int8", exp.DataType.Type.SMALLINT: "int16",
    exp.DataType.Type.INT: "int32", exp.DataType.Type.BIGINT: "int64",
    exp.DataType.Type.UTINYINT: "uint8", exp.DataType.Type.USMALLINT: "uint16",
    exp.DataType.Type.UINT: "uint32", exp.DataType.Type.UBIGINT: "uint64",
    exp.DataType.Type.FLOAT: "float32", exp.DataType.Type.DOUBLE: "float64",
    exp.DataType.Type.TEXT: "string", exp.DataType.Type.VARCHAR: "string",
    exp.DataType.Type.CHAR: "string", exp.DataType.Type.BOOLEAN: "bool",
    exp.DataType.Type.DATETIME: "datetime", exp.DataType.Type.DATETIME64: DATETIME64,
    exp.DataType.Type.TIMESTAMP: DATETIME64, exp.DataType.Type.DATE: "date",
    exp.DataType.Type.JSON: "json",
}
# Timeplus's to_* conversion functions are casts by another name.
_CONVERSIONS = {"to_string": "string", "to_int": "int32", "to_int32": "int32",
                "to_int64": "int64", "to_float": "float32", "to_float32": "float32",
                "to_float64": "float64", "to_bool": "bool", "to_datetime": "datetime",
                "to_datetime64": DATETIME64, "to_date": "date"}
_ASCII_UPPER, _ASCII_LOWER = list(string.ascii_uppercase), list(string.ascii_lowercase)
_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d")
_COMPARISONS: dict[type, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
    exp.EQ: lambda a, b: a == b, exp.NEQ: lambda a, b: a != b, exp.GT: lambda a, b: a > b,
    exp.GTE: lambda a, b: a >= b, exp.LT: lambda a, b: a < b, exp.LTE: lambda a, b: a <= b,
}
AGGREGATES = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max)
# the arguments of a sqlglot function node that ExprCompiler._args reads, in order after `this`
_READ_ARGS = ("this", "expressions", "expression", "decimals")
DISTINCT_AGGREGATES = ("count_distinct", "uniq", "uniq_exact")   # aggregates sqlglot does not know


@dataclass(frozen=True)
class Typed:
    expr: pl.Expr
    type: str
    value: object = _NO_VALUE   # the Python value when the expression is a literal

    @property
    def is_literal(self) -> bool:
        return self.value is not _NO_VALUE


def _as(t: Typed, dtype: pl.DataType) -> Typed:
    """A NULL-typed operand as a null of `dtype`: Polars refuses string, numeric and logical
    operations on its untyped null (`abs(null)`, `lower(null)`, `not null` failed at run time)."""
    return Typed(t.expr.cast(dtype), t.type, t.value) if kind(t.type) == NULL else t


def _of(type_text: str, *operands: Typed) -> str:
    """The type of a result that is NULL where an operand is: `nullable(T)` when any operand is
    nullable or the NULL literal, as ClickHouse types functions and operators of Nullable
    arguments (`n + 1` of a nullable(int32) is nullable(int64), `n = 1` nullable(bool))."""
    return dtypes.nullable(type_text, any(dtypes.is_nullable(t.type) for t in operands))


def is_aggregate(node: exp.Expression) -> bool:
    return isinstance(node, (*AGGREGATES, exp.ApproxDistinct)) or (
        isinstance(node, exp.Anonymous) and node.name.lower() in DISTINCT_AGGREGATES)


def function_name(node: exp.Expression) -> str:
    if isinstance(node, exp.ApproxDistinct):   # how sqlglot reads ClickHouse's uniq(x)
        return "uniq"
    return node.name.lower() if isinstance(node, exp.Anonymous) else node.key


def cast_target(to: exp.DataType) -> str:
    target = _CAST_TYPES.get(to.this)
    if target is None and to.sql("clickhouse") == "String":
        return "string"   # ClickHouse's aliases of String: BLOB, LONGTEXT, TINYBLOB...
    if target is None:
        raise client_error(ErrorCode.UNSUPPORTED_SQL, detail=f"cast to {to.sql('clickhouse')}")
    return target


def parse_time(text: pl.Expr) -> pl.Expr:
    """Text -> Datetime(ms): ISO 8601 with `T` or a space, optional fraction, `Z`, or a date."""
    norm = text.str.strip_chars().str.replace("T", " ", literal=True).str.strip_suffix("Z")
    return pl.coalesce([norm.str.strptime(pl.Datetime("ms"), f, strict=False) for f in _TIME_FORMATS])


def cast(t: Typed, target: str) -> Typed:
    """Convert to a canonical type the way Timeplus would, null where it cannot."""
    src, dst = kind(t.type), kind(target)
    dtype = dtypes.polars_dtype(target)
    e = t.expr
    if src == dst and src not in ("datetime", "datetime64"):
        out = e.cast(dtype, strict=False)
    elif dst in ("string", "json"):
        if src in ("datetime64", "datetime", "date"):
            out = e.dt.strftime(_FORMATS[src])
        elif src == "bool":
            out = pl.when(e).then(pl.lit("true")).when(e.not_()).then(pl.lit("false"))
        elif src == "float":
            out = _float_text(e)
        else:
            out = e.cast(pl.String, strict=False)
    elif src in ("string", "json"):
        if dst in ("datetime64", "datetime"):
            out = parse_time(e)
            if dst == "datetime":
                out = out.dt.truncate("1s")
        elif dst == "date":
            out = parse_time(e).dt.date()
        elif dst == "bool":
            s = e.str.strip_chars().str.to_lowercase()
            out = (pl.when(s.is_in(["true", "1"])).then(pl.lit(True))
                   .when(s.is_in(["false", "0"])).then(pl.lit(False)))
        else:
            out = e.str.strip_chars().cast(dtype, strict=False)
    elif dst in ("datetime64", "datetime"):
        if src in ("int", "uint", "float"):   # numbers are Unix seconds, as toDateTime(n)
            # null outside the type's range (proton's, as ingest checks it): far out, Polars'
            # text of it panicked, and nearer it wrapped to years like -29161
            ms = e.cast(pl.Float64) * 1000
            lo, hi = _EPOCH_MS_RANGE[dst]
            out = pl.when(ms.is_between(lo, hi)).then(pl.from_epoch(ms.cast(pl.Int64, strict=False), "ms"))
        elif src in ("datetime64", "datetime", "date", NULL):
            out = e.cast(pl.Datetime("ms"))
        else:
            raise _mismatch(f"cannot cast {t.type} to {target}")
        if dst == "datetime":
            out = out.dt.truncate("1s")
    elif dst == "date" and src in ("datetime64", "datetime", NULL):
        out = e.cast(pl.Date)
    elif dst == "bool" and src in ("int", "uint", "float"):
        out = e != 0
    elif src in ("datetime64", "datetime") and dst in ("int", "uint", "float"):
        out = (e.dt.epoch("ms") // 1000).cast(dtype, strict=False)   # Unix seconds
    elif src in ("int", "uint", "float", "bool", NULL) and dst in ("int", "uint", "float"):
        out = e.cast(dtype, strict=False)
    else:
        raise _mismatch(f"cannot cast {t.type} to {target}")
    return Typed(out.cast(dtype, strict=False), target)


def _converted(t: Typed, target: str) -> Typed:
    """A cast or to_* as written in a query: NULL where its operand is, so nullable when that is
    (ClickHouse's toString of a Nullable is Nullable; its CAST of a NULL to a non-Nullable type
    fails, where this engine's casts answer NULL)."""
    out = cast(t, target)
    return Typed(out.expr, _of(out.type, t))


_EXPONENT_FORM = r"^(-?)(\d)(?:\.(\d+))?e([+-]\d+)$"


def _float_text(e: pl.Expr) -> pl.Expr:
    """Floats as ClickHouse's toString writes them: the shortest digits that read back (as Polars'
    text), in decimal for exponents -6 to 20 and with one outside (`1e21`, `1.5e-7`), a whole
    number without `.0` (`1`, `-0`), `inf`, `nan`. Polars writes `1.0`, turns to exponents at
    1e16 and below 1e-5, and writes `1e+16`: `to_string(f) = '1'` never held."""
    text = e.cast(pl.String)
    parts = text.str.extract_groups(_EXPONENT_FORM)
    sign, lead = parts.struct.field("1"), parts.struct.field("2")
    fraction = parts.struct.field("3").fill_null("")
    exponent = parts.struct.field("4").cast(pl.Int32)
    digits = lead + fraction
    return (pl.when(text == "NaN").then(pl.lit("nan"))
            .when(lead.is_null()).then(text.str.replace(r"\.0$", ""))
            # at most 17 significant digits, so an exponent of 16 or more has no fraction left
            .when(exponent.is_between(16, 20)).then(sign + digits.str.pad_end(exponent + 1, "0"))
            .when(exponent == -6).then(sign + pl.lit("0.00000") + digits)
            .otherwise(sign + lead + pl.when(fraction == "").then(pl.lit("")).otherwise("." + fraction)
                       + "e" + exponent.cast(pl.String)))


# The Unix milliseconds each time type holds: datetime64 1900-01-01 .. 2299-12-31 23:59:59.999,
# datetime 1970-01-01 .. 2106-02-07 06:28:15 (rows/encode.py's ranges)
_EPOCH_MS_RANGE = {"datetime64": (-2_208_988_800_000, 10_413_791_999_999), "datetime": (0, 4_294_967_295_000)}
_FORMATS = {"datetime64": "%Y-%m-%d %H:%M:%S%.3f", "datetime": "%Y-%m-%d %H:%M:%S",
            "date": "%Y-%m-%d"}


_MAX_ROUND_DIGITS = 30   # round(x, n) with |n| beyond: as with 30 (no float64 or int has more)


def _round(t: Typed, digits: int) -> pl.Expr:
    """ClickHouse's round: floats to even at a tie (2.5 -> 2), integers away from zero (15 -> 20
    at -1 digits); integers are unchanged by digits >= 0."""
    if kind(t.type) in ("float", NULL):
        if digits >= 0:
            # a float with no fraction left at that scale is itself: Polars' round there is not
            # exact (round(1.5, 30) was 1.5000000000000002, round(2.5, 24) 2.4999999999999996)
            return pl.when(t.expr.abs() * 10.0**digits >= 2.0**52).then(t.expr).otherwise(t.expr.round(digits))
        return (t.expr / 10**-digits).round(0) * 10**-digits
    if digits >= 0:
        return t.expr
    scale, half = pl.lit(10**-digits, pl.Int128), pl.lit(10**-digits // 2, pl.Int128)
    wide = t.expr.cast(pl.Int128)
    rounded = (wide.abs() + half) // scale * scale * wide.sign()
    return rounded.cast(dtypes.polars_dtype(t.type), strict=False)


def output_expr(t: Typed) -> pl.Expr:
    """What a result column is sent as: time values as Timeplus's text form, the rest as is."""
    fmt = _FORMATS.get(kind(t.type))
    return t.expr.dt.strftime(fmt) if fmt else t.expr


def _mismatch(detail: str) -> Exception:
    return client_error(ErrorCode.TYPE_MISMATCH, detail=detail)


def _like_regex(pattern: str, case_insensitive: bool) -> str:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return ("(?is)" if case_insensitive else "(?s)") + "^" + "".join(out) + "$"


def _numeric_result(a: str, b: str) -> str:
    ka, kb = kind(a), kind(b)
    if "float" in (ka, kb):
        return "float64"
    if ka == kb == "uint":
        return "uint64"
    return "int64"


def _number(value: int | float) -> Typed:
    """A numeric literal: int64 when it fits, else uint64 (2^63 .. 2^64-1, so a uint64 column
    compares with it exactly), else float64."""
    if isinstance(value, int):
        if -2**63 <= value < 2**63:
            return Typed(pl.lit(value, pl.Int64), "int64", value)
        if 0 <= value < 2**64:
            return Typed(pl.lit(value, pl.UInt64), "uint64", value)
        value = float(value)
    return Typed(pl.lit(value, pl.Float64), "float64", value)


def _adopted(t: Typed, other: Typed) -> str:
    """t's type in arithmetic with `other`: a non-negative integer literal beside an unsigned
    operand counts as unsigned (ClickHouse types `1` as UInt8), so `u + 1` of a uint64 stays uint64."""
    if t.is_literal and type(t.value) is int and t.value >= 0 and kind(other.type) == "uint":
        return "uint64"
    return t.type


def _common_type(name: str, typed: list[Typed], nullable_if_all: bool = False) -> str:
    """The one type of values that may come from any of `types` (if, multi_if, CASE, coalesce), as
    ClickHouse's supertype: NULL fits any; numbers of different kinds widen as arithmetic does,
    except UInt64 beside a signed integer (no type holds both: ClickHouse's NO_COMMON_TYPE); string
    and json are string; any other mix is a type mismatch. The header said the first branch's type
    while the others' values came out unconverted (floats or strings under nullable(int64)). A
    literal `0` beside a uint64 is unsigned, as ClickHouse types it (see _adopted). A 64-bit
    integer beside a float has no common type either: no float holds every such value
    (ClickHouse's NO_COMMON_TYPE); a literal is as wide as its value needs, as ClickHouse types it,
    so `if(c, f, 0)` is a float64. The type is nullable, as ClickHouse's, when any of the values is
    nullable or NULL (if, multi_if, CASE: an absent ELSE is NULL), or, `nullable_if_all` (coalesce),
    when every one is."""
    name = name if name.isupper() else f"{name}()"   # CASE, if()
    unsigned = any(dtypes.base(t.type) == "uint64" for t in typed)
    types = ["uint64" if unsigned and t.is_literal and type(t.value) is int and t.value >= 0 else t.type
             for t in typed]
    # a literal by its value; a column by its declared type; other integer expressions (u + 1 of a
    # uint8, length(s)) this engine types 64-bit where ClickHouse widens one step: not refused
    wide = [t.type for t in typed if kind(t.type) in ("int", "uint") and (
        not (-2**31 <= t.value < 2**32) if t.is_literal and type(t.value) is int
        else dtypes.base(t.type) in ("int64", "uint64") and t.expr.meta.is_column())]
    floats = [t for t in types if kind(t) == "float"]
    if wide and floats:
        raise _mismatch(f"{name} has no type for both {wide[0]} and {floats[0]} (no float holds every 64-bit integer)")
    common = NULL
    for t in types:
        if kind(t) == NULL or t == common:
            continue
        if kind(common) == NULL:
            common = t
        elif is_numeric(t) and is_numeric(common):
            if {dtypes.base(t), dtypes.base(common)} & {"uint64"} and "int" in (kind(t), kind(common)):
                raise _mismatch(f"{name} has no type for both {common} and {t} (uint64 beside a signed integer)")
            same = kind(t) == kind(common) and dtypes.base(t) == dtypes.base(common)
            common = t if same else _numeric_result(common, t)
        elif {kind(t), kind(common)} <= {"string", "json"}:
            common = "string"
        elif kind(t) == kind(common):
            continue   # the same kind (datetime64 and its precisions): the first's (nullable or not: below)
        else:
            raise _mismatch(f"{name} has no type for both {common} and {t}")
    if kind(common) == NULL:
        return common
    nulls = [dtypes.is_nullable(t.type) for t in typed]
    return dtypes.nullable(dtypes.non_nullable(common), all(nulls) if nullable_if_all else any(nulls))


def _to(t: Typed, type_text: str) -> pl.Expr:
    """t's values as `type_text` (a common type of t's): unchanged when it already is."""
    if dtypes.non_nullable(t.type) == dtypes.non_nullable(type_text) or kind(type_text) == NULL:
        return t.expr
    if kind(t.type) == NULL:
        return t.expr.cast(dtypes.polars_dtype(type_text))
    if kind(t.type) == kind(type_text) and kind(t.type) not in ("int", "uint", "float"):
        return t.expr
    return cast(t, type_text).expr


def _bits(t: Typed) -> pl.Expr:
    """An integer as its 64 bits of two's complement (UInt64), for wrapping arithmetic."""
    if kind(t.type) == "uint":
        return t.expr.cast(pl.UInt64)
    return t.expr.cast(pl.Int64).reinterpret(signed=False)


_FLIPPED: dict[type, type] = {exp.EQ: exp.EQ, exp.NEQ: exp.NEQ, exp.GT: exp.LT, exp.GTE: exp.LTE,
                             exp.LT: exp.GT, exp.LTE: exp.GTE}
_FLOAT_CLAMP = 2.0**100   # beyond every 64-bit integer, and exact in a float64 and in an Int128


def _parsed_times(texts: list[str], beside: str) -> pl.Series:
    """Time literals compared with a `beside` value, parsed once: one that does not parse is a
    TYPE_MISMATCH, as ClickHouse's `Cannot parse datetime` (it was NULL, so `ts > '2024-01-01 10:00'`
    or a typo silently matched no row, and `ts = 'x'`, typed bool, answered NULL)."""
    parsed = pl.select(parse_time(pl.lit(pl.Series(texts, dtype=pl.String)))).to_series()
    for text, value in zip(texts, parsed, strict=True):
        if value is None:
            raise _mismatch(f"cannot read {text[:100]!r} as a time to compare with {beside} "
                            "(write 'YYYY-MM-DD[ hh:mm:ss[.fff]]')")
    return parsed


def _time_operand(t: Typed, beside: str) -> pl.Expr:
    """A time or a string literal (parsed here, see _parsed_times) as Datetime(ms)."""
    if kind(t.type) in ("datetime64", "datetime", "date"):
        return t.expr.cast(pl.Datetime("ms"))
    return pl.lit(_parsed_times([str(t.value)], beside)[0], pl.Datetime("ms"))


def _int_float_comparison(op: type, i: pl.Expr, f: pl.Expr) -> pl.Expr:
    """`i op f` of an integer and a float, exactly, as ClickHouse's accurate comparison: Polars
    compares them as float64, where a 64-bit integer rounds (2^64 - 1 equalled 2^64, and
    `i64 >= 9223372036854775807.0` held for 2^63 - 1). For an integer, i < f is i < ceil(f), and
    i <= f is i <= floor(f); the float is clamped to +-2^100 first (inf too). NaN is the caller's."""
    g = f.cast(pl.Float64).clip(-_FLOAT_CLAMP, _FLOAT_CLAMP)
    lo = g.floor().cast(pl.Int128, strict=False)
    hi = g.ceil().cast(pl.Int128, strict=False)
    x = i.cast(pl.Int128)
    if op in (exp.EQ, exp.NEQ):
        eq = (lo == hi) & (x == lo)
        return eq if op is exp.EQ else eq.not_()
    bounds: dict[type, pl.Expr] = {exp.LT: x < hi, exp.LTE: x <= lo, exp.GT: x > lo, exp.GTE: x >= hi}
    return bounds[op]


def _no_zero_divisor(divisor: Typed, op: str) -> None:
    """An integer `%` or `div` by a constant 0 is ClickHouse's ILLEGAL_DIVISION, raised before any
    row (every row would fail it); it answered NULL for every row of a type that is not nullable.
    A divisor that is 0 on some rows only still gives NULL there (see the README)."""
    if divisor.is_literal and isinstance(divisor.value, (int, float)) and divisor.value == 0:
        raise client_error(ErrorCode.ILLEGAL_DIVISION, detail=f"{op} by the constant 0")


def _mixed_signs(a: str, b: str) -> bool:
    """A signed and an unsigned integer: no 64-bit type holds both (int64 beside a uint64)."""
    return {kind(a), kind(b)} == {"int", "uint"}


def _truncated_mod(x: pl.Expr, y: pl.Expr) -> pl.Expr:
    """x % y with the sign of x, as C and ClickHouse's modulo (-7 % 2 is -1, -7.5 % 2 is -1.5);
    Polars' % takes the sign of y."""
    r = x % y
    return pl.when((r != 0) & ((x < 0) != (y < 0))).then(r - y).otherwise(r)


def _in_integers(t: Typed, values: list) -> pl.Expr:
    """`t IN (values)` of an integer or bool operand, as ClickHouse converts the list to the
    operand's type: a constant the type does not hold exactly matches nothing (1.5; 2^63 as a float
    beside an int64; 2 or -1 beside a bool, a UInt8 that is 0 or 1). The list was compared as
    float64, where 9223372036854775807 equals 2^63, and cast to Boolean, where 2 is true."""
    k = kind(t.type)
    bits = 8 if k == "bool" else int(dtypes.base(t.type).removeprefix("u").removeprefix("int"))
    lo, hi = (0, 2**bits - 1) if k in ("uint", "bool") else (-2**(bits - 1), 2**(bits - 1) - 1)
    exact = sorted({int(v) for v in values if isinstance(v, int) or (math.isfinite(v) and v == int(v))})
    exact = [v for v in exact if lo <= v <= hi]
    if not exact:
        return pl.when(t.expr.is_null()).then(None).otherwise(False)
    operand, dtype = (t.expr.cast(pl.UInt8), pl.UInt8()) if k == "bool" else (t.expr, dtypes.polars_dtype(t.type))
    return operand.is_in(pl.Series(exact, dtype=dtype).implode())


# INTERVAL n UNIT -> (multiplier, Polars offset unit); the shorthand `5s` arrives as __interval(ms)
_OFFSET_UNITS = {"millisecond": (1, "ms"), "second": (1, "s"), "minute": (1, "m"), "hour": (1, "h"),
                 "day": (1, "d"), "week": (1, "w"), "month": (1, "mo"), "quarter": (3, "mo"), "year": (1, "y")}
_SHORTHAND_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
# An interval's span is at most 1,000 years: a time shifted out of the range Polars formats
# (10**12 days was taken) panicked in the query's output, and the query failed at its first row.
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
            "mo": 2_629_746_000, "y": 31_556_952_000}   # a month and a year: the Gregorian averages
_MAX_SPAN_MS = 1000 * _UNIT_MS["y"]


def shown(node: exp.Expression, limit: int = 100) -> str:
    """An expression's SQL as the query wrote it, near enough for an error: `__interval(3600000)`
    (the rewritten shorthand) as `3600s`-style text in its largest whole unit."""
    return _SHOWN_INTERVAL.sub(_shorthand, node.sql("clickhouse"))[:limit]


def _shorthand(m: re.Match[str]) -> str:
    count, unit = _largest_unit(int(m.group(1)))
    return f"{count}{unit}"


def _largest_unit(ms: int) -> tuple[int, str]:
    """Milliseconds as a count of the largest unit they are a whole number of: 7d, 90s."""
    unit, size = next((u, size) for u, size in _SHORTHAND_UNITS if ms % size == 0)
    return ms // size, unit


_SHOWN_INTERVAL = re.compile(re.escape(INTERVAL_FN) + r"\((\d{1,30})\)")


def _is_interval(node: object) -> bool:
    return isinstance(node, exp.Interval) or (isinstance(node, exp.Anonymous) and node.name == INTERVAL_FN)


def _interval_offset(node: exp.Expression) -> tuple[int, str]:
    """(count, Polars offset unit) of a constant interval: `1h` (as __interval(3600000)) or
    `INTERVAL 2 DAY`; anything else is an error naming it."""
    text = shown(node)
    if isinstance(node, exp.Anonymous):   # the shorthand, in ms: `7d` comes back a count of days
        arg = node.expressions[0] if len(node.expressions) == 1 else None
        value = arg.this if isinstance(arg, exp.Literal) and not arg.is_string else None
        multiplier, unit = 1, "ms"
    else:
        name = node.text("unit").lower()
        name = name[:-1] if name.endswith("s") else name
        if name not in _OFFSET_UNITS:
            raise client_error(ErrorCode.UNSUPPORTED_SQL, detail=f"interval unit {name[:30] or '(none)'} in {text}")
        multiplier, unit = _OFFSET_UNITS[name]
        value = node.this.this if isinstance(node.this, exp.Literal) else None
    if not (isinstance(value, str) and value.strip().isdigit()):
        raise _mismatch(f"{text}: an interval is a constant whole number of its unit")
    digits = value.strip().lstrip("0") or "0"
    if len(digits) > 30 or int(digits) * multiplier * _UNIT_MS[unit] > _MAX_SPAN_MS:   # no int() of 5,000 digits
        raise _mismatch(f"{text}: an interval spans at most 1,000 years")
    n = int(digits) * multiplier
    if unit == "ms":   # in the largest unit it is a whole number of: `7d` moves a date, a calendar day of a time
        n, unit = _largest_unit(n)
    return n, unit


@dataclass
class ExprCompiler:
    """Compiles expressions over a frame whose columns (and canonical types) are `columns`."""
    columns: dict[str, str]
    stream: str = ""
    used: set[str] = field(default_factory=set)   # input columns the expressions read
    uses_now: bool = False

    def compile(self, node: exp.Expression) -> Typed:
        if not isinstance(node, exp.Expression):
            # sqlglot fills an argument it did not find with a Python value: `b ? 1` (no `: c`) is
            # If(false=False), and compiling the bool was an AttributeError, a 500
            raise client_error(ErrorCode.SQL_SYNTAX, detail="incomplete expression")
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is not None:
            result: Typed = handler(node)
            return result
        if isinstance(node, tuple(_COMPARISONS)):
            return self._comparison(node)  # type: ignore[arg-type]
        if isinstance(node, (exp.Add, exp.Sub)) and (_is_interval(node.this) or _is_interval(node.expression)):
            return self._shifted(node)
        if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Mod)):
            return self._arithmetic(node)
        if _is_interval(node):   # `__interval` was an unknown function; INTERVAL 1 HOUR "not supported"
            raise client_error(ErrorCode.UNSUPPORTED_SQL,
                               detail="an interval (1h, INTERVAL 1 HOUR) is a window's size, or added to or "
                                      "subtracted from a time")
        if is_aggregate(node):
            raise client_error(ErrorCode.UNSUPPORTED_SQL,
                               detail=f"aggregate {node.sql('clickhouse')} is not allowed here")
        if isinstance(node, exp.Func):
            return self._function(node)
        raise client_error(ErrorCode.UNSUPPORTED_SQL,
                           detail=f"{node.key} ({node.sql('clickhouse')}) is not supported")

    def compile_bool(self, node: exp.Expression, text: str | None = None) -> Typed:
        """`node` as a condition: a number is true when not 0; `text` names it in an error
        (default: its SQL)."""
        t = self.compile(node)
        k = kind(t.type)
        if k in ("bool", NULL):
            return _as(t, pl.Boolean())
        if is_numeric(t.type):
            return Typed(t.expr != 0, _of("bool", t))
        raise _mismatch(f"{text or shown(node, 300)} is {t.type}, a condition must be bool")

    # leaves
    def _Column(self, node: exp.Column) -> Typed:
        name = node.name
        if name not in self.columns:
            known = ", ".join(c for c in self.columns if not c.startswith("__"))
            raise client_error(ErrorCode.UNKNOWN_COLUMN, column=name,
                               detail=f"{self.stream or 'the query'} has columns: {known}")
        self.used.add(name)
        return Typed(pl.col(name), self.columns[name])

    def _Literal(self, node: exp.Literal) -> Typed:
        if node.is_string:
            return Typed(pl.lit(node.this, pl.String), "string", node.this)
        text = node.this
        try:
            return _number(int(text))
        except ValueError:
            pass
        try:
            return _number(float(text))
        except ValueError:   # sqlglot reads `1e` and `1.5e` as numbers (a 500 here); ClickHouse refuses them
            raise client_error(ErrorCode.SQL_SYNTAX, detail=f"bad number {text[:100]}") from None

    def _Boolean(self, node: exp.Boolean) -> Typed:
        return Typed(pl.lit(bool(node.this), pl.Boolean), "bool", bool(node.this))

    def _Null(self, node: exp.Null) -> Typed:
        return Typed(pl.lit(None), NULL, None)

    def _Paren(self, node: exp.Paren) -> Typed:
        return self.compile(node.this)

    # operators
    def _Neg(self, node: exp.Neg) -> Typed:
        t = self.compile(node.this)
        if not is_numeric(t.type):
            raise _mismatch(f"cannot negate {t.type}")
        if t.is_literal and isinstance(t.value, (int, float)) and not isinstance(t.value, bool):
            return _number(-t.value)   # -9223372036854775808 is an int64, not the negation of a uint64
        if kind(t.type) == NULL:
            return _as(t, pl.Float64())
        if kind(t.type) == "uint":   # ClickHouse's Int64, wrapping: -(2^64 - 1) is 1
            return Typed((pl.lit(0, pl.UInt64) - t.expr.cast(pl.UInt64)).reinterpret(signed=True), _of("int64", t))
        return Typed(-t.expr, t.type)

    def _arithmetic(self, node: exp.Binary) -> Typed:
        a, b = self.compile(node.this), self.compile(node.expression)
        op = node.key
        if not (is_numeric(a.type) and is_numeric(b.type)):
            raise _mismatch(f"{op} of {a.type} and {b.type}")
        ta, tb = _adopted(a, b), _adopted(b, a)
        result = _numeric_result(ta, tb)
        if op == "mod" and kind(result) != "float":
            _no_zero_divisor(b, "%")
        if op == "sub" and result == "uint64":   # ClickHouse: UInt - UInt is signed (`length(s) - 3` is -1)
            result = "int64"
        if op != "mod" and result == "int64" and "uint" in (kind(ta), kind(tb)) and NULL not in (kind(ta), kind(tb)):
            # signed and unsigned: in 64-bit two's complement, wrapping as ClickHouse's Int64 does
            # (through a cast to int64, an unsigned operand past 2^63 - 1 was null)
            x, y = _bits(a), _bits(b)
            out = {"add": x + y, "sub": x - y, "mul": x * y}[op]
            return Typed(out.reinterpret(signed=True), _of(result, a, b))
        if op == "mod" and _mixed_signs(ta, tb):
            # in 128 bits: a uint64 past 2^63 - 1 cast to int64 was null, so `-50 % u` of
            # u = 2^64 - 1 was null, not -50; the remainder always fits the int64 result
            x, y = a.expr.cast(pl.Int128), b.expr.cast(pl.Int128)
            return Typed(_truncated_mod(x, y).cast(pl.Int64, strict=False), _of(result, a, b))
        dtype = dtypes.polars_dtype(result)
        # not strict: a value the result type cannot hold (uint64 2^64-1 in int32 + uint64 -> int64)
        # is null, as in every other cast here; strict, it failed the whole query at run time
        x, y = a.expr.cast(dtype, strict=False), b.expr.cast(dtype, strict=False)
        out = {"add": x + y, "sub": x - y, "mul": x * y, "mod": _truncated_mod(x, y)}[op]
        return Typed(out, _of(result, a, b))

    def _shifted(self, node: exp.Add | exp.Sub) -> Typed:
        """A time plus or minus an interval (`now() - 1h`, `_tp_time + INTERVAL 90 SECOND`,
        `1d + d`): the time's type (a datetime moved by a part of a second: datetime64(3)),
        calendar units (month, quarter, year) by the calendar."""
        time_node, interval = (node.expression, node.this) if _is_interval(node.this) else (node.this, node.expression)
        if _is_interval(time_node) or (isinstance(node, exp.Sub) and time_node is node.expression):
            raise _mismatch(f"{shown(node)}: an interval is added to or subtracted from a time")
        t = self.compile(time_node)
        k = kind(t.type)
        if k not in ("datetime64", "datetime", "date"):
            raise _mismatch(f"{shown(node)}: an interval is added to a time, not to {t.type}")
        n, unit = _interval_offset(interval)
        if k == "date" and unit not in ("d", "w", "mo", "y"):
            raise _mismatch(f"{shown(node)}: a date moves by whole days (use to_datetime)")
        offset = f"{-n if isinstance(node, exp.Sub) else n}{unit}"
        if k == "datetime" and unit == "ms":   # not whole seconds: a datetime64(3), as ClickHouse's
            return Typed(t.expr.dt.offset_by(offset), _of(DATETIME64, t))   # DateTime + milliseconds
        return Typed(t.expr.dt.offset_by(offset), t.type)

    def _Div(self, node: exp.Div) -> Typed:
        a, b = self.compile(node.this), self.compile(node.expression)
        if not (is_numeric(a.type) and is_numeric(b.type)):
            raise _mismatch(f"division of {a.type} and {b.type}")
        return Typed(a.expr.cast(pl.Float64) / b.expr.cast(pl.Float64), _of("float64", a, b))

    def _IntDiv(self, node: exp.IntDiv) -> Typed:
        a, b = self.compile(node.this), self.compile(node.expression)
        if not (is_numeric(a.type) and is_numeric(b.type)):
            raise _mismatch(f"integer division of {a.type} and {b.type}")
        _no_zero_divisor(b, "div")
        result = _numeric_result(_adopted(a, b), _adopted(b, a))
        if kind(result) == "float":   # the quotient towards zero, as an integer
            q = a.expr.cast(pl.Float64) / b.expr.cast(pl.Float64)
            return Typed(pl.when(q < 0).then(q.ceil()).otherwise(q.floor()).cast(pl.Int64, strict=False),
                         _of("int64", a, b))
        wide = _mixed_signs(_adopted(a, b), _adopted(b, a))
        # signed and unsigned in 128 bits (a uint64 past 2^63 - 1 cast to int64 was null, so
        # `u div 2` beside an int of u = 2^64 - 1 was null), the quotient wrapped to int64 as
        # ClickHouse's Int64 does (`u div -1`)
        dtype = pl.Int128() if wide else dtypes.polars_dtype(result)
        x, y = a.expr.cast(dtype, strict=False), b.expr.cast(dtype, strict=False)
        # exact in integers (through float64 2^53 + 1 lost its 1), rounded towards zero as C and
        # ClickHouse's intDiv do; Polars' // rounds down
        q = x // y
        q = pl.when((x % y != 0) & ((x < 0) != (y < 0))).then(q + 1).otherwise(q)
        if wide:
            q = (q % pl.lit(2**64, pl.Int128)).cast(pl.UInt64).reinterpret(signed=True)
        return Typed(q, _of(result, a, b))

    def _comparable(self, a: Typed, b: Typed) -> tuple[pl.Expr, pl.Expr]:
        ka, kb = kind(a.type), kind(b.type)
        if NULL in (ka, kb) or (is_numeric(a.type) and is_numeric(b.type)) or ka == kb:
            return a.expr, b.expr
        if ka in ("string", "json") and kb in ("string", "json"):
            return a.expr, b.expr
        if {ka, kb} <= {"bool", "int", "uint", "float"}:   # ClickHouse's Bool is a UInt8: true = 1
            return tuple(t.expr.cast(pl.UInt8) if kind(t.type) == "bool" else t.expr  # type: ignore[return-value]
                         for t in (a, b))
        times = ("datetime64", "datetime", "date")
        if ka in times and (kb in times or (b.is_literal and kb == "string")):
            return a.expr.cast(pl.Datetime("ms")), _time_operand(b, a.type)
        if kb in times and (ka in times or (a.is_literal and ka == "string")):
            return _time_operand(a, b.type), b.expr.cast(pl.Datetime("ms"))
        raise _mismatch(f"cannot compare {a.type} with {b.type}")

    def _comparison(self, node: exp.Binary) -> Typed:
        a, b = self.compile(node.this), self.compile(node.expression)
        x, y = self._comparable(a, b)
        op = type(node)
        ka, kb = kind(a.type), kind(b.type)
        typ = _of("bool", a, b)   # ClickHouse's Nullable(UInt8) beside a nullable operand
        if "float" not in (ka, kb):
            return Typed(_COMPARISONS[op](x, y), typ)
        if ka in ("int", "uint"):
            out = _int_float_comparison(op, x, y)
        elif kb in ("int", "uint"):
            out = _int_float_comparison(_FLIPPED[op], y, x)
        else:
            out = _COMPARISONS[op](x, y)
        # IEEE, as ClickHouse: NaN (0/0) equals nothing, not itself, and is neither above nor below
        # anything; Polars orders it above every number and equal to itself (`x / y > 100` held for
        # 0 / 0, `0/0 = 0/0` was true)
        nan = pl.lit(False)
        for t, e in ((a, x), (b, y)):
            if kind(t.type) == "float":
                nan = nan | e.is_nan()
        nulls = x.is_null() | y.is_null()
        return Typed(pl.when(nulls).then(None).when(nan).then(pl.lit(op is exp.NEQ)).otherwise(out), typ)

    # three-valued (`NULL AND false` is false, `NULL OR false` NULL): nullable beside a nullable
    # operand, as newer ClickHouse's (18.16 typed `n OR 0` UInt8)
    def _And(self, node: exp.And) -> Typed:
        a, b = self.compile_bool(node.this), self.compile_bool(node.expression)
        return Typed(a.expr & b.expr, _of("bool", a, b))

    def _Or(self, node: exp.Or) -> Typed:
        a, b = self.compile_bool(node.this), self.compile_bool(node.expression)
        return Typed(a.expr | b.expr, _of("bool", a, b))

    def _Not(self, node: exp.Not) -> Typed:
        t = self.compile_bool(node.this)
        return Typed(t.expr.not_(), _of("bool", t))

    def _Is(self, node: exp.Is) -> Typed:
        if not isinstance(node.expression, exp.Null):
            raise client_error(ErrorCode.UNSUPPORTED_SQL, detail="IS is supported with NULL only")
        return Typed(self.compile(node.this).expr.is_null(), "bool")

    def _like(self, node: exp.Expression, case_insensitive: bool) -> Typed:
        t = self.compile(node.this)
        pattern = self.compile(node.expression)
        if kind(t.type) not in ("string", "json", NULL):
            raise _mismatch(f"LIKE needs a string, got {t.type}")
        if not (pattern.is_literal and isinstance(pattern.value, str)):
            raise client_error(ErrorCode.UNSUPPORTED_SQL, detail="LIKE needs a constant pattern")
        regex = _like_regex(pattern.value, case_insensitive)
        try:   # compiled here once: a pattern past the regex engine's size limit ('_' x 60,000) failed
            pl.select(pl.lit("").str.contains(regex))   # every batch at run time, an internal error
        except pl.exceptions.PolarsError:
            raise client_error(ErrorCode.UNSUPPORTED_SQL,
                               detail=f"the LIKE pattern is too complex ({len(pattern.value)} characters)") from None
        out = _as(t, pl.String()).expr.str.contains(regex)
        return Typed(out.not_() if node.args.get("negate") else out, _of("bool", t))

    def _Like(self, node: exp.Like) -> Typed:
        return self._like(node, False)

    def _ILike(self, node: exp.ILike) -> Typed:
        return self._like(node, True)

    def _In(self, node: exp.In) -> Typed:
        if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
            raise client_error(ErrorCode.UNSUPPORTED_SQL, detail="IN takes a list of constants")
        t = self.compile(node.this)
        items = [self.compile(e) for e in node.expressions]
        if not all(i.is_literal for i in items):
            raise client_error(ErrorCode.UNSUPPORTED_SQL, detail="IN takes a list of constants")
        values = [i.value for i in items if i.value is not None]
        k = kind(t.type)
        if k in ("string", "json"):
            ok = all(isinstance(v, str) for v in values)
        elif is_numeric(t.type) or k == "bool":
            ok = all(isinstance(v, (int, float)) for v in values)
        else:
            ok = all(isinstance(v, str) for v in values)
        if not ok:
            raise _mismatch(f"IN list does not match {t.type}")
        if not values:   # NULLs only: they match nothing (Polars has no is_in of an untyped empty list)
            found = pl.when(t.expr.is_null()).then(None).otherwise(False)
        elif kind(t.type) in ("datetime64", "datetime", "date"):
            lit = _parsed_times([str(v) for v in values], t.type)
            found = t.expr.cast(pl.Datetime("ms")).is_in(lit.implode())
        elif k in ("int", "uint", "bool"):
            found = _in_integers(t, values)
        else:
            found = t.expr.is_in(pl.Series(values, dtype=dtypes.polars_dtype(t.type), strict=False).implode())
        # `1 in (1, 2)`, `abs(-1) in (1)`: Polars does not broadcast is_in of a constant (one row
        # beside the batch's rows is a ShapeError when the query runs); a scalar broadcasts
        # NULL where the operand is (three-valued, see the README; ClickHouse answers 0, a UInt8)
        return Typed(found if found.meta.root_names() else found.first(), _of("bool", t))

    def _Cast(self, node: exp.Cast) -> Typed:
        extra = [k for k, v in node.args.items() if k not in ("this", "to") and isinstance(v, exp.Expression)]
        if extra:   # CAST(x AS T FORMAT f) / DEFAULT d: not ClickHouse's; they were dropped, so the
            # DEFAULT's value never came (NULL instead) and the FORMAT was not applied
            raise client_error(ErrorCode.UNSUPPORTED_SQL, detail=f"CAST ... {extra[0].upper()}")
        return _converted(self.compile(node.this), cast_target(node.args["to"]))

    def _TryCast(self, node: exp.TryCast) -> Typed:
        return self._Cast(node)

    # functions
    def _args(self, node: exp.Expression) -> list[exp.Expression]:
        if isinstance(node, exp.Anonymous):
            return list(node.expressions)
        args = [node.this] if node.this is not None else []
        for key in _READ_ARGS[2:]:
            if node.args.get(key) is not None:
                args.append(node.args[key])
        return args + list(node.expressions)

    def _function(self, node: exp.Expression) -> Typed:
        name = function_name(node)
        if name == JSON_FN:
            return self._json(node)  # type: ignore[arg-type]
        args = self._args(node)
        # arguments sqlglot keeps under names of their own, which _args does not read: an
        # argument too many (`round(f, 1, 2)` is Round(truncate=2)) must not vanish
        unread = not isinstance(node, (exp.If, exp.Case)) and any(
            isinstance(v, exp.Expression) for k, v in node.args.items() if k not in _READ_ARGS)

        def arity(*allowed: int) -> None:
            if unread or len(args) not in allowed:
                raise client_error(ErrorCode.SQL_SYNTAX,
                                   detail=f"{name}() takes {' or '.join(map(str, allowed))} arguments")

        if name in _CONVERSIONS:
            arity(1)
            return _converted(self.compile(args[0]), _CONVERSIONS[name])
        if name in ("lower", "upper"):   # as ClickHouse's: ASCII letters only (`lower('Ä')` is 'Ä')
            arity(1)
            t = self._string_arg(name, args[0])
            if name == "lower":
                return Typed(t.expr.str.replace_many(_ASCII_UPPER, _ASCII_LOWER), _of("string", t))
            return Typed(t.expr.str.replace_many(_ASCII_LOWER, _ASCII_UPPER), _of("string", t))
        if name in ("lower_utf8", "upper_utf8", "lowerutf8", "upperutf8"):   # every letter Unicode maps
            arity(1)
            t = self._string_arg(name, args[0])
            return Typed(t.expr.str.to_lowercase() if name.startswith("lower") else t.expr.str.to_uppercase(),
                         _of("string", t))
        if name == "length":
            arity(1)
            t = self._string_arg(name, args[0])
            return Typed(t.expr.str.len_bytes().cast(pl.UInt64), _of("uint64", t))
        if name == "abs":
            arity(1)
            t = self._numeric_arg(name, args[0])
            if kind(t.type) != "int":
                return Typed(t.expr.abs(), t.type)
            # as ClickHouse: the unsigned type of the same width, so abs(-128) of an int8 is 128
            # (in int8 it stays -128); int64's -2^63 is 2^63 in its bits read unsigned
            unsigned = "u" + dtypes.base(t.type)
            if unsigned == "uint64":
                return Typed(t.expr.abs().reinterpret(signed=False), _of(unsigned, t))
            return Typed(t.expr.cast(pl.Int64).abs().cast(dtypes.polars_dtype(unsigned)), _of(unsigned, t))
        if name == "round":
            arity(1, 2)
            t = self._numeric_arg(name, args[0])
            digits = 0
            if len(args) == 2:
                d = self.compile(args[1])
                if not (d.is_literal and isinstance(d.value, int)):
                    raise _mismatch("round() takes a constant integer number of digits")
                digits = max(-_MAX_ROUND_DIGITS, min(d.value, _MAX_ROUND_DIGITS))
            return Typed(_round(t, digits), t.type)
        if name in ("now", "currenttimestamp", "current_timestamp"):
            arity(0)
            self.uses_now = True
            return Typed(pl.col(NOW_COLUMN).dt.truncate("1s"), "datetime")
        if name in ("concat",):
            ts = [self.compile(a) for a in args]
            # NULL where any part is (ClickHouse's concat of a Nullable is Nullable)
            return Typed(pl.concat_str([cast(t, "string").expr for t in ts]), _of("string", *ts))
        if name == "coalesce":
            ts = [self.compile(a) for a in args]
            typ = _common_type(name, ts, nullable_if_all=True)   # NULL only where every argument is
            return Typed(pl.coalesce([_to(t, typ) for t in ts]), typ)
        if name in ("if", "iff"):
            if isinstance(node, exp.If):
                if isinstance(node.args.get("false"), bool):
                    raise client_error(ErrorCode.SQL_SYNTAX, detail="the ternary a ? b : c needs its ': c'")
                args = [node.this, node.args["true"]] + (
                    [node.args["false"]] if node.args.get("false") is not None else [])
            arity(3)
            return self._branches(name, [(args[0], args[1])], args[2])
        if name in ("multi_if", "multiif"):
            if len(args) < 3 or len(args) % 2 == 0:
                raise client_error(ErrorCode.SQL_SYNTAX,
                                   detail=f"{name}() takes an odd number of arguments, at least 3: "
                                          "cond1, then1, [cond2, then2, ...] else")
            return self._branches(name, list(zip(args[:-1:2], args[1::2], strict=True)), args[-1])
        if isinstance(node, exp.Case):
            # CASE [x] WHEN a THEN b ... [ELSE c] END: without ELSE, NULL where no branch holds
            operand = node.this
            whens = [(w.this if operand is None else exp.EQ(this=operand.copy(), expression=w.this),
                      w.args["true"]) for w in node.args["ifs"]]
            return self._branches("CASE", whens, node.args.get("default") or exp.Null())
        raise client_error(ErrorCode.UNKNOWN_FUNCTION, function=name)

    def _branches(self, name: str, whens: list[tuple[exp.Expression, exp.Expression]],
                  otherwise: exp.Expression) -> Typed:
        """if, multi_if and CASE: the first branch whose condition holds. The branches share one
        type (numbers of different kinds widen as arithmetic does; NULL fits any)."""
        conds = [self.compile_bool(c) for c, _ in whens]
        values = [self.compile(v) for _, v in whens] + [self.compile(otherwise)]
        typ = _common_type(name, values)
        out: pl.Expr = _to(values[-1], typ)
        for c, v in zip(reversed(conds), reversed(values[:-1]), strict=True):   # the first holds first
            out = pl.when(c.expr).then(_to(v, typ)).otherwise(out)
        return Typed(out, typ)

    def _string_arg(self, name: str, node: exp.Expression) -> Typed:
        t = self.compile(node)
        if kind(t.type) not in ("string", "json", NULL):
            raise _mismatch(f"{name}() takes a string, got {t.type}")
        return _as(t, pl.String())

    def _numeric_arg(self, name: str, node: exp.Expression) -> Typed:
        t = self.compile(node)
        if not is_numeric(t.type):
            raise _mismatch(f"{name}() takes a number, got {t.type}")
        return _as(t, pl.Float64())

    def _json(self, node: exp.Anonymous) -> Typed:
        column, path = node.expressions
        t = self.compile(column)
        if kind(t.type) not in ("string", "json"):
            raise _mismatch(f"{column.name}:{path.this} needs a string or json column, "
                            f"{column.name} is {t.type}")
        return Typed(t.expr.str.json_path_match(f"$.{path.this}").fill_null(""), "string")
