"""Canonical column types (the texts `ColumnDef.type` stores) as the query engine sees them.

broker/rows/types.py owns parsing user input; the engine only needs the kind of a canonical text
and its Polars dtype, so it keeps this small mapping of its own rather than importing the rows
package. Datetimes are naive UTC `Datetime("ms")` inside the engine.
"""
from __future__ import annotations

import re

import polars as pl

DATETIME64 = "datetime64(3, 'UTC')"   # the implicit `_tp_time` and window_start/window_end
NULL = "null"                         # the type of the NULL literal: unifies with anything

_INTS = {f"int{b}": getattr(pl, f"Int{b}") for b in (8, 16, 32, 64)}
_UINTS = {f"uint{b}": getattr(pl, f"UInt{b}") for b in (8, 16, 32, 64)}
_SIMPLE: dict[str, pl.DataType] = {
    **_INTS, **_UINTS, "float32": pl.Float32(), "float64": pl.Float64(), "string": pl.String(),
    "json": pl.String(), "bool": pl.Boolean(), "date": pl.Date(), "datetime": pl.Datetime("ms"),
    NULL: pl.Null(),
}
_NULLABLE = re.compile(r"^nullable\((.*)\)$")
_NULLABLE_ANY_CASE = re.compile(r"^nullable\((.*)\)$", re.IGNORECASE)


def base(type_text: str) -> str:
    """The type without `nullable(...)`, datetime64's precision/zone folded to `datetime64`, and
    datetime's zone to `datetime` (`datetime('UTC')` was an unknown type, read as text)."""
    text = type_text.strip().lower()
    m = _NULLABLE.match(text)
    if m:
        text = m.group(1).strip()
    if text.startswith("datetime64"):
        return "datetime64"
    return "datetime" if text.startswith("datetime(") else text


def kind(type_text: str) -> str:
    """One of string, int, uint, float, bool, datetime64, datetime, date, json, null."""
    b = base(type_text)
    if b in _INTS:
        return "int"
    if b in _UINTS:
        return "uint"
    if b in ("float32", "float64"):
        return "float"
    return b


def is_nullable(type_text: str) -> bool:
    """`nullable(T)`, or the NULL literal's type."""
    text = type_text.strip().lower()
    return text == NULL or _NULLABLE.match(text) is not None


def non_nullable(type_text: str) -> str:
    """The type without `nullable(...)`, otherwise as written (datetime64's precision and zone kept)."""
    m = _NULLABLE_ANY_CASE.match(type_text.strip())
    return m.group(1).strip() if m else type_text


def nullable(type_text: str, wrap: bool = True) -> str:
    """`nullable(T)` of T, canonical: a nullable type or the NULL literal's is as it is; with
    `wrap` false, T as it is (for the types of expressions that are nullable when an operand is)."""
    if not wrap or is_nullable(type_text):
        return type_text
    return f"nullable({type_text})"


def is_numeric(type_text: str) -> bool:
    return kind(type_text) in ("int", "uint", "float", NULL)


def is_time(type_text: str) -> bool:
    return kind(type_text) in ("datetime64", "datetime", "date")


def polars_dtype(type_text: str) -> pl.DataType:
    """The dtype a column of this type has inside the engine (unknown types read as text)."""
    b = base(type_text)
    if b == "datetime64":
        return pl.Datetime("ms")
    dtype = _SIMPLE.get(b, pl.String())
    return dtype() if isinstance(dtype, type) else dtype


def wire_dtype(type_text: str) -> pl.DataType:
    """The dtype a stored record's JSON value is read as: time values are stored as text, and
    8/16-bit integers as 64-bit (Polars' ndjson reader panics on them), cast down afterwards."""
    if is_time(type_text):
        return pl.String()
    dtype = polars_dtype(type_text)
    if dtype in (pl.Int8(), pl.Int16()):
        return pl.Int64()
    if dtype in (pl.UInt8(), pl.UInt16()):
        return pl.UInt64()
    return dtype
