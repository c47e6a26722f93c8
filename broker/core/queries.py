"""Running streaming SQL queries over the log (the Timeplus door's `/queries`; any door may use it).

A query is compiled once (broker/query: sqlglot -> Polars), then one task runs it: it reads the
stream's partitions through the core's read path - push subscriptions for a streaming query, a
snapshot scan for `table(s)` - feeds each batch of records to the query's executor, and puts the
result rows on a bounded queue that the door drains. Nothing here knows HTTP.

Flow control: the result queue holds at most `RESULT_QUEUE` batches and each partition reader
hands over one batch at a time, so a consumer that stops reading stops the readers (a
subscription reads only when asked), and memory stays bounded; the door drops a consumer that
stalls past its timeout, which cancels the query.

Lifecycle: a query ends `finished` (a bounded scan done, LIMIT reached, the broker shutting
down), `canceled` (cancel, delete, the consumer went away) or `failed` (its stream was deleted, an
evaluation error) with a message. Ended queries stay listable until deleted; the oldest are
forgotten beyond `KEEP_ENDED` per project.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

from broker.core.catalogue import StreamCatalogue
from broker.core.limits import check_text
from broker.core.reads import ReadPath
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import ColumnDef, GetRecordsResult, Record, RecordBlock, ScaleEvent, StreamConfig
from broker.query import EVALUATION_ERRORS, QueryPlan, compile_query
from broker.rows.schema import columns_of
from broker.storage.base import Store

log = logging.getLogger(__name__)

RESULT_QUEUE = 16              # result batches buffered for a slow consumer before readers wait
# rows per result batch at most: a scan's 50,000-row blocks went into the queue whole, so a reader
# that stopped reading had the broker hold 16 of them (+1.1 GB for ten such readers; the probe)
RESULT_ROWS = 4096
MAX_RUNNING = 64               # [ours] running queries per broker: each holds subscriptions and state
MAX_RUNNING_PER_CLIENT = MAX_RUNNING // 2   # [ours] one client's share: the rest stays for others
KEEP_ENDED = 100               # ended queries kept per project for list/get
KEEP_ENDED_TOTAL = 1_000       # and in all (an ended query keeps its text, header and final metrics)
TICK_S = 0.5                   # how often a streaming query's executor is ticked: a global aggregation
                               # emits its running result every 2 s (exec.py keeps that clock)
_READ_LIMIT = 10_000           # records per subscription batch
# A scan reads blocks of up to 50,000 records / 16 MiB: Polars parses a block that big on all
# cores (a 10,000-record one on one), and two blocks in flight stay a few tens of MiB.
_SCAN_RECORDS = 50_000
_SCAN_BYTES = 16 * 1024 * 1024
_THREAD_ROWS = 2_000           # batches bigger than this are evaluated off the event loop
_MIN_READ = 500                # records per read at least, however many windows a row is in
END = None                     # the result queue's last item
INLINE_SQL_CHARS = 4096        # longer SQL is compiled off the event loop (~4 KiB: a few ms)
MAX_TAGS = 32                  # [ours] a query's tags: kept with it until it is forgotten (KEEP_ENDED_TOTAL)


def _records_per_read(plan: QueryPlan, records: int) -> int:
    """`records` per read, over the windows a row of the query is in: a hop(s, 1ms, 1s) row is in
    1000, so a 50,000-record scan block was 50M (row, window) pairs, and the state bound, the
    output and a cancel act only between blocks: such a block ran minutes after its query was
    cancelled, its state past 500,000 groups to several GB (the SQL probe)."""
    window = plan.window
    if window is None:
        return records
    # at least _MIN_READ: smaller blocks cost more per record than they save (50-record blocks
    # of hop(s, 1ms, 1s) scanned 6x slower than 500-record ones, which are 500,000 pairs)
    return min(records, max(_MIN_READ, records // -(-window.size_ms // window.step_ms)))


def _labels(name: object, description: object, tags: object) -> tuple[str, str, list[str]]:
    """A query's name, description (None: "") and tags (None: none), checked: short texts
    (limits.check_text), at most MAX_TAGS tags. Raises INVALID_REQUEST."""
    tags = [] if tags is None else tags
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"tags must be a list of at most {MAX_TAGS} strings")
    return (check_text("name", "" if name is None else name),
            check_text("description", "" if description is None else description),
            [check_text(f"tags[{i}]", tag) for i, tag in enumerate(tags)])


@dataclass
class QueryRun:
    """One query: what list/get report, and the queue its results come out of."""
    id: str
    project: str
    sql: str
    plan: QueryPlan
    name: str = ""
    description: str = ""
    tags: list[str] = field(default_factory=list)
    status: str = "running"
    message: str = ""
    start_ms: int = 0
    end_ms: int = 0
    rows_out: int = 0
    results: asyncio.Queue[list[list[Any]] | None] = field(default_factory=lambda: asyncio.Queue(RESULT_QUEUE))
    task: asyncio.Task[None] | None = None
    executor: Any = None       # None once ended and released: only `final` is kept
    raw: bool = False          # a stream without a schema: records are seen as one `raw` column
    client: str = ""           # who started it (the door's peer address), for MAX_RUNNING_PER_CLIENT
    final: dict[str, Any] | None = None   # the metrics at release

    @property
    def running(self) -> bool:
        return self.status == "running"

    def end(self, status: str, message: str = "") -> None:
        if self.running:
            self.status, self.message, self.end_ms = status, message, int(time.time() * 1000)

    def metrics(self) -> dict[str, Any]:
        """The `metrics` event (shared/spec/timeplus-api.md section 5)."""
        ex = self.executor
        if ex is None:
            return dict(self.final or {})
        elapsed_ms = max((self.end_ms or int(time.time() * 1000)) - self.start_ms, 1)
        return {"count": self.rows_out, "eps": round(self.rows_out * 1000 / elapsed_ms, 1),
                "processing_time": elapsed_ms, "last_event_time": ex.last_event_time_ms,
                "response_time": elapsed_ms, "scanned_rows": ex.scanned_rows, "scanned_bytes": ex.scanned_bytes,
                "late_rows": ex.late_rows, "skipped_rows": ex.skipped_rows}

    @property
    def done_with(self) -> bool:
        """Ended, and its consumer has taken END (or let go): nothing of it is waited for."""
        return not self.running and self.results.empty()

    def release(self) -> None:
        """Its consumer is done (the consumer calls it): drop the results not read and the
        executor's state, keep the final metrics (an ended query stays listable)."""
        if not self.running and self.executor is not None:
            self.final = self.metrics()
            self.executor = None
            # what list/get show (header, analysis, time columns) stays; the compiled expressions
            # go (~850 kB for an 8 KB query of 500 expressions; the review)
            self.plan = replace(self.plan, columns={}, where=None, outputs=[], window=None, keys=[], aggregates=[],
                                having=None)
            while not self.results.empty():
                self.results.get_nowait()


class Queries:
    def __init__(self, catalogue: StreamCatalogue, reads: ReadPath, store: Store,
                 clock_ms: Callable[[], int], known: Callable[[str, str], Awaitable[None]] | None = None) -> None:
        """`known(project, stream_name)`: lets the catalogue look up a name it does not know (a
        shared store: created through another broker a moment ago) before a query answers
        STREAM_NOT_FOUND."""
        self._catalogue = catalogue
        self._known = known
        self._store = store
        self._reads = reads
        self._now = clock_ms
        self._runs: OrderedDict[str, QueryRun] = OrderedDict()   # id -> run, oldest first (every project)
        self._closed = False

    def compile(self, project: str, sql: object, missing: list[str] | None = None) -> QueryPlan:
        """Parse and check a query against the project's streams. Raises SQL_SYNTAX,
        UNKNOWN_COLUMN, UNKNOWN_FUNCTION, TYPE_MISMATCH, UNSUPPORTED_SQL, ILLEGAL_DIVISION, STREAM_NOT_FOUND
        (the names not found are added to `missing`)."""
        if not isinstance(sql, str) or not sql.strip():
            raise client_error(ErrorCode.INVALID_REQUEST, detail="sql must be a non-empty string")

        def lookup(stream_name: str) -> tuple[ColumnDef, ...]:
            if missing is not None and self._catalogue.lookup(project, stream_name) is None:
                missing.append(stream_name)
            return columns_of(self._catalogue.get(project, stream_name).schema)
        return compile_query(sql, lookup)

    async def compile_known(self, project: str, sql: object) -> QueryPlan:
        """`compile`, once more after the catalogue has looked up in a shared store the streams it
        did not know (created through another broker a moment ago). Raises what compile raises."""
        missing: list[str] = []
        try:
            return await self._compiled(project, sql, missing)
        except BrokerError as exc:
            if exc.code is not ErrorCode.STREAM_NOT_FOUND or not missing or self._known is None:
                raise
        for stream_name in missing:
            await self._known(project, stream_name)
        return await self._compiled(project, sql)

    async def _compiled(self, project: str, sql: object, missing: list[str] | None = None) -> QueryPlan:
        """`compile`; SQL past INLINE_SQL_CHARS off the event loop: 50 KiB of select items took
        ~0.5-1 s to parse and compile, every door of the broker waiting behind it."""
        if isinstance(sql, str) and len(sql) > INLINE_SQL_CHARS:
            return await asyncio.to_thread(self.compile, project, sql, missing)
        return self.compile(project, sql, missing)

    async def start(self, project: str, sql: object, name: object = "", description: object = "",
                    tags: object = None, client: str = "") -> QueryRun:
        """Compile and start a query; its results come out of `run.results` (END last). `client`:
        the peer that asks (one may run MAX_RUNNING_PER_CLIENT of the MAX_RUNNING at once).
        Raises INVALID_REQUEST (_labels), what compile raises, TOO_MANY_QUERIES, UNAVAILABLE
        (shutting down)."""
        name, description, tags = _labels(name, description, tags)
        plan = await self.compile_known(project, sql)
        if self._closed:
            raise BrokerError(ErrorCode.UNAVAILABLE, detail="broker is shutting down")
        running = sum(r.running for r in self._runs.values())
        if running >= MAX_RUNNING:
            raise client_error(ErrorCode.TOO_MANY_QUERIES, detail=f"at most {MAX_RUNNING} queries run at once")
        if client and sum(r.running and r.client == client for r in self._runs.values()) >= MAX_RUNNING_PER_CLIENT:
            raise client_error(ErrorCode.TOO_MANY_QUERIES,
                               detail=f"at most {MAX_RUNNING_PER_CLIENT} queries of one client run at once")
        if not plan.stream:   # `select 1`: one row, no stream
            run = QueryRun(str(uuid.uuid4()), project, str(sql), plan, name, description, list(tags or []),
                           start_ms=self._now(), executor=plan.executor(), client=client)
            self._remember(run)
            run.task = asyncio.create_task(self._run(run, [], [], None), name=f"query {run.id}")
            return run
        config = self._catalogue.get(project, plan.stream)
        run = QueryRun(str(uuid.uuid4()), project, str(sql), plan, name, description, list(tags or []),
                       start_ms=self._now(), executor=plan.executor(), raw=config.schema is None, client=client)
        # its slot is taken before the first await, so starts racing each other all count it
        self._remember(run)
        try:
            # the readers start where the query says, before anything else can be written
            readable = range(config.readable_partition_count)
            cursors = [await self._cursor(project, config.stream_name, p, plan) for p in readable]
            ends = None
            if plan.bounded or plan.seek_ms is not None:
                ends = [(await self._store.fresh_bounds(config.stream_id, p)).next_seq   # incl. other brokers' writes
                        for p in range(config.readable_partition_count)]
        except BaseException:
            self._runs.pop(run.id, None)   # never started: not a query to list
            raise
        if not run.running:   # ended meanwhile (the broker shutting down): nothing to run
            run.results.put_nowait(END)
            return run
        if plan.bounded:
            task = self._run(run, cursors, ends, config)
        else:   # a replay (seek_to): the partitions with records to replay hold the watermark back
            backlog = {p: end for p, end in enumerate(ends or []) if end > (self._reads.cursor_seq(cursors[p]) or 0)}
            task = self._run(run, cursors, None, config, backlog)
        run.task = asyncio.create_task(task, name=f"query {run.id}")
        return run

    def _remember(self, run: QueryRun) -> None:
        """Keep `run`, and forget the oldest ended queries past KEEP_ENDED of its project (and
        KEEP_ENDED_TOTAL in all): only those whose consumer is done with them. A consumer still
        reading an ended query's results lost them and never saw its end (the probe: another
        tenant's 101 queries ended a scan's stream 15,882 rows into 60,000)."""
        self._runs[run.id] = run
        ended = [qid for qid, r in self._runs.items() if not r.running and r.project == run.project]
        self._forget(ended[:max(len(ended) - KEEP_ENDED, 0)])
        ended = [qid for qid, r in self._runs.items() if not r.running]
        self._forget(ended[:max(len(ended) - KEEP_ENDED_TOTAL, 0)])

    def _forget(self, ids: list[str]) -> None:
        for qid in ids:
            if self._runs[qid].done_with:
                self._runs.pop(qid).release()

    async def _cursor(self, project: str, stream_name: str, partition: int, plan: QueryPlan) -> str:
        """Where a partition's reading starts: `table(s)` and seek_to='earliest' at the oldest
        record, seek_to a time at the first record appended at or after it (at the oldest when
        the time is before anything retained), else after the newest."""
        if plan.bounded or plan.seek_ms == 0:
            return await self._reads.get_cursor(project, stream_name, partition, "TRIM_HORIZON")
        if plan.seek_ms is not None:
            try:
                return await self._reads.get_cursor(project, stream_name, partition, "AT_TIMESTAMP", None,
                                                    plan.seek_ms)
            except BrokerError as exc:
                if exc.code is not ErrorCode.TIMESTAMP_EXPIRED:
                    raise
                return await self._reads.get_cursor(project, stream_name, partition, "TRIM_HORIZON")
        return await self._reads.get_cursor(project, stream_name, partition, "LATEST")

    def get(self, project: str, query_id: str) -> QueryRun:
        run = self._runs.get(query_id)
        if run is None or run.project != project:
            raise client_error(ErrorCode.QUERY_NOT_FOUND, query_id=query_id)
        return run

    def running(self) -> int:
        """How many queries of every project are running (for metrics)."""
        return sum(1 for r in self._runs.values() if r.running)

    def runs(self, project: str) -> list[QueryRun]:
        return [r for r in self._runs.values() if r.project == project]

    async def cancel(self, project: str, query_id: str, forget: bool = False) -> None:
        """Stop a running query (its results end; a no-op on an ended one); `forget`: and
        delete it."""
        run = self.get(project, query_id)
        run.end("canceled")
        await self._stop(run)
        if forget:   # a consumer still reading gets what is queued, then END: it releases the run
            self._runs.pop(query_id, None)
            if run.done_with:
                run.release()

    def shutdown(self) -> None:
        """Refuse new queries and end every running one: its consumer sees its results end now,
        not when the HTTP server's grace period runs out."""
        self._closed = True
        for run in self._runs.values():
            if run.running:
                # a streaming query never completes anyway; a scan cut short did not
                run.end("canceled" if run.plan.bounded else "finished", "broker is shutting down")
                if run.task is not None:
                    run.task.cancel()

    async def close(self) -> None:
        self.shutdown()
        for run in list(self._runs.values()):
            await self._stop(run)

    @staticmethod
    async def _stop(run: QueryRun) -> None:
        task = run.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the query task ------------------------------------------------------------------------

    async def _run(self, run: QueryRun, cursors: list[str], ends: list[int] | None,
                   config: StreamConfig | None, backlog: dict[int, int] | None = None) -> None:
        """`ends`: a bounded scan's, where each partition stopped when the query began;
        `backlog`: a replay's, where each partition with records to replay stopped then."""
        delivered = False
        try:
            if ends is not None:
                await self._scan(run, cursors, ends)
                await self._emit(run, run.executor.finish())
            else:
                await self._follow(run, cursors, config, backlog or {})
            run.end("finished")
            await run.results.put(END)   # after every result row: a slow consumer gets them all
            delivered = True
        except asyncio.CancelledError:
            run.end("canceled")
        except BrokerError as exc:
            # the read path names a deleted stream by its id; the query knows its name
            gone = exc.code is ErrorCode.STREAM_NOT_FOUND and run.plan.stream
            run.end("failed", f"Stream [{run.plan.stream}] was deleted" if gone else exc.message)
        except EVALUATION_ERRORS as exc:   # a bug in evaluation: the query fails, the broker goes on
            log.exception("query %s failed", run.id)
            run.end("failed", f"internal error: {type(exc).__name__}")
        finally:
            if not delivered:
                # cut short: END must reach the consumer even if it stopped reading and the
                # queue is full; what it did not read is dropped, and its status says why
                while run.results.full():
                    run.results.get_nowait()
                run.results.put_nowait(END)

    async def _emit(self, run: QueryRun, rows: list[list[Any]]) -> None:
        if rows:
            if run.plan.limit is not None:
                rows = rows[:max(run.plan.limit - run.rows_out, 0)]
            run.rows_out += len(rows)
            for at in range(0, len(rows), RESULT_ROWS):
                await run.results.put(rows[at:at + RESULT_ROWS] if len(rows) > RESULT_ROWS else rows)

    async def _feed(self, run: QueryRun, records: list[Record], source: int, caught_up: bool) -> None:
        ex, raw = run.executor, run.raw
        # off the event loop when the work is big (Polars releases the GIL): a large batch, or
        # any batch of an aggregation (its merge grows with its state); a small projection stays
        # inline, where a thread hop would cost more than it (the trickle path)
        if len(records) > _THREAD_ROWS or run.plan.aggregating:
            rows = await asyncio.to_thread(ex.feed, records, raw, source, caught_up)
        else:
            rows = ex.feed(records, raw, source, caught_up)
        await self._emit(run, rows)

    async def _tick(self, run: QueryRun) -> None:
        if run.plan.aggregating:
            await self._emit(run, await asyncio.to_thread(run.executor.tick, self._now()))

    def _limit_reached(self, run: QueryRun) -> bool:
        return run.executor.done or (run.plan.limit is not None and run.rows_out >= run.plan.limit)

    async def _scan(self, run: QueryRun, cursors: list[str], ends: list[int]) -> None:
        """`table(s)`: every record stored when the query started, partition after partition,
        read as columns (no object per record). The next read runs while a block is evaluated:
        both run off the event loop and mostly without the GIL (RocksDB, Polars), so on two
        cores they overlap."""
        records = _records_per_read(run.plan, _SCAN_RECORDS)
        for cursor, end in zip(cursors, ends):
            fetch = asyncio.ensure_future(self._reads.read_block(run.project, cursor, records, _SCAN_BYTES, end))
            try:
                while True:
                    block, cursor = await fetch
                    last = not block.data or block.next_seq >= end
                    if not last:
                        fetch = asyncio.ensure_future(
                            self._reads.read_block(run.project, cursor, records, _SCAN_BYTES, end))
                    if block.data:   # none written after the query started: read_block stops at end
                        await self._evaluate(run, block)
                        if self._limit_reached(run):
                            return
                    if last:
                        break
            finally:
                fetch.cancel()

    async def _evaluate(self, run: QueryRun, block: RecordBlock) -> None:
        rows = await asyncio.to_thread(run.executor.feed_block, block, run.raw)
        await self._emit(run, rows)

    async def _follow(self, run: QueryRun, cursors: list[str], config: StreamConfig | None,
                      backlog: dict[int, int]) -> None:
        """A streaming query: one subscription per partition feeding one evaluation loop.
        `backlog`: in a replay, partition -> the seq its replay ends at (its next_seq when the
        query began): until a partition has been read that far, it holds the watermark back; each
        partition also holds it while it delivers (exec.py), so the partitions' readers racing one
        another do not make rows late.
        `cursors` start partitions 0..len-1 of `config`, the stream as the query started. The
        stream may be scaled while the query runs (UpdatePartitionCount): a partition it gains
        then gets a reader too, from its first record after the event (see _gained) - else the
        rows a typed ingest spreads over it would never reach the query. Checked when a batch
        says the layout changed (layout_ms) and on every tick (a batch may never come: rows may
        go to the new partitions only), so per batch, not per record."""
        inbox: asyncio.Queue[tuple[int, GetRecordsResult] | BaseException | None] = asyncio.Queue(len(cursors))

        async def read(partition: int, cursor: str) -> None:
            batches = self._reads.subscribe(run.project, cursor, _records_per_read(run.plan, _READ_LIMIT), 0)
            try:
                async with contextlib.aclosing(batches):
                    async for batch in batches:
                        if batch.records:
                            await inbox.put((partition, batch))
            except BrokerError as exc:
                await inbox.put(exc)
            await inbox.put(None)

        for p in range(len(cursors)):   # each partition holds the watermark back (exec.py)
            if p in backlog:
                run.executor.hold(p)
            run.executor.follow(p)
        readers = [asyncio.create_task(read(p, c)) for p, c in enumerate(cursors)]
        open_readers = len(readers)
        # the latest scale event the readers account for (None: none yet), and its time
        known = config.scale_events[-1] if config is not None and config.scale_events else None
        layout_ms = known.timestamp_ms if known is not None else 0

        async def follow_new_partitions() -> None:
            nonlocal known, layout_ms, open_readers
            now = self._catalogue.by_id(config.stream_id) if config is not None else None
            if now is None or not now.scale_events or now.scale_events[-1] == known:
                return   # deleted (the readers report that) or not scaled since
            for p, seq in _gained(now, known, len(readers)):
                if self._catalogue.by_id(now.stream_id) is None:   # checked with no await before
                    return                                          # get_cursor looks the name up
                cursor = await self._cursor_at(run.project, now.stream_name, p, seq)
                run.executor.follow(p)
                readers.append(asyncio.create_task(read(p, cursor)))
                open_readers += 1
            known, layout_ms = now.scale_events[-1], now.scale_events[-1].timestamp_ms

        loop = asyncio.get_running_loop()
        next_tick = loop.time() + TICK_S
        try:
            while open_readers and not self._limit_reached(run):
                if loop.time() >= next_tick:
                    next_tick = loop.time() + TICK_S
                    await follow_new_partitions()
                    await self._tick(run)
                    continue
                try:
                    async with asyncio.timeout(max(next_tick - loop.time(), 0)):   # not wait_for: see reads._fetch
                        item = await inbox.get()
                except TimeoutError:
                    continue
                if item is None:
                    open_readers -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    p, batch = item
                    if batch.layout_ms != layout_ms:
                        await follow_new_partitions()
                    caught_up = p in backlog and batch.records[-1].seq + 1 >= backlog[p]
                    if caught_up:
                        del backlog[p]
                    await self._feed(run, batch.records, p, caught_up)
        finally:
            for task in readers:
                task.cancel()
            for task in readers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _cursor_at(self, project: str, stream_name: str, partition: int, seq: int) -> str:
        """A cursor at `seq` of the partition; at its oldest record if `seq` has been trimmed
        already (retention went past it while the query ran)."""
        try:
            return await self._reads.get_cursor(project, stream_name, partition, "AT_SEQUENCE_NUMBER", seq)
        except BrokerError as exc:
            if exc.code is not ErrorCode.SEQUENCE_OUT_OF_RANGE:
                raise
            return await self._reads.get_cursor(project, stream_name, partition, "TRIM_HORIZON")


def _gained(config: StreamConfig, known: ScaleEvent | None, followed: int) -> list[tuple[int, int]]:
    """The partitions of `config` beyond the `followed` ones (0..followed-1, as of scale event
    `known`; None: before any) that the scale events after `known` made readable, each with the
    seq its records start at: its boundary in the first of those events that made it ACTIVE -
    0 for a new partition, its next_seq then for one a scale-down had closed before (or whose
    closing event has aged out of the history; its numbering goes on). Its records before that
    boundary were written before the query's layout `known` (it was not readable then), so
    before anything the query reads.
    A partition that was readable at `known` is followed already: a reader on a partition a
    scale-down closes just waits, and gets its rows again if a scale-up reopens it."""
    events = config.scale_events
    newer = events[events.index(known) + 1:] if known in events else events   # aged out: all are newer
    out = []
    for p in range(followed, config.readable_partition_count):
        made = next((e for e in newer if e.target_partition_count > p), None)
        out.append((p, made.boundaries[p] if made is not None else 0))
    return out
