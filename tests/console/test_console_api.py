"""The console's JSON API against a real broker process: what the page reads (one list call with
every stream's partitions, bounds and counters; a stream's partitions and counters; record pages
and their cursors; lag per partition; sources; a query's NDJSON lines) and bad input answered 4xx
with the catalogue's Timeplus-style body `{"code", "message", "system", "reason"}`, never a 5xx."""
from __future__ import annotations

import base64
import http.client
import json
import uuid

import pytest

from .conftest import http as call


def _name() -> str:
    return f"api_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def stream(console_broker) -> str:
    name = _name()
    assert call(console_broker, "POST", "/console/api/streams", {"name": name, "partitions": 2})[0] == 201
    for i, text in enumerate(["one", "two", "three"]):
        status, body = call(console_broker, "POST", f"/console/api/streams/{name}/records",
                            {"data": text, "partition_id": "0" if i < 2 else 1})
        assert status == 201, body
    return name


def test_static_files_and_the_redirect(console_broker):
    conn = http.client.HTTPConnection(console_broker.host, console_broker.http_port, timeout=10)
    conn.request("GET", "/console")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 302 and resp.getheader("Location") == "/console/"
    for path, ctype in (("/console/", "text/html"), ("/console/app.js", "text/javascript"),
                        ("/console/style.css", "text/css"), ("/console/page-sql.js", "text/javascript")):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith(ctype), path
        csp = resp.getheader("Content-Security-Policy")
        assert "default-src 'self'" in csp and "style-src 'self';" in csp   # nothing from elsewhere
        assert "unsafe-inline" not in csp and "base-uri 'none'" in csp and "form-action 'self'" in csp
    conn.close()


def test_list_has_what_the_table_shows(console_broker, stream):
    status, body = call(console_broker, "GET", "/console/api/streams")
    assert status == 200 and body["project"] == "default"
    (row,) = [s for s in body["streams"] if s["name"] == stream]
    # sequence numbers and records held are strings: exact in JavaScript past 2^53
    assert (row["partitions"], row["ranges"], row["records"], row["put_records"]) == \
        (2, [["0", "2"], ["0", "1"]], "3", 3)
    assert row["put_bytes"] == len("onetwothree") and row["last_ts"] > 0 and row["typed"] is False
    names = [s["name"] for s in body["streams"]]
    assert names == sorted(names)


def test_list_is_paged_and_filtered_by_the_broker(console_broker):
    prefix = _name()
    for i in range(5):
        created = call(console_broker, "POST", "/console/api/streams", {"name": f"{prefix}_{i}", "partitions": 6})
        assert created[0] == 201
    status, body = call(console_broker, "GET", f"/console/api/streams?filter={prefix.upper()}&offset=1&limit=2")
    assert status == 200
    assert (body["matched"], body["offset"], body["limit"]) == (5, 1, 2) and body["total"] >= 5
    assert [s["name"] for s in body["streams"]] == [f"{prefix}_1", f"{prefix}_2"]
    # at most the first four partitions' ranges in the list; the stream page has them all
    assert body["streams"][0]["readable_partitions"] == 6 and len(body["streams"][0]["ranges"]) == 4
    status, body = call(console_broker, "GET", f"/console/api/streams?filter={prefix}&offset=10")
    assert status == 200 and body["streams"] == [] and body["matched"] == 5
    status, body = call(console_broker, "GET", f"/console/api/streams?filter={prefix}")
    assert [s["name"] for s in body["streams"]] == [f"{prefix}_{i}" for i in range(5)]


def test_describe_records_and_put(console_broker, stream):
    status, d = call(console_broker, "GET", f"/console/api/streams/{stream}")
    assert status == 200
    assert [(p["partition"], p["status"], p["first_seq"], p["next_seq"]) for p in d["partition_list"]] == \
        [(0, "ACTIVE", "0", "2"), (1, "ACTIVE", "0", "1")]   # sequence numbers as strings
    assert d["counters"]["put_records"] == [2, 1]
    status, page = call(console_broker, "GET", f"/console/api/streams/{stream}/records?partition=0&limit=1")
    assert status == 200 and [r["seq"] for r in page["records"]] == ["0"]
    assert base64.b64decode(page["records"][0]["data"]) == b"one"
    status, more = call(console_broker, "GET", f"/console/api/streams/{stream}/records?cursor={page['next_cursor']}")
    assert [base64.b64decode(r["data"]) for r in more["records"]] == [b"two"]
    status, after = call(console_broker, "GET", f"/console/api/streams/{stream}/records?partition=0"
                                                "&cursor_type=AFTER_SEQUENCE_NUMBER&seq=0")
    assert [r["seq"] for r in after["records"]] == ["1"]
    status, put = call(console_broker, "POST", f"/console/api/streams/{stream}/records",
                       {"data": "keyed", "partition_key": "k1"})
    assert status == 201 and put["partition"] in (0, 1) and put["seq"] in ("1", "2")
    status, d = call(console_broker, "GET", f"/console/api/streams/{stream}/records?partition={put['partition']}"
                                            f"&cursor_type=AT_SEQUENCE_NUMBER&seq={put['seq']}")
    assert d["records"][0]["partition_key"] == "k1"


def test_apps_lag_and_sources(console_broker, stream):
    app = _name()
    assert call(console_broker, "POST", "/console/api/apps", {"name": app})[0] == 201
    status, lag = call(console_broker, "GET", f"/console/api/apps/{app}/lag")
    assert status == 200 and lag == {"name": app, "streams": []}
    status, _ = call(console_broker, "POST", "/v2/default/checkpoints", {
        "app_name": app, "checkpoint_type": "LAST_READ", "stream_name": stream, "partition_id": "0",
        "sequence_number": "0"})
    assert status == 201
    status, lag = call(console_broker, "GET", f"/console/api/apps/{app}/lag")
    (s,) = lag["streams"]
    assert s["stream"] == stream and s["partitions"][0]["checkpoint"] == "0"
    assert s["partitions"][0]["lag"] == s["partitions"][0]["latest"]   # a string, like the sequence numbers
    apps = call(console_broker, "GET", "/console/api/apps")[1]["apps"]
    assert any(a["name"] == app and a["streams"] == [stream] for a in apps)
    assert call(console_broker, "DELETE", f"/console/api/apps/{app}")[0] == 204
    status, body = call(console_broker, "GET", "/console/api/sources")
    assert status == 200 and isinstance(body["sources"], list)


def test_query_lines(console_broker, stream):
    conn = http.client.HTTPConnection(console_broker.host, console_broker.http_port, timeout=30)
    conn.request("POST", "/console/api/queries", json.dumps({"sql": f"select raw from table({stream})"}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/x-ndjson"
    lines = [json.loads(line) for line in resp.read().splitlines()]
    conn.close()
    assert lines[0]["query"]["header"] == [{"name": "raw", "type": "string"}]
    rows = [row for line in lines if "rows" in line for row in line["rows"]]
    assert sorted(r[0] for r in rows) == sorted(["one", "two", "three", "keyed"])[:len(rows)] and len(rows) >= 3
    assert lines[-1] == {"end": {"status": "finished", "message": ""}}


@pytest.mark.parametrize("method, path, body, status, reason", [
    ("POST", "/console/api/streams", "not json", 400, "BAD_BODY"),
    ("POST", "/console/api/streams", {"partitions": 1}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams", {"name": "x", "partitions": "2"}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams", {"name": "x", "partitions": 0}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams", {"name": "bad name!", "partitions": 1}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams", {"name": "{stream}", "partitions": 1}, 400, "STREAM_EXISTS"),
    ("GET", "/console/api/streams?project=bad%20project", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams?limit=0", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams?limit=1001", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams?offset=-1", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams?offset=x", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams/nope_nope", None, 404, "STREAM_NOT_FOUND"),
    ("DELETE", "/console/api/streams/nope_nope", None, 404, "STREAM_NOT_FOUND"),
    ("GET", "/console/api/streams/{stream}/records", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams/{stream}/records?partition=7", None, 404, "PARTITION_NOT_FOUND"),
    ("GET", "/console/api/streams/{stream}/records?partition=x", None, 400, "INVALID_PARTITION_ID"),
    ("GET", "/console/api/streams/{stream}/records?partition=0&cursor_type=SIDEWAYS", None, 400,
     "INVALID_CURSOR_TYPE"),
    ("GET", "/console/api/streams/{stream}/records?partition=0&cursor_type=AT_SEQUENCE_NUMBER&seq=abc", None, 400,
     "INVALID_SEQUENCE"),
    ("GET", "/console/api/streams/{stream}/records?partition=0&cursor_type=AT_SEQUENCE_NUMBER&seq=99", None, 400,
     "SEQUENCE_OUT_OF_RANGE"),
    ("GET", "/console/api/streams/{stream}/records?partition=0&cursor_type=AT_TIMESTAMP", None, 400,
     "INVALID_REQUEST"),
    ("GET", "/console/api/streams/{stream}/records?partition=0&timestamp=12x", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams/{stream}/records?partition=0&limit=0", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams/{stream}/records?partition=0&limit=100000", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/streams/{stream}/records?cursor=garbage", None, 400, "INVALID_CURSOR"),
    ("POST", "/console/api/streams/{stream}/records", {"partition_id": "0"}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams/{stream}/records", {"data": 5, "partition_id": "0"}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams/{stream}/records", {"data": "x"}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams/{stream}/records", {"data": "x", "partition_id": "9"}, 404,
     "PARTITION_NOT_FOUND"),
    ("POST", "/console/api/streams/{stream}/records", {"data": "x", "partition_id": True}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/streams/nope_nope/records", {"data": "x", "partition_id": "0"}, 404, "STREAM_NOT_FOUND"),
    ("POST", "/console/api/apps", {"name": "no spaces allowed"}, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/apps/nope_nope/lag", None, 404, "APP_NOT_FOUND"),
    ("DELETE", "/console/api/apps/nope_nope", None, 404, "APP_NOT_FOUND"),
    ("GET", "/console/api/sources?project=bad%20p", None, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/sources/nope/start?project=bad%20p", None, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/sources/nope/start", None, 404, "SOURCE_NOT_FOUND"),
    ("POST", "/console/api/sources/nope/stop", None, 404, "SOURCE_NOT_FOUND"),
    ("POST", "/console/api/queries", {}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/queries", {"sql": "selec"}, 400, "SQL_SYNTAX"),
    ("POST", "/console/api/queries", {"sql": "select nope from {stream}"}, 400, "UNKNOWN_COLUMN"),
    ("POST", "/console/api/queries/nope/cancel", None, 404, "QUERY_NOT_FOUND"),
    # a project that is no project name: every route refuses it (the query routes ran `select 1` in
    # it and answered its rows, 200)
    ("POST", "/console/api/queries?project=bad%20p", {"sql": "select 1"}, 400, "INVALID_REQUEST"),
    ("POST", "/console/api/queries/nope/cancel?project=bad%20p", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/apps?project=bad%20p", None, 400, "INVALID_REQUEST"),
    ("GET", "/console/api/nothing", None, 404, "UNKNOWN_ROUTE"),
    ("PUT", "/console/api/streams", {}, 405, "METHOD_NOT_ALLOWED"),
    ("GET", "/console/nothing.js", None, 404, "UNKNOWN_ROUTE"),
    ("GET", "/console/../v2/default/streams", None, 404, "UNKNOWN_ROUTE"),
])
def test_bad_input_is_a_4xx_with_the_catalogue_row(console_broker, stream, method, path, body, status, reason):
    path = path.replace("{stream}", stream)
    if isinstance(body, dict):
        body = {k: v.replace("{stream}", stream) if isinstance(v, str) else v for k, v in body.items()}
    if isinstance(body, str):
        conn = http.client.HTTPConnection(console_broker.host, console_broker.http_port, timeout=10)
        conn.request(method, path, body.encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        got, answer = resp.status, json.loads(resp.read())
        conn.close()
    else:
        got, answer = call(console_broker, method, path, body)
    assert (got, answer["reason"]) == (status, reason), answer
    assert isinstance(answer["code"], int) and answer["message"]


def _raw(proc, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(proc.host, proc.http_port, timeout=10)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


@pytest.mark.parametrize("method, path, body, headers, status, reason", [
    # what a page of another site can send without a preflight: a text/plain or form body, or no body
    ("POST", "/console/api/streams", b'{"name": "csrf_a", "partitions": 1}', {"Content-Type": "text/plain"},
     400, "BAD_BODY"),
    ("POST", "/console/api/streams", b"name=csrf_b", {"Content-Type": "application/x-www-form-urlencoded"},
     400, "BAD_BODY"),
    ("POST", "/console/api/apps", b'{"name": "csrf_c"}', {}, 400, "BAD_BODY"),
    ("POST", "/console/api/sources/nope/stop", None, {}, 400, "BAD_BODY"),
    ("DELETE", "/console/api/streams/{stream}", None, {}, 400, "BAD_BODY"),
    ("POST", "/console/api/queries", b'{"sql": "select 1"}', {"Content-Type": "text/plain;charset=UTF-8"},
     400, "BAD_BODY"),
    # and what a browser marks as coming from another site
    ("POST", "/console/api/streams", b'{"name": "csrf_d", "partitions": 1}',
     {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403, "PERMISSION_DENIED"),
    ("DELETE", "/console/api/streams/{stream}", None,
     {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403, "PERMISSION_DENIED"),
])
def test_writes_a_page_of_another_site_could_send_are_refused(console_broker, stream, method, path, body, headers,
                                                              status, reason):
    got, answer = _raw(console_broker, method, path.replace("{stream}", stream), body, headers)
    assert (got, answer.get("reason")) == (status, reason), answer
    assert call(console_broker, "GET", f"/console/api/streams/{stream}")[0] == 200   # still there
    names = [s["name"] for s in call(console_broker, "GET", "/console/api/streams?filter=csrf_")[1]["streams"]]
    assert names == []


def test_every_write_route_refuses_cross_site_requests():
    from broker.api import console
    writes = [(method, path, h) for method, path, h, _ in console.ROUTES if method != "GET"]
    assert len(writes) >= 9 and all(getattr(h, "refuses_cross_site", False) for _, _, h in writes), writes


def test_same_origin_writes_and_cross_site_reads_are_served(console_broker):
    name = _name()
    got, _ = _raw(console_broker, "POST", "/console/api/streams", json.dumps({"name": name, "partitions": 1}).encode(),
                  {"Content-Type": "application/json; charset=utf-8", "Sec-Fetch-Site": "same-origin"})
    assert got == 201
    got, body = _raw(console_broker, "GET", f"/console/api/streams/{name}", None, {"Sec-Fetch-Site": "cross-site"})
    assert got == 200 and body["name"] == name   # a read: the browser does not let the other page see it
    got, _ = _raw(console_broker, "DELETE", f"/console/api/streams/{name}", None,
                  {"Content-Type": "application/json"})
    assert got == 204


def test_a_big_result_batch_is_split_into_lines_of_at_most_1000_rows(console_broker):
    from client import Client
    name = _name()
    with Client(console_broker.grpc_target) as c:
        c.create_stream(name, 1)
        for start in range(0, 2500, 500):
            c.put_records(name, [f"r{i}".encode() for i in range(start, start + 500)])
    conn = http.client.HTTPConnection(console_broker.host, console_broker.http_port, timeout=30)
    conn.request("POST", "/console/api/queries", json.dumps({"sql": f"select raw from table({name})"}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    lines = [json.loads(line) for line in resp.read().splitlines()]
    conn.close()
    sizes = [len(line["rows"]) for line in lines if "rows" in line]
    assert sum(sizes) == 2500 and max(sizes) <= 1000, sizes
    assert lines[-1]["end"]["status"] == "finished"


def test_a_client_gone_before_the_first_line_is_no_broker_error(console_broker, stream):
    """A query posted by a tab closed at once: the NDJSON headers met a closed transport, and
    aiohttp's ClientConnectionResetError escaped the handler, logged with a traceback and counted
    INTERNAL (the Timeplus door's create_query had the same). Its query ends all the same."""
    import socket
    import struct
    import time
    import urllib.request

    def metric(part: str) -> list[str]:
        text = urllib.request.urlopen(f"{console_broker.http_url}/metrics", timeout=10).read().decode()
        return [line for line in text.splitlines() if part in line and not line.startswith("#")]

    def internal() -> list[str]:
        return metric('reason="INTERNAL"')

    def answered() -> float:   # the console's requests, each counted once its handler is done
        return sum(float(line.split()[-1]) for line in metric('sluice_request_duration_seconds_count{door="console"'))

    before, logged, done = internal(), len(console_broker.stderr_lines), answered()
    body = json.dumps({"sql": f"select raw from {stream}"}).encode()
    for _ in range(10):
        gone = socket.create_connection((console_broker.host, console_broker.http_port), timeout=10)
        gone.sendall(b"POST /console/api/queries HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
        gone.close()
    deadline = time.monotonic() + 20
    while answered() < done + 10 and time.monotonic() < deadline:   # the handlers meet the closed connections
        time.sleep(0.1)
    assert answered() >= done + 10
    assert internal() == before
    assert not [line for line in console_broker.stderr_lines[logged:] if "ERROR" in line or "Traceback" in line], \
        console_broker.stderr_lines[logged:][:20]
