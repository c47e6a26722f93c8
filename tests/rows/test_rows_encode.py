"""RowEncoder (broker/rows/encode.py): coercion of every type, defaults, _tp_time, errors."""
from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.errors import ClientError, ErrorCode
from broker.model import ColumnDef, StreamSchema
from broker.rows.encode import RowEncoder, format_ms

NOW = 1_714_564_800_123          # 2024-05-01 12:00:00.123 UTC
NOW_TEXT = "2024-05-01 12:00:00.123"


def encoder(*columns: tuple[str, str], event_time: str = "") -> RowEncoder:
    return RowEncoder(StreamSchema(tuple(ColumnDef(n, t) for n, t in columns), event_time_column=event_time))


def one(ctype: str, value: Any) -> Any:
    """The stored value of `value` in a column of type `ctype`, through compact and objects alike."""
    enc = encoder(("c", ctype))
    via_compact = orjson.loads(enc.compact(["c"], [[value]], NOW)[0])
    via_objects = orjson.loads(enc.objects([{"c": value}], NOW)[0])
    assert via_compact == via_objects
    return via_compact["c"]


def refusal(ctype: str, value: Any) -> ClientError:
    enc = encoder(("c", ctype))
    with pytest.raises(ClientError) as info:
        enc.compact(["c"], [[value]], NOW)
    with pytest.raises(ClientError) as info2:
        enc.objects([{"c": value}], NOW)
    assert info.value.code is info2.value.code is ErrorCode.BAD_ROW
    assert info.value.fields == info2.value.fields
    assert info.value.fields["row"] == 0 and info.value.fields["column"] == "c"
    return info.value


# -- accepted values, per type ---------------------------------------------------------------------

@pytest.mark.parametrize(("ctype", "given", "stored"), [
    ("string", "abc", "abc"), ("string", "", ""), ("string", "ü€😀", "ü€😀"),
    ("string", 12, "12"), ("string", 1.5, "1.5"), ("string", True, "true"), ("string", False, "false"),
    ("string", {"a": [1, "x"]}, '{"a":[1,"x"]}'), ("string", [1, 2], "[1,2]"),
    ("int8", -128, -128), ("int8", 127, 127), ("int16", -32768, -32768), ("int32", 2**31 - 1, 2**31 - 1),
    ("int64", -(2**63), -(2**63)), ("int64", 2**63 - 1, 2**63 - 1),
    ("uint8", 255, 255), ("uint16", 65535, 65535), ("uint32", 2**32 - 1, 2**32 - 1), ("uint64", 2**64 - 1, 2**64 - 1),
    ("int32", 3.0, 3), ("int64", -(2.0**53), -(2**53)), ("int32", True, 1), ("uint8", False, 0),
    ("float32", 1.5, 1.5), ("float64", 7, 7.0), ("float64", -1e308, -1e308), ("float32", 3.4e38, 3.4e38),
    ("float64", True, 1.0),
    ("bool", True, True), ("bool", False, False), ("bool", 1, True), ("bool", 0, False),
    ("date", "2024-05-01", "2024-05-01"), ("date", "1970-01-01", "1970-01-01"), ("date", "2149-06-06", "2149-06-06"),
    ("json", {"a": {"b": [1, None]}}, {"a": {"b": [1, None]}}), ("json", [1, 2], [1, 2]), ("json", 5, 5),
    ("json", "plain text", "plain text"), ("json", '{"a": 1}', {"a": 1}), ("json", "[1,2]", [1, 2]),
    ("json", "{not json", "{not json"), ("json", True, True),
])
def test_accepted(ctype: str, given: Any, stored: Any) -> None:
    got = one(ctype, given)
    assert got == stored and type(got) is type(stored)


@pytest.mark.parametrize(("given", "stored"), [
    ("2024-05-01 12:00:00.123", "2024-05-01 12:00:00.123"),                # the Timeplus text form
    ("2024-05-01 12:00:00", "2024-05-01 12:00:00.000"),
    ("2024-05-01 12:00:00.1", "2024-05-01 12:00:00.100"),
    ("2024-05-01T12:00:00.123456", "2024-05-01 12:00:00.123"),             # Python isoformat(): truncated
    ("2024-05-01T12:00:00.999999999", "2024-05-01 12:00:00.999"),          # nanoseconds
    ("2024-05-01T12:00:00", "2024-05-01 12:00:00.000"),
    ("2024-05-01T12:00", "2024-05-01 12:00:00.000"),
    ("2024-05-01", "2024-05-01 00:00:00.000"),
    ("2024-05-01T12:00:00Z", "2024-05-01 12:00:00.000"),
    ("2024-05-01T12:00:00.5+00:00", "2024-05-01 12:00:00.500"),
    ("2024-05-01T12:00:00+05:30", "2024-05-01 06:30:00.000"),              # offsets -> UTC
    ("2024-05-01T01:00:00.250-0200", "2024-05-01 03:00:00.250"),
    ("2024-05-01 00:30:00+01", "2024-04-30 23:30:00.000"),
    (1714564800, "2024-05-01 12:00:00.000"),                               # epoch seconds
    (1714564800.123, "2024-05-01 12:00:00.123"),
    (1714564800123, "2024-05-01 12:00:00.123"),                            # epoch milliseconds
    (0, "1970-01-01 00:00:00.000"),
    (-86400, "1969-12-31 00:00:00.000"),
    ("1900-01-01 00:00:00.000", "1900-01-01 00:00:00.000"),
    ("2299-12-31 23:59:59.999", "2299-12-31 23:59:59.999"),
])
def test_datetime64(given: Any, stored: str) -> None:
    assert one("datetime64(3)", given) == stored
    assert one("datetime64(3, 'UTC')", given) == stored


@pytest.mark.parametrize(("given", "stored"), [
    ("2024-05-01 12:00:00.999", "2024-05-01 12:00:00"),
    ("2024-05-01T12:00:00+02:00", "2024-05-01 10:00:00"),
    (1714564800, "2024-05-01 12:00:00"), (1714564800999, "2024-05-01 12:00:00"),
    ("1970-01-01 00:00:00", "1970-01-01 00:00:00"), ("2106-02-07 06:28:15", "2106-02-07 06:28:15"),
])
def test_datetime_seconds(given: Any, stored: str) -> None:
    assert one("datetime", given) == stored


@pytest.mark.parametrize(("given", "stored"), [
    ("2024-05-01+05:00", "2024-04-30 19:00:00.000"),
    ("2024-05-01+0530", "2024-04-30 18:30:00.000"),
    ("2024-05-01+05", "2024-04-30 19:00:00.000"),
    ("2024-05-01-02:00", "2024-05-01 02:00:00.000"),
    ("2024-05-01Z", "2024-05-01 00:00:00.000"),
])
def test_a_date_with_an_offset_is_its_midnight_there(given: str, stored: str) -> None:
    """`YYYY-MM-DD` then an offset (the documented grammar allows it; XML Schema's xs:date form) is
    midnight at that offset. Python's fromisoformat reads any character after the date as the
    separator, so `2024-05-01+05:00` was stored as 05:00 UTC (the offset taken for the time of day),
    ten hours off, and `2024-05-01Z` was refused."""
    assert one("datetime64(3)", given) == stored
    assert one("datetime", given) == stored[:-4]


def test_naive_text_is_utc_whatever_the_column_zone() -> None:
    """Records hold UTC text: reading naive input in the zone would shift a re-ingested record."""
    assert one("datetime64(3, 'Asia/Shanghai')", "2024-05-01 20:00:00.000") == "2024-05-01 20:00:00.000"
    assert one("datetime64(3, 'Asia/Shanghai')", "2024-05-01T20:00:00+08:00") == "2024-05-01 12:00:00.000"
    assert one("datetime64(3, 'Asia/Shanghai')", 1714564800) == "2024-05-01 12:00:00.000"
    assert one("datetime('Europe/Berlin')", "2024-05-01 14:00:00") == "2024-05-01 14:00:00"


@pytest.mark.parametrize(("ctype", "default"), [
    ("string", ""), ("int8", 0), ("uint64", 0), ("float32", 0.0), ("bool", False),
    ("datetime64(3)", "1970-01-01 00:00:00.000"), ("datetime", "1970-01-01 00:00:00"), ("date", "1970-01-01"),
    ("json", {}),
])
def test_null_and_missing_take_the_type_default(ctype: str, default: Any) -> None:
    assert one(ctype, None) == default
    enc = encoder(("c", ctype), ("other", "string"))
    assert orjson.loads(enc.compact(["other"], [["x"]], NOW)[0])["c"] == default
    assert orjson.loads(enc.objects([{"other": "x"}], NOW)[0])["c"] == default


@pytest.mark.parametrize("ctype", ["nullable(string)", "nullable(int32)", "nullable(float64)", "nullable(bool)",
                                   "nullable(datetime64(3))", "nullable(date)", "nullable(json)"])
def test_nullable_stores_null(ctype: str) -> None:
    assert one(ctype, None) is None
    enc = encoder(("c", ctype), ("other", "string"))
    assert orjson.loads(enc.objects([{"other": "x"}], NOW)[0])["c"] is None


def test_nullable_mixes_values_and_nulls() -> None:
    enc = encoder(("i", "nullable(int64)"), ("t", "nullable(datetime64(3))"), ("s", "nullable(string)"))
    out = [orjson.loads(r) for r in enc.compact(["i", "t", "s"], [[1, None, "a"], [None, 0, None]], NOW)]
    assert [(r["i"], r["t"], r["s"]) for r in out] == [(1, None, "a"), (None, "1970-01-01 00:00:00.000", None)]


# -- refused values ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("ctype", "given", "says"), [
    ("int32", "12", "send a JSON number"), ("int8", 128, "range -128 .. 127"), ("int8", -129, "range"),
    ("uint8", -1, "range 0 .. 255"), ("uint64", 2**64, "range"), ("int64", 2**63, "range"),
    ("int32", 1.5, "whole numbers"), ("int64", 2.0**60, "whole numbers"), ("int32", [1], "is not a int32"),
    # JSON integers past 64 bits, which orjson reads as floats: a range error, not "a float"
    ("int64", -(2.0**63), "outside the int64 range"), ("uint64", 2.0**64, "outside the uint64 range"),
    ("uint64", 1e19, "whole numbers up to 2^53"), ("int64", 2.0**63, "outside the int64 range"),
    ("int32", {"a": 1}, "an object"),
    ("float64", "1.5", "send a JSON number"), ("float32", 3.5e38, "range"), ("float64", float("inf"), "range"),
    ("float64", float("nan"), "range"), ("float64", 10**400, "range"), ("float32", [1.0], "an array"),
    ("bool", "true", "true/false or 0/1"), ("bool", 2, "true/false or 0/1"), ("bool", 1.0, "a float"),
    ("bool", {}, "an object"),
    ("string", object(), "is not a string"),
    ("datetime64(3)", "yesterday", "is not a datetime"), ("datetime64(3)", "2024-13-01 00:00:00", "not a valid"),
    ("datetime64(3)", "2024-02-30T00:00:00", "not a valid"), ("datetime64(3)", "2024-05-01T25:00", "not a valid"),
    ("datetime64(3)", "20240501T120000", "is not a datetime"), ("datetime64(3)", "2024-05-01 12:00:00 UTC", "is not"),
    ("datetime64(3)", True, "a bool"), ("datetime64(3)", [], "an array"),
    ("datetime64(3)", "1899-12-31 23:59:59.999", "outside the datetime64 range"),
    ("datetime64(3)", "2300-01-01 00:00:00", "outside"), ("datetime64(3)", -(10**12) * 3, "outside"),
    ("datetime64(3)", 10**20, "outside"), ("datetime64(3)", float("inf"), "not a datetime"),
    ("datetime", "1969-12-31 23:59:59", "outside the datetime range"), ("datetime", 2**32, "outside"),
    ("datetime", -1, "outside"),
    ("date", "2024-05-01 12:00:00", "send YYYY-MM-DD"), ("date", "2024-02-30", "not a valid date"),
    ("date", "1969-12-31", "outside the date range"), ("date", "2149-06-07", "outside"), ("date", 19844, "an integer"),
    ("date", "20240501", "YYYY-MM-DD"),
    ("json", object(), "is not a json"),
])
def test_refused(ctype: str, given: Any, says: str) -> None:
    assert says in refusal(ctype, given).message


def test_the_first_bad_value_in_row_order_is_named() -> None:
    enc = encoder(("a", "int32"), ("b", "string"), ("c", "datetime64(3)"))
    rows = [[1, "x", "2024-05-01"], [2, "y", "bad"], [3, [], "2024-05-01"], ["4", None, "bad"]]
    with pytest.raises(ClientError) as info:
        enc.compact(["a", "b", "c"], rows, NOW)
    assert info.value.fields["row"] == 1 and info.value.fields["column"] == "c"
    assert info.value.message.startswith("Invalid row 1, column [c].")
    # the order of `columns` in the body does not change which value is first: schema order breaks ties
    rows2 = [[r[2], r[0], r[1]] for r in rows]
    rows2[1][1] = "x"
    with pytest.raises(ClientError) as info:
        enc.compact(["c", "a", "b"], rows2, NOW)
    assert (info.value.fields["row"], info.value.fields["column"]) == (1, "a")


def test_a_value_orjson_cannot_write_is_a_bad_row() -> None:
    enc = encoder(("s", "string"), ("j", "json"))
    with pytest.raises(ClientError) as info:
        enc.objects([{"s": "ok", "j": {"a": 1}}, {"s": "ok", "j": {"a": 2**70}}], NOW)
    assert info.value.code is ErrorCode.BAD_ROW and (info.value.fields["row"], info.value.fields["column"]) == (1, "j")
    deep: Any = []
    for _ in range(300):        # orjson reads 1024 levels but writes 254
        deep = [deep]
    for column in ("j", "s"):
        with pytest.raises(ClientError) as info:
            enc.objects([{column: deep}], NOW)
        assert info.value.code is ErrorCode.BAD_ROW and info.value.fields["column"] == column
    with pytest.raises(ClientError) as info:
        enc.objects([{"s": "a\ud800b"}], NOW)    # a lone surrogate (the json module lets them through)
    assert (info.value.fields["row"], info.value.fields["column"]) == (0, "s")


# -- _tp_time --------------------------------------------------------------------------------------

def test_tp_time_defaults_to_the_ingest_time_and_can_be_given() -> None:
    enc = encoder(("a", "string"))
    rows = [orjson.loads(r) for r in enc.objects([{"a": "x"}, {"a": "y", "_tp_time": "2020-01-01T00:00:00Z"},
                                                  {"a": "z", "_tp_time": None}], NOW)]
    assert [r["_tp_time"] for r in rows] == [NOW_TEXT, "2020-01-01 00:00:00.000", NOW_TEXT]
    assert list(rows[0]) == ["a", "_tp_time"]
    out = enc.compact(["_tp_time", "a"], [[1714564800000, "x"]], NOW)
    assert orjson.loads(out[0]) == {"a": "x", "_tp_time": "2024-05-01 12:00:00.000"}
    with pytest.raises(ClientError) as info:
        enc.compact(["a", "_tp_time"], [["x", "soon"]], NOW)
    assert info.value.fields["column"] == "_tp_time"


def test_tp_time_from_the_event_time_column() -> None:
    enc = encoder(("t", "nullable(datetime64(3))"), ("a", "string"), event_time="t")
    rows = [orjson.loads(r) for r in enc.objects(
        [{"t": "2024-01-01T00:00:00.5Z"}, {"t": None}, {"t": "2024-01-01", "_tp_time": "2025-01-01"}], NOW)]
    assert [r["_tp_time"] for r in rows] == ["2024-01-01 00:00:00.500", NOW_TEXT, "2025-01-01 00:00:00.000"]
    enc = encoder(("t", "datetime"), event_time="t")
    assert orjson.loads(enc.compact(["t"], [["2024-01-01 10:00:00.999"]], NOW)[0])["_tp_time"] == \
        "2024-01-01 10:00:00.000"
    # a column that is not nullable stores its default (the epoch) for null or missing; the row's
    # time is still the ingest time, not 1970 (the Timeplus probe: windows took such rows as late)
    enc = encoder(("t", "datetime64(3)"), ("a", "string"), event_time="t")
    rows = [orjson.loads(r) for r in enc.objects([{"t": None, "a": "x"}, {"a": "y"}, {"t": "2024-01-01"}], NOW)]
    assert [(r["t"], r["_tp_time"]) for r in rows] == [
        ("1970-01-01 00:00:00.000", NOW_TEXT), ("1970-01-01 00:00:00.000", NOW_TEXT),
        ("2024-01-01 00:00:00.000", "2024-01-01 00:00:00.000")]
    rows = [orjson.loads(r) for r in enc.compact(["a"], [["only a"]], NOW)]   # the column not sent at all
    assert rows[0]["_tp_time"] == NOW_TEXT


def test_a_declared_tp_time_keeps_its_place() -> None:
    enc = encoder(("_tp_time", "datetime64(3, 'UTC')"), ("a", "int8"))
    assert enc.objects([{"a": 1}], NOW) == [b'{"_tp_time":"2024-05-01 12:00:00.123","a":1}']


def test_format_ms() -> None:
    assert format_ms(NOW) == NOW_TEXT
    assert format_ms(0) == "1970-01-01 00:00:00.000"


# -- request shapes --------------------------------------------------------------------------------

def test_every_column_is_written_in_schema_order() -> None:
    enc = encoder(("s", "string"), ("i", "int64"), ("f", "float64"), ("b", "bool"), ("t", "datetime64(3)"))
    out = enc.compact(["t", "b", "f", "i", "s"], [["2024-05-01T12:00:00.123456", True, 1, 2, "x"]], NOW)
    assert out == [b'{"s":"x","i":2,"f":1.0,"b":true,"t":"2024-05-01 12:00:00.123","_tp_time":"2024-05-01 '
                   b'12:00:00.123"}']


def test_no_rows_no_records() -> None:
    enc = encoder(("a", "string"))
    assert enc.compact(["a"], [], NOW) == []
    assert enc.objects([], NOW) == []
    assert encoder(("raw", "string")).texts([], NOW) == []


def test_objects_ignore_unknown_keys() -> None:
    enc = encoder(("a", "string"))
    assert enc.objects([{"a": "x", "zzz": 1}], NOW) == [b'{"a":"x","_tp_time":"2024-05-01 12:00:00.123"}']


@pytest.mark.parametrize(("columns", "data", "code", "says"), [
    (["a", "nope"], [["x", 1]], ErrorCode.INVALID_REQUEST, "unknown column [nope]"),
    (["a", "a"], [["x", "y"]], ErrorCode.INVALID_REQUEST, "listed twice"),
    ([], [], ErrorCode.INVALID_REQUEST, "non-empty list"),
    ("a", [["x"]], ErrorCode.INVALID_REQUEST, "non-empty list"),
    ([1], [["x"]], ErrorCode.INVALID_REQUEST, "non-empty list"),
    (["a"], {"x": 1}, ErrorCode.BAD_BODY, "data must be a list"),
    (["a"], [["x"], "y"], ErrorCode.BAD_BODY, "row 1 must be a list"),
    (["a"], [["x"], ["y", "z"]], ErrorCode.BAD_BODY, "row 1 has 2 values for 1 columns"),
    (["a"], [[]], ErrorCode.BAD_BODY, "row 0 has 0 values"),
])
def test_compact_shape_errors(columns: Any, data: Any, code: ErrorCode, says: str) -> None:
    with pytest.raises(ClientError) as info:
        encoder(("a", "string")).compact(columns, data, NOW)
    assert info.value.code is code and says in info.value.message


def test_objects_must_be_objects() -> None:
    with pytest.raises(ClientError) as info:
        encoder(("a", "string")).objects([{"a": "x"}, ["a"]], NOW)
    assert info.value.code is ErrorCode.BAD_BODY and "row 1 must be a JSON object" in info.value.message


def test_texts_go_to_raw() -> None:
    enc = encoder(("raw", "string"), ("n", "nullable(int32)"))
    assert enc.texts(["a", ""], NOW) == [b'{"raw":"a","n":null,"_tp_time":"2024-05-01 12:00:00.123"}',
                                         b'{"raw":"","n":null,"_tp_time":"2024-05-01 12:00:00.123"}']
    assert encoder(("raw", "nullable(string)")).texts(["x"], NOW)[0].startswith(b'{"raw":"x"')


@pytest.mark.parametrize("columns", [[("data", "string")], [("raw", "int32")], [("raw", "json")]])
def test_texts_need_a_string_raw_column(columns: list[tuple[str, str]]) -> None:
    with pytest.raises(ClientError) as info:
        encoder(*columns).texts(["x"], NOW)
    assert info.value.code is ErrorCode.INVALID_REQUEST and "string column named raw" in info.value.message


# -- streams without a schema ----------------------------------------------------------------------

def test_a_schemaless_stream_stores_the_raw_bytes() -> None:
    enc = RowEncoder(None)
    assert enc.texts(["héllo", '{"a":1}'], NOW) == ["héllo".encode(), b'{"a":1}']
    assert enc.compact(["raw"], [["x"], [{"k": 1}]], NOW) == [b"x", b'{"k":1}']
    assert enc.compact(["raw", "_tp_time"], [["x", "2024-05-01"]], NOW) == [b"x"]
    assert enc.objects([{"raw": "y", "other": 1}], NOW) == [b"y"]


@pytest.mark.parametrize(("call", "column"), [
    (lambda e: e.objects([{"raw": "x"}, {"other": 1}], NOW), "raw"),
    (lambda e: e.compact(["raw"], [["x"], [None]], NOW), "raw"),
    (lambda e: e.compact(["_tp_time"], [["2024-05-01"]], NOW), "raw"),
    (lambda e: e.compact(["raw", "_tp_time"], [["x", "never"]], NOW), "_tp_time"),
    (lambda e: e.texts(["ok", "a\udc80"], NOW), "raw"),
    (lambda e: e.compact(["raw"], [["a\udc80"]], NOW), "raw"),
])
def test_schemaless_refusals(call: Any, column: str) -> None:
    with pytest.raises(ClientError) as info:
        call(RowEncoder(None))
    assert info.value.code is ErrorCode.BAD_ROW and info.value.fields["column"] == column


def test_large_batches_take_the_column_paths() -> None:
    enc = encoder(("s", "string"), ("i", "int64"), ("f", "float32"), ("b", "bool"), ("t", "datetime64(3)"))
    rows = [[f"s{i}", i, i / 2, i % 2 == 0, NOW + i] for i in range(2000)]
    out = [orjson.loads(r) for r in enc.compact(["s", "i", "f", "b", "t"], rows, NOW)]
    assert out[1999] == {"s": "s1999", "i": 1999, "f": 999.5, "b": False, "t": "2024-05-01 12:00:02.122",
                         "_tp_time": NOW_TEXT}
    rows[1500][1] = 2**63
    with pytest.raises(ClientError) as info:
        enc.compact(["s", "i", "f", "b", "t"], rows, NOW)
    assert (info.value.fields["row"], info.value.fields["column"]) == (1500, "i")


def test_parsed_datetime_texts_are_held_once_for_every_stream_not_per_column() -> None:
    """Each column kept its own map of up to 100,000 texts (~19 MB of distinct isoformat() values),
    for the broker's life, in every typed stream ingested into: 50 streams of two time columns held
    50 x 2 maps. One bounded map per kind (datetime, datetime64) holds them now."""
    from datetime import datetime, timedelta

    from broker.rows import encode

    start = datetime(2024, 5, 1)
    encoders = [encoder(("t", "datetime64(3)"), ("s", "datetime")) for _ in range(50)]
    for i, enc in enumerate(encoders):
        times = [(start + timedelta(seconds=i * 4000 + j)).isoformat() + "Z" for j in range(4000)]
        rows = enc.compact(["t", "s"], [[t, t] for t in times], NOW)
        assert orjson.loads(rows[-1])["s"] == (start + timedelta(seconds=i * 4000 + 3999)).isoformat(" ")
    held = {id(m) for m in encode._PARSED.values()}
    maps = {id(c.times.cache): c.times.cache for enc in encoders for c in enc._codecs if c.times is not None}
    assert set(maps) == held                        # every column's map is one of the two shared ones
    assert sum(map(len, maps.values())) <= 2 * encode._CACHE_MAX < 50 * 2 * 4000
