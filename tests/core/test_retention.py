"""enforce_retention over a store that fails on one partition: the others are still trimmed."""
from __future__ import annotations

import pytest

from broker.core.retention import enforce_retention
from broker.errors import ErrorCode, server_error
from broker.model import AppendBatch, PartitionBounds, StreamConfig
from broker.storage.memory import MemoryStore


class OnePartitionFails(MemoryStore):
    broken: tuple[int, int] = (-1, -1)

    async def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        if (stream_id, partition) == self.broken:
            raise server_error(ErrorCode.UNAVAILABLE, detail="its JetStream stream is missing")
        return await super().bounds(stream_id, partition)


async def test_a_failing_partition_is_skipped_and_logged_not_the_end_of_the_pass(
        caplog: pytest.LogCaptureFixture) -> None:
    store = OnePartitionFails()
    a = await store.create_stream(StreamConfig("a", 2))
    b = await store.create_stream(StreamConfig("b", 1))
    for config in (a, b):
        for p in range(config.partition_count):
            assert await store.append([AppendBatch(config.stream_id, p, 1000, [(None, b"old")])]) == [0]
    store.broken = (a.stream_id, 0)
    now = 1000 + max(a.retention_ms, b.retention_ms) + 10
    assert await enforce_retention(store, [a, b], now) == 2     # a/1 and b/0, not a/0
    assert (await store.bounds(b.stream_id, 0)).first_seq == 1
    assert (await store.bounds(a.stream_id, 1)).first_seq == 1
    assert "partition 0 of stream" in caplog.text and "skipped" in caplog.text
    store.broken = (-1, -1)
    assert await enforce_retention(store, [a, b], now) == 1     # the next pass gets it


class Counting(MemoryStore):
    """Counts the calls a pass makes that cost a RocksDB store a thread hop each."""

    def __init__(self) -> None:
        super().__init__()
        self.times = self.trims = 0

    async def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        self.times += 1
        return await super().seq_at_time(stream_id, partition, timestamp_ms)

    async def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        self.trims += 1
        await super().trim(stream_id, partition, before_seq)


async def test_a_pass_asks_nothing_more_of_empty_partitions_and_trims_only_what_is_old() -> None:
    """100 empty partitions cost a bounds lookup each (a pass over 100,000 mostly empty partitions
    took 26 s of CPU when each was also asked its time position and trimmed); a partition whose
    oldest record is within the window is looked up, not trimmed."""
    store = Counting()
    empty = await store.create_stream(StreamConfig("empty", 100))
    full = await store.create_stream(StreamConfig("full", 2))
    now = 1000 + full.retention_ms + 10
    await store.append([AppendBatch(full.stream_id, 0, 1000, [(None, b"old")]),      # past the window
                        AppendBatch(full.stream_id, 1, now - 5, [(None, b"new")])])   # inside it
    assert await enforce_retention(store, [empty, full], now) == 1
    assert (store.times, store.trims) == (2, 1)
    assert (await store.bounds(full.stream_id, 0)).first_seq == 1
    assert (await store.bounds(full.stream_id, 1)).first_seq == 0
