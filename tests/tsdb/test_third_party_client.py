"""Real OpenTSDB clients from PyPI, unmodified, write points to a broker process; the test then reads
them back through `/api/query` (and the DIS door: every point is a JSON record in its series'
partition). Both clients are pinned in the `test` extra:

- opentsdb-py 0.6.0, `TSDBClient(protocol=HTTP)`: `send()` queues a point; a thread of its own POSTs
  the queue, up to 50 points a request, gzip-compressed (`Content-Encoding: gzip`), to
  `/api/put?details=true`, and counts `success`/`failed` from the details answer.
- pyopentsdb 0.2.1, `TsdbConnector`: synchronous puts to `/api/put/` (the trailing slash of HiTSDB's
  examples), answered 204; a refused point surfaces as the error object's message; and `query()`,
  which POSTs an OpenTSDB 2.x body carrying every optional field (`delete: false`, `useCalendar:
  false`, `timezone`, `showTSUIDs`, ...) to `/api/query/`. (Its put's `summary`/`details` keywords
  cannot be used: the client passes them on to `requests`, which refuses them before sending.)

The broker is the session's shared one: each test writes metrics of its own name.
"""
from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import time
import uuid
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from conftest import eventually
from opentsdb import TSDBClient, TSDBConnectProtocols
from pyopentsdb import errors as pyopentsdb_errors
from pyopentsdb.tsdb import TsdbConnector

from broker.launcher import BrokerProcess
from broker.tsdb.series import series_key, series_partition

STREAM, PROJECT = "tsdb", "default"    # the door's defaults (--tsdb-stream, --tsdb-project)


def _t0() -> int:
    """An hour ago, on the minute (seconds): downsampling buckets start on it."""
    return (int(time.time()) - 3600) // 60 * 60


def _http(broker: BrokerProcess, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(broker.host, broker.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def _query(broker: BrokerProcess, start: int, end: int, *queries: dict[str, Any]) -> list[dict[str, Any]]:
    status, out = _http(broker, "POST", "/api/query",
                        json.dumps({"start": start, "end": end, "queries": list(queries)}).encode())
    assert status == 200, out
    return out  # type: ignore[no-any-return]


def _records(broker: BrokerProcess, metric: str, tags: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """The points of one series as the DIS door serves them: every record of the series' partition
    (from TRIM_HORIZON to its end) whose JSON names this metric and tags; and that partition."""
    status, desc = _http(broker, "GET", f"/v2/{PROJECT}/streams/{STREAM}")
    assert status == 200, desc
    partition = series_partition(series_key(metric, tags), int(desc["partition_count"]))
    status, cur = _http(broker, "GET", f"/v2/{PROJECT}/cursors?" + urlencode(
        {"stream-name": STREAM, "partition-id": partition, "cursor-type": "TRIM_HORIZON"}))
    assert status == 200, cur
    cursor, out = cur["partition_cursor"], []
    while True:
        status, doc = _http(broker, "GET",
                            f"/v2/{PROJECT}/records?limit=10000&partition-cursor={quote(cursor, safe='')}")
        assert status == 200, doc
        for r in doc["records"]:
            point = json.loads(base64.b64decode(r["data"]))
            if point["metric"] == metric and point["tags"] == tags:
                out.append(point)
        if not doc["records"]:
            return out, partition
        cursor = doc["next_partition_cursor"]


def test_opentsdb_py_http_client_gzip_details(broker: BrokerProcess) -> None:
    """opentsdb-py's HTTP client (gzip bodies, ?details=true, 50 points a request from its push thread)
    writes two series of 120 points; every point is acknowledged as a success, then sum, a 1m-avg
    downsample, `none` and a GET m= query give them back, and the DIS door shows them as records."""
    metric, t0 = f"tp.opentsdbpy.{uuid.uuid4().hex[:8]}", _t0()
    client = TSDBClient(broker.host, broker.http_port, protocol=TSDBConnectProtocols.HTTP, host_tag=False)
    try:
        assert client.http_compression == "gzip" and client.send_metrics_batch_limit == 50
        for i in range(120):   # web01 integers, web02 floats: both numeric series
            client.send(metric, i, host="web01", dc="lga", timestamp=t0 + i)
            client.send(metric, i + 0.5, host="web02", dc="lga", timestamp=t0 + i)
        client.close()
        eventually(lambda: not client.is_connected(), timeout=60)
    finally:
        client.close(force=True)
    assert client.statuses == {"success": 240, "failed": 0, "queued": 240}

    end = t0 + 120
    [total] = _query(broker, t0, end, {"metric": metric, "aggregator": "sum", "tags": {"dc": "lga"}})
    assert total["metric"] == metric and total["tags"] == {"dc": "lga"} and total["aggregateTags"] == ["host"]
    assert total["dps"] == {str(t0 + i): 2 * i + 0.5 for i in range(120)}

    [minutes] = _query(broker, t0, end, {"metric": metric, "aggregator": "sum", "downsample": "1m-avg",
                                         "tags": {"dc": "lga"}})
    assert minutes["dps"] == {str(t0): 29.5 + 30.0, str(t0 + 60): 89.5 + 90.0}

    per_series = _query(broker, t0, end, {"metric": metric, "aggregator": "none", "tags": {"host": "*"}})
    assert [(s["tags"], s["dps"]) for s in per_series] == [
        ({"dc": "lga", "host": "web01"}, {str(t0 + i): i for i in range(120)}),
        ({"dc": "lga", "host": "web02"}, {str(t0 + i): i + 0.5 for i in range(120)})]

    status, [web02] = _http(broker, "GET", "/api/query?" + urlencode(
        {"start": t0, "end": end, "m": f"max:1m-max:{metric}{{host=web02}}"}))
    assert status == 200 and web02["dps"] == {str(t0): 59.5, str(t0 + 60): 119.5}

    for host, value in (("web01", lambda i: i), ("web02", lambda i: i + 0.5)):
        tags = {"dc": "lga", "host": host}
        points, _ = _records(broker, metric, tags)
        assert points == [{"metric": metric, "timestamp": (t0 + i) * 1000, "value": value(i), "tags": tags}
                          for i in range(120)]


def test_pyopentsdb_put_flags_errors_and_query(broker: BrokerProcess) -> None:
    """pyopentsdb's synchronous puts to /api/put/ (204s); a point the door refuses raises the client's
    ArgumentError with the door's message and is not stored; the client's own query() (its full 2.x
    body, to /api/query/) and ours give the points back."""
    metric, t0 = f"tp.pyopentsdb.{uuid.uuid4().hex[:8]}", _t0()
    tsdb = TsdbConnector(broker.http_url)
    tags = {"host": "web01"}
    points = [{"metric": metric, "timestamp": t0 + 10 * i, "value": i + 1, "tags": tags} for i in range(30)]
    for lo in range(0, 30, 10):
        assert tsdb.put(data=points[lo:lo + 10]) is None                        # 204, no body
    with pytest.raises(pyopentsdb_errors.ArgumentError, match="One or more data points had errors"):
        tsdb.put(data=[{"metric": metric, "timestamp": t0 + 5, "value": "up", "tags": tags}])   # a numeric series

    start, end = dt.datetime.fromtimestamp(t0, dt.UTC), dt.datetime.fromtimestamp(t0 + 300, dt.UTC)
    [out] = tsdb.query(start=start, end=end, metrics=[
        {"metric": metric, "aggregator": "sum", "downsample": "1m-sum", "tags": tags}])
    assert out["metric"] == metric and out["tags"] == tags
    assert out["dps"] == {str(t0 + 60 * m): 36 * m + 21 for m in range(5)}     # 6 points a minute: 1..6, 7..12, ...

    [raw] = _query(broker, t0, t0 + 300, {"metric": metric, "aggregator": "none", "tags": tags})
    assert raw["dps"] == {str(t0 + 10 * i): i + 1 for i in range(30)}          # integers stay integers
    stored, _ = _records(broker, metric, tags)
    assert [p["value"] for p in stored] == list(range(1, 31))                  # "up" was not stored
