"""The DIS monitoring API through the unmodified official SDK (`show_stream_metrics`,
`show_partition_metrics`) against a broker process: every label, label_list, the time range rules
(10-digit seconds, minute points, at most 7 days) and the spec's error codes (shared/spec/dis-api.md
sections 3 and 4: DIS.4203, DIS.4204, DIS.4209), and the series surviving a restart."""
from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Callable

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkdis.v2 import (
    ConsumeRecordsRequest,
    CreateStreamReq,
    CreateStreamRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowCursorRequest,
    ShowPartitionMetricsRequest,
    ShowStreamMetricsRequest,
)

from broker.launcher import BrokerProcess
from tests.conftest import make_dis_client

STREAM_LABELS = ["total_put_bytes_per_stream", "total_get_bytes_per_stream", "total_put_records_per_stream",
                 "total_get_records_per_stream", "total_put_req_latency", "total_get_req_latency",
                 "total_put_req_suc_per_stream", "total_get_req_suc_per_stream", "traffic_control_put",
                 "traffic_control_get"]
PARTITION_LABELS = ["total_put_bytes_per_partition", "total_get_bytes_per_partition",
                    "total_put_records_per_partition", "total_get_records_per_partition"]
WEEK = 7 * 24 * 3600


def window() -> tuple[int, int]:
    now = int(time.time())
    return now - 600, now + 60


def traffic(client, stream: str) -> None:  # type: ignore[no-untyped-def]
    """3 records (1 + 2 + 3 bytes) to partition 1, 1 record (10 bytes) to partition 0; partition 1 read once."""
    client.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=stream, partition_count=2)))
    entries = [PutRecordsRequestEntry(data=base64.b64encode(b"x" * n).decode(), partition_id=pid)
               for n, pid in ((1, "1"), (2, "1"), (3, "shardId-0000000001"), (10, "0"))]
    client.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=stream, records=entries)))
    cursor = client.show_cursor(ShowCursorRequest(stream_name=stream, partition_id="1",
                                                  cursor_type="TRIM_HORIZON")).partition_cursor
    assert len(client.consume_records(ConsumeRecordsRequest(partition_cursor=cursor)).records) == 3


def totals(metrics) -> int:  # type: ignore[no-untyped-def]
    return sum(p.value for p in metrics.data_points)


@pytest.fixture
def dis(broker: BrokerProcess):  # type: ignore[no-untyped-def]
    return make_dis_client(broker.http_url)


def test_stream_metrics_every_label(dis, stream_name: str) -> None:  # type: ignore[no-untyped-def]
    traffic(dis, stream_name)
    lo, hi = window()
    reply = dis.show_stream_metrics(ShowStreamMetricsRequest(
        stream_name=stream_name, label_list=",".join(STREAM_LABELS), start_time=lo, end_time=hi))
    assert [m.label for m in reply.metrics_list] == STREAM_LABELS
    assert reply.metrics.label == STREAM_LABELS[0]
    got = {m.label: m for m in reply.metrics_list}
    assert {label: totals(m) for label, m in got.items() if "latency" not in label} == {
        "total_put_bytes_per_stream": 16, "total_get_bytes_per_stream": 6, "total_put_records_per_stream": 4,
        "total_get_records_per_stream": 3, "total_put_req_suc_per_stream": 1, "total_get_req_suc_per_stream": 1,
        "traffic_control_put": 0, "traffic_control_get": 0}
    for m in reply.metrics_list:   # one point per minute of the range the stream lived in, up to now
        stamps = [p.timestamp for p in m.data_points]
        assert stamps and all(len(str(t)) == 10 and t % 60 == 0 and lo - 60 < t <= hi for t in stamps)
        assert stamps == list(range(stamps[0], stamps[-1] + 60, 60))
        assert all(isinstance(p.value, int) and p.value >= 0 for p in m.data_points)


def test_stream_metrics_one_label(dis, stream_name: str) -> None:  # type: ignore[no-untyped-def]
    traffic(dis, stream_name)
    lo, hi = window()
    reply = dis.show_stream_metrics(ShowStreamMetricsRequest(
        stream_name=stream_name, label="total_put_records_per_stream", start_time=lo, end_time=hi))
    assert reply.metrics.label == "total_put_records_per_stream"
    assert totals(reply.metrics) == 4
    # label_list wins over label (DIS's rule)
    reply = dis.show_stream_metrics(ShowStreamMetricsRequest(
        stream_name=stream_name, label="total_put_records_per_stream", label_list="total_get_records_per_stream",
        start_time=lo, end_time=hi))
    assert reply.metrics.label == "total_get_records_per_stream" and totals(reply.metrics) == 3


def test_partition_metrics(dis, stream_name: str) -> None:  # type: ignore[no-untyped-def]
    traffic(dis, stream_name)
    lo, hi = window()
    for pid in ("1", "shardId-0000000001"):
        reply = dis.show_partition_metrics(ShowPartitionMetricsRequest(
            stream_name=stream_name, partition_id=pid, label="total_put_bytes_per_partition", start_time=lo,
            end_time=str(hi)))   # the SDK types end_time as str here
        assert reply.metrics.label == "total_put_bytes_per_partition" and totals(reply.metrics) == 6
    reply = dis.show_partition_metrics(ShowPartitionMetricsRequest(
        stream_name=stream_name, partition_id="0", label_list=",".join(PARTITION_LABELS), start_time=lo,
        end_time=str(hi)))
    assert reply.metrics.label == PARTITION_LABELS[0] and totals(reply.metrics) == 10


def test_an_old_range_is_empty(dis, stream_name: str) -> None:  # type: ignore[no-untyped-def]
    traffic(dis, stream_name)
    now = int(time.time())
    reply = dis.show_stream_metrics(ShowStreamMetricsRequest(
        stream_name=stream_name, label="total_put_records_per_stream", start_time=now - 3 * 86400,
        end_time=now - 2 * 86400))   # before the stream existed
    assert reply.metrics.data_points == []


def expect(code: str, call: Callable[[], object]) -> None:
    with pytest.raises(ClientRequestException) as caught:
        call()
    assert (caught.value.status_code, caught.value.error_code) == (400, code), caught.value.error_msg


def test_error_codes(dis, stream_name: str) -> None:  # type: ignore[no-untyped-def]
    traffic(dis, stream_name)
    lo, hi = window()
    now = int(time.time())

    def stream(**kw: object) -> Callable[[], object]:
        args = {"stream_name": stream_name, "label": "total_put_bytes_per_stream", "start_time": lo, "end_time": hi,
                **kw}
        return lambda: dis.show_stream_metrics(ShowStreamMetricsRequest(**args))

    expect("DIS.4209", stream(label="total_put_bytes"))
    expect("DIS.4209", stream(label=None))
    expect("DIS.4209", stream(label="total_put_bytes_per_partition"))     # a partition label
    expect("DIS.4209", stream(label_list="total_put_bytes_per_stream,nope"))
    expect("DIS.4203", stream(start_time=hi, end_time=lo))                 # start after end
    expect("DIS.4203", stream(start_time=None))
    expect("DIS.4204", stream(start_time=now - WEEK - 3600, end_time=now))  # longer than 7 days
    expect("DIS.4204", stream(start_time=now - 9 * 86400, end_time=now - 8 * 86400))   # older than 7 days
    expect("DIS.4301", stream(stream_name="no-such-stream"))
    expect("DIS.4209", lambda: dis.show_partition_metrics(ShowPartitionMetricsRequest(
        stream_name=stream_name, partition_id="0", label="total_put_bytes_per_stream", start_time=lo,
        end_time=str(hi))))
    expect("DIS.4302", lambda: dis.show_partition_metrics(ShowPartitionMetricsRequest(
        stream_name=stream_name, partition_id="9", label="total_put_bytes_per_partition", start_time=lo,
        end_time=str(hi))))
    expect("DIS.4201", lambda: dis.show_partition_metrics(ShowPartitionMetricsRequest(
        stream_name=stream_name, partition_id="p", label="total_put_bytes_per_partition", start_time=lo,
        end_time=str(hi))))


def test_series_survive_a_restart(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    data = tmp_path / "restart"
    proc = start_broker(data_dir=data)
    client = make_dis_client(proc.http_url)
    traffic(client, "kept")
    proc.stop(15)
    proc = start_broker(data_dir=data)
    client = make_dis_client(proc.http_url)
    lo, hi = window()
    reply = client.show_stream_metrics(ShowStreamMetricsRequest(
        stream_name="kept", label_list="total_put_records_per_stream,total_get_bytes_per_stream", start_time=lo,
        end_time=hi))
    assert [totals(m) for m in reply.metrics_list] == [4, 6]
