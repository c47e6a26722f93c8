"""Every numeric field of every DIS route (body and query) and of the SSE tail, fed huge and odd
values against a real broker: never a 5xx, and every error is a catalogued DIS error body.

This is the class of bug a fuzzer found (issue 7, item 3): a `sequence_number` or
`starting-sequence-number` of 5,000 digits made Python's int parsing raise ValueError (its
4,300-digit limit) and the broker answer 500. Each field is first fed every value of `ODD`
(deterministic, so the known cases always run), then random ones from hypothesis.

Fields that are strings on the wire (partition ids, sequence numbers, hash keys) get the same
values as strings; JSON fields also get unquoted number literals no JSON parser can hold
(5,000 digits, 1e400), and non-numbers (true, null, [], {}).
"""
from __future__ import annotations

import base64
import http.client
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from dis_http import PID, Reply, addr, assert_dis_error, call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import ErrorCode

HUGE = "9" * 5000
# Values every numeric field gets, as text (a query value, or a JSON string's content).
ODD = ["", " ", "0", "-0", "1", "-1", "+1", " 1", "1 ", "01", "1.0", "1.5", "1e3", "1E400", "0x10", "1_000",
       "\u0661", "\uff19", "NaN", "nan", "Infinity", "-Infinity", "inf", "true", "null", "\x00", "1\x00",
       "shardId-", "shardId-0000000001", "shardId--1", "shardId-" + HUGE, "SHARDID-0000000001",
       HUGE, "-" + HUGE, "9" * 4300, "9" * 4301, "1" + "0" * 30, "9" * 19, "9" * 20,
       str(2**31), str(2**32), str(2**63 - 1), str(2**63), str(2**64 - 1), str(2**64), str(-(2**63)),
       str(-(2**63) - 1)]
# JSON number literals (and non-numbers) sent unquoted in bodies.
RAW_JSON = [HUGE, "-" + HUGE, "9" * 4301, "1e400", "-1e400", "1E-400", "1.5", "-0", "0.0", "1e3",
            str(2**63 - 1), str(2**63), str(2**64 - 1), str(2**64), str(-(2**63) - 1), "1" + "0" * 30,
            "true", "false", "null", "[]", "{}", "[1]", '{"n": 1}', "0", "1", "-1", "3", "24", "72"]

texts = st.one_of(st.sampled_from(ODD), st.integers(-(2**70), 2**70).map(str), st.integers(-3, 30).map(str),
                  st.text(max_size=8))
raw_json = st.one_of(st.sampled_from(RAW_JSON), st.integers(-(2**70), 2**70).map(str),
                     st.integers(-3, 100).map(str), texts.map(json.dumps))


def as_json(value: str) -> str:
    """A query-style text as a JSON string literal (the way DIS clients send numeric strings)."""
    return json.dumps(value)


def body(**fields: str) -> bytes:
    """A JSON object from raw JSON literals (so a literal no encoder would produce can be sent)."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()


def _int_value(text: str) -> int | None:
    """`text` as the broker would read a decimal (ASCII `-?digits`), None if it is not one."""
    if not re.fullmatch(r"-?[0-9]+", text):
        return None
    try:
        return int(text)
    except ValueError:  # past this interpreter's digit limit: the broker refuses it too
        return None


@dataclass
class Env:
    broker: Any
    stream: str
    app: str
    records_per_partition: int
    first_timestamp: int

    def cursor(self, partition: str = "0") -> str:
        reply = call(self.broker, "GET", f"/v2/{PID}/cursors", query={
            "stream-name": self.stream, "partition-id": partition, "cursor-type": "TRIM_HORIZON"})
        assert reply.status == 200, reply.raw
        return reply.json["partition_cursor"]


@pytest.fixture(scope="module")
def env(broker) -> Env:  # type: ignore[no-untyped-def]
    stream, app = f"num-{uuid.uuid4().hex[:8]}", f"num-app-{uuid.uuid4().hex[:8]}"
    assert call(broker, "POST", f"/v2/{PID}/streams", {"stream_name": stream, "partition_count": 3}).status == 201
    records = [{"data": base64.b64encode(b"r%d" % i).decode(), "partition_id": str(p)} for p in range(3)
               for i in range(5)]
    assert call(broker, "POST", f"/v2/{PID}/records", {"stream_name": stream, "records": records}).json[
        "failed_record_count"] == 0
    assert call(broker, "POST", f"/v2/{PID}/apps", {"app_name": app}).status == 201
    assert call(broker, "POST", f"/v2/{PID}/checkpoints", {
        "app_name": app, "stream_name": stream, "partition_id": "0", "sequence_number": "2",
        "checkpoint_type": "LAST_READ"}).status == 201
    first = call(broker, "GET", f"/v2/{PID}/records", query={"partition-cursor": Env(
        broker, stream, app, 5, 0).cursor()}).json["records"][0]["timestamp"]
    return Env(broker, stream, app, 5, first)


def check(reply: Reply, value: str) -> None:
    assert reply.status < 500, (value[:60] + ("..." if len(value) > 60 else ""), reply.status, reply.raw[:300])
    if reply.status >= 400:
        assert_dis_error(reply, reply.status)
    elif reply.raw:
        payload = reply.json
        for record in payload.get("records", []) if isinstance(payload, dict) else []:
            if "error_code" in record:  # a per-record failure: a catalogued one, through the renderer
                assert ErrorCode[record["reason"]].dis_code == record["error_code"], record


# -- one sender per (route, field): (env, value) -> Reply --------------------------------------------

def _create_stream(field: str) -> Callable[[Env, str], Reply]:
    def send(env: Env, raw: str) -> Reply:
        name = f"numc-{uuid.uuid4().hex[:10]}"
        fields = {"stream_name": json.dumps(name), "partition_count": "1", field: raw}
        reply = call(env.broker, "POST", f"/v2/{PID}/streams", body(**fields))
        if reply.status == 201:
            assert call(env.broker, "DELETE", f"/v2/{PID}/streams/{name}").status == 204
        return reply
    return send


def _put_records(field: str) -> Callable[[Env, str], Reply]:
    def send(env: Env, raw: str) -> Reply:
        record = body(data='"YQ=="', **{field: raw}).decode()
        reply = call(env.broker, "POST", f"/v2/{PID}/records",
                     f'{{"stream_name": {json.dumps(env.stream)}, "records": [{record}]}}')
        if reply.status == 200:
            assert len(reply.json["records"]) == 1
        return reply
    return send


def _commit_checkpoint(field: str) -> Callable[[Env, str], Reply]:
    def send(env: Env, raw: str) -> Reply:
        fields = {"app_name": json.dumps(env.app), "stream_name": json.dumps(env.stream), "partition_id": '"0"',
                  "sequence_number": '"1"', "checkpoint_type": '"LAST_READ"', field: raw}
        return call(env.broker, "POST", f"/v2/{PID}/checkpoints", body(**fields))
    return send


def _query(method: str, path: Callable[[Env], str], base: Callable[[Env], dict[str, str]],
           field: str) -> Callable[[Env, str], Reply]:
    def send(env: Env, value: str) -> Reply:
        return call(env.broker, method, path(env), query={**base(env), field: value})
    return send


def _cursor_query(kind: str) -> Callable[[Env], dict[str, str]]:
    return lambda env: {"stream-name": env.stream, "partition-id": "0", "cursor-type": kind}


def _tail(field: str, base: dict[str, str], skip: Callable[[Env, str], bool] = lambda env, v: False
          ) -> Callable[[Env, str], Reply | None]:
    """The SSE tail answers 200 and then streams: only its status and headers are read. Values
    that would make it wait for a record not yet written (a valid position at the end of the
    partition) are skipped - a valid wait, not a bug, and GetCursor covers the same parsing."""
    def send(env: Env, value: str) -> Reply | None:
        if skip(env, value):
            return None
        query = {"project": PID, "stream-name": env.stream, "partition-id": "0", **base, field: value}
        conn = http.client.HTTPConnection(*addr(env.broker.http_url), timeout=30)
        try:
            conn.request("GET", "/sluice/v1/tail?" + urlencode(query, quote_via=quote))
            resp = conn.getresponse()
            raw = b"" if resp.status == 200 else resp.read()
            return Reply(resp.status, resp.headers, raw)
        finally:
            conn.close()
    return send


def _at_the_end(env: Env, value: str) -> bool:
    """AT_SEQUENCE_NUMBER of the next record to be written: valid, and it waits for that record."""
    return _int_value(value) == env.records_per_partition


def _not_before_the_first_record(env: Env, value: str) -> bool:
    n = _int_value(value)
    return n is not None and n >= env.first_timestamp


def _stream(env: Env) -> str:
    return f"/v2/{PID}/streams/{env.stream}"


def _checkpoint_base(env: Env) -> dict[str, str]:
    return {"app_name": env.app, "stream_name": env.stream, "checkpoint_type": "LAST_READ"}


SENDERS: dict[str, tuple[Callable[[Env, str], Reply | None], bool]] = {
    # name: (sender, takes raw JSON literals)
    "CreateStream partition_count": (_create_stream("partition_count"), True),
    "CreateStream data_duration": (_create_stream("data_duration"), True),
    "ListStreams limit": (_query("GET", lambda e: f"/v2/{PID}/streams", lambda e: {}, "limit"), False),
    "DescribeStream limit_partitions": (_query("GET", _stream, lambda e: {}, "limit_partitions"), False),
    "DescribeStream start_partitionId": (_query("GET", _stream, lambda e: {}, "start_partitionId"), False),
    "PutRecords partition_id": (_put_records("partition_id"), True),
    "PutRecords explicit_hash_key": (_put_records("explicit_hash_key"), True),
    "PutRecords timestamp": (_put_records("timestamp"), True),
    "GetCursor partition-id": (_query("GET", lambda e: f"/v2/{PID}/cursors",
                                      lambda e: {"stream-name": e.stream, "cursor-type": "TRIM_HORIZON"},
                                      "partition-id"), False),
    "GetCursor starting-sequence-number AT": (_query("GET", lambda e: f"/v2/{PID}/cursors",
                                                     _cursor_query("AT_SEQUENCE_NUMBER"),
                                                     "starting-sequence-number"), False),
    "GetCursor starting-sequence-number AFTER": (_query("GET", lambda e: f"/v2/{PID}/cursors",
                                                        _cursor_query("AFTER_SEQUENCE_NUMBER"),
                                                        "starting-sequence-number"), False),
    "GetCursor timestamp": (_query("GET", lambda e: f"/v2/{PID}/cursors", _cursor_query("AT_TIMESTAMP"),
                                   "timestamp"), False),
    "GetRecords limit": (_query("GET", lambda e: f"/v2/{PID}/records",
                                lambda e: {"partition-cursor": e.cursor()}, "limit"), False),
    "GetRecords max_fetch_bytes": (_query("GET", lambda e: f"/v2/{PID}/records",
                                          lambda e: {"partition-cursor": e.cursor()}, "max_fetch_bytes"), False),
    # records are waiting at the cursor, so a valid wait_ms answers at once
    "GetRecords wait_ms": (_query("GET", lambda e: f"/v2/{PID}/records",
                                  lambda e: {"partition-cursor": e.cursor()}, "wait_ms"), False),
    "ListApps limit": (_query("GET", lambda e: f"/v2/{PID}/apps", lambda e: {}, "limit"), False),
    "ConsumerState limit": (_query("GET", lambda e: f"/v2/{PID}/apps/{e.app}/streams/{e.stream}",
                                   lambda e: {"checkpoint_type": "LAST_READ"}, "limit"), False),
    "ConsumerState start_partition_id": (_query("GET", lambda e: f"/v2/{PID}/apps/{e.app}/streams/{e.stream}",
                                                lambda e: {"checkpoint_type": "LAST_READ"}, "start_partition_id"),
                                         False),
    "CommitCheckpoint partition_id": (_commit_checkpoint("partition_id"), True),
    "CommitCheckpoint sequence_number": (_commit_checkpoint("sequence_number"), True),
    "GetCheckpoint partition_id": (_query("GET", lambda e: f"/v2/{PID}/checkpoints", _checkpoint_base,
                                          "partition_id"), False),
    "DeleteCheckpoint partition_id": (_query("DELETE", lambda e: f"/v2/{PID}/checkpoints", _checkpoint_base,
                                             "partition_id"), False),
    "Tail partition-id": (_tail("partition-id", {"cursor-type": "TRIM_HORIZON", "max_wait_ms": "0"}), False),
    "Tail starting-sequence-number": (_tail("starting-sequence-number",
                                            {"cursor-type": "AT_SEQUENCE_NUMBER", "max_wait_ms": "0"},
                                            _at_the_end), False),
    "Tail timestamp": (_tail("timestamp", {"cursor-type": "AT_TIMESTAMP", "max_wait_ms": "0"},
                             _not_before_the_first_record), False),
    "Tail max_records": (_tail("max_records", {"cursor-type": "TRIM_HORIZON", "max_wait_ms": "0"}), False),
    "Tail max_wait_ms": (_tail("max_wait_ms", {"cursor-type": "TRIM_HORIZON", "max_records": "1"}), False),
}


@pytest.mark.parametrize("name", list(SENDERS))
def test_numeric_field_never_fails_the_server(env: Env, name: str) -> None:
    send, takes_json = SENDERS[name]
    fixed = [as_json(v) for v in ODD] + RAW_JSON if takes_json else ODD
    for value in fixed:
        reply = send(env, value)
        if reply is not None:
            check(reply, value)

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(value=raw_json if takes_json else texts)
    def random_values(value: str) -> None:
        reply = send(env, value)
        if reply is not None:
            check(reply, value)

    random_values()


def test_the_fuzzers_two_cases_are_dis_4216(env: Env) -> None:
    """The two 500s the fuzzer found, pinned: invalid sequence number, not a server error."""
    reply = call(env.broker, "GET", f"/v2/{PID}/cursors", query={
        "stream-name": env.stream, "partition-id": "0", "cursor-type": "AT_SEQUENCE_NUMBER",
        "starting-sequence-number": HUGE})
    assert_dis_error(reply, 400, "DIS.4216", reason=ErrorCode.INVALID_SEQUENCE)
    reply = call(env.broker, "POST", f"/v2/{PID}/checkpoints", {
        "app_name": env.app, "stream_name": env.stream, "partition_id": "0", "sequence_number": HUGE,
        "checkpoint_type": "LAST_READ"})
    assert_dis_error(reply, 400, "DIS.4216", reason=ErrorCode.INVALID_SEQUENCE)
