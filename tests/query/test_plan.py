"""compile_query: the SQL subset, what the plan says about it, and every error before any data."""
from __future__ import annotations

import pytest

from broker.errors import ClientError, ErrorCode
from broker.model import ColumnDef
from broker.query import compile_query
from broker.query.sqltext import rewrite
from tests.query.helpers import TP, lookup


def plan(sql: str):
    return compile_query(sql, lookup)


def error(sql: str) -> ErrorCode:
    with pytest.raises(ClientError) as info:
        plan(sql)
    return info.value.code


def test_the_pre_pass_leaves_strings_and_comments_alone() -> None:
    assert rewrite("select raw:a.b, 'x:y 5s' from hop(s, 2s, 1m) -- raw:z 5s") == (
        "select __json(raw, 'a.b'), 'x:y 5s' from hop(s, __interval(2000), __interval(60000))"
        " -- raw:z 5s")
    assert rewrite("select x::int, \"a:b\", `c:d` from s") == "select x::int, \"a:b\", `c:d` from s"


def test_the_seed_query() -> None:
    p = plan("select raw:key1 as k1, raw:key2::int as k2 from foo")
    assert p.stream == "foo" and not p.bounded and p.seek_ms is None and p.limit is None
    assert p.header == [("k1", "string"), ("k2", "int32")]
    assert p.raw_stream and p.needed == ("raw",)
    assert p.time_columns == {"eventTime": -1, "windowStart": -1, "windowEnd": -1}
    assert p.analysis["is_streaming"] and p.analysis["query_type"] == "SELECT"
    assert p.analysis["required_columns"][0]["column"] == "raw"
    assert p.analysis["result_columns"] == [{"column": "k1", "column_type": "string"},
                                            {"column": "k2", "column_type": "int32"}]


def test_star_lists_every_column_with_tp_time() -> None:
    p = plan("select * from t")
    assert [n for n, _ in p.header] == ["s", "i", "f", "b", "ts", "d", "j", "n", "u", "_tp_time"]
    assert p.time_columns["eventTime"] == 9 and not p.raw_stream


@pytest.mark.parametrize("sql, expected", [
    ("select i::int, f::float, i::string, s::bool, s::datetime, cast(i as double) from t",
     ["int32", "float32", "string", "bool", "datetime", "float64"]),
    ("select i + 1, i / 2, f * i, i % 3, -f, u + u from t",
     ["int64", "float64", "float64", "int64", "float64", "uint64"]),
    ("select i > 1 and not b or s like 'a%', s ilike 'A', i in (1, 2), n is null, n is not null "
     "from t", ["bool"] * 5),
    ("select lower(s), upper(s), length(s), abs(i), round(f, 1), to_string(i), now() from t",
     ["string", "string", "uint64", "uint64", "float64", "string", "datetime"]),   # abs: as ClickHouse
    # u - 1: UInt - UInt is signed (ClickHouse)
    ("select u + 1, 1 + u, u - 1, i + 1, i div 2, u div 2, f div 2, 9223372036854775808 from t",
     ["uint64", "uint64", "int64", "int64", "int64", "uint64", "int64", "uint64"]),
    ("select raw:a.b, j:x from foo, t", None),
])
def test_expression_types(sql: str, expected: list[str] | None) -> None:
    if expected is None:
        assert error(sql) == ErrorCode.UNSUPPORTED_SQL   # a join
        return
    assert [t for _, t in plan(sql).header] == expected


NB = "nullable(bool)"


@pytest.mark.parametrize("sql, expected", [
    # n is nullable(int32); each type's nullability as ClickHouse 18.16's toTypeName says, except
    # where noted (widths as this engine always gave them: `n % 2`, `n div 2` are 64-bit here; `bool`
    # for ClickHouse's UInt8)
    ("select n + 1, -n, n / 2, n div 2, n % 2, n * 1.5, n + u, u - n, -(n + u) from t",
     ["nullable(int64)", "nullable(int32)", "nullable(float64)", "nullable(int64)", "nullable(int64)",
      "nullable(float64)", "nullable(int64)", "nullable(int64)", "nullable(int64)"]),
    # comparisons and logic of a nullable operand; IS NULL never is NULL. `n or 0`: three-valued, as
    # newer ClickHouse's (18.16: UInt8). IN: NULL for a NULL operand (three-valued, the README), so
    # nullable here (ClickHouse: 0, a UInt8)
    ("select n = 1, n < i, n > f, b and n > 0, not n > 0, n or 0, n in (1, 2), n is null, i = 1 from t",
     [NB] * 7 + ["bool", "bool"]),
    ("select abs(n), abs(-n), round(n), round(n, -1), concat(n, 'x'), lower(if(b, s, null)), "
     "upper(if(b, s, null)), length(if(b, s, null)), if(b, s, null) like 'a%', concat(s, 'x'), abs(i) from t",
     ["nullable(uint32)", "nullable(uint32)", "nullable(int32)", "nullable(int32)", "nullable(string)",
      "nullable(string)", "nullable(string)", "nullable(uint64)", NB, "string", "uint64"]),
    # branches: nullable when any result is (an absent ELSE is NULL); not for a nullable condition,
    # whose NULL is false, as newer ClickHouse's (18.16's `if(n > 0, 1, 2)` was NULL, Nullable(UInt8))
    ("select if(b, n, 0), if(b, 1, null), multi_if(b, n, b, 2, 3), case when b then 1 end, "
     "case when b then i else n end, if(b, i, 2), if(n > 0, 1, 2), if(b, n, 1.5) from t",
     ["nullable(int64)"] * 5 + ["int64", "int64", "nullable(float64)"]),
    # coalesce: nullable only when every argument is
    ("select coalesce(n, 1), coalesce(n, f), coalesce(n, null), coalesce(null, n), coalesce(i, n), "
     "coalesce(n, n) from t",
     ["int64", "float64", "nullable(int32)", "nullable(int32)", "int64", "nullable(int32)"]),
    # a NULL operand (ClickHouse: Nullable(Nothing); here the type the operation would have)
    ("select null + 1, 1 = null, lower(null), i + null from t",
     ["nullable(int64)", NB, "nullable(string)", "nullable(int64)"]),
    # aggregates of a nullable expression: NULL when no value is; count and count_distinct 0, as
    # newer ClickHouse's uniq (18.16: Nullable(UInt64))
    ("select sum(n + 1), min(n + 1), max(-n), avg(n), avg(n + 1), count(n + 1), count_distinct(n), "
     "sum(i + 1), avg(i), sum(n) + 1 from t",
     ["nullable(int64)", "nullable(int64)", "nullable(int32)", "nullable(float64)", "nullable(float64)",
      "uint64", "uint64", "int64", "float64", "nullable(int64)"]),
    ("select n + 1 as k, count(*), max(k) > 1 from t group by k", ["nullable(int64)", "uint64", NB]),
    # casts: NULL where the operand is (ClickHouse's toString of a Nullable is Nullable(String))
    ("select to_string(n), n::float64, cast(n as string), to_int64(s), concat(to_string(n), s), "
     "cast(null as int64) from t",
     ["nullable(string)", "nullable(float64)", "nullable(string)", "int64", "nullable(string)",
      "nullable(int64)"]),
])
def test_nullability_propagates_as_clickhouse(sql: str, expected: list[str]) -> None:
    """Expressions of a nullable column were typed as if it were not (`n + 1` int64): the header
    said int64 for a column of NULLs, and sum(n + 1) of NULLs answered 0."""
    p = plan(sql)
    assert [t for _, t in p.header] == expected
    assert [c["column_type"] for c in p.analysis["result_columns"]] == expected


def test_nullable_branches_keep_the_exact_type() -> None:
    """A nullable datetime64 beside another: the first's type, its zone as written, nullable."""
    columns = (ColumnDef("nt", "nullable(datetime64(3, 'UTC'))"), ColumnDef("ts", "datetime64(3)"),
               ColumnDef("b", "bool"), TP)
    p = compile_query("select if(b, nt, ts), if(b, ts, nt), coalesce(nt, ts), coalesce(nt, nt), nt > ts from s",
                      lambda _: columns)
    assert [t for _, t in p.header] == ["nullable(datetime64(3, 'UTC'))", "nullable(datetime64(3))",
                                        "datetime64(3, 'UTC')", "nullable(datetime64(3, 'UTC'))", NB]


def test_table_seek_to_and_limit() -> None:
    p = plan("select * from table(t) limit 5 settings seek_to='earliest'")
    assert p.bounded and p.seek_to == "earliest" and p.seek_ms == 0 and p.limit == 5
    assert p.analysis["query_type"] == "SELECT" and not p.analysis["is_streaming"]
    assert plan("select * from t settings seek_to='2024-01-01T00:00:01Z'").seek_ms == 1704067201000
    assert plan("select * from t settings seek_to='2024-01-01 00:00:01.5'").seek_ms == 1704067201500
    assert plan("select * from t settings seek_to='latest'").seek_ms is None
    # a date with an offset is its midnight there (fromisoformat read the offset as the time of day)
    assert plan("select * from t settings seek_to='2024-01-02+05:00'").seek_ms == 1704135600000   # 01-01 19:00 UTC
    assert plan("select * from t settings seek_to='2024-01-01Z'").seek_ms == 1704067200000
    assert plan("select * from t settings max_threads=2").seek_to is None   # others: ignored


def test_windows() -> None:
    p = plan("select window_start, window_end, s, count(*) from tumble(t, 5s) group by window_start, s")
    assert p.window is not None and (p.window.size_ms, p.window.step_ms) == (5000, 5000)
    assert p.window.time_column == "_tp_time" and p.needed == ("s", "_tp_time")
    assert p.time_columns == {"eventTime": -1, "windowStart": 0, "windowEnd": 1}
    assert p.analysis["group_by_columns"] == ["s"] and p.analysis["has_aggr"]
    h = plan("select window_start, sum(i) from hop(table(t), ts, 2s, 10s) group by window_start")
    assert h.bounded and h.window is not None
    assert (h.window.kind, h.window.time_column, h.window.step_ms, h.window.size_ms) == (
        "hop", "ts", 2000, 10000)
    i = plan("select count() from tumble(t, interval 1 minute) group by window_start")
    assert i.window is not None and i.window.size_ms == 60000


def test_aggregate_types_and_names() -> None:
    p = plan("select count(*), count(n), sum(i), sum(f), sum(u), avg(i), min(s), max(ts), "
             "count_distinct(s), count(distinct i), sum(i) / count(*) as mean from t")
    assert [t for _, t in p.header] == ["uint64", "uint64", "int64", "float64", "uint64",
                                        "float64", "string", "datetime64(3)", "uint64", "uint64",
                                        "float64"]
    assert p.header[0][0] == "count(*)" and p.header[-1][0] == "mean"


@pytest.mark.parametrize("sql, code", [
    ("selec * from t", ErrorCode.SQL_SYNTAX),
    ("select from where", ErrorCode.SQL_SYNTAX),
    ("select from t", ErrorCode.SQL_SYNTAX),
    ("select -- nothing", ErrorCode.SQL_SYNTAX),
    ("select 1; select 2", ErrorCode.SQL_SYNTAX),
    ("select * from t limit -1", ErrorCode.SQL_SYNTAX),
    ("select * from t settings seek_to='yesterday'", ErrorCode.SQL_SYNTAX),
    ("select count(*) from tumble(t) group by window_start", ErrorCode.SQL_SYNTAX),
    ("select count(*) from hop(t, 10s, 2s) group by window_start", ErrorCode.SQL_SYNTAX),
    ("select count(*) from hop(t, 1ms, 10s) group by window_start", ErrorCode.UNSUPPORTED_SQL),
    ("select nope from t", ErrorCode.UNKNOWN_COLUMN),
    ("select * from t where nope > 1", ErrorCode.UNKNOWN_COLUMN),
    # a qualifier other than the stream's name or alias, as ClickHouse's Missing columns: it was
    # dropped, and nope.i read t's i
    ("select nope.i from t", ErrorCode.UNKNOWN_COLUMN),
    ("select i from t as x where t2.i > 1", ErrorCode.UNKNOWN_COLUMN),
    ("select other.t.i from t", ErrorCode.UNKNOWN_COLUMN),
    ("select count(*) from tumble(t, nope, 5s) group by window_start", ErrorCode.UNKNOWN_COLUMN),
    ("select window_start from t", ErrorCode.UNKNOWN_COLUMN),
    ("select frobnicate(s) from t", ErrorCode.UNKNOWN_FUNCTION),
    # an argument too many is an error, as ClickHouse's, not dropped: these answered round(f, 1)
    # and max(i) (sqlglot keeps the extra argument where the compiler did not look)
    ("select round(f, 1, 2) from t", ErrorCode.SQL_SYNTAX),
    ("select max(i, 100) from t", ErrorCode.SQL_SYNTAX),
    # arguments sqlglot's parser drops: length(s, 1) was length(s), and(b) was (b)
    ("select length(s, 1) from t", ErrorCode.SQL_SYNTAX),
    ("select and(s) from t", ErrorCode.SQL_SYNTAX),
    ("select * from t where or(b)", ErrorCode.SQL_SYNTAX),
    ("select s, min(s, 'a') from t group by s", ErrorCode.SQL_SYNTAX),
    ("select s + 1 from t", ErrorCode.TYPE_MISMATCH),
    # an integer % or div by the constant 0, as ClickHouse's: it was NULL on every row
    ("select i % 0 from t", ErrorCode.ILLEGAL_DIVISION),
    ("select i div 0 from t", ErrorCode.ILLEGAL_DIVISION),
    ("select * from t where u % -0 = 1", ErrorCode.ILLEGAL_DIVISION),
    ("select * from t where s > 1", ErrorCode.TYPE_MISMATCH),
    ("select * from t where s", ErrorCode.TYPE_MISMATCH),
    ("select i:key from t", ErrorCode.TYPE_MISMATCH),
    # not JSON access as the pre-pass writes it: sqlglot read `x :a` as x aliased a, so these
    # answered the whole record under the name a
    ("select foo.raw:a from foo", ErrorCode.SQL_SYNTAX),
    ("select raw :a from foo", ErrorCode.SQL_SYNTAX),
    ("select raw:a:b from foo", ErrorCode.SQL_SYNTAX),
    ("select raw:1a from foo", ErrorCode.SQL_SYNTAX),
    ("select lower(i) from t", ErrorCode.TYPE_MISMATCH),
    ("select sum(s) from t", ErrorCode.TYPE_MISMATCH),
    ("select * from t where i in ('a')", ErrorCode.TYPE_MISMATCH),
    # a time literal that does not parse is an error, as ClickHouse's `Cannot parse datetime`:
    # it was NULL, and the filter matched no row without a word
    ("select * from t where ts > '2024-01-01 10:00'", ErrorCode.TYPE_MISMATCH),
    ("select * from t where 'garbage' <= _tp_time", ErrorCode.TYPE_MISMATCH),
    ("select ts = '' from t", ErrorCode.TYPE_MISMATCH),
    ("select * from t where d in ('2024-01-01', 'x')", ErrorCode.TYPE_MISMATCH),
    ("select count(*) from tumble(t, s, 5s) group by window_start", ErrorCode.TYPE_MISMATCH),
    ("insert into t values (1)", ErrorCode.UNSUPPORTED_SQL),
    ("select * from t order by i", ErrorCode.UNSUPPORTED_SQL),
    # clauses that change the answer were dropped without a word: * EXCEPT listed i, LIMIT 1 BY
    # was LIMIT 1, WITH ROLLUP had no subtotals, PREWHERE kept every row
    ("select * except (i) from t", ErrorCode.UNSUPPORTED_SQL),
    ("select * replace (i + 1 as i) from t", ErrorCode.UNSUPPORTED_SQL),
    ("select s from t limit 1 by s", ErrorCode.UNSUPPORTED_SQL),
    ("select s from t limit 1 with ties", ErrorCode.UNSUPPORTED_SQL),
    ("select s, count(*) from t group by s with rollup", ErrorCode.UNSUPPORTED_SQL),
    ("select s, count(*) from t group by s with cube", ErrorCode.UNSUPPORTED_SQL),
    ("select s, count(*) from t group by s with totals", ErrorCode.UNSUPPORTED_SQL),
    ("select s, count(*) from t group by all", ErrorCode.UNSUPPORTED_SQL),
    ("select i from t prewhere i > 1", ErrorCode.UNSUPPORTED_SQL),
    ("select i from t sample 0.1", ErrorCode.UNSUPPORTED_SQL),
    ("select cast(s as int default 0) from t", ErrorCode.UNSUPPORTED_SQL),   # was NULL, not 0
    ("select cast(ts as string format 'YYYY') from t", ErrorCode.UNSUPPORTED_SQL),
    ("select * from t join t as u on t.i = u.i", ErrorCode.UNSUPPORTED_SQL),
    ("select * from (select * from t)", ErrorCode.UNSUPPORTED_SQL),
    ("select * from t where i in (select i from t)", ErrorCode.UNSUPPORTED_SQL),
    ("select s, count(*) from t", ErrorCode.UNSUPPORTED_SQL),
    ("select * from t where count(*) > 1", ErrorCode.UNSUPPORTED_SQL),
    ("select s from t where s like s", ErrorCode.UNSUPPORTED_SQL),
    ("select * from t union all select * from t", ErrorCode.UNSUPPORTED_SQL),
    ("select * from nowhere", ErrorCode.STREAM_NOT_FOUND),
    # a qualifier other than the workspace's database `default` names another workspace's stream
    ("select * from p1.t", ErrorCode.STREAM_NOT_FOUND),
    ("select * from table(p1.t)", ErrorCode.STREAM_NOT_FOUND),
    ("select count(*) from tumble(p1.t, 5s) group by window_start", ErrorCode.STREAM_NOT_FOUND),
    ("select * from c.default.t", ErrorCode.STREAM_NOT_FOUND),
    ("select * from `p1.t`", ErrorCode.STREAM_NOT_FOUND),
])
def test_errors(sql: str, code: ErrorCode) -> None:
    assert error(sql) == code


def test_the_workspace_database_qualifier_names_the_stream() -> None:
    for sql in ("select * from default.t", "select * from table(default.t)",
                "select count(*) from tumble(default.t, 5s) group by window_start"):
        assert plan(sql).stream == "t", sql
    # its columns qualified by the stream's name, the workspace database or the FROM alias
    for sql in ("select t.i from t", "select default.t.i from t", "select x.i from t as x",
                "select t.i, count(*) from tumble(t, 5s) group by t.i"):
        assert plan(sql).header[0] == ("i", "int64"), sql


def test_and_or_and_length_keep_their_usual_forms() -> None:
    for sql in ("select * from t where b and (i > 0)", "select * from t where (b) or (b)",
                "select and(b, i > 0), or(b, b, b), length (s) from t",
                "select case when b then 1 end and (b) from t", "select * from t where n is null and (b)"):
        assert plan(sql).stream == "t", sql


def test_select_without_from() -> None:
    p = plan("select 1")
    assert p.stream == "" and p.bounded and p.header == [("1", "int64")]
    assert p.executor().finish() == [[1]]
