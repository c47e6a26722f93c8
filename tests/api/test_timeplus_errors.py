"""The Timeplus door's refusals over raw HTTP (issue 8 "Done when", shared/spec/timeplus-api.md
sections 2-5): bad SQL, unknown streams and columns, type mismatches, malformed ingest bodies of
every format and oversize bodies are 4xx `{"code": int, "message": str, ...}` bodies (never SSE
bytes), a refused ingest writes nothing, `null` bodies on DELETE/cancel are accepted, unknown query
ids are 404; a hypothesis fuzz of the ingest, query, sqlanalyze and create routes finds no 5xx and
no hang. Plus the schema surviving a broker restart.
"""
from __future__ import annotations

import http.client
import json
import socket
import string
import time
import uuid
from typing import Any
from urllib.parse import quote

import pytest
from dis_http import Reply, addr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import ErrorCode

MIB = 1024 * 1024
TIMEOUT = 10.0   # seconds for any one exchange: a hang fails the test (socket.timeout), never the suite
KEY = {"X-Api-Key": "k" * 60}
TYPED = [{"name": "name", "type": "string"}, {"name": "n", "type": "int32"}, {"name": "x", "type": "float64"},
         {"name": "ok", "type": "bool"}, {"name": "time", "type": "datetime64(3)"}]


# -- helpers -----------------------------------------------------------------------------------

def new_name(prefix: str = "s") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def call(broker, method: str, path: str, body: bytes | str | dict | list | None = None,  # type: ignore[no-untyped-def]
         content_type: str | None = "application/json", timeout: float = TIMEOUT) -> Reply:
    """One request on a fresh connection. For a 200 text/event-stream answer only the bytes up to
    the first event are read (a streaming query never ends by itself); the connection is closed."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    headers = dict(KEY)
    if content_type is not None:
        headers["Content-Type"] = content_type
    conn = http.client.HTTPConnection(*addr(broker.http_url), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status == 200 and resp.headers.get_content_type() == "text/event-stream":
            raw = b""
            while b"\n\n" not in raw:
                line = resp.readline()
                if not line:
                    break
                raw += line
            return Reply(resp.status, resp.headers, raw)
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def tp_error(reply: Reply, status: int | None = None, code: ErrorCode | None = None) -> dict[str, Any]:
    """A Timeplus ErrorResponse: 4xx, JSON, {"code": int, "message": str, ...}, no SSE bytes."""
    assert 400 <= reply.status < 500, (reply.status, reply.raw[:300])
    if status is not None:
        assert reply.status == status, (reply.status, reply.raw[:300])
    assert reply.headers.get_content_type() == "application/json", reply.headers
    assert b"event:" not in reply.raw and not reply.raw.startswith(b"data:"), reply.raw[:300]
    body = json.loads(reply.raw)
    assert isinstance(body, dict), body
    assert isinstance(body.get("code"), int) and type(body["code"]) is int, body
    assert isinstance(body.get("message"), str) and body["message"], body
    if code is not None:
        assert body["code"] == code.timeplus_code, (code, body)
    return body


class Door:
    """Paths of one workspace."""

    def __init__(self, broker, ws: str) -> None:  # type: ignore[no-untyped-def]
        self.broker, self.ws = broker, ws
        self.base = f"/{ws}/api/v1beta2"

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
        return call(self.broker, method, self.base + path, body, **kw)

    def create(self, name: str, columns: list[dict[str, str]]) -> None:
        reply = self.call("POST", "/streams", {"name": name, "columns": columns})
        assert reply.status == 201, (reply.status, reply.raw[:300])

    def ingest(self, name: str, body: Any, fmt: str | None = None, content_type: str | None = "application/json",
               ) -> Reply:
        return self.call("POST", f"/streams/{name}/ingest" + (f"?format={fmt}" if fmt else ""), body,
                         content_type=content_type)

    def rows(self, sql: str) -> list[list[Any]]:
        """Run a bounded query to its end over raw HTTP; every data event's rows."""
        conn = http.client.HTTPConnection(*addr(self.broker.http_url), timeout=TIMEOUT)
        try:
            conn.request("POST", self.base + "/queries", body=json.dumps({"sql": sql}),
                         headers={**KEY, "Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, (resp.status, resp.read()[:300])
            text = resp.read().decode()   # a bounded query's body ends
        finally:
            conn.close()
        rows: list[list[Any]] = []
        for block in text.split("\n\n"):
            lines = [ln for ln in block.splitlines() if ln and not ln.startswith(":")]
            name = next((ln[6:].strip() for ln in lines if ln.startswith("event:")), "message")
            data = [ln[5:].lstrip(" ") for ln in lines if ln.startswith("data:")]
            if data and name == "message":
                rows += json.loads("\n".join(data))
        return rows


@pytest.fixture(scope="module")
def door(broker) -> Door:  # type: ignore[no-untyped-def]
    return Door(broker, new_name("ws"))


@pytest.fixture
def typed(door: Door) -> str:
    name = new_name()
    door.create(name, TYPED)
    return name


@pytest.fixture
def rawstream(door: Door) -> str:
    name = new_name("raw")
    door.create(name, [{"name": "raw", "type": "string"}])
    return name


# -- queries: refused before any SSE byte ------------------------------------------------------

@pytest.mark.parametrize("sql", ["selec n from {s}", "select n from {s} where", "select from", "select n,, from {s}",
                                 "select n from {s} limit x", "select 'unterminated from {s}", ""])
def test_bad_sql_is_a_4xx_error_body(door, typed, sql):
    reply = door.call("POST", "/queries", {"sql": sql.format(s=typed)})
    tp_error(reply)


def test_syntax_error_has_the_syntax_code(door, typed):
    tp_error(door.call("POST", "/queries", {"sql": f"selec n from {typed}"}), 400, ErrorCode.SQL_SYNTAX)


@pytest.mark.parametrize("body", [{}, {"sql": None}, {"sql": 5}, {"sql": ["select 1"]}, [], "null", "{",
                                  {"sql": "select n from {s}", "batching_policy": {"count": "ten"}},
                                  {"sql": "select n from {s}", "batching_policy": {"count": -1, "time_ms": 10}},
                                  {"sql": "select n from {s}", "batching_policy": "fast"}])
def test_malformed_query_bodies_are_4xx(door, typed, body):
    if isinstance(body, dict) and isinstance(body.get("sql"), str):
        body = {**body, "sql": body["sql"].format(s=typed)}
    tp_error(door.call("POST", "/queries", body))


@pytest.mark.parametrize("bounded", [False, True])
def test_unknown_stream_is_a_4xx_naming_it(door, bounded):
    missing = new_name("missing")
    src = f"table({missing})" if bounded else missing
    body = tp_error(door.call("POST", "/queries", {"sql": f"select * from {src}"}), code=ErrorCode.STREAM_NOT_FOUND)
    assert missing in body["message"]


def test_a_stream_of_another_workspace_is_unknown(broker, door, typed):
    other = Door(broker, new_name("ws"))
    tp_error(other.call("POST", "/queries", {"sql": f"select n from {typed}"}), code=ErrorCode.STREAM_NOT_FOUND)


@pytest.mark.parametrize("src", ["{ws}.{s}", "table({ws}.{s})", "tumble({ws}.{s}, 5s)", "`{ws}.{s}`",
                                 "table(x.default.{s})"])
def test_a_stream_named_with_another_workspace_is_unknown_not_this_one(broker, door, typed, src):
    """Each workspace has a stream of the name: one naming the other's (`ws.s`) reads neither -
    never this workspace's `s` in the other's place; `default.s` (the workspace's database) is its own."""
    other = Door(broker, new_name("ws"))
    other.create(typed, TYPED)
    assert other.ingest(typed, {"columns": ["name"], "data": [["mine"]]}).status == 200
    assert door.ingest(typed, {"columns": ["name"], "data": [["theirs"]]}).status == 200
    sql = f"select name from {src.format(ws=door.ws, s=typed)}"
    if "tumble" in sql:
        sql = f"select count(*) from {src.format(ws=door.ws, s=typed)} group by window_start"
    body = tp_error(other.call("POST", "/queries", {"sql": sql}), code=ErrorCode.STREAM_NOT_FOUND)
    assert typed in body["message"]
    assert other.rows(f"select name from table(default.{typed})") == [["mine"]]


@pytest.mark.parametrize("ws", ["x" * 65, quote("é"), "a%20b", "a.b"])
@pytest.mark.parametrize("method, path, body", [
    ("POST", "/queries", {"sql": "select 1"}), ("GET", "/queries", None), ("POST", "/sqlanalyze", {"sql": "select 1"}),
    ("GET", "/sources", None), ("GET", "/sources/x", None), ("GET", "/streams", None),
])
def test_a_workspace_that_is_no_project_name_is_a_400_on_every_route(broker, ws, method, path, body):
    """A workspace the streams routes (and DIS, gRPC, the console) refuse as a project name was taken
    by the query and source routes: `select 1` ran in workspace `é` (200, an SSE stream), the query
    and source lists answered [] for it, where /streams said 400."""
    body = tp_error(call(broker, method, f"/{ws}/api/v1beta2{path}", body), status=400,
                    code=ErrorCode.INVALID_REQUEST)
    assert "project must be" in body["message"]


@pytest.mark.parametrize("sql", ["select nope from {s}", "select n from {s} where nope > 1",
                                 "select n, upper(nope) as u from {s}", "select n from table({s}) where nope = 'x'"])
def test_unknown_column_is_a_4xx_naming_it(door, typed, sql):
    body = tp_error(door.call("POST", "/queries", {"sql": sql.format(s=typed)}), code=ErrorCode.UNKNOWN_COLUMN)
    assert "nope" in body["message"]


def test_unknown_function_is_a_4xx(door, typed):
    body = tp_error(door.call("POST", "/queries", {"sql": f"select no_such_fn(n) from {typed}"}),
                    code=ErrorCode.UNKNOWN_FUNCTION)
    assert "no_such_fn" in body["message"]


@pytest.mark.parametrize("sql", ["select name + 1 from {s}", "select lower(n) from {s}",
                                 "select n from {s} where ok + name", "select abs(name) from {s}"])
def test_type_mismatch_is_a_4xx(door, typed, sql):
    tp_error(door.call("POST", "/queries", {"sql": sql.format(s=typed)}), code=ErrorCode.TYPE_MISMATCH)


def test_sqlanalyze_refuses_what_queries_refuse(door, typed):
    tp_error(door.call("POST", "/sqlanalyze", {"sql": f"selec n from {typed}"}), code=ErrorCode.SQL_SYNTAX)
    tp_error(door.call("POST", "/sqlanalyze", {"sql": f"select nope from {typed}"}), code=ErrorCode.UNKNOWN_COLUMN)
    tp_error(door.call("POST", "/sqlanalyze", {}))


# -- queries: ids ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,suffix,body", [("GET", "", None), ("POST", "/cancel", "null"),
                                                 ("DELETE", "", "null")])
def test_unknown_query_id_is_404(door, method, suffix, body):
    qid = str(uuid.uuid4())
    reply = door.call(method, f"/queries/{qid}{suffix}", body)
    assert qid in tp_error(reply, 404, ErrorCode.QUERY_NOT_FOUND)["message"]


def test_null_bodies_on_cancel_and_delete_are_accepted(door, typed):
    first = door.call("POST", "/queries", {"sql": f"select n from {typed}"})   # streaming: still running
    assert first.status == 200 and first.raw.startswith(b"event: query\n"), first.raw[:200]
    qid = json.loads(first.raw.split(b"data: ", 1)[1].split(b"\n", 1)[0])["id"]
    assert door.call("POST", f"/queries/{qid}/cancel", "null").status == 204
    assert door.call("POST", f"/queries/{qid}/cancel", "null").status == 204   # a no-op now
    assert json.loads(door.call("GET", f"/queries/{qid}").raw)["status"] == "canceled"
    assert door.call("DELETE", f"/queries/{qid}", "null").status == 204
    tp_error(door.call("GET", f"/queries/{qid}"), 404)


def test_client_disconnect_ends_a_streaming_query(door, typed):
    reply = door.call("POST", "/queries", {"sql": f"select n from {typed}"})   # call() closes after event 1
    qid = json.loads(reply.raw.split(b"data: ", 1)[1].split(b"\n", 1)[0])["id"]
    deadline = time.monotonic() + 15
    status = "running"
    while time.monotonic() < deadline:
        got = door.call("GET", f"/queries/{qid}")
        if got.status != 200 or json.loads(got.raw)["status"] != "running":
            status = "gone" if got.status == 404 else json.loads(got.raw)["status"]
            break
        time.sleep(0.1)
    assert status != "running", "the query kept running after its client went away"


def test_a_client_gone_before_the_first_event_is_no_broker_error(start_broker):
    """A client that sends a query and goes away at once (killed, timed out, Ctrl-C in
    Query.create()): the SSE headers met a closed transport, and aiohttp's ClientConnectionResetError
    escaped the handler, logged as an unhandled error with a traceback and counted INTERNAL. A
    consumer going away is not the broker's error (the tail door already knew); its query ends."""
    import struct
    import urllib.request

    broker = start_broker()
    door = Door(broker, new_name("ws"))
    name = new_name()
    door.create(name, TYPED)
    logged = len(broker.stderr_lines)
    for sql in (f"select n from {name}", f"select n from table({name})"):
        for _ in range(5):
            body = json.dumps({"sql": sql}).encode()
            gone = socket.create_connection(addr(broker.http_url), timeout=TIMEOUT)
            gone.sendall(b"POST %s/queries HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"X-Api-Key: %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (door.base.encode(), KEY["X-Api-Key"].encode(), len(body), body))
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
            gone.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        listed = json.loads(door.call("GET", "/queries").raw)
        if len(listed) == 10 and not any(q["status"] == "running" for q in listed):
            break
        time.sleep(0.1)
    assert len(listed) == 10 and not any(q["status"] == "running" for q in listed), listed
    metrics = urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=TIMEOUT).read().decode()
    assert 'reason="INTERNAL"' not in metrics
    assert not [line for line in broker.stderr_lines[logged:] if "ERROR" in line or "Traceback" in line], \
        broker.stderr_lines[logged:][:20]


def test_an_http_1_0_client_gets_its_query_close_delimited(door, typed):
    """The SSE answer was always chunked (urllib3 needs it), and aiohttp refuses chunked encoding
    to an HTTP/1.0 client (nginx's default proxy_http_version, curl -0): RuntimeError, a 500
    INTERNAL with a traceback for every query. HTTP/1.0 gets the events with the body delimited by
    the connection's close; HTTP/1.1 stays chunked."""
    assert door.ingest(typed, GOOD).status == 200
    body = json.dumps({"sql": f"select name, n from table({typed})"}).encode()
    with socket.create_connection(addr(door.broker.http_url), timeout=TIMEOUT) as conn:
        conn.sendall(b"POST %s/queries HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"X-Api-Key: %s\r\nContent-Length: %d\r\n\r\n%s"
                     % (door.base.encode(), KEY["X-Api-Key"].encode(), len(body), body))
        raw = b""
        while chunk := conn.recv(65536):   # the bounded query's end closes the connection
            raw += chunk
    head, _, events = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), raw[:300]
    assert b"transfer-encoding" not in head.lower() and b"text/event-stream" in head, head
    assert b'data: [["ok",1]]' in events and events.count(b"event: query") == 2, events[-300:]


def test_delete_stream_with_null_body(door):
    name = new_name()
    door.create(name, TYPED)
    assert door.call("DELETE", f"/streams/{name}", "null").status == 204
    tp_error(door.call("GET", f"/streams/{name}"), 404, ErrorCode.STREAM_NOT_FOUND)
    tp_error(door.call("DELETE", f"/streams/{name}", "null"), 404, ErrorCode.STREAM_NOT_FOUND)


# -- streams: create refusals ------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"name": "no_columns"}, {"name": "empty_columns", "columns": []},
    {"name": "bad_type", "columns": [{"name": "a", "type": "int128x"}]},
    {"name": "no_type", "columns": [{"name": "a"}]},
    {"name": "dup_cols", "columns": [{"name": "a", "type": "string"}, {"name": "a", "type": "int32"}]},
    {"name": "empty_col", "columns": [{"name": "", "type": "string"}]},
    {"name": "bad_mode", "columns": [{"name": "a", "type": "string"}], "mode": "sometimes"},
    {"name": "bad_tp", "columns": [{"name": "_tp_time", "type": "string"}]},
    {"columns": [{"name": "a", "type": "string"}]}, {"name": "", "columns": [{"name": "a", "type": "string"}]},
    {"name": "1starts_with_digit", "columns": [{"name": "a", "type": "string"}]},
    {"name": "has space", "columns": [{"name": "a", "type": "string"}]},
    {"name": "x" * 65, "columns": [{"name": "a", "type": "string"}]},
    [], "null", "{", {"name": 5, "columns": [{"name": "a", "type": "string"}]},
    {"name": "cols_not_list", "columns": {"a": "string"}},
])
def test_bad_create_stream_bodies_are_4xx(door, body):
    tp_error(door.call("POST", "/streams", body))
    if isinstance(body, dict) and isinstance(body.get("name"), str) and body["name"]:
        assert door.call("GET", f"/streams/{quote(body['name'], safe='')}").status != 200


@pytest.mark.parametrize("shards", [0, -1, 1.5, "2", True])
def test_a_bad_shard_count_is_a_400_naming_shards(door, shards):
    """The door's field is `shards`: the core's `partition_count` meant nothing to a Timeplus client."""
    name = new_name()
    body = tp_error(door.call("POST", "/streams", {"name": name, "columns": TYPED, "shards": shards}))
    assert "shards" in body["message"] and "partition_count" not in body["message"], body
    assert door.call("GET", f"/streams/{name}").status != 200


LONG = "d" * 1025


@pytest.mark.parametrize("body", [
    {"columns": TYPED, "description": LONG}, {"columns": TYPED, "ttl_expression": LONG},
    {"columns": [{"name": "a", "type": "string", "default": LONG}]},
])
def test_a_stream_definition_text_past_1024_characters_is_refused(door, body):
    """A stream's description, ttl_expression and column defaults were taken at any length (the
    12 MiB body): kept in one store value, on a JetStream store a 10 MB description was answered
    503 UNAVAILABLE 'retry later' (NATS' maximum payload), a retry failing the same way for ever.
    They are bounded as a source's description is: a 400 naming the field, nothing created."""
    name = new_name()
    body = tp_error(door.call("POST", "/streams", {"name": name, **body}), 400, ErrorCode.INVALID_REQUEST)
    assert "1024" in body["message"]
    tp_error(door.call("GET", f"/streams/{name}"), 404, ErrorCode.STREAM_NOT_FOUND)
    assert door.call("POST", "/streams", {"name": name, "columns": TYPED, "description": LONG[1:]}).status == 201


@pytest.mark.parametrize("field_name", ["description", "ttl_expression"])
def test_a_patch_with_a_text_past_1024_characters_is_refused(door, typed, field_name):
    tp_error(door.call("PATCH", f"/streams/{typed}", {field_name: LONG}), 400, ErrorCode.INVALID_REQUEST)
    assert door.call("GET", f"/streams/{typed}").json[field_name] == ""


@pytest.mark.parametrize("extra", [
    {"description": "d" * 1025}, {"name": "n" * 1025}, {"tags": ["t" * 1025]}, {"tags": ["t"] * 33},
    {"tags": [{"x": 1}]}, {"tags": [5]}, {"tags": "one-tag"},
])
def test_a_query_name_description_or_tags_past_their_bounds_is_refused(door, extra):
    """A query keeps its name, description and tags until it is forgotten (up to 1,000 ended
    queries): they were taken at any size, so twenty `select 1` with 10 MB of description and tags
    grew the broker by 255 MB and the query list to 210 MB (a thousand: an out-of-memory kill).
    Tags that were no strings were kept as Python's repr ("{'x': 1}"), a tags that was no list
    dropped. Now each is a 400 before any SSE byte."""
    tp_error(door.call("POST", "/queries", {"sql": "select 1", **extra}), 400, ErrorCode.INVALID_REQUEST)


def test_a_query_with_name_description_and_tags_in_bounds_keeps_them(door):
    reply = door.call("POST", "/queries", {"sql": "select 1", "name": "n" * 1024, "description": "d" * 1024,
                                          "tags": ["t" * 1024] + ["x"] * 31})
    assert reply.status == 200, reply.raw[:300]
    query = json.loads(reply.raw.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert (len(query["name"]), len(query["description"]), len(query["tags"])) == (1024, 1024, 32)


def test_get_unknown_stream_is_404(door):
    missing = new_name("missing")
    assert missing in tp_error(door.call("GET", f"/streams/{missing}"), 404, ErrorCode.STREAM_NOT_FOUND)["message"]


def test_create_existing_stream_is_400_code_57(door, typed):
    body = tp_error(door.call("POST", "/streams", {"name": typed, "columns": TYPED}), 400, ErrorCode.STREAM_EXISTS)
    assert typed in body["message"]


# -- streams: PATCH (spec section 3: the retention settings and the description) ---------------

def test_patch_changes_the_retention_settings_and_the_description(door, typed):
    assert door.call("PATCH", f"/streams/{typed}", {"description": "new", "logstore_retention_ms": 48 * 3_600_000,
                                                    "ttl_expression": "to_datetime(t) + INTERVAL 1 DAY",
                                                    "logstore_retention_bytes": 1 << 30}).status == 204
    shown = door.call("GET", f"/streams/{typed}").json
    assert (shown["description"], shown["logstore_retention_ms"], shown["ttl_expression"],
            shown["logstore_retention_bytes"]) == ("new", 48 * 3_600_000, "to_datetime(t) + INTERVAL 1 DAY", 1 << 30)
    # what is left out or null stays; 0 or below is the broker's default retention
    assert door.call("PATCH", f"/streams/{typed}", {"description": None, "logstore_retention_ms": 0}).status == 204
    shown = door.call("GET", f"/streams/{typed}").json
    assert (shown["description"], shown["logstore_retention_ms"]) == ("new", 24 * 3_600_000)
    assert [c["name"] for c in shown["columns"]] == [c["name"] for c in TYPED] + ["_tp_time"]


@pytest.mark.parametrize("body, status", [
    ({"logstore_retention_ms": 3_600_001}, 400), ({"logstore_retention_ms": 23 * 3_600_000}, 400),
    ({"logstore_retention_ms": 73 * 3_600_000}, 400), ({"logstore_retention_ms": "48h"}, 400),
    ({"description": 5}, 400), ({"ttl_expression": []}, 400), ({"logstore_retention_bytes": 1.5}, 400),
    ([], 400), ("null", 400), ("{", 400),
])
def test_bad_patch_bodies_are_4xx_and_change_nothing(door, typed, body, status):
    before = door.call("GET", f"/streams/{typed}").json
    tp_error(door.call("PATCH", f"/streams/{typed}", body), status)
    assert door.call("GET", f"/streams/{typed}").json == before


def test_patch_of_a_stream_without_a_schema_takes_only_the_retention(door):
    name = new_name("plain")
    reply = call(door.broker, "POST", f"/v2/{door.ws}/streams", {"stream_name": name, "partition_count": 1})
    assert reply.status == 201, reply.raw
    assert door.call("PATCH", f"/streams/{name}", {"logstore_retention_ms": 72 * 3_600_000}).status == 204
    assert call(door.broker, "GET", f"/v2/{door.ws}/streams/{name}").json["retention_period"] == 72
    body = tp_error(door.call("PATCH", f"/streams/{name}", {"description": "x"}), 400, ErrorCode.INVALID_REQUEST)
    assert "no schema" in body["message"]
    tp_error(door.call("PATCH", f"/streams/{new_name('missing')}", {"description": "x"}), 404,
             ErrorCode.STREAM_NOT_FOUND)


# -- ingest refusals: clear, and nothing written -----------------------------------------------

GOOD = {"columns": ["name", "n", "x", "ok", "time"], "data": [["ok", 1, 1.0, True, "2024-05-01 00:00:00.000"]]}


def compact(*rows: list[Any], columns: list[str] | None = None) -> dict[str, Any]:
    return {"columns": columns or ["name", "n", "x", "ok", "time"], "data": list(rows)}


ROW = ["a", 1, 1.0, True, "2024-05-01 00:00:00.000"]

# (format or None, content type, body)
BAD_INGEST = [
    # compact
    (None, "application/json", '{"columns": ["name"], "data": [["a"]'),
    (None, "application/json", "not json"),
    (None, "application/json", json.dumps(compact(ROW, ["b", 2, 2.0, True]))),
    (None, "application/json", json.dumps(compact(ROW, ["b", "two", 2.0, True, "2024-05-01 00:00:00"]))),
    (None, "application/json", json.dumps(compact(ROW, ["b", 2**40, 2.0, True, "2024-05-01 00:00:00"]))),
    (None, "application/json", json.dumps(compact(ROW, ["b", 2, "x", True, "2024-05-01 00:00:00"]))),
    (None, "application/json", json.dumps(compact(ROW, ["b", 2, 2.0, "yes", "2024-05-01 00:00:00"]))),
    (None, "application/json", json.dumps(compact(ROW, ["b", 2, 2.0, True, "not a time"]))),
    (None, "application/json", json.dumps(compact(["a"], columns=["nope"]))),
    (None, "application/json", json.dumps({"columns": ["name"]})),
    (None, "application/json", json.dumps({"data": [["a"]]})),
    (None, "application/json", json.dumps({"columns": "name", "data": [["a"]]})),
    (None, "application/json", json.dumps({"columns": ["name"], "data": "a"})),
    (None, "application/json", json.dumps({"columns": ["name"], "data": ["a"]})),
    (None, "application/json", json.dumps([["a"]])),
    (None, "application/json", ""),
    ("compact", "text/plain", "[1]"),
    # streaming
    ("streaming", "application/json", '{"name":"a","n":1}\n{"name":"b","n":'),
    ("streaming", "application/json", '{"name":"a","n":1}\n[1,2]\n'),
    ("streaming", "application/json", '{"name":"a","n":1}\n"text"\n'),
    ("streaming", "application/json", '{"name":"a","n":1}{"name":"b","n":"two"}'),
    ("streaming", "application/json", '{"name":"a","n":1}\n{"name":"b","ok":"maybe"}\n'),
    ("streaming", "application/json", ""),
    (None, "application/x-ndjson", '{"name":"a"}\ngarbage\n'),
    # raw and lines into a stream without a `raw` column
    ("raw", "application/json", "some text"),
    ("lines", "application/json", "line one\nline two"),
    (None, "text/plain", "some text"),
    (None, "text/plain;format=lines", "line one"),
    # unknown format
    ("xml", "application/json", "<a/>"),
    (None, "application/xml", "<a/>"),
]


@pytest.mark.parametrize("fmt,content_type,body", BAD_INGEST)
def test_malformed_ingest_is_a_4xx_and_writes_nothing(door, typed, fmt, content_type, body):
    tp_error(door.ingest(typed, body, fmt, content_type))
    assert door.rows(f"select name from table({typed})") == []
    assert door.ingest(typed, GOOD).status == 200       # the stream still takes a good request
    assert door.rows(f"select name, n from table({typed})") == [["ok", 1]]


DEEP = "[" * 1000 + "]" * 1000   # nested past Python's recursion limit, within orjson's 1024 levels


@pytest.mark.parametrize("fmt,body", [(None, '{"columns":["n"],"data":[[' + DEEP + "]]}"),
                                      (None, '{"columns":["time"],"data":[[' + DEEP + "]]}"),
                                      ("streaming", '{"name":"a","n":' + DEEP + "}")],
                         ids=["compact int", "compact datetime", "streaming int"])
def test_a_deeply_nested_value_in_a_typed_column_is_a_bad_row(door, typed, fmt, body):
    """The refusal's message describes the value; one orjson cannot write (nested past 255 levels)
    was described by repr(), which raised RecursionError past ~1000 levels: a 500 INTERNAL with a
    traceback for a client's bad value."""
    reply = tp_error(door.ingest(typed, body, fmt), 400, ErrorCode.BAD_ROW)
    assert "an array [[[" in reply["message"], reply
    assert door.rows(f"select name from table({typed})") == []


@pytest.mark.parametrize("row,column", [(["b", "two", 2.0, True, "2024-05-01 00:00:00"], "n"),
                                        (["b", 2, 2.0, True, "yesterday"], "time"),
                                        (["b", 2, 2.0, 3, "2024-05-01 00:00:00"], "ok"),
                                        (["b", 2, "1.5", True, "2024-05-01 00:00:00"], "x")])
def test_bad_compact_value_names_the_row_and_column(door, typed, row, column):
    body = tp_error(door.ingest(typed, compact(ROW, ROW, row)), 400, ErrorCode.BAD_ROW)
    assert "row 2" in body["message"] and f"[{column}]" in body["message"], body   # 0-based: the third row
    assert door.rows(f"select name from table({typed})") == []


def test_bad_streaming_object_names_the_row_and_column(door, typed):
    body = tp_error(door.ingest(typed, '{"name":"a","n":1}\n{"name":"b","n":2}\n{"name":"c","n":"three"}',
                                "streaming"), 400, ErrorCode.BAD_ROW)
    assert "row 2" in body["message"] and "[n]" in body["message"], body
    assert door.rows(f"select name from table({typed})") == []


def test_unknown_compact_column_is_named(door, typed):
    body = tp_error(door.ingest(typed, compact(["a", 1], columns=["name", "nosuch"])))
    assert "nosuch" in body["message"]


def test_raw_into_a_stream_without_raw_column_says_so(door, typed):
    for fmt in ("raw", "lines"):
        body = tp_error(door.ingest(typed, "text", fmt), 400)
        assert "raw" in body["message"]


@pytest.mark.parametrize("fmt", ["raw", "lines"])
def test_raw_and_lines_refuse_invalid_utf8_and_empty_bodies(door, rawstream, fmt):
    tp_error(door.ingest(rawstream, b"ok\n\xff\xfe bad", fmt), 400)
    assert "empty" in tp_error(door.ingest(rawstream, b"", fmt), 400)["message"].lower()
    assert door.rows(f"select raw from table({rawstream})") == []


def test_lines_of_only_newlines_write_nothing(door, rawstream):
    reply = door.ingest(rawstream, "\n\r\n\n", "lines")
    assert reply.status == 200 or 400 <= reply.status < 500, reply.status
    if reply.status != 200:
        tp_error(reply)
    assert door.rows(f"select raw from table({rawstream})") == []


def test_empty_body_is_400_empty_body(door, typed):
    for fmt in (None, "compact", "streaming"):
        body = tp_error(door.ingest(typed, b"", fmt), 400, ErrorCode.BAD_BODY)
        assert "empty" in body["message"].lower()


def test_ingest_into_unknown_stream_is_a_4xx(door):
    missing = new_name("missing")
    body = tp_error(door.ingest(missing, GOOD), code=ErrorCode.STREAM_NOT_FOUND)
    assert missing in body["message"]


def test_oversize_ingest_body_is_413_and_writes_nothing(door, typed):
    row = ["y" * 1000, 1, 1.0, True, "2024-05-01 00:00:00.000"]
    big = json.dumps(compact(*[row] * (12 * 1024 + 100)))
    assert len(big) > 12 * MIB
    try:
        reply = call(door.broker, "POST", f"{door.base}/streams/{typed}/ingest", big, timeout=60)
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the door dropped the connection instead of answering 413")
    tp_error(reply, 413, ErrorCode.REQUEST_TOO_LARGE)
    assert door.rows(f"select name from table({typed})") == []


def test_declared_oversize_body_is_413_without_reading_it(door, typed):
    with socket.create_connection(addr(door.broker.http_url), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST %s/streams/%s/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{\"columns\": " % (door.base.encode(), typed.encode(), 12 * MIB + 1))
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        reply = Reply(resp.status, resp.headers, resp.read())
    tp_error(reply, 413, ErrorCode.REQUEST_TOO_LARGE)


# -- ingest: the format is chosen by ?format= over Content-Type (spec section 4) -----------------

FORMAT_BODIES = {
    "compact": ('{"columns": ["raw", "n"], "data": [["c", 1]]}', [["c", 1]]),
    "streaming": ('{"raw": "s", "n": 2}\n{"raw": "t", "n": 3}', [["s", 2], ["t", 3]]),
    "raw": ("a\nb", [["a\nb", 0]]),
    "lines": ("a\nb", [["a", 0], ["b", 0]]),
}


@pytest.mark.parametrize("fmt,content_type,expected", [
    (None, "application/json", "compact"), (None, "application/json;format=compact", "compact"),
    (None, "application/vnd.timeplus+json", "compact"),
    (None, "application/vnd.timeplus+json;format=compact", "compact"),
    (None, "application/json;format=compat", "compact"), (None, "application/x-ndjson", "streaming"),
    (None, "application/json;format=streaming", "streaming"), (None, "application/json;format=stream", "streaming"),
    (None, "application/vnd.timeplus+json;format=streaming", "streaming"), (None, "text/plain", "raw"),
    (None, "text/plain;format=raw", "raw"), (None, "text/plain;format=lines", "lines"),
    # what the SDK sends: ?format= with Content-Type application/json; the parameter wins
    ("streaming", "application/json", "streaming"), ("raw", "application/json", "raw"),
    ("lines", "application/json", "lines"), ("compact", "text/plain", "compact"), ("stream", "text/plain", "streaming"),
    ("compat", "application/x-ndjson", "compact"), ("lines", "application/x-ndjson", "lines"),
])
def test_format_is_chosen_by_parameter_then_content_type(door, fmt, content_type, expected):
    name = new_name("fmt")
    door.create(name, [{"name": "raw", "type": "string"}, {"name": "n", "type": "int32"}])
    body, rows = FORMAT_BODIES[expected]
    reply = door.ingest(name, body, fmt, content_type)
    assert reply.status == 200, (reply.status, reply.raw[:300])
    assert door.rows(f"select raw, n from table({name})") == rows


def test_the_v1beta1_ingest_path_and_the_default_workspace(broker):
    name = new_name()
    default = Door(broker, "default")
    default.create(name, [{"name": "n", "type": "int32"}])
    reply = call(broker, "POST", f"/api/v1beta1/streams/{name}/ingest", {"columns": ["n"], "data": [[1]]})
    assert reply.status == 200, (reply.status, reply.raw[:300])
    assert call(broker, "POST", f"/api/v1beta2/streams/{name}/ingest", {"columns": ["n"], "data": [[2]]}).status == 200
    assert default.rows(f"select n from table({name})") == [[1], [2]]
    assert default.call("DELETE", f"/streams/{name}", "null").status == 204


# -- fuzz: no 5xx, no hang ---------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
FORMATS = st.sampled_from([None, "compact", "compat", "streaming", "stream", "raw", "lines", "", "xml", "COMPACT",
                           "raw&format=lines", "%00", "lines;x"])
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(["application/json", "application/json;format=compact", "application/json;format=streaming",
                     "application/vnd.timeplus+json", "application/vnd.timeplus+json;format=streaming",
                     "application/x-ndjson", "text/plain", "text/plain;format=raw", "text/plain;format=lines",
                     "application/json;format=compat", "application/json;format=stream", "text/plain;format=",
                     "multipart/form-data", "application/json; charset=latin-1"]),
    st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=40),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
COLUMN_NAMES = st.sampled_from(["name", "n", "x", "ok", "time", "raw", "_tp_time", "nope", ""])
COMPACT_BODIES = st.builds(lambda cols, rows: json.dumps({"columns": cols, "data": rows}),
                           st.lists(COLUMN_NAMES, max_size=6), st.lists(st.lists(JSON_VALUES, max_size=6), max_size=5))
INGEST_BODIES = st.one_of(
    COMPACT_BODIES,
    st.lists(st.dictionaries(COLUMN_NAMES, JSON_VALUES, max_size=6), max_size=5).map(
        lambda objs: "\n".join(json.dumps(o) for o in objs)),
    JSON_VALUES.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
)


@FUZZ
@given(fmt=FORMATS, content_type=CONTENT_TYPES, body=INGEST_BODIES, raw_target=st.booleans())
def test_fuzz_ingest_never_5xx_never_hangs(door, fuzz_streams, fmt, content_type, body, raw_target):
    name = fuzz_streams[1] if raw_target else fuzz_streams[0]
    path = f"{door.base}/streams/{name}/ingest" + ("" if fmt is None else f"?format={fmt}")
    reply = call(door.broker, "POST", path, body, content_type=content_type)
    assert reply.status < 500, (reply.status, reply.raw[:300])
    if reply.status >= 400:
        tp_error(reply)


SQL_WORDS = st.sampled_from([
    "select", "SELECT", "*", "n", "name", "x", "ok", "time", "raw", "_tp_time", "raw:key1", "raw:a.b", "::int",
    "::float", "::string", "::bool", "::datetime", "cast(", "as", "int", ")", "(", ",", "from", "table(", "tumble(",
    "hop(", "5s", "2s", "window_start", "window_end", "group by", "where", "and", "or", "not", "like", "ilike",
    "in", "is null", "limit", "1", "0", "-1", "99999999999999999999", "'a'", "'%'", "+", "-", "/", "*", "=", "<>",
    "count(*)", "sum(", "avg(", "min(", "max(", "count_distinct(", "lower(", "upper(", "length(", "abs(", "round(",
    "to_string(", "now()", "settings", "seek_to='earliest'", "seek_to='bogus'", ";", "union", "join", "order by",
    "{typed}", "{raw}", "missing_stream", "\"", "`", "--", "/*",
])
SQLS = st.one_of(st.lists(SQL_WORDS, max_size=14).map(" ".join), st.text(max_size=80))
QUERY_BODIES = st.one_of(
    st.builds(lambda sql, bp: {"sql": sql, **({"batching_policy": bp} if bp is not None else {})}, SQLS,
              st.one_of(st.none(), st.fixed_dictionaries({"count": JSON_VALUES, "time_ms": JSON_VALUES}), JSON_VALUES)),
    JSON_VALUES,
)


def _fill(body: Any, streams: tuple[str, str]) -> Any:
    if isinstance(body, dict) and isinstance(body.get("sql"), str):
        sql = body["sql"].replace("{typed}", streams[0]).replace("{raw}", streams[1])
        return {**body, "sql": sql}
    return body


@FUZZ
@given(body=QUERY_BODIES, route=st.sampled_from(["/queries", "/sqlanalyze"]), content_type=CONTENT_TYPES)
def test_fuzz_queries_never_5xx_never_hang(door, fuzz_streams, body, route, content_type):
    body = _fill(body, fuzz_streams)
    reply = call(door.broker, "POST", door.base + route, json.dumps(body), content_type=content_type)
    assert reply.status < 500, (body, reply.status, reply.raw[:300])
    if reply.status >= 400:
        tp_error(reply)
    elif route == "/queries":
        assert reply.status == 200 and reply.raw.startswith(b"event: query\n"), (body, reply.raw[:300])
        meta = json.loads(reply.raw.split(b"data: ", 1)[1].split(b"\n", 1)[0])
        assert isinstance(meta["id"], str) and isinstance(meta["result"]["header"], list)
        # the connection is closed: the query must end (and it may stay listed); cancel it anyway
        assert door.call("POST", f"/queries/{meta['id']}/cancel", "null").status in (204, 404)


@FUZZ
@given(body=st.one_of(JSON_VALUES, st.builds(
    lambda name, cols, mode: {"name": name, "columns": cols, "mode": mode},
    st.one_of(st.text(alphabet=string.ascii_letters + string.digits + "_-. ", max_size=70), JSON_VALUES),
    st.one_of(st.lists(st.fixed_dictionaries({"name": st.one_of(COLUMN_NAMES, JSON_VALUES),
                                              "type": st.one_of(st.sampled_from(
                                                  ["string", "int32", "Int8", "nullable(String)", "datetime64(3)",
                                                   "datetime64(3, 'UTC')", "json", "uint64", "float", "double",
                                                   "decimal(10,2)", "array(int32)", "nullable(nullable(int8))",
                                                   "datetime64(9)", "", "bool"]), JSON_VALUES)}), max_size=4),
              JSON_VALUES),
    st.one_of(st.sampled_from(["append", "changelog", "changelog_kv", "versioned_kv", None]), JSON_VALUES))))
def test_fuzz_create_stream_never_5xx(door, body):
    reply = call(door.broker, "POST", door.base + "/streams", json.dumps(body))
    assert reply.status < 500, (body, reply.status, reply.raw[:300])
    if reply.status >= 400:
        tp_error(reply)
    else:
        assert reply.status == 201
        created = json.loads(reply.raw)
        assert door.call("DELETE", f"/streams/{created['name']}", "null").status == 204


@FUZZ
@given(path=st.text(alphabet=string.ascii_letters + string.digits + "/_-.%?=&:", max_size=60),
       method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]))
def test_fuzz_paths_never_5xx(door, path, method):
    reply = call(door.broker, method, door.base + "/" + path, "null")
    assert reply.status < 500, (method, path, reply.status, reply.raw[:300])


@pytest.fixture(scope="module")
def fuzz_streams(door: Door) -> tuple[str, str]:
    typed, raw = new_name("fz"), new_name("fzraw")
    door.create(typed, TYPED)
    door.create(raw, [{"name": "raw", "type": "string"}, {"name": "n", "type": "int32"}])
    return typed, raw


# -- the schema is durable ---------------------------------------------------------------------

@pytest.mark.slow
def test_schema_survives_a_restart(start_broker, tmp_path):
    data = tmp_path / "restart-data"
    first = start_broker(data_dir=data)
    door = Door(first, "wsr")
    columns = [{"name": "name", "type": "string"}, {"name": "n", "type": "Int16"},
               {"name": "t", "type": "DateTime64(3)"}, {"name": "maybe", "type": "nullable(float)"}]
    door.create("durable", columns)
    # a PATCH through the unmodified SDK's own call is kept too
    import swagger_client
    from swagger_client.models.update_stream_request import UpdateStreamRequest
    from swagger_client.timeplus.streams_v1beta2_api import StreamsV1beta2Api

    from tests.e2e.timeplus_sdk_helpers import env_for
    StreamsV1beta2Api(swagger_client.ApiClient(env_for(first.http_url, "wsr")._conf())).v1beta2_streams_name_patch(
        UpdateStreamRequest(description="patched", logstore_retention_ms=72 * 3_600_000), "durable")
    before = json.loads(door.call("GET", "/streams/durable").raw)
    assert (before["description"], before["logstore_retention_ms"]) == ("patched", 72 * 3_600_000)
    assert door.ingest("durable", {"columns": ["name", "n"], "data": [["a", 1]]}).status == 200
    first.stop(15)

    second = start_broker(data_dir=data)
    door = Door(second, "wsr")
    after = json.loads(door.call("GET", "/streams/durable").raw)
    assert (after["description"], after["logstore_retention_ms"]) == ("patched", 72 * 3_600_000)
    assert [(c["name"], c["type"]) for c in after["columns"]] == [(c["name"], c["type"]) for c in before["columns"]]
    assert [(c["name"], c["type"]) for c in after["columns"]] == [
        ("name", "string"), ("n", "int16"), ("t", "datetime64(3)"), ("maybe", "nullable(float32)"),
        ("_tp_time", "datetime64(3, 'UTC')")]
    body = tp_error(door.ingest("durable", {"columns": ["name", "n"], "data": [["b", 70000]]}), 400, ErrorCode.BAD_ROW)
    assert "[n]" in body["message"]    # int16 range still enforced
    assert door.ingest("durable", {"columns": ["name", "n"], "data": [["b", 2]]}).status == 200
    assert door.rows("select name, n, maybe from table(durable)") == [["a", 1, None], ["b", 2, None]]
