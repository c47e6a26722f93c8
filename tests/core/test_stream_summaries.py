"""StreamCatalogue.summaries (the console's streams list) at scale: every partition's bounds in
ONE store call (one thread hop for RocksDB after a restart), the event loop given a turn while
the streams are added up, one computation shared by concurrent callers and kept ~1 s (a create
or delete drops it), and streams deleted meanwhile left out. The timings of 1,000 streams of 16
partitions are printed, not asserted."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

from broker.core import catalogue
from broker.core.broker import Broker
from broker.model import PartitionBounds, PutEntry, StreamConfig
from broker.storage import rocks
from broker.storage.base import Store
from broker.storage.memory import MemoryStore
from broker.storage.rocks import RocksStore

SECRET = b"summaries-test-secret"


class CountingStore(MemoryStore):
    """Counts bounds() and bounds_many() calls; bounds_many can be held until released."""

    def __init__(self) -> None:
        super().__init__()
        self.single = self.many = 0
        self.hold: asyncio.Event | None = None

    async def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        self.single += 1
        return await super().bounds(stream_id, partition)

    async def bounds_many(self, partitions: Sequence[tuple[int, int]]) -> list[PartitionBounds | None]:
        self.many += 1
        if self.hold is not None:
            await self.hold.wait()
        return await super().bounds_many(partitions)


async def test_the_default_bounds_many_asks_bounds_for_each_pair() -> None:
    store = CountingStore()
    a = (await store.create_stream(StreamConfig("a", 2))).stream_id
    gone = (await store.create_stream(StreamConfig("gone", 1))).stream_id
    await store.drop_stream(gone)
    pairs = [(a, 1), (gone, 0), (a, 0)]
    assert await Store.bounds_many(store, pairs) == await store.bounds_many(pairs)
    assert store.single == len(pairs)


async def _broker(store: Any) -> Broker:
    b = Broker(store, cursor_secret=SECRET)
    await b.start()
    return b


async def test_one_store_call_shared_by_concurrent_callers_and_kept_until_a_change() -> None:
    store = CountingStore()
    broker = await _broker(store)
    try:
        for i in range(5):
            await broker.create_stream(f"s{i}", 3)
        await broker.put_records("s1", [PutEntry(b"x", partition_id="2"), PutEntry(b"y", partition_id="2")])
        store.hold = asyncio.Event()
        callers = [asyncio.ensure_future(broker.stream_summaries()) for _ in range(10)]
        await asyncio.sleep(0.01)
        callers[0].cancel()   # one caller leaving does not cancel the others' answer
        store.hold.set()
        answers = [await c for c in callers[1:]]
        assert store.many == 1 and store.single == 0
        assert all(a == answers[0] for a in answers)
        assert [(s.config.stream_name, s.records) for s in answers[0]] == [(f"s{i}", 2 if i == 1 else 0)
                                                                          for i in range(5)]
        await broker.stream_summaries()
        assert store.many == 1                                  # kept for a second
        await broker.delete_stream("s0")                        # a change in the project drops it
        assert [s.config.stream_name for s in await broker.stream_summaries()] == ["s1", "s2", "s3", "s4"]
        assert store.many == 2
        await broker.create_stream("s9", 1, project="other")    # another project's change does not
        await broker.stream_summaries()
        assert store.many == 2
    finally:
        await broker.close()


async def test_answers_of_projects_nobody_asks_again_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The project is any name a request gives (the console's `?project=`): an answer is dropped
    once stale, so asking for many names grows nothing for good."""
    monkeypatch.setattr(catalogue, "SUMMARY_TTL_S", 1.0)   # long enough for a busy machine's loop below
    store = CountingStore()
    broker = await _broker(store)
    try:
        await broker.create_stream("s", 1, project="kept")
        for i in range(100):
            assert await broker.stream_summaries(project=f"nobody{i}") == []
        assert len(broker.catalogue._summaries) == 100
        for _ in range(200):   # dropped once stale: ~1 s
            if not broker.catalogue._summaries:
                break
            await asyncio.sleep(0.05)
        assert broker.catalogue._summaries == {}
        before = store.many
        assert [s.config.stream_name for s in await broker.stream_summaries(project="kept")] == ["s"]
        assert [s.config.stream_name for s in await broker.stream_summaries(project="kept")] == ["s"]
        assert store.many == before + 1   # still shared within the TTL
    finally:
        await broker.close()


async def test_a_stream_deleted_while_its_bounds_are_read_is_left_out() -> None:
    store = CountingStore()
    broker = await _broker(store)
    try:
        for name in ("a", "b", "c"):
            await broker.create_stream(name, 2)
        store.hold = asyncio.Event()
        listing = asyncio.ensure_future(broker.stream_summaries())
        await asyncio.sleep(0.01)
        await store.drop_stream(broker.catalogue.get("default", "b").stream_id)   # under the catalogue's feet
        store.hold.set()
        assert [s.config.stream_name for s in await listing] == ["a", "c"]
    finally:
        await broker.close()


@pytest.mark.parametrize("partitions", [2, 64])
async def test_the_loop_gets_a_turn_while_many_streams_are_added_up(monkeypatch: pytest.MonkeyPatch,
                                                                    partitions: int) -> None:
    """A turn every SUMMARY_YIELD_EVERY partitions, few streams of many partitions too (it was
    every 32 streams: 32 of 256 partitions held the loop ~20 ms)."""
    monkeypatch.setattr(catalogue, "SUMMARY_YIELD_EVERY", 128)
    broker = await _broker(MemoryStore())
    try:
        n = catalogue.SUMMARY_YIELD_EVERY * 8 // partitions
        for i in range(n):
            await broker.create_stream(f"s{i:04d}", partitions)
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        before = ticks
        got = await broker.stream_summaries()
        stop = True
        await task
        assert len(got) == n
        assert ticks - before >= 7   # a turn for others at least every SUMMARY_YIELD_EVERY partitions
    finally:
        await broker.close()


def _counting_to_thread(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hops: list[str] = []
    real = asyncio.to_thread

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(rocks.asyncio, "to_thread", counting)
    return hops


async def _fill(db: str, streams: int, partitions: int) -> None:
    store = RocksStore(db)
    broker = await _broker(store)
    try:
        for i in range(streams):
            await broker.create_stream(f"s{i:04d}", partitions)
            await broker.put_records(f"s{i:04d}", [PutEntry(b"r", partition_id=str(p)) for p in range(partitions)]
                                     * (1 + i % 3))
    finally:
        await broker.close()
        await store.close()


async def test_after_a_restart_every_partition_s_bounds_are_read_in_one_thread_hop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = str(tmp_path / "db")
    await _fill(db, 40, 4)
    store = RocksStore(db)
    broker = await _broker(store)
    try:
        hops = _counting_to_thread(monkeypatch)
        got = await broker.stream_summaries()
        assert hops.count("bounds_many") == 1 and "bounds" not in hops
        assert [(s.config.stream_name, s.records) for s in got[:3]] == [("s0000", 4), ("s0001", 8), ("s0002", 12)]
        assert [(b.first_seq, b.next_seq) for b in got[1].first] == [(0, 2)] * 4
    finally:
        await broker.close()
        await store.close()


@pytest.mark.slow
async def test_the_cost_of_1000_streams_of_16_partitions_is_printed(tmp_path: Path) -> None:
    streams, partitions = 1000, 16
    db = str(tmp_path / "db")
    await _fill(db, streams, partitions)
    store = RocksStore(db)
    broker = await _broker(store)
    try:
        loop = asyncio.get_running_loop()
        longest = 0.0
        stop = False

        async def watch() -> None:   # the longest the loop went without giving this task a turn
            nonlocal longest
            last = loop.time()
            while not stop:
                await asyncio.sleep(0)
                now = loop.time()
                longest, last = max(longest, now - last), now

        figures = []
        for label in ("after a restart", "warm"):
            broker.catalogue._summaries.clear()   # not the shared answer: a fresh computation
            longest, stop = 0.0, False
            watcher = asyncio.ensure_future(watch())
            began = time.perf_counter()
            got = await broker.stream_summaries()
            took = time.perf_counter() - began
            stop = True
            await watcher
            assert len(got) == streams
            figures.append(f"{label}: {took * 1000:.0f} ms, the loop held at most {longest * 1000:.1f} ms")
        print(f"\nstreams list of {streams} streams x {partitions} partitions: " + "; ".join(figures))
    finally:
        await broker.close()
        await store.close()
