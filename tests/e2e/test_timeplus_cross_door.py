"""One log, three doors (issue 8 point 2): a Timeplus stream of workspace W is the DIS stream of
project W with the same name. Rows the Timeplus door ingests are JSON records to the official DIS
SDK and the gRPC API; JSON records those doors put are rows to a running Timeplus query; a stream
created by DIS (no schema) is a `raw string` stream to the Timeplus door (issue8-plan.md
"Record format of a typed stream")."""
from __future__ import annotations

import base64
import json

import pytest
from conftest import make_dis_client
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkdis.v2 import (
    ConsumeRecordsRequest,
    CreateStreamReq,
    CreateStreamRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowCursorRequest,
    ShowStreamRequest,
)
from timeplus import Stream
from timeplus_sdk_helpers import QueryRun, bounded, create_stream, env, new_name, runs, wait_until, ws  # noqa: F401 (fixtures)

from client import Client

TP_TIME = "_tp_time"


@pytest.fixture
def dis(broker, ws):  # type: ignore[no-untyped-def]
    return make_dis_client(broker.http_url, project_id=ws)


def dis_read_all(dis, name: str, partitions: int = 1) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Every stored record's data, partition by partition, from TRIM_HORIZON."""
    out: list[bytes] = []
    for pid in range(partitions):
        cursor = dis.show_cursor(ShowCursorRequest(stream_name=name, partition_id=str(pid),
                                                   cursor_type="TRIM_HORIZON")).partition_cursor
        for _ in range(1000):
            got = dis.consume_records(ConsumeRecordsRequest(partition_cursor=cursor))
            if not got.records:
                break
            out += [base64.b64decode(r.data) for r in got.records]
            cursor = got.next_partition_cursor
    return out


def dis_put(dis, name: str, datas: list[bytes], **routing: str) -> None:  # type: ignore[no-untyped-def]
    resp = dis.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=name, records=[
        PutRecordsRequestEntry(data=base64.b64encode(d).decode(), **routing) for d in datas])))
    assert resp.failed_record_count == 0, resp


def test_timeplus_rows_are_json_records_to_the_dis_sdk(env, dis):
    name = new_name()
    stream = create_stream(env, name, [("name", "string"), ("n", "int64"), ("x", "float64"), ("ok", "bool"),
                                       ("time", "datetime64(3)"), ("d", "date"), ("j", "json"),
                                       ("maybe", "nullable(int32)")])
    stream.ingest(["name", "n", "x", "ok", "time", "d", "j", "maybe"], [
        ["a", 1, 1.5, True, "2024-05-01T12:00:00.123456", "2024-05-01", {"k": [1, 2]}, None],
        ["b", 2, -0.5, False, "2024-05-01 12:00:01.000", "2024-05-02", "text", 7],
    ])
    stream.ingest(payload='{"name":"c","n":3}', format="streaming")
    records = [json.loads(d) for d in dis_read_all(dis, name)]
    assert len(records) == 3
    for rec in records:
        assert isinstance(rec, dict)
        assert set(rec) == {"name", "n", "x", "ok", "time", "d", "j", "maybe", TP_TIME}, rec
        assert isinstance(rec[TP_TIME], str) and len(rec[TP_TIME]) == len("2024-05-01 12:00:00.000"), rec
    first, second, third = records
    assert {k: v for k, v in first.items() if k != TP_TIME} == {
        "name": "a", "n": 1, "x": 1.5, "ok": True, "time": "2024-05-01 12:00:00.123", "d": "2024-05-01",
        "j": {"k": [1, 2]}, "maybe": None}
    assert (second["time"], second["j"], second["maybe"]) == ("2024-05-01 12:00:01.000", "text", 7)
    assert (third["name"], third["n"], third["maybe"]) == ("c", 3, None)


def test_dis_put_records_appear_in_a_running_query(env, dis, runs):
    name = new_name()
    create_stream(env, name, [("name", "string"), ("n", "int32")])
    run = QueryRun(env, f"select name, n, _tp_time from {name}", batching=(10, 20))
    runs.append(run)
    run.start()
    dis_put(dis, name, [b'{"name":"dis-1","n":1}', b'{"name":"dis-2","n":2,"unknown":true}',
                        b'{"name":"dis-3","n":3,"_tp_time":"2024-05-01 00:00:00.000"}'])
    rows = run.wait_rows(3)
    assert [r[:2] for r in rows] == [["dis-1", 1], ["dis-2", 2], ["dis-3", 3]]
    assert rows[2][2] == "2024-05-01 00:00:00.000"   # a given _tp_time is kept
    assert rows[0][2] != "1970-01-01 00:00:00.000"   # a missing one is the record's timestamp


def test_grpc_put_records_appear_in_a_running_query(broker, env, ws, runs):
    name = new_name()
    create_stream(env, name, [("name", "string"), ("n", "int32")])
    run = QueryRun(env, f"select name, n from {name}", batching=(10, 20))
    runs.append(run)
    run.start()
    with Client(broker.grpc_target, project=ws, timeout=10) as grpc_client:
        grpc_client.put_records(name, [b'{"name":"g1","n":10}', (b'{"name":"g2","n":20}', "some-key")])
    assert run.wait_rows(2) == [["g1", 10], ["g2", 20]]


def test_a_running_query_reads_every_partition(env, dis, ws, runs):
    name = new_name()
    dis.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=name, partition_count=3)))
    run = QueryRun(env, f"select raw:p as p, raw:i::int as i from {name}", batching=(50, 20))
    runs.append(run)
    run.start()
    for pid in range(3):
        dis_put(dis, name, [json.dumps({"p": str(pid), "i": i}).encode() for i in range(4)], partition_id=str(pid))
    rows = run.wait_rows(12)
    assert sorted(map(tuple, rows)) == sorted((str(p), i) for p in range(3) for i in range(4))
    for pid in range(3):                           # each partition's rows keep their order
        assert [r[1] for r in rows if r[0] == str(pid)] == [0, 1, 2, 3]


def test_a_dis_stream_is_a_raw_stream_to_the_timeplus_door(env, dis):
    name = new_name()
    dis.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=name, partition_count=1)))
    listed = {s.name: s for s in Stream(env).list()}
    assert name in listed
    assert [(c.name, c.type) for c in listed[name].columns] == [("raw", "string"), (TP_TIME, "datetime64(3, 'UTC')")]
    dis_put(dis, name, [b'{"key1":"x","key2":5}', b"plain text", "ünï".encode()])
    run = bounded(env, f"select raw, raw:key1 as k1, raw:key2::int as k2 from table({name}) where raw like '{{%'")
    assert run.rows == [['{"key1":"x","key2":5}', "x", 5]]
    every = bounded(env, f"select raw from table({name})")
    assert every.rows == [['{"key1":"x","key2":5}'], ["plain text"], ["ünï"]]
    # raw/lines ingest into a schemaless stream writes the text itself as the record data
    Stream(env).name(name).ingest(payload="line-a\nline-b", format="lines")
    Stream(env).name(name).ingest(payload="whole body\n", format="raw")
    assert dis_read_all(dis, name)[3:] == [b"line-a", b"line-b", b"whole body\n"]


def test_deleting_the_timeplus_stream_deletes_its_records(env, dis):
    name = new_name()
    stream = create_stream(env, name, [("n", "int32")])
    stream.ingest(["n"], [[1], [2]])
    assert len(dis_read_all(dis, name)) == 2
    Stream(env).name(name).delete()
    with pytest.raises(ClientRequestException) as info:
        dis.show_stream(ShowStreamRequest(stream_name=name))
    assert info.value.error_code == "DIS.4301"
    # a new stream of the same name starts empty
    create_stream(env, name, [("n", "int32")])
    assert dis_read_all(dis, name) == []
    assert bounded(env, f"select n from table({name})").rows == []


def test_records_that_are_not_json_objects_are_skipped_and_counted(env, dis, runs):
    name = new_name()
    create_stream(env, name, [("n", "int32"), ("s", "string")])
    run = QueryRun(env, f"select n, s from {name}", batching=(10, 10))
    runs.append(run)
    run.start()
    dis_put(dis, name, [b"garbage", b"[1, 2]", b'"text"', b'{"n": 7, "s": "ok"}'])
    assert run.wait_rows(1) == [[7, "ok"]]
    dis_put(dis, name, [b'{"n": 8, "s": "next"}'])          # the query goes on
    assert run.wait_rows(2) == [[7, "ok"], [8, "next"]]

    def skipped() -> bool:
        metrics = run.named("metrics")
        return bool(metrics) and metrics[-1].get("skipped_rows") == 3
    wait_until(skipped, what="metrics counting the 3 skipped records")
    assert bounded(env, f"select n, s from table({name})").rows == [[7, "ok"], [8, "next"]]
    assert bounded(env, f"select count(*) from table({name})").rows == [[2]]   # the rows shown, not 5


def test_windows_over_partitions_read_one_after_another_lose_no_row(broker, env, dis, ws, runs):
    """A scan reads partition 0 whole, then partition 1; a replay's readers race each other. The
    rows of the partition read second were dropped as late once the first had moved the watermark
    past them. Partition 0 holds event times 0-4 s and 15-19 s, partition 1 5-14 s (DIS puts into
    a typed stream, so each row's place is known)."""
    import requests

    name = new_name()
    made = requests.post(f"{broker.http_url}/{ws}/api/v1beta2/streams", timeout=10, json={
        "name": name, "shards": 2, "columns": [{"name": "v", "type": "int64"}]})
    assert made.status_code == 201, made.text

    def rows(seconds: range) -> list[bytes]:
        return [json.dumps({"v": s, TP_TIME: f"2024-01-01 00:00:{s:02d}.000"}).encode() for s in seconds]

    dis_put(dis, name, rows(range(5)) + rows(range(15, 20)), partition_id="0")
    dis_put(dis, name, rows(range(5, 15)), partition_id="1")
    windows = "select window_start, count(*), sum(v) from tumble(%s, 5s) group by window_start"
    every = [[f"2024-01-01 00:00:{s:02d}.000", 5, sum(range(s, s + 5))] for s in (0, 5, 10, 15)]
    assert bounded(env, windows % f"table({name})").rows == every
    # a replay emits a window once every partition's backlog is past it: [15, 20) waits for more
    replay = QueryRun(env, windows % name + " settings seek_to='earliest'", batching=(100, 20))
    runs.append(replay)
    replay.start()
    assert replay.wait_rows(3) == every[:3]
    wait_until(lambda: any(m.get("scanned_rows") == 20 for m in replay.named("metrics")), what="all 20 rows read")
    assert all(m.get("late_rows") == 0 for m in replay.named("metrics"))
    dis_put(dis, name, rows(range(21, 22)), partition_id="1")   # watermark 21 s: [15, 20) is due
    assert replay.wait_rows(4) == every


TIMES = ["2024-05-01T12:00:00+05:00", "2024-05-01 12:00:00.250-02:30", "2024-05-01T12:30", "2024-05-01T12:30+01:00",
         "2024-05-01T12:00:00Z", "2024-05-01", 1714564800, 1714564800.5, 1714564800123,
         "2024-05-01 12:00:00,25", "2024-05-01T12:00:00,5+01:00"]   # ISO 8601's decimal comma


def test_a_time_reads_the_same_whether_ingested_or_put_by_dis(env, dis):
    """Ingest takes ISO 8601 with an offset or without seconds, and epoch numbers, for a time column
    (broker/rows/encode.py); the same object put through DIS read as NULL in that column (and, for
    _tp_time, as the append time): the query's parse knew neither offsets, `HH:MM` nor numbers. The
    same value must read the same through either door."""
    ingested = _times_both_ways(env, dis, TIMES)
    assert ingested[0] == ["2024-05-01 07:00:00.000", "2024-05-01 07:00:00", "2024-05-01 07:00:00.000"]


def _times_both_ways(env, dis, times: list[str]) -> dict[int, list[str]]:
    """Each time ingested and the same object put through DIS, into datetime64, datetime and
    _tp_time columns; asserts both doors' rows read the same, and returns them by position."""
    name = new_name()
    objects = [{"i": i, "t": v, "s": v, TP_TIME: v} for i, v in enumerate(times)]
    return _both_ways(env, dis, name, [("i", "int32"), ("t", "datetime64(3)"), ("s", "datetime")], objects,
                      f"select i, t, s, {TP_TIME} from table({name})")


def _both_ways(env, dis, name: str, columns: list[tuple[str, str]], objects: list[dict], sql: str) -> dict:
    """`objects` (each with a small int `i`) ingested into a new stream `name` and put through DIS
    with i + 100; `sql` selects i first. Asserts both doors' rows read the same; returns the
    ingested ones by i."""
    stream = create_stream(env, name, columns)
    stream.ingest(payload="\n".join(json.dumps(o) for o in objects), format="streaming")
    dis_put(dis, name, [json.dumps({**o, "i": o["i"] + 100}).encode() for o in objects])
    rows = bounded(env, sql).rows
    ingested = {r[0]: r[1:] for r in rows if r[0] < 100}
    put = {r[0] - 100: r[1:] for r in rows if r[0] >= 100}
    assert len(ingested) == len(put) == len(objects)
    assert put == ingested
    return ingested


HOUR_OFFSET_TIMES = ["2024-05-01 12:00:00+05", "2024-05-01T12:00:00.250-03", "2024-05-01 12:00+05",
                     "2024-05-01+05:00", "2024-05-01-0330", "2024-05-01Z"]


def test_a_time_with_an_hour_offset_or_a_dated_offset_reads_the_same_through_dis(env, dis):
    """An offset of hours only (`+05`, as PostgreSQL writes a timestamptz) and a date with an offset
    are taken by ingest; the same object put through DIS read NULL in a time column (and, for
    _tp_time, the append time): the query's parse knew only `+HH:MM` / `+HHMM` after a time."""
    ingested = _times_both_ways(env, dis, HOUR_OFFSET_TIMES)
    assert ingested[0] == ["2024-05-01 07:00:00.000", "2024-05-01 07:00:00", "2024-05-01 07:00:00.000"]
    assert ingested[3] == ["2024-04-30 19:00:00.000", "2024-04-30 19:00:00", "2024-04-30 19:00:00.000"]


def test_a_datetime_column_put_through_dis_holds_whole_seconds_as_ingest_stores_them(env, dis):
    """A `datetime` column keeps seconds: ingest stores 12:00:00.999 as 12:00:00. The same object
    put through DIS kept its milliseconds inside the engine (only its text hid them), so the value
    read back by the other door compared, grouped and converted otherwise: `s = '... 12:00:00'` was
    false, GROUP BY s made a group per millisecond under one shown time, to_datetime64(s) showed
    .999."""
    name = new_name()
    objects = [{"i": 0, "s": "2024-05-01 12:00:00.999"}, {"i": 1, "s": "2024-05-01T12:00:00.5+00:00"},
               {"i": 2, "s": 1714564800.7}, {"i": 3, "s": 1714564800250}]
    ingested = _both_ways(env, dis, name, [("i", "int32"), ("s", "datetime")], objects,
                          f"select i, s, to_datetime64(s), s = '2024-05-01 12:00:00' from table({name})")
    assert all(v == ["2024-05-01 12:00:00", "2024-05-01 12:00:00.000", True] for v in ingested.values()), ingested
    groups = bounded(env, f"select s, count(*), count_distinct(s) from table({name}) group by s").rows
    assert groups == [["2024-05-01 12:00:00", 8, 1]]


def test_a_json_value_nested_past_what_ingest_writes_reads_null_and_fails_no_query(env, dis):
    """Ingest refuses a json value nested past orjson's 255 levels (BAD_ROW); put through DIS, the
    query decoder wrote it with orjson and the JSONEncodeError (a TypeError) failed every query
    reading the column: 'internal error: TypeError', one record poisoning the stream's queries.
    It reads NULL, as a value ingest refuses does; the other rows are as before."""
    name = new_name()
    create_stream(env, name, [("i", "int32"), ("j", "json")])
    deep = "[" * 300 + "]" * 300
    dis_put(dis, name, [b'{"i": 1, "j": ' + deep.encode() + b"}", b'{"i": 2, "j": {"x": 1}}'])
    run = bounded(env, f"select i, j, j:x from table({name})")
    assert run.named("query")[-1]["status"] == "finished", run.named("query")[-1]
    assert run.rows == [[1, None, ""], [2, '{"x":1}', "1"]]
