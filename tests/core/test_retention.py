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
