"""The gRPC door end to end: the generated sluice.v1 stubs against a real broker process.

Covers the admin verbs, routing, reading back with every cursor type, per-record failures in the
columnar PutRecords response, the error statuses with their `dis-error-code` trailer, garbage
protobuf on the wire, the standard health and reflection services, and the `client.Client`
wrapper.
"""
from __future__ import annotations

import hashlib
import time
from itertools import pairwise
from typing import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc

HASH_MAX = 2**63 - 1
TIMEOUT = 10.0  # every RPC in this module: a hang is a failure, never a stuck suite
METHODS = ("CreateStream", "ListStreams", "DescribeStream", "DeleteStream", "UpdatePartitionCount", "PutRecords",
           "PutRecordsStream", "GetCursor", "GetRecords", "Subscribe", "CreateApp", "ListApps", "DescribeApp",
           "DeleteApp", "CommitCheckpoint", "GetCheckpoint",
           "DeleteCheckpoint", "GetConsumerState", "Heartbeat", "LeaveGroup", "CreateSource", "ListSources",
           "DescribeSource", "UpdateSource", "DeleteSource", "StartSource", "StopSource", "GetSourceStats")


# -- helpers -----------------------------------------------------------------------------------

def dis_code(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("dis-error-code")


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a refusal, decoded the standard way (grpcio-status)."""
    status = rpc_status.from_call(err)  # also checks that code and message match the call's
    assert status is not None, "a refusal carries a google.rpc.Status in grpc-status-details-bin"
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status.details
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


def expect_error(call, request, status: grpc.StatusCode, code: str,  # type: ignore[no-untyped-def]
                 reason: str | None = None, metadata: tuple = ()) -> grpc.RpcError:  # type: ignore[type-arg]
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=TIMEOUT, metadata=metadata)
    err = info.value
    assert err.code() == status, (err.code(), err.details())
    assert dis_code(err) == code, (dis_code(err), err.details())
    assert err.details(), "an error must carry a message"
    details = error_info(err)
    assert details.domain == "sluice" and details.metadata["dis_code"] == code, details
    if reason is not None:
        assert details.reason == reason, (details.reason, err.details())
    return err


def create(stub, name: str, partitions: int = 1) -> None:  # type: ignore[no-untyped-def]
    stub.CreateStream(pb.CreateStreamRequest(stream_name=name, partition_count=partitions), timeout=TIMEOUT)


def put(stub, name: str, entries: list[pb.PutRecordsEntry]) -> pb.PutRecordsResponse:  # type: ignore[no-untyped-def]
    return stub.PutRecords(pb.PutRecordsRequest(stream_name=name, records=pb.RecordList(entries=entries)),
                           timeout=TIMEOUT)


def to_partition(stub, name: str, partition: int, payloads: list[bytes], key: str = "") -> list[int]:  # type: ignore[no-untyped-def]
    resp = put(stub, name, [pb.PutRecordsEntry(data=d, partition_key=key, partition_id=partition)
                            for d in payloads])
    assert resp.failed_record_count == 0, resp.failures
    assert list(resp.partition_ids) == [partition] * len(payloads)
    return list(resp.seqs)


def cursor(stub, name: str, partition: int, kind: int = pb.CURSOR_TYPE_TRIM_HORIZON,  # type: ignore[no-untyped-def]
           seq: int | None = None, timestamp: int | None = None, metadata: tuple = ()) -> str:  # type: ignore[type-arg]
    req = pb.GetCursorRequest(stream_name=name, partition_id=partition, cursor_type=kind)
    if seq is not None:
        req.starting_seq = seq
    if timestamp is not None:
        req.timestamp_ms = timestamp
    token = stub.GetCursor(req, timeout=TIMEOUT, metadata=metadata).cursor
    assert token
    return token


def drain(stub, token: str, limit: int = 0, max_pages: int = 1000, metadata: tuple = ()):  # type: ignore
    """Follow next_cursor until an empty page. Returns (seqs, data, keys, timestamps, last cursor)."""
    seqs: list[int] = []
    data: list[bytes] = []
    keys: list[str] = []
    stamps: list[int] = []
    for _ in range(max_pages):
        page = stub.GetRecords(pb.GetRecordsRequest(cursor=token, limit=limit), timeout=TIMEOUT, metadata=metadata)
        n = len(page.seqs)
        assert len(page.data) == len(page.timestamps_ms) == len(page.partition_keys) == n, "columns must be parallel"
        if limit:
            assert n <= limit
        assert page.next_cursor
        token = page.next_cursor
        if n == 0:
            assert page.millis_behind_latest == 0
            return seqs, data, keys, stamps, token
        seqs += page.seqs
        data += page.data
        keys += page.partition_keys
        stamps += page.timestamps_ms
    raise AssertionError(f"partition not drained within {max_pages} pages")


def key_partition(key: str, partitions: int) -> int:
    """DIS routing, computed independently: MD5 of the key, first 8 bytes big-endian, sign bit cleared,
    then the partition whose [start, end] hash range holds it."""
    h = int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "big") & HASH_MAX
    for i, (lo, hi) in enumerate(dis_ranges(partitions)):
        if lo <= h <= hi:
            return i
    raise AssertionError("hash outside every range")


def dis_ranges(partitions: int) -> list[tuple[int, int]]:
    avg = HASH_MAX // partitions
    ranges = [(0 if i == 0 else i * avg + 1, (i + 1) * avg) for i in range(partitions)]
    ranges[-1] = (ranges[-1][0], HASH_MAX)
    return ranges


def describe(stub, name: str, **kw) -> pb.DescribeStreamResponse:  # type: ignore[no-untyped-def]
    return stub.DescribeStream(pb.DescribeStreamRequest(stream_name=name, **kw), timeout=TIMEOUT)


# -- streams -----------------------------------------------------------------------------------

def test_create_and_describe_stream(sluice_stub, stream_name):
    before = int(time.time() * 1000)
    create(sluice_stub, stream_name, 5)
    desc = describe(sluice_stub, stream_name)
    s = desc.stream
    assert (s.stream_name, s.partition_count, s.retention_hours, s.data_type, s.stream_type, s.status) == \
        (stream_name, 5, 24, pb.DATA_TYPE_BLOB, pb.STREAM_TYPE_COMMON, pb.STREAM_STATUS_RUNNING)
    assert before - 5000 <= s.created_ms <= int(time.time() * 1000) + 5000
    assert s.stream_id > 0
    assert not desc.has_more
    parts = desc.partitions
    assert [p.partition_id for p in parts] == list(range(5))
    assert all(p.status == pb.PARTITION_STATUS_ACTIVE for p in parts)
    # the hash ranges tile [0, 2^63-1] without gap or overlap
    assert parts[0].hash_range_start == 0
    assert parts[-1].hash_range_end == HASH_MAX
    for prev, nxt in pairwise(parts):
        assert nxt.hash_range_start == prev.hash_range_end + 1
    for p in parts:
        assert p.hash_range_start <= p.hash_range_end
    assert [(p.hash_range_start, p.hash_range_end) for p in parts] == dis_ranges(5)
    # empty partitions: first == next == 0
    assert [(p.first_seq, p.next_seq) for p in parts] == [(0, 0)] * 5

    to_partition(sluice_stub, stream_name, 3, [b"a", b"b", b"c"])
    to_partition(sluice_stub, stream_name, 0, [b"z"])
    parts = describe(sluice_stub, stream_name).partitions
    assert [(p.first_seq, p.next_seq) for p in parts] == \
        [(0, 1), (0, 0), (0, 0), (0, 3), (0, 0)]


@pytest.mark.parametrize("length", [257, 6_000, 20_000])
def test_a_long_unknown_name_is_not_found_with_its_details(sluice_stub, length):
    """The name was echoed whole in the message and its details trailer: past ~5,000 characters
    the client's metadata limit turned STREAM_NOT_FOUND into RESOURCE_EXHAUSTED with no details."""
    with pytest.raises(grpc.RpcError) as caught:
        sluice_stub.DescribeStream(pb.DescribeStreamRequest(stream_name="a" * length), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value
    assert error_info(caught.value).reason == "STREAM_NOT_FOUND"
    assert caught.value.details() == f"Stream [{'a' * 256}... ({length} characters)] does not exist"


def test_create_stream_options(sluice_stub, stream_name):
    sluice_stub.CreateStream(pb.CreateStreamRequest(stream_name=stream_name, partition_count=2, retention_hours=72,
                                                    data_type=pb.DATA_TYPE_JSON, stream_type=pb.STREAM_TYPE_ADVANCED),
                             timeout=TIMEOUT)
    s = describe(sluice_stub, stream_name).stream
    assert (s.retention_hours, s.data_type, s.stream_type) == (72, pb.DATA_TYPE_JSON, pb.STREAM_TYPE_ADVANCED)
    for data_type in (pb.DATA_TYPE_BLOB, pb.DATA_TYPE_CSV):
        name = f"{stream_name}-{data_type}"
        sluice_stub.CreateStream(pb.CreateStreamRequest(stream_name=name, partition_count=1, data_type=data_type,
                                                        stream_type=pb.STREAM_TYPE_COMMON), timeout=TIMEOUT)
        assert describe(sluice_stub, name).stream.data_type == data_type


@pytest.mark.parametrize("field, number", [("data_type", 4), ("data_type", -1), ("stream_type", 3)])
def test_create_stream_refuses_numbers_outside_the_enums(sluice_stub, stream_name, field, number):
    request = pb.CreateStreamRequest(stream_name=stream_name, partition_count=1, **{field: number})
    err = expect_error(sluice_stub.CreateStream, request, grpc.StatusCode.INVALID_ARGUMENT, "DIS.4200",
                       "INVALID_REQUEST")
    assert field in err.details()
    expect_error(sluice_stub.DescribeStream, pb.DescribeStreamRequest(stream_name=stream_name),
                 grpc.StatusCode.NOT_FOUND, "DIS.4301", "STREAM_NOT_FOUND")


def test_describe_stream_partition_paging(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 7)
    first = describe(sluice_stub, stream_name, limit=3)
    assert [p.partition_id for p in first.partitions] == [0, 1, 2]
    assert first.has_more
    second = describe(sluice_stub, stream_name, start_after_partition=first.partitions[-1].partition_id,
                      limit=3)
    assert [p.partition_id for p in second.partitions] == [3, 4, 5]
    assert second.has_more
    last = describe(sluice_stub, stream_name, start_after_partition=5, limit=3)
    assert [p.partition_id for p in last.partitions] == [6]
    assert not last.has_more
    whole = describe(sluice_stub, stream_name).partitions
    assert list(first.partitions) + list(second.partitions) + list(last.partitions) == list(whole)


def test_list_streams_paging(sluice_stub, stream_name):
    mine = [f"{stream_name}-{i}" for i in range(5)]
    for name in reversed(mine):  # creation order must not matter: pages are in name order
        create(sluice_stub, name, 1)

    walked: list[str] = []
    start = ""
    total = None
    for _ in range(10_000):
        page = sluice_stub.ListStreams(pb.ListStreamsRequest(limit=2, start_after=start), timeout=TIMEOUT)
        names = [s.stream_name for s in page.streams]
        assert len(names) <= 2
        total = page.total if total is None else total
        assert page.total == total
        walked += names
        if not page.has_more:
            break
        assert len(names) == 2
        start = names[-1]
    else:
        raise AssertionError("paging never ended")
    assert walked == sorted(set(walked)), "pages must be in strict name order, without repeats"
    assert len(walked) == total
    assert set(mine) <= set(walked)

    # start_after is exclusive; the page stops at `limit`
    page = sluice_stub.ListStreams(pb.ListStreamsRequest(limit=3, start_after=stream_name), timeout=TIMEOUT)
    assert [s.stream_name for s in page.streams] == mine[:3]
    assert page.has_more
    page = sluice_stub.ListStreams(pb.ListStreamsRequest(limit=2, start_after=mine[2]), timeout=TIMEOUT)
    assert [s.stream_name for s in page.streams] == mine[3:5]
    info = {s.stream_name: s for s in page.streams}
    assert info[mine[3]].partition_count == 1 and info[mine[3]].status == pb.STREAM_STATUS_RUNNING

    # the default page is 10; 0 means default, over 100 is refused
    default = sluice_stub.ListStreams(pb.ListStreamsRequest(), timeout=TIMEOUT)
    assert len(default.streams) == min(10, total)
    expect_error(sluice_stub.ListStreams, pb.ListStreamsRequest(limit=101), grpc.StatusCode.INVALID_ARGUMENT,
                 "DIS.4200")


def test_delete_stream_frees_the_name_and_the_log(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 2)
    assert to_partition(sluice_stub, stream_name, 1, [b"old-1", b"old-2", b"old-3"]) == [0, 1, 2]
    old_cursor = cursor(sluice_stub, stream_name, 1)
    old_id = describe(sluice_stub, stream_name).stream.stream_id

    sluice_stub.DeleteStream(pb.DeleteStreamRequest(stream_name=stream_name), timeout=TIMEOUT)
    expect_error(sluice_stub.DescribeStream, pb.DescribeStreamRequest(stream_name=stream_name),
                 grpc.StatusCode.NOT_FOUND, "DIS.4301")
    listed = sluice_stub.ListStreams(pb.ListStreamsRequest(limit=1, start_after=stream_name[:-1]),
                                     timeout=TIMEOUT)
    assert stream_name not in [s.stream_name for s in listed.streams]
    expect_error(sluice_stub.DeleteStream, pb.DeleteStreamRequest(stream_name=stream_name),
                 grpc.StatusCode.NOT_FOUND, "DIS.4301")

    create(sluice_stub, stream_name, 2)  # the name is free again at once
    desc = describe(sluice_stub, stream_name)
    assert desc.stream.stream_id != old_id
    assert [(p.first_seq, p.next_seq) for p in desc.partitions] == [(0, 0), (0, 0)]
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 1))[0] == []
    assert to_partition(sluice_stub, stream_name, 1, [b"new"]) == [0]  # numbering restarts at 0
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 1))[1] == [b"new"]
    # a cursor of the deleted stream stays dead even though the name lives again; the error names
    # it by its name and the id that tells it from the new stream
    err = expect_error(sluice_stub.GetRecords, pb.GetRecordsRequest(cursor=old_cursor),
                       grpc.StatusCode.NOT_FOUND, "DIS.4301")
    assert err.details() == f"Stream [{stream_name} (deleted stream {old_id})] does not exist", err.details()


# -- writing: routing --------------------------------------------------------------------------

def test_put_routes_by_partition_id(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 4)
    resp = put(sluice_stub, stream_name, [
        pb.PutRecordsEntry(data=b"short", partition_id=2),
        pb.PutRecordsEntry(data=b"long", partition_id=2),
        # partition_id wins over explicit_hash_key and partition_key
        pb.PutRecordsEntry(data=b"wins", partition_id=2, explicit_hash_key="0", partition_key="whatever"),
        pb.PutRecordsEntry(data=b"p0", partition_id=0),
    ])
    assert resp.failed_record_count == 0 and not resp.failures
    assert list(resp.partition_ids) == [2, 2, 2, 0]
    assert list(resp.seqs) == [0, 1, 2, 0]
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 2))[:2] == \
        ([0, 1, 2], [b"short", b"long", b"wins"])
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 0))[1] == [b"p0"]
    for p in (1, 3):
        assert drain(sluice_stub, cursor(sluice_stub, stream_name, p))[0] == []


def test_put_routes_by_explicit_hash_key(sluice_stub, stream_name):
    n = 4
    create(sluice_stub, stream_name, n)
    ranges = [(p.hash_range_start, p.hash_range_end) for p in describe(sluice_stub, stream_name).partitions]
    entries, expected = [], []
    for i, (lo, hi) in enumerate(ranges):
        for h in (lo, (lo + hi) // 2, hi):
            # explicit_hash_key wins over partition_key: pair each with a key that routes elsewhere
            other = next(f"k{j}" for j in range(1000) if key_partition(f"k{j}", n) != i)
            entries.append(pb.PutRecordsEntry(data=f"h{h}".encode(), explicit_hash_key=str(h), partition_key=other))
            expected.append(i)
    resp = put(sluice_stub, stream_name, entries)
    assert resp.failed_record_count == 0
    assert list(resp.partition_ids) == expected
    assert list(resp.seqs) == [0, 1, 2] * n
    for i, (lo, hi) in enumerate(ranges):
        assert drain(sluice_stub, cursor(sluice_stub, stream_name, i))[1] == \
            [f"h{h}".encode() for h in (lo, (lo + hi) // 2, hi)]


def test_put_routes_by_partition_key(sluice_stub, stream_name):
    n = 5
    create(sluice_stub, stream_name, n)
    keys = [f"user-{i}" for i in range(200)] + ["ключ", "🙂"]
    resp = put(sluice_stub, stream_name, [pb.PutRecordsEntry(data=k.encode(), partition_key=k) for k in keys])
    assert resp.failed_record_count == 0
    expected = [key_partition(k, n) for k in keys]
    assert list(resp.partition_ids) == expected
    assert len(set(expected)) == n, "200 keys must reach every partition"
    # per partition: consecutive seqs from 0, in request order; the key comes back with the record
    for p in range(n):
        mine = [k for k, e in zip(keys, expected) if e == p]
        assert [s for s, e in zip(resp.seqs, expected) if e == p] == list(range(len(mine)))
        seqs, data, got_keys, _, _ = drain(sluice_stub, cursor(sluice_stub, stream_name, p))
        assert seqs == list(range(len(mine)))
        assert data == [k.encode() for k in mine]
        assert got_keys == mine


def test_put_without_key_spreads_and_keeps_order(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 3)
    resp = put(sluice_stub, stream_name, [pb.PutRecordsEntry(data=str(i).encode()) for i in range(30)])
    assert resp.failed_record_count == 0
    assert set(resp.partition_ids) == {0, 1, 2}
    total = 0
    for p in range(3):
        seqs, data, keys, _, _ = drain(sluice_stub, cursor(sluice_stub, stream_name, p))
        sent = [str(i).encode() for i, q in enumerate(resp.partition_ids) if q == p]
        assert data == sent and seqs == list(range(len(sent)))
        assert keys == [""] * len(sent)  # written without a key
        total += len(seqs)
    assert total == 30


# -- reading: the five cursor types ------------------------------------------------------------

@pytest.fixture
def filled(sluice_stub, stream_name) -> Iterator[tuple[str, list[bytes], list[int]]]:
    """Partition 1 of a 2-partition stream with 25 records written by three requests, timestamps apart."""
    create(sluice_stub, stream_name, 2)
    payloads = [f"rec-{i:03d}".encode() for i in range(25)]
    seqs = to_partition(sluice_stub, stream_name, 1, payloads[:10], key="a")
    time.sleep(0.03)
    seqs += to_partition(sluice_stub, stream_name, 1, payloads[10:20], key="b")
    time.sleep(0.03)
    seqs += to_partition(sluice_stub, stream_name, 1, payloads[20:])
    assert seqs == list(range(25))
    yield stream_name, payloads, seqs


def test_a_page_of_long_partition_keys_fits_in_one_grpc_message(sluice_stub, broker, stream_name):
    """max_fetch_bytes counts payloads: 10,000 records of 400 bytes with 256-character keys of 4-byte
    characters made a 14 MB answer, past the 13 MB grpc sends (RESOURCE_EXHAUSTED, no details, on
    every retry; the gRPC probe). The page is shorter instead, and the next one goes on from it."""
    from client import Client

    sluice_stub.CreateStream(pb.CreateStreamRequest(stream_name=stream_name, partition_count=1), timeout=TIMEOUT)
    key = "\U0001F600" * 256
    for _ in range(3):
        put = sluice_stub.PutRecords(pb.PutRecordsRequest(stream_name=stream_name, columns=pb.RecordColumns(
            data=[b"d" * 400] * 3_400, partition_keys=[key] * 3_400)), timeout=TIMEOUT)
        assert put.failed_record_count == 0
    cursor = sluice_stub.GetCursor(pb.GetCursorRequest(stream_name=stream_name, partition_id=0,
                                                       cursor_type=pb.CURSOR_TYPE_TRIM_HORIZON), timeout=TIMEOUT).cursor
    seqs: list[int] = []
    pages: list[int] = []
    with Client(broker.grpc_target, timeout=TIMEOUT) as client:
        while len(seqs) < 10_200:
            page = client.get_records(cursor, limit=10_000, max_fetch_bytes=10 << 20)
            assert page.records and all(r.partition_key == key for r in page.records)
            seqs += [r.seq for r in page.records]
            pages.append(len(page.records))
            cursor = page.next_cursor
    assert seqs == list(range(10_200))
    assert 5_000 < pages[0] < 10_000, pages   # cut to what one message holds, not to a trickle


def test_trim_horizon_reads_everything_in_order_across_pages(sluice_stub, filled):
    name, payloads, _ = filled
    for limit in (0, 1, 7, 25, 10_000):
        seqs, data, keys, stamps, _ = drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_TRIM_HORIZON),
                                            limit=limit)
        assert seqs == list(range(25)), limit
        assert data == payloads
        assert keys == ["a"] * 10 + ["b"] * 10 + [""] * 5
        assert stamps == sorted(stamps) and stamps[0] > 0
        assert stamps[9] < stamps[10] and stamps[19] < stamps[20]  # the sleeps between the writes
    assert drain(sluice_stub, cursor(sluice_stub, name, 0, pb.CURSOR_TYPE_TRIM_HORIZON))[0] == []  # the other partition


def test_at_sequence_number(sluice_stub, filled):
    name, payloads, _ = filled
    for start in (0, 13, 24):
        seqs, data, *_ = drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_AT_SEQUENCE_NUMBER, start))
        assert seqs == list(range(start, 25)) and data == payloads[start:]
    # next_seq itself is a valid position: nothing yet
    assert drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_AT_SEQUENCE_NUMBER, 25))[0] == []
    # UNSPECIFIED means AT_SEQUENCE_NUMBER, the DIS default
    seqs, *_ = drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_UNSPECIFIED, 20))
    assert seqs == list(range(20, 25))


def test_after_sequence_number(sluice_stub, filled):
    name, payloads, _ = filled
    for start in (0, 13, 23):
        seqs, data, *_ = drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_AFTER_SEQUENCE_NUMBER, start))
        assert seqs == list(range(start + 1, 25)) and data == payloads[start + 1:]
    assert drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_AFTER_SEQUENCE_NUMBER, 24))[0] == []


def test_latest_sees_only_later_records(sluice_stub, filled):
    name, _, _ = filled
    latest = cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_LATEST)
    seqs, _, _, _, latest = drain(sluice_stub, latest)
    assert seqs == []
    assert to_partition(sluice_stub, name, 1, [b"after-1", b"after-2"]) == [25, 26]
    seqs, data, _, _, nxt = drain(sluice_stub, latest)
    assert seqs == [25, 26] and data == [b"after-1", b"after-2"]
    # the returned cursor continues where the page ended
    assert to_partition(sluice_stub, name, 1, [b"after-3"]) == [27]
    assert drain(sluice_stub, nxt)[:2] == ([27], [b"after-3"])


def test_at_timestamp(sluice_stub, filled):
    name, payloads, _ = filled
    _, _, _, stamps, _ = drain(sluice_stub, cursor(sluice_stub, name, 1))
    for first in (0, 10, 20):
        seqs, data, *_ = drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_AT_TIMESTAMP,
                                                   timestamp=stamps[first]))
        assert seqs == list(range(first, 25)) and data == payloads[first:]
    # one ms after the first group: starts at the second group
    seqs, *_ = drain(sluice_stub, cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_AT_TIMESTAMP, timestamp=stamps[9] + 1))
    assert seqs == list(range(10, 25))
    # a future timestamp: positioned at the end
    future = cursor(sluice_stub, name, 1, pb.CURSOR_TYPE_AT_TIMESTAMP, timestamp=int(time.time() * 1000) + 3_600_000)
    assert drain(sluice_stub, future)[0] == []
    # older than the retention (24 h): DIS's "timestamp is expired"
    expired = pb.GetCursorRequest(stream_name=name, partition_id=1, cursor_type=pb.CURSOR_TYPE_AT_TIMESTAMP,
                                  timestamp_ms=int(time.time() * 1000) - 25 * 3_600_000)
    expect_error(sluice_stub.GetCursor, expired, grpc.StatusCode.OUT_OF_RANGE, "DIS.4300")
    # AT_TIMESTAMP without a timestamp is refused
    expect_error(sluice_stub.GetCursor, pb.GetCursorRequest(stream_name=name, partition_id=1,
                                                            cursor_type=pb.CURSOR_TYPE_AT_TIMESTAMP),
                 grpc.StatusCode.INVALID_ARGUMENT, "DIS.4200")
    # a negative one is named as given (it was said to be missing)
    with pytest.raises(grpc.RpcError) as negative:
        sluice_stub.GetCursor(pb.GetCursorRequest(stream_name=name, partition_id=1, timestamp_ms=-1,
                                                  cursor_type=pb.CURSOR_TYPE_AT_TIMESTAMP), timeout=TIMEOUT)
    assert negative.value.details().endswith("0 or more; got -1"), negative.value.details()


def test_get_records_limit_and_fetch_bytes(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    big = [bytes([i]) * 4000 for i in range(10)]
    to_partition(sluice_stub, stream_name, 0, big)
    token = cursor(sluice_stub, stream_name, 0)
    page = sluice_stub.GetRecords(pb.GetRecordsRequest(cursor=token, limit=3), timeout=TIMEOUT)
    assert list(page.seqs) == [0, 1, 2]
    page = sluice_stub.GetRecords(pb.GetRecordsRequest(cursor=token, max_fetch_bytes=9000), timeout=TIMEOUT)
    assert list(page.seqs) == [0, 1]
    # at least one record, even when it alone is larger than max_fetch_bytes
    page = sluice_stub.GetRecords(pb.GetRecordsRequest(cursor=token, max_fetch_bytes=1), timeout=TIMEOUT)
    assert list(page.seqs) == [0] and list(page.data) == big[:1]
    # the cursor may be reused: reads do not consume
    assert drain(sluice_stub, token)[1] == big


# -- per-record failures -----------------------------------------------------------------------

def test_per_record_failures_are_columnar_and_the_rest_is_written(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 3)
    entries = [
        pb.PutRecordsEntry(data=b"ok-0", partition_id=1),
        pb.PutRecordsEntry(data=b"far-pid", partition_id=2**32 - 1),                # DIS.4302
        pb.PutRecordsEntry(data=b"ok-2", partition_id=1),
        pb.PutRecordsEntry(data=b"no-such", partition_id=9),                        # DIS.4302
        pb.PutRecordsEntry(data=b"bad-hash", explicit_hash_key="9223372036854775808"),  # 2^63: DIS.4200
        pb.PutRecordsEntry(data=b"neg-hash", explicit_hash_key="-1"),               # DIS.4200
        pb.PutRecordsEntry(data=b"x" * (1024 * 1024 + 1), partition_id=1),          # over 1 MiB: DIS.4200
        pb.PutRecordsEntry(data=b"long-key", partition_key="k" * 257),             # DIS.4200
        pb.PutRecordsEntry(data=b"ok-8", partition_id=1),
        pb.PutRecordsEntry(data=b"ok-9", partition_id=2),
    ]
    resp = put(sluice_stub, stream_name, entries)
    failed = {1: "DIS.4302", 3: "DIS.4302", 4: "DIS.4200", 5: "DIS.4200", 6: "DIS.4200", 7: "DIS.4200"}
    assert resp.failed_record_count == len(failed)
    assert len(resp.partition_ids) == len(resp.seqs) == len(entries)
    assert [f.index for f in resp.failures] == sorted(failed)
    assert {f.index: f.dis_code for f in resp.failures} == failed
    assert {f.index: f.reason for f in resp.failures} == {
        i: "PARTITION_NOT_FOUND" if code == "DIS.4302" else "INVALID_REQUEST" for i, code in failed.items()}
    assert all(f.message for f in resp.failures)
    for i in failed:
        assert resp.partition_ids[i] == 0 and resp.seqs[i] == -1
    assert [resp.partition_ids[i] for i in (0, 2, 8, 9)] == [1, 1, 1, 2]
    assert [resp.seqs[i] for i in (0, 2, 8, 9)] == [0, 1, 2, 0]  # no seq spent on a failure
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 1))[1] == [b"ok-0", b"ok-2", b"ok-8"]
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 2))[1] == [b"ok-9"]
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 0))[0] == []


def put_columns(stub, name: str, **columns: list) -> pb.PutRecordsResponse:  # type: ignore[no-untyped-def,type-arg]
    return stub.PutRecords(pb.PutRecordsRequest(stream_name=name, columns=pb.RecordColumns(**columns)),
                           timeout=TIMEOUT)


def test_the_columnar_form_routes_numbers_and_fails_like_records(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 4)
    keys = [f"user-{i % 37}" for i in range(300)]
    data = [f"r{i}".encode() for i in range(300)]
    resp = put_columns(sluice_stub, stream_name, data=data, partition_keys=keys)    # the keyed fast path
    assert resp.failed_record_count == 0
    assert list(resp.partition_ids) == [key_partition(k, 4) for k in keys]
    for p in range(4):
        mine = [d for d, q in zip(data, resp.partition_ids) if q == p]
        assert [s for s, q in zip(resp.seqs, resp.partition_ids) if q == p] == list(range(len(mine)))
        _, got, got_keys, _, _ = drain(sluice_stub, cursor(sluice_stub, stream_name, p))
        assert got == mine and got_keys == [k for k, q in zip(keys, resp.partition_ids) if q == p]
    # hash keys and keys at once, "" = not set, with per-record failures in place
    resp = put_columns(sluice_stub, stream_name,
                       data=[b"hash", b"key", b"bad-hash", b"spread"],
                       explicit_hash_keys=["0", "", "-1", ""],
                       partition_keys=["user-1", "user-1", "", ""])
    assert {f.index: (f.reason, f.dis_code) for f in resp.failures} == {2: ("INVALID_REQUEST", "DIS.4200")}
    assert list(resp.partition_ids)[:2] == [0, key_partition("user-1", 4)]
    assert resp.seqs[2] == -1 and 0 <= resp.partition_ids[3] < 4
    # partition ids route every record of the batch; the ones out of range fail alone
    resp = put_columns(sluice_stub, stream_name, data=[b"p2", b"p9", b"p3"], partition_ids=[2, 9, 3],
                       partition_keys=["user-1", "", ""])
    assert {f.index: f.reason for f in resp.failures} == {1: "PARTITION_NOT_FOUND"}
    assert list(resp.partition_ids) == [2, 0, 3] and list(resp.seqs)[1] == -1
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 2))[1][-1:] == [b"p2"]
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 2))[2][-1:] == ["user-1"]  # the key is kept


@pytest.mark.parametrize("request_fields, detail", [
    ({"columns": pb.RecordColumns(data=[b"a", b"b"], partition_keys=["k"])}, "one per record"),
    ({"columns": pb.RecordColumns(data=[b"a"], partition_ids=[1, 0])}, "one per record"),
])
def test_malformed_columns_are_invalid_argument(sluice_stub, stream_name, request_fields, detail):
    create(sluice_stub, stream_name, 2)
    err = expect_error(sluice_stub.PutRecords, pb.PutRecordsRequest(stream_name=stream_name, **request_fields),
                       grpc.StatusCode.INVALID_ARGUMENT, "DIS.4200")
    assert detail in err.details()
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 0))[0] == []


def test_empty_columns_are_an_empty_request(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    expect_error(sluice_stub.PutRecords, pb.PutRecordsRequest(stream_name=stream_name, columns=pb.RecordColumns()),
                 grpc.StatusCode.INVALID_ARGUMENT, "DIS.4202")


def test_all_records_failing_writes_nothing(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    resp = put(sluice_stub, stream_name, [pb.PutRecordsEntry(data=b"a", partition_id=5),
                                          pb.PutRecordsEntry(data=b"b", explicit_hash_key="-")])
    assert resp.failed_record_count == 2
    assert list(resp.partition_ids) == [0, 0] and list(resp.seqs) == [-1, -1]
    assert [(f.index, f.dis_code) for f in resp.failures] == [(0, "DIS.4302"), (1, "DIS.4200")]
    assert describe(sluice_stub, stream_name).partitions[0].next_seq == 0


# -- whole-request errors: status + dis-error-code ---------------------------------------------

def test_unknown_stream_is_not_found_4301(sluice_stub, stream_name):
    nf, code = grpc.StatusCode.NOT_FOUND, "DIS.4301"
    expect_error(sluice_stub.DescribeStream, pb.DescribeStreamRequest(stream_name=stream_name), nf, code)
    expect_error(sluice_stub.DeleteStream, pb.DeleteStreamRequest(stream_name=stream_name), nf, code)
    err = expect_error(sluice_stub.PutRecords, pb.PutRecordsRequest(
        stream_name=stream_name, records=pb.RecordList(entries=[pb.PutRecordsEntry(data=b"x")])), nf, code)
    assert stream_name in err.details()
    expect_error(sluice_stub.GetCursor, pb.GetCursorRequest(stream_name=stream_name, partition_id=0,
                                                            cursor_type=pb.CURSOR_TYPE_TRIM_HORIZON), nf, code)


def test_create_existing_stream_is_already_exists_4307(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 2)
    expect_error(sluice_stub.CreateStream, pb.CreateStreamRequest(stream_name=stream_name, partition_count=3),
                 grpc.StatusCode.ALREADY_EXISTS, "DIS.4307")
    assert describe(sluice_stub, stream_name).stream.partition_count == 2  # the original is untouched


@pytest.mark.parametrize("request_kw, status, code", [
    ({"stream_name": "", "partition_count": 1}, "INVALID_ARGUMENT", "DIS.4200"),
    ({"stream_name": "has space", "partition_count": 1}, "INVALID_ARGUMENT", "DIS.4200"),
    ({"stream_name": "x" * 65, "partition_count": 1}, "INVALID_ARGUMENT", "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 0}, "INVALID_ARGUMENT", "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "retention_hours": 23}, "INVALID_ARGUMENT", "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 1, "data_type": 99}, "INVALID_ARGUMENT", "DIS.4200"),
    ({"stream_name": "ok-name", "partition_count": 257}, "RESOURCE_EXHAUSTED", "DIS.4308"),
])
def test_create_stream_rejections(sluice_stub, request_kw, status, code):
    expect_error(sluice_stub.CreateStream, pb.CreateStreamRequest(**request_kw), grpc.StatusCode[status], code)
    if request_kw["stream_name"] == "ok-name":
        expect_error(sluice_stub.DescribeStream, pb.DescribeStreamRequest(stream_name="ok-name"),
                     grpc.StatusCode.NOT_FOUND, "DIS.4301")


def test_put_request_level_errors(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    expect_error(sluice_stub.PutRecords, pb.PutRecordsRequest(stream_name=stream_name),
                 grpc.StatusCode.INVALID_ARGUMENT, "DIS.4202")
    six_mib = [pb.PutRecordsEntry(data=b"m" * (1024 * 1024)) for _ in range(6)]
    expect_error(sluice_stub.PutRecords, pb.PutRecordsRequest(stream_name=stream_name,
                                                              records=pb.RecordList(entries=six_mib)),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "DIS.4300")
    expect_error(sluice_stub.PutRecords, pb.PutRecordsRequest(
        stream_name=stream_name, records=pb.RecordList(entries=[pb.PutRecordsEntry(data=b"")] * 10_001)),
        grpc.StatusCode.INVALID_ARGUMENT, "DIS.4200")
    assert describe(sluice_stub, stream_name).partitions[0].next_seq == 0


def test_bad_cursor_is_invalid_argument_4217(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    to_partition(sluice_stub, stream_name, 0, [b"a"])
    good = cursor(sluice_stub, stream_name, 0)
    flipped = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    for bad in ("", "garbage", "!!!!", good + "AAAA", flipped, "x" * 600):
        expect_error(sluice_stub.GetRecords, pb.GetRecordsRequest(cursor=bad),
                     grpc.StatusCode.INVALID_ARGUMENT, "DIS.4217")
    assert drain(sluice_stub, good)[1] == [b"a"]


def test_bad_cursor_type_is_4215(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    for kind in (6, 42, -3):  # outside the enum: proto3 keeps the number, the broker must refuse it
        req = pb.GetCursorRequest(stream_name=stream_name, partition_id=0, cursor_type=kind)
        err = expect_error(sluice_stub.GetCursor, req, grpc.StatusCode.INVALID_ARGUMENT, "DIS.4215",
                           "INVALID_CURSOR_TYPE")
        assert str(kind) in err.details()


@pytest.mark.parametrize("seq", [None, -1, -(2**63)])
def test_bad_sequence_number_is_4216(sluice_stub, stream_name, seq):
    create(sluice_stub, stream_name, 1)
    for kind in (pb.CURSOR_TYPE_AT_SEQUENCE_NUMBER, pb.CURSOR_TYPE_AFTER_SEQUENCE_NUMBER):
        req = pb.GetCursorRequest(stream_name=stream_name, partition_id=0, cursor_type=kind)
        if seq is not None:
            req.starting_seq = seq
        expect_error(sluice_stub.GetCursor, req, grpc.StatusCode.INVALID_ARGUMENT, "DIS.4216", "INVALID_SEQUENCE")


def test_sequence_out_of_range_is_4224(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    to_partition(sluice_stub, stream_name, 0, [b"a", b"b", b"c"])  # seqs 0..2, next 3
    for kind, seq in ((pb.CURSOR_TYPE_AT_SEQUENCE_NUMBER, 4), (pb.CURSOR_TYPE_AT_SEQUENCE_NUMBER, 2**63 - 1),
                      (pb.CURSOR_TYPE_AFTER_SEQUENCE_NUMBER, 3)):
        req = pb.GetCursorRequest(stream_name=stream_name, partition_id=0, cursor_type=kind, starting_seq=seq)
        err = expect_error(sluice_stub.GetCursor, req, grpc.StatusCode.OUT_OF_RANGE, "DIS.4224",
                           "SEQUENCE_OUT_OF_RANGE")
        assert "[0][ ][2]" in err.details(), err.details()  # DIS's format: given, earliest, latest


def test_bad_partition_in_get_cursor(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 2)
    base = {"stream_name": stream_name, "cursor_type": pb.CURSOR_TYPE_TRIM_HORIZON}
    for bad in (2, 1000, 2**32 - 1):   # any uint32 is well-formed: the ones out of range do not exist
        expect_error(sluice_stub.GetCursor, pb.GetCursorRequest(partition_id=bad, **base),
                     grpc.StatusCode.NOT_FOUND, "DIS.4302", "PARTITION_NOT_FOUND")


# -- PutRecords: records or columns, one oneof --------------------------------------------------

def test_put_records_batch_is_a_oneof(sluice_stub, raw_channel, stream_name):
    create(sluice_stub, stream_name, 1)
    request = pb.PutRecordsRequest(stream_name=stream_name, records=pb.RecordList(entries=[pb.PutRecordsEntry(
        data=b"as-records")]))
    assert request.WhichOneof("batch") == "records"
    request.columns.data.append(b"as-columns")   # setting one member clears the other
    assert request.WhichOneof("batch") == "columns" and not request.HasField("records")
    # neither: an empty request
    expect_error(sluice_stub.PutRecords, pb.PutRecordsRequest(stream_name=stream_name),
                 grpc.StatusCode.INVALID_ARGUMENT, "DIS.4202", "EMPTY_REQUEST")
    # both on the wire (a sender that ignores the oneof): the last one parsed wins, as protobuf says
    as_records = pb.PutRecordsRequest(stream_name=stream_name, records=pb.RecordList(
        entries=[pb.PutRecordsEntry(data=b"first")])).SerializeToString()
    as_columns = pb.PutRecordsRequest(columns=pb.RecordColumns(data=[b"second"])).SerializeToString()
    raw = raw_method(raw_channel, "PutRecords")
    resp = pb.PutRecordsResponse.FromString(raw(as_records + as_columns, timeout=TIMEOUT))
    assert resp.failed_record_count == 0 and list(resp.seqs) == [0]
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 0))[1] == [b"second"]


# -- errors: the standard rich status ----------------------------------------------------------

def test_refusals_carry_error_info_for_standard_clients(sluice_stub, stream_name):
    with pytest.raises(grpc.RpcError) as info:
        sluice_stub.DescribeStream(pb.DescribeStreamRequest(stream_name=stream_name), timeout=TIMEOUT)
    err = info.value
    status = rpc_status.from_call(err)
    assert status is not None and status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert status.message == err.details() and stream_name in status.message
    (detail,) = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.ErrorInfo"
    decoded = error_details_pb2.ErrorInfo()
    assert detail.Unpack(decoded)
    assert (decoded.reason, decoded.domain, dict(decoded.metadata)) == \
        ("STREAM_NOT_FOUND", "sluice", {"dis_code": "DIS.4301"})
    # the DIS code stays a plain trailer too
    assert dis_code(err) == "DIS.4301"


def test_garbage_refusals_carry_error_info_too(raw_channel):
    with pytest.raises(grpc.RpcError) as info:
        raw_method(raw_channel, "GetRecords")(b"\xff", timeout=TIMEOUT)
    assert error_info(info.value).reason == "BAD_BODY"


# -- projects: the sluice-project metadata -----------------------------------------------------

def project(name: str) -> tuple[tuple[str, str], ...]:
    return (("sluice-project", name),)


def test_projects_are_namespaces(sluice_stub, stream_name):
    alpha, beta = project(f"alpha-{stream_name}"), project(f"beta-{stream_name}")
    for md, partitions in ((alpha, 2), (beta, 3)):
        sluice_stub.CreateStream(pb.CreateStreamRequest(stream_name=stream_name, partition_count=partitions),
                                 timeout=TIMEOUT, metadata=md)
    # the same name, two streams
    for md, partitions in ((alpha, 2), (beta, 3)):
        desc = sluice_stub.DescribeStream(pb.DescribeStreamRequest(stream_name=stream_name), timeout=TIMEOUT,
                                          metadata=md)
        assert desc.stream.partition_count == partitions
        listed = sluice_stub.ListStreams(pb.ListStreamsRequest(limit=100), timeout=TIMEOUT, metadata=md)
        assert [s.stream_name for s in listed.streams] == [stream_name] and listed.total == 1
    # absent metadata is the default project, which has no such stream
    expect_error(sluice_stub.DescribeStream, pb.DescribeStreamRequest(stream_name=stream_name),
                 grpc.StatusCode.NOT_FOUND, "DIS.4301", "STREAM_NOT_FOUND")
    # records stay in their project
    for md, payload in ((alpha, b"in alpha"), (beta, b"in beta")):
        resp = sluice_stub.PutRecords(pb.PutRecordsRequest(stream_name=stream_name, records=pb.RecordList(
            entries=[pb.PutRecordsEntry(data=payload, partition_id=1)])), timeout=TIMEOUT, metadata=md)
        assert list(resp.seqs) == [0]
    alpha_cursor = cursor(sluice_stub, stream_name, 1, metadata=alpha)
    assert drain(sluice_stub, alpha_cursor, metadata=alpha)[1] == [b"in alpha"]
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 1, metadata=beta), metadata=beta)[1] == [b"in beta"]
    # a cursor is only good in the project of its stream
    expect_error(sluice_stub.GetRecords, pb.GetRecordsRequest(cursor=alpha_cursor), grpc.StatusCode.INVALID_ARGUMENT,
                 "DIS.4217", "INVALID_CURSOR", metadata=beta)
    # deleting one leaves the other
    sluice_stub.DeleteStream(pb.DeleteStreamRequest(stream_name=stream_name), timeout=TIMEOUT, metadata=alpha)
    expect_error(sluice_stub.DescribeStream, pb.DescribeStreamRequest(stream_name=stream_name),
                 grpc.StatusCode.NOT_FOUND, "DIS.4301", metadata=alpha)
    assert drain(sluice_stub, cursor(sluice_stub, stream_name, 1, metadata=beta), metadata=beta)[1] == [b"in beta"]


def test_default_project_is_the_absent_metadata(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 1)
    desc = sluice_stub.DescribeStream(pb.DescribeStreamRequest(stream_name=stream_name), timeout=TIMEOUT,
                                      metadata=project("default"))
    assert desc.stream.stream_name == stream_name


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "ünï"])
def test_bad_project_names_are_refused(sluice_stub, name):
    md = (("sluice-project", name),) if name.isascii() else (("sluice-project-bin", name.encode()),
                                                               ("sluice-project", "bad/slash"))
    expect_error(sluice_stub.ListStreams, pb.ListStreamsRequest(), grpc.StatusCode.INVALID_ARGUMENT, "DIS.4200",
                 "INVALID_REQUEST", metadata=md)


# -- apps, checkpoints, groups: own messages and enums -----------------------------------------

def test_apps_and_checkpoints_speak_enums_and_integers(sluice_stub, stream_name):
    app = f"app-{stream_name}"
    create(sluice_stub, stream_name, 2)
    to_partition(sluice_stub, stream_name, 1, [b"a", b"b", b"c"])
    sluice_stub.CreateApp(pb.CreateAppRequest(app_name=app), timeout=TIMEOUT)
    described = sluice_stub.DescribeApp(pb.DescribeAppRequest(app_name=app), timeout=TIMEOUT)
    assert isinstance(described, pb.DescribeAppResponse) and described.app.app_name == app
    assert described.app.created_ms > 0 and list(described.app.checkpoint_stream_names) == []

    for kind in (pb.CHECKPOINT_TYPE_UNSPECIFIED, pb.CHECKPOINT_TYPE_LAST_READ):
        sluice_stub.CommitCheckpoint(pb.CommitCheckpointRequest(app_name=app, stream_name=stream_name, partition_id=1,
                                                                seq=1, metadata="m", checkpoint_type=kind),
                                     timeout=TIMEOUT)
    mark = sluice_stub.GetCheckpoint(pb.GetCheckpointRequest(app_name=app, stream_name=stream_name, partition_id=1),
                                     timeout=TIMEOUT)
    assert (mark.found, mark.seq, mark.metadata) == (True, 1, "m")
    none = sluice_stub.GetCheckpoint(pb.GetCheckpointRequest(app_name=app, stream_name=stream_name, partition_id=0),
                                     timeout=TIMEOUT)
    assert (none.found, none.seq) == (False, -1)
    state = sluice_stub.GetConsumerState(pb.GetConsumerStateRequest(app_name=app, stream_name=stream_name),
                                         timeout=TIMEOUT)
    assert [(p.partition_id, p.has_checkpoint, p.checkpoint_seq, p.first_seq, p.last_seq, p.lag)
            for p in state.partitions] == [(0, False, -1, 0, -1, 0), (1, True, 1, 0, 2, 1)]
    assert all(p.checkpoint_type == pb.CHECKPOINT_TYPE_LAST_READ and p.status == pb.PARTITION_STATUS_ACTIVE
               for p in state.partitions)
    after = sluice_stub.GetConsumerState(pb.GetConsumerStateRequest(app_name=app, stream_name=stream_name,
                                                                    start_after_partition=0), timeout=TIMEOUT)
    assert [p.partition_id for p in after.partitions] == [1]
    listed = sluice_stub.ListApps(pb.ListAppsRequest(stream_name=stream_name), timeout=TIMEOUT)
    assert [a.app_name for a in listed.apps] == [app] and listed.total >= 1 and not listed.has_more

    # out of the enum, a negative seq: refused
    expect_error(sluice_stub.CommitCheckpoint, pb.CommitCheckpointRequest(
        app_name=app, stream_name=stream_name, partition_id=1, seq=2, checkpoint_type=7),
        grpc.StatusCode.INVALID_ARGUMENT, "DIS.4200", "INVALID_REQUEST")
    expect_error(sluice_stub.CommitCheckpoint, pb.CommitCheckpointRequest(
        app_name=app, stream_name=stream_name, partition_id=1, seq=-1),
        grpc.StatusCode.INVALID_ARGUMENT, "DIS.4216", "INVALID_SEQUENCE")
    sluice_stub.DeleteCheckpoint(pb.DeleteCheckpointRequest(app_name=app, stream_name=stream_name, partition_id=1),
                                 timeout=TIMEOUT)
    gone = sluice_stub.GetCheckpoint(pb.GetCheckpointRequest(app_name=app, stream_name=stream_name, partition_id=1),
                                     timeout=TIMEOUT)
    assert not gone.found

    # claims of a lone member are granted (also within the broker's restart grace)
    member = pb.HeartbeatRequest(app_name=app, stream_name=stream_name, member_id="m1", lease_ms=3000, held=[0, 1])
    answer = sluice_stub.Heartbeat(member, timeout=TIMEOUT)
    assert (list(answer.partition_ids), answer.lease_ms) == ([0, 1], 3000)
    sluice_stub.LeaveGroup(pb.LeaveGroupRequest(app_name=app, stream_name=stream_name, member_id="m1"),
                           timeout=TIMEOUT)


# -- Subscribe: its own response, records or a heartbeat ---------------------------------------

def test_subscribe_sends_record_batches(sluice_stub, stream_name):
    create(sluice_stub, stream_name, 2)
    to_partition(sluice_stub, stream_name, 1, [b"a", b"b"], key="k")
    call = sluice_stub.Subscribe(pb.SubscribeRequest(stream_name=stream_name, partition_id=1,
                                                     cursor_type=pb.CURSOR_TYPE_TRIM_HORIZON), timeout=30)
    try:
        first = next(call)
        assert first.WhichOneof("event") == "records"
        assert (list(first.records.seqs), list(first.records.data), list(first.records.partition_keys)) == \
            ([0, 1], [b"a", b"b"], ["k", "k"])
        assert len(first.records.timestamps_ms) == 2 and first.records.next_cursor
        # the batch's cursor resumes after it
        assert drain(sluice_stub, first.records.next_cursor)[0] == []
    finally:
        call.cancel()


def test_subscribe_heartbeat_is_its_own_message(start_broker):
    """A quiet partition: after the broker's heartbeat interval (--subscribe-heartbeat 1; the
    default is 15 s, past the call's 10 s) a Heartbeat, not an empty batch; then another."""
    own = start_broker("--store", "memory", "--subscribe-heartbeat", "1")
    with grpc.insecure_channel(own.grpc_target) as channel:
        stub = sluice_pb2_grpc.SluiceStub(channel)
        create(stub, "quiet", 1)
        call = stub.Subscribe(pb.SubscribeRequest(stream_name="quiet", partition_id=0,
                                                  cursor_type=pb.CURSOR_TYPE_LATEST), timeout=TIMEOUT)
        try:
            beats = [next(call), next(call)]
            assert [b.WhichOneof("event") for b in beats] == ["heartbeat", "heartbeat"]
            assert all(b.heartbeat.next_cursor and b.heartbeat.millis_behind_latest == 0 for b in beats)
            to_partition(stub, "quiet", 0, [b"after"])
            assert drain(stub, beats[-1].heartbeat.next_cursor)[1] == [b"after"]
        finally:
            call.cancel()


# -- garbage on the wire -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_channel(broker) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(broker.grpc_target)
    yield channel
    channel.close()


def raw_method(channel: grpc.Channel, method: str):  # type: ignore[no-untyped-def]
    return channel.unary_unary(f"/sluice.v1.Sluice/{method}", request_serializer=None, response_deserializer=None)


def parses(raw: bytes) -> bool:
    try:
        pb.PutRecordsRequest.FromString(raw)
        return True
    except Exception:
        return False


def assert_garbage_refused(call, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=TIMEOUT)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw[:40], err.code(), err.details())
    assert dis_code(err) == "DIS.4300", (raw[:40], err.trailing_metadata())
    assert "malformed protobuf" in err.details()


# A length-delimited field 2 (records) that claims more bytes than follow: corrupt whatever precedes it.
TRUNCATED_TAIL = b"\x12\x7f" + b"\x00" * 5


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=300))
def test_random_bytes_never_internal(raw_channel, blob):
    """Random bytes: refused with DIS.4300 when they do not parse, an ordinary answer when they do -
    never INTERNAL/UNKNOWN, never a hang."""
    call = raw_method(raw_channel, "PutRecords")
    for raw in (blob, blob + TRUNCATED_TAIL):
        if not parses(raw):
            assert_garbage_refused(call, raw)
            continue
        try:
            answer = call(raw, timeout=TIMEOUT)
            pb.PutRecordsResponse.FromString(answer)
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                      grpc.StatusCode.DEADLINE_EXCEEDED), (raw[:40], err.code(), err.details())
            assert dis_code(err), "every refusal carries a DIS code"


@pytest.mark.parametrize("raw", [
    b"\xff",                                        # a varint that never ends
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an 11-byte varint
    b"\x0a\x05abc",                                 # stream_name shorter than its length
    b"\x0a\x02\xff\xfe",                            # stream_name: invalid UTF-8
    b"\x12\x06\x0a\x04\x12\x02\xc3\x28",            # records.entries[0].partition_key: invalid UTF-8
    b"\x12\x06\x0a\x04\x1a\x02\xed\xa0",            # records.entries[0].explicit_hash_key: a UTF-16 surrogate
    b"\x07",                                        # wire type 7 does not exist
    b"\x00",                                        # field number 0
    TRUNCATED_TAIL,
])
def test_invalid_protobuf_is_4300(raw_channel, raw):
    assert not parses(raw), "the example must really be invalid"
    assert_garbage_refused(raw_method(raw_channel, "PutRecords"), raw)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_refuses_garbage(raw_channel, method):
    request_type = pb.DESCRIPTOR.services_by_name["Sluice"].methods_by_name[method].input_type
    first_string = next(f.number for f in request_type.fields if f.type == f.TYPE_STRING)
    bad_utf8 = bytes([first_string << 3 | 2, 1, 0x80])  # that string field, holding a lone continuation byte
    if method == "PutRecordsStream":   # a bad batch is answered, in its place, and the stream goes on
        call = raw_channel.stream_stream(f"/sluice.v1.Sluice/{method}", request_serializer=None,
                                         response_deserializer=pb.PutRecordsStreamResponse.FromString)
        answers = list(call(iter([b"\x0a\x05ab", bad_utf8]), timeout=TIMEOUT))
        assert [a.error.reason for a in answers] == ["BAD_BODY", "BAD_BODY"]
        assert all(a.error.dis_code == "DIS.4300" and "malformed protobuf" in a.error.message for a in answers)
        assert {a.error.code for a in answers} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
        return
    assert_garbage_refused(raw_method(raw_channel, method), b"\x0a\x05ab")
    assert_garbage_refused(raw_method(raw_channel, method), bad_utf8)


def test_broker_still_serves_after_garbage(raw_channel, sluice_stub, stream_name):
    call = raw_method(raw_channel, "PutRecords")
    for i in range(50):
        assert_garbage_refused(call, b"\x0a\x02\xff\xfe" + bytes([i]))
    create(sluice_stub, stream_name, 1)
    assert to_partition(sluice_stub, stream_name, 0, [b"still here"]) == [0]


# -- standard services -------------------------------------------------------------------------

def test_health_check_serving(grpc_channel):
    health = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "sluice.v1.Sluice"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(grpc_channel):
    db = ProtoReflectionDescriptorDatabase(grpc_channel)
    services = db.get_services()
    assert "sluice.v1.Sluice" in services
    assert "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("sluice.v1.Sluice")
    assert sorted(m.name for m in service.methods) == sorted(METHODS)
    put_method = service.FindMethodByName("PutRecords")
    assert put_method.input_type.full_name == "sluice.v1.PutRecordsRequest"
    assert [f.name for f in put_method.output_type.fields] == \
        ["failed_record_count", "partition_ids", "seqs", "failures"]


# -- the thin client wrapper -------------------------------------------------------------------

def test_client_wrapper_round_trip(broker, stream_name):
    from client.client import Client
    from client.errors import BrokerUnavailable, SluiceError, StreamNotFound

    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream(stream_name, 3, retention_hours=48, data_type="JSON")
        listed = c.list_streams(limit=1, start_after=stream_name[:-1])
        assert listed.stream_names == [stream_name]
        desc = c.describe_stream(stream_name)
        assert desc.stream.partition_count == 3 and desc.stream.retention_hours == 48
        assert desc.stream.data_type == "JSON"

        key = next(k for k in ("alpha", "beta", "gamma", "delta") if key_partition(k, 3) != 2)
        p = key_partition(key, 3)
        keyed = c.put_records(stream_name, [(b"k1", key), (b"k2", key)])
        assert [(r.partition_id, r.seq, r.ok) for r in keyed] == [(p, 0, True), (p, 1, True)]
        pinned = c.put_records(stream_name, [b"x", b"y"], partition_id=2)
        assert [(r.partition_id, r.seq, r.ok) for r in pinned] == [(2, 0, True), (2, 1, True)]
        failed = c.put_records(stream_name, [b"nowhere"], partition_id=7)
        assert not failed[0].ok and failed[0].dis_code == "DIS.4302" and failed[0].message
        assert failed[0].reason == "PARTITION_NOT_FOUND"
        assert (failed[0].partition_id, failed[0].seq) == (-1, -1)

        page = c.get_records(c.get_cursor(stream_name, p))
        assert [(r.seq, r.data, r.partition_key) for r in page.records] == \
            [(0, b"k1", key), (1, b"k2", key)]
        assert page.next_cursor and page.millis_behind_latest == 0
        after = c.get_records(c.get_cursor(stream_name, 2, "AFTER_SEQUENCE_NUMBER", starting_seq=0))
        assert [(r.seq, r.data, r.partition_key) for r in after.records] == [(1, b"y", None)]
        one = c.get_records(c.get_cursor(stream_name, p, "AT_SEQUENCE_NUMBER", 1), limit=1)
        assert [r.data for r in one.records] == [b"k2"]
        stamp = page.records[0].timestamp_ms
        at = c.get_cursor(stream_name, p, "AT_TIMESTAMP", timestamp_ms=stamp)
        assert [r.data for r in c.get_records(at).records] == [b"k1", b"k2"]

        with pytest.raises(SluiceError) as info:
            c.create_stream(stream_name, 1)
        assert info.value.code == "DIS.4307" and info.value.status == grpc.StatusCode.ALREADY_EXISTS
        assert info.value.reason == "STREAM_EXISTS"
        c.delete_stream(stream_name)
        with pytest.raises(StreamNotFound) as nf:
            c.describe_stream(stream_name)
        assert nf.value.code == "DIS.4301" and stream_name in nf.value.message

    # a closed port: the wrapper says "unavailable", fast
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with Client(f"127.0.0.1:{closed}", timeout=5) as c:
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            c.list_streams()
        assert time.monotonic() - began < 5
