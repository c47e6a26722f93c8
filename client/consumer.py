"""`PartitionConsumer`: read one partition in order, by long poll or push; `AsyncPartitionConsumer`.

    consumer = PartitionConsumer(target, "orders", 0, app="billing")   # resumes after its checkpoint
    for record in consumer:                                            # blocks, waiting for records
        handle(record)
        consumer.commit()                                              # checkpoint = this record

Where reading starts: with `app`, after the app's committed checkpoint if there is one (the app is
created if missing); otherwise at `start`: "TRIM_HORIZON" (oldest retained record, the default),
"LATEST" (records written from now on), ("AT_SEQUENCE_NUMBER", n), ("AFTER_SEQUENCE_NUMBER", n)
or ("AT_TIMESTAMP", ms_since_epoch).

`mode="pull"` reads with long-poll GetRecords (each call waits up to `wait_ms` for data);
`mode="push"` keeps one Subscribe stream open, read by a small reader thread into a one-page
queue (so `poll()` can time out and `close()` can stop it; the broker still only sends as fast as
we take pages). A Subscribe the broker refuses TOO_MANY_REQUESTS (the client address holds
--max-subscriptions-per-client already) turns the consumer to `mode="pull"` for good.
Both modes keep the position (the next sequence number) themselves, so a cursor
that expired (CURSOR_EXPIRED, cursors live 5 minutes) or stopped being valid (INVALID_CURSOR) is
replaced by
one at the same position, and a broken subscription is reopened where it stopped. If the position
is no longer in the partition - its records were trimmed by retention (CURSOR_RECORD_EXPIRED /
SEQUENCE_OUT_OF_RANGE) - the
consumer moves to TRIM_HORIZON and counts it in `resets`; an explicit `start` that is out of range
is an error instead.

Other errors propagate from `poll()` / iteration, among them `BrokerUnavailable` when the broker
cannot be reached; the consumer stays usable and the next `poll()` goes on from the same position.

Order across scale events (UpdatePartitionCount): a key's records may move to another partition
when a stream is rescaled. Each partition's records after a scale event form a *segment* whose
*parents* are the partitions that held its keys before (DescribeStream: PartitionInfo.segments).
A consumer with an `app` follows the rule that keeps each key's records in order: it reads into
a segment only once every parent has been read to its end, as the app's checkpoints on the
parents show (a parent with no records before its end, or trimmed past it, counts as read). Until
then `poll()` returns [] (after a short wait) and the position stays at the segment's start. The
rule applies to segments from the consumer's first position on (a consumer that starts inside a
segment chose to). The consumer notices a new layout from GetRecords' `layout_ms` and describes
the stream again. `ordered=False` turns the rule off; without an app the consumer cannot know how
far the parents were read: pass `parents_done(partition, end_seq) -> bool` to apply it anyway.
GroupConsumer workers are PartitionConsumers with the group's app, so a group follows it too.

`AsyncPartitionConsumer` is the asyncio flavour, on `AsyncClient` (grpc.aio, no threads):
cancelling a task in `poll()` cancels the RPC and loses no records.
"""
from __future__ import annotations

import asyncio
import operator
import os
import queue
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable, Iterator

import grpc

from client.aio import AsyncClient, AsyncSubscription
from client.client import Client, Record, RecordsPage, Subscription
from client.errors import CURSOR_GONE, POSITION_GONE, BrokerUnavailable, SluiceError, make_error
from client.model import PartitionInfo, Segment, StreamDescription

StartPosition = str | tuple[str, int]
""""TRIM_HORIZON" | "LATEST" | ("AT_SEQUENCE_NUMBER", n) | ("AFTER_SEQUENCE_NUMBER", n) | ("AT_TIMESTAMP", ms)"""

APP_EXISTS = "APP_EXISTS"
# What creating the app may meet and go on: it exists, or the API key's role (consumer) may not
# create apps - then an admin made it, or the first checkpoint call says APP_NOT_FOUND.
APP_THERE = frozenset({APP_EXISTS, "PERMISSION_DENIED"})
# A refused Subscribe: the client address holds as many push subscriptions as the broker takes
# (--max-subscriptions-per-client, 64 by default). The partition is long-polled instead.
TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"


def _parse_start(start: StartPosition) -> tuple[str, int | None, int | None]:
    """(cursor_type, starting_seq, timestamp_ms)"""
    if start in ("TRIM_HORIZON", "LATEST"):
        return str(start), None, None
    if isinstance(start, tuple) and len(start) == 2 and isinstance(start[1], int):
        kind, value = start
        if kind in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
            return kind, value, None
        if kind == "AT_TIMESTAMP":
            return kind, None, value
    raise ValueError(f"bad start position {start!r}: use 'TRIM_HORIZON', 'LATEST', ('AT_SEQUENCE_NUMBER', n), "
                     f"('AFTER_SEQUENCE_NUMBER', n) or ('AT_TIMESTAMP', ms)")


_UINT32_MAX = 2**32 - 1   # the wire's limit fields; the broker caps them at its own maximum


def checked_batch(batch: object) -> int:
    return _checked("batch", batch, 1, "a positive integer (records per read)")


def _checked(name: str, value: object, least: int, what: str) -> int:
    """An integer argument within least..2^32-1 (any integer type, not a bool); else ValueError naming it."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None   # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or not least <= number <= _UINT32_MAX:
        raise ValueError(f"{name} must be {what}, not {value!r}")
    return number


def checked_wait(wait_ms: object) -> int:
    return _checked("wait_ms", wait_ms, 0, "a non-negative integer (milliseconds)")


def checked_mode_and_start(mode: str, start: StartPosition) -> tuple[str, int | None, int | None]:
    """The start position parsed (see _parse_start); ValueError for a mode or start position no
    consumer could use."""
    if mode not in ("pull", "push"):
        raise ValueError("mode must be 'pull' or 'push'")
    return _parse_start(start)


def checked_lease(lease_ms: object) -> int:
    return _checked("lease_ms", lease_ms, 1, "a positive integer (milliseconds)")


class _ConsumerState:
    """What both flavours share: the position, the unyielded records, and the error rules."""

    def __init__(self, stream: str, partition: int, app: str | None, start: StartPosition, mode: str,
                 wait_ms: int, batch: int) -> None:
        parsed_start = checked_mode_and_start(mode, start)
        # checked here, not at the first poll, where a bad one failed with protobuf's uint32 range error
        batch = checked_batch(batch)
        wait_ms = checked_wait(wait_ms)
        self.stream = stream
        self.partition = partition
        self.app = app
        self.mode = mode
        self.wait_ms = wait_ms
        self.batch = batch
        self._start = parsed_start
        self._next_seq: int | None = None   # next record to read, once known
        self._derived = False                # _next_seq came from progress or a checkpoint, not `start`
        self._opened = False
        self._buffer: deque[Record] = deque()   # fetched, not yet handed out (popleft: O(1))
        self.last_seq: int | None = None     # the last record handed out (poll() or iteration)
        self.committed: int | None = None    # the last checkpoint this consumer committed
        self.resets = 0                      # times the position had been trimmed away
        # the parent-before-child rule (module docstring)
        self._layout_ms = 0                  # the layout whose segments are known (0: never rescaled)
        self._segments: tuple[Segment, ...] = ()
        self._parents_first: dict[int, int] = {}    # parent -> its first retained seq when described
        self._parents_read: set[tuple[int, int]] = set()   # (parent, end) known read to its end
        self._rule_from: int | None = None   # the first position: the rule applies from here on

    @property
    def position(self) -> int | None:
        """The sequence number of the next record to read, if known yet."""
        return self._buffer[0].seq if self._buffer else self._next_seq

    def _spec(self) -> tuple[str, int | None, int | None]:
        if self._next_seq is not None:
            return "AT_SEQUENCE_NUMBER", self._next_seq, None
        return self._start

    def _advance(self, records: list[Record]) -> None:
        if records:
            self._next_seq = records[-1].seq + 1
            self._derived = True

    def _recoverable(self, exc: SluiceError) -> bool:
        """Adjust the position after `exc` so the next attempt can work; False: re-raise it."""
        if exc.reason in POSITION_GONE and (self._derived or self._start[0] in ("TRIM_HORIZON", "LATEST")):
            self._next_seq = None
            self._start = ("TRIM_HORIZON", None, None)
            self.resets += 1
            return True
        return exc.reason in CURSOR_GONE  # expired / no longer valid: same position, new cursor

    # -- the parent-before-child rule (module docstring): what needs no I/O ---------------------------

    def _learn(self, desc: StreamDescription, layout_ms: int) -> None:
        """A described stream (all partitions) for the layout of `layout_ms`."""
        self._parents_first = {p.partition_id: p.first_seq for p in desc.partitions}
        mine = [p for p in desc.partitions if p.partition_id == self.partition]
        self._segments = mine[0].segments if mine else ()
        self._layout_ms = layout_ms

    def _check_parents_from(self, first_position: int) -> None:
        if self._rule_from is None:
            self._rule_from = first_position

    def _parent_known_read(self, parent: int, end: int) -> bool:
        """Known read to its end: nothing before the end, trimmed past it, or seen so."""
        return end <= 0 or (parent, end) in self._parents_read or self._parents_first.get(parent, 0) >= end

    def _unknown_parents(self) -> Iterator[tuple[int, int]]:
        """The parents to ask about, segment by segment in order (the caller stops at the first
        that is not read yet: later segments wait for that one anyway)."""
        for segment in self._segments:
            if self._rule_from is not None and segment.start_seq < self._rule_from:
                continue   # the consumer started inside or after this segment
            for q, end in segment.parents:
                if not self._parent_known_read(q, end):
                    yield q, end

    def _limit(self) -> int | None:
        """The start of the first segment (from the first position on) with a parent not known
        read: records from there on wait. None: nothing waits."""
        for segment in self._segments:
            if self._rule_from is not None and segment.start_seq < self._rule_from:
                continue
            if not all(self._parent_known_read(q, end) for q, end in segment.parents):
                return segment.start_seq
        return None

    def _waits_at_start(self) -> bool:
        """Whether the position is at (or past) a segment that must wait."""
        position = self.position
        if position is None or not self._segments:
            return False
        self._check_parents_from(position)
        limit = self._limit()
        return limit is not None and position >= limit

    def _cut(self, records: list[Record]) -> list[Record]:
        """A fetched page cut at the first segment that must wait; the position moves to the cut."""
        limit = self._limit()
        if limit is None or records[-1].seq < limit:
            return records
        kept = [r for r in records if r.seq < limit]
        self._next_seq, self._derived = (kept[-1].seq + 1 if kept else records[0].seq), True
        return kept

    def _hand_out(self, records: list[Record]) -> list[Record]:
        if records:
            self.last_seq = records[-1].seq
        return records

    def _commit_seq(self, seq: int | None) -> int:
        if self.app is None:
            raise ValueError("commit() needs an app: PartitionConsumer(..., app=NAME)")
        seq = self.last_seq if seq is None else seq
        if seq is None:
            raise ValueError("nothing to commit: no record has been handed out yet")
        return seq


def _partition_info(desc: StreamDescription, partition: int) -> PartitionInfo:
    for info in desc.partitions:
        if info.partition_id == partition:
            return info
    raise make_error(grpc.StatusCode.NOT_FOUND, "PARTITION_NOT_FOUND", f"partition {partition} not found")


class PartitionConsumer(_ConsumerState):
    """Reads one partition in order; see the module docstring.

    `client_or_target`: a `Client` (shared, not closed here) or a "host:port" target (a new
    `Client` with `project`, `api_key`, `tls_ca`). `batch`:
    records per read at most; `wait_ms`: how long one `poll()` waits for records (long poll).
    Use from one thread (`close()` may be called from another).
    """

    def __init__(self, client_or_target: Client | str, stream: str, partition: int, *, app: str | None = None,
                 start: StartPosition = "TRIM_HORIZON", mode: str = "pull", wait_ms: int = 1000,
                 batch: int = 1000, project: str | None = None, api_key: str | None = None,
                 tls_ca: str | bytes | os.PathLike[str] | None = None, ordered: bool = True,
                 parents_done: Callable[[int, int], bool] | None = None) -> None:
        super().__init__(stream, partition, app, start, mode, wait_ms, batch)
        self._ordered = ordered and (app is not None or parents_done is not None)
        self._parents_done = parents_done
        self._own_client = isinstance(client_or_target, str)
        self._client = Client(client_or_target, project=project, api_key=api_key, tls_ca=tls_ca) \
            if isinstance(client_or_target, str) else client_or_target
        self._cursor: str | None = None
        self._closed = threading.Event()
        # push mode: a reader thread fills a one-page queue from one Subscription
        self._sub: Subscription | None = None
        self._reader: threading.Thread | None = None
        self._pages: queue.Queue[RecordsPage | BaseException | None] = queue.Queue(maxsize=1)   # None: closed
        self._reader_stop = threading.Event()

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._opened:
            return
        if self.app is not None:
            try:
                self._client.create_app(self.app)
            except SluiceError as exc:
                if exc.reason not in APP_THERE:
                    raise
            mark = self._client.get_checkpoint(self.app, self.stream, self.partition)
            if mark is not None:
                self._next_seq, self._derived = mark.seq + 1, True
        if self._next_seq is None and self._start[0] == "LATEST":
            # pin LATEST to a number, so a replaced cursor cannot skip what was written meanwhile
            desc = self._client.describe_stream(self.stream, start_after_partition=self.partition - 1
                                                if self.partition else None, limit=1)
            self._next_seq, self._derived = _partition_info(desc, self.partition).next_seq, True
        self._opened = True

    # -- reading -------------------------------------------------------------------------------

    def poll(self, wait_ms: int | None = None) -> list[Record]:
        """The next records in order (at most `batch`), waiting up to `wait_ms` (default: the
        consumer's) for some; [] if none came, or if `close()` was called meanwhile. They count as
        handed out: `commit()` commits the last."""
        if self._closed.is_set():
            raise RuntimeError("consumer is closed")
        try:
            return self._poll(wait_ms)
        except (SluiceError, ValueError):
            if self._closed.is_set():   # close() ended the call (an own client's channel: CANCELLED)
                return []
            raise

    def _poll(self, wait_ms: int | None) -> list[Record]:
        if self._buffer:
            records, self._buffer = list(self._buffer), deque()
            return self._hand_out(records)
        self._open()
        wait = self.wait_ms if wait_ms is None else checked_wait(wait_ms)
        if self._ordered and self._blocked():
            self._closed.wait(min(wait, 200) / 1000)   # a parent is still being read: look again soon
            return []
        for _ in range(4):
            try:
                records = self._fetch_pull(wait) if self.mode == "pull" else self._fetch_push(wait)
                if self._ordered and records:
                    records = self._gate(records)   # may ask the broker (parents' checkpoints)
            except BaseException as exc:
                # Nothing read is handed out: the next read starts at the position again. The cursor
                # or the subscription had moved past a page whose layout or parents could not be
                # looked up, and the next poll() went on after it (the page lost).
                self._cursor = None
                if self.mode == "push":
                    self._stop_reader()
                if not isinstance(exc, SluiceError) or self._closed.is_set() or not self._recoverable(exc):
                    raise
                continue
            self._advance(records)
            return self._hand_out(records)
        raise SluiceError(grpc.StatusCode.UNKNOWN, "", "could not position the consumer")

    def _fetch_pull(self, wait_ms: int) -> list[Record]:
        if self._cursor is None:
            kind, seq, ts = self._spec()
            self._cursor = self._client.get_cursor(self.stream, self.partition, kind, seq, ts)
        page = self._client.get_records(self._cursor, limit=self.batch, wait_ms=wait_ms)
        self._cursor = page.next_cursor
        self._seen_layout(page.layout_ms)
        return page.records

    # -- the parent-before-child rule (I/O half; the rules are _ConsumerState's) ---------------------

    def _seen_layout(self, layout_ms: int) -> None:
        if self._ordered and layout_ms != self._layout_ms:
            self._learn(self._client.describe_stream(self.stream, limit=1000), layout_ms)

    def _check_parents(self) -> None:
        for q, end in self._unknown_parents():
            if self._parents_done is not None:
                done = self._parents_done(q, end)
            else:
                mark = self._client.get_checkpoint(self.app, self.stream, q)  # type: ignore[arg-type]
                done = mark is not None and mark.seq >= end - 1
            if not done:
                return
            self._parents_read.add((q, end))

    def _blocked(self) -> bool:
        if self._waits_at_start():
            self._check_parents()
            return self._waits_at_start()
        return False

    def _gate(self, records: list[Record]) -> list[Record]:
        self._check_parents_from(records[0].seq)
        limit = self._limit()
        if limit is not None and records[-1].seq >= limit:   # ask only when the page reaches a wait
            self._check_parents()
        kept = self._cut(records)
        if len(kept) < len(records):
            self._cursor = None
            if self.mode == "push":
                self._stop_reader()   # it read past the cut: reopen from the position
        return kept

    def _fetch_push(self, wait_ms: int) -> list[Record]:
        if self._reader is None:
            kind, seq, ts = self._spec()
            self._reader_stop = threading.Event()
            self._pages = queue.Queue(maxsize=1)
            self._sub = self._client.subscription(self.stream, self.partition, kind, starting_seq=seq,
                                                  timestamp_ms=ts, max_records=self.batch)
            reader = threading.Thread(target=self._read_subscription, args=(self._sub, self._pages, self._reader_stop),
                                      name=f"sluice-push-{self.stream}-{self.partition}", daemon=True)
            reader.start()
            # started before it is seen: close() in another thread joins it, and a join of a thread
            # not started yet raises
            self._reader = reader
        try:
            item = self._pages.get(timeout=wait_ms / 1000)
        except queue.Empty:
            return []
        if item is None:   # close() woke us
            return []
        if isinstance(item, BaseException):
            self._stop_reader()      # everything before the error was handed out: reopen from here
            if isinstance(item, SluiceError) and item.reason == TOO_MANY_REQUESTS:
                self.mode = "pull"   # one subscription too many for the broker: poll from here on
                return self._fetch_pull(wait_ms)
            raise item
        self._seen_layout(item.layout_ms)
        return item.records

    @staticmethod
    def _read_subscription(sub: Subscription, pages: queue.Queue[RecordsPage | BaseException | None],
                           stop: threading.Event) -> None:
        def put(item: RecordsPage | BaseException) -> None:
            while not stop.is_set():
                try:
                    pages.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            for page in sub:
                if page.records:   # empty pages are the broker's heartbeats
                    put(page)
                if stop.is_set():
                    return
            if not stop.is_set():
                put(BrokerUnavailable(grpc.StatusCode.UNAVAILABLE, "", "subscription ended"))
        except SluiceError as exc:
            put(exc)
        except BaseException as exc:  # never die silently: hand it to poll()
            put(exc)

    def _stop_reader(self) -> None:
        self._reader_stop.set()
        # read once: close() in another thread may stop the reader (and clear these) meanwhile
        sub, reader = self._sub, self._reader
        if sub is not None:
            sub.cancel()
        if reader is not None and reader is not threading.current_thread():
            reader.join(5)
        self._reader = None
        self._sub = None

    def iterate(self, idle_timeout: float | None = None) -> Iterator[Record]:
        """Records one by one, in order. Ends after `idle_timeout` seconds without a record (None:
        never; then it ends only when the consumer is closed). Breaking out loses nothing: the
        rest of a fetched page comes first on the next poll()/iterate()."""
        idle_since = time.monotonic()
        while not self._closed.is_set():
            if not self._buffer:
                wait = self.wait_ms
                if idle_timeout is not None:
                    left = idle_timeout - (time.monotonic() - idle_since)
                    if left <= 0:
                        return
                    wait = max(1, min(wait, int(left * 1000)))
                try:
                    fetched = self.poll(wait)
                except SluiceError:
                    if self._closed.is_set():
                        return
                    raise
                self._buffer.extendleft(reversed(fetched))
                if not self._buffer:
                    continue
            idle_since = time.monotonic()
            record = self._buffer.popleft()
            self.last_seq = record.seq
            yield record

    def __iter__(self) -> Iterator[Record]:
        return self.iterate()

    # -- checkpoints and lifecycle ------------------------------------------------------------

    def commit(self, seq: int | None = None) -> int:
        """Commit the app's checkpoint: `seq`, or the last record handed out. Returns it."""
        seq = self._commit_seq(seq)
        self._client.commit_checkpoint(self.app, self.stream, self.partition, seq)  # type: ignore[arg-type]
        self.committed = seq
        return seq

    def close(self) -> None:
        """Stop reading (a push subscription is cancelled). Safe from another thread."""
        self._closed.set()
        self._stop_reader()
        try:   # a poll() waiting for a page would wait out its whole wait_ms
            self._pages.put_nowait(None)
        except queue.Full:   # a page is there: a waiting poll() takes it
            pass
        if self._own_client:
            self._client.close()

    def __enter__(self) -> PartitionConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPartitionConsumer(_ConsumerState):
    """The asyncio flavour of `PartitionConsumer` (same arguments): `async for record in consumer`,
    `await consumer.poll()`, `await consumer.commit()`, `await consumer.close()` or `async with`.
    `client_or_target`: an `AsyncClient` (shared, not closed here) or a "host:port" target (then
    `project`, `timeout`, `api_key` and `tls_ca` are the new client's). Create it inside the event loop."""

    def __init__(self, client_or_target: AsyncClient | str, stream: str, partition: int, *, app: str | None = None,
                 start: StartPosition = "TRIM_HORIZON", mode: str = "pull", wait_ms: int = 1000,
                 batch: int = 1000, timeout: float = 30.0, project: str | None = None, api_key: str | None = None,
                 tls_ca: str | bytes | os.PathLike[str] | None = None, ordered: bool = True,
                 parents_done: Callable[[int, int], bool] | None = None) -> None:
        super().__init__(stream, partition, app, start, mode, wait_ms, batch)
        self._ordered = ordered and (app is not None or parents_done is not None)
        self._parents_done = parents_done
        self._own_client = isinstance(client_or_target, str)
        self._client = AsyncClient(client_or_target, project=project, timeout=timeout, api_key=api_key,
                                   tls_ca=tls_ca) if isinstance(client_or_target, str) else client_or_target
        self._cursor: str | None = None
        self._closed = False
        self._sub: AsyncSubscription | None = None   # push: the Subscribe call
        self._reader: asyncio.Task[None] | None = None
        self._pages: asyncio.Queue[RecordsPage | BaseException | None] | None = None   # None in it: closed

    async def _open(self) -> None:
        if self._opened:
            return
        if self.app is not None:
            try:
                await self._client.create_app(self.app)
            except SluiceError as exc:
                if exc.reason not in APP_THERE:
                    raise
            mark = await self._client.get_checkpoint(self.app, self.stream, self.partition)
            if mark is not None:
                self._next_seq, self._derived = mark.seq + 1, True
        if self._next_seq is None and self._start[0] == "LATEST":
            desc = await self._client.describe_stream(self.stream, start_after_partition=self.partition - 1
                                                      if self.partition else None, limit=1)
            self._next_seq, self._derived = _partition_info(desc, self.partition).next_seq, True
        self._opened = True

    async def poll(self, wait_ms: int | None = None) -> list[Record]:
        """See `PartitionConsumer.poll`. Cancelling it loses no records."""
        if self._closed:
            raise RuntimeError("consumer is closed")
        try:
            return await self._poll(wait_ms)
        except (SluiceError, ValueError):
            if self._closed:
                return []
            raise
        except asyncio.CancelledError:
            # grpc.aio raises it from a call whose channel close() closed: not this task's cancellation
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                return []
            raise

    async def _poll(self, wait_ms: int | None) -> list[Record]:
        if self._buffer:
            records, self._buffer = list(self._buffer), deque()
            return self._hand_out(records)
        await self._open()
        wait = self.wait_ms if wait_ms is None else checked_wait(wait_ms)
        if self._ordered and self._waits_at_start():
            await self._check_parents()
            if self._waits_at_start():
                await asyncio.sleep(min(wait, 200) / 1000)   # a parent is still being read: look again soon
                return []
        for _ in range(4):
            try:
                records = await (self._fetch_pull(wait) if self.mode == "pull" else self._fetch_push(wait))
                if self._ordered and records:
                    records = await self._gate(records)   # may ask the broker (parents' checkpoints)
            except BaseException as exc:   # a cancellation too: nothing read is handed out (see PartitionConsumer)
                self._cursor = None
                if self.mode == "push":
                    await self._stop_reader()
                if not isinstance(exc, SluiceError) or self._closed or not self._recoverable(exc):
                    raise
                continue
            self._advance(records)
            return self._hand_out(records)
        raise SluiceError(grpc.StatusCode.UNKNOWN, "", "could not position the consumer")

    async def _fetch_pull(self, wait_ms: int) -> list[Record]:
        if self._cursor is None:
            kind, seq, ts = self._spec()
            self._cursor = await self._client.get_cursor(self.stream, self.partition, kind, seq, ts)
        page = await self._client.get_records(self._cursor, limit=self.batch, wait_ms=wait_ms)
        self._cursor = page.next_cursor
        await self._seen_layout(page.layout_ms)
        return page.records

    async def _seen_layout(self, layout_ms: int) -> None:
        if self._ordered and layout_ms != self._layout_ms:
            self._learn(await self._client.describe_stream(self.stream, limit=1000), layout_ms)

    async def _check_parents(self) -> None:
        for q, end in list(self._unknown_parents()):
            if self._parents_done is not None:
                done = self._parents_done(q, end)
            else:
                mark = await self._client.get_checkpoint(self.app, self.stream, q)  # type: ignore[arg-type]
                done = mark is not None and mark.seq >= end - 1
            if not done:
                return
            self._parents_read.add((q, end))

    async def _gate(self, records: list[Record]) -> list[Record]:
        self._check_parents_from(records[0].seq)
        limit = self._limit()
        if limit is not None and records[-1].seq >= limit:   # ask only when the page reaches a wait
            await self._check_parents()
        kept = self._cut(records)
        if len(kept) < len(records):
            self._cursor = None
            if self.mode == "push":
                await self._stop_reader()   # it read past the cut: reopen from the position
        return kept

    async def _fetch_push(self, wait_ms: int) -> list[Record]:
        if self._reader is None:
            kind, seq, ts = self._spec()
            self._pages = asyncio.Queue(maxsize=1)
            self._sub = self._client.subscribe(self.stream, self.partition, kind, starting_seq=seq, timestamp_ms=ts,
                                               max_records=self.batch)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._sub, self._pages))
        assert self._pages is not None
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that arrives
            # as a page does
            async with asyncio.timeout(wait_ms / 1000):
                item = await self._pages.get()
        except TimeoutError:
            return []
        if item is None:   # close() woke us
            return []
        if isinstance(item, BaseException):
            await self._stop_reader()
            if isinstance(item, SluiceError) and item.reason == TOO_MANY_REQUESTS:
                self.mode = "pull"   # one subscription too many for the broker: poll from here on
                return await self._fetch_pull(wait_ms)
            raise item
        await self._seen_layout(item.layout_ms)
        return item.records

    @staticmethod
    async def _read(sub: AsyncSubscription, pages: asyncio.Queue[RecordsPage | BaseException | None]) -> None:
        try:
            async for page in sub:
                if page.records:   # empty pages are the broker's heartbeats
                    await pages.put(page)
            await pages.put(BrokerUnavailable(grpc.StatusCode.UNAVAILABLE, "", "subscription ended"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # SluiceError and anything else: poll() raises it
            await pages.put(exc)

    async def _stop_reader(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._reader = None
        self._sub = None

    async def iterate(self, idle_timeout: float | None = None) -> AsyncIterator[Record]:
        """See `PartitionConsumer.iterate`."""
        idle_since = time.monotonic()
        while not self._closed:
            if not self._buffer:
                wait = self.wait_ms
                if idle_timeout is not None:
                    left = idle_timeout - (time.monotonic() - idle_since)
                    if left <= 0:
                        return
                    wait = max(1, min(wait, int(left * 1000)))
                self._buffer.extendleft(reversed(await self.poll(wait)))
                if not self._buffer:
                    continue
            idle_since = time.monotonic()
            record = self._buffer.popleft()
            self.last_seq = record.seq
            yield record

    def __aiter__(self) -> AsyncIterator[Record]:
        return self.iterate()

    async def commit(self, seq: int | None = None) -> int:
        """See `PartitionConsumer.commit`."""
        seq = self._commit_seq(seq)
        await self._client.commit_checkpoint(self.app, self.stream, self.partition, seq)  # type: ignore[arg-type]
        self.committed = seq
        return seq

    async def close(self) -> None:
        self._closed = True
        await self._stop_reader()
        if self._pages is not None:
            try:   # a poll() waiting for a page would wait out its whole wait_ms
                self._pages.put_nowait(None)
            except asyncio.QueueFull:   # a page is there: a waiting poll() takes it
                pass
        if self._own_client:
            await self._client.close()

    async def __aenter__(self) -> AsyncPartitionConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
