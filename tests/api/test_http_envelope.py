"""The HTTP envelope below the routes: what aiohttp's own parser rejects, and request bodies with a
Content-Encoding. Raw bytes over a socket to a real broker, because no well-behaved client can
send most of these.

Every answer must be the DIS JSON error body with a 4xx status and an `X-Request-Id` - never
aiohttp's text/plain, never a 5xx - and the broker must go on serving afterwards.
"""
from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import zlib

import pytest
from conftest import eventually
from dis_http import PID, Reply, addr, assert_dis_error, call

from broker.errors import ErrorCode


def exchange(broker, raw: bytes) -> Reply:  # type: ignore[no-untyped-def]
    """Send raw bytes on a fresh connection and read one HTTP response."""
    with socket.create_connection(addr(broker.http_url), timeout=10) as sock:
        sock.sendall(raw)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return Reply(resp.status, resp.headers, resp.read())


def request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


STREAMS = f"/v2/{PID}/streams"
BODY = b'{"stream_name": "envelope", "partition_count": 1}'
CL = ("Content-Length", str(len(BODY)))

# name -> raw request that aiohttp's HTTP parser refuses before any handler runs
PARSER_ERRORS = {
    "duplicate Content-Length": request("POST", STREAMS, [CL, CL], BODY),
    "conflicting Content-Length": request("POST", STREAMS, [CL, ("Content-Length", "3")], BODY),
    "non-numeric Content-Length": request("POST", STREAMS, [("Content-Length", "12a")], BODY),
    "5,000-digit Content-Length": request("POST", STREAMS, [("Content-Length", "9" * 5000)], BODY),
    "negative Content-Length": request("POST", STREAMS, [("Content-Length", "-1")], BODY),
    "Content-Length with chunked": request("POST", STREAMS, [CL, ("Transfer-Encoding", "chunked")], BODY),
    "too many headers": request("GET", STREAMS, [(f"X-H{i}", "1") for i in range(200)]),
    "header line too long": request("GET", STREAMS, [("X-Long", "a" * 10_000)]),
    "request line too long": request("GET", "/v2/" + "a" * 10_000, []),
    "bad header name": request("GET", STREAMS, [("X\x01Y", "1")]),
    "header without colon": request("GET", STREAMS, [("Broken", "")]).replace(b"Broken: \r\n", b"Broken\r\n"),
    "bad HTTP version": b"GET /v2/p/streams HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    "bad method": b"G\x00T /v2/p/streams HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "TLS on the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    "bad chunk size": request("POST", STREAMS, [("Transfer-Encoding", "chunked")], b"zz\r\n{}\r\n0\r\n\r\n"),
    "5,000-digit chunk size": request("POST", STREAMS, [("Transfer-Encoding", "chunked")],
                                      b"f" * 5000 + b"\r\n{}\r\n0\r\n\r\n"),
    "a transfer coding alone": request("POST", STREAMS, [("Transfer-Encoding", "gzip")], BODY),
}


@pytest.mark.parametrize("raw", PARSER_ERRORS.values(), ids=PARSER_ERRORS.keys())
def test_parser_errors_get_the_dis_json_body(broker, raw: bytes) -> None:
    reply = exchange(broker, raw)
    body = assert_dis_error(reply, 400)
    assert body["reason"] in (ErrorCode.INVALID_REQUEST.reason, ErrorCode.BAD_BODY.reason)
    assert "b'" not in body["error_msg"] and len(body["error_msg"]) < 200, "no echo of the offending bytes"
    assert reply.headers.get("Connection", "").lower() == "close" or reply.headers.get("Connection") is None
    assert call(broker, "GET", STREAMS).status == 200, "the broker serves on after a malformed request"


@pytest.mark.parametrize("path, shape", [
    ("/api/put?details", {"error", "reason"}),                                  # OpenTSDB's error object
    ("/api/query", {"error", "reason"}),
    ("/api/v1beta2/streams/s/ingest", {"code", "message", "system", "reason"}),   # Timeplus'
    ("/nobody/owns/this", {"error_code", "error_msg", "errorCode", "message", "reason"}),   # the fallback: DIS
])
@pytest.mark.parametrize("headers", [[("Transfer-Encoding", "gzip")], [CL, CL],
                                     [CL, ("Transfer-Encoding", "chunked")]],
                         ids=["a transfer coding alone", "duplicate Content-Length", "Content-Length with chunked"])
def test_parser_errors_get_the_body_of_the_door_that_owns_the_path(broker, path: str, shape: set[str],
                                                                    headers: list[tuple[str, str]]) -> None:
    reply = exchange(broker, request("POST", path, headers, BODY))
    body = json.loads(reply.raw)
    assert reply.status == 400 and set(body) == shape, body
    assert body["reason"] in (ErrorCode.INVALID_REQUEST.reason, ErrorCode.BAD_BODY.reason)
    if "error" in body:
        assert reply.headers["Content-Type"] == "application/json; charset=UTF-8" and body["error"]["code"] == 400
    assert reply.headers["X-Request-Id"]


@pytest.mark.parametrize(("path", "shape"), [
    ("/api/query?start=1h-ago&m=sum:" + "a" * 9_000, {"error", "reason"}),   # OpenTSDB's error object
    ("/api/v1beta2/streams/s" + "x" * 9_000, {"code", "message", "system", "reason"}),
    ("/v2/" + "a" * 10_000, {"error_code", "error_msg", "errorCode", "message", "reason"}),
])
def test_a_request_line_past_the_limit_gets_the_body_of_the_door_of_its_path(broker, path: str,
                                                                              shape: set[str]) -> None:
    """A GET /api/query with a long `m=` got the DIS body on the HTTP port (the tsdb probe): with no
    line end within the limit, no path was found."""
    reply = exchange(broker, request("GET", path, []))
    body = json.loads(reply.raw)
    assert 400 <= reply.status < 500 and set(body) == shape, body


def test_a_parser_error_logs_no_header_value(start_broker) -> None:  # type: ignore[no-untyped-def]
    """At --log-level debug the parser's message was logged whole: it ends in the offending header
    line, a key followed by one bad byte (README: secrets are never logged)."""
    debug = start_broker("--log-level", "debug")
    secret = "k3y-" + "9" * 40
    for line in (f"X-Api-Key: {secret}\x7f", f"Authorization: Bearer {secret}\x01"):
        head = f"GET /api/v1beta2/streams HTTP/1.1\r\nHost: 127.0.0.1\r\n{line}\r\n\r\n"
        reply = exchange(debug, head.encode("latin-1"))
        assert reply.status == 400
    eventually(lambda: sum("rejected a malformed HTTP request" in x for x in debug.stderr_lines) >= 2)
    assert not [x for x in debug.stderr_lines if secret in x]


def test_a_parser_error_in_headers_sent_in_many_writes_gets_the_door_of_the_request_line(broker) -> None:
    """The reads after the request line (headers, an uppercase value) keep its path; after an
    answer, a new request (here after the empty line RFC 9112 allows) names its own door."""
    with socket.create_connection(addr(broker.http_url), timeout=10) as sock:
        sock.sendall(b"GET /api/suggest?type=metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = http.client.HTTPResponse(sock)
        first.begin()
        assert first.status == 200 and first.read()
        raw = request("POST", STREAMS, [CL, ("X-Token", "A" * 9000)], BODY)
        sock.sendall(b"\r\n" + raw[:30])   # the empty line, then the request line in its own write
        for at in range(30, len(raw), 1448):
            sock.sendall(raw[at:at + 1448])
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = json.loads(resp.read())
    assert resp.status == 400 and body["error_code"] == "DIS.4200", body   # DIS's, not OpenTSDB's
    with socket.create_connection(addr(broker.http_url), timeout=10) as sock:
        raw = request("POST", "/api/put", [CL, ("X-Token", "A" * 9000)], BODY)
        for at in range(0, len(raw), 1448):
            sock.sendall(raw[at:at + 1448])
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = json.loads(resp.read())
    assert resp.status == 400 and set(body) == {"error", "reason"}, body   # OpenTSDB's


def test_a_client_request_id_header_is_kept_when_the_parser_fails_later(broker) -> None:
    """The parser may fail before it has the headers: then the id is a fresh one, never empty."""
    reply = exchange(broker, request("GET", STREAMS, [("X-Request-Id", "mine")] + [(f"X-H{i}", "1")
                                                                                for i in range(200)]))
    assert_dis_error(reply, 400, reason=ErrorCode.INVALID_REQUEST)
    assert reply.headers["X-Request-Id"]


@pytest.mark.parametrize("expect", ["foo", "100-continue, foo", ""])
def test_an_unknown_expectation_is_ignored_and_the_door_answers(broker, expect: str) -> None:
    """aiohttp's own answer was a text/plain 417 without a request id; RFC 9110 lets a server
    ignore an expectation it does not know, so the request gets its door's answer."""
    reply = exchange(broker, request("GET", STREAMS, [("Expect", expect), ("X-Request-Id", "exp-1")]))
    assert reply.status == 200, reply.raw
    assert reply.headers["X-Request-Id"] == "exp-1"
    assert "stream_names" in reply.json
    reply = exchange(broker, request("POST", "/api/put", [("Expect", expect), ("Content-Length", "2")], b"[]"))
    assert reply.status == 400
    assert reply.json == {"error": {"code": 400, "message": "No datapoints found in content"},
                          "reason": "PUT_NO_POINTS"}


def test_an_unknown_expectation_beside_a_header_that_is_not_utf8(broker) -> None:
    """The fuzzer's case: removing the Expect header by cloning the request re-encoded every header
    and raised on this one (a 500 and an ERROR log)."""
    reply = exchange(broker, request("GET", STREAMS, [("Expect", "foo"), ("X-Bin", "\xff\xfe")]))
    assert reply.status == 200, reply.raw
    assert "stream_names" in reply.json


def test_a_header_value_that_is_not_utf8_quoted_in_an_error_is_escaped_not_a_500(broker, stream_name) -> None:
    """aiohttp hands a header byte that is not UTF-8 over as a lone surrogate (surrogateescape); the
    Timeplus ingest quoted an unknown `format=` of the Content-Type in its message as it came, and
    writing the error body (orjson) raised on the surrogate: a 500 INTERNAL and an ERROR log for a
    bad header. Now the byte is quoted as an escape in the door's 400 body."""
    assert call(broker, "POST", STREAMS, {"stream_name": stream_name, "partition_count": 1}).status == 201
    body = b'{"columns": ["raw"], "data": [["x"]]}'
    reply = exchange(broker, request("POST", f"/{PID}/api/v1beta2/streams/{stream_name}/ingest",
                                     [("Content-Type", "text/plain; format=\xff\xfe"),
                                      ("Content-Length", str(len(body)))], body))
    assert reply.status == 400, reply.raw
    assert reply.json["reason"] == "INVALID_REQUEST" and reply.json["code"] == ErrorCode.INVALID_REQUEST.timeplus_code
    assert "[\\xff\\xfe]" in reply.json["message"], reply.json


def test_100_continue_still_gets_its_interim_answer(broker, stream_name) -> None:
    body = json.dumps({"stream_name": stream_name, "partition_count": 1}).encode()
    with socket.create_connection(addr(broker.http_url), timeout=10) as sock:
        sock.sendall(request("POST", STREAMS, [("Expect", "100-Continue"), ("Content-Length", str(len(body)))]))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 201, resp.read()


def _put(broker, stream: str, data: bytes, encoding: str, compress) -> Reply:  # type: ignore[no-untyped-def]
    body = json.dumps({"stream_name": stream, "records": [{"data": base64.b64encode(data).decode()}]}).encode()
    return call(broker, "POST", f"/v2/{PID}/records", compress(body), headers={"Content-Encoding": encoding})


def _raw_deflate(body: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)   # no zlib header: what many clients send as deflate
    return deflater.compress(body) + deflater.flush()


def _two_gzip_members(body: bytes) -> bytes:
    return gzip.compress(body[:10]) + gzip.compress(body[10:])   # RFC 1952 2.2: `cat a.gz b.gz`


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress), ("GZIP", gzip.compress), ("deflate", zlib.compress), ("identity", lambda b: b),
    ("deflate", _raw_deflate), ("gzip", _two_gzip_members)])
def test_bodies_in_a_supported_content_encoding_are_read(broker, stream_name, encoding, compress) -> None:
    assert call(broker, "POST", STREAMS, {"stream_name": stream_name, "partition_count": 1}).status == 201
    reply = _put(broker, stream_name, b"hello", encoding, compress)
    assert reply.status == 200, reply.raw
    assert reply.json["failed_record_count"] == 0


@pytest.mark.parametrize("encoding, body", [
    ("gzip", b'{"stream_name": "s", "records": []}'),          # the fuzzer's case: a 500 before
    ("gzip", b"\x1f\x8b" + b"\x00" * 30),                        # gzip magic, garbage after
    ("gzip", b"x" * 5000),
    ("deflate", b"not deflate at all" * 10),
    ("gzip", gzip.compress(b"{}", mtime=0) + b"trailing junk"),
    ("gzip", gzip.compress(b"{}", mtime=0) + b"\0\0"),
    ("gzip", gzip.compress(b"{}", mtime=0)[:-8]),                          # no trailer: its CRC and length unchecked
    ("deflate", zlib.compress(b"{}")[:-2]),
    ("deflate", zlib.compress(b"{}") + b"x"),
])
def test_bodies_that_do_not_decode_are_bad_bodies(broker, encoding, body) -> None:
    for path in (f"/v2/{PID}/records", f"/v2/{PID}/streams", f"/v2/{PID}/apps", f"/v2/{PID}/checkpoints"):
        reply = call(broker, "POST", path, body, headers={"Content-Encoding": encoding})
        assert_dis_error(reply, 400, "DIS.4300", reason=ErrorCode.BAD_BODY)


@pytest.mark.parametrize("encoding", ["x-gzip", "gzip, gzip", "compress", "foo", "gzip;q=1", "gz\u00edp", "br", "zstd"])
def test_unsupported_content_encodings_are_refused_not_read_as_plain(broker, stream_name, encoding) -> None:
    """aiohttp passes a body with a coding it does not know through undecoded: reading it as JSON
    anyway would accept bytes that are not what the client meant."""
    body = json.dumps({"stream_name": stream_name, "partition_count": 1}).encode()
    reply = call(broker, "POST", STREAMS, body, headers={"Content-Encoding": encoding})
    error = assert_dis_error(reply, 400, "DIS.4300", reason=ErrorCode.BAD_BODY)
    assert "Content-Encoding" in error["error_msg"]
    assert_dis_error(call(broker, "GET", f"{STREAMS}/{stream_name}"), 400, "DIS.4301")  # nothing was created


def test_a_gzip_bomb_is_refused_by_the_body_cap(broker) -> None:
    """13 MiB of zeros compress to a few KiB: the cap applies to the decoded size."""
    bomb = gzip.compress(b'{"stream_name": "' + b"0" * (13 * 1024 * 1024) + b'"}')
    assert len(bomb) < 100_000
    reply = call(broker, "POST", f"/v2/{PID}/records", bomb, headers={"Content-Encoding": "gzip"})
    assert_dis_error(reply, 413, reason=ErrorCode.REQUEST_TOO_LARGE)


def test_a_gzip_bomb_costs_its_cap_and_its_connection_serves_on(broker) -> None:
    """100 MiB inflated from ~100 KB sent: the body is read whole as sent, inflated no further than
    the cap (413), and the connection is kept alive for the next request."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)   # gzip framing
    zeros = b"0" * (1 << 20)
    bomb = deflater.compress(b'{"stream_name": "') + b"".join(deflater.compress(zeros) for _ in range(100)) \
        + deflater.compress(b'"}') + deflater.flush()
    assert len(bomb) < 200_000
    head = request("POST", f"/v2/{PID}/records", [("Content-Length", str(len(bomb))), ("Content-Encoding", "gzip"),
                                                  ("Content-Type", "application/json")])
    with socket.create_connection(addr(broker.http_url), timeout=10) as sock:
        sock.sendall(head + bomb)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 413
        assert "once inflated" in json.loads(resp.read())["error_msg"]
        sock.sendall(request("GET", STREAMS, []))
        again = http.client.HTTPResponse(sock)
        again.begin()
        assert again.status == 200, again.read()


def _records(broker, stream: str) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Every record of a one-partition stream of the project `default`, read through DIS."""
    cursor = call(broker, "GET", f"/v2/default/cursors?stream-name={stream}&partition-id=0&cursor-type=TRIM_HORIZON")
    page = call(broker, "GET", f"/v2/default/records?partition-cursor={cursor.json['partition_cursor']}&limit=10000")
    return [base64.b64decode(r["data"]) for r in page.json["records"]]


def test_a_gzip_body_cut_short_is_refused_whole_on_every_door(broker, stream_name) -> None:
    """aiohttp's own decoder took a gzip body cut anywhere before its trailer as the prefix it
    inflates to: half a `lines` ingest was stored and answered 200. Now a body must reach the end
    of its stream, where zlib checks gzip's CRC-32 and length."""
    stream_name = stream_name.replace("-", "_")   # a Timeplus name
    assert call(broker, "POST", "/api/v1beta2/streams",
                {"name": stream_name, "columns": [{"name": "raw", "type": "string"}]}).status == 201
    rows = b"\n".join(b"row %d" % i for i in range(500))
    whole = gzip.compress(rows)
    gz = {"Content-Encoding": "gzip"}
    ingest = f"/api/v1beta2/streams/{stream_name}/ingest?format=lines"
    for cut in (len(whole) // 2, len(whole) - 8, len(whole) - 1):
        reply = call(broker, "POST", ingest, whole[:cut], headers=gz)
        assert reply.status == 400 and reply.json["reason"] == "BAD_BODY", (cut, reply.raw)
        assert "cut short" in reply.json["message"]
        put = call(broker, "POST", "/api/put?details", whole[:cut], headers=gz)
        assert put.status == 400 and put.json["reason"] == "BAD_BODY", (cut, put.raw)
        assert_dis_error(call(broker, "POST", f"/v2/{PID}/records", whole[:cut], headers=gz), 400, "DIS.4300",
                         reason=ErrorCode.BAD_BODY)
    assert _records(broker, stream_name) == [], "nothing of a refused body is stored"
    assert call(broker, "POST", ingest, whole, headers=gz).status == 200
    assert [json.loads(r)["raw"] for r in _records(broker, stream_name)] == [f"row {i}" for i in range(500)]


@pytest.mark.parametrize("coding", ["gzip, chunked", "identity, chunked", "chunked, gzip"])
def test_a_transfer_coding_other_than_chunked_is_refused(broker, stream_name, coding) -> None:
    """aiohttp frames `gzip, chunked` as chunked and hands the handler the gzip bytes as they are:
    a plain body under that header was taken as plain (RFC 9112 6.1: refuse what is unknown)."""
    body = json.dumps({"stream_name": stream_name, "partition_count": 1}).encode()
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    reply = exchange(broker, request("POST", STREAMS, [("Transfer-Encoding", coding)], chunked))
    if coding.endswith("chunked"):   # else aiohttp's parser refuses it itself
        error = assert_dis_error(reply, 400, "DIS.4300", reason=ErrorCode.BAD_BODY)
        assert "Transfer-Encoding" in error["error_msg"]
    else:
        assert_dis_error(reply, 400)
    assert_dis_error(call(broker, "GET", f"{STREAMS}/{stream_name}"), 400, "DIS.4301")  # nothing was created
    ok = exchange(broker, request("POST", STREAMS, [("Transfer-Encoding", "chunked")], chunked))
    assert ok.status == 201, ok.raw


def test_query_integers_past_64_bits_are_taken_as_the_nearest_64_bit_value(broker) -> None:
    """Clipped (or refused) by the same rule as any value out of range, never a 500: an offset past
    any stream count is an empty page, and the answer that echoes it can write it."""
    console = call(broker, "GET", "/console/api/streams?project=default&offset=18446744073709551616")
    assert console.status == 200, console.raw[:300]
    assert console.json["streams"] == [] and console.json["offset"] == 2**63 - 1
    for limit in ("99999999999999999999", "-9223372036854775809", "1" * 5000):
        assert_dis_error(call(broker, "GET", f"/v2/{PID}/streams?limit={limit}"), 400, "DIS.4200")


# -- writes a browser sends for another site --------------------------------------------------------

CROSS_SITE_WRITES = {   # path -> (body, content type): each a "simple" request a page may send at once
    "dis create": (STREAMS, b'{"stream_name": "csrf", "partition_count": 1}', "text/plain"),
    "opentsdb put": ("/api/put", b'{"metric":"csrf","timestamp":1700000000,"value":1,"tags":{"h":"a"}}',
                     "text/plain"),
    "timeplus create": ("/api/v1beta2/streams", b'{"name":"csrf","columns":[{"name":"a","type":"int32"}]}',
                        "text/plain"),
    "timeplus source": ("/api/v1beta2/sources", b'{"name":"csrf","type":"random","properties":{"stream":"x"}}',
                        "application/x-www-form-urlencoded"),
}


@pytest.mark.parametrize(("path", "body", "content_type"), CROSS_SITE_WRITES.values(), ids=CROSS_SITE_WRITES.keys())
def test_a_write_a_browser_sends_for_another_site_is_refused_on_every_door(broker, path, body, content_type) -> None:
    """On an open broker any web page could create streams, put points and start sources through a
    visitor's browser (the operations probe, headless Chromium: a text/plain fetch or a form post
    needs no CORS preflight). Browsers mark such a request `Sec-Fetch-Site: cross-site`; it is 403
    in the door's own error body, and nothing is written."""
    reply = call(broker, "POST", path, body, headers={"Content-Type": content_type, "Sec-Fetch-Site": "cross-site"})
    assert reply.status == 403, (reply.status, reply.raw[:300])
    assert b"another site" in reply.raw
    listed = call(broker, "GET", STREAMS)
    assert b'"csrf"' not in listed.raw, listed.raw[:300]
    # the same origin (the console's page), a browser's address bar, or no browser at all: served
    host = "{}:{}".format(*addr(broker.http_url))
    for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": f"http://{host}"}, {}):
        same = call(broker, "POST", STREAMS, b'{"stream_name": "csrf-same", "partition_count": 1}', headers=headers)
        assert same.status in (201, 400), (headers, same.status, same.raw[:300])   # 400: made already
        assert b"another site" not in same.raw
    assert call(broker, "GET", STREAMS, headers={"Sec-Fetch-Site": "cross-site"}).status == 200


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "same-site"},                        # a page on another port of localhost
    {"Origin": "http://localhost:3000"},                    # no Sec-Fetch-*: plain HTTP to an address
    {"Origin": "null"},                                     # a sandboxed frame, a file:// page
    {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
])
def test_a_write_from_a_page_of_another_origin_is_refused_without_sec_fetch_site_too(broker, headers) -> None:
    """Browsers send Sec-Fetch-* only to https and localhost: a broker reached over plain HTTP by
    its address got the page's write (the review, headless Chromium); and a page on another port of
    the same host is same-site, not cross-site. The Origin is compared with the Host then."""
    reply = call(broker, "POST", "/api/put", CROSS_SITE_WRITES["opentsdb put"][1],
                 headers={"Content-Type": "text/plain", **headers})
    assert reply.status == 403 and b"another site" in reply.raw, (reply.status, reply.raw[:300])


def _errors_counted(broker, door: str, reason: str) -> float:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families
    text = call(broker, "GET", "/metrics").raw.decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "sluice_request_errors_total" and s.labels == {"door": door, "reason": reason})


def test_requests_the_parser_refuses_are_counted(broker) -> None:
    """They were answered in the door's body but not counted in sluice_request_errors_total (the
    operations probe): they never reach a middleware."""
    before = _errors_counted(broker, "http", ErrorCode.INVALID_REQUEST.reason)
    for raw in (PARSER_ERRORS["duplicate Content-Length"], PARSER_ERRORS["bad chunk size"]):
        assert exchange(broker, raw).status == 400
    assert _errors_counted(broker, "http", ErrorCode.INVALID_REQUEST.reason) - before == 2
