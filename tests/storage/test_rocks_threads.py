"""RocksStore: where a blocking engine call runs. A WAL-mode append within the inline budget runs
on the event loop (no thread hops); anything bigger, anything fsynced, and anything that meets a
mutation in flight on the writer thread goes to the writer thread. Appends through the core's
Committer."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from broker.core.writer import Committer
from broker.model import AppendBatch, StreamConfig
from broker.storage.rocks import INLINE_APPEND_BYTES, INLINE_APPEND_RECORDS, RocksStore
from broker.storage.rocks_engine import RocksEngine


class ThreadRecordingEngine(RocksEngine):
    """The real engine, noting which thread ran each append."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.append_threads: list[str] = []

    def append(self, batches: Sequence[AppendBatch]) -> list[int | None]:
        self.append_threads.append(threading.current_thread().name)
        return super().append(batches)


def recording_store(path: Path, *, sync: bool = False) -> tuple[RocksStore, ThreadRecordingEngine]:
    store = RocksStore(str(path), sync=sync)
    store._engine.close()
    engine = store._engine = ThreadRecordingEngine(str(path), sync=sync)
    return store, engine


def batch(sid: int, records: int, size: int = 2) -> AppendBatch:
    return AppendBatch(sid, 0, 1, [(None, (b"r%d" % i).ljust(size, b".")) for i in range(records)])


@contextlib.asynccontextmanager
async def committing(path: Path, *, sync: bool = False) -> AsyncIterator[tuple[RocksStore, ThreadRecordingEngine,
                                                                            Committer, int]]:
    """A recording store with a one-partition stream and a running Committer: (store, engine,
    committer, stream id)."""
    store, engine = recording_store(path, sync=sync)
    committer = Committer(store)
    committer.start()
    try:
        sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
        yield store, engine, committer, sid
    finally:
        await committer.close()
        await store.close()


async def commit_threads(tmp_path: Path, *, sync: bool, sizes: list[int], record_bytes: int = 2) -> list[str]:
    async with committing(tmp_path / "db", sync=sync) as (_, engine, committer, sid):
        firsts = [(await asyncio.wait_for(committer.append([batch(sid, n, record_bytes)]), 10))[0] for n in sizes]
        assert firsts == [sum(sizes[:i]) for i in range(len(sizes))]   # numbering is the same either way
        return engine.append_threads


async def test_a_small_append_runs_on_the_event_loop(tmp_path: Path) -> None:
    loop_thread = threading.current_thread().name
    threads = await commit_threads(tmp_path, sync=False,
                                   sizes=[1, 1, INLINE_APPEND_RECORDS, INLINE_APPEND_RECORDS + 1])
    # the first append reads the partition's high-water mark from RocksDB: not on the loop
    assert threads[0].startswith("sluice-writer")
    assert threads[1:3] == [loop_thread, loop_thread]
    assert threads[3].startswith("sluice-writer")


async def test_a_few_big_records_are_not_appended_on_the_event_loop(tmp_path: Path) -> None:
    threads = await commit_threads(tmp_path, sync=False, sizes=[1, 1, 1],
                                   record_bytes=INLINE_APPEND_BYTES // 2 + 1)
    assert threads[1] == threading.current_thread().name          # one record within the budget
    threads = await commit_threads(tmp_path / "two", sync=False, sizes=[1, 2],
                                   record_bytes=INLINE_APPEND_BYTES // 2 + 1)
    assert threads[1].startswith("sluice-writer")                # two of them are over it


async def test_a_cancelled_mutation_still_keeps_appends_off_the_loop_until_it_is_done(tmp_path: Path) -> None:
    release = threading.Event()
    async with committing(tmp_path / "db") as (store, engine, committer, sid):
        try:
            await committer.append([batch(sid, 1)])                  # the high-water mark is cached now
            caller = asyncio.ensure_future(store._mutate(release.wait, 10))
            await asyncio.sleep(0.01)
            caller.cancel()                                          # e.g. a gRPC deadline
            await asyncio.sleep(0.01)
            append = asyncio.ensure_future(committer.append([batch(sid, 1)]))
            await asyncio.sleep(0.1)
            assert not append.done()   # queued behind the mutation on the writer thread, loop free
            release.set()
            assert await asyncio.wait_for(append, 10) == [1]
            assert engine.append_threads[-1].startswith("sluice-writer")
        finally:
            release.set()


async def test_fsync_appends_never_run_on_the_event_loop(tmp_path: Path) -> None:
    threads = await commit_threads(tmp_path, sync=True, sizes=[1, 1])
    assert all(t.startswith("sluice-writer") for t in threads), threads


async def test_an_append_waits_for_a_mutation_on_the_writer_thread(tmp_path: Path) -> None:
    # while a mutation holds the writer thread, a one-record append must queue behind it there,
    # not run on the loop (where it could block on the engine's lock)
    release = threading.Event()
    async with committing(tmp_path / "db") as (store, engine, committer, sid):
        try:
            blocker = asyncio.ensure_future(store._mutate(release.wait, 10))
            await asyncio.sleep(0.01)
            append = asyncio.ensure_future(committer.append([batch(sid, 1)]))
            await asyncio.sleep(0.1)
            assert not append.done() and engine.append_threads == []
            release.set()
            assert await blocker is True
            assert await asyncio.wait_for(append, 10) == [0]
            assert len(engine.append_threads) == 1 and engine.append_threads[0].startswith("sluice-writer")
        finally:
            release.set()
