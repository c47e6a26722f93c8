"""The read path: cursors, GetRecords (with long poll) and push subscriptions.

A cursor names a stream by id, and is only honoured in the project of that stream. Waiting for
writes goes through the WriteNotifier (core/notify.py); where a read runs (thread or event loop)
is the store's business.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from operator import itemgetter
from typing import AsyncGenerator, Callable

from broker.core.apps import CURSOR_KEY
from broker.core.catalogue import StreamCatalogue
from broker.core.cursors import CursorPosition, decode_cursor, encode_cursor
from broker.core.limits import Limits, parse_seq
from broker.core.notify import WriteNotifier
from broker.core.stats import BrokerStats
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import CursorType, GetRecordsResult, PartitionBounds, Record, RecordBlock, StreamConfig
from broker.storage.base import Store

# [ours] a push batch (gRPC Subscribe, SSE tail, query readers) carries at most this much payload:
# a stalled consumer holds one batch (a tail until the stall timeout drops it, a gRPC Subscribe
# until its connection closes), so this bounds what each subscription can make the broker hold
# (GetRecords keeps the 10 MiB of max_fetch_bytes)
SUBSCRIBE_BATCH_BYTES = 1024 * 1024

_data = itemgetter(3)   # Record.data: a plain tuple index, faster than the attribute


def _expire(waiter: asyncio.Future[None]) -> None:
    """A long poll's time is up: wake its reader, which then returns what it has (nothing)."""
    if not waiter.done():
        waiter.set_result(None)


class ReadPath:
    def __init__(self, catalogue: StreamCatalogue, store: Store, notifier: WriteNotifier, limits: Limits,
                 clock_ms: Callable[[], int], stats: BrokerStats | None = None) -> None:
        self._catalogue = catalogue
        self._stats = stats if stats is not None else BrokerStats()
        self._store = store
        self._shared = store.capabilities.shared   # other brokers write too: see _fetch
        self._notifier = notifier
        self._limits = limits
        self._now = clock_ms
        self.secret = b""   # the cursor key: see load_secret

    async def load_secret(self) -> None:
        """The key cursors are signed with, created on first use. It lives in the store, so that
        cursors survive a restart and every broker of a shared store accepts the others'. Created
        with meta_cas (create if absent): of two brokers starting at once, one key wins and the
        other adopts it."""
        secret = await self._store.meta_get(CURSOR_KEY)
        while secret is None:
            fresh = secrets.token_bytes(32)
            if await self._store.meta_cas(CURSOR_KEY, None, fresh):
                secret = fresh
            else:
                secret = await self._store.meta_get(CURSOR_KEY)
        self.secret = secret

    async def get_cursor(self, project: str, stream_name: object, partition_id: object, cursor_type: object = None,
                         starting_seq: object = None, timestamp_ms: object = None) -> str:
        """An opaque cursor. Raises STREAM_NOT_FOUND, INVALID_PARTITION_ID, PARTITION_NOT_FOUND,
        INVALID_CURSOR_TYPE, INVALID_SEQUENCE, SEQUENCE_OUT_OF_RANGE, INVALID_REQUEST, TIMESTAMP_EXPIRED."""
        config = self._catalogue.get(project, stream_name)
        p = self._catalogue.partition_of(config, partition_id)
        try:
            kind = CursorType(cursor_type or "AT_SEQUENCE_NUMBER")
        except ValueError:
            raise client_error(ErrorCode.INVALID_CURSOR_TYPE, cursor_type=f"{cursor_type!s:.40}") from None
        now = self._now()
        sid = config.stream_id
        if kind is CursorType.AT_TIMESTAMP:
            if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool) or timestamp_ms < 0:
                given = "none" if timestamp_ms is None else f"{timestamp_ms!r:.40}"
                raise client_error(ErrorCode.INVALID_REQUEST, detail="AT_TIMESTAMP needs a timestamp in "
                                   f"milliseconds since the epoch, 0 or more; got {given}")
            earliest = now - config.retention_ms
            if timestamp_ms < earliest:
                raise client_error(ErrorCode.TIMESTAMP_EXPIRED, earliest=earliest)
            if self._store.capabilities.shared:   # the head as of now, other brokers' appends included
                await self._store.fresh_bounds(sid, p)
            seq = await self._store.seq_at_time(sid, p, timestamp_ms)
        else:
            # fresh: LATEST and the range check include what another broker of a shared store
            # acknowledged a moment ago (a cursor is taken once per reader, not per read)
            seq = self._position(kind, await self._store.fresh_bounds(sid, p), starting_seq)
        return encode_cursor(self.secret, CursorPosition(sid, p, seq, now))

    @staticmethod
    def _position(kind: CursorType, bounds: PartitionBounds, starting: object) -> int:
        if kind is CursorType.TRIM_HORIZON:
            return bounds.first_seq
        if kind is CursorType.LATEST:
            return bounds.next_seq
        given = parse_seq(starting)
        seq = given + 1 if kind is CursorType.AFTER_SEQUENCE_NUMBER else given
        if not bounds.first_seq <= seq <= bounds.next_seq:
            raise client_error(ErrorCode.SEQUENCE_OUT_OF_RANGE, given=given, earliest=bounds.first_seq,
                               latest=bounds.last_seq)   # below earliest when no record is held: an empty range
        return seq

    async def cursor_at(self, project: str, cursor: object, seq: object) -> str:
        """A cursor at `seq` in the partition `cursor` reads (an SSE tail resuming at its client's
        Last-Event-ID). `cursor` may have expired: it only names the partition here (an EventSource
        reconnects with its URL's cursor, minutes or hours after it was issued). Raises what
        get_cursor (AT_SEQUENCE_NUMBER) and get_records raise, but CURSOR_EXPIRED."""
        config, pos = self._open(project, cursor, expiring=False)
        return await self.get_cursor(project, config.stream_name, pos.partition, "AT_SEQUENCE_NUMBER", seq)

    def cursor_stream_id(self, cursor: object, expiring: bool = True) -> int | None:
        """The stream id a valid cursor names, known here or not; None for a cursor that is not
        (`expiring` False: an expired one is valid, as cursor_at takes it)."""
        pos = self._position_of(cursor, expiring)
        return None if pos is None else pos.stream_id

    def cursor_seq(self, cursor: object) -> int | None:
        """The sequence number a valid cursor reads next; None for a cursor that is not valid."""
        pos = self._position_of(cursor)
        return None if pos is None else pos.seq

    def _position_of(self, cursor: object, expiring: bool = True) -> CursorPosition | None:
        try:
            return decode_cursor(self.secret, cursor, self._now(), self._limits.cursor_ttl_ms if expiring else None)
        except BrokerError:
            return None

    def _open(self, project: str, cursor: object, expiring: bool = True) -> tuple[StreamConfig, CursorPosition]:
        pos = decode_cursor(self.secret, cursor, self._now(), self._limits.cursor_ttl_ms if expiring else None)
        config = self._catalogue.by_id(pos.stream_id)
        if config is None:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=self._catalogue.gone(pos.stream_id))
        if config.project != project:
            raise client_error(ErrorCode.INVALID_CURSOR, detail="the cursor belongs to a stream of another project")
        return config, pos

    async def get_records(self, project: str, cursor: object, limit: int | None = None,
                          max_fetch_bytes: int | None = None, wait_ms: int | None = None,
                          counted: bool = True) -> GetRecordsResult:
        """Records from the cursor on, and the cursor after them. `limit` and `max_fetch_bytes` are
        clipped into range; at least one record is returned when one exists, even if it is larger
        than max_fetch_bytes (DIS would never return it - a documented deviation). With `wait_ms`
        (long poll) an empty read waits up to that long for a record to be written. `counted`
        False: a look inside the broker (a stream's stats), neither records_out nor a GetRecords
        call in the metrics. Raises INVALID_CURSOR, CURSOR_EXPIRED, CURSOR_RECORD_EXPIRED,
        STREAM_NOT_FOUND."""
        began = time.perf_counter()
        lim = self._limits
        _, pos = self._open(project, cursor)
        limit = min(max(limit or lim.default_read_limit, 1), lim.max_read_limit)
        max_bytes = min(max(max_fetch_bytes or lim.default_fetch_bytes, 1), lim.max_fetch_bytes)
        wait_s = min(max(wait_ms or 0, 0), lim.max_wait_ms) / 1000
        result = await self._fetch(pos.stream_id, pos.partition, pos.seq, limit, max_bytes, wait_s, counted)
        if counted:
            self._stats.get_request(pos.stream_id, time.perf_counter() - began)
        return result

    async def read_block(self, project: str, cursor: object, limit: int, max_bytes: int,
                         end: int | None = None) -> tuple[RecordBlock, str]:
        """get_records for a scan inside the broker (a query): the records as columns (no
        object per record; see RecordBlock) and the cursor after them; no waiting. Not bound by
        the GetRecords limits, which are a client's: a scan evaluates bigger blocks faster.
        `end`: no record from this seq on (where the scan stops). Raises what get_records raises."""
        _, pos = self._open(project, cursor)
        limit, max_bytes = max(limit, 1), max(max_bytes, 1)
        sid, p, seq = pos.stream_id, pos.partition, pos.seq
        if end is not None:
            limit = min(limit, end - seq)
            if limit <= 0:
                return RecordBlock(seq, [], []), encode_cursor(self.secret, CursorPosition(sid, p, seq, self._now()))
        bounds = await self._store.bounds(sid, p)
        block = await self._store.read_block(sid, p, seq, limit, max_bytes) if seq >= bounds.first_seq \
            else RecordBlock(seq, [], [])
        if seq < bounds.first_seq or (block.data and block.first_seq != seq):
            raise client_error(ErrorCode.CURSOR_RECORD_EXPIRED, seq=seq,
                               earliest=(await self._store.bounds(sid, p)).first_seq)
        if self._catalogue.by_id(sid) is None:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=self._catalogue.gone(sid))
        if block.data:   # records_out: a bounded query reads as much as a streaming one
            self._stats.read(sid, p, len(block.data), block.size if block.size >= 0 else sum(map(len, block.data)))
        return block, encode_cursor(self.secret, CursorPosition(sid, p, block.next_seq, self._now()))

    async def _read(self, sid: int, p: int, seq: int, limit: int,
                    max_bytes: int) -> tuple[PartitionBounds, list[Record]]:
        bounds = await self._store.bounds(sid, p)
        records = await self._store.read(sid, p, seq, limit, max_bytes) if seq >= bounds.first_seq else []
        # checked after the read too: a trim between the two would otherwise skip records silently
        if seq < bounds.first_seq or (records and records[0].seq != seq):
            raise client_error(ErrorCode.CURSOR_RECORD_EXPIRED, seq=seq,
                               earliest=(await self._store.bounds(sid, p)).first_seq)
        return bounds, records

    async def _fetch(self, sid: int, p: int, seq: int, limit: int, max_bytes: int, wait_s: float,
                     counted: bool = True) -> GetRecordsResult:
        """Read from `seq`; if nothing is there, wait up to `wait_s` for a write (see core/notify.py).
        `counted`: the records are handed to the consumer (records_out); else the caller (a
        subscription, whose batch may take several reads) counts what it hands on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        woken = False
        while True:
            if woken:   # a write (or the deadline) woke us: read first, and register again only if
                # that finds nothing - a write woke us, so it usually finds the records
                bounds, records = await self._read(sid, p, seq, limit, max_bytes)
                if not records and deadline <= loop.time() and self._shared and not self._notifier.closed:
                    # timed out: another broker's notification may have been lost; ask the store
                    # itself, once per wait (never per read)
                    with contextlib.suppress(BrokerError):
                        if (await self._store.fresh_bounds(sid, p)).next_seq > seq:
                            bounds, records = await self._read(sid, p, seq, limit, max_bytes)
                if records or deadline <= loop.time() or self._notifier.closed:
                    break
            waiter = self._notifier.register(sid, p) if wait_s > 0 else None
            try:
                bounds, records = await self._read(sid, p, seq, limit, max_bytes)
                remaining = deadline - loop.time()
                if records or waiter is None or remaining <= 0 or self._notifier.closed:
                    break
                # the waiter itself, resolved by a write or by one timer: not wait_for (on 3.11 it
                # swallows a cancellation that arrives as the waiter completes, and the reader never
                # ends) nor asyncio.timeout (a context object, and a task cancellation to undo, per wait)
                timer = loop.call_at(deadline, _expire, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
            finally:
                if waiter is not None:
                    self._notifier.discard(sid, p, waiter)
            woken = True
            if self._catalogue.by_id(sid) is None:
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=self._catalogue.gone(sid))
        if records and counted:   # what a consumer is handed (GetRecords)
            self._stats.read(sid, p, len(records), sum(map(len, map(_data, records))))
        next_seq = records[-1].seq + 1 if records else seq
        behind = max(0, bounds.last_ts - records[-1].timestamp_ms) if records else 0
        cursor = encode_cursor(self.secret, CursorPosition(sid, p, next_seq, self._now()))
        config = self._catalogue.by_id(sid)
        layout_ms = config.scale_events[-1].timestamp_ms if config is not None and config.scale_events else 0
        return GetRecordsResult(records, cursor, behind, layout_ms)

    async def subscribe(self, project: str, cursor: object, max_records: int | None = None,
                        max_wait_ms: int | None = None) -> AsyncGenerator[GetRecordsResult, None]:
        """Push consumption from a cursor: yields batches of at most `max_records` as records are
        written. Once a record is available, a batch is sent when it is full or `max_wait_ms`
        after that record was first seen, whichever is first (0 = send at once). After
        `subscribe_heartbeat_ms` of silence an empty batch is yielded as a heartbeat.

        Flow control is the consumer's: the generator reads the next batch only when the caller
        asks for it, so a stalled consumer holds one batch in memory and never slows producers.
        Ends (returns) when the broker begins shutting down. Raises what get_records raises."""
        lim = self._limits
        _, pos = self._open(project, cursor)
        count = min(max(max_records or lim.default_read_limit, 1), lim.max_read_limit)
        linger = min(max(max_wait_ms or 0, 0), lim.max_wait_ms) / 1000
        # a batch's bytes: what a stalled consumer makes the broker hold (three copies of it in
        # a gRPC push: the records, the message, its encoding)
        budget = min(lim.max_fetch_bytes, SUBSCRIBE_BATCH_BYTES)
        sid, p, seq = pos.stream_id, pos.partition, pos.seq
        loop = asyncio.get_running_loop()
        self._stats.subscriptions += 1
        try:
            while not self._notifier.closed:
                batch = await self._fetch(sid, p, seq, count, budget, lim.subscribe_heartbeat_ms / 1000, counted=False)
                records = batch.records
                held = sum(map(len, map(_data, records)))
                if records and len(records) < count and linger > 0:
                    deadline = loop.time() + linger
                    # not once shutting down: every fetch would return at once, empty - a busy loop
                    while len(records) < count and held < budget and not self._notifier.closed \
                            and (remaining := deadline - loop.time()) > 0:
                        more = await self._fetch(sid, p, records[-1].seq + 1, count - len(records),
                                                 budget - held, remaining, counted=False)
                        size = sum(map(len, map(_data, more.records)))
                        if held + size > budget:   # one record, given as a read's first: the next batch's
                            break
                        records = records + more.records
                        held += size
                        batch = GetRecordsResult(records, more.next_cursor, more.millis_behind_latest, more.layout_ms)
                if records:   # records_out: what this batch hands on, once
                    self._stats.read(sid, p, len(records), held)
                    seq = records[-1].seq + 1
                elif self._notifier.closed:
                    return
                yield batch
        finally:   # closed, ended or failed: no longer open
            self._stats.subscriptions -= 1
