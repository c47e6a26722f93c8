"""broker/tsdb/points.py on its own (no I/O): normalised points, the numeric-string rule against
a reference written from the spec's words, the CJK blocks, the name cache, and that no JSON value
makes the checker raise."""
from __future__ import annotations

import math
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.routing import key_hash
from broker.tsdb import points
from broker.tsdb.points import Point, check_point, check_points, illegal_character, typed_value
from broker.tsdb.put import encode
from broker.tsdb.series import record_data, series_key


def test_a_valid_point_is_normalised() -> None:
    p = check_point({"metric": "sys.cpu", "timestamp": 1346846400, "value": "18",
                     "tags": {"port": 8080, "host": "web01", "ok": False, "r": 0.5}})
    tags = {"host": "web01", "ok": "false", "port": "8080", "r": "0.5"}
    assert p == Point("sys.cpu", 1346846400000, 18, "long", tags,
                      series_key("sys.cpu", {"host": "web01", "port": "8080", "ok": "false", "r": "0.5"}))
    assert list(p.tags) == sorted(p.tags) and p.type == "numeric"
    assert check_point({"metric": 5, "timestamp": 10_000_000_000, "value": 1.0, "tags": {"a": "b"}}) == \
        Point("5", 10_000_000_000, 1.0, "double", {"a": "b"}, series_key("5", {"a": "b"}))


def _reference_number(text: str) -> Any:
    """The spec's words: `-?digits`, optional fraction, optional exponent, finite -> a number
    (long when integral and within 64 bits), anything else a string."""
    if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", text, flags=re.ASCII):
        return text
    if re.fullmatch(r"-?[0-9]+", text):
        n = int(text)
        if -2**63 <= n < 2**63:
            return n
    f = float(text)
    return f if math.isfinite(f) else text


@settings(max_examples=500, deadline=None, database=None)
@given(st.one_of(st.text(alphabet="0123456789-+.eE _,xabNIn\uff11٣ ", max_size=30),
                 st.from_regex(r"-?[0-9]{1,40}(\.[0-9]{1,5})?([eE][+-]?[0-9]{1,4})?", fullmatch=True)))
def test_numeric_strings_follow_the_spec_rule(text: str) -> None:
    if text == "":
        return
    got, kind = typed_value(text)  # type: ignore[misc]
    expected = _reference_number(text)
    assert got == expected and type(got) is type(expected), (text, got, expected)
    assert kind == {int: "long", float: "double", str: "string"}[type(expected)]


def test_huge_digit_strings_never_reach_int() -> None:
    assert typed_value("1" * 10_000) == ("1" * 10_000, "string")      # beyond a double: a string
    assert typed_value("0" * 10_000 + "7") == (7, "long")             # leading zeros: still 7
    assert typed_value("-" + "0" * 5000) == (0, "long")


def test_cjk_blocks_whole_and_nothing_else() -> None:
    blocks = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0x2EBF0, 0x2EE5F), (0x30000, 0x3134F), (0x31350, 0x323AF)]
    for lo, hi in blocks:
        for cp in (lo, (lo + hi) // 2, hi):
            assert illegal_character(chr(cp)) == "", hex(cp)
    for cp in (0x33FF, 0x4DC0, 0x4DFF, 0xA000, 0xF900, 0xFAFF, 0x2A6E0, 0x2EE60, 0x2F800, 0x2FFFF, 0x323B0,
               0x3042, 0x30A2, 0xAC00, 0x00E9, 0x0416, 0xFF10, 0x3000, 0x3001):
        assert illegal_character("a" + chr(cp)) == chr(cp), hex(cp)
    legal = "azAZ09-_./():,[]="
    assert illegal_character(legal) == ""
    for c in " +*@&\"\\'#!?%$^~`|<>{};\t\n\x00":
        assert illegal_character("ok" + c + "x") == c


def test_the_name_cache_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(points, "NAME_CACHE", 10)
    monkeypatch.setattr(points, "_names", {})
    for i in range(35):
        assert illegal_character(f"n{i}") == ""
    assert len(points._names) <= 10
    assert illegal_character("bad name") == " " and illegal_character("bad name") == " "


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**64, max_value=2**64),
                              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner,
                                                                                         max_size=3)), max_leaves=8)


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(st.one_of(JSON, st.fixed_dictionaries({}, optional={"metric": JSON, "timestamp": JSON,
                                                                     "value": JSON, "tags": JSON}))))
def test_any_json_is_a_point_or_an_error_string(raw: list[Any]) -> None:
    for got in check_points(raw):
        assert isinstance(got, (Point, str))
        if isinstance(got, Point):
            assert 10_000_000_000 <= got.timestamp_ms <= 9_999_999_999_999 or got.timestamp_ms % 1000 == 0
            assert got.tags and all(isinstance(v, str) and v for v in got.tags.values())


@settings(max_examples=300, deadline=None, database=None)
@given(metric=st.text(alphabet="ab.温", min_size=1, max_size=5),
       tags=st.dictionaries(st.text(alphabet="xyz温", min_size=1, max_size=3),
                            st.text(alphabet="uv1.", min_size=1, max_size=3), min_size=1, max_size=4),
       ts=st.integers(10_000_000_000, 9_999_999_999_999),
       value=st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
                       st.booleans(), st.text(max_size=5).filter(bool)))
def test_the_writer_encodes_records_exactly_as_the_layout_says(metric: str, tags: dict[str, str], ts: int,
                                                               value: Any) -> None:
    p = check_point({"metric": metric, "timestamp": ts, "value": value, "tags": tags})
    assert isinstance(p, Point)
    h, data = encode(p)
    assert data == record_data(p.metric, p.timestamp_ms, p.value, p.tags)
    assert h == key_hash(series_key(metric, tags)) and p.key == series_key(metric, tags)


def test_series_verdicts_do_not_confuse_equal_numbers() -> None:
    """1, 1.0 and True are equal (and hash alike): their verdicts must not be shared."""
    base = {"metric": "conf", "timestamp": 10_000_000_000, "value": 1}
    got = [check_point({**base, "tags": {"h": v}}) for v in ("1", 1, 1.0, True, "true", 0, False, "0")]
    assert [p.tags["h"] for p in got if isinstance(p, Point)] == ["1", "1", "1.0", "true", "true", "0", "false", "0"]
