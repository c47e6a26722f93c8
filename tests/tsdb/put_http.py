"""Raw-HTTP helpers for the OpenTSDB door's tests: one request per fresh connection, and reading
the tsdb stream back the way a DIS consumer does (cursors, GetRecords, base64 data)."""
from __future__ import annotations

import base64
import gzip
import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from broker.launcher import BrokerProcess

JSON_UTF8 = "application/json; charset=UTF-8"
POINT_ERRORS = {"error": {"code": 400, "message": "One or more data points had errors",
                          "details": "Please see the TSD logs or append \"details\" to the put request"}}


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def request(broker: BrokerProcess, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, port: int | None = None, timeout: float = 60) -> Reply:
    conn = http.client.HTTPConnection(broker.host, port or broker.http_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def put(broker: BrokerProcess, points: Any, query: str = "", *, raw: bytes | None = None, gzipped: bool = False,
        path: str = "/api/put", port: int | None = None) -> Reply:
    """POST the points (any JSON value; or `raw` bytes as they are) to /api/put`query`."""
    body = raw if raw is not None else json.dumps(points, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json"}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return request(broker, "POST", path + query, body, headers, port)


def check_json(reply: Reply, status: int) -> Any:
    """The reply has `status`, the door's JSON content type, and a JSON body (returned)."""
    assert reply.status == status, (reply.status, reply.raw[:500])
    assert reply.headers["Content-Type"] == JSON_UTF8, dict(reply.headers)
    return reply.json


def details(reply: Reply, status: int = 400) -> list[str]:
    """The error strings of a `?details` reply, in order."""
    body = check_json(reply, status)
    assert body["failed"] == len(body["errors"]), body
    return [e["error"] for e in body["errors"]]


def _dis(broker: BrokerProcess, path: str) -> Any:
    reply = request(broker, "GET", path)
    assert reply.status == 200, (reply.status, reply.raw[:300])
    return reply.json


def stream_records(broker: BrokerProcess, project: str = "default", stream: str = "tsdb",
                   partitions: int = 8) -> list[tuple[int, dict[str, Any], int]]:
    """Every record of the stream as (partition, the JSON record, its stored timestamp), read as
    a DIS consumer reads: a TRIM_HORIZON cursor per partition, then GetRecords until empty."""
    out: list[tuple[int, dict[str, Any], int]] = []
    for p in range(partitions):
        cursor = _dis(broker, f"/v2/{project}/cursors?stream-name={stream}&partition-id={p}"
                              f"&cursor-type=TRIM_HORIZON")["partition_cursor"]
        while True:
            page = _dis(broker, f"/v2/{project}/records?partition-cursor={quote(cursor)}&limit=10000")
            if not page["records"]:
                break
            for r in page["records"]:
                assert "partition_key" not in r   # routed by the series key's hash, no key kept
                out.append((p, json.loads(base64.b64decode(r["data"])), r["timestamp"]))
            cursor = page["next_partition_cursor"]
    return out


def points_of(broker: BrokerProcess, metric: str) -> list[dict[str, Any]]:
    """The stored points of one metric, in partition then log order."""
    return [rec for _, rec, _ in stream_records(broker) if rec["metric"] == metric]
