"""UpdatePartitionCount in the core (over the memory store): the layout rules of
shared/spec/dis-api.md 2.5 and the exactness of a scale event's boundaries under concurrent writes."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import routing
from broker.core.broker import Broker
from broker.core.leases import LocalLeases
from broker.core.limits import Limits
from broker.errors import BrokerError, ErrorCode
from broker.model import PutEntry
from broker.storage.memory import MemoryStore

KEYS = [f"k{i}" for i in range(40)]


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker(MemoryStore(), cursor_secret=b"s" * 32)
    await b.start()
    yield b
    await b.close()


async def test_every_record_is_on_the_side_of_the_boundary_its_layout_routed_it(broker: Broker) -> None:
    """Producers write all the time while the stream scales 2 -> 5 -> 3 -> 1 -> 4: below each
    partition's boundary every record was routed by the old layout, from it on by the new one."""
    await broker.create_stream("s", 2)
    stop = asyncio.Event()

    async def produce(offset: int) -> None:
        i = 0
        while not stop.is_set():
            keys = [KEYS[(offset + i + j) % len(KEYS)] for j in range(7)]
            result = await broker.put_records("s", [PutEntry(k.encode(), k) for k in keys])
            assert result.failed_record_count == 0
            i += 7
            await asyncio.sleep(0)

    producers = [asyncio.create_task(produce(n)) for n in range(3)]
    for target in (5, 3, 1, 4):
        await asyncio.sleep(0.02)
        await broker.update_partition_count("s", target)
    await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*producers)

    config = broker.catalogue.get("default", "s")
    events = config.scale_events
    assert [(e.src_partition_count, e.target_partition_count) for e in events] == [(2, 5), (5, 3), (3, 1), (1, 4)]
    for p in range(config.readable_partition_count):
        records = await broker.store.read(config.stream_id, p, 0, 1 << 30, 1 << 30)
        for r in records:
            # the layout in force when the record was written: the last event whose boundary it passed
            count = events[0].src_partition_count
            for e in events:
                if p < len(e.boundaries) and r.seq >= e.boundaries[p]:
                    count = e.target_partition_count
                elif p < len(e.boundaries):
                    break
            assert routing.partition_for_hash(routing.key_hash(r.partition_key or ""), count) == p


async def test_scale_down_leaves_deleted_partitions_readable_and_refuses_writes(broker: Broker) -> None:
    await broker.create_stream("s", 4)
    await broker.put_records("s", [PutEntry(k.encode(), k) for k in KEYS])
    before, after = await broker.update_partition_count("s", 2)
    assert (before.partition_count, after.partition_count, after.readable_partition_count) == (4, 2, 4)
    desc = await broker.describe_stream("s")
    assert [p.status for p in desc.partitions] == ["ACTIVE", "ACTIVE", "DELETED", "DELETED"]
    assert [(p.hash_lo, p.hash_hi) for p in desc.partitions[:2]] == routing.hash_ranges(2)
    assert [(p.hash_lo, p.hash_hi) for p in desc.partitions[2:]] == routing.hash_ranges(4)[2:]
    result = await broker.put_records("s", [PutEntry(b"x", partition_id="3"), PutEntry(b"y", partition_id="4"),
                                            PutEntry(b"z", explicit_hash_key=str(2**63 - 1))])
    assert [(i, e.code) for i, e in result.failures] == [(0, ErrorCode.PARTITION_NOT_WRITABLE),
                                                         (1, ErrorCode.PARTITION_NOT_FOUND)]
    assert result.partitions[2] == 1
    cursor = await broker.get_cursor("s", "3", "TRIM_HORIZON")
    assert (await broker.get_records(cursor)).records
    # a scale-up makes them ACTIVE again, numbering continuing
    next_seq = desc.partitions[3].bounds.next_seq
    await broker.update_partition_count("s", 4)
    result = await broker.put_records("s", [PutEntry(b"x", partition_id="3")])
    assert result.seqs == [next_seq]


async def test_bad_targets(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    for bad, code in ((0, ErrorCode.INVALID_REQUEST), ("3", ErrorCode.INVALID_REQUEST),
                      (True, ErrorCode.INVALID_REQUEST), (10**6, ErrorCode.QUOTA_EXCEEDED)):
        with pytest.raises(BrokerError) as e:
            await broker.update_partition_count("s", bad)
        assert e.value.code is code
    for target in (2, 10**6):   # a missing stream is not found, whatever the target (over the quota too)
        with pytest.raises(BrokerError) as e:
            await broker.update_partition_count("nope", target)
        assert e.value.code is ErrorCode.STREAM_NOT_FOUND
    before, after = await broker.update_partition_count("s", 2)
    assert before is after and after.scale_events == ()


async def test_a_group_is_offered_every_readable_partition() -> None:
    broker = Broker(MemoryStore(), cursor_secret=b"s" * 32, leases=LocalLeases())   # no restart grace
    await broker.start()
    await broker.create_stream("s", 3)
    await broker.create_app("a")
    await broker.update_partition_count("s", 1)
    mine, _ = await broker.heartbeat("a", "s", "m1")
    assert sorted(mine) == [0, 1, 2]
    await broker.close()


async def test_a_group_is_not_offered_partitions_closed_longer_than_the_retention_ago() -> None:
    """EXPIRED partitions: nothing of them is left, and they are never written again unless a
    scale-up opens them. Given out, each was a reader idling until the stream's next scale event
    (after 256 -> 1, 255 of them)."""
    now = [1_700_000_000_000]
    broker = Broker(MemoryStore(), cursor_secret=b"s" * 32, clock_ms=lambda: now[0])
    await broker.start()
    try:
        await broker.create_stream("s", 4, retention_hours=24)
        await broker.create_app("a")
        await broker.update_partition_count("s", 3)            # 3 closed now
        now[0] += 12 * 3_600_000
        await broker.update_partition_count("s", 1)            # 1 and 2 closed 12 h later
        assert (await broker.heartbeat("a", "s", "m1", [0, 1, 2, 3]))[0] == [0, 1, 2, 3]
        now[0] += 12 * 3_600_000 + 1                          # 3 has been closed for a day and a ms
        assert (await broker.heartbeat("a", "s", "m1", [0, 1, 2, 3]))[0] == [0, 1, 2]   # revoked
        assert (await broker.heartbeat("a", "s", "m2"))[0] == []   # m1 still holds 1 and 2: revoked first
        assert (await broker.heartbeat("a", "s", "m1", [0, 1, 2]))[0] == [0, 1]
        assert (await broker.heartbeat("a", "s", "m1", [0, 1]))[0] == [0, 1]
        assert (await broker.heartbeat("a", "s", "m2"))[0] == [2]   # 3 goes to nobody
        now[0] += 12 * 3_600_000
        assert (await broker.heartbeat("a", "s", "m1", [0, 1]))[0] == [0]
        assert (await broker.heartbeat("a", "s", "m2", [2]))[0] == []
        await broker.update_partition_count("s", 4)            # a scale-up opens them all again
        assert sorted((await broker.heartbeat("a", "s", "m1", [0]))[0] + (await broker.heartbeat("a", "s", "m2"))[0]) \
            == [0, 1, 2, 3]
    finally:
        await broker.close()


@given(src=st.integers(1, 64), target=st.integers(1, 64), h=st.integers(0, 2**63 - 1))
def test_a_hash_moves_from_a_parent_to_its_child(src: int, target: int, h: int) -> None:
    """Whatever the counts: the partition a hash goes to after the event lists, as a parent, the
    partition it went to before (unless that is the same partition), ended at that boundary."""
    from broker.model import ScaleEvent, StreamConfig

    boundaries = tuple(range(10, 10 + max(src, target)))
    config = StreamConfig("s", target, scale_events=(ScaleEvent(1, src, target, boundaries),))
    old, new = routing.partition_for_hash(h, src), routing.partition_for_hash(h, target)
    [segment] = routing.segments(config, new)
    assert segment.start_seq == boundaries[new]
    if old != new:
        assert (old, boundaries[old]) in segment.parents
    assert all(q != new and q < src for q, _ in segment.parents)


_KEY_HASHES = [(2**63 - 1) * k // 7 for k in range(7)]   # spread over the hash space


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(st.tuples(st.just("write"), st.integers(0, 6)),
                              st.tuples(st.just("scale"), st.integers(1, 6))), max_size=40),
       first=st.integers(1, 6))
def test_the_reading_rule_orders_every_key_across_any_scale_events(ops: list[tuple[str, int]], first: int) -> None:
    """A model of the stream (writes routed by the layout of their time, scale events with their
    boundaries) and of the reading rule as the client applies it: a record waits for the parents
    of every segment of its partition that starts at or before it, a parent being read to its end
    meaning its records below the end were read. Then each key's records are read in write order.
    Through a partition that got no record between two events, the rule lost a key's order: 3 -> 1
    -> 2 over two events, its record on 3 came after its next one on 2 (the scaling probe)."""
    from broker.model import ScaleEvent, StreamConfig

    count, next_seq, events = first, [0] * first, []
    written: list[tuple[int, int, int]] = []   # (key, partition, seq) in write order
    for op, arg in ops:
        if op == "write":
            p = routing.partition_for_hash(_KEY_HASHES[arg], count)
            written.append((arg, p, next_seq[p]))
            next_seq[p] += 1
        elif arg != count:
            next_seq += [0] * (arg - len(next_seq))
            events.append(ScaleEvent(len(events) + 1, count, arg, tuple(next_seq[:max(count, arg)])))
            count = arg
    config = StreamConfig("s", count, scale_events=tuple(events))
    segments = {p: routing.segments(config, p) for p in range(len(next_seq))}
    before: dict[tuple[int, int], set[tuple[int, int]]] = {}

    def read_before(p: int, s: int) -> set[tuple[int, int]]:
        """Every record the rule has a reader read before record (p, s)."""
        if (p, s) not in before:
            direct = {(p, s - 1)} if s else set()
            direct |= {(q, end - 1) for seg in segments[p] if seg.start_seq <= s for q, end in seg.parents if end}
            found = set(direct)
            for r in direct:
                found |= read_before(*r)
            before[(p, s)] = found
        return before[(p, s)]

    last: dict[int, tuple[int, int]] = {}
    for key, p, s in written:
        if key in last:
            assert last[key] in read_before(p, s), (key, last[key], (p, s), events)
        last[key] = (p, s)


async def test_history_is_bounded_and_forgets_events_past_retention() -> None:

    clock = [1_000_000]
    broker = Broker(MemoryStore(), cursor_secret=b"s" * 32, limits=Limits(max_scale_events=3),
                    clock_ms=lambda: clock[0])
    await broker.start()
    await broker.create_stream("s", 1)
    for target in (2, 3, 4):
        await broker.update_partition_count("s", target)
    with pytest.raises(BrokerError) as e:
        await broker.update_partition_count("s", 5)
    assert e.value.code is ErrorCode.QUOTA_EXCEEDED
    clock[0] += 24 * 3_600_000   # the retention window later: the old events are forgotten
    await broker.update_partition_count("s", 1)
    config = broker.catalogue.get("default", "s")
    assert [(e.src_partition_count, e.target_partition_count) for e in config.scale_events] == [(4, 1)]
    assert config.readable_partition_count == 4   # the partitions it just closed are still readable
    # partition 3 holds records; once its closing event ages out it is gone from the layout, and a
    # later scale-up that brings it back continues its numbering, its new segment starting there
    await broker.update_partition_count("s", 4)
    assert (await broker.put_records("s", [PutEntry(b"x", partition_id="3")])).seqs == [0]
    await broker.update_partition_count("s", 1)
    clock[0] += 24 * 3_600_000
    await broker.update_partition_count("s", 2)
    assert broker.catalogue.get("default", "s").readable_partition_count == 2
    clock[0] += 24 * 3_600_000
    await broker.update_partition_count("s", 4)
    desc = await broker.describe_stream("s")
    assert desc.partitions[3].segments[-1].start_seq == 1
    assert (await broker.put_records("s", [PutEntry(b"y", partition_id="3")])).seqs == [1]
    await broker.close()


async def test_consumer_state_gives_each_partition_its_status_as_describe_does() -> None:
    """GetConsumerState (both doors read the core's status): ACTIVE, DELETED after a scale-down,
    EXPIRED once the scale-down is older than the retention - as DescribeStream says."""
    clock = [1_000_000]
    broker = Broker(MemoryStore(), cursor_secret=b"s" * 32, clock_ms=lambda: clock[0])
    await broker.start()
    try:
        await broker.create_stream("s", 4)
        await broker.create_app("app")
        await broker.put_records("s", [PutEntry(b"x", partition_id="0")])
        await broker.commit_checkpoint("app", "s", "0", "0")
        await broker.update_partition_count("s", 2)
        for expected in (["ACTIVE", "ACTIVE", "DELETED", "DELETED"], ["ACTIVE", "ACTIVE", "EXPIRED", "EXPIRED"]):
            states, _ = await broker.consumer_state("app", "s")
            desc = await broker.describe_stream("s")
            assert [st.status for st in states] == [p.status for p in desc.partitions] == expected
            clock[0] += 24 * 3_600_000   # the retention window later
    finally:
        await broker.close()


async def test_a_projects_partitions_have_a_quota_deleted_ones_counted_until_retention() -> None:
    clock = [1_000_000]
    broker = Broker(MemoryStore(), cursor_secret=b"s" * 32, limits=Limits(max_project_partitions=10),
                    clock_ms=lambda: clock[0])
    await broker.start()
    try:
        await broker.create_stream("a", 6)
        await broker.create_stream("b", 4)
        for make in (broker.create_stream("c", 1), broker.update_partition_count("a", 7)):
            with pytest.raises(BrokerError) as e:
                await make
            assert e.value.code is ErrorCode.QUOTA_EXCEEDED and "quota of 10" in e.value.message
        await broker.create_stream("c", 10, project="other")   # a quota per project
        await broker.update_partition_count("b", 2)   # its 2 closed partitions stay readable: still 10
        with pytest.raises(BrokerError):
            await broker.create_stream("c", 1)
        await broker.update_partition_count("b", 4)   # made ACTIVE again: no more readable ones
        await broker.delete_stream("b")
        await broker.create_stream("c", 4)
        await broker.update_partition_count("c", 2)   # a-6, c-2 + 2 closed: 10
        with pytest.raises(BrokerError):
            await broker.create_stream("d", 1)
        clock[0] += 24 * 3_600_000   # the retention window later: c's closed partitions are EXPIRED, held by none
        await broker.create_stream("d", 2)
    finally:
        await broker.close()


def test_an_older_config_is_answered_from_the_newer_history_without_rebuilding_it() -> None:
    """Two describes across a scale event ask for the old and the new history in turn. Replacing the
    cached history by the older one rebuilt it on every call: 3 minutes for two describes at 200
    events (the review). Both are answered from one history, and equal a fresh computation."""
    from broker.model import ScaleEvent, StreamConfig

    events, count, seqs = [], 4, [5] * 8
    for i, target in enumerate((8, 3, 6, 2, 5) * 4):
        seqs = [s + (q % 3) for q, s in enumerate(seqs)]
        events.append(ScaleEvent(i + 1, count, target, tuple(seqs[:max(count, target)])))
        count = target
    old = StreamConfig("s", events[-2].target_partition_count, stream_id=77, scale_events=tuple(events[:-1]))
    new = StreamConfig("s", count, stream_id=77, scale_events=tuple(events))
    routing._HISTORIES.pop(77, None)
    answers = [[routing.segments(c, p) for p in range(8)] for c in (old, new, old, new)]
    history = routing._HISTORIES[77]
    assert len(history.events) == len(events), "the cache holds the newer history"
    assert [routing.segments(old, p) for p in range(8)] == answers[0] == answers[2]
    assert routing._HISTORIES[77] is history, "an older config leaves the cache as it is"
    for config, answer in ((old, answers[0]), (new, answers[1])):
        routing._HISTORIES.clear()
        assert [routing.segments(config, p) for p in range(8)] == answer   # from scratch: the same
