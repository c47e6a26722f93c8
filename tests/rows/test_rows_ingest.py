"""Ingest formats (broker/rows/ingest.py): choosing one, and decoding each, with the SDK's real bodies."""
from __future__ import annotations

import orjson
import pytest

from broker.errors import ClientError, ErrorCode
from broker.model import ColumnDef, StreamSchema
from broker.rows.encode import RowEncoder
from broker.rows.ingest import choose_format, decode

NOW = 1_714_564_800_123
TYPED = RowEncoder(StreamSchema((ColumnDef("time", "datetime64(3)"), ColumnDef("data", "string"))))
RAW_TYPED = RowEncoder(StreamSchema((ColumnDef("raw", "string"), ColumnDef("n", "int32"))))
SCHEMALESS = RowEncoder(None)


# -- choose_format ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("param", "content_type", "fmt"), [
    (None, None, "compact"),
    (None, "application/json", "compact"),
    (None, "application/json;format=compact", "compact"),
    (None, "application/json; format=compat", "compact"),
    (None, "application/vnd.timeplus+json", "compact"),
    (None, "application/vnd.timeplus+json;format=compact", "compact"),
    (None, "application/x-ndjson", "streaming"),
    (None, "application/json;format=streaming", "streaming"),
    (None, "application/json;format=stream", "streaming"),
    (None, "application/vnd.timeplus+json;format=streaming", "streaming"),
    (None, 'Application/JSON; charset=utf-8; format="streaming"', "streaming"),
    (None, "text/plain", "raw"),
    (None, "text/plain;format=raw", "raw"),
    (None, "text/plain; charset=utf-8", "raw"),
    (None, "text/plain;format=lines", "lines"),
    (None, "application/x-www-form-urlencoded", "compact"),   # curl -d without -H
    ("", "text/plain", "raw"),                                 # an empty ?format= is no format
    # ?format= wins: the SDK sends Content-Type application/json with ?format=raw|lines|streaming
    ("streaming", "application/json", "streaming"),
    ("stream", "application/json", "streaming"),
    ("raw", "application/json", "raw"),
    ("lines", "application/json", "lines"),
    ("compact", "text/plain;format=lines", "compact"),
    ("compat", None, "compact"),
    ("LINES", None, "lines"),
])
def test_choose_format(param: str | None, content_type: str | None, fmt: str) -> None:
    assert choose_format(param, content_type) == fmt


@pytest.mark.parametrize(("param", "content_type"), [
    ("csv", None), ("json", "application/json"), (None, "application/json;format=csv"), (None, "text/plain;format=x"),
])
def test_unknown_formats(param: str | None, content_type: str | None) -> None:
    with pytest.raises(ClientError) as info:
        choose_format(param, content_type)
    assert info.value.code is ErrorCode.INVALID_REQUEST and "unknown ingest format" in info.value.message


# -- the SDK's captured bodies (spec section 8) ------------------------------------------------------

def test_compact_as_the_sdk_sends_it() -> None:
    body = b'{"columns": ["time", "data"], "data": [["2024-05-01T12:00:00.123456", "abcd"]]}'
    assert [orjson.loads(r) for r in decode("compact", body, TYPED, NOW)] == [
        {"time": "2024-05-01 12:00:00.123", "data": "abcd", "_tp_time": "2024-05-01 12:00:00.123"}]


def test_streaming_as_the_sdk_sends_it() -> None:
    body = b'{"time":"2024-05-01 12:00:01.000","data":"s1"}\n{"time":"2024-05-01 12:00:02.000","data":"s2"}\n'
    rows = [orjson.loads(r) for r in decode("streaming", body, TYPED, NOW)]
    assert [(r["time"], r["data"]) for r in rows] == [("2024-05-01 12:00:01.000", "s1"),
                                                      ("2024-05-01 12:00:02.000", "s2")]


def test_raw_as_the_sdk_sends_it() -> None:
    assert decode("raw", b"\nfirst line\nsecond line\n", SCHEMALESS, NOW) == [b"\nfirst line\nsecond line\n"]
    rows = decode("raw", b"\nfirst line\nsecond line\n", RAW_TYPED, NOW)
    assert [orjson.loads(r) for r in rows] == [{"raw": "\nfirst line\nsecond line\n", "n": 0,
                                                "_tp_time": "2024-05-01 12:00:00.123"}]


def test_lines_as_the_sdk_sends_it() -> None:
    body = b'{"a":1,"b":"world"}\n{"a":2,"b":"hello"}'
    assert decode("lines", body, SCHEMALESS, NOW) == [b'{"a":1,"b":"world"}', b'{"a":2,"b":"hello"}']


# -- streaming layouts -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b'{"data":"a"}{"data":"b"}{"data":"c"}',                              # concatenated, no separator
    b'{"data":"a"} {"data":"b"}\t{"data":"c"}',
    b'{\n  "data": "a"\n}\n{\n  "data": "b"\n}\n{"data":"c"}',           # spread over lines
    b'\n\n{"data":"a"}\r\n{"data":"b"}\r\n\r\n{"data":"c"}\n  \n',         # CRLF, blank lines
    b'{"data":"a"}\n{"data":"b"}{"data":"c"}',
])
def test_streaming_layouts(body: bytes) -> None:
    assert [orjson.loads(r)["data"] for r in decode("streaming", body, TYPED, NOW)] == ["a", "b", "c"]


def test_streaming_missing_and_unknown_keys() -> None:
    rows = [orjson.loads(r) for r in decode("streaming", b'{"zzz": 1}\n{"data": "x", "extra": [1]}', TYPED, NOW)]
    assert rows[0] == {"time": "1970-01-01 00:00:00.000", "data": "", "_tp_time": "2024-05-01 12:00:00.123"}
    assert rows[1]["data"] == "x"


def test_big_integers_read_the_same_on_both_paths() -> None:
    enc = RowEncoder(StreamSchema((ColumnDef("i", "int64"), ColumnDef("j", "json"), ColumnDef("s", "string"))))
    for body in (b'{"i": 99999999999999999999}', b'{"i":\n 99999999999999999999}'):   # per line; incremental
        with pytest.raises(ClientError) as info:
            decode("streaming", body, enc, NOW)
        assert info.value.code is ErrorCode.BAD_ROW and info.value.fields["column"] == "i"
    one_line = decode("streaming", b'{"j": {"a": 99999999999999999999999}, "s": -9223372036854775809}', enc, NOW)
    spread = decode("streaming", b'{"j":\n {"a": 99999999999999999999999}, "s": -9223372036854775809}', enc, NOW)
    assert one_line == spread
    assert orjson.loads(one_line[0])["j"] == {"a": 1e23}


# -- lines -----------------------------------------------------------------------------------------

def test_lines_split_strip_one_cr_and_skip_empty() -> None:
    body = "a\r\n\r\nb\r\r\n\n c \nü".encode()
    assert decode("lines", body, SCHEMALESS, NOW) == [b"a", b"b\r", b" c ", "ü".encode()]


def test_no_rows_no_records() -> None:
    assert decode("lines", b"\n\r\n\n", SCHEMALESS, NOW) == []
    assert decode("compact", b'{"columns": ["data"], "data": []}', TYPED, NOW) == []


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["compact", "streaming", "raw", "lines"])
def test_empty_body(fmt: str) -> None:
    with pytest.raises(ClientError) as info:
        decode(fmt, b"", SCHEMALESS, NOW)
    assert info.value.code is ErrorCode.BAD_BODY and info.value.message == "Request error. empty body"


@pytest.mark.parametrize(("fmt", "body", "says"), [
    ("compact", b'{"columns": ["data"], "data": [["x"]', "malformed JSON at byte 36: unexpected end"),
    ("compact", b"not json", "malformed JSON at byte 0"),
    ("compact", '{"columns": ["data"], "data": [["é"]] x'.encode(), "malformed JSON at byte 39"),
    ("compact", b"  ", "malformed JSON"),
    ("compact", b'[["x"]]', "the compact format is one JSON object"),
    ("compact", b'{"data": [["x"]]}', "the compact format is one JSON object"),
    ("compact", b'{"columns": ["data"]}', "the compact format is one JSON object"),
    ("compact", b'{"columns": ["data"], "data": [["x"], "y"]}', "row 1 must be a list"),
    ("compact", b"\xff\xfe", "not valid UTF-8 at byte 0"),
    ("compact", b'{"columns": ["data"], "data": [["ok\xff"]]}', "not valid UTF-8 at byte 35"),   # not "at byte 0"
    ("streaming", b'{"data":"a"}\n{"data":', "malformed JSON in object 1 at byte 21"),
    ("streaming", '{"data":"é"}\n{"data" "b"}'.encode(), "malformed JSON in object 1 at byte 22"),
    ("streaming", b'{"data":"a"}\n[1, 2]\n', "object 1 at byte 13 is not a JSON object"),
    ("streaming", b'{"data":"a"} 3', "object 1 at byte 13 is not a JSON object"),
    ("streaming", b'"just a string"', "object 0 at byte 0 is not a JSON object"),
    ("streaming", b'{"data": NaN}', "object 0"),
    ("streaming", b'{"data":\n 1e999}', "too large for a double"),
    ("streaming", b'{"data":"a"}\n\xff', "not valid UTF-8 (byte 13)"),
    ("streaming", b" \n\t", "no JSON object"),
    ("streaming", b"[" * 100_000, "object 0 at byte 0 is nested too deeply"),
    ("streaming", b'{"data":"a"}\n{"raw":\n' + b"[" * 5000 + b"]" * 5000 + b"}", "object 1 at byte 13 is nested too"),
    ("compact", b'{"columns":' + b"[" * 5000, "depth limit exceeded"),
    ("raw", b"ok\xffnot", "not valid UTF-8 (byte 2)"),
    ("lines", b"a\nb\xc3", "not valid UTF-8 (byte 3)"),
])
def test_malformed_bodies(fmt: str, body: bytes, says: str) -> None:
    with pytest.raises(ClientError) as info:
        decode(fmt, body, TYPED if fmt in ("compact", "streaming") else SCHEMALESS, NOW)
    assert info.value.code is ErrorCode.BAD_BODY
    assert says in info.value.message


def test_a_bad_value_names_row_and_column() -> None:
    with pytest.raises(ClientError) as info:
        decode("streaming", b'{"data":"a"}\n{"data":"b","time":"noon"}', TYPED, NOW)
    assert info.value.code is ErrorCode.BAD_ROW
    assert info.value.message.startswith("Invalid row 1, column [time].")


@pytest.mark.parametrize("fmt", ["raw", "lines"])
def test_raw_formats_need_a_raw_column(fmt: str) -> None:
    with pytest.raises(ClientError) as info:
        decode(fmt, b"x", TYPED, NOW)
    assert info.value.code is ErrorCode.INVALID_REQUEST


def test_unknown_format_name() -> None:
    with pytest.raises(ClientError) as info:
        decode("csv", b"x", TYPED, NOW)
    assert info.value.code is ErrorCode.INVALID_REQUEST
