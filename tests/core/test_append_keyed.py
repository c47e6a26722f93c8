"""Broker.append_keyed: records routed by a hash the caller computed (tsdb series keys longer than
the partition-key limit), one AppendBatch per partition, per-item outcomes, the batch time from
the items' own times, the stream-id check, wake-ups and the record limit. In-process over the
MemoryStore (and a RocksStore for the time lookup), with a clock the test sets."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator, Sequence

import pytest

from broker.core.broker import Broker
from broker.core.limits import HASH_KEY_MAX
from broker.core.routing import key_hash, partition_for_hash
from broker.errors import BrokerError, ErrorCode, server_error
from broker.model import AppendBatch
from broker.storage.base import AppendOutcome
from broker.storage.memory import MemoryStore
from broker.storage.rocks import RocksStore

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class RecordingStore(MemoryStore):
    """Remembers every append's batches; refuses the partitions in `refuse` (STORAGE_FULL)."""

    def __init__(self) -> None:
        super().__init__()
        self.appends: list[list[AppendBatch]] = []
        self.refuse: set[int] = set()
        self.fail_all = False

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        if self.fail_all:
            raise server_error(ErrorCode.UNAVAILABLE, detail="disk gone")
        self.appends.append(list(batches))
        ok = [b for b in batches if b.partition not in self.refuse]
        outcomes = iter(await super().append(ok))
        return [server_error(ErrorCode.STORAGE_FULL) if b.partition in self.refuse else next(outcomes)
                for b in batches]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
async def broker(store: RecordingStore, clock: Clock) -> AsyncIterator[Broker]:
    b = Broker(store, cursor_secret=b"s", clock_ms=clock)
    await b.start()
    yield b
    await b.close()


def hashes_for(partition_count: int) -> list[int]:
    """One hash per partition, from real keys."""
    found: dict[int, int] = {}
    i = 0
    while len(found) < partition_count:
        h = key_hash(f"key-{i}")
        found.setdefault(partition_for_hash(h, partition_count), h)
        i += 1
    return [found[p] for p in range(partition_count)]


async def read(broker: Broker, stream: str, partition: int) -> list[tuple[int, bytes, int, str | None]]:
    cursor = await broker.get_cursor(stream, str(partition), "TRIM_HORIZON")
    result = await broker.get_records(cursor, 1000)
    return [(r.seq, r.data, r.timestamp_ms, r.partition_key) for r in result.records]


async def test_items_go_to_their_hash_partition_in_order_one_batch_per_partition(
        broker: Broker, store: RecordingStore) -> None:
    await broker.create_stream("s", 4)
    h = hashes_for(4)
    items = [(h[2], b"a"), (h[0], b"b"), (h[2], b"c"), (h[3], b"d"), (h[2], b"e")]
    outcomes = await broker.append_keyed("s", items)
    assert outcomes == [0, 0, 1, 0, 2]
    assert len(store.appends) == 1
    assert sorted(b.partition for b in store.appends[0]) == [0, 2, 3]   # one batch per partition, none empty
    assert [d for _, d, _, _ in await read(broker, "s", 2)] == [b"a", b"c", b"e"]
    assert [(d, key) for _, d, _, key in await read(broker, "s", 0)] == [(b"b", None)]   # no partition key
    assert await read(broker, "s", 1) == []
    again = await broker.append_keyed("s", [(h[2], b"f")])
    assert again == [3]


async def test_a_hash_routes_like_a_partition_key_of_the_dis_door(broker: Broker) -> None:
    """The same key gives the same partition through PutRecords (key) and append_keyed (its hash)."""
    from broker.model import PutEntry
    await broker.create_stream("s", 8)
    keys = [f"series-{i}" for i in range(40)]
    put = await broker.put_records("s", [PutEntry(b"x", partition_key=k) for k in keys])
    long_key = "k" * 5000   # far over the partition-key limit: the hash routes it all the same
    outcomes = await broker.append_keyed("s", [(key_hash(k), b"y") for k in keys] + [(key_hash(long_key), b"z")])
    assert all(isinstance(o, int) for o in outcomes)
    for k, p in zip(keys, put.partitions):
        assert partition_for_hash(key_hash(k), 8) == p


async def test_batch_time_is_now_or_the_latest_item_time_and_never_decreases(tmp_path: Path, clock: Clock) -> None:
    store = RocksStore(str(tmp_path / "db"))
    broker = Broker(store, cursor_secret=b"s", clock_ms=clock)
    await broker.start()
    try:
        await broker.create_stream("s", 1)
        h = hashes_for(1)[0]
        # past items: stored at the append time (retention counts from the write)
        await broker.append_keyed("s", [(h, b"old1"), (h, b"old2")], [T0 - 86_400_000, T0 - 3_600_000])
        # a future item raises its batch's time to its own
        await broker.append_keyed("s", [(h, b"now"), (h, b"future")], [T0, T0 + 5_000])
        clock.now = T0 + 1_000
        # a later batch never goes back in time (the store raises it to the partition's last)
        await broker.append_keyed("s", [(h, b"after")], [T0 + 1_000])
        clock.now = T0 + 10_000
        await broker.append_keyed("s", [(h, b"untimed")])
        records = await read(broker, "s", 0)
        assert [(d, ts) for _, d, ts, _ in records] == [(b"old1", T0), (b"old2", T0), (b"now", T0 + 5_000),
                                                        (b"future", T0 + 5_000), (b"after", T0 + 5_000),
                                                        (b"untimed", T0 + 10_000)]
        # the lower bound the tsdb query relies on: every item timed >= T is at or after seq_at_time(T)
        cfg = broker.catalogue.get("default", "s")
        assert await store.seq_at_time(cfg.stream_id, 0, T0 + 5_000) == 2
        assert await store.seq_at_time(cfg.stream_id, 0, T0 + 1) == 2
    finally:
        await broker.close()
        await store.close()


async def test_a_refused_partition_fails_only_its_items(broker: Broker, store: RecordingStore) -> None:
    await broker.create_stream("s", 4)
    h = hashes_for(4)
    store.refuse = {1}
    outcomes = await broker.append_keyed("s", [(h[0], b"a"), (h[1], b"b"), (h[0], b"c"), (h[1], b"d")])
    assert outcomes[0] == 0 and outcomes[2] == 1
    for bad in (outcomes[1], outcomes[3]):
        assert isinstance(bad, BrokerError) and bad.code is ErrorCode.STORAGE_FULL
    assert await read(broker, "s", 1) == []


async def test_an_oversize_record_fails_alone(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    h = hashes_for(2)
    big = b"x" * (broker.limits.max_record_bytes + 1)
    outcomes = await broker.append_keyed("s", [(h[0], b"ok"), (h[0], big), (h[1], b"fine")])
    assert outcomes[0] == 0 and outcomes[2] == 0
    assert isinstance(outcomes[1], BrokerError) and outcomes[1].code is ErrorCode.INVALID_REQUEST
    assert "exceeds" in outcomes[1].message
    only = await broker.append_keyed("s", [(h[0], big)])   # nothing to write: no append, the item's error
    assert isinstance(only[0], BrokerError)


async def test_whole_call_refusals(broker: Broker, store: RecordingStore) -> None:
    with pytest.raises(BrokerError) as exc:
        await broker.append_keyed("nope", [(1, b"x")])
    assert exc.value.code is ErrorCode.STREAM_NOT_FOUND
    cfg = await broker.create_stream("s", 2)
    for items, stamps in (([], None), ([(1, b"x")], [1, 2]), ([(-1, b"x")], None), ([(HASH_KEY_MAX + 1, b"x")], None)):
        with pytest.raises(BrokerError) as exc:
            await broker.append_keyed("s", items, stamps)
        assert exc.value.code in (ErrorCode.EMPTY_REQUEST, ErrorCode.INVALID_REQUEST)
    assert await broker.append_keyed("s", [(HASH_KEY_MAX, b"x")], stream_id=cfg.stream_id) == [0]
    # a stream recreated under the name is another stream
    await broker.delete_stream("s")
    await broker.create_stream("s", 2)
    with pytest.raises(BrokerError) as exc:
        await broker.append_keyed("s", [(1, b"x")], stream_id=cfg.stream_id)
    assert exc.value.code is ErrorCode.STREAM_NOT_FOUND
    store.fail_all = True
    with pytest.raises(BrokerError) as exc:
        await broker.append_keyed("s", [(1, b"x")])
    assert exc.value.code is ErrorCode.UNAVAILABLE


async def test_a_long_poll_wakes_on_a_keyed_append(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    h = hashes_for(2)
    cursor = await broker.get_cursor("s", "1", "LATEST")
    poll = asyncio.ensure_future(broker.get_records(cursor, wait_ms=15_000))
    await asyncio.sleep(0)
    await broker.append_keyed("s", [(h[1], b"wake")])
    result = await asyncio.wait_for(poll, 10)
    assert [r.data for r in result.records] == [b"wake"]
