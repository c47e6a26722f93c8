"""Properties of the row encoder and the ingest decoder over generated schemas, values and bodies:
only ClientErrors escape, every record is a JSON object with every column, compact and objects
agree, stored values are a fixpoint, and layout does not change what streaming decodes."""
from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import ClientError
from broker.model import ColumnDef, StreamSchema
from broker.rows.encode import RowEncoder
from broker.rows.ingest import FORMATS, decode

NOW = 1_714_564_800_123
deterministic = settings(derandomize=True, max_examples=300, deadline=None)

BASE_TYPES = ["string", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32",
              "float64", "bool", "datetime64(3)", "datetime64(3, 'UTC')", "datetime64(3, 'Asia/Kolkata')",
              "datetime", "date", "json"]
TYPES = BASE_TYPES + [f"nullable({t})" for t in BASE_TYPES if t != "json"]

scalars = (st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=20)
           | st.sampled_from([0, 1, -1, 255, 2**63 - 1, 2**64 - 1, 1714564800, 1714564800123, 1.5, 3.0]))
datetimes = st.datetimes(min_value=datetime(1850, 1, 1), max_value=datetime(2350, 1, 1))
zones = st.sampled_from([None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])
date_texts = st.one_of(
    st.builds(lambda d, z: d.replace(tzinfo=z).isoformat(), datetimes, zones),
    st.builds(lambda d: d.isoformat(" ", "milliseconds"), datetimes),
    st.builds(lambda d: d.date().isoformat(), datetimes),
    st.sampled_from(["2024-02-30", "2024-05-01T24:00:00", "2024-05-01 12:00:00.123", "not a date", "{}", "[1]"]),
)
values = st.recursive(
    scalars | date_texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def valid(ctype: str) -> st.SearchStrategy[Any]:
    """Values a column of `ctype` takes (so that most generated rows get through to the writing)."""
    inner = ctype.removeprefix("nullable(").removesuffix(")") if ctype.startswith("nullable(") else ctype
    if inner.startswith(("int", "uint")):
        bits = int(inner.removeprefix("u").removeprefix("int"))
        lo, hi = (0, 2**bits - 1) if inner.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        base: st.SearchStrategy[Any] = st.integers(lo, hi)
    elif inner.startswith("float"):
        base = st.floats(width=int(inner[5:]), allow_nan=False, allow_infinity=False) | st.integers(-1000, 1000)
    elif inner.startswith("datetime64"):
        base = st.builds(lambda d, z: d.replace(tzinfo=z).isoformat(),
                         st.datetimes(datetime(1901, 1, 1), datetime(2298, 1, 1)), zones) \
            | st.integers(-2 * 10**12, 10**13)
    elif inner.startswith("datetime"):
        base = st.builds(lambda d: d.isoformat(" "), st.datetimes(datetime(1971, 1, 1), datetime(2105, 1, 1))) \
            | st.integers(0, 2**32 - 1)
    else:
        base = {"string": st.text(max_size=10), "bool": st.booleans(), "json": values,
                "date": st.dates(date(1970, 1, 1), date(2149, 6, 6)).map(date.isoformat)}[inner]
    return base | st.none() if ctype != inner else base


@st.composite
def schemas_and_rows(draw: st.DrawFn) -> tuple[StreamSchema, list[str], list[list[Any]]]:
    types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=5))
    columns = tuple(ColumnDef(f"c{i}", t) for i, t in enumerate(types))
    schema = StreamSchema(columns)
    listed = draw(st.permutations([c.name for c in columns] + ["_tp_time"]))
    listed = listed[:draw(st.integers(1, len(listed)))]
    kinds = dict(zip([c.name for c in columns], types), _tp_time="datetime64(3, 'UTC')")
    # mostly values of the column's type, sometimes anything
    cells = [st.one_of(valid(kinds[name]), valid(kinds[name]), valid(kinds[name]), values) for name in listed]
    rows = draw(st.lists(st.tuples(*cells).map(list), max_size=6))
    return schema, listed, rows


def _encoded(schema: StreamSchema, listed: list, rows: list, enc: RowEncoder | None = None) -> list[bytes] | None:
    """The records of a compact body, or None when the encoder refused it (a ClientError: the
    only exception it may raise)."""
    try:
        return (enc or RowEncoder(schema)).compact(listed, rows, NOW)
    except ClientError:
        return None


@deterministic
@given(schemas_and_rows())
def test_only_client_errors_escape_and_records_are_whole_objects(case: tuple) -> None:
    schema, listed, rows = case
    out = _encoded(schema, listed, rows)
    if out is None:
        return
    names = [c.name for c in schema.columns] + ["_tp_time"]
    assert len(out) == len(rows)
    for record in out:
        decoded = orjson.loads(record)
        assert type(decoded) is dict and list(decoded) == names


@deterministic
@given(schemas_and_rows())
def test_compact_and_objects_agree(case: tuple) -> None:
    schema, listed, rows = case
    enc = RowEncoder(schema)
    objects = [dict(zip(listed, row)) for row in rows]
    try:
        expected: Any = enc.compact(listed, rows, NOW)
    except ClientError as e:
        expected = (e.code, e.fields)
    try:
        got: Any = enc.objects(objects, NOW)
    except ClientError as e:
        got = (e.code, e.fields)
    assert got == expected


@deterministic
@given(schemas_and_rows())
def test_stored_values_are_a_fixpoint(case: tuple) -> None:
    """What the encoder writes, encoded again, is written unchanged (reads and re-ingests are lossless)."""
    schema, listed, rows = case
    enc = RowEncoder(schema)
    out = _encoded(schema, listed, rows, enc)
    if out is None:
        return
    again = enc.objects([orjson.loads(r) for r in out], NOW + 999)
    assert again == out


@deterministic
@given(st.lists(st.dictionaries(st.sampled_from(["time", "data", "x"]), values, max_size=3), min_size=1, max_size=5),
       st.lists(st.sampled_from(["", "\n", " ", "\r\n", "\n\n  "]), min_size=5, max_size=5),
       st.booleans())
def test_streaming_layout_does_not_matter(objects: list[dict], seps: list[str], indent: bool) -> None:
    enc = RowEncoder(StreamSchema((ColumnDef("time", "nullable(datetime64(3))"), ColumnDef("data", "string"))))
    # the json module writes what orjson cannot (integers beyond 64 bits, Infinity): both paths see them
    lines = b"\n".join(json.dumps(o).encode() for o in objects)
    laid_out = b"".join(json.dumps(o, indent=2 if indent else None).encode() + sep.encode()
                        for o, sep in zip(objects, seps))
    # an error names the same row and column whatever the layout; its detail may give a byte
    # offset, which the layout moves
    try:
        expected: Any = decode("streaming", lines, enc, NOW)
    except ClientError as e:
        expected = (e.code, {k: v for k, v in e.fields.items() if k != "detail"})
    try:
        got: Any = decode("streaming", laid_out, enc, NOW)
    except ClientError as e:
        got = (e.code, {k: v for k, v in e.fields.items() if k != "detail"})
    assert got == expected


def _any_json(value: Any) -> bytes:
    """JSON text of any generated value: orjson's, else json's for what orjson will not write (an
    integer beyond 64 bits; json writes it, and NaN, as they come)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value).encode()


@deterministic
@given(st.sampled_from(FORMATS), st.binary(max_size=200) | st.text(max_size=100).map(str.encode)
       | st.builds(lambda v: _any_json(v), values))
def test_decoding_any_body_raises_only_client_errors(fmt: str, body: bytes) -> None:
    for enc in (RowEncoder(None), RowEncoder(StreamSchema((ColumnDef("raw", "string"), ColumnDef("j", "json"))))):
        try:
            out = decode(fmt, body, enc, NOW)
        except ClientError:
            continue
        assert all(type(r) is bytes for r in out)
