"""The RocksDB engine (rocksdict): blocking calls, wrapped for the event loop by storage/rocks.py.
The only module that imports rocksdict.

Threading: every method is blocking; RocksStore calls it from worker threads, or on the event
loop where it knows the call takes microseconds (see rocks.py).
Mutations (append, trim, create/drop) take `self._lock`, a plain threading.Lock held across the
RocksDB write: the core sends all appends through one writer thread, so the lock is uncontended on
the hot path and only orders appends against the retention trimmer and admin calls. An asyncio
lock would not help here - the blocking call must leave the event loop anyway. Reads take no lock:
RocksDB reads are thread-safe, and the caches they consult are replaced atomically. They only pass
a gate (`_using`) that counts them, so a reopen (below) can wait until none holds the database.

Layout: each appended batch is one RocksDB value (broker/storage/keys.py), so reads seek to the
batch holding their start and skip into it, and a trim drops whole batches only.

Durability: records and the partition's high-water mark go into one WriteBatch with the WAL on, so
an acknowledged append survives a process crash (SIGKILL). With `sync=True` every commit is also
fsynced, so it survives power loss too; the core's Committer amortises that fsync over every producer
waiting at the time.

A full disk: a write that meets ENOSPC fails with STORAGE_FULL, and RocksDB enters its background-
error state, refusing every later write with the same error. rocksdict (0.3.x) exposes neither
DB::Resume() nor an SstFileManager. RocksDB's own SstFileManager does resume by itself, polling
every 5 s, but only once the free space reaches a whole memtable (write_buffer_size) - a disk with
less than that freed stays refused forever. So `recover()` (called by RocksStore while the store is
full, once `room()` shows space) first probes with a harmless write (RocksDB may have resumed by
itself) and otherwise reopens the database: it waits for the readers to leave, closes it, opens it
again (which replays the WAL into a new SST: `room()` asks for the WAL's size plus a reserve) and
checks every partition's durable high-water mark against the acknowledged one kept in memory.

What a failed write leaves behind (measured on tmpfs, and read from RocksDB's write path): the
WAL append itself failed, so the batch never reached the memtable and its WAL record is torn; the
reopen's point-in-time WAL recovery stops before it, and RocksDB's own resume switches to a new WAL.
A failed batch is therefore not readable afterwards. The one case where it could be is a WAL record
written whole whose fsync then failed (--fsync, on a filesystem that reports ENOSPC only at fsync):
the reopen finds the partition's durable mark ahead of the acknowledged one and deletes those
records and restores the mark, so sequence numbers stay gap-free and nothing reported failed is
ever read. A crash before any reopen would replay such a record (nothing remembers it failed).
Create, drop, trim and metadata writes reported failed are retried by their callers; their
catalogue in memory is kept as the core knows it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import asdict, replace
from typing import Iterator, Sequence, cast

import rocksdict

from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.model import AppendBatch, PartitionBounds, Record, RecordBlock, StreamConfig
from broker.storage import keys
from broker.storage.base import IncompatibleStore, changed_fields

# The tail cache: the newest small batches each partition appended in this process, kept as the
# encoded values that were written, so a read of a partition's tail (a push subscriber or a long
# poll woken by a write) decodes them from memory instead of opening a RocksDB iterator. Per
# partition at most TAIL_BATCHES batches of TAIL_BYTES together (a bigger batch is not kept: bulk
# writes are read by bulk readers, from RocksDB); over every partition at most TAIL_TOTAL_BYTES,
# the partitions appended to longest ago given up first.
TAIL_BATCHES = 8
TAIL_BYTES = 16 * 1024
TAIL_TOTAL_BYTES = 4 * 1024 * 1024
_Tail = tuple[tuple[tuple[int, int, bytes], ...], int]   # ((first seq, count, value), ...), bytes

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """Translate backend failures into the catalogue, once, at the boundary."""
    try:
        yield
    except Exception as exc:  # rocksdict raises plain Exception for RocksDB status errors
        if getattr(exc, "code", None) is not None:  # a BrokerError passing through
            raise
        text = str(exc)
        if "No space left" in text or "ENOSPC" in text:
            # every write fails so while the disk is full: RocksStore logs the state once instead
            log.debug("rocksdb %s failed: %s", what, text)
            raise server_error(ErrorCode.STORAGE_FULL) from exc
        log.error("rocksdb %s failed: %s", what, text)
        raise server_error(ErrorCode.UNAVAILABLE, detail=f"storage {what} failed") from exc


# A reopen replays the WAL into a new SST and writes a new MANIFEST, OPTIONS and info LOG: it is
# tried once the free space covers the WAL and MANIFEST files plus this much.
REOPEN_RESERVE_BYTES = 1 << 20


def _options(memtable_mb: int, block_cache_mb: int) -> rocksdict.Options:
    """Bounded memory: at most two memtables (one filling, one flushing) plus a fixed block cache.

    RocksDB's defaults (64 MiB memtables, caches sized per table) let a busy broker's RSS wander by
    hundreds of MiB; a broker needs a budget an operator can reason about (see --memtable-mb).
    """
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.increase_parallelism(max(2, os.cpu_count() or 2))
    opts.set_compression_type(rocksdict.DBCompressionType.lz4())
    opts.set_write_buffer_size(memtable_mb << 20)
    opts.set_max_write_buffer_number(2)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(rocksdict.Cache(block_cache_mb << 20))
    table.set_cache_index_and_filter_blocks(True)   # index/filter blocks count against the cache too
    opts.set_block_based_table_factory(table)
    return opts


class FormatMismatch(IncompatibleStore):
    """The directory holds data of another on-disk layout."""


class RocksEngine:
    def __init__(self, path: str, *, sync: bool = False, memtable_mb: int = 32, block_cache_mb: int = 64) -> None:
        os.makedirs(path, exist_ok=True)
        self._path = path
        self._opts = _options(memtable_mb, block_cache_mb)
        with _io_errors("open"):
            self._db = rocksdict.Rdict(path, self._opts)
        self._write_opts = rocksdict.WriteOptions()
        self._write_opts.sync = sync
        self.sync = sync
        self._lock = threading.Lock()
        self._closed = False
        self._down = False                    # closed by a reopen that has not succeeded yet
        self._gate = threading.Condition(threading.Lock())   # readers in; a reopen waits for them to leave
        self._readers = 0
        self._reopening = False
        try:
            self._check_format(path)
        except BaseException:
            self._db.close()
            raise
        self._streams: dict[tuple[str, str], StreamConfig] = {}
        self._by_id: dict[int, StreamConfig] = {}
        self._hwm: dict[tuple[int, int], tuple[int, int]] = {}   # (sid, p) -> (next_seq, last_ts)
        self._first: dict[tuple[int, int], int] = {}             # (sid, p) -> first retained seq
        self._newest: dict[tuple[int, int], tuple[int, int]] = {}  # (sid, p) -> newest batch (first seq, bytes)
        # (sid, p) -> the tail cache's batches of the partition, oldest partition first (see TAIL_BATCHES).
        # Changed only under self._lock, each entry replaced whole: lock-free readers see one or the other.
        self._tail: dict[tuple[int, int], _Tail] = {}
        self._tail_bytes = 0
        self._load_catalogue()

    # -- catalogue -----------------------------------------------------------------------------

    def _check_format(self, path: str) -> None:
        """A new directory gets the current format version; one written by another layout is
        refused, never read as if it were ours (there is no migration: see keys.py)."""
        with _io_errors("open"):
            raw = self._db.get(keys.FORMAT_VERSION)
            empty = raw is None and not any(True for _ in self._db.keys())
        if raw is not None and keys.U64.unpack(raw)[0] == keys.FORMAT:
            return
        if empty:
            wb = rocksdict.WriteBatch(raw_mode=True)
            wb.put(keys.FORMAT_VERSION, keys.U64.pack(keys.FORMAT))
            self._write(wb, "open")
            return
        found = keys.U64.unpack(raw)[0] if raw is not None else 1
        raise FormatMismatch(
            f"{path} holds data of on-disk format {found}, and this broker reads format {keys.FORMAT}; "
            f"there is no migration: move the data dir away (or delete it) and start again")

    def _load_catalogue(self) -> None:
        ro = rocksdict.ReadOptions()
        ro.set_iterate_upper_bound(keys.STREAM + b"\xff")
        for _, value in self._db.items(from_key=keys.STREAM, read_opt=ro):
            config = StreamConfig.from_dict(json.loads(value))
            self._streams[config.key] = self._by_id[config.stream_id] = config

    def _writable(self) -> None:
        """Refuse a write before it touches the database: while a reopen after a full disk has not
        succeeded the handle is closed, and reading it (a partition's head) would fail as an I/O
        error (FAILED) instead of the disk being full."""
        if self._closed:
            raise server_error(ErrorCode.UNAVAILABLE, detail="store is closed")
        if self._down:
            raise server_error(ErrorCode.STORAGE_FULL)

    def _write(self, batch: rocksdict.WriteBatch, what: str) -> None:
        self._writable()
        with _io_errors(what):
            self._db.write(batch, self._write_opts)

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """A read of the database: counted, so a reopen waits until no reader holds it (a live
        iterator keeps RocksDB open, and the reopen would find its lock taken); none starts while
        a reopen runs. Not nested: a reopen waiting between an outer and an inner one would hang."""
        with self._gate:
            while self._reopening:
                self._gate.wait()
            if self._closed:
                raise server_error(ErrorCode.UNAVAILABLE, detail="store is closed")
            if self._down:
                raise server_error(ErrorCode.UNAVAILABLE, detail="store is reopening after a full disk")
            self._readers += 1
        try:
            yield
        finally:
            with self._gate:
                self._readers -= 1
                if self._readers == 0 and self._reopening:
                    self._gate.notify_all()

    def create_stream(self, config: StreamConfig) -> StreamConfig:
        with self._lock:
            self._writable()
            if config.key in self._streams:
                raise client_error(ErrorCode.STREAM_EXISTS, stream=config.stream_name)
            with _io_errors("read"):
                raw = self._db.get(keys.NEXT_STREAM_ID)
            stream_id = keys.U64.unpack(raw)[0] if raw else 1
            stored = replace(config, stream_id=stream_id)
            wb = rocksdict.WriteBatch(raw_mode=True)
            wb.put(keys.NEXT_STREAM_ID, keys.U64.pack(stream_id + 1))
            wb.put(keys.stream_key(config.project, config.stream_name), json.dumps(asdict(stored)).encode())
            self._write(wb, "create_stream")
            self._streams[stored.key] = self._by_id[stream_id] = stored
            return stored

    def update_stream(self, config: StreamConfig, fields: Sequence[str] | None = None) -> StreamConfig:
        """The new layout or settings, in one write of the stream's key; partitions have no key of
        their own (an unwritten partition is an empty one), so new ones need nothing more."""
        with self._lock:
            stored = self._by_id.get(config.stream_id)
            if stored is None:
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {config.stream_id}")
            config = changed_fields(stored, config, fields)
            wb = rocksdict.WriteBatch(raw_mode=True)
            wb.put(keys.stream_key(config.project, config.stream_name), json.dumps(asdict(config)).encode())
            self._write(wb, "update_stream")
            self._streams[config.key] = self._by_id[config.stream_id] = config
            return config

    def drop_stream(self, stream_id: int) -> None:
        with self._lock:
            config = self._by_id.get(stream_id)
            if config is None:
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {stream_id}")
            wb = rocksdict.WriteBatch(raw_mode=True)
            wb.delete(keys.stream_key(config.project, config.stream_name))
            for kind in (keys.RECORD, keys.HWM, keys.TRIM):
                wb.delete_range(*keys.stream_range(kind, config.stream_id))
            self._write(wb, "drop_stream")
            del self._streams[config.key]
            del self._by_id[stream_id]
            # every partition it ever had (a scale event's history may have aged out of the config)
            for cache in (self._hwm, self._first, self._newest):
                for key in list(cache):   # one C-level copy: lock-free readers may add keys meanwhile
                    if key[0] == stream_id:
                        cache.pop(key, None)
            for key in [k for k in self._tail if k[0] == stream_id]:
                self._forget_tail(key)

    def list_streams(self) -> list[StreamConfig]:
        return [self._streams[k] for k in sorted(self._streams)]

    # -- partition state -----------------------------------------------------------------------

    def _hwm_of(self, sid: int, partition: int) -> tuple[int, int]:
        state = self._hwm.get((sid, partition))
        if state is None:
            with _io_errors("read"):
                raw = self._db.get(keys.partition_key(keys.HWM, sid, partition))
            # setdefault, not assignment: a lock-free reader may have read the value before a
            # concurrent append committed; it must not overwrite what that append cached since.
            state = self._hwm.setdefault((sid, partition), keys.decode_hwm(raw) if raw else (0, 0))
        return state

    def _first_of(self, sid: int, partition: int) -> int:
        first = self._first.get((sid, partition))
        if first is None:
            with _io_errors("read"):
                raw = self._db.get(keys.partition_key(keys.TRIM, sid, partition))
            first = self._first.setdefault((sid, partition), keys.U64.unpack(raw)[0] if raw else 0)
        return first

    def hwm_cached(self, sid: int, partition: int) -> bool:
        """Whether an append to the partition needs no read of RocksDB."""
        return (sid, partition) in self._hwm or sid not in self._by_id

    def in_small_tail_batch(self, sid: int, partition: int, start_seq: int, max_bytes: int) -> bool:
        """Whether a read from `start_seq` touches only the partition's newest batch (as appended by
        this process) and that batch is at most `max_bytes`: then it costs microseconds."""
        newest = self._newest.get((sid, partition))
        return newest is not None and newest[0] <= start_seq and newest[1] <= max_bytes

    def cached_bounds(self, sid: int, partition: int) -> tuple[int, int] | None:
        """(first retained, next) from memory only, or None when not cached yet: lets the caller
        decide without I/O whether a read is a small tail read."""
        state, first = self._hwm.get((sid, partition)), self._first.get((sid, partition))
        if state is None or first is None or sid not in self._by_id:
            return None
        return min(first, state[0]), state[0]

    def _check_partition(self, sid: int, partition: int) -> None:
        if sid not in self._by_id:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {sid}")
        # partition ranges are validated by the core against the stream config

    # -- the log -------------------------------------------------------------------------------

    def append(self, batches: Sequence[AppendBatch]) -> list[int | None]:
        with self._lock:
            self._writable()
            wb = rocksdict.WriteBatch(raw_mode=True)
            staged: dict[tuple[int, int], tuple[int, int]] = {}
            newest: dict[tuple[int, int], tuple[int, int]] = {}
            added: dict[tuple[int, int], list[tuple[int, int, bytes]]] = {}
            firsts: list[int | None] = []
            encode, rkey = keys.encode_batch, keys.record_key
            for batch in batches:
                sid, p = batch.stream_id, batch.partition
                if sid not in self._by_id:
                    firsts.append(None)
                    continue
                next_seq, last_ts = staged.get((sid, p)) or self._hwm_of(sid, p)
                ts = max(batch.timestamp_ms, last_ts)
                firsts.append(next_seq)
                if batch.items:  # one value per batch, keyed by its first seq
                    value = encode(ts, batch.items)
                    wb.put(rkey(sid, p, next_seq), value)
                    newest[(sid, p)] = (next_seq, len(value))
                    added.setdefault((sid, p), []).append((next_seq, len(batch.items), value))
                    next_seq += len(batch.items)
                staged[(sid, p)] = (next_seq, ts)
            for (sid, p), (next_seq, ts) in staged.items():
                wb.put(keys.partition_key(keys.HWM, sid, p), keys.encode_hwm(next_seq, ts))
            if staged:
                self._write(wb, "append")
                self._hwm.update(staged)
                self._newest.update(newest)
                self._remember_tail(added)
            return firsts

    # -- the tail cache (TAIL_BATCHES) ----------------------------------------------------------

    def _remember_tail(self, added: dict[tuple[int, int], list[tuple[int, int, bytes]]]) -> None:
        """After a write (under the lock): the batches just written join their partition's tail."""
        tail = self._tail
        for key, new in added.items():
            old = self._forget_tail(key)   # re-inserted below: the dict's order is the order of appends
            batches = tuple(new)
            if old is not None and old[0][-1][0] + old[0][-1][1] == new[0][0]:   # contiguous: extend
                batches = old[0] + batches
            size = sum(len(v) for _, _, v in batches)
            while batches and (len(batches) > TAIL_BATCHES or size > TAIL_BYTES):
                size -= len(batches[0][2])
                batches = batches[1:]
            if batches:
                tail[key] = (batches, size)
                self._tail_bytes += size
        while self._tail_bytes > TAIL_TOTAL_BYTES and tail:
            self._forget_tail(next(iter(tail)))

    def _forget_tail(self, key: tuple[int, int]) -> _Tail | None:
        old = self._tail.pop(key, None)
        if old is not None:
            self._tail_bytes -= old[1]
        return old

    def read_tail(self, sid: int, partition: int, start_seq: int, limit: int, max_bytes: int) -> list[Record] | None:
        """What read() returns, from the tail cache alone (memory, no I/O): None when the cache
        does not hold the start of the read (the caller reads RocksDB then). Fewer records than
        are stored past the cached ones is a short read, as max_bytes would make it."""
        cached = self._tail.get((sid, partition))
        state, first = self._hwm.get((sid, partition)), self._first.get((sid, partition))
        if cached is None or state is None or first is None or sid not in self._by_id:
            return None
        batches = cached[0]
        start = max(start_seq, first)
        if start >= state[0] or limit <= 0:
            return []
        last_first, last_count, _ = batches[-1]
        end = min(state[0], start + limit, last_first + last_count)
        if start < batches[0][0] or start >= end:
            return None
        out: list[Record] = []
        total = 0
        decode = keys.decode_batch
        for batch_first, count, value in batches:
            if batch_first + count <= start:
                continue
            if batch_first >= end:
                break
            lo, hi = max(start - batch_first, 0), min(count, end - batch_first)
            records, used = decode(value, batch_first, lo, hi, max_bytes - total, not out)
            out += records
            total += used
            if len(records) < hi - lo:  # max_bytes reached
                break
        return out

    @staticmethod
    def _upper_bound(stream_id: int, partition: int, end_seq: int | None = None) -> rocksdict.ReadOptions:
        """Read options bounding an iterator to the partition's batches that start before
        `end_seq` (default: the whole partition). The caller must keep the options alive as long
        as its iterator: rocksdict does not, and a freed bound silently unbounds (or breaks) it.
        rocksdict ignores an iterate lower bound, so callers that seek backwards check with
        `_in_partition` that they did not land in an earlier partition."""
        ro = rocksdict.ReadOptions()
        prefix = keys.partition_key(keys.RECORD, stream_id, partition)
        ro.set_iterate_upper_bound(keys.prefix_end(prefix) if end_seq is None
                                   else keys.record_key(stream_id, partition, end_seq))
        return ro

    @staticmethod
    def _in_partition(it: rocksdict.RdictIter, prefix: bytes) -> bool:
        if not it.valid():
            it.status()  # an I/O error invalidates the iterator: raise it, never read it as "no batch"
            return False
        return bool(it.key().startswith(prefix))

    def _batch_at(self, it: rocksdict.RdictIter, stream_id: int, partition: int,
                  seq: int) -> tuple[int, int, int] | None:
        """Position `it` on the stored batch holding `seq`: (its first seq, count, timestamp), or
        None when no stored batch holds it (trimmed, or at/after next_seq)."""
        it.seek_for_prev(keys.record_key(stream_id, partition, seq))
        if not self._in_partition(it, keys.partition_key(keys.RECORD, stream_id, partition)):
            return None
        first = keys.record_seq(it.key())
        count, ts = keys.batch_header(it.value())
        return (first, count, ts) if seq < first + count else None

    def read(self, stream_id: int, partition: int, start_seq: int, limit: int, max_bytes: int) -> list[Record]:
        out: list[Record] = []
        total = 0
        with self._using():
            for value, first, lo, hi in self._stored(stream_id, partition, start_seq, limit):
                records, used = keys.decode_batch(value, first, lo, hi, max_bytes - total, not out)
                out += records
                total += used
                if len(records) < hi - lo:  # max_bytes reached
                    break
        return out

    def read_block(self, stream_id: int, partition: int, start_seq: int, limit: int,
                   max_bytes: int) -> RecordBlock:
        """As read(), as columns: payloads and timestamp runs, no object per record (scans)."""
        data: list[bytes] = []
        times: list[tuple[int, int]] = []
        first_seq, total = start_seq, 0
        with self._using():
            for value, first, lo, hi in self._stored(stream_id, partition, start_seq, limit):
                if not data:
                    first_seq = first + lo
                payloads, ts, used = keys.batch_payloads(value, lo, hi, max_bytes - total, not data)
                data += payloads
                total += used
                if payloads:
                    times.append((len(payloads), ts))
                if len(payloads) < hi - lo:  # max_bytes reached
                    break
        return RecordBlock(first_seq, data, times, total)

    def _stored(self, stream_id: int, partition: int, start_seq: int,
                limit: int) -> Iterator[tuple[bytes, int, int, int]]:
        """The stored batches a read of `limit` records from `start_seq` touches, as (value, its
        first seq, lo, hi: the wanted records' indexes in it). Callers stop when their byte budget
        runs out."""
        self._check_partition(stream_id, partition)
        next_seq, _ = self._hwm_of(stream_id, partition)
        start = max(start_seq, self._first_of(stream_id, partition))
        if start >= next_seq or limit <= 0:
            return
        end = min(next_seq, start + limit)
        seq_of = keys.record_seq
        with _io_errors("read"):
            ro = self._upper_bound(stream_id, partition, end)
            it = self._db.iter(ro)
            # the batch holding `start` may begin before it (reads start inside batches); if
            # none holds it (trimmed under us), go on from the next stored batch
            it.seek_for_prev(keys.record_key(stream_id, partition, start))
            if not self._in_partition(it, keys.partition_key(keys.RECORD, stream_id, partition)):
                it.seek(keys.record_key(stream_id, partition, start))
            while it.valid():
                first = seq_of(it.key())
                value = it.value()
                count, _ = keys.batch_header(value)
                lo, hi = max(start - first, 0), min(count, end - first)
                if lo < hi:
                    yield value, first, lo, hi
                it.next()
            it.status()  # the loop also ends on an I/O error: raise it rather than return a short read

    def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        if self.cached_bounds(stream_id, partition) is not None:
            return self._bounds(stream_id, partition)   # memory only
        with self._using():
            return self._bounds(stream_id, partition)

    def bounds_many(self, partitions: Sequence[tuple[int, int]]) -> list[PartitionBounds | None]:
        """bounds() of each pair (None for a dropped stream), under one reader count: a caller
        on a thread reads every uncached one in one hop."""
        out: list[PartitionBounds | None] = []
        with self._using():
            for sid, p in partitions:
                try:
                    out.append(self._bounds(sid, p))
                except BrokerError as exc:   # dropped (maybe while this ran)
                    if exc.code is not ErrorCode.STREAM_NOT_FOUND:
                        raise
                    out.append(None)
        return out

    def _bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        self._check_partition(stream_id, partition)
        next_seq, last_ts = self._hwm_of(stream_id, partition)
        return PartitionBounds(min(self._first_of(stream_id, partition), next_seq), next_seq, last_ts)

    def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        with self._using():
            return self._seq_at_time(stream_id, partition, timestamp_ms)

    def _seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        first, next_seq, _ = self._bounds(stream_id, partition)
        lo, hi = first, next_seq
        with _io_errors("read"):
            ro = self._upper_bound(stream_id, partition)
            it = self._db.iter(ro)
            # first seq in [lo, hi) whose timestamp >= timestamp_ms; a batch has one timestamp,
            # so each probe settles the whole batch holding `mid`
            while lo < hi:
                mid = (lo + hi) // 2
                found = self._batch_at(it, stream_id, partition, mid)
                if found is None:  # trimmed under us: everything before it is gone too
                    lo = mid + 1
                    continue
                batch_first, count, ts = found
                if ts < timestamp_ms:
                    lo = min(batch_first + count, hi)
                else:
                    hi = max(batch_first, lo)
        return lo

    def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        with self._lock:
            self._writable()
            self._check_partition(stream_id, partition)
            first = self._first_of(stream_id, partition)
            next_seq, _ = self._hwm_of(stream_id, partition)
            cut = min(before_seq, next_seq)
            if cut <= first:
                return
            # drop whole batches only: one straddling the cut stays stored, and the "T" key
            # (first retained seq) hides its records below the cut
            with _io_errors("trim"):
                ro = self._upper_bound(stream_id, partition)
                straddling = self._batch_at(self._db.iter(ro), stream_id, partition, cut)
            drop_to = straddling[0] if straddling is not None else cut
            wb = rocksdict.WriteBatch(raw_mode=True)
            if drop_to > 0:
                wb.delete_range(keys.record_key(stream_id, partition, 0),
                                keys.record_key(stream_id, partition, drop_to))
            wb.put(keys.partition_key(keys.TRIM, stream_id, partition), keys.U64.pack(cut))
            self._write(wb, "trim")
            self._first[(stream_id, partition)] = cut

    # -- metadata (opaque to the store) ------------------------------------------------------------

    def meta_get(self, key: bytes) -> bytes | None:
        with self._using(), _io_errors("read"):
            return self._db.get(keys.META + key)  # type: ignore[no-any-return]

    def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        ro = rocksdict.ReadOptions()
        ro.set_iterate_upper_bound(keys.prefix_end(keys.META + prefix))
        with self._using(), _io_errors("read"):
            items = self._db.items(from_key=keys.META + prefix, read_opt=ro)
            return [(cast(bytes, k)[1:], cast(bytes, v)) for k, v in items]   # raw mode: bytes in, bytes out

    def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, value in changes.items():
            if value is None:
                wb.delete(keys.META + key)
            else:
                wb.put(keys.META + key, value)
        with self._lock:
            self._write(wb, "meta_write")

    def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        """Read and write under self._lock, which every metadata mutation takes: atomic."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        if new is None:
            wb.delete(keys.META + key)
        else:
            wb.put(keys.META + key, new)
        with self._lock:
            with self._using(), _io_errors("read"):
                current = self._db.get(keys.META + key)
            if current != expected:
                return False
            self._write(wb, "meta_cas")
            return True

    # -- a full disk (see the module's docstring) -------------------------------------------------

    def room(self) -> tuple[int, int]:
        """(free bytes for us on the data's filesystem, bytes a reopen needs)."""
        st = os.statvfs(self._path)
        needed = REOPEN_RESERVE_BYTES
        try:
            with os.scandir(self._path) as entries:
                for entry in entries:
                    if entry.name.endswith(".log") or entry.name.startswith("MANIFEST-"):
                        with contextlib.suppress(OSError):   # RocksDB may delete one under us
                            needed += entry.stat().st_size
        except OSError:   # no descriptor left (EMFILE): the reserve alone, the next step looks again
            pass
        return st.f_bavail * st.f_frsize, needed

    def recover(self, may_reopen: bool) -> bool | None:
        """Make the store writable again: True when RocksDB had resumed by itself (a probe write
        went through), False when the database was reopened (only if `may_reopen`), None when it
        is still refused and no reopen was tried. Raises STORAGE_FULL (or UNAVAILABLE) when the
        reopen failed; the database is closed then (`_down`) until a later reopen works.
        Appends wait on the lock meanwhile, and no reader holds the database during a reopen."""
        with self._lock:
            if self._closed:
                raise server_error(ErrorCode.UNAVAILABLE, detail="store is closed")
            if not self._down:
                probe = rocksdict.WriteBatch(raw_mode=True)   # rewrites what is there: harmless
                probe.put(keys.FORMAT_VERSION, keys.U64.pack(keys.FORMAT))
                with contextlib.suppress(BrokerError):
                    self._write(probe, "probe")
                    return True
            if not may_reopen:
                return None
            self._reopen()
            return False

    def _reopen(self) -> None:
        with self._gate:
            self._reopening = True
            while self._readers:
                self._gate.wait()
        try:
            if not self._down:
                self._down = True
                try:
                    self._db.close()
                except Exception as exc:   # "Writer has previous error": closed all the same
                    log.debug("closing rocksdb for a reopen: %s", exc)
            with _io_errors("reopen"):
                db = rocksdict.Rdict(self._path, self._opts)
            try:
                self._reconcile(db)
            except BaseException:
                db.close()
                raise
            self._db = db
            self._down = False
            self._first.clear()   # a trim reported failed may have persisted: reload what is durable
            for key in list(self._tail):
                self._forget_tail(key)
        finally:
            with self._gate:
                self._reopening = False
                self._gate.notify_all()

    def _reconcile(self, db: rocksdict.Rdict) -> None:
        """Bring every partition this process appended to back to its acknowledged high-water
        mark: records past it belong to batches reported failed (module docstring)."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        for (sid, p), (next_seq, ts) in list(self._hwm.items()):
            hwm_key = keys.partition_key(keys.HWM, sid, p)
            with _io_errors("reopen"):
                raw = db.get(hwm_key)
            durable = keys.decode_hwm(raw) if raw else (0, 0)
            if durable == (next_seq, ts):
                continue
            if durable[0] < next_seq:   # never seen: the WAL held every acknowledged write
                log.error("after reopening rocksdb, stream %d partition %d ends at seq %d, but seq %d was "
                          "acknowledged", sid, p, durable[0], next_seq)
                self._hwm[(sid, p)] = durable
                self._newest.pop((sid, p), None)
                self._forget_tail((sid, p))
                continue
            if durable[0] > next_seq:
                log.warning("after reopening rocksdb: stream %d partition %d held seq %d..%d of a write reported "
                            "failed; removed them", sid, p, next_seq, durable[0] - 1)
                wb.delete_range(keys.record_key(sid, p, next_seq), keys.record_key(sid, p, durable[0]))
            wb.put(hwm_key, keys.encode_hwm(next_seq, ts))   # and the timestamp of a failed empty batch
        if len(wb):
            with _io_errors("reopen"):
                db.write(wb, self._write_opts)

    def close(self) -> None:
        """Flush and close. A flush refused (a full disk) is logged, not raised: everything
        acknowledged is in the WAL, which the next open replays."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._down:
                return
            try:
                self._db.flush_wal(True)
                self._db.flush()
            except Exception as exc:
                log.warning("rocksdb flush on close failed (the WAL keeps what was acknowledged): %s", exc)
            try:
                self._db.close()
            except Exception as exc:   # "Writer has previous error": closed all the same
                log.warning("rocksdb close reported: %s", exc)
