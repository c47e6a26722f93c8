"""UpdatePartitionCount end to end (shared/spec/dis-api.md 2.3, 2.5, 6): the official DIS SDK's
call and DescribeStream as the spec shows it, scaling up and down under a running producer with
nothing acknowledged lost and each key's records in order for a consumer following the
parent-before-child rule, a consumer group across the change, and a restart after scaling.

Everything runs against a real broker process (RocksDB) over loopback.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkdis.v2 import (
    CommitCheckpointReq,
    CommitCheckpointRequest,
    ConsumeRecordsRequest,
    CreateAppReq,
    CreateAppRequest,
    CreateStreamReq,
    CreateStreamRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowConsumerStateRequest,
    ShowCursorRequest,
    ShowStreamRequest,
    UpdatePartitionCountReq,
    UpdatePartitionCountRequest,
)

from broker.launcher import BrokerProcess
from client import Client, GroupConsumer, PartitionConsumer, Record
from tests.conftest import eventually

HASH_MAX = 2**63 - 1
KEYS = [f"key-{i}" for i in range(24)]


def spec_ranges(n: int) -> list[str]:
    """The hash ranges of n partitions, written from the spec (section 6), not from broker code."""
    avg = HASH_MAX // n
    ranges = [(0 if i == 0 else i * avg + 1, (i + 1) * avg) for i in range(n)]
    ranges[-1] = (ranges[-1][0], HASH_MAX)
    return [f"[{lo} : {hi}]" for lo, hi in ranges]


def shard(i: int) -> str:
    return f"shardId-{i:010d}"


# -- the official DIS SDK ------------------------------------------------------------------------

def _scale(dis, name: str, target: int):  # type: ignore[no-untyped-def]
    return dis.update_partition_count(UpdatePartitionCountRequest(
        stream_name=name, body=UpdatePartitionCountReq(stream_name=name, target_partition_count=target)))


def _send(dis, name: str, entries: list[PutRecordsRequestEntry]):  # type: ignore[no-untyped-def]
    return dis.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=name, records=entries)))


def test_dis_sdk_update_partition_count_and_describe_stream(dis_client, stream_name: str) -> None:  # type: ignore[no-untyped-def]
    import base64
    dis = dis_client
    dis.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=stream_name, partition_count=2)))
    entries = [PutRecordsRequestEntry(data=base64.b64encode(k.encode()).decode(), partition_key=k) for k in KEYS]
    assert _send(dis, stream_name, entries).failed_record_count == 0

    resp = _scale(dis, stream_name, 3)
    assert resp.status_code == 200
    desc = dis.show_stream(ShowStreamRequest(stream_name=stream_name))
    assert (desc.writable_partition_count, desc.readable_partition_count) == (3, 3)
    assert [p.partition_id for p in desc.partitions] == [shard(0), shard(1), shard(2)]
    assert [p.status for p in desc.partitions] == ["ACTIVE"] * 3
    assert [p.hash_range for p in desc.partitions] == spec_ranges(3)
    # new ranges [0, H/3] [H/3, 2H/3] [2H/3, H] over old [0, H/2] [H/2, H]: who held each range before
    assert [p.parent_partitions for p in desc.partitions] == ["", shard(0), shard(1)]
    [event] = desc.update_partition_counts
    assert (event.src_partition_count, event.target_partition_count, event.auto_scale) == (2, 3, False)
    assert event.create_timestamp > 0 and desc.last_modified_time == event.create_timestamp

    # keys route over the new layout: the spec's hash over 3 partitions
    routed = _send(dis, stream_name, entries[:6])
    assert routed.failed_record_count == 0 and {r.partition_id for r in routed.records} <= {shard(i) for i in range(3)}

    # down to 1: partitions 1 and 2 are DELETED - readable, counted, not writable
    _scale(dis, stream_name, 1)
    desc = dis.show_stream(ShowStreamRequest(stream_name=stream_name))
    assert (desc.writable_partition_count, desc.readable_partition_count) == (1, 3)
    assert [(p.partition_id, p.status) for p in desc.partitions] == [
        (shard(0), "ACTIVE"), (shard(1), "DELETED"), (shard(2), "DELETED")]
    assert desc.partitions[0].hash_range == f"[0 : {HASH_MAX}]"
    assert desc.partitions[0].parent_partitions == f"{shard(1)},{shard(2)}"
    assert [(e.src_partition_count, e.target_partition_count) for e in desc.update_partition_counts] == [(2, 3), (3, 1)]
    refused = _send(dis, stream_name, [PutRecordsRequestEntry(data="eA==", partition_id=shard(2)),
                                       PutRecordsRequestEntry(data="eQ==", partition_key="k")])
    assert refused.failed_record_count == 1
    assert refused.records[0].error_code == "DIS.4319" and refused.records[1].partition_id == shard(0)
    # a DELETED partition is still read from its start
    cursor = dis.show_cursor(ShowCursorRequest(stream_name=stream_name, partition_id=shard(1),
                                               cursor_type="TRIM_HORIZON")).partition_cursor
    got = dis.consume_records(ConsumeRecordsRequest(partition_cursor=cursor))
    first, last = desc.partitions[1].sequence_number_range.strip("[]").split(" : ")
    assert len(got.records) == int(last) - int(first) + 1 > 0
    # an app's consumer state gives each partition the status DescribeStream gives it
    app = f"{stream_name}-app"
    dis.create_app(CreateAppRequest(body=CreateAppReq(app_name=app)))
    dis.commit_checkpoint(CommitCheckpointRequest(body=CommitCheckpointReq(
        app_name=app, checkpoint_type="LAST_READ", stream_name=stream_name, partition_id=shard(1),
        sequence_number=first)))
    state = dis.show_consumer_state(ShowConsumerStateRequest(app_name=app, stream_name=stream_name,
                                                             checkpoint_type="LAST_READ", limit=10))
    assert [(s.partition_id, s.status) for s in state.partition_consuming_states] == [
        (shard(0), "ACTIVE"), (shard(1), "DELETED"), (shard(2), "DELETED")]


def test_dis_sdk_update_partition_count_errors(dis_client, stream_name: str) -> None:  # type: ignore[no-untyped-def]
    dis = dis_client
    with pytest.raises(ClientRequestException) as e:
        _scale(dis, stream_name, 2)
    assert e.value.error_code == "DIS.4301"
    dis.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=stream_name, partition_count=2)))
    for bad in (0, -1):
        with pytest.raises(ClientRequestException) as e:
            _scale(dis, stream_name, bad)
        assert e.value.error_code == "DIS.4200"
    with pytest.raises(ClientRequestException) as e:
        _scale(dis, stream_name, 100_000)
    assert e.value.error_code == "DIS.4308"
    _scale(dis, stream_name, 2)   # the count it has: nothing happens, no history entry
    assert dis.show_stream(ShowStreamRequest(stream_name=stream_name)).update_partition_counts == []


# -- a running producer, the reading rule --------------------------------------------------------

class KeyedProducer:
    """Puts batches of (key, n) records, n counting per key, until stopped; remembers every
    acknowledged record. A failed record stops it (none is expected)."""

    def __init__(self, client: Client, stream: str) -> None:
        self.client, self.stream = client, stream
        self.acked: list[tuple[str, int]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        counters: dict[str, int] = defaultdict(int)
        while not self.stop.is_set():
            batch = []
            for k in KEYS[: 8 + len(self.acked) % 16]:
                batch.append((f"{k}:{counters[k]}".encode(), k))
                counters[k] += 1
            results = self.client.put_records(self.stream, batch)
            bad = [r.reason for r in results if not r.ok]
            if bad:
                self.failures.extend(bad)
                return
            self.acked.extend((k, int(d.decode().split(":")[1])) for d, k in batch)

    def __enter__(self) -> KeyedProducer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _scale_while_producing(client: Client, stream: str, counts: list[int]) -> list[tuple[str, int]]:
    with KeyedProducer(client, stream) as producer:
        for target in counts:
            before = len(producer.acked)
            eventually(lambda before=before: len(producer.acked) >= before + 200 or bool(producer.failures),
                       timeout=30)
            client.update_partition_count(stream, target)
        before = len(producer.acked)
        eventually(lambda: len(producer.acked) >= before + 200 or bool(producer.failures), timeout=30)
    assert producer.failures == []
    return producer.acked


def _check_order(seen: list[tuple[str, int]], acked: list[tuple[str, int]]) -> None:
    assert sorted(seen) == sorted(acked), "every acknowledged record read exactly once"
    last: dict[str, int] = {}
    for key, n in seen:
        assert n == last.get(key, -1) + 1, f"{key}: {n} read after {last.get(key)}"
        last[key] = n


def _key_and_n(record: Record) -> tuple[str, int]:
    key, n = record.data.decode().split(":")
    return key, int(n)


def test_scale_up_and_down_under_a_running_producer_keeps_every_key_in_order(broker: BrokerProcess,
                                                                             stream_name: str) -> None:
    with Client(broker.grpc_target) as client:
        client.create_stream(stream_name, 2)
        acked = _scale_while_producing(client, stream_name, [5, 3, 1, 4])
        desc = client.describe_stream(stream_name)
        assert (desc.stream.partition_count, desc.stream.readable_partition_count) == (4, 5)
        assert [(e.src_partition_count, e.target_partition_count) for e in desc.stream.scale_events] == [
            (2, 5), (5, 3), (3, 1), (1, 4)]
        assert [p.status for p in desc.partitions] == ["ACTIVE"] * 4 + ["DELETED"]
        # each partition's records per layout: the segments' starts are where the layouts changed
        assert all(len(p.segments) >= 1 for p in desc.partitions)

        # One reader over every partition, round robin, following the rule through its app's
        # checkpoints: it commits after each page; a child's page waits for its parents.
        app = f"{stream_name}-reader"
        consumers = [PartitionConsumer(client, stream_name, p.partition_id, app=app, wait_ms=20)
                     for p in desc.partitions]
        seen: list[tuple[str, int]] = []
        deadline = time.monotonic() + 120
        while len(seen) < len(acked) and time.monotonic() < deadline:
            for c in consumers:
                records = c.poll()
                if records:
                    seen.extend(map(_key_and_n, records))
                    c.commit()
        for c in consumers:
            c.close()
        _check_order(seen, acked)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_without_the_rule_a_child_can_be_read_before_its_parent(broker: BrokerProcess, stream_name: str,
                                                                mode: str) -> None:
    """What the rule is for: reading the new partition first shows a key's newer records before
    its older ones (they moved from partition 0 to 1); a consumer following it waits."""
    with Client(broker.grpc_target) as client:
        client.create_stream(stream_name, 1)
        client.put_records(stream_name, [(f"{k}:old".encode(), k) for k in KEYS])
        client.update_partition_count(stream_name, 2)
        moved = [k for k in KEYS if client.put_records(stream_name, [(f"{k}:new".encode(), k)])[0].partition_id == 1]
        assert moved
        child = PartitionConsumer(client, stream_name, 1, ordered=False, wait_ms=20)
        got = child.poll()   # the moved keys' newer records, while their older ones sit unread in 0
        assert got and all(r.data.endswith(b":new") for r in got)
        ruled = PartitionConsumer(client, stream_name, 1, app=f"{stream_name}-a", wait_ms=200, mode=mode)
        assert [ruled.poll() for _ in range(3)] == [[]] * 3   # its parent (0) is not read by this app yet
        parent = PartitionConsumer(client, stream_name, 0, app=f"{stream_name}-a", wait_ms=200, mode=mode)
        while parent.poll():
            parent.commit()
        got = ruled.poll() or ruled.poll() or ruled.poll()
        assert got and all(r.data.endswith(b":new") for r in got)
        for c in (child, ruled, parent):
            c.close()


# -- a consumer group ----------------------------------------------------------------------------

def _collector() -> tuple[list[tuple[str, int]], Callable[[int, list[Record]], None]]:
    """What a group's handler saw, as (key, n), and the handler (members call it from their threads)."""
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def handle(partition: int, records: list[Record]) -> None:
        with lock:
            seen.extend(map(_key_and_n, records))
    return seen, handle


def test_a_consumer_group_keeps_working_across_scale_events(broker: BrokerProcess, stream_name: str) -> None:
    seen, handle = _collector()

    with Client(broker.grpc_target) as client:
        client.create_stream(stream_name, 2)
        app = f"{stream_name}-group"
        members = [GroupConsumer(broker.grpc_target, app, stream_name, handle, lease_ms=3000, wait_ms=100,
                                 checkpoint_interval=0.1, checkpoint_every=50).start() for _ in range(2)]
        try:
            acked = _scale_while_producing(client, stream_name, [4, 2, 3])
            eventually(lambda: len(set(seen)) >= len(acked), timeout=120)
            # every partition that exists (ACTIVE and DELETED) is owned by a member
            eventually(lambda: set().union(*(m.assignment for m in members)) == set(range(4)), timeout=30)
        finally:
            for m in members:
                m.stop()
    first: list[tuple[str, int]] = []
    once: set[tuple[str, int]] = set()
    for item in seen:   # delivery is at least once: a rebalance may hand a batch over again
        if item not in once:
            once.add(item)
            first.append(item)
    _check_order(first, acked)


# -- restart -------------------------------------------------------------------------------------

def test_a_restart_keeps_the_scaled_layout(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    data = tmp_path / "scaled"
    proc = start_broker(data_dir=data)
    with Client(proc.grpc_target) as client:
        client.create_stream("s", 2)
        client.put_records("s", [(k.encode(), k) for k in KEYS])
        assert client.update_partition_count("s", 3) == (2, 3)
        client.put_records("s", [(k.encode(), k) for k in KEYS])
        assert client.update_partition_count("s", 1) == (3, 1)
        before = client.describe_stream("s")
    proc.stop()
    proc = start_broker(data_dir=data)
    with Client(proc.grpc_target) as client:
        after = client.describe_stream("s")
        assert after == before
        assert (after.stream.partition_count, after.stream.readable_partition_count) == (1, 3)
        results = client.put_routed("s", [(b"x", "k", None), (b"y", None, 2)])
        assert results[0].partition_id == 0 and results[1].reason == "PARTITION_NOT_WRITABLE"
        total = sum(p.next_seq for p in after.partitions)
        assert total == 2 * len(KEYS)
        assert client.update_partition_count("s", 3) == (1, 3)   # partitions 1, 2 writable again
        again = client.describe_stream("s")
        assert [p.status for p in again.partitions] == ["ACTIVE"] * 3
        assert [p.next_seq for p in again.partitions] == [p.next_seq + (i == 0) for i, p in
                                                          enumerate(after.partitions)]


def test_the_async_consumer_follows_the_rule_too(broker: BrokerProcess, stream_name: str) -> None:
    import asyncio

    from client import AsyncPartitionConsumer

    with Client(broker.grpc_target) as client:
        client.create_stream(stream_name, 1)
        client.put_records(stream_name, [(f"{k}:0".encode(), k) for k in KEYS])
        client.update_partition_count(stream_name, 2)
        client.put_records(stream_name, [(f"{k}:1".encode(), k) for k in KEYS])

    async def read() -> list[tuple[str, int]]:
        app = f"{stream_name}-async"
        child = AsyncPartitionConsumer(broker.grpc_target, stream_name, 1, app=app, wait_ms=20)
        parent = AsyncPartitionConsumer(broker.grpc_target, stream_name, 0, app=app, wait_ms=20)
        seen: list[tuple[str, int]] = []
        assert await child.poll() == []          # its parent (0) is not read yet
        for c in (child, parent) * 20:
            records = await c.poll()
            if records:
                seen.extend(map(_key_and_n, records))
                await c.commit()
        await child.close()
        await parent.close()
        return seen

    seen = asyncio.run(read())
    _check_order(seen, [(k, n) for k in KEYS for n in (0, 1)])


def test_a_group_started_at_latest_does_not_wait_for_records_it_skipped(broker: BrokerProcess,
                                                                        stream_name: str) -> None:
    """The group starts at LATEST on a partition with old records and reads nothing there; after a
    scale event the new partition's parent is that one, ended at those old records - which the
    group chose to skip, so the child must not wait for them."""
    seen, handle = _collector()

    with Client(broker.grpc_target) as client:
        client.create_stream(stream_name, 1)
        client.put_records(stream_name, [(f"{k}:0".encode(), k) for k in KEYS])   # skipped by the group
        member = GroupConsumer(broker.grpc_target, f"{stream_name}-late", stream_name, handle, lease_ms=3000,
                               wait_ms=100, checkpoint_interval=0.1, start="LATEST").start()
        try:
            eventually(lambda: member.assignment == {0}, timeout=30)
            time.sleep(0.5)   # let the worker pin LATEST (nothing to wait for: no records come)
            client.update_partition_count(stream_name, 2)
            client.put_records(stream_name, [(f"{k}:1".encode(), k) for k in KEYS])
            eventually(lambda: len(seen) >= len(KEYS), timeout=30)
        finally:
            member.stop()
    assert sorted(seen) == sorted((k, 1) for k in KEYS)
