"""put.fast_group, the one-pass path of /api/put for bodies of plain points, must sort a body
exactly as the long way (put.parse + put.group) or decline it (None), never answer otherwise.
Differential, in process: every body - plain, wild, or bytes no JSON encoder writes (duplicated
keys, an unknown field, a 1e400 or bad UTF-8 inside the tags) - goes both ways against the same
known series types, and whenever fast_group answers, its errors, partitions (records, indices,
latest time) and pending points equal the long way's. Plain bodies must take the fast path."""
from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import event, given, reject, settings
from hypothesis import strategies as st

from broker.tsdb import points as points_module
from broker.tsdb import put as put_module
from broker.tsdb.put import BadBody, Grouped, fast_group, group, parse, sort
from broker.tsdb.series import series_key

NOW_S = 1_700_000_000
LIMIT = 1 << 20
# series whose types the registry knows: a double, a long, a string and a boolean series
KNOWN = {series_key("fg.d", {"h": "x"}): "double", series_key("fg.l", {"h": "x"}): "long",
         series_key("fg.s", {"h": "x"}): "string", series_key("fg.b", {"h": "x"}): "boolean"}


def long_way(body: bytes, partitions: int = 4, known: dict[str, str] | None = None,
             limit: int = LIMIT) -> Grouped | str:
    try:
        _, errors, checked = parse(body)
    except BadBody as exc:
        return f"bad: {exc.code.name}"
    return group(errors, checked, 7, partitions, KNOWN if known is None else known, limit)


def same(a: Grouped, b: Grouped | str) -> None:
    assert isinstance(b, Grouped), b
    assert (a.stream_id, a.partition_count, a.errors, a.pending) == (b.stream_id, b.partition_count, b.errors,
                                                                    b.pending)
    assert {p: (part.records, part.indices, part.latest) for p, part in a.parts.items()} == \
        {p: (part.records, part.indices, part.latest) for p, part in b.parts.items()}   # type: ignore[union-attr]


def check(body: bytes, partitions: int = 4, known: dict[str, str] | None = None, limit: int = LIMIT) -> bool:
    """Both ways, twice (the second time every cache is warm); whether fast_group answered."""
    answered = False
    for _ in range(2):
        fast = fast_group(body, 7, partitions, KNOWN if known is None else known, limit)
        slow = long_way(body, partitions, known, limit)
        if fast is not None:
            same(fast, slow)
            answered = True
    return answered


def p(metric: str = "fg.d", ts: Any = NOW_S, value: Any = 1.5, **tags: Any) -> dict[str, Any]:
    return {"metric": metric, "timestamp": ts, "value": value, "tags": tags or {"h": "x"}}


PLAIN = [
    [p(value=v) for v in (1.5, 2, -0.0, 1e300)],                                 # numbers on a double series
    [p("fg.l", value=5), p("fg.l", value=2.5), p("fg.l", value="7")],          # long and double mix; "7" a long
    [p("fg.s", value="up"), p("fg.s", value="+5"), p("fg.s", value="温度")],      # strings stay strings
    [p("fg.b", value=True), p("fg.b", value=False)],
    [p("fg.new", value=1, h="a"), p("fg.new", value=2, h="b"), p("fg.d", ts=NOW_S * 1000)],   # pending + known
    [p("温度", value=3, 机房="一")],                                                  # CJK names
    [p("fg.t", value=1, port=8080, on=True, ratio=1.5)],                         # tag values as JSON text
    [p("fg.many", value=1, **{f"k{i}": "v" for i in range(16)})],                # 16 tags: the limit
    [p(ts=4_284_768), p(ts=9_999_999_999), p(ts=10_000_000_000), p(ts=9_999_999_999_999)],   # the range's ends
]


@pytest.mark.parametrize("points", PLAIN, ids=range(len(PLAIN)))
def test_plain_bodies_take_the_fast_path_and_sort_as_the_long_way(points: list[dict[str, Any]]) -> None:
    assert check(orjson.dumps(points))
    assert check(orjson.dumps(points), partitions=3)


def test_one_object_and_whitespace_take_the_fast_path() -> None:
    assert check(orjson.dumps(p()))
    assert check(b" \n[ " + orjson.dumps(p()) + b" ,\n" + orjson.dumps(p(value=2)) + b" ]\t")


DECLINED = [
    b"[]", b"", b"   ", b"null", b"[1]", b'"x"',
    orjson.dumps([p(), {**p(), "extra": 1}]),                                     # an unknown field
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1,"tags":{"h":1e400}}]',   # orjson refuses 1e400
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1,"tags":{"h":"\xff"}}]',  # and bad UTF-8
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1,"tags":{"h":"\\ud800"}}]',   # and a lone surrogate
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1,"tags":{"h":"x"},"extra":"\xff"}]',
    b'[{"metric":"fg.d","timestamp":1700000000,"value":NaN,"tags":{"h":"x"}}]',
    b'[{"metric":"fg.d","timestamp":1700000000,"value":18446744073709551616,"tags":{"h":"x"}}]',
    b'\xef\xbb\xbf[]',
    orjson.dumps([p(), p(metric="")]), orjson.dumps([p(), p(metric="a b")]), orjson.dumps([p(), p(metric=5)]),
    orjson.dumps([p(ts=4_284_767)]), orjson.dumps([p(ts=10**13)]), orjson.dumps([p(ts=True)]),
    b'[{"metric":"fg.d","timestamp":1.7e9,"value":1,"tags":{"h":"x"}}]',
    orjson.dumps([p(value=None)]), orjson.dumps([p(value="")]), orjson.dumps([p(value=[1])]),
    orjson.dumps([p(value=2**63)]), orjson.dumps([p("fg.s", value="x" * 20_481)]),
    orjson.dumps([p("fg.d", value="up")]), orjson.dumps([p("fg.b", value=1)]),   # type conflicts
    orjson.dumps([{**p(), "tags": {}}]), orjson.dumps([{**p(), "tags": None}]), orjson.dumps([{**p(), "tags": [1]}]),
    orjson.dumps([p(**{f"k{i}": "v" for i in range(17)})]), orjson.dumps([p(h="")]), orjson.dumps([p(h=None)]),
    orjson.dumps([p(h={"a": 1})]), orjson.dumps([p("m" * 256)]),
]


@pytest.mark.parametrize("body", DECLINED, ids=range(len(DECLINED)))
def test_other_bodies_go_the_long_way(body: bytes) -> None:
    assert fast_group(body, 7, 4, KNOWN, LIMIT) is None
    try:
        expected: Grouped | str = sort(body, 7, 4, KNOWN, LIMIT)
    except BadBody as exc:
        expected = f"bad: {exc.code.name}"
    slow = long_way(body)
    if isinstance(slow, str):
        assert expected == slow
    else:
        same(slow, expected)


def test_duplicated_keys_keep_the_last_like_orjson() -> None:
    body = (b'[{"metric":"fg.x","metric":"fg.d","timestamp":1,"timestamp":1700000000,"value":"a","value":2.5,'
            b'"tags":{"h":"x","h":"x"}}]')
    assert check(body)


@pytest.mark.parametrize("body", [
    # msgspec skips the value a second "tags" replaces; orjson refuses these bodies
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1.5,"tags":{"h":1e400},"tags":{"h":"x"}}]',
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1.5,"tags":"\xff","tags":{"h":"x"}}]',
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1.5,"tags":-1e999,"tags":{"h":"x"}}]',
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1.5,"t\\u0061gs":{"h":1e400},"tags":{"h":"x"}}]',
    b'[{"metric":"fg.d","timestamp":1700000000,"value":1.5,"tags":{"h":"y"},"tags":{"h":"x"}}]',   # a valid one
    # nested deeper than msgspec goes (RecursionError), not as deep as orjson's limit
    b'[{"metric":"m","timestamp":1700000000,"value":1,"tags":' + b"[" * 1000 + b"]" * 1000 + b"}]",
    b'[{"metric":"m","timestamp":1700000000,"value":1,"tags":{"h":' + b"[" * 1000 + b"]" * 1000 + b"}}]",
], ids=range(7))
def test_what_msgspec_would_not_check_goes_the_long_way(body: bytes) -> None:
    assert fast_group(body, 7, 4, KNOWN, LIMIT) is None
    test_other_bodies_go_the_long_way(body)


def remembered() -> list[tuple[str, bytes]]:
    """The (metric, tags text) keys the fast path remembers: its series forms and its layout's entries."""
    layout = put_module._layout
    entries = layout.entries if layout else {}
    return [*points_module.raw_forms, *((metric, tags) for metric, of in entries.items() for tags in of)]


def test_a_long_tags_text_is_sorted_but_not_remembered() -> None:
    points_module.raw_forms.clear()
    put_module._layout = None
    padded = b'[{"metric":"fg.d","timestamp":1700000000,"value":1.5,"tags":{"h":"x"' + b" " * 2000 + b"}}]"
    assert check(padded)
    assert not remembered()
    assert check(orjson.dumps([p()]))
    assert remembered() == [("fg.d", b'{"h":"x"}')] * 2


def test_a_record_over_the_limit_goes_the_long_way() -> None:
    body = orjson.dumps([p(), p(value=2)])
    assert fast_group(body, 7, 4, KNOWN, 40) is None
    check(body, limit=40)


def test_the_fast_path_does_not_remember_what_it_declined() -> None:
    points_module.raw_forms.clear()
    for body in DECLINED:
        fast_group(body, 7, 4, KNOWN, LIMIT)
    assert all(type(form).__name__ == "SeriesForm" for form in points_module.raw_forms.values())


_SCALAR = (st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats() | st.text(max_size=6)
           | st.sampled_from(["NaN", "1e400", "-0", "", "5", "+5", "1.5e3", "温度", "x" * 21_000]))
_NAME = st.sampled_from(["fg.d", "fg.l", "fg.s", "fg.b", "fg.n", "fg c", "温度", ""])
_TAGS = st.sampled_from([{"h": "x"}, {"h": "y", "dc": "1"}, {"dc": "1", "h": "y"}, {}, {"h": 1}, {"h": ""}]) | \
    st.dictionaries(st.text(max_size=3), _SCALAR, max_size=3)
_POINT = st.fixed_dictionaries(
    {"metric": _NAME | _SCALAR,
     "timestamp": st.sampled_from([NOW_S, NOW_S * 1000, 4_284_767, 4_284_768, 10**13, 1.5]) | _SCALAR,
     "value": _SCALAR, "tags": _TAGS},
    optional={"extra": _SCALAR})
_PLAIN_POINT = st.fixed_dictionaries(
    {"metric": st.sampled_from(["fg.d", "fg.l", "fg.s", "fg.b", "fg.n", "温度"]),
     "timestamp": st.sampled_from([NOW_S, NOW_S * 1000, 4_284_768, 9_999_999_999, 10**10]),
     "value": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**63, 2**63 - 1) | st.booleans()
     | st.sampled_from(["5", "-1.5e3", "up", "+5"]),
     "tags": st.sampled_from([{"h": "x"}, {"h": "y", "dc": "1"}, {"dc": "1", "h": "y"}, {"h": 8080}])})
_BODY = st.lists(_PLAIN_POINT, min_size=1, max_size=5) | st.lists(_PLAIN_POINT | _POINT, min_size=1, max_size=5)
# byte-level changes no encoder makes: they must never get a different answer from the fast path
_MUTATIONS = st.sampled_from([b"", b'"h":"x"', b'"tags":{"h":"x"},', b"\xff", b"1e400", b"\\ud800", b" "])


@settings(max_examples=400, deadline=None)
@given(points=_BODY, partitions=st.integers(1, 5),
       at=st.integers(0, 10_000), mutation=_MUTATIONS)
def test_fuzzed_bodies_sort_as_the_long_way_or_are_declined(points: list[dict[str, Any]], partitions: int,
                                                            at: int, mutation: bytes) -> None:
    try:
        body = orjson.dumps(points)
    except orjson.JSONEncodeError:   # an integer beyond 64 bits: DECLINED has such bodies
        reject()
    event("fast path" if check(body, partitions) else "long way")
    if mutation:
        at %= len(body)
        event("mutated: fast path" if check(body[:at] + mutation + body[at:], partitions) else "mutated: long way")


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**63, 2**63 - 1)
                       | st.booleans(), min_size=1, max_size=20),
       hosts=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=20, max_size=20))
def test_fuzzed_plain_bodies_always_take_the_fast_path(values: list[Any], hosts: list[str]) -> None:
    body = orjson.dumps([p("fg.plain." + type(v).__name__, NOW_S + i, v, h=hosts[i]) for i, v in enumerate(values)])
    assert check(body, known={})


_HOSTS = [f"h{i}" for i in range(12)]
# numeric series the registry knows (half of them double, half long), and two it does not
_NUMERIC_KNOWN = {series_key("fg.v", {"h": h}): ("double", "long")[i % 2] for i, h in enumerate(_HOSTS[:10])}


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**63, 2**63 - 1)
                       | st.sampled_from([-2**63, 2**63 - 1, 0.0, -0.0, 1e-300, 5e-324, 1.7976931348623157e308]),
                       min_size=1, max_size=40),
       hosts=st.lists(st.sampled_from(_HOSTS), min_size=40, max_size=40),
       times=st.lists(st.sampled_from([NOW_S, NOW_S * 1000 + 1, 4_284_768, 9_999_999_999, 10**10, 10**13 - 1]),
                      min_size=40, max_size=40),
       partitions=st.integers(1, 8))
def test_fuzzed_numbers_of_known_series_take_the_fast_path(values: list[Any], hosts: list[str], times: list[int],
                                                          partitions: int) -> None:
    """Bodies of numbers (the columns' path: one orjson call writes every value), over series of
    known and not yet known types, several partitions, times in seconds and in milliseconds."""
    body = orjson.dumps([p("fg.v", times[i], v, h=hosts[i]) for i, v in enumerate(values)])
    assert check(body, partitions, known=_NUMERIC_KNOWN)


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, -2**63 - 1])
def test_a_number_past_64_bits_among_known_numbers_goes_the_long_way(value: int) -> None:
    body = b"[%s,%s]" % (orjson.dumps(p("fg.v", value=1.5, h="h0")),
                         orjson.dumps(p("fg.v", value=0, h="h1")).replace(b'"value":0', b'"value":%d' % value))
    assert fast_group(body, 7, 4, _NUMERIC_KNOWN, LIMIT) is None
    test_other_bodies_go_the_long_way(body)


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_series_whose_types_are_learned_between_bodies_sort_as_the_long_way(partitions: int) -> None:
    """The broker's way: the same `known` mapping gains the types of series the last body brought.
    The cache held them without a type; the next body must see the types, as the long way does."""
    known: dict[str, str] = {}
    hosts = [f"t{i}" for i in range(12)]
    first = orjson.dumps([p("fg.learn", NOW_S, float(i), h=h) for i, h in enumerate(hosts)])
    fast = fast_group(first, 7, partitions, known, LIMIT)
    assert fast is not None and len(fast.pending) == 12 and not fast.parts
    for i, h in enumerate(hosts[:8]):   # most of them learned, as double or long
        known[series_key("fg.learn", {"h": h})] = ("double", "long")[i % 2]
    later = orjson.dumps([p("fg.learn", NOW_S + 10, 2.5, h=h) for h in hosts])
    assert check(later, partitions, known=known)
    grouped = fast_group(later, 7, partitions, known, LIMIT)
    assert grouped is not None and sorted(i for i, *_ in grouped.pending) == list(range(8, 12))
    known[series_key("fg.learn", {"h": hosts[9]})] = "string"   # learned as a string: numbers conflict
    assert fast_group(later, 7, partitions, known, LIMIT) is None   # the long way words the conflict
    assert check(orjson.dumps([p("fg.learn", NOW_S + 20, "up", h=hosts[9])]), partitions, known=known)
