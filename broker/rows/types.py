"""Column types of typed (Timeplus) streams: parsing what users type into one canonical text.

Canonical texts (what `ColumnDef.type` stores and every other module compares against):
`string`, `int8 int16 int32 int64`, `uint8 uint16 uint32 uint64`, `float32 float64`, `bool`,
`datetime64(3)` / `datetime64(3, 'Zone')`, `datetime` / `datetime('Zone')`, `date`, `json`,
`nullable(T)`.

Input is case-insensitive (`Int32`, `Nullable(String)`, `DateTime64(3, 'UTC')`) except the zone
name, which is an IANA name and kept as written. Aliases as users type them: integer/int -> int32,
float -> float32, double -> float64, boolean -> bool, and ClickHouse's spellings that Timeplus also
takes (Int8..UInt64, Float32/Float64, Bool, String, Date, DateTime, DateTime64).

Decisions:
- `datetime64` takes precision 3 only (a bare `datetime64` is `datetime64(3)`): records carry
  millisecond text, so accepting (6) or (9) would silently drop digits the user asked to keep.
- A zone must be a known IANA name (zoneinfo). It is kept and reported; values are stored and
  read as UTC whatever the zone (see encode.py for why naive input is UTC too).
- `nullable(nullable(T))` is refused, as Timeplus does.
"""
from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass

from broker.errors import ErrorCode, client_error

KINDS = ("string", "int", "uint", "float", "bool", "datetime64", "datetime", "date", "json")

# lower-cased name -> (kind, bits)
_SIMPLE: dict[str, tuple[str, int]] = {
    "string": ("string", 0),
    **{f"int{b}": ("int", b) for b in (8, 16, 32, 64)},
    **{f"uint{b}": ("uint", b) for b in (8, 16, 32, 64)},
    "integer": ("int", 32), "int": ("int", 32),
    "float32": ("float", 32), "float64": ("float", 64), "float": ("float", 32), "double": ("float", 64),
    "bool": ("bool", 0), "boolean": ("bool", 0),
    "date": ("date", 0),
    "json": ("json", 0),
}
_WRAPPED = re.compile(r"(\w+)\s*\((.*)\)", re.DOTALL)
_ZONE = re.compile(r"""\s*(?:'([^']*)'|"([^"]*)")\s*""")
UTC = "UTC"


@dataclass(frozen=True, slots=True)
class ColumnType:
    text: str           # canonical, e.g. "nullable(int32)", "datetime64(3, 'UTC')"
    kind: str           # one of KINDS
    bits: int = 0       # 8..64 for int/uint, 32/64 for float, else 0
    nullable: bool = False
    tz: str = ""        # datetime64/datetime zone as declared, "" when none (then UTC)


def parse_type(text: str) -> ColumnType:
    """A type as a user wrote it -> its ColumnType; ClientError(INVALID_REQUEST) if unknown."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(text, "a column type must be a non-empty string")
    return _parse(text.strip(), text, nested=False)


def _parse(text: str, original: str, nested: bool) -> ColumnType:
    lowered = text.lower()
    simple = _SIMPLE.get(lowered)
    if simple is not None:
        kind, bits = simple
        return ColumnType(f"{kind}{bits}" if bits else kind, kind, bits)
    if lowered in ("datetime64", "datetime"):
        return ColumnType(lowered if lowered == "datetime" else "datetime64(3)", lowered)
    m = _WRAPPED.fullmatch(text)
    if m is None:
        raise _bad(original, "unknown type")
    name, args = m.group(1).lower(), m.group(2)
    if name == "nullable":
        if nested:
            raise _bad(original, "nullable cannot be nested")
        inner = _parse(args.strip(), original, nested=True)
        return ColumnType(f"nullable({inner.text})", inner.kind, inner.bits, True, inner.tz)
    if name == "datetime64":
        precision, _, zone = args.partition(",")
        if precision.strip() != "3":
            raise _bad(original, "datetime64 takes precision 3 only (records keep milliseconds)")
        tz = _zone(zone, original) if zone.strip() else ""
        return ColumnType(f"datetime64(3, '{tz}')" if tz else "datetime64(3)", "datetime64", tz=tz)
    if name == "datetime":
        tz = _zone(args, original)
        return ColumnType(f"datetime('{tz}')", "datetime", tz=tz)
    raise _bad(original, "unknown type")


def _zone(arg: str, original: str) -> str:
    m = _ZONE.fullmatch(arg)
    name = (m.group(1) if m.group(1) is not None else m.group(2)) if m else ""
    if not name:
        raise _bad(original, "the time zone must be a quoted name, e.g. 'UTC'")
    if name.upper() == UTC:
        return UTC
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _bad(original, f"unknown time zone '{name}'") from None
    return name


def _bad(text: object, why: str) -> Exception:
    return client_error(ErrorCode.INVALID_REQUEST, detail=f"Unsupported column type [{text}]: {why}. Known: "
                        "string, int8..int64, uint8..uint64, float32, float64, bool, datetime64(3), "
                        "datetime, date, json, nullable(T)")
