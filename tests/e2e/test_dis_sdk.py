"""End to end through the unmodified official DIS SDK (`huaweicloudsdkdis` v2) against a real broker.

Everything here goes over loopback HTTP to a `python -m broker` child process: stream lifecycle,
the three routing modes, reading back with every cursor type, per-record failures and the
documented error codes, as the SDK reports them (shared/spec/dis-api.md sections 2, 4 and 6).
"""
from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from contextlib import contextmanager
from itertools import pairwise
from typing import Iterator

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkdis.v2 import (
    ConsumeRecordsRequest,
    CreateStreamReq,
    CreateStreamRequest,
    DeleteStreamRequest,
    ListStreamsRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowCursorRequest,
    ShowStreamRequest,
)

HASH_MAX = 2**63 - 1
RANGE = re.compile(r"\[(-?\d+) : (-?\d+)\]")
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


# -- helpers -----------------------------------------------------------------------------------

def make_dis_client(http_url: str):  # type: ignore[no-untyped-def]
    """The official SDK over plain http, as spec section 8 says (scheme and project id explicit)."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkdis.v2 import DisClient

    config = HttpConfig.get_default_config()
    config.retry_times = 0
    config.timeout = (5, 30)
    return (DisClient.new_builder().with_http_config(config)
            .with_credentials(BasicCredentials("AKTEST", "SKTEST", "proj1")).with_endpoints([http_url]).build())


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def spec_key_hash(key: str) -> int:
    """The Java producer's hash, written from the spec (section 6), independent of broker code:
    first 8 bytes of MD5, big-endian signed 64-bit, AND 0x7FFFFFFFFFFFFFFF."""
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "big", signed=True) & 0x7FFFFFFFFFFFFFFF


def parse_range(text: str) -> tuple[int, int]:
    m = RANGE.fullmatch(text)
    assert m, f"not a '[a : b]' range string: {text!r}"
    return int(m.group(1)), int(m.group(2))


def create(client, name: str, partitions: int):  # type: ignore[no-untyped-def]
    return client.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=name, partition_count=partitions)))


def send(client, name: str, entries: list[PutRecordsRequestEntry]):  # type: ignore[no-untyped-def]
    return client.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=name, records=entries)))


def entry(data: bytes, **routing: str) -> PutRecordsRequestEntry:
    return PutRecordsRequestEntry(data=b64(data), **routing)


def cursor(client, name: str, partition: str, cursor_type: str | None, **kw: object) -> str:  # type: ignore[no-untyped-def]
    got = client.show_cursor(ShowCursorRequest(stream_name=name, partition_id=partition, cursor_type=cursor_type,
                                               **kw)).partition_cursor
    assert isinstance(got, str) and 1 <= len(got) <= 512
    return got


def consume(client, partition_cursor: str, max_fetch_bytes: int | None = None):  # type: ignore[no-untyped-def]
    got = client.consume_records(ConsumeRecordsRequest(partition_cursor=partition_cursor,
                                                       max_fetch_bytes=max_fetch_bytes))
    assert got.records is not None
    assert got.next_partition_cursor, "next_partition_cursor must always be present"
    return got


def drain(client, partition_cursor: str, max_fetch_bytes: int | None = None):  # type: ignore[no-untyped-def]
    """Read from `partition_cursor` until a read comes back empty.
    Returns (all records, the non-empty pages as lists, the last cursor)."""
    records, pages = [], []
    while True:
        got = consume(client, partition_cursor, max_fetch_bytes)
        partition_cursor = got.next_partition_cursor
        if not got.records:
            return records, pages, partition_cursor
        records.extend(got.records)
        pages.append(got.records)
        assert len(pages) < 10_000


def describe(client, name: str, **kw: object):  # type: ignore[no-untyped-def]
    return client.show_stream(ShowStreamRequest(stream_name=name, **kw))


def partition_ranges(client, name: str) -> dict[str, tuple[int, int]]:
    return {p.partition_id: parse_range(p.hash_range) for p in describe(client, name).partitions}


def owner(ranges: dict[str, tuple[int, int]], h: int) -> str:
    hits = [pid for pid, (lo, hi) in ranges.items() if lo <= h <= hi]
    assert len(hits) == 1, f"hash {h} is in {len(hits)} ranges"
    return hits[0]


@contextmanager
def dis_error(code: str, status: int = 400) -> Iterator[list[ClientRequestException]]:
    caught: list[ClientRequestException] = []
    with pytest.raises(ClientRequestException) as info:
        yield caught
    exc = info.value
    caught.append(exc)
    assert (exc.status_code, exc.error_code) == (status, code), exc.error_msg
    assert exc.error_msg
    assert exc.request_id and REQUEST_ID.fullmatch(exc.request_id), exc.request_id


# -- stream lifecycle --------------------------------------------------------------------------

def test_create_returns_201_and_describe_shows_the_stream(dis_client, stream_name):
    resp = dis_client.create_stream(CreateStreamRequest(body=CreateStreamReq(
        stream_name=stream_name, partition_count=3, stream_type="ADVANCED", data_type="JSON", data_duration=48)))
    assert resp.status_code == 201
    before = now_ms()
    d = describe(dis_client, stream_name)
    assert d.status_code == 200
    assert (d.stream_name, d.status, d.stream_type, d.data_type, d.retention_period) == \
        (stream_name, "RUNNING", "ADVANCED", "JSON", 48)
    assert d.writable_partition_count == d.readable_partition_count == 3
    assert 0 < d.create_time <= before
    assert [p.partition_id for p in d.partitions] == ["shardId-0000000000", "shardId-0000000001", "shardId-0000000002"]
    assert all(p.status == "ACTIVE" for p in d.partitions)
    assert d.has_more_partitions is False


def test_tags_given_at_creation_are_shown_after_a_restart(start_broker, tmp_path):
    """Spec 2.1/2.3: CreateStream's tags and sys_tags come back from ShowStream and ListStreams,
    through the SDK's own models, and are kept with the stream (RocksDB, across a restart)."""
    from huaweicloudsdkdis.v2 import SysTag, Tag

    broker = start_broker(data_dir=tmp_path / "data")
    client = make_dis_client(broker.http_url)
    project_uuid = str(uuid.uuid4())
    client.create_stream(CreateStreamRequest(body=CreateStreamReq(
        stream_name="tagged", partition_count=1, tags=[Tag(key="team", value="payments"), Tag(key="tier", value="")],
        sys_tags=[SysTag(key="_sys_enterprise_project_id", value=project_uuid)])))
    broker.stop()
    client = make_dis_client(start_broker(data_dir=tmp_path / "data").http_url)
    shown = describe(client, "tagged")
    assert [(t.key, t.value) for t in shown.tags] == [("team", "payments"), ("tier", "")]
    assert [(t.key, t.value) for t in shown.sys_tags] == [("_sys_enterprise_project_id", project_uuid)]
    info = client.list_streams(ListStreamsRequest()).stream_info_list
    assert [[(t.key, t.value) for t in i.tags] for i in info] == [[("team", "payments"), ("tier", "")]]
    with pytest.raises(ClientRequestException) as refused:   # Sluice does not scale by itself
        client.create_stream(CreateStreamRequest(body=CreateStreamReq(
            stream_name="auto", partition_count=1, auto_scale_enabled=True,
            auto_scale_min_partition_count=1, auto_scale_max_partition_count=4)))
    assert refused.value.error_code == "DIS.4200" and "UpdatePartitionCount" in refused.value.error_msg


def test_list_streams_pages_in_name_order(start_broker):
    client = make_dis_client(start_broker("--store", "memory").http_url)
    names = [f"list-{i:02d}" for i in range(7)]
    for name in reversed(names):  # created out of order: the listing sorts
        create(client, name, 1)
    first = client.list_streams(ListStreamsRequest())
    assert (first.total_number, first.stream_names, first.has_more_streams) == (7, names, False)
    assert [i.stream_name for i in first.stream_info_list] == names
    assert all(i.partition_count == 1 and i.status == "RUNNING" for i in first.stream_info_list)

    pages, start = [], None
    while True:
        page = client.list_streams(ListStreamsRequest(limit=3, start_stream_name=start))
        assert page.total_number == 7
        pages.append((page.stream_names, page.has_more_streams))
        if not page.has_more_streams:
            break
        start = page.stream_names[-1]
    assert pages == [(names[0:3], True), (names[3:6], True), (names[6:7], False)]
    # the start name is exclusive and need not exist
    page = client.list_streams(ListStreamsRequest(limit=2, start_stream_name="list-03x"))
    assert (page.stream_names, page.has_more_streams) == (["list-04", "list-05"], True)
    # a page that ends exactly at the last stream has no more after it
    page = client.list_streams(ListStreamsRequest(limit=3, start_stream_name="list-03"))
    assert (page.stream_names, page.has_more_streams) == (names[4:7], False)
    page = client.list_streams(ListStreamsRequest(limit=7))
    assert (page.stream_names, page.has_more_streams) == (names, False)
    page = client.list_streams(ListStreamsRequest(limit=6))
    assert (page.stream_names, page.has_more_streams) == (names[:6], True)
    page = client.list_streams(ListStreamsRequest(limit=100, start_stream_name="list-06"))
    assert (page.stream_names, page.has_more_streams, page.total_number) == ([], False, 7)


def test_describe_hash_ranges_are_contiguous_and_partitions_page(dis_client, stream_name):
    create(dis_client, stream_name, 5)  # 5 does not divide 2^63-1: the last range takes the sliver
    assert HASH_MAX % 5 != 0
    d = describe(dis_client, stream_name)
    assert len(d.partitions) == 5 and d.has_more_partitions is False
    ranges = [parse_range(p.hash_range) for p in d.partitions]
    assert ranges[0][0] == 0 and ranges[-1][1] == HASH_MAX
    for (lo, hi), (next_lo, _) in pairwise(ranges):
        assert lo <= hi and next_lo == hi + 1
    # exactly the ranges the Java producer computes (spec section 6)
    avg = HASH_MAX // 5
    assert ranges == [(0, avg)] + [(i * avg + 1, (i + 1) * avg) for i in range(1, 4)] + [(4 * avg + 1, HASH_MAX)]

    ids = [p.partition_id for p in d.partitions]
    seen, pages, start = [], [], None
    while True:
        page = describe(dis_client, stream_name, limit_partitions=2, start_partition_id=start)
        got = [p.partition_id for p in page.partitions]
        pages.append((len(got), page.has_more_partitions))
        seen += got
        if not page.has_more_partitions:
            break
        start = got[-1]
    assert seen == ids and pages == [(2, True), (2, True), (1, False)]
    # the start partition is exclusive, in either id form
    assert [p.partition_id for p in describe(dis_client, stream_name, start_partition_id="1").partitions] == ids[2:]
    page = describe(dis_client, stream_name, start_partition_id="shardId-0000000003", limit_partitions=1)
    assert [p.partition_id for p in page.partitions] == ["shardId-0000000004"] and page.has_more_partitions is False
    page = describe(dis_client, stream_name, start_partition_id="shardId-0000000002", limit_partitions=1)
    assert [p.partition_id for p in page.partitions] == ["shardId-0000000003"] and page.has_more_partitions is True


def test_describe_sequence_number_range_follows_writes(dis_client, stream_name):
    create(dis_client, stream_name, 2)
    send(dis_client, stream_name, [entry(b"x%d" % i, partition_id="1") for i in range(5)])
    send(dis_client, stream_name, [entry(b"y", partition_id="1")])
    parts = {p.partition_id: p for p in describe(dis_client, stream_name).partitions}
    assert parse_range(parts["shardId-0000000001"].sequence_number_range) == (0, 5)
    send(dis_client, stream_name, [entry(b"z", partition_id="0")])
    parts = {p.partition_id: p for p in describe(dis_client, stream_name).partitions}
    assert parse_range(parts["shardId-0000000000"].sequence_number_range) == (0, 0)


def test_delete_then_name_is_free_and_recreated_stream_starts_at_zero(dis_client, stream_name):
    create(dis_client, stream_name, 2)
    put = send(dis_client, stream_name, [entry(b"old-%d" % i, partition_id="0") for i in range(3)])
    assert [r.sequence_number for r in put.records] == ["0", "1", "2"]
    old_cursor = cursor(dis_client, stream_name, "0", "TRIM_HORIZON")

    resp = dis_client.delete_stream(DeleteStreamRequest(stream_name=stream_name))
    assert resp.status_code == 204
    with dis_error("DIS.4301") as caught:
        describe(dis_client, stream_name)
    assert stream_name in caught[0].error_msg
    with dis_error("DIS.4301"):
        dis_client.delete_stream(DeleteStreamRequest(stream_name=stream_name))
    with dis_error("DIS.4301"):
        consume(dis_client, old_cursor)
    listed = dis_client.list_streams(ListStreamsRequest(limit=100, start_stream_name=stream_name[:-1]))
    assert stream_name not in listed.stream_names

    assert create(dis_client, stream_name, 2).status_code == 201
    put = send(dis_client, stream_name, [entry(b"new", partition_id="0")])
    assert (put.failed_record_count, put.records[0].sequence_number) == (0, "0")
    records, _, _ = drain(dis_client, cursor(dis_client, stream_name, "0", "TRIM_HORIZON"))
    assert [base64.b64decode(r.data) for r in records] == [b"new"]
    d = describe(dis_client, stream_name)
    assert parse_range(d.partitions[0].sequence_number_range) == (0, 0)
    with dis_error("DIS.4301"):  # a cursor of the deleted stream never reads the new one
        consume(dis_client, old_cursor)


# -- routing -----------------------------------------------------------------------------------

def test_partition_id_routes_in_both_forms(dis_client, stream_name):
    create(dis_client, stream_name, 4)
    put = send(dis_client, stream_name, [
        entry(b"a", partition_id="2"), entry(b"b", partition_id="shardId-0000000002"),
        entry(b"c", partition_id="3"), entry(b"d", partition_id="shardId-0000000000"),
        entry(b"e", partition_id="2", partition_key="k", explicit_hash_key="0"),  # partition_id wins
    ])
    assert put.failed_record_count == 0
    assert [(r.partition_id, r.sequence_number) for r in put.records] == [
        ("shardId-0000000002", "0"), ("shardId-0000000002", "1"), ("shardId-0000000003", "0"),
        ("shardId-0000000000", "0"), ("shardId-0000000002", "2")]
    assert all(r.error_code is None for r in put.records)
    records, _, _ = drain(dis_client, cursor(dis_client, stream_name, "shardId-0000000002", "TRIM_HORIZON"))
    assert [base64.b64decode(r.data) for r in records] == [b"a", b"b", b"e"]


def test_explicit_hash_key_lands_in_the_partition_whose_range_contains_it(dis_client, stream_name):
    create(dis_client, stream_name, 5)
    ranges = partition_ranges(dis_client, stream_name)
    bounds = sorted(ranges.values())
    hashes = [0, HASH_MAX, bounds[0][1], bounds[1][0], bounds[3][1], bounds[4][0], bounds[2][0] + 12345,
              HASH_MAX // 2, HASH_MAX - 1]
    # explicit_hash_key overrides partition_key: pick a key that hashes elsewhere
    put = send(dis_client, stream_name, [entry(b"h%d" % i, explicit_hash_key=str(h), partition_key="zzz")
                                         for i, h in enumerate(hashes)])
    assert put.failed_record_count == 0
    got = [r.partition_id for r in put.records]
    assert got == [owner(ranges, h) for h in hashes]
    assert len(set(got)) == 5  # every partition was hit, so the check above discriminates


def test_partition_key_hash_follows_the_spec_and_is_stable(dis_client, stream_name):
    create(dis_client, stream_name, 5)
    ranges = partition_ranges(dis_client, stream_name)
    keys = [f"key-{i}" for i in range(40)] + ["ünïcødé-κλειδί", "x" * 256]
    put = send(dis_client, stream_name, [entry(k.encode(), partition_key=k) for k in keys])
    assert put.failed_record_count == 0
    expected = [owner(ranges, spec_key_hash(k)) for k in keys]
    assert [r.partition_id for r in put.records] == expected
    assert len(set(expected)) == 5
    again = send(dis_client, stream_name, [entry(b"again", partition_key=k) for k in reversed(keys)])
    assert [r.partition_id for r in again.records] == list(reversed(expected))
    # every record is readable in its partition, keyed records carry their key
    by_partition: dict[str, list[str]] = {}
    for k, pid in zip(keys, expected):
        by_partition.setdefault(pid, []).append(k)
    for pid, ks in by_partition.items():
        records, _, _ = drain(dis_client, cursor(dis_client, stream_name, pid, "TRIM_HORIZON"))
        first_batch = [r for r in records if base64.b64decode(r.data) != b"again"]
        assert [r.partition_key for r in first_batch] == ks
        assert [base64.b64decode(r.data).decode() for r in first_batch] == ks


# -- reading with every cursor type -----------------------------------------------------------

@pytest.fixture
def filled(dis_client, stream_name):  # type: ignore[no-untyped-def]
    """A 3-partition stream; partition 1 holds 5 records in two batches (3 keyed, 2 by id) with
    distinct timestamps. Returns (name, list of (data, key or None), (ts_min, ts_max) per batch)."""
    create(dis_client, stream_name, 3)
    pid = "shardId-0000000001"
    # keys that hash to partition 1 (computed from the described ranges, not from broker code)
    ranges = partition_ranges(dis_client, stream_name)
    keys = [k for k in (f"k{i}" for i in range(500)) if owner(ranges, spec_key_hash(k)) == pid][:3]
    assert len(keys) == 3
    batch1 = [(b"first-%d" % i + bytes(range(256)), k) for i, k in enumerate(keys)]
    t0 = now_ms()
    put1 = send(dis_client, stream_name, [entry(d, partition_key=k) for d, k in batch1])
    t1 = now_ms()
    time.sleep(0.02)  # the second batch gets a strictly later write time
    batch2 = [(b"second-%d" % i, None) for i in range(2)]
    t2 = now_ms()
    put2 = send(dis_client, stream_name, [entry(d, partition_id="1") for d, _ in batch2])
    t3 = now_ms()
    assert [r.partition_id for r in put1.records + put2.records] == [pid] * 5
    assert [r.sequence_number for r in put1.records + put2.records] == ["0", "1", "2", "3", "4"]
    return stream_name, batch1 + batch2, ((t0, t1), (t2, t3))


def check_records(records, expected, first_seq: int = 0) -> None:  # type: ignore[no-untyped-def]
    assert [base64.b64decode(r.data) for r in records] == [d for d, _ in expected]
    assert [r.sequence_number for r in records] == [str(first_seq + i) for i in range(len(expected))]
    assert [r.partition_key for r in records] == [k for _, k in expected]
    assert all(r.timestamp_type == "CreateTime" for r in records)


def test_trim_horizon_reads_everything_in_order(dis_client, filled):
    name, expected, ((t0, t1), (t2, t3)) = filled
    records, pages, _ = drain(dis_client, cursor(dis_client, name, "1", "TRIM_HORIZON"))
    check_records(records, expected)
    assert len(pages) == 1
    assert all(t0 <= r.timestamp <= t1 for r in records[:3])
    assert all(t2 <= r.timestamp <= t3 for r in records[3:])
    assert len({r.timestamp for r in records[:3]}) == 1 and records[3].timestamp > records[2].timestamp
    # the other partitions are empty, and an empty read still hands out a cursor
    for other in ("0", "shardId-0000000002"):
        got = consume(dis_client, cursor(dis_client, name, other, "TRIM_HORIZON"))
        assert got.records == []


def test_latest_returns_only_records_written_after_it(dis_client, filled):
    name, _, _ = filled
    latest = cursor(dis_client, name, "shardId-0000000001", "LATEST")
    empty = consume(dis_client, latest)
    assert empty.records == []
    new = [(b"later-%d" % i, None) for i in range(3)]
    put = send(dis_client, name, [entry(d, partition_id="1") for d, _ in new])
    assert [r.sequence_number for r in put.records] == ["5", "6", "7"]
    records, _, _ = drain(dis_client, latest)
    check_records(records, new, first_seq=5)
    # the cursor returned by the empty read works the same way
    records, _, _ = drain(dis_client, empty.next_partition_cursor)
    check_records(records, new, first_seq=5)


def test_at_and_after_sequence_number(dis_client, filled):
    name, expected, _ = filled
    for start in range(6):
        records, _, _ = drain(dis_client, cursor(dis_client, name, "1", "AT_SEQUENCE_NUMBER",
                                                 starting_sequence_number=str(start)))
        check_records(records, expected[start:], first_seq=start)
    for start in range(5):
        records, _, _ = drain(dis_client, cursor(dis_client, name, "shardId-0000000001", "AFTER_SEQUENCE_NUMBER",
                                                 starting_sequence_number=str(start)))
        check_records(records, expected[start + 1:], first_seq=start + 1)
    # no cursor type: AT_SEQUENCE_NUMBER is the default
    records, _, _ = drain(dis_client, cursor(dis_client, name, "1", None, starting_sequence_number="3"))
    check_records(records, expected[3:], first_seq=3)


def test_at_timestamp(dis_client, filled):
    name, expected, _ = filled
    all_records, _, _ = drain(dis_client, cursor(dis_client, name, "1", "TRIM_HORIZON"))
    ts1, ts2 = all_records[0].timestamp, all_records[3].timestamp
    assert ts1 < ts2
    cases = [(ts1 - 60_000, 0), (ts1, 0), (ts1 + 1, 3), (ts2, 3), (ts2 + 1, 5), (now_ms() + 60_000, 5)]
    for ts, first in cases:
        records, _, _ = drain(dis_client, cursor(dis_client, name, "1", "AT_TIMESTAMP", timestamp=ts))
        check_records(records, expected[first:], first_seq=first)


def test_paging_through_many_records(dis_client, stream_name):
    create(dis_client, stream_name, 2)
    payloads = [b"rec-%05d-" % i + b"." * (i % 50) for i in range(2300)]
    for chunk in (payloads[:1500], payloads[1500:]):
        put = send(dis_client, stream_name, [entry(p, partition_id="0") for p in chunk])
        assert put.failed_record_count == 0
    # default read size: several pages of at most 1000 records
    records, pages, last = drain(dis_client, cursor(dis_client, stream_name, "0", "TRIM_HORIZON"))
    assert [base64.b64decode(r.data) for r in records] == payloads
    assert [r.sequence_number for r in records] == [str(i) for i in range(2300)]
    assert all(r.partition_key is None for r in records)
    assert [len(p) for p in pages] == [1000, 1000, 300]  # the default read limit is 1000 records
    # small max_fetch_bytes: many small pages, each within the byte budget, complete and in order
    records, pages, _ = drain(dis_client, cursor(dis_client, stream_name, "0", "AT_SEQUENCE_NUMBER",
                                                 starting_sequence_number="2000"), max_fetch_bytes=2000)
    assert [base64.b64decode(r.data) for r in records] == payloads[2000:]
    sizes = [sum(len(base64.b64decode(r.data)) for r in page) for page in pages]
    assert len(pages) >= 5 and all(size <= 2000 for size in sizes)
    assert all(size + len(base64.b64decode(nxt[0].data)) > 2000 for size, nxt in zip(sizes, pages[1:]))
    # the cursor after the end keeps polling, and picks up a later write
    assert consume(dis_client, last).records == []
    send(dis_client, stream_name, [entry(b"tail", partition_id="0")])
    tail = consume(dis_client, last).records
    assert [(base64.b64decode(r.data), r.sequence_number) for r in tail] == [(b"tail", "2300")]


def test_binary_and_empty_payloads_round_trip(dis_client, stream_name):
    create(dis_client, stream_name, 1)
    payloads = [b"", bytes(range(256)), b"\x00" * 1000, "ütf-8 ✓".encode(), b"\xff\xfe" * 17]
    put = send(dis_client, stream_name, [entry(p) for p in payloads])  # no routing at all: one partition
    assert put.failed_record_count == 0
    records, _, _ = drain(dis_client, cursor(dis_client, stream_name, "0", "TRIM_HORIZON"))
    assert [base64.b64decode(r.data) for r in records] == payloads
    assert all(r.partition_key is None for r in records)


# -- per-record failures -----------------------------------------------------------------------

def test_per_record_failures_do_not_stop_the_rest_of_the_batch(dis_client, stream_name):
    create(dis_client, stream_name, 3)
    big = b"\x01" * (1024 * 1024 + 1)
    exactly_max = b"\x02" * (1024 * 1024)
    batch = [
        entry(b"ok-0", partition_id="0"),
        entry(b"bad-pid", partition_id="abc"),                                  # DIS.4201
        entry(b"no-such-partition", partition_id="3"),                          # DIS.4302
        entry(b"ok-1", partition_id="0"),
        entry(b"no-such-partition-long", partition_id="shardId-0000000099"),    # DIS.4302
        entry(b"bad-hash", explicit_hash_key="not-a-number"),                   # DIS.4200
        entry(b"hash-too-big", explicit_hash_key=str(2**63)),                   # DIS.4200
        PutRecordsRequestEntry(data="@@not base64@@", partition_id="0"),        # DIS.4200
        entry(big, partition_id="0"),                                           # DIS.4200, > 1 MiB decoded
        entry(exactly_max, partition_id="0"),                                   # exactly 1 MiB is fine
        entry(b"ok-2", partition_id="0"),
    ]
    put = send(dis_client, stream_name, batch)
    codes = [r.error_code for r in put.records]
    assert codes == [None, "DIS.4201", "DIS.4302", None, "DIS.4302", "DIS.4200", "DIS.4200", "DIS.4200",
                     "DIS.4200", None, None]
    assert put.failed_record_count == 7
    for r in put.records:
        if r.error_code:
            assert r.error_message and r.partition_id is None and r.sequence_number is None
        else:
            assert r.error_message is None
    assert "abc" in put.records[1].error_message
    assert "base64" in put.records[7].error_message
    ok = [r for r in put.records if r.error_code is None]
    assert [(r.partition_id, r.sequence_number) for r in ok] == [("shardId-0000000000", str(i)) for i in range(4)]
    records, _, _ = drain(dis_client, cursor(dis_client, stream_name, "0", "TRIM_HORIZON"))
    assert [base64.b64decode(r.data) for r in records] == [b"ok-0", b"ok-1", exactly_max, b"ok-2"]
    for other in ("1", "2"):
        assert consume(dis_client, cursor(dis_client, stream_name, other, "TRIM_HORIZON")).records == []


def test_a_batch_where_every_record_fails_is_still_200(dis_client, stream_name):
    create(dis_client, stream_name, 1)
    put = send(dis_client, stream_name, [entry(b"x", partition_id="1"), entry(b"y", partition_id="-1")])
    assert put.status_code == 200
    assert put.failed_record_count == 2
    assert [r.error_code for r in put.records] == ["DIS.4302", "DIS.4201"]


# -- documented errors -------------------------------------------------------------------------

def test_unknown_stream_is_dis_4301_everywhere(dis_client):
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with dis_error("DIS.4301") as caught:
        send(dis_client, missing, [entry(b"x")])
    assert missing in caught[0].error_msg
    with dis_error("DIS.4301"):
        describe(dis_client, missing)
    with dis_error("DIS.4301"):
        dis_client.delete_stream(DeleteStreamRequest(stream_name=missing))
    with dis_error("DIS.4301"):
        cursor(dis_client, missing, "0", "TRIM_HORIZON")


def test_stream_exists_is_dis_4307(dis_client, stream_name):
    create(dis_client, stream_name, 1)
    with dis_error("DIS.4307") as caught:
        create(dis_client, stream_name, 2)
    assert stream_name in caught[0].error_msg
    assert describe(dis_client, stream_name).writable_partition_count == 1  # the original is untouched


def test_cursor_errors(dis_client, stream_name):
    create(dis_client, stream_name, 2)
    send(dis_client, stream_name, [entry(b"r%d" % i, partition_id="0") for i in range(3)])  # seqs 0..2
    with dis_error("DIS.4215") as caught:
        cursor(dis_client, stream_name, "0", "SOMETIMES")
    assert "SOMETIMES" in caught[0].error_msg
    for bad in ("abc", "-1", "1.5", "9223372036854775808", "٣"):
        with dis_error("DIS.4216"):
            cursor(dis_client, stream_name, "0", "AT_SEQUENCE_NUMBER", starting_sequence_number=bad)
    with dis_error("DIS.4216") as caught:  # AT/AFTER need a sequence number
        cursor(dis_client, stream_name, "0", "AFTER_SEQUENCE_NUMBER")
    assert caught[0].error_msg == "Invalid sequence_number [missing]"   # not Python's [None]

    with dis_error("DIS.4224") as caught:
        cursor(dis_client, stream_name, "0", "AT_SEQUENCE_NUMBER", starting_sequence_number="10")
    assert caught[0].error_msg == "Sequence_number out of range. [10][ should be within ][0][ ][2]"
    with dis_error("DIS.4224") as caught:
        cursor(dis_client, stream_name, "0", "AFTER_SEQUENCE_NUMBER", starting_sequence_number="3")
    assert caught[0].error_msg == "Sequence_number out of range. [3][ should be within ][0][ ][2]"
    with dis_error("DIS.4224") as caught:  # an empty partition
        cursor(dis_client, stream_name, "1", "AT_SEQUENCE_NUMBER", starting_sequence_number="1")
    # no record to be within: the range is empty (latest below earliest), not [0][0], which holds 0
    assert caught[0].error_msg == "Sequence_number out of range. [1][ should be within ][0][ ][-1]"
    with dis_error("DIS.4224") as caught:
        cursor(dis_client, stream_name, "1", "AFTER_SEQUENCE_NUMBER", starting_sequence_number="0")
    assert caught[0].error_msg == "Sequence_number out of range. [0][ should be within ][0][ ][-1]"
    # the position just after the newest record is valid (and reads nothing yet)
    at_end = cursor(dis_client, stream_name, "0", "AT_SEQUENCE_NUMBER", starting_sequence_number="3")
    assert consume(dis_client, at_end).records == []
    after_last = cursor(dis_client, stream_name, "0", "AFTER_SEQUENCE_NUMBER", starting_sequence_number="2")
    assert consume(dis_client, after_last).records == []

    with dis_error("DIS.4201"):
        cursor(dis_client, stream_name, "zero", "TRIM_HORIZON")
    with dis_error("DIS.4302"):
        cursor(dis_client, stream_name, "2", "TRIM_HORIZON")
    with dis_error("DIS.4302"):
        cursor(dis_client, stream_name, "shardId-0000000002", "TRIM_HORIZON")


def test_bad_partition_cursor_is_dis_4217(dis_client, stream_name):
    create(dis_client, stream_name, 1)
    good = cursor(dis_client, stream_name, "0", "TRIM_HORIZON")
    flipped = good[:-3] + ("A" if good[-3] != "A" else "B") + good[-2:]
    for bad in ("garbage", "x" * 600, good[:-4], flipped, good + "AAAA", "!!!!"):
        with dis_error("DIS.4217"):
            consume(dis_client, bad)
    assert consume(dis_client, good).records == []  # the genuine one still works


def test_request_id_comes_from_the_response_header(dis_client):
    ids = set()
    for _ in range(3):
        with dis_error("DIS.4301") as caught:
            describe(dis_client, "no-such-stream-for-request-id")
        ids.add(caught[0].request_id)
    assert len(ids) == 3  # one per request, not a constant


# -- projects: the `{project_id}` path segment is a namespace (issue 7) -------------------------------

def _project_client(broker):  # type: ignore[no-untyped-def]
    """An SDK client of a project no other test uses, so its listings hold only our streams."""
    from conftest import make_dis_client as client_for
    return client_for(broker.http_url, f"proj-{uuid.uuid4().hex[:12]}")


def test_two_projects_with_the_same_stream_name_are_isolated(broker, stream_name):
    """list, put, read and delete in one project never see the other's stream of the same name."""
    a, b = _project_client(broker), _project_client(broker)
    assert create(a, stream_name, 1).status_code == 201
    assert create(b, stream_name, 3).status_code == 201  # the same name again: another stream
    with dis_error("DIS.4307"):
        create(a, stream_name, 2)

    # list and describe: each project sees its own stream only
    assert a.list_streams(ListStreamsRequest(limit=100)).stream_names == [stream_name]
    assert b.list_streams(ListStreamsRequest(limit=100)).stream_names == [stream_name]
    assert describe(a, stream_name).writable_partition_count == 1
    assert describe(b, stream_name).writable_partition_count == 3

    # put: sequence numbers are per stream, so both start at 0
    put_a = send(a, stream_name, [entry(b"only in A", partition_id="0")])
    put_b = send(b, stream_name, [entry(b"in B", partition_id="0"), entry(b"B again", partition_id="0")])
    assert [r.sequence_number for r in put_a.records] == ["0"]
    assert [r.sequence_number for r in put_b.records] == ["0", "1"]

    # read: each project reads only what was written to it
    cursor_a = cursor(a, stream_name, "0", "TRIM_HORIZON")
    cursor_b = cursor(b, stream_name, "0", "TRIM_HORIZON")
    assert [base64.b64decode(r.data) for r in drain(a, cursor_a)[0]] == [b"only in A"]
    assert [base64.b64decode(r.data) for r in drain(b, cursor_b)[0]] == [b"in B", b"B again"]
    with dis_error("DIS.4217"):  # a cursor is only valid in the project of its stream
        consume(b, cursor_a)

    # delete in A: gone there, untouched in B
    assert a.delete_stream(DeleteStreamRequest(stream_name=stream_name)).status_code == 204
    assert a.list_streams(ListStreamsRequest(limit=100)).stream_names == []
    with dis_error("DIS.4301"):
        describe(a, stream_name)
    with dis_error("DIS.4301"):
        send(a, stream_name, [entry(b"x")])
    assert b.list_streams(ListStreamsRequest(limit=100)).stream_names == [stream_name]
    assert [base64.b64decode(r.data) for r in drain(b, cursor(b, stream_name, "0", "TRIM_HORIZON"))[0]] == [
        b"in B", b"B again"]
    # and the name is free again in A only: a new, empty stream
    assert create(a, stream_name, 1).status_code == 201
    assert drain(a, cursor(a, stream_name, "0", "TRIM_HORIZON"))[0] == []
