"""Column type parsing (broker/rows/types.py): every canonical type, alias and refusal."""
from __future__ import annotations

import pytest

from broker.errors import ClientError, ErrorCode
from broker.rows.types import ColumnType, parse_type


@pytest.mark.parametrize(("text", "expected"), [
    ("string", ColumnType("string", "string")),
    ("int8", ColumnType("int8", "int", 8)),
    ("int16", ColumnType("int16", "int", 16)),
    ("int32", ColumnType("int32", "int", 32)),
    ("int64", ColumnType("int64", "int", 64)),
    ("uint8", ColumnType("uint8", "uint", 8)),
    ("uint16", ColumnType("uint16", "uint", 16)),
    ("uint32", ColumnType("uint32", "uint", 32)),
    ("uint64", ColumnType("uint64", "uint", 64)),
    ("float32", ColumnType("float32", "float", 32)),
    ("float64", ColumnType("float64", "float", 64)),
    ("bool", ColumnType("bool", "bool")),
    ("datetime64(3)", ColumnType("datetime64(3)", "datetime64")),
    ("datetime64(3, 'UTC')", ColumnType("datetime64(3, 'UTC')", "datetime64", tz="UTC")),
    ("datetime", ColumnType("datetime", "datetime")),
    ("date", ColumnType("date", "date")),
    ("json", ColumnType("json", "json")),
    ("nullable(string)", ColumnType("nullable(string)", "string", nullable=True)),
    ("nullable(int64)", ColumnType("nullable(int64)", "int", 64, nullable=True)),
    ("nullable(datetime64(3, 'UTC'))", ColumnType("nullable(datetime64(3, 'UTC'))", "datetime64", nullable=True,
                                                  tz="UTC")),
])
def test_canonical_texts_parse_to_themselves(text: str, expected: ColumnType) -> None:
    assert parse_type(text) == expected
    assert parse_type(expected.text) == expected


@pytest.mark.parametrize(("alias", "canonical"), [
    ("integer", "int32"), ("int", "int32"), ("INT", "int32"), ("Integer", "int32"),
    ("float", "float32"), ("double", "float64"), ("Double", "float64"),
    ("boolean", "bool"), ("Bool", "bool"), ("BOOLEAN", "bool"),
    ("Int32", "int32"), ("UInt64", "uint64"), ("Float64", "float64"), ("String", "string"),
    ("Nullable(String)", "nullable(string)"), ("nullable( integer )", "nullable(int32)"),
    ("DateTime64(3)", "datetime64(3)"), ("datetime64", "datetime64(3)"), ("DateTime64", "datetime64(3)"),
    ("DateTime64(3,'UTC')", "datetime64(3, 'UTC')"), ('datetime64(3, "utc")', "datetime64(3, 'UTC')"),
    ("DateTime64(3, 'Asia/Shanghai')", "datetime64(3, 'Asia/Shanghai')"),
    ("DateTime", "datetime"), ("datetime('UTC')", "datetime('UTC')"), ("Date", "date"), ("JSON", "json"),
    ("  string  ", "string"),
])
def test_aliases_and_case(alias: str, canonical: str) -> None:
    assert parse_type(alias).text == canonical


@pytest.mark.parametrize("text", [
    "", "   ", "varchar", "int128", "float16", "decimal(10, 2)", "array(string)", "nullable(nullable(string))",
    "nullable()", "datetime64(6)", "datetime64(0)", "datetime64(3, 'Mars/Olympus')", "datetime64(3, UTC)",
    "datetime('')", "nullable(string", "string)", "map(string, string)",
])
def test_unknown_types_are_invalid_requests(text: str) -> None:
    with pytest.raises(ClientError) as info:
        parse_type(text)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "Unsupported column type" in info.value.message


@pytest.mark.parametrize("value", [None, 3, ["string"]])
def test_non_strings_are_invalid_requests(value: object) -> None:
    with pytest.raises(ClientError) as info:
        parse_type(value)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.INVALID_REQUEST
