"""Fuzz of the DIS REST door (and the SSE tail, which speaks DIS errors) over raw HTTP.

What tests/api already fuzzes is not repeated: PutRecords bodies (test_dis_errors), GetCursor and
GetRecords query values (test_dis_errors), each numeric field alone (test_numeric_fields),
CommitCheckpoint fields (test_consumers_http). Here, what those do not reach:
- every route of the door, taken from the door's own router, with every method, odd path
  segments and junk query strings;
- bodies of every kind on every route: JSON with wrong types in every known field, huge numbers,
  deep nesting, invalid UTF-8 and NUL bytes inside strings, invalid base64, bytes that are no JSON;
- the headers around them: Content-Type, Content-Encoding (gzip/deflate that is and is not),
  chunked framing, a Content-Length that lies, odd X-Request-Id values.
Every answer is < 500 and, unless it is a success or a HEAD, a DIS error body.
"""
from __future__ import annotations

import base64
import gzip
import json
import string
import time
import zlib
from collections import Counter
from typing import Any, Iterator
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.api import dis, tail
from broker.launcher import BrokerProcess

from .harness import Reply, assert_dis_error, budget, guarded_broker, http_request, json_body, no_5xx, target

PID = "fuzz"
STREAM = "fz-stream"        # 3 partitions, a few records: the fuzz reaches real reads
APP = "fz-app"


def _routes() -> list[tuple[str, str]]:
    """(method, path template) of every DIS and tail route, read from the doors' routers, so a new
    route is fuzzed without touching this file."""
    found = []
    for door, prefix in ((dis.build_app(None, None), dis.PREFIX), (tail.build_app(None, None), tail.PREFIX)):  # type: ignore[arg-type]
        for route in door.router.routes():
            path = route.resource.canonical if route.resource else ""
            if not path.endswith("/"):   # the trailing-slash twins are drawn below
                found.append((route.method, prefix + path))
    assert len(found) >= 16, found
    return sorted(set(found))


ROUTES = _routes()


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with guarded_broker(tmp_path_factory.mktemp("fuzz-dis") / "data", project=PID) as proc:
        setup = [("POST", f"/v2/{PID}/streams", {"stream_name": STREAM, "partition_count": 3}),
                 ("POST", f"/v2/{PID}/apps", {"app_name": APP}),
                 ("POST", f"/v2/{PID}/records", {"stream_name": STREAM, "records": [
                     {"data": "YQ==", "partition_id": str(i % 3)} for i in range(9)]}),
                 ("POST", f"/v2/{PID}/checkpoints", {"app_name": APP, "stream_name": STREAM, "partition_id": "0",
                                                     "sequence_number": "1", "checkpoint_type": "LAST_READ"})]
        for method, path, body in setup:
            reply = send(proc, method, path, json_body(body))
            assert reply is not None and reply.status in (200, 201), (path, reply)
        yield proc


@pytest.fixture(scope="module")
def cursor(fuzz_broker: BrokerProcess) -> str:
    reply = send(fuzz_broker, "GET", target(f"/v2/{PID}/cursors", VALID_QUERY["cursors"]))
    assert reply is not None and reply.status == 200, reply
    return str(reply.json["partition_cursor"])


def send(proc: BrokerProcess, method: str, t: str, body: bytes = b"",
         headers: list[tuple[str, str | bytes]] | None = None, **kw: Any) -> Reply | None:
    return http_request(proc.host, proc.http_port, method, t, body,
                        [("Content-Type", "application/json")] if headers is None else headers, **kw)


# -- strategies ---------------------------------------------------------------------------------------

HUGE = st.sampled_from([2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30, -10**30, 1e308, -1e308, 5e-324, 0.1, -0.0])
TEXT = st.text(max_size=24) | st.sampled_from(["", " ", "\x00", "a\x00b", "ünï", "\u202e", "💥", "%00", "../..",
                                               "x" * 300, STREAM, APP, PID, "0", "-1", "shardId-0000000001"])
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | HUGE | st.floats(allow_nan=False) | TEXT
WILD = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
B64 = st.one_of(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
                st.sampled_from(["YQ", "Y Q==", "YQ==\n", "-_8=", "====", "YQ==YQ==", "é", "\x00", ""]), WILD)
ENTRIES = st.one_of(
    st.fixed_dictionaries({"data": B64}, optional={"partition_id": WILD | st.sampled_from(["0", "2", "3", "99"]),
                                                   "partition_key": WILD, "explicit_hash_key": WILD}), WILD)
# every field any DIS body has, each with wild values (and sometimes a plausible one)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "stream_name": st.sampled_from([STREAM, "nosuch", "new-fz"]) | WILD,
    "partition_count": st.integers(-2, 300) | WILD,
    "data_duration": st.sampled_from([24, 72, 73]) | WILD,
    "data_type": st.sampled_from(["BLOB", "JSON", "CSV", "XML"]) | WILD,
    "stream_type": st.sampled_from(["COMMON", "ADVANCED", "TURBO"]) | WILD,
    "records": st.lists(ENTRIES, max_size=6) | WILD,
    "app_name": st.sampled_from([APP, "new-app", ""]) | WILD,
    "partition_id": st.sampled_from(["0", "2", "3", "shardId-0000000001"]) | WILD,
    "sequence_number": st.sampled_from(["0", "8", "-1", "9" * 30]) | WILD,
    "metadata": WILD,
    "checkpoint_type": st.sampled_from(["LAST_READ", "NOPE"]) | WILD,
}
JSON_OBJECTS = st.fixed_dictionaries({}, optional={**FIELDS, "\x00": WILD, "unknown_field": WILD})
SPECIAL_BODIES = st.sampled_from([
    b"", b"null", b"{}", b"[]", b"\xef\xbb\xbf{}", b"{\"stream_name\": \"\xff\xfe\"}", b"{\"stream_name\": \"a\x00b\"}",
    b"\x00" * 64, b"[" * 5000 + b"]" * 5000, b"{\"a\":" * 3000 + b"1" + b"}" * 3000, b"9" * 5000,
    b"{\"partition_count\": " + b"9" * 5000 + b"}", b"{\"partition_count\": 1e999}", b"{\"partition_count\": -0}",
    b"{\"stream_name\": \"\\ud800\"}", b"{\"stream_name\": \"x\", \"stream_name\": 1}", b"{'a': 1}", b"{\"a\": NaN}",
    b"{\"records\": [" + b"{}," * 2000 + b"{}]}", b"\xff\xfe{\x00}\x00", b"\x1f\x8b\x08\x00junk",
])


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


BODIES = st.one_of(JSON_OBJECTS.map(_json_bytes), WILD.map(_json_bytes), st.binary(max_size=120), SPECIAL_BODIES,
                   JSON_OBJECTS.map(lambda o: json.dumps(o, ensure_ascii=False).encode("utf-8", "surrogatepass")))

SEGMENT = st.sampled_from([STREAM, STREAM, STREAM, APP, APP, APP, "nosuch", "", "%00", "%FF", "%2F", "..", ".", "a b",
                           "ünï", "x" * 300,
                           "%", "%zz", "shardId-1"]) | st.text(max_size=12).map(lambda s: quote(s, safe=""))
PROJECTS = st.sampled_from([PID] * 8 + ["default", "other", "has space", "x" * 65, "%00", "ünï"])
QUERY_KEYS = st.sampled_from(["stream-name", "partition-id", "cursor-type", "starting-sequence-number", "timestamp",
                              "partition-cursor", "limit", "max_fetch_bytes", "wait_ms", "start_stream_name",
                              "start_partitionId", "limit_partitions", "start_app_name", "stream_name", "app_name",
                              "checkpoint_type", "partition_id", "start_partition_id", "project", "max_records",
                              "max_wait_ms"]) | st.text(max_size=8)
QUERY_VALUES = st.one_of(TEXT, st.integers(-2**70, 2**70).map(str), st.sampled_from(
    ["TRIM_HORIZON", "LATEST", "AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER", "AT_TIMESTAMP", "LAST_READ", "0", "2",
     "1", "100", "9" * 5000, "1e3", "0x10", " 5", "\uff15", "-0"]))
RAW_QUERIES = st.text(alphabet=string.ascii_letters + string.digits + "%&=+;-_.~!$'()*,:@/?[]", max_size=40)

# A valid request of each route (by its path's last words): the fuzz starts from it and breaks a
# field or two, so most examples get past the first check and into the core. "@CURSOR@" is a real
# cursor of STREAM, filled in when sent.
CHECKPOINT = {"app_name": APP, "stream_name": STREAM, "partition_id": "0", "sequence_number": "1",
              "checkpoint_type": "LAST_READ"}
VALID_QUERY: dict[str, dict[str, str]] = {
    "streams": {"limit": "10"}, "{stream_name}": {"limit_partitions": "2"}, "records": {"partition-cursor": "@CURSOR@"},
    "cursors": {"stream-name": STREAM, "partition-id": "0", "cursor-type": "TRIM_HORIZON"}, "apps": {"limit": "10"},
    "checkpoints": {k: v for k, v in CHECKPOINT.items() if k != "sequence_number"},
    "tail": {"stream-name": STREAM, "partition-id": "1", "cursor-type": "TRIM_HORIZON", "project": PID},
}
VALID_BODY: dict[str, dict[str, Any]] = {
    "streams": {"stream_name": "fz-new", "partition_count": 1},
    "records": {"stream_name": STREAM, "records": [{"data": "YQ==", "partition_id": "0"}, {"data": ""}]},
    "apps": {"app_name": "fz-new-app"}, "checkpoints": CHECKPOINT,
}


def near(valid: dict[str, Any], keys: st.SearchStrategy[str], values: st.SearchStrategy[Any],
         ) -> st.SearchStrategy[dict[str, Any]]:
    """`valid` with up to one key dropped and up to two keys set to `values`."""
    names = sorted(valid)
    drops = st.sets(st.sampled_from(names), max_size=1) if names else st.just(set())
    overrides = st.dictionaries(st.sampled_from(names) | keys if names else keys, values, max_size=2)
    return st.builds(lambda drop, over: {**{k: v for k, v in valid.items() if k not in drop}, **over}, drops,
                     overrides)


def _last_word(template: str) -> str:
    words = template.rstrip("/").split("/")
    return "tail" if words[-1] == "tail" else "{stream_name}" if words[-1] == "{stream_name}" and "apps" not in \
        template else words[-1]
CONTENT_TYPES = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain",
                                 "application/json; charset=latin-1", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json;;;", "", "*/*"]) | \
    st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=30)
ENCODINGS = st.sampled_from([None, None, None, "gzip", "deflate", "identity", "GZIP", "br", "zstd", "compress",
                             "gzip, gzip", "gzip, identity", "x-gzip", "", "*"])
REQUEST_IDS = st.none() | st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _encoded(body: bytes, encoding: str | None, honest: bool) -> bytes:
    if not honest or encoding is None:
        return body
    if encoding.lower() in ("gzip", "x-gzip"):
        return gzip.compress(body)
    if encoding.lower() == "deflate":
        return zlib.compress(body)
    return body


def _chunked(body: bytes, size: int) -> bytes:
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def check(reply: Reply | None, method: str, context: object, expect: str | None = None) -> None:
    assert reply is not None, ("the broker closed the connection without an answer", context)
    if expect is not None and expect.lower() != "100-continue" and reply.status == 417:
        # KNOWN GAP (reported to the lead): aiohttp answers an unknown `Expect` itself, before any
        # middleware, as a text/plain 417 without X-Request-Id. A 4xx, so no more is asked here.
        return
    no_5xx(reply, context)
    if method == "HEAD" or reply.status < 400:
        return
    assert_dis_error(reply, reply.status)


# -- every route, every method, odd paths and queries ---------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "same", "same", "same"])
JUNK_QUERIES = st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=6) | RAW_QUERIES.map(lambda q: q or "x")


def _query_for(route: tuple[str, str]) -> st.SearchStrategy[Any]:
    """Near the route's valid query most of the time, junk otherwise."""
    return near(VALID_QUERY.get(_last_word(route[1]), {}), QUERY_KEYS, QUERY_VALUES) | JUNK_QUERIES


def _body_for(route: tuple[str, str]) -> st.SearchStrategy[bytes]:
    """Near the route's valid body (if it takes one) most of the time, any body otherwise."""
    word = _last_word(route[1])
    if route[0] != "POST" or word not in VALID_BODY:
        return BODIES
    return near(VALID_BODY[word], st.sampled_from(sorted(FIELDS)), WILD).map(_json_bytes) | BODIES


ROUTE_REQUESTS = st.sampled_from(ROUTES).flatmap(
    lambda r: st.tuples(st.just(r), st.tuples(_query_for(r), _body_for(r))))


def test_every_route_and_method_with_junk(fuzz_broker: BrokerProcess, cursor: str) -> None:
    seen: Counter[int] = Counter()

    @budget(1500)
    @given(request=ROUTE_REQUESTS, method=METHODS, project=PROJECTS, segments=st.tuples(SEGMENT, SEGMENT),
           slash=st.booleans())
    def one(request: tuple[tuple[str, str], tuple[Any, bytes]], method: str, project: str,
            segments: tuple[str, str], slash: bool) -> None:
        (route_method, template), (query, body) = request
        method = route_method if method == "same" else method
        path = (template.replace("{project_id}", project).replace("{stream_name}", segments[0])
                .replace("{app_name}", segments[1]) + ("/" if slash else ""))
        if isinstance(query, dict):
            query = {k: cursor if v == "@CURSOR@" else v for k, v in query.items()}
        t = path + "?" + query if isinstance(query, str) else target(path, query)
        is_tail = template.startswith(tail.PREFIX)
        try:
            reply = send(fuzz_broker, method, t, body, timeout=1.0 if is_tail else 15)
        except TimeoutError:
            # a tail that was valid waits for records (a long poll, by design): only the tail's GET
            # may (a HEAD is a 405: served as the GET, its events followed its headers)
            assert is_tail and method == "GET", (method, t)
            return
        check(reply, method, (method, t, body[:80]))
        assert reply is not None
        seen[reply.status // 100] += 1
        if method == "DELETE" and reply.status == 204 and STREAM in t:
            send(fuzz_broker, "POST", f"/v2/{PID}/streams", json_body({"stream_name": STREAM, "partition_count": 3}))

    one()
    assert seen[2] >= 40 and seen[4] >= 100, f"strategies too weak to reach both answers: {seen}"


# -- headers and framing around bodies -----------------------------------------------------------------

POSTS = [route for route in ROUTES if route[0] == "POST"]
POST_REQUESTS = st.sampled_from(POSTS).flatmap(lambda r: st.tuples(st.just(r[1]), _body_for(r)))
HEADER_TEXT = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=30)
EXTRA_HEADERS = st.lists(st.tuples(
    st.sampled_from(["Accept", "Accept-Encoding", "Expect", "Expect", "X-Project-Id", "Range", "Content-Language",
                     "Content-MD5", "If-Match", "Cookie", "Host", "Content-Type", "Content-Encoding"]),
    st.sampled_from(["100-continue", "100-Continue", "gzip", "application/json"]) | HEADER_TEXT), max_size=3)


def _sometimes(strategy: st.SearchStrategy[Any], default: Any) -> st.SearchStrategy[Any]:
    """`strategy` one time in three, else `default`: odd headers one at a time, mostly."""
    return st.integers(0, 2).flatmap(lambda i: strategy if i == 0 else st.just(default))


def test_bodies_under_odd_headers(fuzz_broker: BrokerProcess) -> None:
    seen: Counter[int] = Counter()
    codes: Counter[int] = Counter()   # each status, for a failure's message
    # the fuzz above may have deleted them; and the checkpoints' sequence numbers (0, 1, 8) need
    # records: a stream made again here was empty, and half the successes went (19 of 1000 in a CI run)
    records = [{"data": "eA==", "partition_id": str(p)} for p in range(3) for _ in range(10)]
    for path, body in ((f"/v2/{PID}/streams", {"stream_name": STREAM, "partition_count": 3}),
                       (f"/v2/{PID}/apps", {"app_name": APP}),
                       (f"/v2/{PID}/records", {"stream_name": STREAM, "records": records})):
        send(fuzz_broker, "POST", path, json_body(body))

    @budget(1000)
    @given(request=POST_REQUESTS, content_type=_sometimes(CONTENT_TYPES, "application/json"),
           encoding=_sometimes(ENCODINGS, None), honest=st.booleans(), chunk=_sometimes(st.integers(1, 64), None),
           request_id=_sometimes(REQUEST_IDS, None), extra=_sometimes(EXTRA_HEADERS, []))
    def one(request: tuple[str, bytes], content_type: str | None, encoding: str | None, honest: bool,
            chunk: int | None, request_id: bytes | None, extra: list[tuple[str, str]]) -> None:
        path, body = request[0].replace("{project_id}", PID), request[1]
        if path.endswith("/streams"):   # do not make hundreds of streams
            body = body.replace(b"new-fz", b"no such name")
        headers: list[tuple[str, str | bytes]] = []
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        if encoding is not None:
            headers.append(("Content-Encoding", encoding))
        if request_id is not None:
            headers.append(("X-Request-Id", request_id))
        headers += extra
        payload = _encoded(body, encoding, honest)
        if chunk is not None:
            headers.append(("Transfer-Encoding", "chunked"))
            payload = _chunked(payload, chunk)
        expect = next((value for name, value in extra if name == "Expect"), None)
        reply = send(fuzz_broker, "POST", path, payload, headers)
        check(reply, "POST", (path, headers, body[:80]), expect)
        assert reply is not None
        seen[reply.status // 100] += 1
        codes[reply.status] += 1

    one()
    assert seen[2] >= 20 and seen[4] >= 100, f"strategies too weak to reach both answers: {seen} {codes}"


@pytest.mark.parametrize("declared, sent", [(10, b"{}"), (1, b'{"stream_name": "x"}'), (0, b"{}"),
                                            (5, b"{}\r\n\r\nGET / HTTP/1.1\r\n\r\n")])
def test_a_content_length_that_lies(fuzz_broker: BrokerProcess, declared: int, sent: bytes) -> None:
    """Longer than the body: the body timeout (1 s here) answers 408; shorter: the rest is the next
    request on the connection, answered (or refused) on its own. Never a 5xx, never a hang."""
    for path in (f"/v2/{PID}/records", f"/v2/{PID}/streams", f"/v2/{PID}/checkpoints"):
        reply = send(fuzz_broker, "POST", path, sent,
                     [("Content-Type", "application/json"), ("Content-Length", str(declared))])
        if reply is not None:
            check(reply, "POST", (path, declared, sent))


# -- what this fuzz found (each also caught by the log check after the suite) ------------------------

@pytest.mark.parametrize("encoding, body", [("gzip", b"\x1f\x8b\x08\x00junk"), ("gzip", b"not gzip at all"),
                                            ("deflate", b"not deflate")])
def test_a_body_that_does_not_decode_is_a_400_and_logs_no_error(fuzz_broker: BrokerProcess, encoding: str,
                                                                  body: bytes) -> None:
    """aiohttp met the decoding error again while draining the body after the answer, and logged an
    ERROR with a traceback for each such request (http_app._RequestHandler.log_exception)."""
    for path in (f"/v2/{PID}/records", f"/v2/{PID}/streams", "/api/put", f"/{PID}/api/v1beta2/streams/x/ingest"):
        reply = send(fuzz_broker, "POST", path, body, [("Content-Type", "application/json"),
                                                       ("Content-Encoding", encoding)])
        assert reply is not None and 400 <= reply.status < 500, (path, reply)


@pytest.mark.parametrize("rid", [b"\x80", b"caf\xc3\xa9", b"x" * 200, b"a b"])
def test_an_odd_request_id_is_replaced(fuzz_broker: BrokerProcess, rid: bytes) -> None:
    """A lone 0x80 was echoed as an empty X-Request-Id; kilobytes were echoed whole."""
    reply = send(fuzz_broker, "GET", f"/v2/{PID}/streams", b"", [("X-Request-Id", rid)])
    assert reply is not None and reply.status == 200
    assert len(reply.headers["X-Request-Id"]) == 32 and reply.headers["X-Request-Id"].encode() != rid


def test_a_tail_client_that_leaves_before_its_first_batch(fuzz_broker: BrokerProcess) -> None:
    """response.prepare() then failed on the closed transport: an unhandled error in the log. The
    headers now come at once (api/tail.py), so the client leaves after them, during the silence:
    the tail notices within a second, and later writes must not fail noisily either."""
    for _ in range(3):
        reply = send(fuzz_broker, "GET", target("/sluice/v1/tail", {"stream-name": STREAM, "partition-id": "0",
                                                                    "cursor-type": "LATEST", "project": PID}),
                     timeout=0.5)
        assert reply is not None and reply.status == 200
    # a record makes the abandoned tails try to send: the log check after the suite sees the rest
    send(fuzz_broker, "POST", f"/v2/{PID}/records", json_body({"stream_name": STREAM, "records": [
        {"data": "YQ==", "partition_id": "0"}]}))
    time.sleep(0.5)
