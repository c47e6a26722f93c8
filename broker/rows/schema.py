"""A typed stream's schema from the Timeplus create body, and the columns every typed door sees.

`build_schema` takes the body the SDK sends (keys with no value arrive as JSON null) and checks
what a create must get right; the door validates the stream name itself. Decisions:
- Column names: non-empty strings of at most 255 characters, unique. Names starting with `_tp_`
  are Timeplus's own; only `_tp_time` may be declared, and only as datetime64(3[, zone]) (then it
  replaces the implicit one instead of appearing twice).
- A column's `nullable: true` (the Stream JSON carries it) wraps its type in nullable(...).
- `default`, when given, is kept as text and reported (not evaluated: a missing value takes the
  type's default, see encode.py); `codec`, `ttl_expression` and `skipping_index_expression` of a
  column, `primary_key` and `event_time_timezone` are accepted and ignored.
- `event_time_column`, when given, must name a datetime64/datetime column: rows that do not give
  `_tp_time` then take it from that column (as Timeplus computes `_tp_time` from it). Timeplus also
  takes expressions there; we refuse them rather than silently stamp rows with the ingest time.
- Retention values: null -> -1 (the broker's retention applies); otherwise integers.
"""
from __future__ import annotations

from typing import Any

from broker.core.limits import check_text
from broker.errors import ErrorCode, client_error
from broker.model import ColumnDef, StreamSchema
from broker.rows.types import parse_type

MODES = ("append", "changelog", "changelog_kv", "versioned_kv")
TP_TIME = "_tp_time"
TP_TIME_TYPE = "datetime64(3, 'UTC')"
TP_TIME_DEFAULT = "now64(3, 'UTC')"   # how Timeplus reports the implicit column's default
RAW = "raw"
MAX_COLUMNS = 1000   # [ours] bounds the per-row work of every ingest
MAX_NAME_CHARS = 255

_TP_TIME_COLUMN = ColumnDef(TP_TIME, TP_TIME_TYPE, TP_TIME_DEFAULT)
# What the typed doors see in a stream without a schema (a plain log of bytes).
RAW_COLUMNS = (ColumnDef(RAW, "string"), _TP_TIME_COLUMN)


def build_schema(body: dict) -> StreamSchema:
    """The create body -> StreamSchema; ClientError(INVALID_REQUEST) naming what is wrong."""
    if not isinstance(body, dict):
        raise _invalid("the stream definition must be a JSON object")
    raw_columns = body.get("columns")
    if not isinstance(raw_columns, list) or not raw_columns:
        raise _invalid("a stream needs at least one column")
    if len(raw_columns) > MAX_COLUMNS:
        raise _invalid(f"a stream has at most {MAX_COLUMNS} columns, not {len(raw_columns)}")
    columns: list[ColumnDef] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_columns):
        column = _column(i, raw)
        if column.name in seen:
            raise _invalid(f"column [{column.name}] is declared twice")
        seen.add(column.name)
        columns.append(column)
    mode = _text(body, "mode") or "append"
    if mode not in MODES:
        raise _invalid(f"mode [{mode}] is not one of {', '.join(MODES)}")
    event_time = _text(body, "event_time_column")
    if event_time:
        target = next((c for c in columns if c.name == event_time), None)
        if target is None:
            raise _invalid(f"event_time_column [{event_time}] must name one of the stream's columns "
                           "(expressions are not supported)")
        if parse_type(target.type).kind not in ("datetime64", "datetime"):
            raise _invalid(f"event_time_column [{event_time}] must be a datetime64 or datetime column, "
                           f"not {target.type}")
    return StreamSchema(
        columns=tuple(columns),
        description=_text(body, "description"),
        mode=mode,
        event_time_column=event_time,
        ttl_expression=_text(body, "ttl_expression"),
        logstore_retention_bytes=_int(body, "logstore_retention_bytes"),
        logstore_retention_ms=_int(body, "logstore_retention_ms"),
    )


def columns_of(schema: StreamSchema | None) -> tuple[ColumnDef, ...]:
    """Every column a query or an ingest sees: the declared ones and `_tp_time` (last, as Timeplus
    lists it) unless declared; for a stream without a schema, `raw string, _tp_time`."""
    if schema is None:
        return RAW_COLUMNS
    if any(c.name == TP_TIME for c in schema.columns):
        return schema.columns
    return (*schema.columns, _TP_TIME_COLUMN)


def _column(i: int, raw: Any) -> ColumnDef:
    if not isinstance(raw, dict):
        raise _invalid(f"column {i} must be an object with name and type")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _invalid(f"column {i} needs a non-empty name")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise _invalid(f"column name [{name[:64]}] must be printable and at most {MAX_NAME_CHARS} characters")
    ctype = parse_type(raw.get("type"))  # type: ignore[arg-type]  # parse_type refuses non-strings
    if raw.get("nullable") is True and not ctype.nullable:
        ctype = parse_type(f"nullable({ctype.text})")
    if name.startswith("_tp_"):
        if name != TP_TIME:
            raise _invalid(f"column name [{name}] is reserved (names starting with _tp_ are Timeplus's own)")
        if ctype.kind != "datetime64" or ctype.nullable:
            raise _invalid(f"column [{TP_TIME}] must be datetime64(3[, zone]), not {ctype.text}")
    default = raw.get("default")
    if default is not None and not isinstance(default, str):
        raise _invalid(f"the default of column [{name}] must be a string")
    return ColumnDef(name, ctype.text, check_text(f"the default of column [{name[:64]}]", default or ""))


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid(f"{key} must be a string")
    return check_text(key, value)


def _int(body: dict, key: str) -> int:
    value = body.get(key)
    if value is None:
        return -1
    if type(value) is not int:
        raise _invalid(f"{key} must be an integer")
    return value


def _invalid(detail: str) -> Exception:
    return client_error(ErrorCode.INVALID_REQUEST, detail=detail)
