"""Queries in-process (broker/core/queries.py) over a real RocksStore: a slow consumer gets every
row of a bounded scan, LIMIT ends streaming queries however their rows come, ended queries let
go of their state, and typed rows go only to the stream they were checked against.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import polars as pl
import pytest

from broker.core import queries
from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode
from broker.model import ColumnDef, PutEntry, ScaleEvent, StreamConfig, StreamSchema
from broker.query import Executor
from broker.rows.encode import RowEncoder
from broker.storage.rocks import RocksStore
from tests.loop_turns import loop_turns

SCHEMA = StreamSchema((ColumnDef("k", "string"), ColumnDef("v", "int64")))


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    store = RocksStore(str(tmp_path / "db"))
    b = Broker(store, cursor_secret=b"queries-test")
    await b.start()
    yield b
    await b.close()
    await store.close()


async def typed_stream(broker: Broker, name: str, rows: int, per_request: int = 1000) -> None:
    await broker.create_stream(name, 1, schema=SCHEMA)
    encoder = RowEncoder(SCHEMA)
    for lo in range(0, rows, per_request):
        data = [[f"k{i % 7}", i] for i in range(lo, min(lo + per_request, rows))]
        await broker.append_rows(name, encoder.compact(["k", "v"], data, 1_000))


async def drain(run: queries.QueryRun, timeout: float = 20) -> list[list[Any]]:
    rows: list[list[Any]] = []
    while True:
        item = await asyncio.wait_for(run.results.get(), timeout)
        if item is None:
            return rows
        rows += item


async def test_a_slow_consumer_of_a_bounded_scan_gets_every_row(broker: Broker,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # small reads and a small result queue, so the scan fills the queue long before the end
    monkeypatch.setattr(queries, "_SCAN_RECORDS", 50)
    monkeypatch.setattr(queries, "RESULT_QUEUE", 2)
    await typed_stream(broker, "big", 3_000)
    run = await broker.queries.start("default", "select v from table(big)")
    while not run.results.full():  # noqa: ASYNC110 - no event for "full"; nothing read yet
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)               # the scan is blocked on the full queue, not ended
    assert run.running
    rows = await drain(run)
    assert [r[0] for r in rows] == list(range(3_000))
    assert run.status == "finished" and run.message == ""


async def test_limit_ends_a_streaming_aggregation_whose_rows_come_from_the_timer(broker: Broker) -> None:
    await typed_stream(broker, "agg", 1)   # before the query: not counted (FROM s starts at the newest)
    run = await broker.queries.start("default", "select count(*) from agg limit 1")
    await broker.append_rows("agg", RowEncoder(SCHEMA).compact(["k", "v"], [["a", 1], ["b", 2]], 5_000))
    rows = await drain(run, timeout=15)    # emitted by the 2 s tick, then the query ends
    assert rows == [[2]] and run.status == "finished"


async def test_limit_0_ends_a_streaming_query_at_once(broker: Broker) -> None:
    await typed_stream(broker, "zero", 1)
    run = await broker.queries.start("default", "select v from zero limit 0")
    assert await drain(run, timeout=5) == [] and run.status == "finished"


async def test_one_client_runs_at_most_its_share_of_the_queries(broker: Broker,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that kept every slot locked every other client out: it gets half of them."""
    monkeypatch.setattr(queries, "MAX_RUNNING", 4)
    monkeypatch.setattr(queries, "MAX_RUNNING_PER_CLIENT", 2)
    await typed_stream(broker, "shared", 1)
    greedy = [await broker.queries.start("default", "select v from shared", client="10.0.0.1") for _ in range(2)]
    with pytest.raises(BrokerError) as refused:
        await broker.queries.start("default", "select v from shared", client="10.0.0.1")
    assert refused.value.code is ErrorCode.TOO_MANY_QUERIES and "of one client" in refused.value.message
    others = [await broker.queries.start("default", "select v from shared", client="10.0.0.2") for _ in range(2)]
    with pytest.raises(BrokerError) as full:   # the broker's limit still holds over all clients
        await broker.queries.start("default", "select v from shared", client="10.0.0.3")
    assert full.value.code is ErrorCode.TOO_MANY_QUERIES and "of one client" not in full.value.message
    await broker.queries.cancel("default", greedy[0].id)   # an ended one frees its client's slot
    again = await broker.queries.start("default", "select v from shared", client="10.0.0.1")
    for run in (greedy[1], *others, again):
        await broker.queries.cancel("default", run.id)
    # starts racing one another (each awaits a cursor per partition) all see the slots taken
    await broker.create_stream("wide", 16, schema=SCHEMA)
    got = await asyncio.gather(*(broker.queries.start("default", "select v from wide", client="10.0.0.4")
                                 for _ in range(10)), return_exceptions=True)
    started = [r for r in got if isinstance(r, queries.QueryRun)]
    assert len(started) == 2 and all(isinstance(r, BrokerError) for r in got if r not in started), got
    assert len([r for r in broker.queries.runs("default") if r.running]) == 2
    for run in started:
        await broker.queries.cancel("default", run.id)


async def test_an_ended_query_keeps_its_metrics_and_drops_its_state(broker: Broker) -> None:
    await typed_stream(broker, "s", 100)
    run = await broker.queries.start("default", "select k, count(*) from table(s) group by k")
    rows = await drain(run)
    assert sorted(rows) == sorted([f"k{i}", len(range(i, 100, 7))] for i in range(7))
    before = run.metrics()
    header = run.plan.header
    run.release()
    assert run.executor is None and run.results.empty()
    # the compiled plan goes too; what list/get show stays
    assert (run.plan.aggregates, run.plan.keys, run.plan.outputs, run.plan.header) == ([], [], [], header)
    assert run.metrics() == before and before["scanned_rows"] == 100 and before["count"] == 7
    assert broker.queries.get("default", run.id) is run        # still listable


async def test_ended_queries_are_forgotten_oldest_first_per_project(broker: Broker,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """KEEP_ENDED a project, as documented (one tenant's queries evicted another's, and with them
    a stream still being read), and KEEP_ENDED_TOTAL in all."""
    monkeypatch.setattr(queries, "KEEP_ENDED", 3)
    monkeypatch.setattr(queries, "KEEP_ENDED_TOTAL", 8)
    other = await broker.queries.start("quiet", "select 1")
    assert await drain(other) == [[1]]
    runs = []
    for _ in range(6):
        run = await broker.queries.start("busy", "select 1")
        assert await drain(run) == [[1]]
        runs.append(run)
    kept = [r for r in runs if any(x is r for x in broker.queries.runs("busy"))]
    # at most KEEP_ENDED ended queries kept (the newest start counts before it ends)
    assert len(kept) <= 4 and runs[-1] in kept and runs[0] not in kept
    with pytest.raises(BrokerError) as info:
        broker.queries.get("busy", runs[0].id)
    assert info.value.code is ErrorCode.QUERY_NOT_FOUND
    assert broker.queries.get("quiet", other.id) is other        # another project's: kept
    for i in range(10):                                          # the total bound: the oldest go
        assert await drain(await broker.queries.start(f"p{i}", "select 1")) == [[1]]
    assert len([r for p in ["quiet", "busy", *(f"p{i}" for i in range(10))] for r in broker.queries.runs(p)]) <= 9
    assert not broker.queries.runs("quiet")


async def test_an_ended_query_still_being_read_is_neither_forgotten_nor_cut_short(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished scan whose consumer is behind: other queries ending (eviction) and a DELETE
    of it emptied its queue, END included; the consumer lost the rows and its stream never ended
    (the Timeplus probe)."""
    monkeypatch.setattr(queries, "KEEP_ENDED", 1)
    monkeypatch.setattr(queries, "RESULT_QUEUE", 64)
    await typed_stream(broker, "lag", 20_000)
    behind = await broker.queries.start("default", "select v from table(lag)")
    deleted = await broker.queries.start("default", "select v from table(lag)")
    while behind.running or deleted.running:   # noqa: ASYNC110 - both scans done, nothing read yet
        await asyncio.sleep(0.01)
    for _ in range(3):                         # ended queries of the project: past KEEP_ENDED
        assert await drain(await broker.queries.start("default", "select 1")) == [[1]]
    await broker.queries.cancel("default", deleted.id, forget=True)   # DELETE /queries/{id}
    assert [r[0] for r in await drain(behind)] == list(range(20_000))
    assert [r[0] for r in await drain(deleted)] == list(range(20_000))
    with pytest.raises(BrokerError):
        broker.queries.get("default", deleted.id)
    behind.release()
    deleted.release()


async def test_result_batches_hold_at_most_result_rows(broker: Broker) -> None:
    """A scan's 50,000-record blocks went into the queue whole: 16 of them held for a reader that
    stopped reading (+1.1 GB for ten such readers)."""
    await typed_stream(broker, "wide", 12_000)
    run = await broker.queries.start("default", "select v from table(wide)")
    sizes = []
    while (item := await asyncio.wait_for(run.results.get(), 20)) is not None:
        sizes.append(len(item))
    assert sum(sizes) == 12_000 and max(sizes) <= queries.RESULT_ROWS
    run.release()


async def test_a_query_is_not_found_in_another_project(broker: Broker) -> None:
    run = await broker.queries.start("p1", "select 1")
    await drain(run)
    with pytest.raises(BrokerError) as info:
        broker.queries.get("p2", run.id)
    assert info.value.code is ErrorCode.QUERY_NOT_FOUND


async def test_rows_checked_against_a_stream_never_reach_its_successor(broker: Broker) -> None:
    await broker.create_stream("rc", 1, schema=SCHEMA)
    first = broker.catalogue.get("default", "rc")
    rows = RowEncoder(SCHEMA).compact(["k", "v"], [["a", 1]], 1_000)
    await broker.delete_stream("rc")
    other = StreamSchema((ColumnDef("x", "int64"),))
    await broker.create_stream("rc", 1, schema=other)
    with pytest.raises(BrokerError) as info:
        await broker.append_rows("rc", rows, stream_id=first.stream_id)
    assert info.value.code is ErrorCode.STREAM_NOT_FOUND
    run = await broker.queries.start("default", "select * from table(rc)")
    assert await drain(run) == []


async def test_a_polars_panic_fails_its_query(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A panic is a BaseException: caught as an Exception alone, its query stayed "running"."""
    await typed_stream(broker, "panics", 10)

    def panic(*_: Any) -> None:
        raise pl.exceptions.PanicException("invalid or out-of-range datetime")

    monkeypatch.setattr(Executor, "feed_block", panic)
    monkeypatch.setattr(Executor, "feed", panic)
    for sql in ("select v from table(panics)", "select count(*) from table(panics)"):
        run = await broker.queries.start("default", sql)
        assert await drain(run) == []
        assert run.status == "failed" and run.message == "internal error: PanicException", (sql, run.status)


async def test_a_deleted_stream_fails_its_query_by_name(broker: Broker) -> None:
    await typed_stream(broker, "gone", 1)
    run = await broker.queries.start("default", "select v from gone")
    await asyncio.sleep(0.1)
    await broker.delete_stream("gone")
    await drain(run)
    assert run.status == "failed" and run.message == "Stream [gone] was deleted"


async def test_a_reader_cancelled_as_a_write_wakes_it_still_ends(broker: Broker) -> None:
    """On Python 3.11 asyncio.wait_for swallows a cancellation that arrives in the same loop turn
    as the awaited future completes; a long poll woken by a write at the moment its reader was
    cancelled then went back to sleep, and a streaming query with LIMIT never ended (found as a
    flaky SDK test). The wait must end with the cancellation, deterministically."""
    config = await broker.create_stream("w", 1)
    task = asyncio.create_task(broker.reads._fetch(config.stream_id, 0, 0, 10, 1 << 20, 30.0))
    await asyncio.sleep(0.05)                           # waiting for a write
    broker.notifier.notify([(config.stream_id, 0)])     # a write wakes it ...
    task.cancel()                                       # ... as its reader is cancelled
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done and task.cancelled()


async def test_a_streaming_query_with_limit_ends_when_rows_and_writes_race(broker: Broker) -> None:
    await broker.create_stream("lim", 1, schema=SCHEMA)
    encoder = RowEncoder(SCHEMA)
    for _ in range(10):
        run = await broker.queries.start("default", "select v from lim where v % 2 = 0 limit 3")
        await broker.append_rows("lim", encoder.compact(["k", "v"], [["a", i] for i in range(5)], 1_000))
        await broker.append_rows("lim", encoder.compact(["k", "v"], [["a", i] for i in range(5, 12)], 1_000))
        assert await drain(run, timeout=10) == [[0], [2], [4]]
        assert run.status == "finished"


async def wait_rows(run: queries.QueryRun, want: int, timeout: float = 10) -> list[list[Any]]:
    """The next `want` result rows of a running query."""
    rows: list[list[Any]] = []
    async with asyncio.timeout(timeout):
        while len(rows) < want:
            item = await run.results.get()
            assert item is not None, f"the query ended: {run.status} {run.message}"
            rows += item
    return rows


async def test_a_streaming_query_follows_the_partitions_a_scale_up_adds(broker: Broker) -> None:
    """A streaming query's readers were fixed at its start: after a scale from 2 partitions to 4
    the rows written to partitions 2 and 3 never reached it."""
    await broker.create_stream("up", 2, schema=SCHEMA)
    encoder = RowEncoder(SCHEMA)
    run = await broker.queries.start("default", "select v from up")
    await broker.append_rows("up", encoder.compact(["k", "v"], [["a", i] for i in range(4)], 1_000))
    assert sorted(await wait_rows(run, 4)) == [[i] for i in range(4)]
    await broker.update_partition_count("up", 4)
    # rows in the new partitions only: no batch of the old readers tells the query the layout changed
    result = await broker.put_records("up", [PutEntry(row, partition_id=str(p)) for p, row in
                                             zip((2, 3), encoder.compact(["k", "v"], [["c", 20], ["c", 21]], 2_000))])
    assert result.partitions == [2, 3] and not result.failures
    assert sorted(await wait_rows(run, 2)) == [[20], [21]]
    # one request spreads its rows over all four partitions
    await broker.append_rows("up", encoder.compact(["k", "v"], [["b", i] for i in range(10, 18)], 3_000))
    config = broker.catalogue.get("default", "up")
    assert [(await broker.store.bounds(config.stream_id, p)).next_seq for p in range(4)] == [4, 4, 3, 3]
    assert sorted(await wait_rows(run, 8)) == [[i] for i in range(10, 18)]
    assert run.running


async def test_a_streaming_query_goes_on_through_a_scale_down_and_back_up(broker: Broker) -> None:
    await broker.create_stream("down", 4, schema=SCHEMA)
    encoder = RowEncoder(SCHEMA)
    run = await broker.queries.start("default", "select v from down")
    await broker.update_partition_count("down", 2)        # partitions 2 and 3 DELETED: their readers wait
    await broker.append_rows("down", encoder.compact(["k", "v"], [["a", i] for i in range(4)], 1_000))
    assert sorted(await wait_rows(run, 4)) == [[i] for i in range(4)]
    await broker.update_partition_count("down", 4)        # ACTIVE again: followed already, not twice
    await broker.append_rows("down", encoder.compact(["k", "v"], [["b", i] for i in range(10, 18)], 2_000))
    assert sorted(await wait_rows(run, 8)) == [[i] for i in range(10, 18)]
    await asyncio.sleep(queries.TICK_S * 2)                # a layout check on the tick adds no reader
    assert run.results.empty() and run.running


def test_a_partition_a_scale_makes_readable_is_read_from_its_boundary_in_the_first_such_event() -> None:
    # the query started after a 1->2 event; then 2->4 made partitions 2 and 3, 4->3 closed 3: they
    # start where 2->4 made them (0), not at their next_seq at 4->3 (rows of theirs before it)
    known = ScaleEvent(1_000, 1, 2, (5, 0))
    config = StreamConfig("s", 3, scale_events=(known, ScaleEvent(2_000, 2, 4, (9, 3, 0, 0)),
                                                ScaleEvent(3_000, 4, 3, (10, 4, 6, 2))))
    assert queries._gained(config, known, 2) == [(2, 0), (3, 0)]
    assert queries._gained(config, config.scale_events[-1], 4) == []
    # partitions 2 and 3 were closed before the query started, by an event aged out of the history
    # since (so not readable at its start): reopened, partition 2's numbering goes on
    reopened = StreamConfig("s", 3, scale_events=(ScaleEvent(4_000, 2, 3, (12, 11, 7)),))
    assert queries._gained(reopened, None, 2) == [(2, 7)]


async def test_a_scan_block_stops_at_its_end_and_counts_only_what_it_reads(broker: Broker) -> None:
    """Records written after a scan began are neither read nor counted in records_out (they were
    counted, then cut away)."""
    await typed_stream(broker, "grown", 100)
    sid = broker.catalogue.lookup("default", "grown").stream_id
    cursor = await broker.get_cursor("grown", "0", "TRIM_HORIZON")
    block, after = await broker.reads.read_block("default", cursor, 1000, 1 << 20, end=60)
    assert (block.first_seq, len(block.data), block.next_seq) == (0, 60, 60)
    assert broker.stats.stream(sid).get_records == [60]
    block, again = await broker.reads.read_block("default", after, 1000, 1 << 20, end=60)
    assert block.data == [] and broker.reads.cursor_seq(again) == 60
    assert broker.stats.stream(sid).get_records == [60]


async def test_a_hop_query_reads_blocks_of_fewer_records_the_more_windows_a_row_is_in(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of hop(s, 1ms, 1s) is in 1000 windows: a scan read 50,000-record blocks, 50M (row,
    window) pairs each, and the state bound, the output and a cancel act between blocks only - one
    such block ran for minutes after its query was cancelled, its state several GB. Blocks (and a
    live query's batches) now hold records / windows-per-row records (at least 500), the same answer."""
    await typed_stream(broker, "hops", 3_000)
    blocks: list[int] = []
    feed_block = Executor.feed_block

    def counted(self: Executor, block: Any, raw: bool) -> list[list]:
        blocks.append(len(block.data))
        return feed_block(self, block, raw)
    monkeypatch.setattr(Executor, "feed_block", counted)
    run = await broker.queries.start("default", "select count(*) from hop(table(hops), 1ms, 1s) group by window_start")
    rows = await drain(run)
    assert sum(blocks) == 3_000 and max(blocks) == 500   # queries._MIN_READ (50,000 / 1000 is less)
    assert len(rows) == 1 + 999 and sum(r[0] for r in rows) == 3_000 * 1000   # all in one ms: 1000 windows
    blocks.clear()
    run = await broker.queries.start("default", "select count(*) from tumble(table(hops), 1s) group by window_start")
    assert await drain(run) == [[3_000]] and blocks == [3_000]   # one window a row: blocks as before


async def test_compiling_a_long_query_leaves_the_event_loop_turning(broker: Broker) -> None:
    """A query's SQL may be 64 KiB: compiling 3,000 select items (sqlglot, then an expression
    each) took ~0.5-1 s, all of it on the event loop, so one client's sqlanalyze or query of such
    SQL held every door of the broker that long (a /healthz ping waited 0.58 s; a few in parallel,
    seconds). It is compiled off the loop, which turns meanwhile."""
    await typed_stream(broker, "wide", 1)
    sql = "select " + ", ".join(f"concat(k, '{i}')" for i in range(3_000)) + " from table(wide)"
    async with loop_turns() as turns:
        plan = await broker.queries.compile_known("default", sql)
    assert len(plan.header) == 3_000
    # on the loop, the compile ran in one go and the ticker woke once, after it
    assert turns[0] >= 3, turns
