"""A PutRecords batch over the record limit is refused for its count before a record is decoded:
a body of a million empty records must not cost the broker an object (and an error) per record.
Measured by the broker process's peak memory (VmHWM), a fresh broker per door."""
from __future__ import annotations

import http.client
from pathlib import Path

import grpc
import pytest

from broker.launcher import BrokerProcess
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc
from tests.api.dis_http import addr

RECORDS = 1_000_000
# measured here: the DIS door's peak grew ~95 MB (the body's JSON: a million empty objects) where
# decoding first made it ~775 MB; gRPC's ~80 MB (grpc's own parse of the message) where ~165 MB
DIS_MAX_GROWTH_MB = 400
GRPC_MAX_GROWTH_MB = 120


def _peak_mb(proc: BrokerProcess) -> float:
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_dis_put_records_refused_by_count_before_decoding(start_broker):
    broker = start_broker()
    conn = http.client.HTTPConnection(*addr(broker.http_url), timeout=120)
    conn.request("POST", "/v2/p1/streams", body=b'{"stream_name": "s", "partition_count": 1}',
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().read() == b""
    before = _peak_mb(broker)
    body = b'{"stream_name": "s", "records": [' + b",".join([b"{}"] * RECORDS) + b"]}"
    conn.request("POST", "/v2/p1/records", body=body, headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    text = reply.read().decode()
    assert reply.status == 400 and "DIS.4200" in text and f"got {RECORDS}" in text, text
    # an unknown stream is named as such, by the same early check
    conn.request("POST", "/v2/p1/records", body=body.replace(b'"s"', b'"nope"', 1),
                 headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 400 and "DIS.4301" in reply.read().decode()
    conn.close()
    assert _peak_mb(broker) - before < DIS_MAX_GROWTH_MB


def test_grpc_put_records_refused_by_count_before_decoding(start_broker):
    broker = start_broker()
    with grpc.insecure_channel(broker.grpc_target) as channel:
        stub = sluice_pb2_grpc.SluiceStub(channel)
        stub.CreateStream(pb.CreateStreamRequest(stream_name="s", partition_count=1), timeout=30)
        before = _peak_mb(broker)
        request = pb.PutRecordsRequest(stream_name="s")
        request.records.entries.extend(pb.PutRecordsEntry() for _ in range(RECORDS))
        with pytest.raises(grpc.RpcError) as caught:
            stub.PutRecords(request, timeout=120)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"got {RECORDS}" in (caught.value.details() or "")
    assert _peak_mb(broker) - before < GRPC_MAX_GROWTH_MB
