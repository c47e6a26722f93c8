"""RocksStore: the embedded, durable default store - the RocksDB engine (rocks_engine.py) behind
the async Store interface.

Where each blocking call runs:
* Mutations (append, trim, create/drop, meta_write, meta_cas) run on one dedicated writer thread, so they
  are totally ordered and the engine's lock is never contended on the hot path. The core's
  Committer sends one append at a time, folding every producer's batches into it.
* Reads run on the default thread pool: RocksDB reads are thread-safe and take no lock.
* Two cases stay on the event loop, because the two thread hops would cost more than the work:
  an append in WAL mode of up to INLINE_APPEND_RECORDS records and INLINE_APPEND_BYTES (never with
  fsync, which takes milliseconds, and never while a mutation holds the engine's lock on the
  writer thread), and a small tail read (a few records just written, still in the memtable). These
  are most of a trickle producer's and a push subscriber's latency, and a share of a busy door's
  CPU (below). A tail read the engine's tail cache holds (the partition's newest small batches
  this process appended, rocks_engine.TAIL_BATCHES) does not touch RocksDB at all: no iterator,
  a decode of the values kept in memory. (Also bounds of cached partitions: one, or up to
  INLINE_BOUNDS in bounds_many; a bigger bounds_many, the streams listing, is one hop for all.)

The append budget is not "tens of microseconds": rocksdict (0.3.x) holds the GIL through a write
(its calls do not release it), so an append on the writer thread stops the event loop for as long
as one on the loop does, and the thread only adds its hops - the executor, the loop's wake-up
pipe, and the GIL passed back and forth, the writer waiting up to a switch interval for a busy
loop to let go. Measured on the OpenTSDB put (bench/tsdb.py, 1M points, 500 a request, 4
producers: the Committer's appends are ~50-200 KB): 10-40% more points/s with those appends on the
loop than with the 4-record budget this replaced. The budget still sends an append of megabytes
to the thread, where its Python work at least yields the GIL at switch intervals.

A full disk: a mutation failing with STORAGE_FULL (or UNAVAILABLE, another I/O error) moves
`storage_state` to FULL (FAILED) with one WARNING, and starts a recovery task: every PROBE_EVERY_S it
asks the engine to recover (rocks_engine.py: a probe write, or a reopen once `room()` shows space
for it; a failed reopen backs off up to REOPEN_BACKOFF_MAX_S). When that works the state is OK again
with one INFO line. Meanwhile writes go to the writer thread (none inline), where RocksDB refuses
them at once - or takes them, if it resumed by itself - and reads go on.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from typing import Any, Callable, Sequence, TypeVar

from broker.errors import BrokerError, ErrorCode, server_error
from broker.model import AppendBatch, PartitionBounds, Record, RecordBlock, StreamConfig, payload_bytes
from broker.settings import Settings
from broker.storage.base import AppendOutcome, Durability, StorageState, Store, StoreCapabilities
from broker.storage.rocks_engine import FormatMismatch, RocksEngine

__all__ = ["RocksStore", "FormatMismatch", "INLINE_APPEND_RECORDS", "INLINE_READ_RECORDS"]

# An append of at most this many records and bytes, in WAL mode, runs on the event loop.
INLINE_APPEND_RECORDS = 16_384
INLINE_APPEND_BYTES = 1024 * 1024
_data = itemgetter(1)   # of an AppendBatch item (key, data)
# A read of at most this many records from the tail of a partition, all in its newest stored batch
# of at most INLINE_READ_BYTES (a read decodes a whole batch value), runs on the event loop.
INLINE_READ_RECORDS = 4
INLINE_READ_BYTES = 64 * 1024
# bounds_many of at most this many partitions, all of them cached, answers on the event loop
INLINE_BOUNDS = 64

# While writes are refused: how often the store tries to recover, and the longest wait after a
# failed reopen (each failure doubles the wait from PROBE_EVERY_S).
PROBE_EVERY_S = 1.0
REOPEN_BACKOFF_MAX_S = 30.0
TELL_ROOM_EVERY_S = 60.0   # how often a store still short of room for its reopen says how much it needs

T = TypeVar("T")
log = logging.getLogger(__name__)


class RocksStore(Store):
    def __init__(self, path: str, *, sync: bool = False, memtable_mb: int = 32, block_cache_mb: int = 64) -> None:
        """Opens the database (blocking: call it from a thread, as `open` does)."""
        self._engine = RocksEngine(path, sync=sync, memtable_mb=memtable_mb, block_cache_mb=block_cache_mb)
        self.capabilities = StoreCapabilities(Durability.POWER_LOSS if sync else Durability.PROCESS_CRASH)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-writer")
        self._mutating = 0   # mutations queued or running on the writer thread
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._state = StorageState.OK
        self._refused_since = 0.0            # monotonic time writes began to be refused
        self._recovery: asyncio.Task[None] | None = None
        self.reopens = 0           # observability and tests: reopens that made the store writable again

    @classmethod
    async def from_settings(cls, settings: Settings) -> RocksStore:
        """The registry's factory (storage/__init__.py): the database lives in <data_dir>/rocksdb."""
        return await asyncio.to_thread(cls, os.path.join(settings.data_dir, "rocksdb"), sync=settings.fsync,
                                       memtable_mb=settings.memtable_mb, block_cache_mb=settings.block_cache_mb)

    @property
    def storage_state(self) -> StorageState:
        return self._state

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise server_error(ErrorCode.UNAVAILABLE, detail="store is closed")
        done = asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)
        # counted until the thread is done with it, not until the caller stops waiting: a cancelled
        # caller leaves the mutation running, holding the engine's lock
        self._mutating += 1
        done.add_done_callback(self._mutation_done)
        return await asyncio.shield(done)

    async def _mutate(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._submit(fn, *args)
        except BrokerError as exc:
            self._refused(exc)
            raise

    def _mutation_done(self, _: object) -> None:
        self._mutating -= 1

    # -- a full disk (see the module's docstring) ----------------------------------------------

    def _refused(self, exc: BrokerError) -> None:
        """A write failed: with STORAGE_FULL, or UNAVAILABLE from I/O (not from a closed store)."""
        if self._closed or exc.code not in (ErrorCode.STORAGE_FULL, ErrorCode.UNAVAILABLE):
            return
        state = StorageState.FULL if exc.code is ErrorCode.STORAGE_FULL else StorageState.FAILED
        if state is not self._state:
            if self._state is StorageState.OK:
                self._refused_since = time.monotonic()
            self._state = state
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            log.warning("storage %s: writes are refused with %s until %s; retrying every %gs%s", state.value,
                        exc.code.reason, "space is freed on the data dir's filesystem" if state is StorageState.FULL
                        else "the store can write again", PROBE_EVERY_S, cause)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover(), name="sluice-store-recovery")

    async def _recover(self) -> None:
        loop = asyncio.get_running_loop()
        backoff, reopen_at, told_at = PROBE_EVERY_S, 0.0, -TELL_ROOM_EVERY_S
        while self._state is not StorageState.OK and not self._closed:
            await asyncio.sleep(PROBE_EVERY_S)
            may_reopen = False
            try:
                free, needed = await asyncio.to_thread(self._engine.room)
                may_reopen = free >= needed and loop.time() >= reopen_at
                if free < needed and loop.time() - told_at >= TELL_ROOM_EVERY_S:
                    # RocksDB resumes by itself only once a whole memtable is free; below both, an
                    # operator freeing "some" space would otherwise wait on a silent broker
                    told_at = loop.time()
                    log.warning("storage still full: %.1f MiB free for the data dir, reopening the store needs "
                                "%.1f MiB (its write-ahead log and MANIFEST, replayed, and a reserve); free more",
                                free / 2**20, needed / 2**20)
                resumed = await self._submit(self._engine.recover, may_reopen)
            except BrokerError as exc:
                if may_reopen:
                    log.info("reopening the store failed (%s); next try in %gs", exc.__cause__ or exc, backoff)
                    reopen_at, backoff = loop.time() + backoff, min(backoff * 2, REOPEN_BACKOFF_MAX_S)
                self._refused(exc)
                continue
            except Exception:   # a bug or an unreadable data dir: this task must not end with writes refused
                log.exception("store recovery step failed; retrying")
                continue
            if resumed is None:   # still refused, and no room for a reopen yet
                continue
            if not resumed:
                self.reopens += 1
            self._state = StorageState.OK
            log.info("storage writable again after %.1fs: %s", time.monotonic() - self._refused_since,
                     "RocksDB resumed by itself" if resumed else "the database was reopened")

    async def create_stream(self, config: StreamConfig) -> StreamConfig:
        return await self._mutate(self._engine.create_stream, config)

    async def update_stream(self, config: StreamConfig, fields: Sequence[str] | None = None) -> StreamConfig:
        return await self._mutate(self._engine.update_stream, config, fields)

    async def drop_stream(self, stream_id: int) -> None:
        await self._mutate(self._engine.drop_stream, stream_id)

    async def list_streams(self) -> list[StreamConfig]:
        return self._engine.list_streams()   # from the engine's in-memory catalogue

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        if not self._engine.sync and self._mutating == 0 and self._state is StorageState.OK \
                and sum(len(b.items) for b in batches) <= INLINE_APPEND_RECORDS \
                and sum(payload_bytes(b.items) for b in batches) <= INLINE_APPEND_BYTES \
                and all(self._engine.hwm_cached(b.stream_id, b.partition) for b in batches):
            try:
                return list(self._engine.append(batches))
            except BrokerError as exc:
                self._refused(exc)
                raise
        return list(await self._mutate(self._engine.append, batches))

    async def read(self, stream_id: int, partition: int, start_seq: int, limit: int, max_bytes: int) -> list[Record]:
        # never inline while writes are refused: a reopen may hold the engine's readers back
        if self._state is StorageState.OK:
            tail = self._engine.read_tail(stream_id, partition, start_seq, limit, max_bytes)
            if tail is not None:   # from memory: the batches this process appended last
                return tail
        cached = self._engine.cached_bounds(stream_id, partition)
        if cached is not None and self._state is StorageState.OK and cached[0] <= start_seq \
                and cached[1] - start_seq <= INLINE_READ_RECORDS \
                and self._engine.in_small_tail_batch(stream_id, partition, start_seq, INLINE_READ_BYTES):
            return self._engine.read(stream_id, partition, start_seq, limit, max_bytes)
        return await asyncio.to_thread(self._engine.read, stream_id, partition, start_seq, limit, max_bytes)

    async def read_block(self, stream_id: int, partition: int, start_seq: int, limit: int,
                         max_bytes: int) -> RecordBlock:
        return await asyncio.to_thread(self._engine.read_block, stream_id, partition, start_seq, limit, max_bytes)

    async def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        if self._engine.cached_bounds(stream_id, partition) is not None:
            return self._engine.bounds(stream_id, partition)   # memory only: no thread hop
        return await asyncio.to_thread(self._engine.bounds, stream_id, partition)

    async def bounds_many(self, partitions: Sequence[tuple[int, int]]) -> list[PartitionBounds | None]:
        """Few and all cached: from memory, on the loop. Otherwise every pair in ONE thread hop
        (uncached ones read RocksDB; many cached ones would hold the loop for milliseconds)."""
        engine = self._engine
        if len(partitions) <= INLINE_BOUNDS and all(engine.cached_bounds(s, p) is not None for s, p in partitions):
            return [engine.bounds(s, p) for s, p in partitions]
        return await asyncio.to_thread(engine.bounds_many, partitions)

    async def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        return await asyncio.to_thread(self._engine.seq_at_time, stream_id, partition, timestamp_ms)

    async def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        await self._mutate(self._engine.trim, stream_id, partition, before_seq)

    async def meta_get(self, key: bytes) -> bytes | None:
        return await asyncio.to_thread(self._engine.meta_get, key)

    async def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return await asyncio.to_thread(self._engine.meta_scan, prefix)

    async def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        await self._mutate(self._engine.meta_write, changes)

    async def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        return await self._mutate(self._engine.meta_cas, key, expected, new)

    async def close(self) -> None:
        """Waits for queued mutations, then flushes and closes the database."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)   # a second caller waits for the same close

    async def _close(self) -> None:
        self._closed = True   # refuse new mutations; those queued run first (one thread, FIFO)
        if self._recovery is not None:
            self._recovery.cancel()   # a recovery already on the writer thread finishes first
        await asyncio.get_running_loop().run_in_executor(self._writer, self._engine.close)
        self._writer.shutdown(wait=False)
