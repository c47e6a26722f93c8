"""RocksDB only: the engine's tail cache (rocks_engine.TAIL_BATCHES), which serves a read of a
partition's newest small batches from memory. It must return exactly what a read of RocksDB
returns, or decline (None) - never something else - through appends of every size, trims, a
dropped and recreated stream, and eviction; and RocksStore.read must use it for a tail read.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import pytest

from broker.model import AppendBatch, StreamConfig
from broker.storage import rocks_engine
from broker.storage.rocks import RocksStore
from broker.storage.rocks_engine import TAIL_BATCHES, TAIL_BYTES, RocksEngine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[RocksEngine]:
    e = RocksEngine(str(tmp_path / "db"))
    yield e
    e.close()


def append(engine: RocksEngine, sid: int, partition: int, *sizes: int, payload: int = 10, keyed: bool = False) -> None:
    """One commit holding a batch of each size (so one commit may add several batches)."""
    engine.append([AppendBatch(sid, partition, 1000, [(f"k{i}" if keyed and i % 2 else None, b"x" * payload + b"%d" % i)
                                                     for i in range(n)]) for n in sizes])


def check_every_read(engine: RocksEngine, sid: int, partition: int) -> int:
    """Every (start, limit, max_bytes) over the partition: the cache answers as RocksDB does or
    declines. Returns how many reads the cache answered."""
    engine.bounds(sid, partition)   # as the read path does first: the partition's bounds cached
    first, next_seq = engine.cached_bounds(sid, partition) or (0, 0)
    answered = 0
    for start in range(max(0, first - 2), next_seq + 2):
        for limit in (1, 2, 3, 7, 1000):
            for max_bytes in (1, 11, 25, 1 << 20):
                got = engine.read_tail(sid, partition, start, limit, max_bytes)
                if got is not None:
                    assert got == engine.read(sid, partition, start, limit, max_bytes), (start, limit, max_bytes)
                    answered += 1
    return answered


def test_a_tail_read_is_what_rocksdb_returns(engine: RocksEngine) -> None:
    sid = engine.create_stream(StreamConfig("s", 2)).stream_id
    assert engine.read_tail(sid, 0, 0, 10, 1 << 20) is None      # nothing appended by this process yet
    append(engine, sid, 0, 1)
    append(engine, sid, 0, 3, 2)                                   # two batches in one commit
    append(engine, sid, 0, 1, keyed=True)
    append(engine, sid, 0, 4, keyed=True)
    append(engine, sid, 1, 5)
    assert check_every_read(engine, sid, 0) > 0
    assert check_every_read(engine, sid, 1) > 0
    # the newest record, and past the end: from memory
    assert [r.seq for r in engine.read_tail(sid, 0, 10, 10, 1 << 20) or []] == [10]
    assert engine.read_tail(sid, 0, 11, 10, 1 << 20) == []


def test_only_the_newest_batches_are_kept(engine: RocksEngine) -> None:
    sid = engine.create_stream(StreamConfig("s", 1)).stream_id
    for _ in range(TAIL_BATCHES + 5):
        append(engine, sid, 0, 2)
    batches, _ = engine._tail[(sid, 0)]
    assert len(batches) == TAIL_BATCHES and batches[-1][0] == 2 * (TAIL_BATCHES + 4)
    assert engine.read_tail(sid, 0, 0, 10, 1 << 20) is None       # older than the cache: RocksDB's
    assert check_every_read(engine, sid, 0) > 0
    append(engine, sid, 0, 1, payload=TAIL_BYTES)                  # too big to keep: the cache lets go
    assert (sid, 0) not in engine._tail and engine.read_tail(sid, 0, 0, 10, 1 << 20) is None
    append(engine, sid, 0, 1)                                      # and starts again after it
    assert check_every_read(engine, sid, 0) > 0
    assert engine.read_tail(sid, 0, 2 * (TAIL_BATCHES + 5), 10, 1 << 20) is None   # the big record: not cached


def test_a_trim_and_a_dropped_stream(engine: RocksEngine) -> None:
    sid = engine.create_stream(StreamConfig("s", 1)).stream_id
    for _ in range(4):
        append(engine, sid, 0, 3)
    engine.trim(sid, 0, 7)                                         # inside the third batch
    # what RocksDB returns: from the first record kept, inside a cached batch
    assert [r.seq for r in engine.read_tail(sid, 0, 0, 100, 1 << 20) or []] == list(range(7, 12))
    assert engine.read_tail(sid, 0, 0, 100, 1 << 20) == engine.read(sid, 0, 0, 100, 1 << 20)
    assert check_every_read(engine, sid, 0) > 0
    engine.drop_stream(sid)
    assert engine.read_tail(sid, 0, 0, 10, 1 << 20) is None and engine._tail_bytes == 0
    again = engine.create_stream(StreamConfig("s", 1)).stream_id
    assert engine.read_tail(again, 0, 0, 10, 1 << 20) is None
    append(engine, again, 0, 1)
    engine.bounds(again, 0)
    assert [r.data for r in engine.read_tail(again, 0, 0, 10, 1 << 20) or []] == [b"x" * 10 + b"0"]


def test_eviction_keeps_the_total_bounded(engine: RocksEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rocks_engine, "TAIL_TOTAL_BYTES", 2000)
    sid = engine.create_stream(StreamConfig("s", 64)).stream_id
    rng = random.Random(7)
    for _ in range(400):
        append(engine, sid, rng.randrange(64), rng.randrange(1, 4), payload=rng.randrange(5, 60))
        assert engine._tail_bytes == sum(size for _, size in engine._tail.values()) <= 2000
    for p in range(64):
        check_every_read(engine, sid, p)


async def test_the_store_reads_the_tail_from_memory(tmp_path: Path) -> None:
    store = RocksStore(str(tmp_path / "db"))
    try:
        sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
        await store.append([AppendBatch(sid, 0, 1, [(None, b"a")])])
        await store.bounds(sid, 0)
        iterators = []
        real = store._engine._stored
        store._engine._stored = lambda *a: iterators.append(1) or real(*a)  # type: ignore[method-assign]
        await store.append([AppendBatch(sid, 0, 1, [(None, b"b"), (None, b"c")])])
        assert [r.data for r in await store.read(sid, 0, 1, 10, 1 << 20)] == [b"b", b"c"]
        assert [r.data for r in await store.read(sid, 0, 0, 10, 1 << 20)] == [b"a", b"b", b"c"]
        assert iterators == []                                     # neither read opened a RocksDB iterator
        assert [r.data for r in await store.read(sid, 0, 0, 1, 1 << 20)] == [b"a"] and iterators == []
    finally:
        await store.close()
