"""`/api/query` and `/api/suggest` through the OpenTSDB door of a real broker process: points put
with `/api/put` come back aggregated, downsampled and grouped (POST and GET alike), errors are
OpenTSDB error objects, every answer is `application/json; charset=UTF-8`, and a hypothesis fuzz of
both query forms finds no 5xx and no hang. Needs the door (broker/api/tsdb.py); skipped without it.
"""
from __future__ import annotations

import http.client
import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.launcher import BrokerProcess

pytest.importorskip("broker.api.tsdb", reason="the OpenTSDB door is not in this build")

JSON_UTF8 = "application/json; charset=UTF-8"
TIMEOUT = 30.0   # seconds for any one exchange: a hang fails the test, never the suite


def call(broker: BrokerProcess, method: str, path: str, payload: Any = None, raw: bytes | None = None
         ) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(broker.host, broker.http_port, timeout=TIMEOUT)
    try:
        body = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.headers), json.loads(data) if data else None
    finally:
        conn.close()


def ok(broker: BrokerProcess, method: str, path: str, payload: Any = None) -> Any:
    status, headers, body = call(broker, method, path, payload)
    assert status == 200, (status, body)
    assert headers["Content-Type"] == JSON_UTF8
    return body


@pytest.fixture(scope="module")
def series(broker: BrokerProcess) -> dict[str, Any]:
    """Three series of one fresh metric, a point every 10 s for 10 minutes, starting an hour ago
    on a minute; host c's points sit 5 s later (not sharing timestamps)."""
    metric = f"rt.{uuid.uuid4().hex[:8]}.cpu"
    t0 = (int(time.time()) - 3600) // 60 * 60
    data = {"a": [(t0 + i * 10, i) for i in range(60)],
            "b": [(t0 + i * 10, 100 + 2 * i) for i in range(60)],
            "c": [(t0 + 5 + i * 10, 0.5 * i) for i in range(60)]}
    dc = {"a": "x", "b": "x", "c": "y"}
    points = [{"metric": metric, "timestamp": ts, "value": v, "tags": {"host": h, "dc": dc[h]}}
              for h, pts in data.items() for ts, v in pts]
    status, _, _ = call(broker, "POST", "/api/put", points)
    assert status == 204
    return {"metric": metric, "t0": t0, "data": data}


def minute_sums(points: list[tuple[int, float]], first: int, last: int) -> dict[str, float]:
    out = {}
    for b in range(first, last + 1, 60):
        inside = [v for t, v in points if b <= t < b + 60]
        if inside:
            out[str(b)] = float(sum(inside))
    return out


def test_a_put_comes_back_downsampled_and_aggregated(broker: BrokerProcess, series: dict[str, Any]) -> None:
    m, t0, data = series["metric"], series["t0"], series["data"]
    body = {"start": t0, "end": t0 + 599,
            "queries": [{"metric": m, "aggregator": "sum", "downsample": "1m-sum", "tags": {"dc": "x"}}]}
    [out] = ok(broker, "POST", "/api/query", body)
    a, b = minute_sums(data["a"], t0, t0 + 540), minute_sums(data["b"], t0, t0 + 540)
    assert out == {"metric": m, "tags": {"dc": "x"}, "aggregateTags": ["host"],
                   "dps": {k: a[k] + b[k] for k in a}}
    # the same through GET, grouped by host, with millisecond keys
    path = "/api/query?" + urlencode([("start", t0), ("end", t0 + 599), ("m", f"max:1m-sum:{m}{{host=*}}"),
                                      ("ms", "")])
    outs = ok(broker, "GET", path)
    assert [o["tags"]["host"] for o in outs] == ["a", "b", "c"]
    assert outs[0]["dps"] == {str(int(k) * 1000): v for k, v in a.items()}
    assert outs[2]["dps"] == {str(int(k) * 1000): v for k, v in minute_sums(data["c"], t0, t0 + 540).items()}


def test_raw_points_interpolate_across_series(broker: BrokerProcess, series: dict[str, Any]) -> None:
    m, t0 = series["metric"], series["t0"]
    body = {"start": t0, "end": t0 + 30, "queries": [{"metric": m, "aggregator": "sum", "tags": {"dc": "*"}}]}
    x, y = ok(broker, "POST", "/api/query/", body)
    assert x["dps"] == {str(t0 + i * 10): 100 + 3 * i for i in range(4)}          # integers stay integers
    assert all(isinstance(v, int) for v in x["dps"].values())
    assert y["tags"] == {"dc": "y", "host": "c"} and y["dps"] == {str(t0 + 5 + i * 10): 0.5 * i for i in range(3)}
    # all three: c is interpolated where a and b have points, a and b where c has
    [both] = ok(broker, "POST", "/api/query", {**body, "queries": [{"metric": m, "aggregator": "sum"}]})
    assert both["dps"][str(t0 + 5)] == pytest.approx(0.5 + 101 + 0.0)        # a, b lerped; c at its point
    assert both["dps"][str(t0 + 10)] == pytest.approx(1 + 102 + 0.25)      # c lerped
    assert both["dps"][str(t0)] == pytest.approx(100.0)                     # c not begun


def test_relative_times_rate_and_all(broker: BrokerProcess, series: dict[str, Any]) -> None:
    m, t0 = series["metric"], series["t0"]
    [out] = ok(broker, "GET", "/api/query?" + urlencode(
        [("start", "2h-ago"), ("m", f"sum:0all-count:{m}{{host=a}}")]))
    assert list(out["dps"].values()) == [60.0]
    [out] = ok(broker, "POST", "/api/query", {"start": t0, "end": t0 + 100, "queries": [
        {"metric": m, "aggregator": "avg", "rate": True, "tags": {"host": "b"}}]})
    assert out["dps"] == {str(t0 + i * 10): 0.2 for i in range(1, 11)}


def test_suggest(broker: BrokerProcess, series: dict[str, Any]) -> None:
    m = series["metric"]
    assert ok(broker, "GET", "/api/suggest?" + urlencode({"type": "metrics", "q": m[:11]})) == [m]
    assert "host" in ok(broker, "GET", "/api/suggest?type=tagk&max=1000")
    status, headers, body = call(broker, "GET", "/api/suggest?type=nope")
    assert status == 400 and headers["Content-Type"] == JSON_UTF8 and body["error"]["code"] == 400
    assert "type" in body["error"]["message"]
    # POST with a JSON object, as OpenTSDB 2.x takes it too (it was a 405)
    assert ok(broker, "POST", "/api/suggest", {"type": "metrics", "q": m[:11], "max": 10}) == [m]
    for bad, words in (({"type": "metrics", "max": 0}, "max"), ([1], "JSON object"), ({"q": "x"}, "type")):
        status, _, body = call(broker, "POST", "/api/suggest", bad)
        assert status == 400 and words in body["error"]["message"], (bad, body)


@pytest.mark.parametrize(("method", "path", "payload", "words"), [
    ("POST", "/api/query", {"start": "1h-ago", "queries": [{"metric": "rt.no.such.metric", "aggregator": "sum"}]},
     "No such name for 'metrics': 'rt.no.such.metric'"),
    ("POST", "/api/query", {"start": "1h-ago", "queries": [{"metric": "m", "aggregator": "p99"}]},
     "queries[0].aggregator"),
    ("POST", "/api/query", {"queries": []}, "start"),
    ("GET", "/api/query?start=1h-ago", None, "m: missing"),
    ("GET", "/api/query?start=1h-ago&m=sum:1m-bogus:x{a}", None, "m[0]"),
])
def test_errors_are_opentsdb_error_objects(broker: BrokerProcess, series: dict[str, Any], method: str, path: str,
                                           payload: Any, words: str) -> None:
    status, headers, body = call(broker, method, path, payload)
    assert status == 400 and headers["Content-Type"] == JSON_UTF8
    assert body["error"]["code"] == 400 and words in body["error"]["message"], body


def test_an_unknown_metric_is_opentsdbs_own_error_object(broker: BrokerProcess, series: dict[str, Any]) -> None:
    for method, path, payload in (
            ("POST", "/api/query", {"start": "1h-ago", "queries": [{"metric": "rt.no.such", "aggregator": "sum"}]}),
            ("GET", "/api/query?start=1h-ago&m=sum:rt.no.such", None)):
        status, headers, body = call(broker, method, path, payload)
        assert (status, headers["Content-Type"]) == (400, JSON_UTF8)
        assert body == {"error": {"code": 400, "message": "No such name for 'metrics': 'rt.no.such'"},
                        "reason": "UNKNOWN_METRIC"}


def test_a_body_that_is_not_json_is_a_400(broker: BrokerProcess) -> None:
    status, headers, body = call(broker, "POST", "/api/query", raw=b"{not json")
    assert status == 400 and headers["Content-Type"] == JSON_UTF8 and body["error"]["code"] == 400


_text = st.text(max_size=30)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=8)
_starts = st.one_of(st.sampled_from(["1h-ago", "2h-ago", "10m-ago", "now", "0", "1700000000", "1y-ago"]), _text)
_sub = st.fixed_dictionaries(
    {"metric": st.sampled_from(["rt.no.such", ""]) | _text, "aggregator": st.sampled_from(
        ["sum", "avg", "min", "max", "count", "none", "dev"]) | _json},
    optional={"downsample": st.sampled_from(["1m-avg", "0all-sum", "1s-sum-nan", "1ms-count-zero", "x"]) | _json,
              "rate": st.booleans() | _json,
              "tags": st.dictionaries(st.sampled_from(["host", "dc"]), st.sampled_from(["*", "a|b", "x"]) | _json),
              "filters": st.lists(_json, max_size=2) | _json})
_bodies = st.one_of(st.fixed_dictionaries({"start": _starts | _json, "queries": st.lists(_sub, max_size=2) | _json},
                                          optional={"end": _starts | _json, "msResolution": _json}), _json)
_params = st.lists(st.tuples(st.sampled_from(["start", "end", "m", "ms", "tz"]),
                             st.one_of(_starts, _text, st.sampled_from(
                                 ["sum:rt.x", "avg:1m-avg:rt.x{host=*}", "sum:rate{counter}:a:b{c=d}{e=f}"]))),
                   max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies, params=_params)
def test_fuzz_query_routes_no_5xx_no_hang(broker: BrokerProcess, series: dict[str, Any], body: Any,
                                          params: list[tuple[str, str]]) -> None:
    m = series["metric"]
    if isinstance(body, dict) and isinstance(body.get("queries"), list):   # some sub-queries hit real data
        body["queries"] = [{**q, "metric": m} if isinstance(q, dict) and q.get("metric") == "" else q
                           for q in body["queries"]]
    for method, path, payload in (("POST", "/api/query", body),
                                  ("GET", "/api/query?" + urlencode(params), None),
                                  ("GET", "/api/suggest?" + urlencode(params), None)):
        status, headers, answer = call(broker, method, path, payload)
        assert status < 500, (method, path, payload, status, answer)
        assert headers["Content-Type"] == JSON_UTF8
        if status == 200:
            assert isinstance(answer, list)
        else:
            assert answer["error"]["code"] == status
