"""The consumer routes over raw HTTP against a real broker: apps, checkpoints, consumer state,
long-poll GetRecords (`wait_ms`) and the SSE tail (/sluice/v1/tail). No SDK, no mocks.

Bad input on every route must be a 4xx with the DIS error body (error_code/error_msg/errorCode/
message, shared/spec/dis-api.md section 1) and an X-Request-Id header - never a 5xx, never a hang.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, urlencode

import pytest
from dis_http import PID, Reply, assert_dis_error, call
from dis_http import addr as _addr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CLOCK = Path(__file__).parents[1] / "e2e" / "clock"   # its sitecustomize.py moves a broker's wall clock

# -- helpers -----------------------------------------------------------------------------------

def ok(reply: Reply, status: int = 200) -> Reply:
    assert reply.status == status, (reply.status, reply.raw[:500])
    return reply




def create_stream(broker, name: str, partitions: int = 1) -> None:  # type: ignore[no-untyped-def]
    ok(call(broker, "POST", f"/v2/{PID}/streams", {"stream_name": name, "partition_count": partitions}), 201)


def put(broker, stream: str, values: list[bytes], partition: str = "0",  # type: ignore[no-untyped-def]
        key: str | None = None) -> list[int]:
    records = [{"data": base64.b64encode(v).decode(), "partition_id": partition,
                **({"partition_key": key} if key else {})} for v in values]
    body = ok(call(broker, "POST", f"/v2/{PID}/records", {"stream_name": stream, "records": records})).json
    assert body["failed_record_count"] == 0, body
    return [int(r["sequence_number"]) for r in body["records"]]


def cursor(broker, stream: str, partition: str = "0", kind: str = "LATEST") -> str:  # type: ignore[no-untyped-def]
    return ok(call(broker, "GET", f"/v2/{PID}/cursors", query={
        "stream-name": stream, "partition-id": partition, "cursor-type": kind})).json["partition_cursor"]


def get_records(broker, cur: str, **extra: Any) -> Reply:  # type: ignore[no-untyped-def]
    return call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": cur, **extra})


def decoded(body: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(r["data"]) for r in body["records"]]


@pytest.fixture(scope="module")
def env(broker):  # type: ignore[no-untyped-def]
    """A stream with records in partition 0 (partition 1 empty) and an app with a checkpoint on it."""
    stream, app = f"cons-{uuid.uuid4().hex[:8]}", f"app-{uuid.uuid4().hex[:8]}"
    create_stream(broker, stream, 2)
    put(broker, stream, [b"a", b"b", b"c"])
    ok(call(broker, "POST", f"/v2/{PID}/apps", {"app_name": app}), 201)
    ok(call(broker, "POST", f"/v2/{PID}/checkpoints", {"app_name": app, "checkpoint_type": "LAST_READ",
                                                        "stream_name": stream, "partition_id": "0",
                                                        "sequence_number": "1"}), 201)
    other = f"app-{uuid.uuid4().hex[:8]}"  # an app without any checkpoint
    ok(call(broker, "POST", f"/v2/{PID}/apps", {"app_name": other}), 201)
    return {"stream": stream, "app": app, "bare_app": other}


def good_commit(env: dict[str, str], **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"app_name": env["app"], "checkpoint_type": "LAST_READ", "stream_name": env["stream"],
                            "partition_id": "0", "sequence_number": "2", "metadata": "m"}
    for name, value in changes.items():
        if value is _DROP:
            body.pop(name)
        else:
            body[name] = value
    return body


_DROP = object()


# -- bad input on every new route --------------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    ("{not json", "DIS.4300"),
    ("", "DIS.4300"),
    ("[]", "DIS.4300"),
    ('"app"', "DIS.4300"),
    ({}, "DIS.4200"),
    ({"app_name": None}, "DIS.4200"),
    ({"app_name": 5}, "DIS.4200"),
    ({"app_name": ["a"]}, "DIS.4200"),
    ({"app_name": ""}, "DIS.4200"),
    ({"app_name": "has space"}, "DIS.4200"),
    ({"app_name": "dot.ted"}, "DIS.4200"),
    ({"app_name": "ünïcode"}, "DIS.4200"),
    ({"app_name": "x" * 201}, "DIS.4200"),
])
def test_create_app_rejects_bad_bodies(broker, body, code):
    assert_dis_error(call(broker, "POST", f"/v2/{PID}/apps", body), 400, code)


def test_create_app_exists(broker, env):
    body = assert_dis_error(call(broker, "POST", f"/v2/{PID}/apps", {"app_name": env["app"]}), 400, "DIS.4330")
    assert env["app"] in body["error_msg"]


@pytest.mark.parametrize("query, code", [
    ({"limit": "abc"}, "DIS.4200"),
    ({"limit": "1.5"}, "DIS.4200"),
    ({"limit": "0"}, "DIS.4200"),
    ({"limit": "-1"}, "DIS.4200"),
    ({"limit": "101"}, "DIS.4200"),
    ({"limit": "99999999999999999999999"}, "DIS.4200"),
    ({"stream_name": "no-such-stream-here"}, "DIS.4301"),
])
def test_list_apps_bad_query(broker, query, code):
    assert_dis_error(call(broker, "GET", f"/v2/{PID}/apps", query=query), 400, code)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("name, code", [
    ("has%20space", "DIS.4200"),
    ("x" * 201, "DIS.4200"),
    ("%C3%BC", "DIS.4200"),
    ("no-such-app-anywhere", "DIS.4332"),
])
def test_show_and_delete_app_bad_names(broker, method, name, code):
    assert_dis_error(call(broker, method, f"/v2/{PID}/apps/{name}"), 400, code)


@pytest.mark.parametrize("query, code", [
    ({}, "DIS.4200"),                                                   # checkpoint_type is required
    ({"checkpoint_type": ""}, "DIS.4200"),
    ({"checkpoint_type": "LATEST"}, "DIS.4200"),
    ({"checkpoint_type": "LAST_READ", "limit": "x"}, "DIS.4200"),
    ({"checkpoint_type": "LAST_READ", "limit": "0"}, "DIS.4200"),
    ({"checkpoint_type": "LAST_READ", "limit": "1001"}, "DIS.4200"),
    ({"checkpoint_type": "LAST_READ", "start_partition_id": "zz"}, "DIS.4201"),
    ({"checkpoint_type": "LAST_READ", "start_partition_id": "shardId-x"}, "DIS.4201"),
])
def test_consumer_state_bad_query(broker, env, query, code):
    assert_dis_error(call(broker, "GET", f"/v2/{PID}/apps/{env['app']}/streams/{env['stream']}", query=query),
                     400, code)


def test_consumer_state_unknown_app_stream_and_no_checkpoint(broker, env):
    q = {"checkpoint_type": "LAST_READ"}
    assert_dis_error(call(broker, "GET", f"/v2/{PID}/apps/no-such-app/streams/{env['stream']}", query=q),
                     400, "DIS.4332")
    assert_dis_error(call(broker, "GET", f"/v2/{PID}/apps/bad%20name/streams/{env['stream']}", query=q),
                     400, "DIS.4200")
    assert_dis_error(call(broker, "GET", f"/v2/{PID}/apps/{env['app']}/streams/no-such-stream", query=q),
                     400, "DIS.4301")
    body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/apps/{env['bare_app']}/streams/{env['stream']}",
                                 query=q), 400, "DIS.4375")
    assert env["bare_app"] in body["error_msg"] and env["stream"] in body["error_msg"]
    # and the happy path, to show the route itself works
    state = ok(call(broker, "GET", f"/v2/{PID}/apps/{env['app']}/streams/{env['stream']}", query=q)).json
    assert state["partition_consuming_states"][0]["sequence_number"] == "1"
    assert (state["partition_consuming_states"][0]["earliest_offset"],
            state["partition_consuming_states"][0]["latest_offset"]) == (0, 2)


@pytest.mark.parametrize("body", ["{not json", "", "[1, 2]", "null", "42"])
def test_commit_checkpoint_malformed_body(broker, body):
    assert_dis_error(call(broker, "POST", f"/v2/{PID}/checkpoints", body), 400, "DIS.4300")


@pytest.mark.parametrize("changes, code", [
    # every required field missing
    ({"app_name": _DROP}, "DIS.4200"),
    ({"checkpoint_type": _DROP}, "DIS.4200"),
    ({"stream_name": _DROP}, "DIS.4200"),
    ({"partition_id": _DROP}, "DIS.4200"),
    ({"sequence_number": _DROP}, "DIS.4200"),
    # wrong types
    ({"app_name": 7}, "DIS.4200"),
    ({"app_name": ["x"]}, "DIS.4200"),
    ({"stream_name": {"a": 1}}, "DIS.4200"),
    ({"checkpoint_type": 1}, "DIS.4200"),
    ({"partition_id": 1.5}, "DIS.4200"),
    ({"partition_id": True}, "DIS.4200"),                   # JSON true is no number, like 1.5
    ({"partition_id": []}, "DIS.4200"),
    ({"sequence_number": 1.5}, "DIS.4200"),
    ({"sequence_number": True}, "DIS.4200"),
    ({"sequence_number": {"n": 1}}, "DIS.4200"),
    ({"metadata": 5}, "DIS.4200"),
    ({"metadata": ["m"]}, "DIS.4200"),
    # bad values
    ({"app_name": "bad name"}, "DIS.4200"),
    ({"app_name": "x" * 201}, "DIS.4200"),
    ({"app_name": "no-such-app-x"}, "DIS.4332"),
    ({"stream_name": "no-such-stream-x"}, "DIS.4301"),
    ({"checkpoint_type": "LAST_COMMIT"}, "DIS.4200"),
    ({"partition_id": "p0"}, "DIS.4201"),
    ({"partition_id": "7"}, "DIS.4302"),
    ({"sequence_number": "-1"}, "DIS.4216"),
    ({"sequence_number": "1e3"}, "DIS.4216"),
    ({"sequence_number": " 1"}, "DIS.4216"),
    ({"sequence_number": "١"}, "DIS.4216"),                  # a non-ASCII digit
    ({"sequence_number": "9" * 30}, "DIS.4216"),
    ({"sequence_number": "3"}, "DIS.4224"),                  # one past the last record
    ({"sequence_number": 3}, "DIS.4224"),
    ({"partition_id": "1"}, "DIS.4224"),                     # partition 1 is empty
    ({"metadata": "m" * 1001}, "DIS.4200"),
])
def test_commit_checkpoint_bad_fields(broker, env, changes, code):
    assert_dis_error(call(broker, "POST", f"/v2/{PID}/checkpoints", good_commit(env, **changes)), 400, code)


def test_commit_checkpoint_edges_that_are_accepted(broker, env):
    """The good body itself, numbers for the numeric strings, 1000-char and non-ASCII metadata."""
    for changes in ({}, {"sequence_number": 2, "partition_id": 0}, {"metadata": "m" * 1000},
                    {"metadata": "ü" * 1000}, {"metadata": _DROP}, {"metadata": None}):
        ok(call(broker, "POST", f"/v2/{PID}/checkpoints", good_commit(env, **changes)), 201)
    q = {"app_name": env["app"], "stream_name": env["stream"], "checkpoint_type": "LAST_READ", "partition_id": "0"}
    assert ok(call(broker, "GET", f"/v2/{PID}/checkpoints", query=q)).json == {"sequence_number": "2",
                                                                               "metadata": ""}
    # put it back for the other tests of this module
    ok(call(broker, "POST", f"/v2/{PID}/checkpoints", good_commit(env, sequence_number="1")), 201)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("drop", ["app_name", "stream_name", "checkpoint_type"])
def test_checkpoint_query_missing_fields(broker, env, method, drop):
    q = {"app_name": env["app"], "stream_name": env["stream"], "checkpoint_type": "LAST_READ", "partition_id": "0"}
    del q[drop]
    body = assert_dis_error(call(broker, method, f"/v2/{PID}/checkpoints", query=q), 400, "DIS.4200")
    assert drop in body["error_msg"]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("changes, code", [
    ({"checkpoint_type": "NEWEST"}, "DIS.4200"),
    ({"partition_id": "zz"}, "DIS.4201"),
    ({"partition_id": " 0"}, "DIS.4201"),      # whitespace is not trimmed, as in a sequence number
    ({"partition_id": "9"}, "DIS.4302"),
    ({"app_name": "bad name"}, "DIS.4200"),
    ({"app_name": "no-such-app-y"}, "DIS.4332"),
    ({"stream_name": "no-such-stream-y"}, "DIS.4301"),
])
def test_checkpoint_query_bad_values(broker, env, method, changes, code):
    q = {"app_name": env["app"], "stream_name": env["stream"], "checkpoint_type": "LAST_READ", "partition_id": "0",
         **changes}
    assert_dis_error(call(broker, method, f"/v2/{PID}/checkpoints", query=q), 400, code)


def test_delete_checkpoint_with_an_empty_partition_id_deletes_nothing(broker, env):
    """`partition_id=` deleted every partition's checkpoint, as if absent (the consumer probe)."""
    q = {"app_name": env["app"], "stream_name": env["stream"], "checkpoint_type": "LAST_READ"}
    before = ok(call(broker, "GET", f"/v2/{PID}/checkpoints", query={**q, "partition_id": "0"})).json
    assert "sequence_number" in before
    body = assert_dis_error(call(broker, "DELETE", f"/v2/{PID}/checkpoints", query={**q, "partition_id": ""}),
                            400, "DIS.4201")
    assert "partition_id" in body["error_msg"]
    assert ok(call(broker, "GET", f"/v2/{PID}/checkpoints", query={**q, "partition_id": "0"})).json == before

def test_get_checkpoint_needs_a_partition(broker, env):
    q = {"app_name": env["app"], "stream_name": env["stream"], "checkpoint_type": "LAST_READ"}
    body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/checkpoints", query=q), 400, "DIS.4200")
    assert "partition_id" in body["error_msg"]
    # the checkpoint the refused requests must not have touched
    q["partition_id"] = "shardId-0000000000"
    assert ok(call(broker, "GET", f"/v2/{PID}/checkpoints", query=q)).json["sequence_number"] == "1"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(
    st.sampled_from(["app_name", "checkpoint_type", "stream_name", "partition_id", "sequence_number", "metadata"]),
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=False),
              st.text(max_size=30), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                          st.integers(), max_size=1)),
    max_size=6))
def test_fuzz_commit_checkpoint_never_fails_the_server(broker, env, changes):
    reply = call(broker, "POST", f"/v2/{PID}/checkpoints", good_commit(env, **changes))
    if reply.status == 201:
        return
    assert_dis_error(reply, 400)


# -- long poll ---------------------------------------------------------------------------------

def test_get_records_wait_ms_bad_values(broker, env):
    cur = cursor(broker, env["stream"])
    for value in ("abc", "1.5", "1e3", " 5", "0x10"):
        body = assert_dis_error(get_records(broker, cur, wait_ms=value), 400, "DIS.4200")
        assert "wait_ms" in body["error_msg"]


def test_long_poll_returns_as_soon_as_a_record_is_written(broker, stream_name):
    create_stream(broker, stream_name, 1)
    cur = cursor(broker, stream_name)
    writer = threading.Timer(0.4, put, args=(broker, stream_name, [b"awaited"]))
    began = time.monotonic()
    writer.start()
    try:
        reply = ok(get_records(broker, cur, wait_ms=10_000))
    finally:
        writer.join(10)
    elapsed = time.monotonic() - began
    assert 0.35 <= elapsed < 3.0, elapsed    # it waited for the write, and not a moment longer
    body = reply.json
    assert decoded(body) == [b"awaited"] and body["records"][0]["sequence_number"] == "0"
    assert body["next_partition_cursor"]


def test_long_poll_returns_empty_after_wait_ms(broker, stream_name):
    create_stream(broker, stream_name, 2)
    cur = cursor(broker, stream_name, "0")
    # a write to another partition must not end the wait
    writer = threading.Timer(0.2, put, args=(broker, stream_name, [b"elsewhere"], "1"))
    began = time.monotonic()
    writer.start()
    try:
        body = ok(get_records(broker, cur, wait_ms=800)).json
    finally:
        writer.join(10)
    elapsed = time.monotonic() - began
    assert 0.75 <= elapsed < 4.0, elapsed
    assert body["records"] == [] and body["next_partition_cursor"]
    # the cursor of the empty answer still points where the next record will land
    put(broker, stream_name, [b"later"], "0")
    assert decoded(ok(get_records(broker, body["next_partition_cursor"])).json) == [b"later"]


def test_long_poll_does_not_wait_when_records_are_there(broker, env):
    began = time.monotonic()
    body = ok(get_records(broker, cursor(broker, env["stream"], kind="TRIM_HORIZON"), wait_ms=10_000)).json
    assert time.monotonic() - began < 2.0
    assert decoded(body) == [b"a", b"b", b"c"]


@pytest.mark.parametrize("wait_ms", ["0", "-5", "-99999999999999999999"])
def test_zero_or_negative_wait_answers_at_once(broker, env, wait_ms):
    began = time.monotonic()
    body = ok(get_records(broker, cursor(broker, env["stream"]), wait_ms=wait_ms)).json
    assert time.monotonic() - began < 2.0
    assert body["records"] == [] and body["next_partition_cursor"]


@pytest.mark.parametrize("wait_ms", ["20001", str(10**12), str(2**63), "9" * 30])
def test_wait_ms_over_the_cap_is_clipped_not_refused(broker, stream_name, wait_ms):
    """Beyond 20 s (the cap) is accepted and clipped - not a 400, not a 500, no overflow. The wait
    still ends on a write; the full 20 s is not waited out here."""
    create_stream(broker, stream_name, 1)
    cur = cursor(broker, stream_name)
    writer = threading.Timer(0.3, put, args=(broker, stream_name, [b"x"]))
    began = time.monotonic()
    writer.start()
    try:
        body = ok(get_records(broker, cur, wait_ms=wait_ms, limit=1), 200).json
    finally:
        writer.join(10)
    assert time.monotonic() - began < 3.0
    assert decoded(body) == [b"x"]



def test_long_poll_on_a_stream_deleted_meanwhile_answers_at_once(broker, stream_name):
    create_stream(broker, stream_name, 1)
    cur = cursor(broker, stream_name)
    deleter = threading.Timer(0.3, call, args=(broker, "DELETE", f"/v2/{PID}/streams/{stream_name}"))
    began = time.monotonic()
    deleter.start()
    try:
        reply = get_records(broker, cur, wait_ms=10_000)
    finally:
        deleter.join(10)
    assert time.monotonic() - began < 3.0    # woken by the delete, not by the end of the wait
    assert_dis_error(reply, 400, "DIS.4301")

# -- SSE tail ----------------------------------------------------------------------------------

class Tail:
    """An open GET /sluice/v1/tail: reads the response and parses server-sent events. The streams
    of these tests live in project PID (the DIS paths' `{project_id}`), so the tail is told so."""

    def __init__(self, broker, query: dict[str, Any], timeout: float = 10,  # type: ignore[no-untyped-def]
                 headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection(*_addr(broker.http_url), timeout=timeout)
        self.conn.request("GET", "/sluice/v1/tail?" + urlencode({"project": PID, **query}, quote_via=quote),
                          headers=headers or {})
        self.resp: http.client.HTTPResponse | None = None

    def response(self) -> http.client.HTTPResponse:
        """Blocks until the headers arrive (with the first batch, or an error)."""
        if self.resp is None:
            self.resp = self.conn.getresponse()
        return self.resp

    def events(self) -> Iterator[dict[str, str]]:
        """Each event as its fields; a comment-only block (heartbeat) as {"comment": ...}."""
        resp = self.response()
        fields: dict[str, str] = {}
        while True:
            line = resp.readline()
            if not line:
                return
            text = line.decode().rstrip("\n")
            if text == "":
                if fields:
                    yield fields
                fields = {}
            elif text.startswith(":"):
                fields["comment"] = text[1:].strip()
            else:
                name, _, value = text.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value

    def close(self) -> None:
        self.conn.close()


def record_events(tail: Tail, want: int) -> list[tuple[dict[str, str], dict[str, Any]]]:
    got: list[tuple[dict[str, str], dict[str, Any]]] = []
    count = 0
    for event in tail.events():
        if "comment" in event and "data" not in event:
            continue
        got.append((event, json.loads(event["data"])))
        count += len(got[-1][1]["records"])
        if count >= want:
            return got
    raise AssertionError(f"the tail ended after {count} of {want} records")


def test_tail_streams_records_written_after_connecting_in_order(broker, stream_name):
    create_stream(broker, stream_name, 1)
    put(broker, stream_name, [b"before-1", b"before-2"])   # not part of the tail
    cur = cursor(broker, stream_name)                       # LATEST: after those two
    tail = Tail(broker, {"partition-cursor": cur})

    def writer() -> None:
        time.sleep(0.2)
        put(broker, stream_name, [b"e0"], key="k0")
        time.sleep(0.1)
        put(broker, stream_name, [b"e1", b"e2"])
        time.sleep(0.1)
        put(broker, stream_name, [b"e3"])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        resp = tail.response()
        assert resp.status == 200
        assert resp.headers.get_content_type() == "text/event-stream"
        assert resp.headers.get("Cache-Control") == "no-cache"
        assert resp.headers.get("X-Request-Id")
        events = record_events(tail, 4)
    finally:
        thread.join(10)
        tail.close()
    records = [r for _, body in events for r in body["records"]]
    assert [base64.b64decode(r["data"]) for r in records] == [b"e0", b"e1", b"e2", b"e3"]
    assert [r["sequence_number"] for r in records] == ["2", "3", "4", "5"]
    for event, body in events:
        assert event["event"] == "records"
        assert int(event["id"]) == int(body["records"][-1]["sequence_number"]) + 1  # the next sequence number
        assert set(body) == {"records", "next_partition_cursor", "millis_behind_latest"}
        assert body["next_partition_cursor"] and isinstance(body["millis_behind_latest"], int)
        for r in body["records"]:
            assert isinstance(r["timestamp"], int) and r["timestamp"] > 1_600_000_000_000
            assert r["timestamp_type"] == "CreateTime"
    assert records[0]["partition_key"] == "k0" and "partition_key" not in records[1]
    # the last event's cursor resumes right after the last record
    put(broker, stream_name, [b"after"])
    assert decoded(ok(get_records(broker, events[-1][1]["next_partition_cursor"])).json) == [b"after"]


def test_tail_by_stream_name_from_trim_horizon_in_batches(broker, stream_name):
    create_stream(broker, stream_name, 2)
    put(broker, stream_name, [b"r%d" % i for i in range(5)], "1")
    tail = Tail(broker, {"stream-name": stream_name, "partition-id": "shardId-0000000001",
                         "cursor-type": "TRIM_HORIZON", "max_records": "2"})
    try:
        assert tail.response().status == 200
        events = record_events(tail, 5)
    finally:
        tail.close()
    assert [[base64.b64decode(r["data"]) for r in body["records"]] for _, body in events] == \
        [[b"r0", b"r1"], [b"r2", b"r3"], [b"r4"]]
    assert [e["id"] for e, _ in events] == ["2", "4", "5"]


@pytest.mark.parametrize("start", ["LATEST", "TRIM_HORIZON", "cursor"])
def test_a_reconnecting_tail_resumes_at_its_last_event_id(broker, stream_name, start):
    """An EventSource that lost its connection (a network blip, a broker restart) opens the same URL
    again with `Last-Event-ID`: the `id:` of the last event it had, the next sequence number. The tail
    goes on from there: no record written in the gap lost (a LATEST URL), none read twice (a
    TRIM_HORIZON one, or a cursor's). The header used to be ignored, and the URL's start taken again."""
    create_stream(broker, stream_name, 1)
    put(broker, stream_name, [b"r0", b"r1"])
    query = {"partition-cursor": cursor(broker, stream_name, kind="TRIM_HORIZON")} if start == "cursor" else \
        {"stream-name": stream_name, "partition-id": "0", "cursor-type": start}
    first = Tail(broker, query)
    try:
        if start == "LATEST":
            assert next(first.events()) == {"comment": "connected"}
            put(broker, stream_name, [b"r2"])
        events = record_events(first, 1)
    finally:
        first.close()
    last_id = events[-1][0]["id"]
    put(broker, stream_name, [b"gap-0", b"gap-1"])   # while it was away
    again = Tail(broker, query, headers={"Last-Event-ID": last_id})
    got: list[dict[str, Any]] = []
    try:
        assert again.response().status == 200
        put(broker, stream_name, [b"end"])
        for event in again.events():
            got += json.loads(event["data"])["records"] if "data" in event else []
            if got and base64.b64decode(got[-1]["data"]) == b"end":
                break
    finally:
        again.close()
    assert [base64.b64decode(r["data"]) for r in got] == [b"gap-0", b"gap-1", b"end"]
    assert got[0]["sequence_number"] == last_id


@pytest.mark.parametrize("last_id, code", [("x1", "DIS.4200"), ("-1", "DIS.4200"), ("99", "DIS.4224")])
def test_a_tail_refuses_a_last_event_id_it_cannot_resume_at(broker, env, last_id, code):
    """Not one of its ids, or past the partition's end: an error response (EventSource then stops
    reconnecting), not a tail that starts somewhere else."""
    tail = Tail(broker, {"stream-name": env["stream"], "partition-id": "0", "cursor-type": "LATEST"},
                headers={"Last-Event-ID": last_id})
    try:
        resp = tail.response()
        reply = Reply(resp.status, resp.headers, resp.read())
    finally:
        tail.close()
    assert_dis_error(reply, 400, code)


@pytest.mark.parametrize("query, code", [
    ({"partition-cursor": "garbage"}, "DIS.4217"),
    ({"partition-cursor": "A" * 60}, "DIS.4217"),
    ({}, "DIS.4200"),                                                           # no cursor, no stream
    ({"stream-name": "{stream}"}, "DIS.4200"),                                  # no partition
    ({"stream-name": "no-such-stream-z", "partition-id": "0"}, "DIS.4301"),
    ({"stream-name": "{stream}", "partition-id": "9"}, "DIS.4302"),
    ({"stream-name": "{stream}", "partition-id": "x"}, "DIS.4201"),
    ({"stream-name": "{stream}", "partition-id": "0", "cursor-type": "NEWEST"}, "DIS.4215"),
    ({"stream-name": "{stream}", "partition-id": "0", "cursor-type": "AT_SEQUENCE_NUMBER",
      "starting-sequence-number": "99"}, "DIS.4224"),
    ({"stream-name": "{stream}", "partition-id": "0", "max_records": "many"}, "DIS.4200"),
    ({"stream-name": "{stream}", "partition-id": "0", "max_wait_ms": "1.5"}, "DIS.4200"),
])
def test_tail_bad_requests_get_a_dis_error_not_a_stream(broker, env, query, code):
    query = {k: v.format(stream=env["stream"]) for k, v in query.items()}
    tail = Tail(broker, query)
    try:
        resp = tail.response()
        reply = Reply(resp.status, resp.headers, resp.read())
    finally:
        tail.close()
    assert reply.headers.get_content_type() != "text/event-stream"
    assert_dis_error(reply, 400, code)


def test_tail_of_a_deleted_stream_is_refused(broker, stream_name):
    create_stream(broker, stream_name, 1)
    cur = cursor(broker, stream_name)
    ok(call(broker, "DELETE", f"/v2/{PID}/streams/{stream_name}"), 204)
    tail = Tail(broker, {"partition-cursor": cur})
    try:
        resp = tail.response()
        reply = Reply(resp.status, resp.headers, resp.read())
    finally:
        tail.close()
    assert_dis_error(reply, 400, "DIS.4301")


def test_the_tail_reads_in_its_own_project_only(broker, stream_name):
    """Same stream name in PID and in another project: the tail's `project` picks the stream, and a
    cursor of one project is refused in the other."""
    other = f"other-{uuid.uuid4().hex[:8]}"
    create_stream(broker, stream_name, 1)
    put(broker, stream_name, [b"in PID"])
    assert call(broker, "POST", f"/v2/{other}/streams", {"stream_name": stream_name,
                                                         "partition_count": 1}).status == 201
    ok(call(broker, "POST", f"/v2/{other}/records", {"stream_name": stream_name, "records": [
        {"data": base64.b64encode(b"in other").decode(), "partition_id": "0"}]}))
    for project, want in ((PID, b"in PID"), (other, b"in other")):
        tail = Tail(broker, {"project": project, "stream-name": stream_name, "partition-id": "0",
                             "cursor-type": "TRIM_HORIZON"})
        try:
            first = next(e for e in tail.events() if "data" in e)
        finally:
            tail.close()
        assert decoded(json.loads(first["data"])) == [want]
    foreign = Tail(broker, {"project": other, "partition-cursor": cursor(broker, stream_name, kind="TRIM_HORIZON")})
    try:
        resp = foreign.response()
        reply = Reply(resp.status, resp.headers, resp.read())
    finally:
        foreign.close()
    assert_dis_error(reply, 400, "DIS.4217")
    ok(call(broker, "DELETE", f"/v2/{other}/streams/{stream_name}"), 204)


def test_deleting_the_stream_ends_an_open_tail_with_an_error_event(broker, stream_name):
    create_stream(broker, stream_name, 1)
    tail = Tail(broker, {"partition-cursor": cursor(broker, stream_name)})
    put(broker, stream_name, [b"one"])
    try:
        events = tail.events()
        first = next(e for e in events if "data" in e)
        assert decoded(json.loads(first["data"])) == [b"one"]
        began = time.monotonic()
        ok(call(broker, "DELETE", f"/v2/{PID}/streams/{stream_name}"), 204)
        rest = [e for e in events if "comment" not in e]   # until the stream ends
        assert time.monotonic() - began < 3.0               # at once, not at the next heartbeat
    finally:
        tail.close()
    assert [e["event"] for e in rest] == ["error"]
    body = json.loads(rest[0]["data"])
    assert body["error_code"] == body["errorCode"] == "DIS.4301" and body["error_msg"] == body["message"]


def test_a_quiet_tail_gets_a_heartbeat_comment_every_interval(start_broker):
    """--subscribe-heartbeat 1: silence is broken by `: heartbeat` comments (the default, 15 s, is
    past the tail's 10 s read timeout), and a record written after them still comes."""
    own = start_broker("--store", "memory", "--subscribe-heartbeat", "1")
    create_stream(own, "quiet", 1)
    tail = Tail(own, {"partition-cursor": cursor(own, "quiet")})
    try:
        events = tail.events()
        assert next(events) == {"comment": "connected"}
        assert [next(events), next(events)] == [{"comment": "heartbeat"}] * 2
        put(own, "quiet", [b"after"])
        first = next(e for e in events if "data" in e)
        assert decoded(json.loads(first["data"])) == [b"after"]
    finally:
        tail.close()


def test_sigterm_ends_open_tails_promptly(start_broker):
    own = start_broker()
    create_stream(own, "s", 2)
    streaming = Tail(own, {"partition-cursor": cursor(own, "s", "0")})
    waiting = Tail(own, {"partition-cursor": cursor(own, "s", "1")})   # no record yet: no headers yet
    put(own, "s", [b"first"], "0")
    assert streaming.response().status == 200
    events = streaming.events()
    first = next(e for e in events if "data" in e)
    assert decoded(json.loads(first["data"])) == [b"first"]

    own.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    rest = list(events)                  # ends cleanly (terminating chunk), does not wait for a heartbeat
    assert time.monotonic() - began < 5.0
    assert all("data" not in e for e in rest), rest
    resp = waiting.response()            # the one still waiting for its first record is told to retry
    reply = Reply(resp.status, resp.headers, resp.read())
    assert time.monotonic() - began < 5.0
    assert reply.status == 503 and reply.json["error_code"] == "DIS.5250", (reply.status, reply.raw)
    assert own.proc.wait(10) == 0
    streaming.close()
    waiting.close()


def test_a_tail_resumes_at_its_last_event_id_after_its_cursor_has_expired(start_broker, tmp_path):
    """An EventSource opened with a `partition-cursor` reconnects with that same URL: when the
    connection drops after the cursor's 5 minutes (a tail is long-lived, so almost always), the
    cursor only names the partition - `Last-Event-ID` is the position. The reconnect was refused
    CURSOR_EXPIRED (DIS.4225), and an EventSource gives up on an error response: the tail was lost."""
    clock = tmp_path / "clock"
    clock.write_text("0")
    own = start_broker("--store", "memory", env={
        "PYTHONPATH": os.pathsep.join([str(CLOCK), os.environ.get("PYTHONPATH", "")]),
        "SLUICE_TEST_CLOCK_FILE": str(clock)})
    create_stream(own, "long", 1)
    put(own, "long", [b"r0", b"r1"])
    query = {"partition-cursor": cursor(own, "long", kind="TRIM_HORIZON")}
    first = Tail(own, query)
    try:
        last_id = record_events(first, 2)[-1][0]["id"]
    finally:
        first.close()
    clock.write_text("0.1")   # six minutes on: the URL's cursor has expired
    own.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)           # the signal is handled at the broker's next bytecode; checked just below
    assert_dis_error(get_records(own, query["partition-cursor"]), 400, "DIS.4225")   # it has (the clock moved)
    put(own, "long", [b"gap"])
    again = Tail(own, query, headers={"Last-Event-ID": last_id})
    try:
        assert again.response().status == 200, again.response().read()[:300]
        event = next(e for e in again.events() if "data" in e)
    finally:
        again.close()
    assert decoded(json.loads(event["data"])) == [b"gap"] and event["id"] == "3"


def test_a_head_of_the_tail_sends_no_body_after_its_headers(broker, stream_name):
    """HEAD /sluice/v1/tail was served as the GET: headers without a length, then the stream's
    events (': connected', records, heartbeats) on the keep-alive connection, where the client (or a
    proxy that pools its connections to the broker) reads them as the start of the next answer.
    Now a HEAD is no tail: 405, and the connection's next answer is that answer."""
    import socket

    create_stream(broker, stream_name, 1)
    put(broker, stream_name, [b"held"])
    host, port = _addr(broker.http_url)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"HEAD /sluice/v1/tail?stream-name={stream_name}&partition-id=0&cursor-type=TRIM_HORIZON"
                     f"&project={PID} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
                     f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), got[:300]
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b'{"status": "ok"}'), got[:600]
