"""Prometheus metrics and health end to end: a broker process gets known traffic through the DIS
door (the official SDK) and the gRPC door (our client), then `/metrics` is scraped and parsed with
prometheus_client's own parser, and the counters are checked exactly. Also: a deleted stream's
series disappear, /healthz and /readyz on every HTTP port, `--metrics-port`, and /metrics behind
an auth file (an admin API key on the HTTP port, open on --metrics-port)."""
from __future__ import annotations

import base64
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from huaweicloudsdkdis.v2 import (
    CommitCheckpointReq,
    CommitCheckpointRequest,
    ConsumeRecordsRequest,
    CreateAppReq,
    CreateAppRequest,
    CreateStreamReq,
    CreateStreamRequest,
    DeleteStreamRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowCursorRequest,
)
from prometheus_client.parser import text_string_to_metric_families

from broker.launcher import BrokerProcess
from client import Client
from tests.conftest import make_dis_client

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    status, text = get(url + "/metrics", headers)
    assert status == 200, text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series_of(samples: Samples, stream: str) -> list[str]:
    return sorted(name for name, labels in samples if ("stream", stream) in labels)


def send(client, stream: str, records: list[tuple[bytes, str]]) -> object:  # type: ignore[no-untyped-def]
    entries = [PutRecordsRequestEntry(data=base64.b64encode(data).decode(), partition_id=pid) for data, pid in records]
    return client.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=stream, records=entries)))


@pytest.fixture
def running(start_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return start_broker("--metrics-port", "0", "--tsdb-port", "0", "--partition-records-per-s", "0")


def test_exact_counters_after_known_traffic(running: BrokerProcess) -> None:
    dis = make_dis_client(running.http_url, "default")
    dis.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name="m1", partition_count=3)))
    # 4 records (10 + 20 + 30 + 40 bytes) to partition 0, 2 (5 + 5) to partition 2, one to a
    # partition that does not exist (a per-record failure, PARTITION_NOT_FOUND)
    reply = send(dis, "m1", [(b"a" * 10, "0"), (b"b" * 20, "0"), (b"c" * 30, "shardId-0000000000"),
                             (b"d" * 40, "0"), (b"e" * 5, "2"), (b"f" * 5, "2"), (b"g", "7")])
    assert reply.failed_record_count == 1
    cursor = dis.show_cursor(ShowCursorRequest(stream_name="m1", partition_id="0",
                                               cursor_type="TRIM_HORIZON")).partition_cursor
    assert len(dis.consume_records(ConsumeRecordsRequest(partition_cursor=cursor)).records) == 4
    dis.create_app(CreateAppRequest(body=CreateAppReq(app_name="reader")))
    dis.commit_checkpoint(CommitCheckpointRequest(body=CommitCheckpointReq(
        app_name="reader", checkpoint_type="LAST_READ", stream_name="m1", partition_id="0", sequence_number="1")))
    with Client(f"127.0.0.1:{running.grpc_port}") as grpc_client:   # the gRPC door: 3 more to partition 1
        grpc_client.put_records("m1", [b"xyz", b"xy", b"x"], partition_id=1)

    m = scrape(running.http_url)
    p = {"project": "default", "stream": "m1"}
    assert [value(m, "sluice_records_in_total", **p, partition=str(i)) for i in range(3)] == [4, 3, 2]
    assert [value(m, "sluice_bytes_in_total", **p, partition=str(i)) for i in range(3)] == [100, 6, 10]
    assert [value(m, "sluice_records_out_total", **p, partition=str(i)) for i in range(3)] == [4, 0, 0]
    assert value(m, "sluice_bytes_out_total", **p, partition="0") == 100
    assert value(m, "sluice_put_requests_total", **p) == 2
    assert value(m, "sluice_get_requests_total", **p) == 1
    assert value(m, "sluice_record_failures_total", **p, reason="PARTITION_NOT_FOUND") == 1
    assert value(m, "sluice_throttled_records_total", **p) == 0
    assert value(m, "sluice_stream_partitions", **p) == 3
    # consumer lag: checkpoint at 1 of 0..3 in partition 0
    assert value(m, "sluice_consumer_lag_records", **p, app="reader", partition="0") == 2
    # request latency per door and verb: one of each so far
    for door, verb in [("dis", "create_stream"), ("dis", "put_records"), ("dis", "get_cursor"),
                       ("dis", "get_records"), ("dis", "commit_checkpoint"), ("grpc", "put_records")]:
        assert value(m, "sluice_request_duration_seconds_count", door=door, verb=verb) == 1, (door, verb)
        assert value(m, "sluice_request_duration_seconds_bucket", door=door, verb=verb, le="+Inf") == 1
    # group commit: every record written went through a commit
    assert value(m, "sluice_commit_records_sum") == 9
    assert value(m, "sluice_commits") == value(m, "sluice_commit_records_count") == 2
    assert value(m, "sluice_storage_state", state="ok") == 1
    assert value(m, "sluice_storage_state", state="full") == 0
    assert value(m, "sluice_store_size_bytes") is not None and value(m, "sluice_store_size_bytes") > 0  # type: ignore[operator]
    assert value(m, "sluice_subscriptions_open") == 0
    assert value(m, "sluice_queries_running") == 0

    # the same numbers on --metrics-port
    assert scrape(f"http://127.0.0.1:{running.metrics_port}") \
        .get(("sluice_records_in_total", frozenset({**p, "partition": "0"}.items()))) == 4

    # a deleted stream's series are gone (bounded cardinality)
    dis.delete_stream(DeleteStreamRequest(stream_name="m1"))
    m = scrape(running.http_url)
    assert series_of(m, "m1") == []
    assert value(m, "sluice_request_duration_seconds_count", door="dis", verb="delete_stream") == 1


def test_request_errors_by_reason(running: BrokerProcess) -> None:
    status, _ = get(running.http_url + "/v2/default/streams/nope")
    assert status == 400
    # aiohttp's routing answers count as the rows they are rendered as
    assert get(running.http_url + "/v2/default/nowhere")[0] == 404
    request = urllib.request.Request(running.http_url + "/v2/default/records", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    refused.value.close()
    m = scrape(running.http_url)
    assert value(m, "sluice_request_errors_total", door="dis", reason="STREAM_NOT_FOUND") == 1
    assert value(m, "sluice_request_duration_seconds_count", door="dis", verb="describe_stream") == 1
    unrouted = {labels: n for (name, labels), n in m.items() if name == "sluice_request_errors_total"
                and dict(labels)["reason"] in ("UNKNOWN_ROUTE", "METHOD_NOT_ALLOWED")}
    assert sorted((dict(labels)["reason"], n) for labels, n in unrouted.items()) == [
        ("METHOD_NOT_ALLOWED", 1), ("UNKNOWN_ROUTE", 1)], unrouted


def test_an_opentsdb_put_whose_body_holds_no_points_is_a_request_error(running: BrokerProcess) -> None:
    """The door built these answers itself: they were neither rows of the catalogue nor counted."""
    for body in (b"[]", b"{not json", b"[]"):
        request = urllib.request.Request(running.http_url + "/api/put", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400
        refused.value.close()
    m = scrape(running.http_url)
    assert value(m, "sluice_request_errors_total", door="tsdb", reason="PUT_NO_POINTS") == 2
    assert value(m, "sluice_request_errors_total", door="tsdb", reason="PUT_BAD_JSON") == 1

def test_records_read_by_a_bounded_query_count_as_out(running: BrokerProcess) -> None:
    """A `table()` scan reads the records as a streaming query does; both count in records_out."""
    with Client(f"127.0.0.1:{running.grpc_port}") as c:
        c.create_stream("scanned", 1)
        c.put_records("scanned", [b'{"a":1}', b'{"a":22}', b'{"a":333}'], partition_id=0)
    request = urllib.request.Request(running.http_url + "/default/api/v1beta2/queries", method="POST",
                                     data=b'{"sql": "select raw:a from table(scanned)"}',
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        events = reply.read().decode()   # to its end: the query ran whole
    assert all(f'["{a}"]' in events for a in (1, 22, 333)), events
    m = scrape(running.http_url)
    p = {"project": "default", "stream": "scanned", "partition": "0"}
    assert value(m, "sluice_records_out_total", **p) == 3
    assert value(m, "sluice_bytes_out_total", **p) == 7 + 8 + 9


def test_a_timeplus_stream_s_stats_are_no_consumer_read(running: BrokerProcess) -> None:
    """GET .../streams/{name}/stats (a describe: its oldest record's time) reads a record of each
    partition that holds any; it counted as a consumer's GetRecords, so every look at a stream's
    stats added to records_out, get_requests and the DIS series a console draws its rates from."""
    with Client(f"127.0.0.1:{running.grpc_port}") as c:
        c.create_stream("looked", 2)
        c.put_records("looked", [b'{"a":1}', b'{"a":22}'], partition_id=0)
        c.put_records("looked", [b'{"a":333}'], partition_id=1)
    for _ in range(3):
        status, body = get(running.http_url + "/default/api/v1beta2/streams/looked/stats")
        assert status == 200 and '"row_count":3' in body, body
    m = scrape(running.http_url)
    for p in ("0", "1"):
        labels = {"project": "default", "stream": "looked", "partition": p}
        assert value(m, "sluice_records_out_total", **labels) == 0
        assert value(m, "sluice_bytes_out_total", **labels) == 0
    assert value(m, "sluice_get_requests_total", project="default", stream="looked") == 0
    assert value(m, "sluice_records_in_total", project="default", stream="looked", partition="0") == 2


def test_health_on_every_port(running: BrokerProcess) -> None:
    for base in (running.http_url, f"http://127.0.0.1:{running.tsdb_port}",
                 f"http://127.0.0.1:{running.metrics_port}"):
        assert get(base + "/healthz") == (200, '{"status": "ok"}')
        assert get(base + "/readyz") == (200, '{"status": "ready"}')
    # the tsdb port has no /metrics: that is the HTTP port's or --metrics-port's
    assert get(f"http://127.0.0.1:{running.tsdb_port}/metrics")[0] == 404


def test_metrics_behind_an_auth_file(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    admin, producer, other = secrets.token_hex(30), secrets.token_hex(30), secrets.token_hex(30)
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[[api_keys]]\nkey = "{admin}"\nworkspace = "p1"\nrole = "admin"\n\n'
                    f'[[api_keys]]\nkey = "{producer}"\nworkspace = "p1"\nrole = "producer"\n\n'
                    f'[[api_keys]]\nkey = "{other}"\nworkspace = "p2"\nrole = "admin"\n')
    auth.chmod(0o600)
    proc = start_broker("--auth-file", str(auth), "--metrics-port", "0")
    status, body = get(proc.http_url + "/metrics")
    assert status == 401 and "DIS.4101" in body
    status, body = get(proc.http_url + "/metrics", {"X-Api-Key": "wrong"})
    assert status == 401 and "DIS.4107" in body
    status, body = get(proc.http_url + "/metrics", {"X-Api-Key": producer})
    assert status == 403 and "DIS.4116" in body
    from client.errors import PermissionDenied, Unauthenticated

    with Client(f"127.0.0.1:{proc.grpc_port}") as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_streams()
    with Client(f"127.0.0.1:{proc.grpc_port}", api_key=producer) as weak, pytest.raises(PermissionDenied):
        weak.create_stream("nope", 1)
    m = scrape(proc.http_url, {"X-Api-Key": admin})
    assert value(m, "sluice_auth_failures_total", door="grpc", code="DIS.4101", reason="AUTH_MISSING") == 1
    assert value(m, "sluice_auth_failures_total", door="grpc", code="DIS.4116", reason="PERMISSION_DENIED") == 1
    assert value(m, "sluice_auth_failures_total", door="metrics", code="DIS.4101", reason="AUTH_MISSING") == 1
    assert value(m, "sluice_auth_failures_total", door="metrics", code="DIS.4107", reason="AUTH_UNKNOWN_KEY") == 1
    assert value(m, "sluice_auth_failures_total", door="metrics", code="DIS.4116", reason="PERMISSION_DENIED") == 1
    # a key reaches only its own project: p2's admin sees p2's streams and not p1's
    with Client(f"127.0.0.1:{proc.grpc_port}", api_key=admin) as p1, \
            Client(f"127.0.0.1:{proc.grpc_port}", api_key=other) as p2:
        p1.create_stream("mine", 1)
        p2.create_stream("theirs", 1)
    theirs = scrape(proc.http_url, {"X-Api-Key": other})
    seen = {(dict(labels).get("project"), dict(labels).get("stream")) for name, labels in theirs
            if name == "sluice_stream_partitions"}
    assert seen == {("p2", "theirs")}, seen
    assert not any(("project", "p1") in labels for _, labels in theirs)
    everything = scrape(f"http://127.0.0.1:{proc.metrics_port}")   # open on its own port: every project
    assert value(everything, "sluice_stream_partitions", project="p1", stream="mine") == 1
    assert get(proc.http_url + "/healthz")[0] == 200        # health stays open
    assert get(proc.http_url + "/readyz")[0] == 200


def test_the_grafana_dashboard_uses_only_exported_metrics(running: BrokerProcess) -> None:
    """docs/grafana-dashboard.json: valid JSON, and every metric its queries name is one the broker
    exports (a family, or a sample of one: _total, _bucket, _count, _sum)."""
    import json
    import re

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for e in exprs for name in re.findall(r"\bsluice_[a-z_]+", e)}
    status, text = get(running.http_url + "/metrics")
    assert status == 200
    exported = set()
    for family in text_string_to_metric_families(text):
        exported |= {family.name, *(family.name + s for s in ("_total", "_bucket", "_count", "_sum"))}
    assert used and used <= exported, used - exported
