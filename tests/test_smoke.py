"""The README's promise in one test: a record written over REST comes back over REST."""
import base64
import urllib.request

import orjson


def _call(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
        return resp.status, orjson.loads(raw) if raw else {}


def test_put_then_get_over_rest(broker, stream_name):
    base = f"{broker.http_url}/v2/p1"
    assert _call("POST", f"{base}/streams", {"stream_name": stream_name, "partition_count": 1})[0] == 201
    status, put = _call("POST", f"{base}/records", {"stream_name": stream_name, "records": [
        {"data": base64.b64encode(b"hello").decode()}]})
    assert status == 200 and put["failed_record_count"] == 0
    assert put["records"][0] == {"partition_id": "shardId-0000000000", "sequence_number": "0"}
    _, cur = _call("GET", f"{base}/cursors?stream-name={stream_name}&partition-id=0&cursor-type=TRIM_HORIZON")
    _, got = _call("GET", f"{base}/records?partition-cursor={cur['partition_cursor']}")
    assert [base64.b64decode(r["data"]) for r in got["records"]] == [b"hello"]
    assert got["next_partition_cursor"]
