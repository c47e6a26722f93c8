"""Schemas from the Timeplus create body (broker/rows/schema.py)."""
from __future__ import annotations

from typing import Any

import pytest

from broker.errors import ClientError, ErrorCode
from broker.model import ColumnDef, StreamSchema
from broker.rows.schema import RAW_COLUMNS, build_schema, columns_of

# What the SDK sends (spec section 3, captured): keys with no value are JSON null.
SDK_BODY: dict[str, Any] = {
    "columns": [{"name": "time", "type": "datetime64(3)"}, {"name": "data", "type": "string"}],
    "name": "test", "event_time_column": None, "event_time_timezone": None,
    "logstore_retention_bytes": None, "logstore_retention_ms": None, "ttl_expression": None,
    "description": None, "mode": "append", "primary_key": None,
}
TP = ColumnDef("_tp_time", "datetime64(3, 'UTC')", "now64(3, 'UTC')")


def body(**changes: Any) -> dict[str, Any]:
    return {**SDK_BODY, **changes}


def refused(b: Any) -> str:
    with pytest.raises(ClientError) as info:
        build_schema(b)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    return info.value.message


def test_the_sdk_body() -> None:
    schema = build_schema(SDK_BODY)
    assert schema == StreamSchema(columns=(ColumnDef("time", "datetime64(3)"), ColumnDef("data", "string")))
    assert schema.logstore_retention_bytes == -1 and schema.description == "" and schema.mode == "append"


def test_fields_are_kept_and_types_canonical() -> None:
    schema = build_schema(body(
        columns=[{"name": "n", "type": "Integer", "default": "42", "codec": None},
                 {"name": "t", "type": "DateTime64(3)"},
                 {"name": "s", "type": "string", "nullable": True}],
        description="d", mode="changelog_kv", event_time_column="t", ttl_expression="to_datetime(t) + INTERVAL 1 DAY",
        logstore_retention_bytes=1024, logstore_retention_ms=60_000))
    assert schema.columns == (ColumnDef("n", "int32", "42"), ColumnDef("t", "datetime64(3)"),
                              ColumnDef("s", "nullable(string)"))
    assert (schema.description, schema.mode, schema.event_time_column) == ("d", "changelog_kv", "t")
    assert (schema.logstore_retention_bytes, schema.logstore_retention_ms) == (1024, 60_000)
    assert schema.ttl_expression.startswith("to_datetime")


def test_mode_missing_is_append() -> None:
    b = body()
    del b["mode"]
    assert build_schema(b).mode == "append"


@pytest.mark.parametrize("mode", ["append", "changelog", "changelog_kv", "versioned_kv"])
def test_every_mode(mode: str) -> None:
    assert build_schema(body(mode=mode)).mode == mode


def test_columns_of_adds_the_implicit_tp_time() -> None:
    schema = build_schema(SDK_BODY)
    assert columns_of(schema) == (*schema.columns, TP)


def test_a_declared_tp_time_is_not_duplicated() -> None:
    schema = build_schema(body(columns=[{"name": "a", "type": "string"},
                                        {"name": "_tp_time", "type": "datetime64(3, 'UTC')"}]))
    assert [c.name for c in columns_of(schema)] == ["a", "_tp_time"]


def test_a_schemaless_stream_is_raw_and_tp_time() -> None:
    assert columns_of(None) == RAW_COLUMNS == (ColumnDef("raw", "string"), TP)


@pytest.mark.parametrize(("b", "says"), [
    ([], "JSON object"),
    (body(columns=[]), "at least one column"),
    (body(columns=None), "at least one column"),
    ({"name": "x"}, "at least one column"),
    (body(columns=[{"name": "a", "type": "string"}] * 2), "declared twice"),
    (body(columns=[{"name": "", "type": "string"}]), "non-empty name"),
    (body(columns=[{"name": None, "type": "string"}]), "non-empty name"),
    (body(columns=[{"name": "a\nb", "type": "string"}]), "printable"),
    (body(columns=[{"name": "a" * 256, "type": "string"}]), "at most 255"),
    (body(columns=["a"]), "must be an object"),
    (body(columns=[{"name": "a"}]), "Unsupported column type"),
    (body(columns=[{"name": "a", "type": "varchar"}]), "Unsupported column type"),
    (body(columns=[{"name": "_tp_time", "type": "string"}]), "must be datetime64"),
    (body(columns=[{"name": "_tp_time", "type": "nullable(datetime64(3))"}]), "must be datetime64"),
    (body(columns=[{"name": "_tp_sn", "type": "int64"}]), "reserved"),
    (body(columns=[{"name": "a", "type": "string", "default": 3}]), "default"),
    (body(columns=[{"name": f"c{i}", "type": "string"} for i in range(1001)]), "at most 1000"),
    (body(mode="upsert"), "mode [upsert]"),
    (body(mode=3), "mode must be a string"),
    (body(description=7), "description must be a string"),
    (body(logstore_retention_ms="7d"), "logstore_retention_ms must be an integer"),
    (body(logstore_retention_bytes=True), "logstore_retention_bytes must be an integer"),
    (body(event_time_column="nope"), "event_time_column [nope]"),
    (body(event_time_column="data"), "must be a datetime64 or datetime column"),
    (body(event_time_column="to_datetime(data)"), "expressions are not supported"),
])
def test_refusals(b: Any, says: str) -> None:
    assert says in refused(b)
