"""Executors: typed results, windows (exact aggregates, late rows), global emissions, LIMIT,
and decoding that loses no good record to a bad one."""
from __future__ import annotations

import pytest

from broker.errors import ClientError, ErrorCode
from broker.query import compile_query
from broker.query.exec import GLOBAL_EMIT_MS, IDLE_MS, AggregateExecutor
from tests.query.helpers import lookup, raw, row, text

T0 = 1_704_067_200_000   # 2024-01-01 00:00:00 UTC, a multiple of every window size used here


def run(sql: str, *batches: list, raw_stream: bool = False, finish: bool = True) -> list[list]:
    ex = compile_query(sql, lookup).executor()
    out = [r for b in batches for r in ex.feed(b, raw_stream)]
    return out + (ex.finish() if finish else [])


def test_seed_query_typed_values() -> None:
    records = [raw(0, b'{"key1":"a","key2":42}'), raw(1, b'{"key1":3,"key2":"7"}'),
               raw(2, b'{"key1":{"x":[1]}}'), raw(3, b'not json'), raw(4, b'\xff\xfe')]
    assert run("select raw:key1 as k1, raw:key2::int as k2 from foo", records, raw_stream=True) == [
        ["a", 42], ["3", 7], ['{"x":[1]}', None], ["", None], ["", None]]


def test_json_paths_casts_and_scalar_functions() -> None:
    records = [raw(0, b'{"a":{"b":"deep"},"f":"1.5","t":true,"d":"2024-01-01T00:00:01.25Z"}')]
    sql = ("select raw:a.b, raw:f::float, raw:f::float * 2, raw:t::bool, raw:d::datetime, "
           "to_string(1 / 4), lower('AbC'), upper(raw:a.b), length(raw:a.b), abs(-3), "
           "round(2.567, 2), cast(raw:d as datetime64(3)) from foo")
    assert run(sql, records, raw_stream=True) == [
        ["deep", 1.5, 3.0, True, "2024-01-01 00:00:01", "0.25", "abc", "DEEP", 4, 3, 2.57,
         "2024-01-01 00:00:01.250"]]


def test_lower_and_upper_change_ascii_letters_only_as_clickhouse_the_utf8_ones_every_letter() -> None:
    records = [raw(0, '{"s":"Àb Straße İx é"}'.encode())]
    assert run("select lower(raw:s), upper(raw:s), lower_utf8(raw:s), upper_utf8(raw:s), lower(''), "
               "lowerUTF8('ÀÉ'), upperUTF8('àé') from foo", records, raw_stream=True) == [
        ["Àb straße İx é", "ÀB STRAßE İX é", "àb straße i̇x é", "ÀB STRASSE İX É", "", "àé", "ÀÉ"]]


def test_typed_stream_columns_and_filters() -> None:
    records = [row(i, T0 + i * 1000, s=f"Key{i}", i=i, f=i / 2, b=i % 2 == 0, n=None if i % 3 else i,
                   ts=f"2024-01-01 00:00:0{i}.500", d="2024-01-02", j={"x": i}, u=i)
               for i in range(6)]
    got = run("select s, i, f, b, ts, d, j:x, n, u, _tp_time from t where i >= 4", records)
    assert got == [["Key4", 4, 2.0, True, "2024-01-01 00:00:04.500", "2024-01-02", "4", None, 4,
                    "2024-01-01 00:00:04.000"],
                   ["Key5", 5, 2.5, False, "2024-01-01 00:00:05.500", "2024-01-02", "5", None, 5,
                    "2024-01-01 00:00:05.000"]]
    assert run("select i from t where s like 'Key%' and s like '%1'", records) == [[1]]
    assert run("select i from t where s like 'key%'", records) == []          # LIKE: case matters
    assert run("select count(*) from t where s ilike 'key%'", records) == [[6]]   # ILIKE: not
    assert run("select i from t where i in (2, 3) or n is not null", records) == [[0], [2], [3]]
    assert run("select i / 4, i % 4 from t where i = 5", records) == [[1.25, 1]]
    assert run("select i from t where ts > '2024-01-01 00:00:04' and not b", records) == [[5]]


def test_case_multi_if_and_if_take_the_first_branch_that_holds() -> None:
    records = [row(i, T0 + i * 1000, s=f"k{i}", i=i, f=i / 2) for i in range(5)]
    assert run("select i, case when i < 1 then 'low' when i < 3 then 'mid' else 'high' end from t",
               records) == [[0, "low"], [1, "mid"], [2, "mid"], [3, "high"], [4, "high"]]
    # the simple form compares the operand; without ELSE, NULL where no branch holds
    assert run("select case i when 1 then 'one' when 3 then 'three' end from t", records) == [
        [None], ["one"], [None], ["three"], [None]]
    # numbers of different kinds widen as arithmetic does
    assert run("select multi_if(i = 0, 10, i = 1, f, -1) from t", records) == [
        [10.0], [0.5], [-1.0], [-1.0], [-1.0]]
    assert run("select if(i > 2, s, 'small') from t where i in (2, 3)", records) == [["small"], ["k3"]]
    assert run("select count(*) from t where case when i % 2 = 0 then true else false end",
               records) == [[3]]


def test_a_bool_compares_with_numbers_as_clickhouse_uint8() -> None:
    assert run("select true = 1, b = 1, b > 0, 2 > true from t", [row(0, T0, b=True), row(1, T0, b=False)]) == [
        [True, True, True, True], [True, False, False, True]]


def test_branches_and_coalesce_take_one_common_type() -> None:
    """The header said the first argument's type while the others' values came out as they were:
    floats under nullable(int32), a uint64 past int64 under int64 (the SQL probe)."""
    records = [row(0, T0, n=None, f=1.5, i=2, u=3), row(1, T0, n=5, f=2.5, i=1, u=0)]
    sql = "select coalesce(n, f), if(i > 1, n, 1.5), if(u > 0, u, 0), coalesce(n, 7), if(i > 1, f, 0) from t"
    # if(i > 1, n, 1.5): nullable, as ClickHouse's Nullable(Float64); coalesce(n, f) is not
    assert [t for _, t in compile_query(sql, lookup).header] == [
        "float64", "nullable(float64)", "int64", "int64", "float64"]
    assert run(sql, records) == [[1.5, None, 3, 7, 1.5], [5.0, 1.5, 0, 5, 0.0]]
    big = [row(0, T0, u=2**64 - 1)]
    assert run("select if(u > 0, u, 0), coalesce(u, 5) from w", big) == [[2**64 - 1, 2**64 - 1]]
    # a small integer's arithmetic beside a float (ClickHouse widens u + 1 of a uint8 one step)
    assert run("select if(b, f, u + 1), if(b, f, 1 - 2), if(b, f, abs(-1)) from t", [row(0, T0, b=False, u=2)]) == [
        [3.0, -1.0, 1.0]]


@pytest.mark.parametrize(("sql", "message"), [
    ("select case when i > 1 then s else 1 end from t", "CASE has no type for both string and int64"),
    ("select coalesce(n, 'x') from t", "coalesce() has no type for both nullable(int32) and string"),
    ("select if(u > 0, u, -1) from w", "if() has no type for both uint64 and int64"),
    ("select if(i > 0, i, 1.5) from t", "if() has no type for both int64 and float64"),   # ClickHouse's too
    ("select coalesce(f, 9999999999) from t", "coalesce() has no type for both int64 and float64"),
    ("select if(b, f, count(*)) from t group by b, f", "if() has no type for both uint64 and float64"),
    ("select multi_if(i > 1, 1) from t", "multi_if() takes an odd number of arguments"),
    ("select case when s then 1 end from t", "a condition must be bool"),
])
def test_case_and_multi_if_refusals(sql: str, message: str) -> None:
    with pytest.raises(ClientError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_query(sql, lookup)


def test_clickhouse_aliases_of_string_cast_to_string() -> None:
    records = [row(0, T0, i=42)]
    assert run("select i::blob, cast(i as longtext), cast(i as varchar) from t", records) == [["42", "42", "42"]]
    with pytest.raises(ClientError, match="cast to UUID"):
        compile_query("select i::uuid from t", lookup)


def test_a_json_column_reads_as_stored_whatever_its_neighbours() -> None:
    """Polars wrote nested values its own way ({"a": 1} for {"a":1.0}, 1e20 in full) unless a bad
    record sent the batch down the lenient path: the same row read two ways."""
    good = raw(0, b'{"j":{"a":1.0,"b":[1e+20,-0.0,0.1]},"i":1}')
    assert run("select j, i from t", [good]) == [['{"a":1.0,"b":[1e+20,-0.0,0.1]}', 1]]
    assert run("select j, i from t", [good, raw(1, b"not json")]) == [['{"a":1.0,"b":[1e+20,-0.0,0.1]}', 1]]
    assert run("select j:a from t", [good]) == [["1.0"]]


def test_float32_values_come_back_in_their_shortest_form() -> None:
    records = [raw(0, b'{"x":"0.1"}'), raw(1, b'{"x":"19.3"}'), raw(2, b'{"x":"nope"}')]
    assert run("select raw:x::float32, raw:x::float64 from foo", records, raw_stream=True) == [
        [0.1, 0.1], [19.3, 19.3], [None, None]]   # not 0.10000000149011612, 19.299999237060547


def test_missing_columns_are_null_and_tp_time_falls_back_to_the_append_time() -> None:
    records = [raw(0, b'{"s":"x"}', ms=T0 + 5), raw(1, b'{"i":"not an int","s":"y"}', ms=T0 + 6)]
    assert run("select s, i, _tp_time from t", records) == [
        ["x", None, "2024-01-01 00:00:00.005"], ["y", None, "2024-01-01 00:00:00.006"]]


def test_time_values_from_other_doors_parse_too() -> None:
    records = [raw(0, b'{"ts":"2024-01-01T00:00:01.25Z","d":"2024-01-02 00:00:00"}'),
               raw(1, b'{"ts":"2024-01-01 00:00:02.500","d":"2024-01-03"}'),
               raw(2, b'{"ts":"yesterday","d":null}')]
    assert run("select ts, d from t", records) == [
        ["2024-01-01 00:00:01.250", "2024-01-02"], ["2024-01-01 00:00:02.500", "2024-01-03"],
        [None, None]]


def test_a_bad_record_loses_only_itself() -> None:
    good = [row(i, T0 + i, i=i) for i in range(100)]
    bad = [raw(900, b"[1,2]"), raw(901, b""), raw(902, b'{"i": 1.5,\n "s": "multi-line"}'),
           raw(903, b"{broken")]
    ex = compile_query("select i, s from t", lookup).executor()
    out = ex.feed(good[:50] + bad + good[50:], False)
    assert [r[0] for r in out] == [*list(range(50)), None, *list(range(50, 100))]
    assert out[50] == [None, "multi-line"]
    assert ex.skipped_rows == 3 and ex.scanned_rows == 104


def test_count_star_counts_the_rows_select_star_shows() -> None:
    """A query reading no column counted every record, JSON object or not: count(*) said 104 where
    `select *` showed 101 rows (the DIS probe: 9 against 4 on a typed stream DIS wrote into)."""
    good = [row(i, T0 + i, i=i) for i in range(100)]
    bad = [raw(900, b"[1,2]"), raw(901, b""), raw(902, b'{"i": 1.5,\n "s": "multi-line"}'),
           raw(903, b"{broken"), raw(904, b"null")]
    records = good[:50] + bad + good[50:]
    shown = compile_query("select * from t", lookup).executor()
    rows = len(shown.feed(records, False) + shown.finish())
    counted = compile_query("select count(*) from t", lookup).executor()
    assert counted.feed(records, False) + counted.finish() == [[rows]] == [[101]]
    assert counted.skipped_rows == shown.skipped_rows == 4
    clean = compile_query("select count(*) from t", lookup).executor()   # the fast check alone
    assert clean.feed(good, False) + clean.finish() == [[100]] and clean.skipped_rows == 0


def tumbling(ms_list: list[int], keys: list[str] | None = None) -> list:
    return [row(n, T0 + ms, i=n, s=(keys[n] if keys else "k"), f=float(n))
            for n, ms in enumerate(ms_list)]


def test_tumble_exact_aggregates_and_emission_on_watermark() -> None:
    sql = ("select window_start, window_end, count(*), sum(i), avg(f), min(i), max(i), "
           "count_distinct(s) from tumble(t, 5s) group by window_start")
    ex = compile_query(sql, lookup).executor()
    # window [0,5s): rows 0,1,2 ; [5s,10s): rows 3,4 ; [10s,15s): row 5
    keys = ["a", "b", "a", "c", "c", "d"]
    records = tumbling([0, 1000, 4999, 5000, 9000, 10_000], keys)
    assert ex.feed(records[:3], False) == []           # watermark 4999 < 5000: still open
    assert ex.feed(records[3:4], False) == [
        ["2024-01-01 00:00:00.000", "2024-01-01 00:00:05.000", 3, 3, 1.0, 0, 2, 2]]
    assert ex.feed(records[4:], False) == [
        ["2024-01-01 00:00:05.000", "2024-01-01 00:00:10.000", 2, 7, 3.5, 3, 4, 1]]
    assert ex.finish() == [
        ["2024-01-01 00:00:10.000", "2024-01-01 00:00:15.000", 1, 5, 5.0, 5, 5, 1]]


def test_tumble_by_key() -> None:
    sql = "select window_start, s, count(*) as c from tumble(t, 5s) group by window_start, s"
    records = tumbling([0, 100, 200, 5000, 5100], ["b", "a", "b", "a", "a"])
    assert run(sql, records) == [["2024-01-01 00:00:00.000", "a", 1], ["2024-01-01 00:00:00.000", "b", 2],
                                 ["2024-01-01 00:00:05.000", "a", 2]]


def test_late_rows_are_dropped_and_counted_out_of_order_rows_are_not() -> None:
    sql = "select window_start, count(*), sum(i) from tumble(t, 5s) group by window_start"
    ex = compile_query(sql, lookup).executor()
    records = [row(0, T0 + 3000, i=1), row(1, T0 + 1000, i=2),   # out of order, window open
               row(2, T0 + 6000, i=4),                            # closes [0,5s)
               row(3, T0 + 2000, i=8),                            # late: dropped
               row(4, T0 + 5500, i=16)]                           # out of order, open window
    out = ex.feed(records, False)
    assert out == [["2024-01-01 00:00:00.000", 2, 3]]
    assert ex.late_rows == 1
    assert ex.finish() == [["2024-01-01 00:00:05.000", 2, 20]]


def test_the_window_may_be_grouped_by_its_alias() -> None:
    """`window_start as w ... group by w` is the window, as in ClickHouse; the alias was resolved
    after the check for the window's columns, so w was compiled as the stream's column
    window_start: UNKNOWN_COLUMN."""
    records = [row(0, T0 + 1000, s="a"), row(1, T0 + 2000, s="b"), row(2, T0 + 6000, s="a")]
    assert run("select window_start as w, count(*) from tumble(table(t), 5s) group by w", records) == [
        ["2024-01-01 00:00:00.000", 2], ["2024-01-01 00:00:05.000", 1]]
    assert run("select window_end as e, s, count(*) as c from tumble(table(t), 5s) group by e, s having c > 0",
               records) == [["2024-01-01 00:00:05.000", "a", 1], ["2024-01-01 00:00:05.000", "b", 1],
                            ["2024-01-01 00:00:10.000", "a", 1]]


def test_group_by_a_position_is_that_select_item() -> None:
    """`group by 1` is the first select item, as ClickHouse's positional arguments (on by default):
    it was the constant 1, so `select s, count(*) ... group by 1` said s must be in GROUP BY and
    `select count(*) ... group by 1` counted every row in one group without a word."""
    records = [row(0, T0 + 1000, s="a"), row(1, T0 + 2000, s="b"), row(2, T0 + 6000, s="a")]
    assert run("select s, count(*) from table(t) group by 1", records) == [["a", 2], ["b", 1]]
    assert run("select count(*) as c, s from table(t) group by 2", records) == [[2, "a"], [1, "b"]]
    assert run("select window_start, count(*) from tumble(table(t), 5s) group by 1", records) == [
        ["2024-01-01 00:00:00.000", 2], ["2024-01-01 00:00:05.000", 1]]
    for sql, code in (("select s, count(*) from table(t) group by 3", ErrorCode.SQL_SYNTAX),
                      ("select s, count(*) from table(t) group by 0", ErrorCode.SQL_SYNTAX),
                      ("select count(*) from table(t) group by 1", ErrorCode.UNSUPPORTED_SQL)):
        with pytest.raises(ClientError) as err:
            run(sql, records)
        assert err.value.code is code, (sql, err.value)


def test_hop_exact_aggregates() -> None:
    sql = ("select window_start, window_end, count(*), sum(i), avg(i) from hop(t, 2s, 6s) "
           "group by window_start")
    records = [row(n, T0 + ms, i=n + 1) for n, ms in enumerate([0, 1500, 2500, 4000, 7000])]
    # windows start at multiples of 2s and last 6s; a row at t is in starts (t-6s, t]
    out = run(sql, records)
    expected = {-4000: [1, 2], -2000: [1, 2, 3], 0: [1, 2, 3, 4], 2000: [3, 4, 5],
                4000: [4, 5], 6000: [5]}
    got = {r[0]: r[2:] for r in out}
    assert len(out) == len(expected)
    for start, items in expected.items():
        from tests.query.helpers import text
        assert got[text(T0 + start)] == [len(items), sum(items), sum(items) / len(items)]
    assert [r[0] for r in out] == sorted(r[0] for r in out)


def test_hop_row_late_only_when_all_its_windows_closed() -> None:
    sql = "select window_start, count(*) from hop(t, 2s, 4s) group by window_start"
    ex = compile_query(sql, lookup).executor()
    ex.feed([row(0, T0 + 5000, i=0)], False)   # closes windows ending <= 5s: [0,4s) only
    ex.feed([row(1, T0 + 3000, i=1)], False)   # in [0,4s) (closed) and [2s,6s) (open): kept
    ex.feed([row(2, T0 + 500, i=2)], False)    # in [-2s,2s) and [0,4s): both closed: late
    assert ex.late_rows == 1
    out = {r[0]: r[1] for r in ex.finish()}
    assert out == {"2024-01-01 00:00:02.000": 2, "2024-01-01 00:00:04.000": 1}


def test_window_on_a_named_time_column_skips_null_times() -> None:
    sql = "select window_start, count(*) from tumble(table(t), ts, 10s) group by window_start"
    records = [row(0, T0, ts="2024-01-01 00:00:11.000"), row(1, T0, ts=None),
               row(2, T0, ts="2024-01-01 00:00:01.000")]
    ex = compile_query(sql, lookup).executor()
    # a bounded scan has no watermark: the row at 01 s, stored after the one at 11 s, is not late
    assert ex.feed(records, False) == [] and ex.late_rows == 0 and ex.skipped_rows == 1
    assert ex.finish() == [["2024-01-01 00:00:00.000", 1], ["2024-01-01 00:00:10.000", 1]]
    # streaming, the same rows: the 01 s one comes after the watermark passed its window's end
    ex = compile_query(sql.replace("table(t)", "t"), lookup).executor()
    assert ex.feed(records, False) == [] and ex.late_rows == 1 and ex.skipped_rows == 1


def test_global_aggregation_emits_every_two_seconds_while_rows_arrive() -> None:
    ex = compile_query("select count(*), sum(i) from t", lookup).executor()
    assert ex.tick(0) == []                            # starts the clock
    assert ex.feed([row(0, T0, i=1), row(1, T0, i=2)], False) == []
    assert ex.tick(1999) == []
    assert ex.tick(2000) == [[2, 3]]
    assert ex.tick(4000) == []                         # nothing new: nothing emitted
    ex.feed([row(2, T0, i=4)], False)
    assert ex.tick(4100) == [[3, 7]]                   # 2 s since the last emission
    ex.feed([row(3, T0, i=8)], False)
    assert ex.tick(6099) == []
    assert ex.tick(6100) == [[4, 15]]


def test_global_group_by_and_having() -> None:
    sql = "select s, count(*) as c, max(i) from t group by s having c > 1"
    records = [row(n, T0, s=k, i=n) for n, k in enumerate("abab c")]
    ex = compile_query(sql, lookup).executor()
    ex.tick(0)
    ex.feed(records, False)
    assert ex.tick(2000) == [["a", 2, 2], ["b", 2, 3]]


def test_having_is_a_condition_as_where_is() -> None:
    """A number in HAVING is true when not 0 and NULL false, as in WHERE; a string there is a
    TYPE_MISMATCH before any row is read. `having count(*)` was compiled as its UInt64 and failed
    in Polars' filter at run time: an internal error, a traceback in the log."""
    records = [row(n, T0, s=k, i=n) for n, k in enumerate("abb")]
    assert run("select count(*) from table(t) having count(*)", records) == [[3]]
    assert run("select s, count(*) from table(t) group by s having count(*) - 1", records) == [["b", 2]]
    assert run("select s from table(t) group by s having 1", records) == [["a"], ["b"]]
    assert run("select s from table(t) group by s having 0", records) == []
    assert run("select s from table(t) group by s having null", records) == []
    with pytest.raises(ClientError) as e:
        compile_query("select s, max(s) as m from t group by s having m", lookup)
    assert e.value.code == ErrorCode.TYPE_MISMATCH and "max(s) is string" in str(e.value)


def test_bounded_aggregation_over_nothing() -> None:
    """As ClickHouse: count and sum 0, min and max their type's default (they were null under a
    type that is not nullable), avg null (nan), a nullable's aggregates null."""
    assert run("select count(*), sum(i), max(i) from table(t)") == [[0, 0, 0]]
    assert run("select count(*) from table(t)") == [[0]]
    assert run("select avg(i), min(s), min(f), max(b), min(ts), max(d), min(n), sum(n) from table(t)") == [
        [None, "", 0.0, False, "1970-01-01 00:00:00.000", "1970-01-01", None, None]]


def test_the_sum_of_a_nullable_is_null_where_every_value_is() -> None:
    """It was 0 (ClickHouse's sum of a Nullable is Nullable, NULL when no value was there)."""
    records = [row(0, T0, s="a", n=None, i=1), row(1, T0, s="a", n=None, i=2), row(2, T0, s="b", n=3, i=1),
               row(3, T0, s="b", n=None, i=1)]
    assert sorted(run("select s, sum(n), sum(i), sum(null) from t group by s", records)) == [
        ["a", None, 3, None], ["b", 3, 2, None]]
    plan = compile_query("select sum(n), sum(i) from t", lookup)
    assert [t for _, t in plan.header] == ["nullable(int64)", "int64"]


def test_aggregates_of_a_nullable_expression_where_every_value_is_null() -> None:
    """As ClickHouse's: sum, min, max and avg of a nullable expression (n + 1 of a nullable n) with
    no value are NULL, count 0. The expression was typed as not nullable: its sum answered 0, and
    its min and max over no row their type's default 0."""
    nulls = [row(0, T0, s="a", n=None, i=1), row(1, T0 + 1000, s="a", n=None, i=2),
             row(2, T0 + 2000, s="b", n=3, i=1), row(3, T0 + 3000, s="b", n=None, i=1)]
    aggs = "sum(n + 1), min(n + 1), max(n * 2), avg(n + 1), count(n + 1), sum(-n), min(abs(n))"
    assert run(f"select {aggs}, sum(i) from table(t)", nulls[:2]) == [[None, None, None, None, 0, None, None, 3]]
    assert run(f"select {aggs}, sum(i) from table(t)") == [[None, None, None, None, 0, None, None, 0]]
    assert sorted(run(f"select s, {aggs} from table(t) group by s", nulls)) == [
        ["a", None, None, None, None, 0, None, None], ["b", 4, 4, 6, 4.0, 1, -3, 3]]
    assert run(f"select window_start, {aggs} from tumble(table(t), 2s) group by window_start", nulls) == [
        [text(T0), None, None, None, None, 0, None, None], [text(T0 + 2000), 4, 4, 6, 4.0, 1, -3, 3]]
    # a global streaming aggregation's running result, before any value
    ex = compile_query(f"select {aggs} from t", lookup).executor()
    ex.tick(0)
    ex.feed(nulls[:1], False)
    assert ex.tick(GLOBAL_EMIT_MS) == [[None, None, None, None, 0, None, None]]


def test_nullable_expressions_give_their_nulls() -> None:
    records = [row(0, T0, n=None, i=1, b=True, s="x"), row(1, T0, n=2, i=1, b=False, s="x")]
    assert run("select n + 1, n = 2, if(b, n, 0), coalesce(n, 7), concat(n, s), n in (2), n or false from t",
               records) == [[None, None, None, 7, None, None, None], [3, True, 0, 2, "2x", True, True]]


def test_constant_outputs_give_one_row_per_input_row() -> None:
    assert run("select 1, 'x' from t", [row(0, T0), row(1, T0)]) == [[1, "x"], [1, "x"]]
    assert run("select i, i from t", [row(0, T0, i=3)]) == [[3, 3]]
    assert run("select count(*) from t where s ilike 'KEY%'", [row(0, T0, s="key")]) == [[1]]
    assert run("select s, count(*) from table(t) group by s") == []


def test_a_select_without_from_is_one_row_if_where_keeps_it() -> None:
    assert run("select 1, 'x' where 1 = 1") == [[1, "x"]]
    assert run("select 1 where 0") == run("select 1 where null") == run("select 'x' as a where 1 = 2") == []


def test_now_inside_an_aggregate() -> None:
    """The empty stage an aggregation starts from lacked the now() column: a 500 for valid SQL."""
    records = [row(0, T0, s="a", ts=text(T0)), row(1, T0, s="b", ts="2999-01-01 00:00:00")]
    assert run("select min(now()) > ts, count_distinct(now()), max(ts < now()), min(ts < now()) from t group by ts",
               records[:1]) == [[True, 1, True, True]]
    assert run("select count_distinct(now()), max(ts < now()) from table(t)") == [[0, False]]
    assert run("select s, count(*) from t where ts < now() group by s", records) == [["a", 1]]


def test_aliases_reach_where_and_the_other_select_items() -> None:
    """As in ClickHouse (a 400 before); a stream column of the same name wins, as GROUP BY's."""
    records = [row(0, T0, i=2, s="x"), row(1, T0, i=4, s="y")]
    assert run("select i * 2 as x, x + 1 from t where x > 5", records) == [[8, 9]]
    assert run("select raw:key1 as k1 from foo where k1 = 'a'",
               [raw(0, b'{"key1":"a"}'), raw(1, b'{"key1":"b"}')], raw_stream=True) == [["a"]]
    assert sorted(run("select s as k, count(*) as c, c * 10 from t group by k having c > 1", records + records)) == [
        ["x", 2, 20], ["y", 2, 20]]
    assert run("select i as s, s from t where s = 'y'", records) == [[4, "y"]]
    with pytest.raises(ClientError, match="cyclic aliases: x -> y -> x"):
        run("select x + 1 as y, y + 1 as x from t")
    with pytest.raises(ClientError, match="aggregates in WHERE"):
        run("select count(*) as c from t where c > 1")
    # each use copies the aliased tree: 2^n nodes from n aliases (16 held the broker 17 s, the review)
    doubling = "select 1 as a0, " + ", ".join(f"a{i} + a{i} as a{i + 1}" for i in range(16)) + " from t"
    with pytest.raises(ClientError, match="aliases expand to more than 4096 expression nodes"):
        compile_query(doubling, lookup)
    assert run("select 1 as a0, " + ", ".join(f"a{i} + a{i} as a{i + 1}" for i in range(8)) + " from t",
               [row(0, T0)]) == [[2**i for i in range(9)]]
    # the budget is the query's, and counts what expansion adds: 500 uses of a big alias (14 s, the
    # second review) are refused; a big expression of its own is not
    big = "i in (" + ", ".join(map(str, range(3000))) + ")"
    with pytest.raises(ClientError, match="aliases expand to more than 4096"):
        compile_query(f"select {big} as x, " + ", ".join(["x"] * 500) + " from t", lookup)
    ids = ", ".join(map(str, range(4200)))
    assert compile_query(f"select i as x from t where i in ({ids})", lookup).header == [("x", "int64")]


def test_bounded_queries_do_not_emit_on_tick() -> None:
    ex = compile_query("select count(*) from table(t)", lookup).executor()
    ex.tick(0)
    ex.feed([row(0, T0)], False)
    assert ex.tick(10_000) == [] and ex.finish() == [[1]]


def test_limit_ends_the_query() -> None:
    ex = compile_query("select i from t limit 3", lookup).executor()
    assert ex.feed([row(0, T0, i=0), row(1, T0, i=1)], False) == [[0], [1]] and not ex.done
    assert ex.feed([row(2, T0, i=2), row(3, T0, i=3)], False) == [[2]] and ex.done
    assert ex.feed([row(4, T0, i=4)], False) == []
    w = compile_query("select window_start, count(*) from tumble(t, 1s) group by window_start "
                      "limit 1", lookup).executor()
    assert len(w.feed([row(n, T0 + n * 1000) for n in range(5)], False)) == 1 and w.done


def test_counters() -> None:
    ex = compile_query("select i from t", lookup).executor()
    records = [row(0, T0 + 7, i=1), row(1, T0 + 9, i=2)]
    ex.feed(records, False)
    assert ex.scanned_rows == 2 and ex.scanned_bytes == sum(len(r.data) for r in records)
    assert ex.last_event_time_ms == T0 + 9


def test_window_state_limit_emits_the_oldest_windows_early() -> None:
    plan = compile_query("select window_start, s, count(*) from tumble(t, 10s) "
                         "group by window_start, s", lookup)
    ex = AggregateExecutor(plan, max_groups=4)
    first = ex.feed([row(n, T0, s=f"k{n}") for n in range(3)], False)
    assert first == []
    out = ex.feed([row(10 + n, T0 + 10_000, s=f"k{n}") for n in range(3)], False)
    # the watermark (10 s) closes [0,10s) anyway; then fill 2 windows over the limit
    assert len(out) == 3
    out = ex.feed([row(20 + n, T0 + 20_000 + n, s=f"x{n}") for n in range(3)]
                  + [row(30, T0 + 15_000, s="late?")], False)
    assert {r[0] for r in out} == {"2024-01-01 00:00:10.000"}     # emitted early, at the limit
    assert ex.state_rows() <= 4


def test_global_state_limit_fails_the_query() -> None:
    plan = compile_query("select s, count(*) from t group by s", lookup)
    ex = AggregateExecutor(plan, max_groups=10)
    with pytest.raises(ClientError, match="more than 10 groups"):
        ex.feed([row(n, T0, s=str(n)) for n in range(11)], False)


def test_negating_an_unsigned_value_gives_int64() -> None:
    assert run("select -length(s), -u, -(u + u) from t", [row(0, T0, s="abc", u=7)]) == [[-3, -7, -14]]


def test_unsigned_minus_is_signed_and_mixed_signs_wrap_as_clickhouse_int64() -> None:
    """ClickHouse: UInt - UInt is signed (`length(s) - 3` of "ab" is -1, `0 - 1` is -1); Int64 and
    UInt64 together are Int64, wrapping; negate(UInt64) is Int64. It wrapped to 2^64 - 1 before,
    and an unsigned value past 2^63 - 1 beside a signed one was null."""
    records = [row(0, T0, s="ab", u=1), row(1, T0, s="abcdef", u=9)]
    assert sorted(run("select length(s) - 3, u - 5, 0 - u, u - u, count(*) - 10 from t group by s, u",
                      records)) == [[-1, -4, -1, 0, -9], [3, 4, -9, 0, -9]]
    assert run("select s from t where length(s) - 3 > 0", records) == [["abcdef"]]
    big = [row(0, T0, i=2**63 - 1, u=2**64 - 1), row(1, T0, i=-3, u=2**63)]
    assert run("select u - i, i + u, i - u, u * -1, -u, u + 1, u - 1 from w", big) == [
        [-2**63, 2**63 - 2, -2**63, 1, 1, 0, -2],
        [-2**63 + 3, 2**63 - 3, 2**63 - 3, -2**63, -2**63, 2**63 + 1, 2**63 - 1]]


def test_numbers_outside_a_time_types_range_are_null_times() -> None:
    """7e15 s made Polars panic when the value was written as text; 1.7e15 s wrapped to -29161."""
    assert run("select to_datetime64(7e15), to_datetime64(1714564800000000), to_datetime(9e15), "
               "to_datetime64(1714564800), to_datetime64(-2208988800), to_datetime64(-2208988801), "
               "to_datetime(-1), to_datetime(4294967295), to_datetime(4294967296)") == [
        [None, None, None, "2024-05-01 12:00:00.000", "1900-01-01 00:00:00.000", None,
         None, "2106-02-07 06:28:15", None]]


def test_floats_as_text_as_clickhouse_to_string() -> None:
    """Polars wrote 1.0, 1e+20 and -0.0: `to_string(f) = '1'` never held."""
    records = [row(n, T0, f=f) for n, f in enumerate(
        (1.0, 1e20, -0.0, 1e16, 0.1, 1e21, 1e-7, 1e-6, 1.234e-6, 2.5e-5, 123456789.125, 1.5e300, -9.87e18))]
    assert [r[0] for r in run("select to_string(f) from w", records)] == [
        "1", "100000000000000000000", "-0", "10000000000000000", "0.1", "1e21", "1e-7", "0.000001", "0.000001234",
        "0.000025", "123456789.125", "1.5e300", "-9870000000000000000"]
    assert run("select concat('v=', f), f::string, to_string(to_float32(16777216)) from w where to_string(f) = '1'",
               records) == [["v=1", "1", "16777216"]]


def test_round_as_clickhouse() -> None:
    records = [row(0, T0, i=25, f=2.5, u=250)]
    assert run("select round(15, -1), round(-15, -1), round(14, -1), round(i, -1), round(i, 1), "
               "round(f), round(3.5), round(15.0, -1), round(i, -40), round(f, 400) from t",
               records) == [[20, -20, 10, 30, 25, 2.0, 4.0, 20.0, 0, 2.5]]


def test_round_to_more_digits_than_a_float_holds_leaves_it_unchanged() -> None:
    """Polars' round to many digits is not exact: round(1.5, 30) was 1.5000000000000002 and
    round(2.5, 24) 2.4999999999999996 (and round(x, 10**9), cut to 30 digits, the same) - a value
    that has no digit there to round must come back as it is."""
    records = [row(0, T0, f=1.5), row(1, T0, f=2.5), row(2, T0, f=123.456), row(3, T0, f=-0.1)]
    assert run("select round(f, 30), round(f, 24), round(f, 27), round(f, 9999999999), round(f, 2) from t",
               records) == [[1.5, 1.5, 1.5, 1.5, 1.5], [2.5, 2.5, 2.5, 2.5, 2.5],
                            [123.456, 123.456, 123.456, 123.456, 123.46], [-0.1, -0.1, -0.1, -0.1, -0.1]]


def test_json_access_is_json_extract_string() -> None:
    records = [raw(0, b'{"k":1.50}'), raw(1, b'{"k":null}'), raw(2, b'{"k": [1, 2]}'),
               raw(3, b'{"k":"a\\"b"}'), raw(4, b'{"k":true}'), raw(5, b"{}"), raw(6, b'{"k":""}'),
               raw(7, b'{"k":{"x": 1}}')]
    assert run("select raw:k from foo", records, raw_stream=True) == [
        ["1.5"], [""], ["[1,2]"], ['a"b'], ["true"], [""], [""], ['{"x":1}']]


def test_hop_with_many_windows_per_row() -> None:
    # (speed: 110 -> 4 ms per 1-row batch once a row's windows became one int_ranges list)
    sql = "select window_start, count(*) from hop(t, 10ms, 10s) group by window_start"
    ex = compile_query(sql, lookup).executor()
    out = [r for n in range(20) for r in ex.feed([row(n, T0 + n * 10)], False)]
    out += ex.finish()
    assert len(out) == 1000 + 19                # each row opens 1000 windows, 19 of them new
    counts = {r[0]: r[1] for r in out}
    assert counts[text(T0)] == 20 and counts[text(T0 - 10_000 + 10)] == 1
    assert sum(counts.values()) == 20 * 1000


def test_hop_explodes_a_big_batch_a_bounded_number_of_pairs_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan block is up to 50,000 records; hop(s, 1ms, 1s) puts each in 1000 windows. The block
    was exploded into all its (row, window) pairs at once: 50M rows, 2.2 GB of memory at once
    (5.8 GB with a string key) for one query. Now at most MAX_WINDOW_ROWS pairs at a time, the
    same answer."""
    sql = "select window_start, s, count(*), sum(i) from hop(table(t), 1ms, 1s) group by window_start, s"
    records = [row(n, T0 + n, s="ab"[n % 2], i=n) for n in range(2000)]
    ex = compile_query(sql, lookup).executor()
    heights: list[int] = []
    merge = ex._merge   # type: ignore[attr-defined]
    monkeypatch.setattr(ex, "_merge", lambda stage: (heights.append(stage.height), merge(stage)))
    out = ex.feed(records, False) + ex.finish()
    assert sum(heights) == 2000 * 1000 and max(heights) <= 262_144   # exec.MAX_WINDOW_ROWS
    got = {(r[0], r[1]): (r[2], r[3]) for r in out}
    assert len(got) == 2 * (2000 + 999) - 2 and sum(c for c, _ in got.values()) == 2000 * 1000
    assert got[(text(T0), "a")] == (500, sum(range(0, 1000, 2)))
    assert got[(text(T0 + 1000), "b")] == (500, sum(range(1001, 2000, 2)))


def test_a_batch_of_bad_records_is_read_in_one_lenient_pass() -> None:
    # (speed: 2000 bad records took ~1.3 s bisected down to one-row frames, ~5 ms in one pass)
    text_records = [raw(n, b"plain text %d" % n, ms=T0 + n) for n in range(2000)]
    bad_ints = [raw(n, b'{"i":"x","s":"a"}', ms=T0 + n) for n in range(2000)]
    ex = compile_query("select i, s, _tp_time from t", lookup).executor()
    assert ex.feed(text_records, False) == [] and ex.skipped_rows == 2000
    out = ex.feed(bad_ints, False)
    assert out[0] == [None, "a", "2024-01-01 00:00:00.000"] and len(out) == 2000
    assert out[-1] == [None, "a", "2024-01-01 00:00:01.999"]


def test_a_value_reads_the_same_whatever_shares_its_batch() -> None:
    """Non-string JSON in a string column (put by another door) was Polars' text alone in a batch
    and orjson's beside a record that is not JSON: `where s = '1'` matched in one and not the other."""
    records = [raw(0, b'{"s": {"a": 1}, "i": 1}'), raw(1, b'{"s": 1.0, "i": 2}'), raw(2, b'{"s": 1e20, "i": 3}')]
    alone = run("select s, i from t", records)
    assert run("select s, i from t", [*records, raw(3, b"not json")]) == alone
    assert run("select s, i from t", [raw(3, b"[]"), *records]) == alone
    # a record spanning lines beside them: read as if on one line (orjson's text before)
    assert run("select s, i from t", [raw(5, b'{\n"s": 2.0}'), *records]) == [["2", None], *alone]
    # a record of two JSON lines and an empty one: each is skipped, nothing shifts (the rows after
    # the first read a line too late before, the second review)
    ex = compile_query("select s, i from t", lookup).executor()
    assert ex.feed([raw(6, b'{"s":"a","i":1}\n{"s":"b","i":2}'), raw(7, b'{"s":"c","i":3}'), raw(8, b"")],
                   False) == [["c", 3]]
    assert ex.skipped_rows == 2
    # beside a record whose typed column holds what does not fit (the review): the same strings
    assert run("select s, i from t", [*records, raw(4, b'{"s": "x", "i": "seven"}')]) == [*alone, ["x", None]]
    assert [r[0] for r in alone] == ['{"a": 1}', "1", "100000000000000000000"]


def test_a_record_with_a_lone_surrogate_escape_is_not_json_in_every_batch() -> None:
    """`"\\ud800"` (a lone surrogate, put by another door) is no UTF-8 text: orjson refuses the
    record, so beside a record that is not JSON (the lenient read) it was skipped, but alone Polars
    read it, as a NUL (`"\\ud800x"` gave "\\x00x") - a corrupted value, and count(*) counted it
    while select showed no row for it beside a bad value. Now it is a record that is not JSON in
    every batch; a surrogate pair stays the character it spells."""
    lone = raw(0, b'{"s": "\\ud800x", "i": 1}')
    pair = raw(1, b'{"s": "\\ud83d\\ude00", "i": 2}')
    good = raw(2, b'{"s": "a", "i": 3}')
    for batch in ([lone, pair, good], [lone, pair, good, raw(3, b"not json")],
                  [lone, pair, good, raw(4, b'{"s": "x", "i": "seven"}')]):
        ex = compile_query("select s, i from t", lookup).executor()
        rows = ex.feed(batch, False)
        assert rows[:2] == [["\U0001f600", 2], ["a", 3]], (batch, rows)
        assert ex.skipped_rows == len(batch) - len(rows), (batch, rows)
        assert run("select count(*) from t", batch) == [[len(rows)]]
    assert run("select count(*) from t", [lone]) == [[0]]


def test_values_ingest_takes_read_the_same_from_another_door() -> None:
    """Ingest takes a whole float up to 2^53 (what pandas sends) and true/false for an integer
    column, true/false for a float one and 0/1 for a bool one (broker/rows/encode.py); the same JSON
    put through DIS or gRPC read as NULL there, so a row's value depended on the door that wrote it.
    What ingest refuses still reads as NULL (1.5, 2^53 + 2, 2 for a bool, 300 for a uint8)."""
    records = [raw(0, b'{"i": 3.0, "f": true, "b": 1, "u": 7.0}'), raw(1, b'{"i": true, "f": false, "b": 0}'),
               raw(2, b'{"i": -0.0, "b": true, "u": false}'),
               raw(3, b'{"i": 1.5, "f": "1", "b": 2, "u": 300.0}'), raw(4, b'{"i": 9007199254740994.0, "b": 1.0}')]
    assert run("select i, f, b, u from t", records) == [
        [3, 1.0, True, 7], [1, 0.0, False, None], [0, None, True, 0], [None, None, None, None],
        [None, None, None, None]]


def test_lenient_values() -> None:
    records = [raw(0, b'{"i":9223372036854775808,"u":256,"f":true,"b":1,"s":{"x":[1, 2]},"n":7}'),
               raw(1, b'{"i":-5,"u":3,"f":2,"b":false,"s":5,"n":2147483648}'), raw(2, b"[]"),
               raw(3, b'{"i":"bad"}')]
    ex = compile_query("select i, u, f, b, s, n from t", lookup).executor()
    # a string column holding another JSON value reads as the fast read writes it, batch or not;
    # true for a float and 1 for a bool read as ingest takes them
    assert ex.feed(records, False) == [[None, None, 1.0, True, '{"x": [1, 2]}', 7],
                                       [-5, 3, 2.0, False, "5", None],
                                       [None, None, None, None, None, None]]
    assert ex.skipped_rows == 1


def test_a_small_batch_over_many_groups_does_not_merge_the_whole_state() -> None:
    # (speed: a 1-row batch over 100k groups cost ~9 ms merged into the state each time, ~0.8 ms
    # now that partials wait until they are an eighth of the state or the state is read)
    ex = compile_query("select s, count(*), sum(i) from t group by s", lookup).executor()
    for b in range(10):
        ex.feed([row(n, T0, s=f"k{n}", i=n) for n in range(b * 10_000, (b + 1) * 10_000)], False)
    assert isinstance(ex, AggregateExecutor)
    merged, waiting = ex._state_height(), ex.pending_rows
    for n in range(100):
        ex.feed([row(n, T0, s=f"k{n}", i=1)], False)
    assert ex._state_height() == merged and ex.pending_rows == waiting + 100   # not merged per batch
    ex.tick(0)
    out = ex.tick(GLOBAL_EMIT_MS)
    assert len(out) == 100_000 and out[0] == ["k0", 2, 1] and out[-1] == ["k99999", 1, 99_999]


def test_pending_partials_do_not_reach_the_group_limit_early() -> None:
    plan = compile_query("select s, count(*), count_distinct(i) from t group by s", lookup)
    ex = AggregateExecutor(plan, max_groups=10)
    for n in range(20):   # the same 4 groups and values again and again: 8 rows of state
        ex.feed([row(n, T0, s=str(n % 4), i=n % 2 * 4 + n % 4)], False)
    assert ex.state_rows() == 8
    ex.tick(0)
    assert ex.tick(GLOBAL_EMIT_MS) == [["0", 5, 1], ["1", 5, 1], ["2", 5, 1], ["3", 5, 1]]


# -- integer semantics as ClickHouse's (found by a differential run against DuckDB) ---------------

def test_modulo_and_integer_division_round_towards_zero() -> None:
    records = [row(0, T0, i=-7, f=-7.5), row(1, T0, i=7, f=7.5)]
    assert run("select i % 2, i % -2, f % 2, i div 2, i div -2, f div 2 from w", records) == [
        [-1, -1, -1.5, -3, 3, -3], [1, 1, 1.5, 3, -3, 3]]
    assert run("select i from w where i % 2 = -1", records) == [[-7]]
    assert run("select count(*) from table(w) group by i % 3", records) == [[1], [1]]   # -1 and 1
    big = [row(0, T0, i=2**53 + 1, u=2**64 - 1), row(1, T0, i=2**63 - 1, u=7)]
    assert run("select i div 1, u div 2 from w", big) == [[2**53 + 1, 2**63 - 1], [2**63 - 1, 3]]


def test_modulo_and_integer_division_of_mixed_signs_past_int64() -> None:
    """A signed integer beside a uint64 past 2^63 - 1: the uint64 was cast to int64, as null, so
    `i % u` and `u div i` were null where the result fits (ClickHouse: -50 % (2^64 - 1) is -50);
    a quotient past int64 wraps, as ClickHouse's Int64 (`u div -1`)."""
    records = [row(0, T0, i=-50, u=2**64 - 1), row(1, T0, i=7, u=2**63)]
    assert run("select i % u, u % i, u div i, i div u, u div -1 from w", records) == [
        [-50, 15, -368934881474191032, 0, 1],
        [7, 1, 1317624576693539401, 0, -2**63]]
    assert run("select i from w where u % i = 1", records) == [[7]]
    # a divisor that is 0 on a row: NULL there (by the constant 0: ILLEGAL_DIVISION, test_plan)
    assert run("select i div u, u % i, i % u from w", [row(0, T0, i=0, u=0)]) == [[None, None, None]]


def test_float_comparisons_are_ieee_and_exact_beside_64_bit_integers() -> None:
    """ClickHouse compares an integer with a float exactly; Polars did it in float64, where
    2^64 - 1 is 2^64 and 2^63 - 1 is 2^63. NaN (0 / 0) equals nothing and orders with nothing;
    Polars held it equal to itself and above every number, so `x / y >= 1` kept 0 / 0."""
    records = [row(0, T0, i=2**63 - 1, u=2**64 - 1, f=0.0), row(1, T0, i=2**53, u=2, f=1.5)]
    assert run("select u = 18446744073709551615.0, u >= 1.8446744073709552e19, i >= 9223372036854775807.0, "
               "i = 9007199254740992.0, 9007199254740992.0 < i, u > 2.5, u <= 2.5, f < i from w", records) == [
        [False, False, False, False, True, True, False, True],
        [False, False, False, True, False, False, True, True]]
    assert run("select f / f = f / f, f / f != f / f, f / f > 1, f / f < 1, 0 / 0 = 0 / 0 from w", records) == [
        [False, True, False, False, False], [True, False, False, False, False]]
    assert run("select f from w where f / f >= 1", records) == [[1.5]]


def test_in_matches_an_integer_or_bool_exactly_as_its_comparison_does() -> None:
    """The list is converted to the operand's type, as ClickHouse's: a constant the type does not
    hold exactly matches nothing. A float in the list made the whole list float64, where 2^63 - 1
    is 2^63, and a bool read the list as Boolean, where 2 and -1 are true: `IN` held where `=` did not."""
    records = [row(0, T0, i=2**63 - 1, u=2**64 - 1, i8=-128), row(1, T0, i=1, u=2, i8=1)]
    assert run("select i in (9223372036854775808.0), i = 9223372036854775808.0, u in (18446744073709551616.0), "
               "i in (1.0, 2.5), i8 in (-128.0, 300), u in (2, 1e0) from w", records) == [
        [False, False, False, False, True, False], [False, False, False, True, False, True]]
    bools = [row(0, T0, b=True), row(1, T0, b=False), row(2, T0)]
    assert run("select b in (2), b in (-1), b = 2, b in (1.0), b in (0, 7), true in (2) from t", bools) == [
        [False, False, False, True, False, False], [False, False, False, False, True, False],
        [None, None, None, None, None, False]]


def test_comparisons_share_one_precedence_and_group_left_to_right_as_clickhouse() -> None:
    """=, !=, <, >, [NOT] IN and [NOT] LIKE are one level in ClickHouse, read left to right:
    `a = b < c` is `(a = b) < c`. sqlglot read it `a = (b < c)` (and `a != b IN (..)` as
    `a != (b IN (..))`), another answer. Expected values: ClickHouse's for the same text."""
    assert run("select 1 = 2 < 3, 0 = 0 < 1, 1 < 2 = 0, 3 = 3 in (1), 1 != 1 in (0), 2 > 1 > 0, "
               "0 < 1 = 1 < 2, 2 = 2 = 1, 1 = 0 = 0, 2 = 2 not in (2), 1 = (2 < 3), 0 = (0 < 1)") == [
        [True, False, False, True, True, True, True, True, True, True, True, False]]
    records = [row(0, T0, i=2, u=1, f=0.5, b=True), row(1, T0, i=1, u=3, f=2.0, b=True)]
    assert run("select i = u < f, i = (u < f), b = u > 2, b = (u > 2) from t", records) == [
        [True, False, False, False], [True, False, False, True]]
    with pytest.raises(ClientError, match="LIKE needs a string"):   # (s = 'abc') LIKE 'x', as ClickHouse
        run("select s = 'abc' like 'x' from t")


def test_integer_literals_past_int64_are_uint64() -> None:
    records = [row(n, T0, u=u) for n, u in enumerate((2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1))]
    assert run("select u from w where u < 9223372036854775808", records) == [[2**63 - 1]]
    assert run("select u from w where u = 18446744073709551615", records) == [[2**64 - 1]]
    assert run("select u from w where u in (9223372036854775808)", records) == [[2**63]]
    assert run("select -9223372036854775808, 18446744073709551615, - -9223372036854775808 from w",
               records[:1]) == [[-2**63, 2**64 - 1, 2**63]]
    # beside an unsigned column a non-negative literal is unsigned: uint64 stays uint64
    assert run("select u + 1, u * 1, 1 + u from w where u = 18446744073709551614", records) == [
        [2**64 - 1, 2**64 - 2, 2**64 - 1]]


def test_abs_of_a_signed_integer_is_its_unsigned_type() -> None:
    assert run("select abs(i8), abs(i), abs(f), abs(-3) from w", [row(0, T0, i8=-128, i=-2**63, f=-1.5)]) == [
        [128, 2**63, 1.5, 3]]


def test_uniq_counts_distinct_values() -> None:
    records = [row(n, T0, s=s) for n, s in enumerate("abcab")]
    assert run("select uniq(s), uniq_exact(s), count_distinct(s), count(distinct s) from table(w)", records) == [
        [3, 3, 3, 3]]
    with pytest.raises(ClientError, match="one argument"):
        run("select uniq(s, i) from table(w)")


def _timed(ex: object) -> list[float]:
    """The executor's clock, moved by hand: [ms]."""
    now = [0.0]
    ex.clock = lambda: now[0]  # type: ignore[attr-defined]
    return now


def _at(seconds: list[int]) -> list:
    return [row(s, T0, ts=f"2024-01-01 00:00:{s:02d}.000") for s in seconds]


WINDOWS_5S = "select window_start, count(*) from tumble(t, ts, 5s) group by window_start"


def test_a_replay_holds_the_watermark_until_every_backlog_is_read() -> None:
    """Partition 0's backlog (0-4 s, 15-19 s) read whole before partition 1's (5-14 s): while
    partition 1 is held, the watermark stays at what it has read, so none of its rows is late."""
    first, second = _at([*range(5), *range(15, 20)]), _at(list(range(5, 15)))
    ex = compile_query(WINDOWS_5S, lookup).executor()
    now = _timed(ex)
    for p in (0, 1):
        ex.hold(p)
        ex.follow(p)
    assert ex.feed(first[:5], False, 0) == []
    assert ex.feed(first[5:], False, 0, caught_up=True) == []    # partition 1 has read nothing yet
    assert ex.feed(second[:5], False, 1) == [["2024-01-01 00:00:00.000", 5]]   # it is at 9 s
    assert ex.feed(second[5:], False, 1, caught_up=True) == [["2024-01-01 00:00:05.000", 5]]   # at 14 s
    assert ex.late_rows == 0
    assert ex.tick(0) == []                         # both delivered a moment ago: they hold it at 14 s
    now[0] += IDLE_MS + 1                           # then both go quiet: the largest time seen counts
    assert ex.tick(0) == [["2024-01-01 00:00:10.000", 5]]
    assert ex.feed(_at([3]), False, 0) == [] and ex.late_rows == 1   # live rules again
    # without the hold, the same order makes partition 1's rows late
    ex = compile_query(WINDOWS_5S, lookup).executor()
    ex.feed(first, False)
    ex.feed(second, False)
    assert ex.late_rows == 10


def test_live_partitions_woken_in_any_order_make_no_row_late() -> None:
    """One ingest's rows spread over two partitions (0-4 s and 5-9 s, then 10-14 s and 15-19 s)
    and read back in the other order: the earlier partition's rows wait for nothing, none late."""
    ex = compile_query(WINDOWS_5S, lookup).executor()
    now = _timed(ex)
    ex.follow(0)
    ex.follow(1)
    assert ex.feed(_at(list(range(5, 10))), False, 1) == []       # partition 0 has not delivered yet
    assert ex.feed(_at(list(range(5))), False, 0) == []        # watermark: min(4, 9)
    now[0] += 100
    assert ex.feed(_at(list(range(15, 20))), False, 1) == []      # min(4, 19)
    assert ex.feed(_at(list(range(10, 15))), False, 0) == [      # min(14, 19)
        ["2024-01-01 00:00:00.000", 5], ["2024-01-01 00:00:05.000", 5]]
    assert ex.late_rows == 0
    # partition 0 goes quiet: after IDLE_MS it no longer holds the watermark back
    now[0] += IDLE_MS + 1
    assert ex.feed(_at([25]), False, 1) == [["2024-01-01 00:00:10.000", 5], ["2024-01-01 00:00:15.000", 5]]
    assert ex.feed(_at([12]), False, 0) == [] and ex.late_rows == 1   # and its older rows are late



def test_a_time_plus_or_minus_an_interval() -> None:
    """`now() - 1h`, the usual Timeplus filter, was "Unknown function [__interval]" (the shorthand's
    rewritten name) and `INTERVAL 1 HOUR` "not supported" outside a window's size. A time plus or
    minus a constant interval keeps the time's type; months and years go by the calendar; a date
    moves by whole days."""
    ms = T0 + 1_500   # 2024-01-01 00:00:01.500
    records = [row(0, ms, ts=text(ms), d="2024-01-31", i=1), row(1, ms, ts=text(ms - 7_200_000), d="2024-02-29", i=2)]
    sql = ("select ts + 1h, ts - interval 90 second, 1d + ts, ts + interval 500 millisecond, d + interval 1 month, "
           "d - 7d, interval 1 year + d, ts - interval 1 quarter from t where ts > to_datetime('2024-01-01 00:00:00') "
           "- interval 30 minute")
    assert run(sql, records) == [["2024-01-01 01:00:01.500", "2023-12-31 23:58:31.500", "2024-01-02 00:00:01.500",
                                  "2024-01-01 00:00:02.000", "2024-02-29", "2024-01-24", "2025-01-31",
                                  "2023-10-01 00:00:01.500"]]
    assert run("select i from t where _tp_time > now() - 1h", records) == []   # 2024 is more than an hour ago
    assert run("select i from t where _tp_time > now() - interval 1000 week", records) == [[1], [2]]
    assert run("select window_start + 1h, count() from tumble(t, 5s) group by window_start", records) == [
        [text(T0 + 3_600_000), 2]]
    # the longest spans run: 10**12 days was taken, and the time out of range panicked in Polars
    assert run("select ts + interval 1000 year, ts - 365242d from t", records[:1]) == [
        ["3024-01-01 00:00:01.500", "1024-01-02 00:00:01.500"]]   # 1,000 years back are 365,243 days


def test_a_constant_beside_now_is_one_value_per_row() -> None:
    """now() was a literal broadcast into each batch, which Polars keeps as a scalar column: a
    constant compared with a text of it (`'x' = to_string(now())`) came out as one value, not one
    per row, and the query failed at its first batch ('internal error: ShapeError')."""
    records = [row(0, T0, s="a", i=1), row(1, T0, s="b", i=2)]
    assert run("select i, 'x' = to_string(now()), to_string(1) = to_string(now()) from t", records) == [
        [1, False, False], [2, False, False]]
    assert run("select i from t where 'x' != to_string(now())", records) == [[1], [2]]
    assert run("select s, count(*), max('x' = to_string(now())) from t group by s", records) == [
        ["a", 1, False], ["b", 1, False]]


def test_a_datetime_plus_milliseconds_is_a_datetime64() -> None:
    """A `datetime` holds whole seconds; plus or minus an interval that is not whole seconds it is
    a datetime64(3), as ClickHouse's DateTime + INTERVAL n MILLISECOND. It stayed a `datetime` that
    held the milliseconds unseen: shown as 00:00:01 while it compared as 00:00:01.500."""
    records = [row(0, T0, ts=text(T0), i=1)]
    sql = ("select to_datetime(ts) + 1500ms, to_datetime(ts) + interval 500 millisecond = to_datetime(ts), "
           "to_string(to_datetime(ts) - interval 1 millisecond), to_datetime(ts) - interval 2000 millisecond, "
           "to_datetime(ts) + 2s from t")
    assert run(sql, records) == [["2024-01-01 00:00:01.500", False, "2023-12-31 23:59:59.999",
                                  "2023-12-31 23:59:58", "2024-01-01 00:00:02"]]
    assert [t for _, t in compile_query(sql, lookup).header] == [
        "datetime64(3, 'UTC')", "bool", "string", "datetime", "datetime"]


@pytest.mark.parametrize(("sql", "code", "says"), [
    ("select 1h from t", ErrorCode.UNSUPPORTED_SQL, "a window's size, or added to or subtracted from a time"),
    ("select i + 1h from t", ErrorCode.TYPE_MISMATCH, "i + 1h: an interval is added to a time, not to int64"),
    ("select 1h - ts from t", ErrorCode.TYPE_MISMATCH, "1h - ts: an interval is added to or subtracted from"),
    ("select 1h + 2h from t", ErrorCode.TYPE_MISMATCH, "an interval is added to or subtracted from a time"),
    ("select d + 1h from t", ErrorCode.TYPE_MISMATCH, "d + 1h: a date moves by whole days"),
    ("select ts - interval 1.5 hour from t", ErrorCode.TYPE_MISMATCH, "a constant whole number of its unit"),
    ("select ts - interval i hour from t", ErrorCode.TYPE_MISMATCH, "a constant whole number of its unit"),
    ("select ts - interval 1 fortnight from t", ErrorCode.UNSUPPORTED_SQL, "interval unit fortnight"),
    ("select ts - interval 99999999999999999999 year from t", ErrorCode.TYPE_MISMATCH, "at most 1,000 years"),
    ("select ts - interval 1001 year from t", ErrorCode.TYPE_MISMATCH, "at most 1,000 years"),
    ("select ts + 365243d from t", ErrorCode.TYPE_MISMATCH, "at most 1,000 years"),
    ("select ts - interval 12001 month from t", ErrorCode.TYPE_MISMATCH, "at most 1,000 years"),
    ("select i from t where now() - 1h", ErrorCode.TYPE_MISMATCH, "now() - 1h is datetime, a condition must be"),
    ("select i from t where ts + 90s", ErrorCode.TYPE_MISMATCH, "ts + 90s is datetime64(3), a condition"),
    ("select s from t group by s having max(ts) + 1h", ErrorCode.TYPE_MISMATCH, "max(ts) + 1h is datetime64(3)"),
])
def test_what_an_interval_cannot_be(sql: str, code: ErrorCode, says: str) -> None:
    with pytest.raises(ClientError) as err:
        compile_query(sql, lookup)
    assert err.value.code is code and says in err.value.message, err.value.message
    assert "__interval" not in err.value.message
