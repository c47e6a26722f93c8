"""The Timeplus door end to end through the unmodified `timeplus` SDK (PyPI 1.4.1) against a real
broker process (issue 8, shared/spec/timeplus-api.md sections 2-5 and 9).

Covers the stream lifecycle (in a workspace and in the default one), ingest in the four formats
as the SDK sends them, bounded and streaming queries with a batching policy, the seed's
`raw:key` query, query management (list/get/cancel/delete), sqlanalyze and the SDK's dbapi.
Every blocking SDK call runs with a deadline (timeplus_sdk_helpers.QueryRun).
"""
from __future__ import annotations

import datetime as dt
import json
import re
import time
from typing import Any

import pytest
from swagger_client.rest import ApiException
from timeplus import Query, Stream
from timeplus.error import TimeplusAPIError
from timeplus_sdk_helpers import (  # noqa: F401 (fixtures)
    QueryRun,
    bounded,
    create_stream,
    env,
    env_for,
    in_thread_with_deadline,
    new_name,
    runs,
    wait_until,
    ws,
)

TP_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}")
PLUS_2H = dt.timezone(dt.timedelta(hours=2))
TYPED = [("name", "string"), ("n", "int64"), ("x", "float64"), ("ok", "bool"), ("time", "datetime64(3)")]


def tp_ms(text: str) -> int:
    """`YYYY-MM-DD HH:MM:SS.mmm` (UTC) -> epoch ms."""
    assert TP_TIME.fullmatch(text), text
    return int(dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC).timestamp() * 1000)


def api_error(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert isinstance(body, dict) and isinstance(body.get("code"), int) and isinstance(body.get("message"), str), body
    return body


# -- streams -----------------------------------------------------------------------------------

def test_stream_create_get_list_exist_delete_in_a_workspace(env):
    name = new_name()
    created = create_stream(env, name, [("name", "string"), ("n", "integer"), ("x", "double"),
                                        ("ok", "boolean"), ("time", "DateTime64(3)"), ("tags", "nullable(String)")])
    meta = created.metadata()
    assert meta.name == name and meta.mode == "append"
    assert isinstance(meta.description, str) and isinstance(meta.engine, str)

    got = Stream(env).name(name).get().metadata()
    cols = [(c.name, c.type) for c in got.columns]
    # aliases and mixed case are stored as the canonical names; the implicit _tp_time is listed
    assert cols == [("name", "string"), ("n", "int32"), ("x", "float64"), ("ok", "bool"),
                    ("time", "datetime64(3)"), ("tags", "nullable(string)"), ("_tp_time", "datetime64(3, 'UTC')")]
    assert got.name == name and got.mode == "append" and got.ttl == got.ttl_expression == ""

    listed = Stream(env).list()
    assert name in [s.name for s in listed]
    assert Stream(env).name(name).exist() is True

    Stream(env).name(name).delete()
    assert Stream(env).name(name).exist() is False
    assert name not in [s.name for s in Stream(env).list()]
    with pytest.raises(TimeplusAPIError):
        Stream(env).name(name).get()
    with pytest.raises(ApiException) as info:
        Stream(env).name(name).delete()
    assert 400 <= info.value.status < 500 and info.value.status == 404, (info.value.status, info.value.body)
    api_error(info.value)


def test_default_workspace_is_api_without_a_workspace(broker):
    plain = env_for(broker.http_url)            # .../api/v1beta2/...
    default = env_for(broker.http_url, "default")
    other = env_for(broker.http_url, new_name("ws"))
    name = new_name()
    create_stream(plain, name, [("v", "string")])
    try:
        assert Stream(default).name(name).exist() is True
        assert [c.name for c in Stream(default).name(name).get().metadata().columns] == ["v", "_tp_time"]
        assert Stream(other).name(name).exist() is False
        Stream(plain).name(name).ingest(["v"], [["hello"]])
        run = bounded(default, f"select v from table({name})")
        assert run.rows == [["hello"]]
    finally:
        Stream(default).name(name).delete()
    assert Stream(plain).name(name).exist() is False


def test_workspaces_are_separate_namespaces(broker):
    a, b = env_for(broker.http_url, new_name("wa")), env_for(broker.http_url, new_name("wb"))
    name = new_name()
    create_stream(a, name, [("s", "string")])
    create_stream(b, name, [("i", "int32"), ("j", "int32")])
    assert [c.name for c in Stream(a).name(name).get().metadata().columns] == ["s", "_tp_time"]
    assert [c.name for c in Stream(b).name(name).get().metadata().columns] == ["i", "j", "_tp_time"]
    Stream(a).name(name).ingest(["s"], [["only-in-a"]])
    assert bounded(b, f"select i from table({name})").rows == []
    Stream(a).name(name).delete()
    assert Stream(b).name(name).exist() is True
    Stream(b).name(name).delete()


def test_duplicate_create_is_a_400_with_code_57(env):
    name = new_name()
    create_stream(env, name, [("v", "string")])
    with pytest.raises(ApiException) as info:
        create_stream(env, name, [("v", "string")])
    assert info.value.status == 400
    body = api_error(info.value)
    assert body["code"] == 57 and name in body["message"]


# -- ingest: the four formats ------------------------------------------------------------------

def test_compact_ingest_coerces_values_and_fills_tp_time(env):
    name = new_name()
    stream = create_stream(env, name, TYPED)
    before = time.time_ns() // 1_000_000
    stream.ingest(["name", "n", "x", "ok", "time"], [
        # python datetimes as the SDK serializes them (isoformat(): T, microseconds, offset if aware)
        ["a", 1, 1.5, True, dt.datetime(2024, 5, 1, 12, 0, 0, 123456)],
        ["b", -(2**63), 0.25, False, dt.datetime(2024, 5, 1, 14, 0, 1, 999000, tzinfo=PLUS_2H)],
        ["c", 2**63 - 1, -3.0, True, "2024-05-01 12:00:02.500"],  # the Timeplus text form
    ])
    after = time.time_ns() // 1_000_000
    run = bounded(env, f"select name, n, x, ok, time, _tp_time from table({name})")
    assert run.header() == [("name", "string"), ("n", "int64"), ("x", "float64"), ("ok", "bool"),
                            ("time", "datetime64(3)"), ("_tp_time", "datetime64(3, 'UTC')")]
    assert [r[:5] for r in run.rows] == [
        ["a", 1, 1.5, True, "2024-05-01 12:00:00.123"],
        ["b", -(2**63), 0.25, False, "2024-05-01 12:00:01.999"],
        ["c", 2**63 - 1, -3.0, True, "2024-05-01 12:00:02.500"],
    ]
    for row in run.rows:   # _tp_time defaults to the ingest time (wall clock, generous bounds)
        assert before - 60_000 <= tp_ms(row[5]) <= after + 60_000, row


def test_a_datetime_column_with_a_zone_is_a_time_in_queries(env):
    """`datetime('Europe/Berlin')` (and `DateTime('UTC')`) is a type create takes and ingest
    checks; the query engine did not know it as a time (its type text carries the zone) and read it
    as an unknown type: comparing it with a time, tumble() over it, adding 1h or casting it to a
    number were 400 TYPE_MISMATCH."""
    name = new_name()
    stream = create_stream(env, name, [("i", "int32"), ("at", "datetime('Europe/Berlin')"), ("u", "DateTime('UTC')")])
    stream.ingest(["i", "at", "u"], [[1, "2024-05-01 12:00:00", "2024-05-01T12:00:00Z"], [2, 1714564801, 1714564801]])
    assert bounded(env, f"select i, at + 1h, to_int64(u), u = to_datetime(1714564801) from table({name}) "
                        "where at > '2024-05-01 12:00:00'").rows == [[2, "2024-05-01 13:00:01", 1714564801, True]]
    windows = bounded(env, f"select window_start, count(*) from tumble(table({name}), at, 1s) group by window_start")
    assert windows.rows == [["2024-05-01 12:00:00.000", 1], ["2024-05-01 12:00:01.000", 1]]


def test_compact_ingest_of_a_column_subset_gives_defaults(env):
    name = new_name()
    stream = create_stream(env, name, [("name", "string"), ("n", "int32"), ("maybe", "nullable(int32)")])
    stream.ingest(["n"], [[7]])
    run = bounded(env, f"select name, n, maybe from table({name})")
    assert run.rows == [["", 7, None]]


def test_streaming_ingest_spans_lines_concatenates_and_ignores_unknown_keys(env):
    name = new_name()
    stream = create_stream(env, name, [("time", "datetime64(3)"), ("data", "string"), ("n", "int32")])
    payload = ('{"time":"2024-05-01 12:00:01.000","data":"s1","n":1}\n'
               '{"time":"2024-05-01T12:00:02Z",\n "data":"s2",\n "n":2}'      # one object over three lines
               '{"time":"2024-05-01 12:00:03.000","data":"s3","n":3,"extra":"ignored"}'  # no separator
               '{"data":"s4"}\n')                                            # missing columns: defaults
    stream.ingest(payload=payload, format="streaming")
    run = bounded(env, f"select time, data, n from table({name})")
    assert run.rows[:3] == [["2024-05-01 12:00:01.000", "s1", 1], ["2024-05-01 12:00:02.000", "s2", 2],
                            ["2024-05-01 12:00:03.000", "s3", 3]]
    assert len(run.rows) == 4 and run.rows[3][1:] == ["s4", 0]


def test_raw_ingest_is_one_row_with_the_body_verbatim(env):
    name = new_name("raw")
    stream = create_stream(env, name, [("raw", "string")])
    body = "\nfirst line\nsecond line\n"
    stream.ingest(payload=body, format="raw")
    stream.ingest(payload='{"key1": "é ünïcode", "key2": 3}', format="raw")
    run = bounded(env, f"select raw from table({name})")
    assert run.rows == [[body], ['{"key1": "é ünïcode", "key2": 3}']]


def test_lines_ingest_is_one_row_per_line(env):
    name = new_name("lines")
    stream = create_stream(env, name, [("raw", "string"), ("other", "int32")])
    stream.ingest(payload='{"a":1,"b":"world"}\n{"a":2,"b":"hello"}\r\n\nthird\n', format="lines")
    run = bounded(env, f"select raw, other from table({name})")
    assert run.rows == [['{"a":1,"b":"world"}', 0], ['{"a":2,"b":"hello"}', 0], ["third", 0]]


def test_bounded_query_ends_with_a_final_query_event(env):
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    stream.ingest(["n"], [[i] for i in range(10)])
    run = bounded(env, f"select n from table({name}) where n >= 5", batching=(3, 1000))
    assert run.rows == [[5], [6], [7], [8], [9]]
    assert all(0 < b <= 3 for b in run.batches), run.batches
    assert run.events[-1][0] == "query", run.events[-3:]
    final = json.loads(run.events[-1][1])
    assert final["id"] == run.id and final["status"] == "finished"
    got = Query(env).id(run.id).get().metadata()   # a finished query is still listed until deleted
    assert got.status == "finished" and got.sql == f"select n from table({name}) where n >= 5"
    Query(env).id(run.id).cancel()                  # cancel of a finished query is a no-op (204)
    assert Query(env).id(run.id).get().metadata().status == "finished"


# -- streaming queries -------------------------------------------------------------------------

def test_streaming_query_with_batching_policy_returns_every_event_after_it_started(env, runs):
    name = new_name()
    stream = create_stream(env, name, [("name", "string"), ("n", "int64")])
    stream.ingest(["name", "n"], [["before", -1], ["before", -2]])   # FROM s starts at the newest record

    run = QueryRun(env, f"select name, n from {name}", batching=(5, 200))
    runs.append(run)
    run.start()
    assert run.header() == [("name", "string"), ("n", "int64")]
    assert run.metadata["sql"] == f"select name, n from {name}"
    assert {"eventTime", "windowStart", "windowEnd"} <= set(run.metadata["timeColumns"])

    expected: list[list[Any]] = []
    for chunk in range(4):                          # several requests, rows after the query started
        rows = [[f"r{chunk}", chunk * 100 + i] for i in range(7 if chunk % 2 else 4)]
        stream.ingest(["name", "n"], rows)
        expected += rows
    got = run.wait_rows(len(expected))
    assert got == expected
    assert all(0 < size <= 5 for size in run.batches), run.batches   # never over count, never empty

    run.cancel()
    run.wait_end(10)                                # cancel ends the SSE response
    assert run.snapshot() == expected               # nothing more, nothing from before the start
    assert Query(env).id(run.id).get().metadata().status == "canceled"


def test_streaming_query_sends_metrics_events(env, runs):
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    run = QueryRun(env, f"select n from {name}")
    runs.append(run)
    run.start()
    stream.ingest(["n"], [[1], [2], [3]])
    run.wait_rows(3)
    wait_until(lambda: bool(run.named("metrics")), what="a metrics event")
    metrics = run.named("metrics")[-1]
    assert {"count", "eps", "processing_time", "last_event_time", "response_time", "scanned_rows",
            "scanned_bytes"} <= set(metrics), metrics


def test_streaming_query_seek_to_earliest_replays_then_follows(env, runs):
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    stream.ingest(["n"], [[1], [2]])
    run = QueryRun(env, f"select n from {name} settings seek_to='earliest'", batching=(100, 50))
    runs.append(run)
    run.start()
    run.wait_rows(2)
    stream.ingest(["n"], [[3]])
    assert run.wait_rows(3) == [[1], [2], [3]]


def test_seed_query_raw_json_access_and_int_cast(env, runs):
    foo = new_name("foo")
    stream = create_stream(env, foo, [("raw", "string")])
    stream.ingest(payload='{"key1":"a","key2":1}\n{"key1":"b","key2":"22"}\n', format="lines")
    stream.ingest(payload='{"key1": "c", "key2": 333, "more": [1, 2]}', format="raw")

    historic = bounded(env, f"select raw:key1 as k1, raw:key2::int as k2 from table({foo})")
    assert historic.header() == [("k1", "string"), ("k2", "int32")]
    assert historic.rows == [["a", 1], ["b", 22], ["c", 333]]
    assert all(type(k1) is str and type(k2) is int for k1, k2 in historic.rows)

    run = QueryRun(env, f"select raw:key1 as k1, raw:key2::int as k2 from {foo}", batching=(1, 10))
    runs.append(run)
    run.start()
    stream.ingest(payload='{"key1":"d","key2":4}\n{"key2":5}', format="lines")
    assert run.wait_rows(2) == [["d", 4], ["", 5]]   # a missing key reads as ''

    # raw:key of a non-string value is its JSON text
    texts = bounded(env, f"select raw:key2 as k2 from table({foo})")
    assert [r[0] for r in texts.rows] == ["1", "22", "333", "4", "5"]


# -- query management --------------------------------------------------------------------------

def test_query_list_get_cancel_delete(env, runs):
    name = new_name()
    create_stream(env, name, [("n", "int32")])
    run = QueryRun(env, f"select n from {name}")
    runs.append(run)
    run.start()

    listed = {q.id: q for q in Query(env).list()}
    assert run.id in listed and listed[run.id].status == "running"
    got = Query(env).id(run.id).get().metadata()
    assert (got.id, got.sql, got.status) == (run.id, f"select n from {name}", "running")
    assert [(h.name, h.type) for h in got.result.header] == [("n", "int32")]
    assert got.time_columns is not None

    Query(env).id(run.id).cancel()
    run.wait_end(10)
    assert Query(env).id(run.id).get().metadata().status == "canceled"
    Query(env).id(run.id).cancel()                  # again: a no-op

    Query(env).id(run.id).delete()
    assert run.id not in {q.id for q in Query(env).list()}
    with pytest.raises(ApiException) as info:
        Query(env).id(run.id).get()
    assert info.value.status == 404
    api_error(info.value)


def test_queries_are_listed_per_workspace(broker, env, runs):
    name = new_name()
    create_stream(env, name, [("n", "int32")])
    run = QueryRun(env, f"select n from {name}")
    runs.append(run)
    run.start()
    other = env_for(broker.http_url, new_name("ws"))
    assert run.id not in {q.id for q in Query(other).list()}


def test_bad_sql_raises_api_exception_before_any_sse(env):
    name = new_name()
    create_stream(env, name, [("n", "int32")])
    for sql in ("selec n from " + name, f"select nope from {name}", "select n from no_such_stream_x"):
        def attempt(sql: str = sql) -> dict[str, Any]:
            try:
                Query(env).sql(sql).create()
                return {"ok": True}
            except ApiException as exc:
                return {"exc": exc}

        result = in_thread_with_deadline(attempt)
        assert "exc" in result, (sql, result)
        assert 400 <= result["exc"].status < 500, (sql, result["exc"].status)
        api_error(result["exc"])


def test_sqlanalyze(env):
    name = new_name()
    create_stream(env, name, [("n", "int32"), ("s", "string")])
    streaming = Query(env).sql(f"select n, s from {name} where n > 1").analyze()
    assert streaming.is_streaming is True and streaming.query_type == "SELECT"
    historic = Query(env).sql(f"select n from table({name})").analyze()
    assert historic.is_streaming is False and historic.query_type == "SELECT"
    with pytest.raises(ApiException) as info:
        Query(env).sql("select from where").analyze()
    assert 400 <= info.value.status < 500
    api_error(info.value)


# -- dbapi -------------------------------------------------------------------------------------

def test_dbapi_runs_a_bounded_query(broker, env, ws):
    import timeplus.dbapi

    name = new_name()
    create_stream(env, name, [("name", "string"), ("n", "int32")])
    Stream(env).name(name).ingest(["name", "n"], [["a", 1], ["b", 2], ["it's", 3]])
    host, port = broker.http_url.split("//")[1].rsplit(":", 1)

    def work() -> dict[str, Any]:
        out: dict[str, Any] = {}
        conn = timeplus.dbapi.connect(host=host, port=int(port), scheme="http", path=ws, password="k" * 60)
        cursor = conn.cursor()
        cursor.execute(f"select name, n, _tp_time from table({name}) where n >= %(low)s or name = %(who)s",
                       {"low": 2, "who": "a"})
        out["description"] = [d[:2] for d in cursor.description]
        out["rows"] = cursor.fetchall()
        first = cursor.query
        cursor.execute(f"select n from table({name}) where name = %(who)s", {"who": "it's"})
        out["one"] = cursor.fetchone()
        out["rest"] = cursor.fetchall()
        conn.close()                           # cancels the (finished) query: must not raise
        # the SDK never releases a query's SSE connection; hand them back to their pools so
        # they are closed there, not reported as unclosed sockets in a later test
        for query in (first, cursor.query):
            query._create_response.release_conn()
        return out

    out = in_thread_with_deadline(work)
    assert out["description"] == [("name", "string"), ("n", "int32"), ("_tp_time", "datetime64(3, 'UTC')")]
    rows = out["rows"]
    assert [(r.name, r.n) for r in rows] == [("a", 1), ("b", 2), ("it's", 3)]
    assert all(TP_TIME.fullmatch(r[2]) for r in rows)
    assert tuple(out["one"]) == (3,) and out["rest"] == []


def test_dbapi_without_a_path_uses_the_default_workspace(broker):
    """`connect()`'s default path is "", so the SDK's Environment sends `<address>//api/...`:
    the workspace segment is empty, which can only mean the default workspace."""
    import timeplus.dbapi

    name = new_name()
    default = env_for(broker.http_url)
    create_stream(default, name, [("n", "int32")])
    try:
        Stream(default).name(name).ingest(["n"], [[1], [2]])
        host, port = broker.http_url.split("//")[1].rsplit(":", 1)

        def work() -> dict[str, Any]:
            cursor = timeplus.dbapi.connect(host=host, port=int(port), scheme="http", password="k" * 60).cursor()
            cursor.execute(f"select n from table({name})")
            rows = [tuple(r) for r in cursor.fetchall()]
            cursor.query._create_response.release_conn()
            return {"rows": rows}

        out = in_thread_with_deadline(work)
        assert out["rows"] == [(1,), (2,)]
    finally:
        Stream(default).name(name).delete()


def test_streaming_query_with_limit_ends_after_limit_rows(env, runs):
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    run = QueryRun(env, f"select n from {name} where n % 2 = 0 limit 3", batching=(1, 10))
    runs.append(run)
    run.start()
    stream.ingest(["n"], [[i] for i in range(5)])
    stream.ingest(["n"], [[i] for i in range(5, 12)])
    run.wait_end()
    assert run.rows == [[0], [2], [4]]
    assert Query(env).id(run.id).get().metadata().status == "finished"


@pytest.mark.slow
def test_broker_sigterm_ends_a_running_query(start_broker):
    proc = start_broker()
    env = env_for(proc.http_url, "wsterm")
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    run = QueryRun(env, f"select n from {name}", batching=(1, 10))
    try:
        run.start()
        stream.ingest(["n"], [[1]])
        run.wait_rows(1)
        assert proc.stop(20) == 0          # graceful: the query does not hold the broker up
        assert run.ended.wait(10), "the SSE response did not end when the broker stopped"
        assert run.rows == [[1]]
    finally:
        run.close()


def test_seek_to_a_timestamp_replays_from_that_time(env, runs):
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    stream.ingest(["n"], [[1], [2]])
    mid = time.time_ns() // 1_000_000 + 1
    while time.time_ns() // 1_000_000 <= mid:   # the next append is stamped after `mid`
        time.sleep(0.001)
    stream.ingest(["n"], [[3]])
    iso = dt.datetime.fromtimestamp(mid / 1000, dt.UTC).isoformat(timespec="milliseconds")
    run = QueryRun(env, f"select n from {name} settings seek_to='{iso}'", batching=(10, 10))
    runs.append(run)
    run.start()
    stream.ingest(["n"], [[4]])
    assert run.wait_rows(2) == [[3], [4]]


def test_seek_to_a_timestamp_before_the_oldest_record_replays_everything(env, runs):
    """Timeplus replays from the earliest record it still has; an old timestamp is not an error."""
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    stream.ingest(["n"], [[1], [2]])
    run = QueryRun(env, f"select n from {name} settings seek_to='2020-01-01T00:00:00Z'", batching=(10, 10))
    runs.append(run)
    run.start()
    stream.ingest(["n"], [[3]])
    assert run.wait_rows(3) == [[1], [2], [3]]


def test_deleting_the_stream_ends_a_running_query(env, runs):
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    run = QueryRun(env, f"select n from {name}", batching=(1, 10))
    runs.append(run)
    run.start()
    stream.ingest(["n"], [[1]])
    run.wait_rows(1)
    Stream(env).name(name).delete()
    run.wait_end(10)
    assert Query(env).id(run.id).get().metadata().status == "failed"
    # the stream itself says why it ended: a last query object, as a bounded query's
    last_name, last = run.events[-1]
    assert last_name == "query", run.events[-3:]
    final = json.loads(last)
    assert final["status"] == "failed" and final["message"] == f"Stream [{name}] was deleted", final


# -- windows and global aggregation through the door ----------------------------------------------

def test_tumble_and_hop_windows_emit_exact_results_once_and_drop_late_rows(env, runs):
    """Event times given in the rows (`_tp_time`), so windows are exact whatever the machine's pace."""
    name = new_name()
    stream = create_stream(env, name, [("k", "string"), ("v", "int64")])
    tumble = QueryRun(env, f"select window_start, k, count(*), sum(v), avg(v), min(v), max(v) "
                           f"from tumble({name}, 5s) group by window_start, k", batching=(100, 10))
    hop = QueryRun(env, f"select window_start, window_end, count(*) from hop({name}, 2s, 4s) "
                        f"group by window_start", batching=(100, 10))
    runs += [tumble, hop]
    tumble.start()
    hop.start()
    t = "2026-01-01 00:00:%s"
    stream.ingest(["k", "v", "_tp_time"], [
        ["a", 1, t % "01.000"], ["b", 10, t % "02.000"], ["a", 3, t % "04.999"],
        ["a", 5, t % "03.000"],                      # out of order, its window still open: counted
        ["a", 7, t % "06.000"],                      # next window
        ["b", 20, t % "10.000"],                     # watermark 10 s: [0,5) and [5,10) are due
        ["a", 100, t % "02.500"],                    # late: [0,5) was emitted
        ["b", 30, t % "15.500"],                     # watermark 15.5 s: [10,15) is due
    ])
    rows = tumble.wait_rows(4)
    assert rows == [[t % "00.000", "a", 3, 9, 3.0, 1, 5], [t % "00.000", "b", 1, 10, 10.0, 10, 10],
                    [t % "05.000", "a", 1, 7, 7.0, 7, 7], [t % "10.000", "b", 1, 20, 20.0, 20, 20]]
    wait_until(lambda: any(m.get("late_rows") == 1 for m in tumble.named("metrics")), what="late_rows 1")
    # hop: 4 s windows every 2 s, aligned to the epoch. Each row is judged against the watermark
    # of the rows before it: [0,4) is emitted at 4.999 s with the rows at 1 s and 2 s, so the row
    # at 3 s only counts in [2,6); the row at 2.5 s comes after watermark 10 s: late for both.
    got = hop.wait_rows(7)
    assert [(row[0], row[2]) for row in got] == [
        ("2025-12-31 23:59:58.000", 1), (t % "00.000", 2), (t % "02.000", 3), (t % "04.000", 2),
        (t % "06.000", 1), (t % "08.000", 1), (t % "10.000", 1)]
    assert all(row[1] == _plus(row[0], 4000) for row in got)
    wait_until(lambda: any(m.get("late_rows") == 1 for m in hop.named("metrics")), what="hop late_rows 1")


def _plus(text: str, ms: int) -> str:
    when = dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f") + dt.timedelta(milliseconds=ms)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def test_global_aggregation_emits_its_running_result_while_rows_arrive(env, runs):
    name = new_name()
    stream = create_stream(env, name, [("v", "int64")])
    run = QueryRun(env, f"select count(*), sum(v) from {name}", batching=(100, 10))
    runs.append(run)
    run.start()
    stream.ingest(["v"], [[1], [2], [3]])
    assert run.wait_rows(1)[-1] == [3, 6]           # emitted within ~2 s of the rows
    stream.ingest(["v"], [[10]])
    wait_until(lambda: run.snapshot()[-1] == [4, 16], what="the running result after more rows")
    emitted = len(run.snapshot())
    time.sleep(4.5)                                 # no new rows: nothing new to emit
    assert len(run.snapshot()) == emitted
