"""Bad input on every DIS route, over raw HTTP against a real broker (no SDK, no mocks).

Every error response must be a client error (4xx, never 5xx) with `Content-Type: application/json`,
the four keys error_code/error_msg/errorCode/message (shared/spec/dis-api.md section 1) and an
`X-Request-Id` header. Also: trailing-slash routes, slow or silent clients, and a fuzz test.
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import uuid
from typing import Any
from urllib.parse import quote

import pytest
from dis_http import PID, Reply, assert_dis_error, call
from dis_http import addr as _addr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import ErrorCode

MIB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------------------



def create(broker, name: str, partitions: int = 1) -> None:  # type: ignore[no-untyped-def]
    reply = call(broker, "POST", f"/v2/{PID}/streams", {"stream_name": name, "partition_count": partitions})
    assert reply.status == 201, reply.raw


def put(broker, name: str, records: Any, path: str = f"/v2/{PID}/records") -> Reply:  # type: ignore[no-untyped-def]
    return call(broker, "POST", path, {"stream_name": name, "records": records})


def get_cursor(broker, name: str, partition: str = "0", kind: str = "TRIM_HORIZON") -> str:  # type: ignore[no-untyped-def]
    reply = call(broker, "GET", f"/v2/{PID}/cursors", query={"stream-name": name, "partition-id": partition,
                                                            "cursor-type": kind})
    assert reply.status == 200, reply.raw
    return reply.json["partition_cursor"]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def assert_put_result(reply: Reply, n_records: int) -> dict[str, Any]:
    """A well-formed PutRecords answer for a request of `n_records` records."""
    assert reply.status == 200, reply.raw[:300]
    assert reply.headers.get_content_type() == "application/json" and reply.headers.get("X-Request-Id")
    body = reply.json
    assert set(body) == {"failed_record_count", "records"}
    assert len(body["records"]) == n_records
    failed = 0
    for r in body["records"]:
        if "error_code" in r:
            assert set(r) == {"error_code", "error_message", "reason"} and r["error_code"].startswith("DIS.4"), r
            assert ErrorCode[r["reason"]].dis_code == r["error_code"], r
            failed += 1
        else:
            assert set(r) == {"partition_id", "sequence_number"}, r
            assert r["partition_id"].startswith("shardId-") and r["sequence_number"].isdigit()
    assert body["failed_record_count"] == failed
    return body


@pytest.fixture
def stream(broker, stream_name):  # type: ignore[no-untyped-def]
    create(broker, stream_name, 3)
    return stream_name


# -- CreateStream ------------------------------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    (b"{", "DIS.4300"),
    (b'{"stream_name": "x", "partition_count": 1', "DIS.4300"),
    (b"\xff\xfe{}", "DIS.4300"),
    (b"", "DIS.4300"),
    (b"[]", "DIS.4300"),
    (b'"a string"', "DIS.4300"),
    (b"42", "DIS.4300"),
    (b"null", "DIS.4300"),
    ({}, "DIS.4200"),
    ({"partition_count": 1}, "DIS.4200"),
    ({"stream_name": "ok-name"}, "DIS.4200"),
    ({"stream_name": 12, "partition_count": 1}, "DIS.4200"),
    ({"stream_name": ["a"], "partition_count": 1}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": "3"}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1.5}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": True}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 0}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": -1}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 10**30}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 100_000}, "DIS.4308"),
    ({"stream_name": "bad name", "partition_count": 1}, "DIS.4200"),
    ({"stream_name": "bad/name", "partition_count": 1}, "DIS.4200"),
    ({"stream_name": "", "partition_count": 1}, "DIS.4200"),
    ({"stream_name": "x" * 65, "partition_count": 1}, "DIS.4200"),
    ({"stream_name": "ünicode", "partition_count": 1}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "data_duration": "24"}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "data_duration": 23}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "data_duration": 73}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "data_type": "XML"}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "data_type": 1}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "stream_type": "TURBO"}, "DIS.4200"),
    # tags (spec 2.1): keys 1-36, values 0-43 characters, at most 10, no key twice
    ({"stream_name": "ok-name", "partition_count": 1, "tags": {"key": "a"}}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": ["a"]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"value": "v"}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"key": ""}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"key": "k" * 37}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"key": "k", "value": "v" * 44}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"key": "k", "value": 1}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"key": "k\n"}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"key": "k"}, {"key": "k"}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "tags": [{"key": f"k{i}"} for i in range(11)]},
     "DIS.4601"),
    ({"stream_name": "ok-name", "partition_count": 1, "sys_tags": [{"key": "other", "value": "x"}]}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1,
      "sys_tags": [{"key": "_sys_enterprise_project_id", "value": "not-a-uuid"}]}, "DIS.4200"),
    # Sluice does not scale by itself: refused, not dropped
    ({"stream_name": "ok-name", "partition_count": 1, "auto_scale_enabled": True}, "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "auto_scale_enabled": "false"}, "DIS.4200"),
])
def test_create_stream_rejects_bad_bodies(broker, body, code):
    if isinstance(body, dict) and body.get("stream_name") == "ok-name":
        body = {**body, "stream_name": f"never-{uuid.uuid4().hex[:10]}"}
    assert_dis_error(call(broker, "POST", f"/v2/{PID}/streams", body), 400, code)
    if isinstance(body, dict) and isinstance(body.get("stream_name"), str) and body["stream_name"]:
        # nothing was created
        assert_dis_error(call(broker, "GET", f"/v2/{PID}/streams/{quote(body['stream_name'], safe='')}"), 400,
                         "DIS.4301")


def test_create_stream_keeps_its_tags(broker, stream_name):
    tags = [{"key": "team", "value": "payments"}, {"key": "k" * 36, "value": "v" * 43}, {"key": "empty", "value": ""},
            {"key": "键", "value": "值"}]
    sys_tags = [{"key": "_sys_enterprise_project_id", "value": str(uuid.uuid4())}]
    reply = call(broker, "POST", f"/v2/{PID}/streams", {"stream_name": stream_name, "partition_count": 1,
                                                       "tags": tags, "sys_tags": sys_tags,
                                                       "auto_scale_enabled": False})
    assert reply.status == 201, reply.raw
    shown = call(broker, "GET", f"/v2/{PID}/streams/{stream_name}").json
    assert (shown["tags"], shown["sys_tags"], shown["auto_scale_enabled"]) == (tags, sys_tags, False)
    listed = call(broker, "GET", f"/v2/{PID}/streams", query={"limit": 100}).json["stream_info_list"]
    assert [(i["tags"], i["sys_tags"]) for i in listed if i["stream_name"] == stream_name] == [(tags, sys_tags)]


def test_create_stream_limits_are_inclusive(broker):
    for extra in ({"partition_count": 256}, {"partition_count": 1, "data_duration": 24},
                  {"partition_count": 1, "data_duration": 72}):
        name = f"edge-{uuid.uuid4().hex[:10]}"
        reply = call(broker, "POST", f"/v2/{PID}/streams", {"stream_name": name, **extra})
        assert (reply.status, reply.raw) == (201, b"")
        assert reply.headers.get("X-Request-Id")
    name = f"long-{uuid.uuid4().hex}".ljust(64, "_")
    assert len(name) == 64
    assert call(broker, "POST", f"/v2/{PID}/streams", {"stream_name": name, "partition_count": 1}).status == 201
    assert call(broker, "GET", f"/v2/{PID}/streams/{name}").json["stream_name"] == name


def test_stream_exists(broker, stream):
    body = assert_dis_error(call(broker, "POST", f"/v2/{PID}/streams", {"stream_name": stream, "partition_count": 1}),
                            400, "DIS.4307")
    assert stream in body["error_msg"]


# -- PutRecords: whole-request errors -----------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    (b"{", "DIS.4300"),
    (b"not json at all", "DIS.4300"),
    (b"", "DIS.4300"),
    (b"[]", "DIS.4300"),
    (b'[{"stream_name": "s"}]', "DIS.4300"),
    (b'"records"', "DIS.4300"),
    (b"3.14", "DIS.4300"),
    (b"true", "DIS.4300"),
    (b'{"stream_name": "s", "records": [NaN]}', "DIS.4300"),
    ({"records": [{"data": "YQ=="}]}, "DIS.4200"),
    ({"stream_name": 7, "records": [{"data": "YQ=="}]}, "DIS.4200"),
    ({"stream_name": None, "records": [{"data": "YQ=="}]}, "DIS.4200"),
    ({"stream_name": "STREAM"}, "DIS.4200"),
    ({"stream_name": "STREAM", "records": None}, "DIS.4200"),
    ({"stream_name": "STREAM", "records": {"data": "YQ=="}}, "DIS.4200"),
    ({"stream_name": "STREAM", "records": "YQ=="}, "DIS.4200"),
    ({"stream_name": "STREAM", "records": 1}, "DIS.4200"),
    ({"stream_name": "STREAM", "records": []}, "DIS.4202"),
    ({"stream_name": "no-such-stream-here", "records": [{"data": "YQ=="}]}, "DIS.4301"),
])
def test_put_records_rejects_bad_bodies(broker, stream, body, code):
    if isinstance(body, dict) and body.get("stream_name") == "STREAM":
        body = {**body, "stream_name": stream}
    assert_dis_error(call(broker, "POST", f"/v2/{PID}/records", body), 400, code)


def test_put_records_too_many_records(broker, stream):
    body = assert_dis_error(put(broker, stream, [{"data": ""}] * 10_001), 400, "DIS.4200")
    assert "10000" in body["error_msg"]
    assert assert_put_result(put(broker, stream, [{"data": "", "partition_id": "0"}] * 10_000),
                             10_000)["failed_record_count"] == 0


def test_put_records_total_payload_over_5_mib_is_413(broker, stream):
    one_mib = b64(b"\x00" * MIB)
    body = assert_dis_error(put(broker, stream, [{"data": one_mib, "partition_id": "1"}] * 5 + [{"data": "YQ=="}]),
                            413, "DIS.4300")
    assert "payload" in body["error_msg"]
    # nothing of the rejected request was written
    read = call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": get_cursor(broker, stream, "1")})
    assert read.status == 200 and read.json["records"] == []
    # exactly 5 MiB is still fine
    assert assert_put_result(put(broker, stream, [{"data": one_mib, "partition_id": "1"}] * 5), 5)[
        "failed_record_count"] == 0


def _raw_response(sock: socket.socket) -> http.client.HTTPResponse:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp


def test_http_body_over_12_mib_is_413_without_reading_it(broker):
    """A declared Content-Length over the 12 MiB gateway cap is refused at once."""
    with socket.create_connection(_addr(broker.http_url), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST /v2/%s/records HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{\"stream_name\": " % (PID.encode(), 12 * MIB + 1))
        resp = _raw_response(sock)
        reply = Reply(resp.status, resp.headers, resp.read())
        assert time.monotonic() - t0 < 5
    body = assert_dis_error(reply, 413, "DIS.4300")
    assert str(12 * MIB) in body["error_msg"]


def test_http_body_over_12_mib_is_413(broker, stream):
    reply = call(broker, "POST", f"/v2/{PID}/records", b" " * (12 * MIB + 10))
    assert_dis_error(reply, 413, "DIS.4300")


def test_chunked_body_over_12_mib_is_413(broker):
    """No Content-Length to check up front: the cap applies while reading."""
    with socket.create_connection(_addr(broker.http_url), timeout=10) as sock:
        sock.sendall(b"POST /v2/%s/streams HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" % PID.encode())
        chunk = b" " * MIB
        for _ in range(13):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        resp = _raw_response(sock)
        reply = Reply(resp.status, resp.headers, resp.read())
    assert_dis_error(reply, 413, "DIS.4300")


# -- PutRecords: per-record errors --------------------------------------------------------------

def test_put_records_bad_entries_fail_one_by_one(broker, stream):
    good = b64(b"good")
    records: list[Any] = [
        {"data": good, "partition_id": "0"},
        "YQ==",                                             # record as a string
        17,                                                 # record as a number
        None,
        [{"data": good}],
        {},                                                 # no data
        {"data": 5},
        {"data": None, "partition_id": "0"},
        {"data": "YQ"},                                     # missing padding
        {"data": "Y Q=="},
        {"data": "YQ==\n"},
        {"data": "-_8="},                                   # url-safe alphabet
        {"data": "YQ==YQ=="},
        {"data": "é"},
        {"data": good, "partition_key": 5},
        {"data": good, "partition_key": "k" * 257},
        {"data": good, "partition_id": True},
        {"data": good, "partition_id": 1.0},
        {"data": good, "partition_id": {"id": 1}},
        {"data": good, "partition_id": "one"},              # DIS.4201
        {"data": good, "partition_id": "shardId-abc"},      # DIS.4201
        {"data": good, "partition_id": "٢"},                # DIS.4201: only ASCII digits
        {"data": good, "partition_id": "3"},                # DIS.4302
        {"data": good, "explicit_hash_key": "-1"},
        {"data": good, "explicit_hash_key": "1e3"},
        {"data": good, "explicit_hash_key": str(2**63)},
        {"data": good, "explicit_hash_key": 1.5},
        {"data": b64(b"\x00" * (MIB + 1)), "partition_id": "0"},
        {"data": good, "partition_id": 0},                  # a number is tolerated for partition_id
        {"data": good, "explicit_hash_key": 0},             # ... and for explicit_hash_key
        {"data": "", "partition_id": "shardId-0000000000"},
    ]
    body = assert_put_result(put(broker, stream, records), len(records))
    codes = [r.get("error_code") for r in body["records"]]
    assert codes == [None] + ["DIS.4200"] * 18 + ["DIS.4201"] * 3 + ["DIS.4302"] + ["DIS.4200"] * 5 + [None] * 3
    assert body["failed_record_count"] == 27
    assert [r["sequence_number"] for r in body["records"] if "sequence_number" in r] == ["0", "1", "2", "3"]
    assert body["records"][-3]["partition_id"] == "shardId-0000000000"


# -- DescribeStream / DeleteStream / ListStreams ----------------------------------------------

def test_unknown_stream_everywhere(broker):
    name = f"ghost-{uuid.uuid4().hex[:8]}"
    for method, path, query in [("GET", f"/v2/{PID}/streams/{name}", None),
                                ("DELETE", f"/v2/{PID}/streams/{name}", None),
                                ("GET", f"/v2/{PID}/cursors", {"stream-name": name, "partition-id": "0"})]:
        body = assert_dis_error(call(broker, method, path, query=query), 400, "DIS.4301")
        assert name in body["error_msg"]
    assert_dis_error(put(broker, name, [{"data": "YQ=="}]), 400, "DIS.4301")


def test_put_records_falls_back_to_stream_id_in_its_project(broker, stream):
    """Spec 2.6: `stream_id` is the lookup when no stream has the name; only the project's own."""
    sid = call(broker, "GET", f"/v2/{PID}/streams/{stream}").json["stream_id"]
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    for sid_given in (sid, int(sid)):
        body = {"stream_name": ghost, "stream_id": sid_given, "records": [{"data": "YQ==", "partition_id": "2"}]}
        reply = call(broker, "POST", f"/v2/{PID}/records", body)
        assert reply.status == 200 and reply.json["failed_record_count"] == 0, reply.raw
    read = call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": get_cursor(broker, stream, "2")})
    assert [r["data"] for r in read.json["records"]] == ["YQ==", "YQ=="]
    # the name wins when it names a stream; ids that are no stream of this project are not followed
    other = f"other-{uuid.uuid4().hex[:8]}"
    create(broker, other, 1)
    reply = call(broker, "POST", f"/v2/{PID}/records",
                 {"stream_name": other, "stream_id": sid, "records": [{"data": "YQ==", "partition_id": "2"}]})
    assert reply.json["records"][0]["error_code"] == "DIS.4302"   # `other` has one partition
    for bad in ("999999999999", "-1", "abc", "0" * 30, True, None, [sid]):
        assert_dis_error(call(broker, "POST", f"/v2/{PID}/records",
                              {"stream_name": ghost, "stream_id": bad, "records": [{"data": "YQ=="}]}), 400, "DIS.4301")
    assert_dis_error(call(broker, "POST", "/v2/another-project/records",
                          {"stream_name": ghost, "stream_id": sid, "records": [{"data": "YQ=="}]}), 400, "DIS.4301")


@pytest.mark.parametrize("query", [
    {"limit_partitions": "abc"}, {"limit_partitions": "1.5"}, {"limit_partitions": "0"},
    {"limit_partitions": "1001"}, {"limit_partitions": "-3"}, {"limit_partitions": "1_0"},
    {"limit_partitions": " 5"}, {"limit_partitions": "５"},
    {"start_partitionId": "abc"}, {"start_partitionId": "shardId-"}, {"start_partitionId": "-1"},
])
def test_describe_bad_query(broker, stream, query):
    code = "DIS.4201" if "start_partitionId" in query else "DIS.4200"
    assert_dis_error(call(broker, "GET", f"/v2/{PID}/streams/{stream}", query=query), 400, code)


@pytest.mark.parametrize("limit", ["abc", "0", "101", "-1", "1.0", "1e2", "0x10", "1_0", " 5", "５",
                                   "9" * 5000])
def test_list_streams_bad_limit(broker, limit):
    body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/streams", query={"limit": limit}), 400, "DIS.4200")
    assert "limit" in body["error_msg"]


# -- GetCursor ---------------------------------------------------------------------------------

@pytest.mark.parametrize("partition, code", [
    ("abc", "DIS.4201"), ("-1", "DIS.4201"), ("shardId-", "DIS.4201"), ("shardId-00000000001", "DIS.4201"),
    ("1.0", "DIS.4201"), ("٢", "DIS.4201"), ("shardId-٠٠٠٠٠٠٠٠٠١", "DIS.4201"),
    ("3", "DIS.4302"), ("shardId-0000000003", "DIS.4302"), ("9999999999", "DIS.4302"),
])
def test_get_cursor_bad_partition_id(broker, stream, partition, code):
    body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/cursors", query={
        "stream-name": stream, "partition-id": partition, "cursor-type": "TRIM_HORIZON"}), 400, code)
    assert partition in body["error_msg"]


@pytest.mark.parametrize("query, code", [
    ({}, "DIS.4200"),
    ({"partition-id": "0"}, "DIS.4200"),
    ({"stream-name": "STREAM"}, "DIS.4200"),
    ({"stream-name": "STREAM", "partition-id": ""}, "DIS.4200"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "trim_horizon"}, "DIS.4215"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "NEWEST"}, "DIS.4215"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "AT_SEQUENCE_NUMBER"}, "DIS.4216"),
    ({"stream-name": "STREAM", "partition-id": "0", "starting-sequence-number": "x"}, "DIS.4216"),
    ({"stream-name": "STREAM", "partition-id": "0", "starting-sequence-number": "+0"}, "DIS.4216"),
    ({"stream-name": "STREAM", "partition-id": "0", "starting-sequence-number": "1"}, "DIS.4224"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "AT_TIMESTAMP"}, "DIS.4200"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "AT_TIMESTAMP", "timestamp": "abc"}, "DIS.4200"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "AT_TIMESTAMP", "timestamp": "1.5e12"},
     "DIS.4200"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "AT_TIMESTAMP", "timestamp": "１"}, "DIS.4200"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "AT_TIMESTAMP", "timestamp": "-5"}, "DIS.4200"),
    ({"stream-name": "STREAM", "partition-id": "0", "cursor-type": "AT_TIMESTAMP", "timestamp": "1"}, "DIS.4300"),
])
def test_get_cursor_bad_query(broker, stream, query, code):
    query = {k: (stream if v == "STREAM" else v) for k, v in query.items()}
    body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/cursors", query=query), 400, code)
    if code == "DIS.4300":
        assert body["error_msg"].startswith("timestamp is expired, timestamp should be larger than ")


# -- GetRecords --------------------------------------------------------------------------------

def _forge(token: str, offset: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[offset] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_get_records_rejects_garbage_forged_and_truncated_cursors(broker, stream):
    put(broker, stream, [{"data": b64(b"secret"), "partition_id": "2"}])
    good = get_cursor(broker, stream, "0")
    raw_len = len(base64.urlsafe_b64decode(good + "=" * (-len(good) % 4)))
    bad = ["garbage", "****", "=", good[:-1], good[:10], good + "A", good + good, "A" * 513, good.upper(),
           # forged: a flipped bit anywhere (version, stream id, partition, sequence, time, tag)
           *[_forge(good, i) for i in (0, 8, 12, 20, 28, raw_len - 1)],
           # junk a lenient base64 decoder would skip, so the bytes (and the tag) stay the same
           good[:10] + "!" + good[10:], good[:20] + " " + good[20:], good + "==", good + "\n", "." + good,
           good.translate(str.maketrans("-_", "+/"))]
    bad = [c for c in bad if c != good]
    for cursor in bad:
        body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": cursor}),
                                400, "DIS.4217")
        assert "cursor" in body["error_msg"].lower()
    ok = call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": good})
    assert ok.status == 200 and ok.json["records"] == []


def test_get_records_needs_a_cursor(broker):
    for query in ({}, {"partition-cursor": ""}, {"partition_cursor": "x"}):
        assert_dis_error(call(broker, "GET", f"/v2/{PID}/records", query=query), 400, "DIS.4200")


@pytest.mark.parametrize("name, value", [
    ("limit", "abc"), ("limit", "1.5"), ("limit", "1_000"), ("limit", "10 "),
    ("max_fetch_bytes", "lots"), ("max_fetch_bytes", "1e6"), ("max_fetch_bytes", "0x100"), ("max_fetch_bytes", "１"),
])
def test_get_records_non_integer_params(broker, stream, name, value):
    cursor = get_cursor(broker, stream)
    body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": cursor, name: value}),
                            400, "DIS.4200")
    assert name in body["error_msg"]


def test_cursor_from_another_broker_is_rejected(broker, stream, start_broker):
    other = start_broker("--store", "memory")
    create(other, stream, 3)
    foreign = get_cursor(other, stream)
    assert_dis_error(call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": foreign}), 400, "DIS.4217")


def test_fuzz_cursor_and_record_queries(broker, stream):
    """Random query values for GetCursor and GetRecords: never a 5xx, errors always DIS-shaped."""
    good = get_cursor(broker, stream)
    texts = st.text(max_size=30) | st.integers(-2**70, 2**70).map(str) | st.sampled_from(
        ["0", "1", "2", "3", "shardId-0000000002", "TRIM_HORIZON", "LATEST", "AT_TIMESTAMP", "AT_SEQUENCE_NUMBER",
         "AFTER_SEQUENCE_NUMBER", stream, good, good[:-2], ""])
    cursor_queries = st.dictionaries(st.sampled_from(["stream-name", "partition-id", "cursor-type",
                                                      "starting-sequence-number", "timestamp"]), texts)
    record_queries = st.dictionaries(st.sampled_from(["partition-cursor", "limit", "max_fetch_bytes"]), texts)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["cursors", "records"]), cq=cursor_queries, rq=record_queries)
    def check(route: str, cq: dict[str, str], rq: dict[str, str]) -> None:
        reply = call(broker, "GET", f"/v2/{PID}/{route}", query=cq if route == "cursors" else rq)
        assert reply.status < 500, reply.raw[:300]
        if reply.status == 200:
            body = reply.json
            assert body.get("partition_cursor") or body.get("next_partition_cursor"), body
        else:
            assert_dis_error(reply, reply.status)

    check()


# -- routing: unknown routes, wrong methods, trailing slashes, request ids -----------------------

@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 404),
    ("GET", f"/v2/{PID}/nope", 404),
    ("GET", f"/v2/{PID}/streams/s1/transfer-tasks", 404),
    ("PUT", f"/v3/{PID}/streams/s", 404),
    ("GET", f"/v2/{PID}/streams/s/policies", 404),
    ("GET", "/v1/x/streams", 404),
    ("PUT", f"/v2/{PID}/records", 405),
    ("DELETE", f"/v2/{PID}/records", 405),
    ("POST", f"/v2/{PID}/cursors", 405),
    ("DELETE", f"/v2/{PID}/streams", 405),
    ("PATCH", f"/v2/{PID}/streams/s", 405),
    ("POST", f"/v2/{PID}/streams/s/", 405),
])
def test_unknown_route_and_wrong_method(broker, method, path, status):
    body = assert_dis_error(call(broker, method, path, b"{}"), status, "DIS.4200")
    assert method in body["error_msg"]


def test_a_path_segment_with_braces_reaches_its_route(broker):
    """The official SDK built without a project id sends the literal `/v2/%7Bproject_id%7D/...`
    (spec section 8): that is a request for a verb the door has, with a project id that is no
    project id, not an "Unsupported operation" 404. Likewise a stream or app name with braces."""
    body = assert_dis_error(call(broker, "GET", "/v2/%7Bproject_id%7D/streams"), 400, "DIS.4200")
    assert "project" in body["error_msg"] and "{project_id}" in body["error_msg"], body
    assert_dis_error(call(broker, "POST", "/v2/%7Bproject_id%7D/records", {"stream_name": "s", "records": []}),
                     400, "DIS.4200")
    body = assert_dis_error(call(broker, "GET", f"/v2/{PID}/streams/%7Bstream_name%7D"), 400, "DIS.4301")
    assert "{stream_name}" in body["error_msg"], body
    assert_dis_error(call(broker, "DELETE", f"/v2/{PID}/apps/%7Bapp%7D"), 400, "DIS.4200")


def test_trailing_slash_routes(broker, stream_name):
    base = f"/v2/{PID}"
    reply = call(broker, "POST", f"{base}/streams/", {"stream_name": stream_name, "partition_count": 2})
    assert reply.status == 201
    assert stream_name in call(broker, "GET", f"{base}/streams/", query={"limit": 100,
                                                                         "start_stream_name": stream_name[:-1]}).json[
        "stream_names"]
    assert call(broker, "GET", f"{base}/streams/{stream_name}/").json["stream_name"] == stream_name
    result = assert_put_result(put(broker, stream_name, [{"data": b64(b"slash"), "partition_id": "1"}],
                                   path=f"{base}/records/"), 1)
    assert result["records"][0] == {"partition_id": "shardId-0000000001", "sequence_number": "0"}
    cur = call(broker, "GET", f"{base}/cursors/", query={"stream-name": stream_name, "partition-id": "1",
                                                         "cursor-type": "TRIM_HORIZON"})
    assert cur.status == 200
    got = call(broker, "GET", f"{base}/records/", query={"partition-cursor": cur.json["partition_cursor"]})
    assert [base64.b64decode(r["data"]) for r in got.json["records"]] == [b"slash"]
    assert call(broker, "DELETE", f"{base}/streams/{stream_name}/").status == 204
    assert_dis_error(call(broker, "GET", f"{base}/streams/{stream_name}"), 400, "DIS.4301")


def test_request_id_is_echoed_or_generated(broker, stream):
    reply = call(broker, "GET", f"/v2/{PID}/streams/no-such", headers={"X-Request-Id": "client-chosen-42"})
    assert_dis_error(reply, 400, "DIS.4301")
    assert reply.headers["X-Request-Id"] == "client-chosen-42"
    ok = call(broker, "GET", f"/v2/{PID}/streams/{stream}", headers={"X-Request-Id": "client-chosen-43"})
    assert ok.status == 200 and ok.headers["X-Request-Id"] == "client-chosen-43"
    generated = {call(broker, "GET", f"/v2/{PID}/streams/no-such").headers["X-Request-Id"] for _ in range(3)}
    assert len(generated) == 3 and all(len(g) >= 16 for g in generated)


# -- slow and silent clients (a dedicated broker with short timeouts) ------------------------------

def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes, float]:
    """Read until EOF or `seconds`. Returns (closed by the peer, bytes received, elapsed)."""
    t0 = time.monotonic()
    data = b""
    sock.settimeout(0.25)
    while time.monotonic() - t0 < seconds:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, data, time.monotonic() - t0
        if not chunk:
            return True, data, time.monotonic() - t0
        data += chunk
    return False, data, time.monotonic() - t0


@pytest.fixture
def impatient_broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("--store", "memory", "--idle-timeout", "1", "--body-timeout", "1")


def test_silent_connection_is_closed_after_idle_timeout(impatient_broker):
    with socket.create_connection(_addr(impatient_broker.http_url), timeout=5) as sock:
        closed, data, elapsed = _closed_within(sock, 6)
    assert closed and data == b"", (closed, data)
    assert 0.5 <= elapsed < 4


def test_partial_headers_are_dropped_after_idle_timeout(impatient_broker):
    with socket.create_connection(_addr(impatient_broker.http_url), timeout=5) as sock:
        sock.sendall(b"GET /v2/p/streams HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed, data, elapsed = _closed_within(sock, 6)
    assert closed and elapsed < 4
    assert not data.startswith(b"HTTP/1.1 5")


def test_idle_keep_alive_connection_is_closed(impatient_broker):
    conn = http.client.HTTPConnection(*_addr(impatient_broker.http_url), timeout=5)
    try:
        conn.request("GET", f"/v2/{PID}/streams")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Connection", "keep-alive").lower() != "close"
        resp.read()
        closed, data, elapsed = _closed_within(conn.sock, 6)
    finally:
        conn.close()
    assert closed and data == b"" and elapsed < 4


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_partial_body_gets_408_within_body_timeout(impatient_broker, framing):
    create(impatient_broker, "slow", 1)
    head = f"POST /v2/{PID}/records HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if framing == "content-length":
        head += "Content-Length: 1000\r\n\r\n" + '{"stream_name": "slow", "rec'
    else:
        head += "Transfer-Encoding: chunked\r\n\r\n" + '10\r\n{"stream_name": '
    with socket.create_connection(_addr(impatient_broker.http_url), timeout=5) as sock:
        sock.sendall(head.encode())
        t0 = time.monotonic()
        try:
            resp = _raw_response(sock)
            reply: Reply | None = Reply(resp.status, resp.headers, resp.read())
        except (http.client.RemoteDisconnected, ConnectionResetError):
            reply = None  # closed without an answer: also acceptable
        elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 4, "the broker must neither answer before the body timeout nor wait forever"
    if reply is not None:
        assert_dis_error(reply, 408, "DIS.4200")
    # and the broker is fine afterwards; nothing was written
    read = call(impatient_broker, "GET", f"/v2/{PID}/records",
                query={"partition-cursor": get_cursor(impatient_broker, "slow")})
    assert read.status == 200 and read.json["records"] == []


# -- fuzz --------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)

partition_ids = st.one_of(st.none(), st.sampled_from(["0", "1", "2", "3", "shardId-0000000001", "x", "-1", "",
                                                      "shardId-9999999999", "٢"]),
                          st.integers(-5, 5), st.text(max_size=12), json_values)
hash_keys = st.one_of(st.none(), st.integers(-1, 2**64).map(str), st.integers(0, 2**63 - 1), st.text(max_size=22),
                      json_values)
datas = st.one_of(st.binary(max_size=64).map(b64), st.text(max_size=16), json_values)
entries = st.one_of(
    st.fixed_dictionaries({"data": datas}, optional={"partition_id": partition_ids, "explicit_hash_key": hash_keys,
                                                     "partition_key": st.one_of(st.text(max_size=20), json_values),
                                                     "timestamp": json_values}),
    json_values)


def test_fuzz_put_records_never_fails_the_server(broker, stream):
    """Random bytes, random JSON, and nearly-valid PutRecords bodies: always < 500, always either a
    DIS error or a PutRecords result with one entry per record."""
    names = st.one_of(st.just(stream), st.text(max_size=10), json_values)
    bodies = st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"stream_name": names, "records": st.one_of(st.lists(entries, max_size=8), json_values)})
        .map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"stream_name": st.just(stream), "records": st.lists(entries, min_size=1, max_size=8)})
        .map(lambda v: json.dumps(v).encode()),
    )
    seen_ok = []

    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body: bytes) -> None:
        reply = call(broker, "POST", f"/v2/{PID}/records", body)
        assert reply.status < 500, reply.raw[:300]
        if reply.status == 200:
            sent = json.loads(body)
            assert_put_result(reply, len(sent["records"]))
            seen_ok.append(reply.json["failed_record_count"] < len(sent["records"]))
        else:
            assert_dis_error(reply, reply.status)

    check()
    assert any(seen_ok), "the fuzzer never reached a successful write: strategies too weak"
