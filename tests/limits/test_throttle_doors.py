"""Write throttling through the doors of a real broker process started with a low limit
(`--partition-records-per-s 200`): only the excess of a batch fails, each excess record with
DIS.4303 / THROTTLED, the admitted ones with gap-free sequence numbers; our retrying Producer gets
everything in, in per-key order; a Timeplus ingest over the limit is refused whole (429); an
OpenTSDB put fails the points of its throttled partitions per point. A partition's bucket starts
full (200) when it is first written, so the first batch's cut is exact whatever the machine's speed.
"""
from __future__ import annotations

import base64
import http.client
import json
import uuid
from collections import defaultdict
from typing import Any, Iterator

import pytest
from huaweicloudsdkdis.v2 import (
    CreateStreamReq,
    CreateStreamRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
)

from broker.launcher import BrokerProcess
from client import Client
from client.producer import Producer
from tests.conftest import make_dis_client

RATE = 200


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path_factory.mktemp("throttle") / "data", "--partition-records-per-s", str(RATE),
                         "--tsdb-stream", "tsdb_throttle").start()
    yield proc
    proc.stop(30)


def _name() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


def _http(proc: BrokerProcess, method: str, path: str, body: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(proc.host, proc.http_port, timeout=30)
    try:
        conn.request(method, path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def test_dis_sdk_sees_only_the_excess_fail_with_dis_4303(slow: BrokerProcess) -> None:
    client = make_dis_client(slow.http_url, "default")
    name = _name()
    client.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=name, partition_count=2)))
    entries = [PutRecordsRequestEntry(data=base64.b64encode(b"r%d" % i).decode(), partition_id="shardId-0000000000")
               for i in range(500)]
    entries.append(PutRecordsRequestEntry(data="eA==", partition_id="shardId-0000000001"))
    put = client.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=name, records=entries)))
    assert put.failed_record_count == 300
    assert [r.sequence_number for r in put.records[:RATE]] == [str(i) for i in range(RATE)]
    assert all(r.error_code is None for r in put.records[:RATE])
    assert {(r.error_code, r.sequence_number) for r in put.records[RATE:500]} == {("DIS.4303", None)}
    assert put.records[500].error_code is None and put.records[500].sequence_number == "0"


def test_grpc_sees_only_the_excess_fail_with_throttled(slow: BrokerProcess) -> None:
    name = _name()
    with Client(slow.grpc_target) as client:
        client.create_stream(name, 1)
        results = client.put_records(name, [b"r%d" % i for i in range(300)], partition_id=0)
        assert [r.seq for r in results[:RATE]] == list(range(RATE))
        assert {(r.ok, r.reason, r.dis_code) for r in results[RATE:]} == {(False, "THROTTLED", "DIS.4303")}


def test_a_retrying_producer_loses_nothing_and_keeps_per_key_order(slow: BrokerProcess) -> None:
    name = _name()
    keys, per_key = 12, 100
    with Client(slow.grpc_target) as client:
        client.create_stream(name, 2)
        with Producer(client, name, ordered=True, max_retries=1_000, max_backoff_ms=200) as producer:
            futures = [producer.send(f"{k}:{i}".encode(), partition_key=f"key-{k}")
                       for i in range(per_key) for k in range(keys)]
            producer.flush(timeout=120)
            results = [f.result() for f in futures]
            assert all(r.ok for r in results), {r.reason for r in results if not r.ok}
            assert producer.stats.retries > 0, "the limit was never reached: the test proves nothing"
        seen: dict[str, list[int]] = defaultdict(list)
        for partition in (0, 1):
            cursor = client.get_cursor(name, partition, "TRIM_HORIZON")
            while True:
                page = client.get_records(cursor)
                cursor = page.next_cursor
                if not page.records:
                    break
                for record in page.records:
                    k, i = record.data.decode().split(":")
                    seen[k].append(int(i))
        assert dict(seen) == {str(k): list(range(per_key)) for k in range(keys)}


def test_timeplus_ingest_over_the_limit_is_refused_whole_with_429(slow: BrokerProcess) -> None:
    name = _name()
    base = "/default/api/v1beta2/streams"
    status, _ = _http(slow, "POST", base, {"name": name, "columns": [{"name": "v", "type": "int64"}], "shards": 1})
    assert status == 201
    rows = {"columns": ["v"], "data": [[i] for i in range(150)]}
    assert _http(slow, "POST", f"{base}/{name}/ingest", rows)[0] == 200     # 150 of the 200
    status, body = _http(slow, "POST", f"{base}/{name}/ingest", rows)
    assert status == 429 and body["reason"] == "THROTTLED"
    with Client(slow.grpc_target) as client:                               # nothing of it went in
        page = client.get_records(client.get_cursor(name, 0, "TRIM_HORIZON"), limit=1000)
        assert len(page.records) == 150


def test_opentsdb_points_of_a_throttled_partition_fail_per_point(slow: BrokerProcess) -> None:
    metric = f"m{uuid.uuid4().hex[:8]}"
    points = [{"metric": metric, "timestamp": 1_700_000_000 + i, "value": i, "tags": {"host": "a"}}
              for i in range(150)]
    status, _ = _http(slow, "POST", "/api/put?details", points)
    assert status == 200
    status, body = _http(slow, "POST", "/api/put?details", points)        # one series, one partition: 50 left
    assert status == 400 and body["failed"] == 150 and body["success"] == 0
    assert all(e["error"].startswith("Storage exception: Traffic control limit exceeded") for e in body["errors"])

