"""Fuzz of the OpenTSDB door (`/api/put`, `/api/query`, `/api/suggest`), on the main port and on its
own `--tsdb-port`.

tests/tsdb already fuzzes /api/put bodies and query flags (test_put_lifecycle) and both /api/query
forms (test_query_http), on the main port. Here, what those do not reach:
- the same routes under odd headers: Content-Encoding gzip/deflate that is and is not, chunked
  framing, odd Content-Types, huge and deep bodies;
- every method on every route and junk paths under /api, on both ports - the tsdb port's root is
  its own application, with its own error renderer for what no route or the parser refuses.
Every answer is < 500; an error is an OpenTSDB error object (`{"error": {"code", "message"}}`),
or, on the main port, the fallback door's for what aiohttp's parser refuses before any door.
Points put before the fuzz are queried back after it, on both ports.
"""
from __future__ import annotations

import gzip
import string
import time
import zlib
from collections import Counter
from typing import Iterator
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.launcher import BrokerProcess

from .harness import Reply, assert_dis_error, budget, guarded_broker, http_request, json_body, no_5xx

NOW_S = int(time.time()) // 60 * 60 - 600
KEPT = [{"metric": "fz.kept", "timestamp": NOW_S + i, "value": v, "tags": {"host": "h"}}
        for i, v in enumerate([1, -2.5, 2**53, 0])]


def _query_kept(proc: BrokerProcess, port: int) -> None:
    reply = http_request(proc.host, port, "POST", "/api/query", json_body({
        "start": NOW_S - 60, "end": NOW_S + 60, "queries": [{"metric": "fz.kept", "aggregator": "none"}]}),
        [("Content-Type", "application/json")])
    assert reply is not None and reply.status == 200, reply
    dps = reply.json[0]["dps"]
    assert {int(k): v for k, v in dps.items()} == {p["timestamp"]: p["value"] for p in KEPT}


def _alive(proc: BrokerProcess) -> None:
    assert proc.tsdb_port is not None
    for port in (proc.http_port, proc.tsdb_port):
        _query_kept(proc, port)


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with guarded_broker(tmp_path_factory.mktemp("fuzz-tsdb") / "data", "--tsdb-port", "0", alive=_alive) as proc:
        reply = http_request(proc.host, proc.http_port, "POST", "/api/put", json_body(KEPT),
                             [("Content-Type", "application/json")])
        assert reply is not None and reply.status == 204, reply
        _query_kept(proc, proc.http_port)
        yield proc


# -- strategies ---------------------------------------------------------------------------------------

SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12) \
    | st.sampled_from(["NaN", "1e400", "Infinity", "-0", "", "\x00", "温度", NOW_S, NOW_S * 1000])
WILD = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=8)
POINT = st.fixed_dictionaries({"metric": st.sampled_from(["fz.a", "fz.b"]), "timestamp": st.just(NOW_S),
                               "value": st.integers(-5, 5), "tags": st.just({"h": "x"})},
                              optional={"extra": WILD})
QUERY = st.fixed_dictionaries({"start": st.sampled_from([NOW_S - 60, "1h-ago", "1y-ago"]) | WILD,
                               "queries": st.lists(st.fixed_dictionaries(
                                   {"metric": st.sampled_from(["fz.a", "fz.kept"]) | WILD,
                                    "aggregator": st.sampled_from(["sum", "none", "avg"]) | WILD},
                                   optional={"downsample": st.sampled_from(["1m-avg", "0all-sum"]) | WILD}),
                                   max_size=2) | WILD})
SPECIAL = st.sampled_from([b"", b"[]", b"{}", b"null", b"[" * 5000 + b"]" * 5000, b"9" * 5000, b"\x00" * 20,
                           b"[{\"metric\": \"\xff\xfe\"}]", b"\xef\xbb\xbf[]", b"\x1f\x8b\x08\x00junk",
                           b"[" + b"{}," * 3000 + b"{}]"])
VALID_POINTS = st.lists(POINT.filter(lambda p: "extra" not in p), min_size=1, max_size=4).map(json_body)
BODIES = st.one_of(VALID_POINTS, st.lists(POINT, min_size=1, max_size=4).map(json_body), POINT.map(json_body),
                   QUERY.map(json_body), WILD.map(json_body), st.binary(max_size=80), SPECIAL)
ROUTES = st.sampled_from(["/api/put", "/api/query", "/api/put/", "/api/query/", "/api/suggest", "/api/put?details",
                          "/api/put?summary&sync", "/api/query?start=1h-ago&m=sum:fz.a",
                          "/api/suggest?type=metrics&q=fz", "/api/put?sync_timeout=" + "9" * 40,
                          "/api/suggest?max=-1&type=tagk"])
ODD_PATHS = st.sampled_from(["/api/query/last", "/api/uid/assign", "/api/stats", "/api/version", "/api/", "/api",
                             "/api/%00"]) | st.text(alphabet=string.ascii_letters + "/_-.%", min_size=1,
                                                    max_size=20).map(lambda p: "/api/" + p)
PATHS = st.integers(0, 3).flatmap(lambda i: ODD_PATHS if i == 0 else ROUTES)   # mostly the door's routes
ENCODINGS = st.sampled_from([None, None, "gzip", "gzip", "deflate", "identity", "x-junk"])


def _encoded(body: bytes, encoding: str | None, honest: bool) -> bytes:
    if honest and encoding == "gzip":
        return gzip.compress(body)
    if honest and encoding == "deflate":
        return zlib.compress(body)
    return body


def check(reply: Reply | None, main_port: bool, context: object) -> int:
    assert reply is not None, ("closed without an answer", context)
    no_5xx(reply, context)
    if reply.status >= 400 and reply.raw:
        body = reply.json
        if main_port and "error_code" in body:   # refused by aiohttp's parser: the fallback door's body
            assert_dis_error(reply, reply.status)
        elif "failed" in body:   # /api/put?details: the points' errors
            assert body["failed"] >= 1 and len(body.get("errors", [None])) >= 1, body
        else:
            assert body["error"]["code"] == reply.status and body["error"]["message"], body
            assert reply.headers["Content-Type"] == "application/json; charset=UTF-8", dict(reply.headers)
    return reply.status


@pytest.mark.parametrize("port_name", ["http", "tsdb"])
def test_routes_methods_and_headers(fuzz_broker: BrokerProcess, port_name: str) -> None:
    port = fuzz_broker.http_port if port_name == "http" else fuzz_broker.tsdb_port
    assert port is not None
    seen: Counter[int] = Counter()

    @budget(600)
    @given(path=PATHS,
           method=st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "HEAD"]), body=BODIES,
           encoding=ENCODINGS, honest=st.booleans(), chunked=st.booleans(),
           content_type=st.sampled_from([None, "application/json", "application/json", "text/plain",
                                         "application/json; charset=latin-1",
                                         "application/x-www-form-urlencoded", "%%%"]))
    def one(path: str, method: str, body: bytes, encoding: str | None, honest: bool, chunked: bool,
            content_type: str | None) -> None:
        path = quote(path, safe="/?&=%")
        if port_name == "http" and path.startswith("/api/v1beta"):   # Timeplus' paths: fuzzed elsewhere
            path = "/api/put"
        headers: list[tuple[str, str | bytes]] = []
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        if encoding is not None:
            headers.append(("Content-Encoding", encoding))
        payload = _encoded(body, encoding, honest)
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload) if payload else b"0\r\n\r\n"
        reply = http_request(fuzz_broker.host, port, method, path, payload, headers)
        seen[check(reply, port_name == "http", (method, path, headers, body[:60]))] += 1

    one()
    assert sum(n for s, n in seen.items() if s < 300) >= 15 and seen[400] >= 30, f"strategies too weak: {seen}"


def test_the_tsdb_port_serves_the_door_alone(fuzz_broker: BrokerProcess) -> None:
    """DIS and Timeplus paths are unknown routes there, answered as OpenTSDB errors."""
    assert fuzz_broker.tsdb_port is not None
    for method, path in (("GET", "/v2/fuzz/streams"), ("POST", "/api/v1beta2/streams"), ("GET", "/sluice/v1/tail"),
                         ("GET", "/"), ("POST", "/api/put/extra")):
        reply = http_request(fuzz_broker.host, fuzz_broker.tsdb_port, method, path, b"{}",
                             [("Content-Type", "application/json")])
        assert check(reply, False, (method, path)) in (404, 405), (method, path, reply)
