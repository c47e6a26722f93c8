"""class Broker: the verbs of the API, the one place where the rules live.

Front doors decode wire formats into these calls and render what comes back; storage only stores.
Every method documents what it returns and which `ErrorCode`s it raises. Blocking store calls run
on worker threads (appends on the group committer's writer thread), never on the event loop.
"""
from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import Counter
from typing import AsyncIterator, Callable, Sequence

from broker.core import apps, routing
from broker.core.consumers import ConsumerVerbs
from broker.core.cursors import CursorPosition, decode_cursor, encode_cursor
from broker.core.limits import DEFAULT_LIMITS, SEQUENCE_MAX, Limits, check_stream_name, clip_page
from broker.core.leases import LeaseTable
from broker.core.notify import WriteNotifier
from broker.core.writer import GroupCommitter
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import (AppendBatch, CursorType, GetRecordsResult, PartitionBounds, PartitionInfo,
                          PutColumns, PutEntry, PutRecordsResult, Record, StreamConfig, StreamDescription, StreamPage)
from broker.storage.base import Store

# Reads of at most this many records run on the event loop (records are <= 1 MiB: a few ms worst case).
INLINE_READ_RECORDS = 4

# (partition per record or -1, per-record failures, partition -> (record indices, (key, data) items))
_Grouped = tuple[list[int], list[tuple[int, BrokerError]],
                 dict[int, tuple[list[int], list[tuple[str | None, bytes]]]]]


def _check_columns(columns: PutColumns) -> None:
    n = len(columns.data)
    for name in ("partition_keys", "explicit_hash_keys", "partition_ids"):
        column = getattr(columns, name)
        if column is not None and len(column) != n:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"columns.{name} has {len(column)} entries for "
                               f"{n} records: it must be empty or have one per record")

DATA_TYPES = ("BLOB", "JSON", "CSV")
STREAM_TYPES = ("COMMON", "ADVANCED")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Broker(ConsumerVerbs):
    def __init__(self, store: Store, *, cursor_secret: bytes, limits: Limits = DEFAULT_LIMITS,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._store = store
        self._secret = cursor_secret
        self.limits = limits
        self._now = clock_ms
        self._committer = GroupCommitter(store)
        self._streams: dict[str, StreamConfig] = {}
        self._by_id: dict[int, StreamConfig] = {}
        self._admin = asyncio.Lock()        # orders create/delete; guards no blocking call on the loop
        self._spread = itertools.count()    # rotates where unkeyed records start
        self._notifier = WriteNotifier()
        self._routers: dict[int, routing.KeyRouter] = {}   # stream id -> memoised key routing
        self._leases = LeaseTable(started_ms=clock_ms())  # see leases.py: the restart grace

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        for config in await asyncio.to_thread(self._store.list_streams):
            self._remember(config)
        self._committer.start()

    def begin_shutdown(self) -> None:
        """Wake every long poll and end every subscription; writes still go on until close()."""
        self._notifier.close()

    @property
    def shutting_down(self) -> bool:
        return self._notifier.closed

    async def close(self) -> None:
        """Refuse new appends, commit those already accepted. The store is closed by its owner."""
        self.begin_shutdown()
        await self._committer.close()

    @property
    def commits(self) -> int:
        return self._committer.commits

    def _remember(self, config: StreamConfig) -> None:
        self._streams[config.name] = config
        self._by_id[config.stream_id] = config

    def _stream(self, name: object) -> StreamConfig:
        config = self._streams.get(name) if isinstance(name, str) else None
        if config is None:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=name)
        return config

    # -- streams -------------------------------------------------------------------------------

    async def create_stream(self, name: object, partition_count: object, retention_hours: object = None,
                            data_type: object = None, stream_type: object = None) -> StreamConfig:
        """Create a stream. Raises INVALID_REQUEST, QUOTA_EXCEEDED, STREAM_EXISTS."""
        lim = self.limits
        name = check_stream_name(name)
        if not isinstance(partition_count, int) or isinstance(partition_count, bool) or partition_count < 1:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"partition_count must be a positive integer, "
                                                                 f"got {partition_count!r:.40}")
        if partition_count > lim.max_partitions:
            raise client_error(ErrorCode.QUOTA_EXCEEDED,
                               detail=f"partition_count {partition_count} exceeds the quota of {lim.max_partitions}")
        retention = lim.default_retention_hours if retention_hours is None else retention_hours
        if not isinstance(retention, int) or isinstance(retention, bool) or \
                not lim.min_retention_hours <= retention <= lim.max_retention_hours:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"data_duration must be within "
                               f"[{lim.min_retention_hours}, {lim.max_retention_hours}] hours, got {retention!r:.40}")
        data_type = data_type or "BLOB"
        stream_type = stream_type or "COMMON"
        if data_type not in DATA_TYPES:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"data_type must be one of {DATA_TYPES}")
        if stream_type not in STREAM_TYPES:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"stream_type must be one of {STREAM_TYPES}")
        config = StreamConfig(name, partition_count, retention, str(data_type), str(stream_type), self._now())
        # shielded: a caller that goes away (gRPC deadline) must not leave the store holding a
        # stream the catalogue does not know
        return await asyncio.shield(self._create_stream(config))

    async def _create_stream(self, config: StreamConfig) -> StreamConfig:
        async with self._admin:
            if config.name in self._streams:
                raise client_error(ErrorCode.STREAM_EXISTS, stream=config.name)
            stored = await self._committer.run_blocking(self._store.create_stream, config)
            self._remember(stored)
        return stored

    async def delete_stream(self, name: object) -> None:
        """Delete a stream and its records; the name is free again at once. Raises STREAM_NOT_FOUND."""
        await asyncio.shield(self._delete_stream(name))  # all of it, even if the caller goes away

    async def _delete_stream(self, name: object) -> None:
        async with self._admin:
            config = self._stream(name)
            # Forget it first so no new put reaches the writer. A put already queued is either
            # written before the drop (and dropped with it) or finds the stream id gone and is
            # answered STREAM_NOT_FOUND - never acknowledged and then lost.
            del self._streams[config.name]
            del self._by_id[config.stream_id]
            try:
                await self._committer.run_blocking(self._store.drop_stream, config.name)
            except BrokerError:
                self._remember(config)
                raise
            self._leases.forget_stream(config.stream_id)
            self._routers.pop(config.stream_id, None)
            # wake long polls and subscriptions waiting on it: they answer STREAM_NOT_FOUND now,
            # not when their wait runs out
            self._notifier.notify((config.stream_id, p) for p in range(config.partition_count))
            # checkpoints are keyed by stream id; drop them so they do not linger
            doomed: dict[bytes, bytes | None] = {}
            for app_key, _ in await asyncio.to_thread(self._store.meta_scan, apps.APP_PREFIX):
                prefix = apps.checkpoint_stream_prefix(app_key[1:].decode(), config.stream_id)
                doomed.update((k, None) for k, _ in await asyncio.to_thread(self._store.meta_scan, prefix))
            if doomed:
                await self._committer.run_blocking(self._store.meta_write, doomed)

    def list_streams(self, limit: int | None = None, start_after: str | None = None) -> StreamPage:
        """One page of streams in name order, after `start_after` (exclusive). Raises INVALID_REQUEST."""
        limit = clip_page(limit, self.limits.default_list_limit, self.limits.max_list_limit, "limit")
        names = sorted(self._streams)
        start = bisect.bisect_right(names, start_after) if start_after else 0
        page = names[start:start + limit]
        return StreamPage(len(names), [self._streams[n] for n in page], start + limit < len(names))

    async def describe_stream(self, name: object, start_after_partition: str | None = None,
                              limit: int | None = None) -> StreamDescription:
        """Config plus a page of partitions with hash ranges and sequence bounds.
        Raises STREAM_NOT_FOUND, INVALID_PARTITION_ID, INVALID_REQUEST."""
        config = self._stream(name)
        limit = clip_page(limit, self.limits.default_partition_page, self.limits.max_partition_page,
                          "limit_partitions")
        start = 0
        if start_after_partition:
            after = routing.parse_partition_id(start_after_partition, config.partition_count)
            if after is None:
                raise client_error(ErrorCode.INVALID_PARTITION_ID, partition_id=start_after_partition)
            start = after + 1
        chosen = range(start, min(start + limit, config.partition_count))
        ranges = routing.hash_ranges(config.partition_count)

        def collect() -> list[PartitionInfo]:
            return [PartitionInfo(p, *ranges[p], self._store.bounds(config.stream_id, p)) for p in chosen]

        partitions = await asyncio.to_thread(collect)
        return StreamDescription(config, partitions, chosen.stop < config.partition_count)

    # -- writing -------------------------------------------------------------------------------

    async def put_records(self, stream_name: object, entries: Sequence[PutEntry] | PutColumns) -> PutRecordsResult:
        """Route and append a batch. Per-record problems are failures in the result, the rest is
        written. Raises (whole request): STREAM_NOT_FOUND, EMPTY_REQUEST, INVALID_REQUEST,
        REQUEST_TOO_LARGE, UNAVAILABLE, STORAGE_FULL."""
        config = self._stream(stream_name)
        lim = self.limits
        n = len(entries)
        if not n:
            raise client_error(ErrorCode.EMPTY_REQUEST, detail="records must not be empty")
        if n > lim.max_records_per_put:
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"at most {lim.max_records_per_put} records per request, got {n}")
        if isinstance(entries, PutColumns):
            _check_columns(entries)
            payload = sum(map(len, entries.data))
        else:
            payload = sum(len(e.data) for e in entries)
        if payload > lim.max_put_payload_bytes:
            raise client_error(ErrorCode.REQUEST_TOO_LARGE,
                               detail=f"total record payload exceeds {lim.max_put_payload_bytes} bytes")
        router = self._routers.get(config.stream_id)
        if router is None:
            router = self._routers[config.stream_id] = routing.KeyRouter(config.partition_count)
        partitions, failures, by_partition = self._group(config, entries, router)
        seqs = [-1] * n
        if by_partition:
            now = self._now()
            order = list(by_partition.items())
            firsts = await self._committer.append(
                [AppendBatch(config.stream_id, p, now, items) for p, (_, items) in order])
            if any(first is None for first in firsts):  # deleted while we were queued
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=config.name)
            for (_, (indices, _)), first in zip(order, firsts):
                for k, i in enumerate(indices):
                    seqs[i] = first + k  # type: ignore[operator]
            self._notifier.notify((config.stream_id, p) for p, _ in order)
        return PutRecordsResult(partitions, seqs, failures)

    def _group(self, config: StreamConfig, entries: Sequence[PutEntry] | PutColumns,
               router: routing.KeyRouter) -> _Grouped:
        """Route a batch: columns take the keyed fast path when they can, else record by record."""
        if isinstance(entries, PutColumns):
            fast = self._group_keyed_columns(entries, router)
            if fast is not None:
                return fast
            entries = entries.entries()
        return self._group_entries(config, entries, router)

    def _group_entries(self, config: StreamConfig, entries: Sequence[PutEntry],
                       router: routing.KeyRouter) -> _Grouped:
        """Route record by record: (partition per record, failures, partition -> (indices, items))."""
        lim = self.limits
        n = len(entries)
        partitions = [-1] * n
        failures: list[tuple[int, BrokerError]] = []
        by_partition: dict[int, tuple[list[int], list[tuple[str | None, bytes]]]] = {}
        count = config.partition_count
        spread = next(self._spread) * 7919  # a prime step, so consecutive requests start apart
        max_record, max_key = lim.max_record_bytes, lim.max_partition_key_chars
        for i, entry in enumerate(entries):
            key = entry.partition_key
            # the common case inline (a short key and nothing else): one dict hit per record
            if key and entry.partition_id is None and entry.explicit_hash_key is None \
                    and entry.rejected is None and len(entry.data) <= max_record and len(key) <= max_key:
                p = router(key)
            else:
                error = entry.rejected
                p = -1
                if error is None:
                    p, error = self._route(entry, count, spread + i, router)
                if error is not None:
                    failures.append((i, error))
                    continue
            partitions[i] = p
            slot = by_partition.get(p)
            if slot is None:
                slot = by_partition[p] = ([], [])
            slot[0].append(i)
            slot[1].append((key or None, entry.data))
        return partitions, failures, by_partition

    def _group_keyed_columns(self, columns: PutColumns, router: routing.KeyRouter) -> _Grouped | None:
        """The fast path for the common batch: every record has a partition key and nothing else,
        and all are within limits. Whole-list operations instead of a loop per record: the key
        routes map through the router, a stable sort groups indices by partition. None when the
        batch needs the record-at-a-time path (other routing, or a record that will fail)."""
        lim = self.limits
        keys, data = columns.partition_keys, columns.data
        if keys is None or columns.explicit_hash_keys is not None or columns.partition_ids is not None \
                or not all(keys) or max(map(len, keys)) > lim.max_partition_key_chars \
                or max(map(len, data)) > lim.max_record_bytes:
            return None
        partitions = router.route_all(keys)
        order = sorted(range(len(partitions)), key=partitions.__getitem__)  # stable: ascending per partition
        by_partition: dict[int, tuple[list[int], list[tuple[str | None, bytes]]]] = {}
        at = 0
        for p, size in sorted(Counter(partitions).items()):
            indices = order[at:at + size]
            at += size
            by_partition[p] = (indices, list(zip(map(keys.__getitem__, indices), map(data.__getitem__, indices))))
        return partitions, [], by_partition

    def _route(self, entry: PutEntry, count: int, spread: int,
               router: routing.KeyRouter) -> tuple[int, BrokerError | None]:
        lim = self.limits
        if len(entry.data) > lim.max_record_bytes:
            return -1, client_error(ErrorCode.INVALID_REQUEST,
                                    detail=f"record size {len(entry.data)} exceeds {lim.max_record_bytes} bytes")
        key = entry.partition_key
        if key is not None and len(key) > lim.max_partition_key_chars:
            return -1, client_error(ErrorCode.INVALID_REQUEST,
                                    detail=f"partition_key longer than {lim.max_partition_key_chars} characters")
        if entry.partition_id is not None:
            p = routing.parse_partition_id(entry.partition_id, count)
            if p is None:
                return -1, client_error(ErrorCode.INVALID_PARTITION_ID, partition_id=entry.partition_id)
            if p >= count:
                return -1, client_error(ErrorCode.PARTITION_NOT_FOUND, partition_id=entry.partition_id)
            return p, None
        if entry.explicit_hash_key is not None:
            h = routing.parse_hash_key(entry.explicit_hash_key)
            if h is None:
                return -1, client_error(ErrorCode.INVALID_REQUEST, detail=f"explicit_hash_key must be a decimal "
                                        f"within [0, 9223372036854775807], got {entry.explicit_hash_key!r:.40}")
            return routing.partition_for_hash(h, count), None
        if key:
            return router(key), None
        return spread % count, None

    # -- reading -------------------------------------------------------------------------------

    def _partition_of(self, config: StreamConfig, partition_id: object) -> int:
        if not isinstance(partition_id, str):
            raise client_error(ErrorCode.INVALID_PARTITION_ID, partition_id=partition_id)
        p = routing.parse_partition_id(partition_id, config.partition_count)
        if p is None:
            raise client_error(ErrorCode.INVALID_PARTITION_ID, partition_id=partition_id)
        if p >= config.partition_count:
            raise client_error(ErrorCode.PARTITION_NOT_FOUND, partition_id=partition_id)
        return p

    async def get_cursor(self, stream_name: object, partition_id: object, cursor_type: object = None,
                         starting_sequence_number: object = None, timestamp_ms: object = None) -> str:
        """An opaque cursor. Raises STREAM_NOT_FOUND, INVALID_PARTITION_ID, PARTITION_NOT_FOUND,
        INVALID_CURSOR_TYPE, INVALID_SEQUENCE, SEQUENCE_OUT_OF_RANGE, INVALID_REQUEST, TIMESTAMP_EXPIRED."""
        config = self._stream(stream_name)
        p = self._partition_of(config, partition_id)
        try:
            kind = CursorType(cursor_type or "AT_SEQUENCE_NUMBER")
        except ValueError:
            raise client_error(ErrorCode.INVALID_CURSOR_TYPE, cursor_type=cursor_type) from None
        now = self._now()
        sid = config.stream_id
        if kind is CursorType.AT_TIMESTAMP:
            if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool) or timestamp_ms < 0:
                raise client_error(ErrorCode.INVALID_REQUEST,
                                   detail="AT_TIMESTAMP needs timestamp, milliseconds since epoch")
            earliest = now - config.retention_ms
            if timestamp_ms < earliest:
                raise client_error(ErrorCode.TIMESTAMP_EXPIRED, earliest=earliest)
            seq = await asyncio.to_thread(self._store.seq_at_time, sid, p, timestamp_ms)
        else:
            bounds = await asyncio.to_thread(self._store.bounds, sid, p)
            seq = self._position(kind, bounds, starting_sequence_number)
        return encode_cursor(self._secret, CursorPosition(sid, p, seq, now))

    @staticmethod
    def _position(kind: CursorType, bounds: PartitionBounds, starting: object) -> int:
        if kind is CursorType.TRIM_HORIZON:
            return bounds.first_seq
        if kind is CursorType.LATEST:
            return bounds.next_seq
        if not isinstance(starting, str) or not starting.isascii() or not starting.isdigit() \
                or int(starting) > SEQUENCE_MAX:
            raise client_error(ErrorCode.INVALID_SEQUENCE, value=starting)
        given = int(starting)
        seq = given + 1 if kind is CursorType.AFTER_SEQUENCE_NUMBER else given
        if not bounds.first_seq <= seq <= bounds.next_seq:
            raise client_error(ErrorCode.SEQUENCE_OUT_OF_RANGE, given=given, earliest=bounds.first_seq,
                               latest=max(bounds.first_seq, bounds.last_seq))
        return seq

    async def get_records(self, cursor: object, limit: int | None = None, max_fetch_bytes: int | None = None,
                          wait_ms: int | None = None) -> GetRecordsResult:
        """Records from the cursor on, and the cursor after them. `limit` and `max_fetch_bytes` are
        clipped into range; at least one record is returned when one exists, even if it is larger
        than max_fetch_bytes (DIS would never return it - a documented deviation). With `wait_ms`
        (long poll) an empty read waits up to that long for a record to be written.
        Raises INVALID_CURSOR, CURSOR_EXPIRED, CURSOR_RECORD_EXPIRED, STREAM_NOT_FOUND."""
        lim = self.limits
        pos = decode_cursor(self._secret, cursor, self._now(), lim.cursor_ttl_ms)
        if pos.stream_id not in self._by_id:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"(deleted stream {pos.stream_id})")
        limit = min(max(limit or lim.default_read_limit, 1), lim.max_read_limit)
        max_bytes = min(max(max_fetch_bytes or lim.default_fetch_bytes, 1), lim.max_fetch_bytes)
        wait_s = min(max(wait_ms or 0, 0), lim.max_wait_ms) / 1000
        return await self._fetch(pos.stream_id, pos.partition, pos.seq, limit, max_bytes, wait_s)

    async def _fetch(self, sid: int, p: int, seq: int, limit: int, max_bytes: int, wait_s: float) -> GetRecordsResult:
        """Read from `seq`; if nothing is there, wait up to `wait_s` for a write (see core/notify.py)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s

        def read() -> tuple[PartitionBounds, list[Record]]:
            bounds = self._store.bounds(sid, p)
            records = self._store.read(sid, p, seq, limit, max_bytes) if seq >= bounds.first_seq else []
            # checked after the read too: a trim between the two would otherwise skip records silently
            if seq < bounds.first_seq or (records and records[0].seq != seq):
                raise client_error(ErrorCode.CURSOR_RECORD_EXPIRED, seq=seq,
                                   earliest=self._store.bounds(sid, p).first_seq)
            return bounds, records

        while True:
            waiter = self._notifier.register(sid, p) if wait_s > 0 else None
            try:
                bounds, records = read() if self._tail_read(sid, p, seq) else await asyncio.to_thread(read)
                remaining = deadline - loop.time()
                if records or waiter is None or remaining <= 0 or self._notifier.closed:
                    break
                try:
                    await asyncio.wait_for(waiter, remaining)
                except asyncio.TimeoutError:
                    pass
            finally:
                if waiter is not None:
                    self._notifier.discard(sid, p, waiter)
            if sid not in self._by_id:
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"(deleted stream {sid})")
        next_seq = records[-1].seq + 1 if records else seq
        behind = max(0, bounds.last_ts - records[-1].timestamp_ms) if records else 0
        cursor = encode_cursor(self._secret, CursorPosition(sid, p, next_seq, self._now()))
        return GetRecordsResult(records, cursor, behind)

    def _tail_read(self, sid: int, p: int, seq: int) -> bool:
        """Whether a read from `seq` is a tail read, done right on the event loop: at most
        INLINE_READ_RECORDS records (just written, still in the memtable: microseconds) cost less
        than the two thread hops of to_thread, which are most of a push subscriber's latency.
        Bigger reads, which may copy megabytes, still leave the loop."""
        try:
            first, next_seq, _ = self._store.bounds(sid, p)   # served from the store's memory
        except BrokerError:
            return False       # let the threaded read raise it, as before
        return first <= seq and next_seq - seq <= INLINE_READ_RECORDS

    async def subscribe(self, cursor: object, max_records: int | None = None,
                        max_wait_ms: int | None = None) -> AsyncIterator[GetRecordsResult]:
        """Push consumption from a cursor: yields batches of at most `max_records` as records are
        written. Once a record is available, a batch is sent when it is full or `max_wait_ms`
        after that record was first seen, whichever is first (0 = send at once). After
        `subscribe_heartbeat_ms` of silence an empty batch is yielded as a heartbeat.

        Flow control is the consumer's: the generator reads the next batch only when the caller
        asks for it, so a stalled consumer holds one batch in memory and never slows producers.
        Ends (returns) when the broker begins shutting down. Raises what get_records raises."""
        lim = self.limits
        pos = decode_cursor(self._secret, cursor, self._now(), lim.cursor_ttl_ms)
        if pos.stream_id not in self._by_id:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"(deleted stream {pos.stream_id})")
        count = min(max(max_records or lim.default_read_limit, 1), lim.max_read_limit)
        linger = min(max(max_wait_ms or 0, 0), lim.max_wait_ms) / 1000
        sid, p, seq = pos.stream_id, pos.partition, pos.seq
        loop = asyncio.get_running_loop()
        while not self._notifier.closed:
            batch = await self._fetch(sid, p, seq, count, lim.max_fetch_bytes, lim.subscribe_heartbeat_ms / 1000)
            records = batch.records
            if records and len(records) < count and linger > 0:
                deadline = loop.time() + linger
                # not once shutting down: every fetch would return at once, empty - a busy loop
                while len(records) < count and not self._notifier.closed \
                        and (remaining := deadline - loop.time()) > 0:
                    more = await self._fetch(sid, p, records[-1].seq + 1, count - len(records),
                                             lim.max_fetch_bytes, remaining)
                    records = records + more.records
                    batch = GetRecordsResult(records, more.next_cursor, more.millis_behind_latest)
            if records:
                seq = records[-1].seq + 1
            elif self._notifier.closed:
                return
            yield batch

    # -- retention -----------------------------------------------------------------------------

    async def enforce_retention(self) -> int:
        """Trim records older than each stream's retention. Returns how many partitions moved."""
        now = self._now()
        trimmed = 0
        for config in list(self._streams.values()):
            cutoff = now - config.retention_ms

            def trim_stream(config: StreamConfig = config, cutoff: int = cutoff) -> int:
                moved = 0
                for p in range(config.partition_count):
                    try:
                        before = self._store.bounds(config.stream_id, p).first_seq
                        self._store.trim(config.stream_id, p, self._store.seq_at_time(config.stream_id, p, cutoff))
                        moved += self._store.bounds(config.stream_id, p).first_seq != before
                    except BrokerError as exc:
                        if exc.code is not ErrorCode.STREAM_NOT_FOUND:  # deleted meanwhile: fine
                            raise
                        break
                return moved

            # on the writer thread, like every other mutation: commits then never wait on its lock
            trimmed += await self._committer.run_blocking(trim_stream)
        return trimmed
