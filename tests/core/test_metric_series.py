"""The DIS monitoring series in-process, with a clock the test moves: minute rows from the plain
counters, the not-yet-flushed minute seen live, durability across a restart over the same store,
trimming past retention, deletion with the stream, and the period and label rules."""
from __future__ import annotations

from typing import AsyncIterator

import pytest

from broker.core.broker import Broker
from broker.core.metric_series import PREFIX, series_key
from broker.errors import BrokerError, ErrorCode
from broker.model import PutEntry
from broker.storage.memory import MemoryStore

SECRET = b"series-test-secret"
MINUTE = 60_000
HOUR = 60 * MINUTE
T0 = 1_700_000_040_000 // HOUR * HOUR + 5 * MINUTE + 7_000   # 5 min 7 s into an hour


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def broker(store: MemoryStore, clock: FakeClock) -> AsyncIterator[Broker]:
    b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b.start()
    yield b
    await b.close()


def s(ms: int) -> int:
    return ms // 1000


async def put(broker: Broker, stream: str, partition: int, sizes: list[int]) -> None:
    result = await broker.put_records(stream, [PutEntry(b"x" * n, partition_id=str(partition)) for n in sizes])
    assert result.failed_record_count == 0


async def series(broker: Broker, stream: str, label: str, lo_ms: int, hi_ms: int,
                 partition: str | None = None) -> list[tuple[int, int]]:
    got = await broker.stream_metrics(stream, label, None, s(lo_ms), s(hi_ms), partition)
    return got[label]


async def test_minutes_from_counters_live_then_flushed(broker: Broker, clock: FakeClock) -> None:
    await broker.create_stream("s1", 2)
    await put(broker, "s1", 0, [10, 20])
    await put(broker, "s1", 1, [5])
    minute = T0 // MINUTE
    # not flushed yet: the current minute shows it
    points = await series(broker, "s1", "total_put_records_per_stream", T0 - 3 * MINUTE, T0)
    assert points[-1] == (minute * 60, 3)
    assert all(ts % 60 == 0 and len(str(ts)) == 10 for ts, _ in points)
    assert await broker.metric_series.flush(minute) == 1
    clock.now += MINUTE
    await put(broker, "s1", 1, [7, 7, 7, 7])
    got = await broker.stream_metrics("s1", None, "total_put_bytes_per_stream,total_put_req_suc_per_stream",
                                      s(T0), s(clock.now))
    assert got == {"total_put_bytes_per_stream": [(minute * 60, 35), ((minute + 1) * 60, 28)],
                   "total_put_req_suc_per_stream": [(minute * 60, 2), ((minute + 1) * 60, 1)]}
    assert await series(broker, "s1", "total_put_bytes_per_partition", T0, clock.now, "shardId-0000000001") \
        == [(minute * 60, 5), ((minute + 1) * 60, 28)]
    assert await series(broker, "s1", "total_put_records_per_partition", T0, clock.now, "0") \
        == [(minute * 60, 2), ((minute + 1) * 60, 0)]


async def test_reads_and_latency(broker: Broker) -> None:
    await broker.create_stream("s1", 1)
    await put(broker, "s1", 0, [3, 4, 5])
    cursor = await broker.get_cursor("s1", "0", "TRIM_HORIZON")
    result = await broker.get_records(cursor)
    assert len(result.records) == 3
    got = await broker.stream_metrics("s1", None, "total_get_records_per_stream,total_get_bytes_per_stream,"
                                      "total_get_req_suc_per_stream,total_get_req_latency,traffic_control_get",
                                      s(T0), s(T0))
    last = {label: points[-1][1] for label, points in got.items()}
    assert last["total_get_records_per_stream"] == 3
    assert last["total_get_bytes_per_stream"] == 12
    assert last["total_get_req_suc_per_stream"] == 1
    assert last["traffic_control_get"] == 0
    assert last["total_get_req_latency"] >= 0


async def test_survives_a_restart_and_goes_with_the_stream(store: MemoryStore, clock: FakeClock) -> None:
    b1 = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b1.start()
    await b1.create_stream("s1", 1)
    await put(b1, "s1", 0, [1, 1])
    await b1.close()   # stores the minute so far
    b2 = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b2.start()
    await put(b2, "s1", 0, [1])
    await b2.metric_series.flush()   # same minute, same hour block: added, not replaced
    assert await series(b2, "s1", "total_put_records_per_stream", T0, T0) == [(T0 // MINUTE * 60, 3)]
    sid = b2.catalogue.get("default", "s1").stream_id
    assert await store.meta_get(series_key(sid, T0 // HOUR)) is not None
    await b2.delete_stream("s1")
    assert await store.meta_scan(PREFIX) == []
    await b2.close()


async def test_trimmed_past_retention(broker: Broker, store: MemoryStore, clock: FakeClock) -> None:
    await broker.create_stream("s1", 1, 24)
    sid = broker.catalogue.get("default", "s1").stream_id
    await put(broker, "s1", 0, [1])
    await broker.metric_series.flush()
    first_hour = T0 // HOUR
    clock.now += 3 * HOUR
    await put(broker, "s1", 0, [1])
    await broker.metric_series.flush()
    assert len(await store.meta_scan(PREFIX + sid.to_bytes(8, "big"))) == 3   # two hours and the index
    clock.now += 24 * HOUR
    await broker.metric_series.flush()   # no traffic: still trims
    assert await store.meta_get(series_key(sid, first_hour)) is None
    assert await store.meta_get(series_key(sid, first_hour + 3)) is not None   # holds the window's start
    clock.now += HOUR
    await broker.metric_series.flush()
    assert await store.meta_scan(PREFIX + sid.to_bytes(8, "big")) == [
        (series_key(sid, 0), (first_hour + 4).to_bytes(4, "big"))]


@pytest.mark.parametrize(("label", "label_list", "start", "end", "code"), [
    ("nope", None, 0, 0, ErrorCode.INVALID_METRICS_LABEL),
    (None, None, 0, 0, ErrorCode.INVALID_METRICS_LABEL),
    ("total_put_bytes_per_stream", "total_put_bytes_per_stream,bogus", 0, 0, ErrorCode.INVALID_METRICS_LABEL),
    ("total_put_bytes_per_partition", None, 0, 0, ErrorCode.INVALID_METRICS_LABEL),   # a partition label
    ("total_put_bytes_per_stream", None, None, 0, ErrorCode.INVALID_METRICS_PERIOD),
    ("total_put_bytes_per_stream", None, "soon", 0, ErrorCode.INVALID_METRICS_PERIOD),
    ("total_put_bytes_per_stream", None, 60, 0, ErrorCode.INVALID_METRICS_PERIOD),    # start after end
    ("total_put_bytes_per_stream", None, -8 * 86400, 0, ErrorCode.METRICS_PERIOD_TOO_LONG),
    ("total_put_bytes_per_stream", None, -8 * 86400, -7 * 86400, ErrorCode.METRICS_PERIOD_TOO_LONG),
])
async def test_refused(broker: Broker, label: object, label_list: object, start: object, end: object,
                       code: ErrorCode) -> None:
    await broker.create_stream("s1", 1)
    now_s = T0 // 1000
    start = now_s + start if isinstance(start, int) else start
    end = now_s + end if isinstance(end, int) else end
    with pytest.raises(BrokerError) as caught:
        await broker.stream_metrics("s1", label, label_list, start, end)
    assert caught.value.code is code


async def test_milliseconds_are_accepted(broker: Broker) -> None:
    await broker.create_stream("s1", 1)
    await put(broker, "s1", 0, [1])
    got = await broker.stream_metrics("s1", "total_put_records_per_stream", None, T0 - MINUTE, T0)
    assert got["total_put_records_per_stream"][-1] == (T0 // MINUTE * 60, 1)


async def test_throttled_records_counted_per_partition(store: MemoryStore, clock: FakeClock) -> None:
    """8 records into a partition that admits 5 a second: 3 fail THROTTLED, counted without a step
    per record; the DIS series' traffic_control_put counts the request once."""
    from dataclasses import replace

    from broker.core.limits import DEFAULT_LIMITS

    b = Broker(store, cursor_secret=SECRET, clock_ms=clock,
               limits=replace(DEFAULT_LIMITS, partition_records_per_s=5, partition_bytes_per_s=0))
    await b.start()
    await b.create_stream("s1", 2)
    result = await b.put_records("s1", [PutEntry(b"x", partition_id="0") for _ in range(8)]
                                 + [PutEntry(b"y", partition_id="9")])
    assert result.failed_record_count == 4
    s1 = b.stats.streams[b.catalogue.get("default", "s1").stream_id]
    assert dict(s1.failures) == {"THROTTLED": 3, "PARTITION_NOT_FOUND": 1}
    assert (s1.throttled_records, s1.throttled_put_requests, s1.put_requests) == (3, 1, 1)
    assert sum(s1.put_records) == 5
    got = await b.stream_metrics("s1", None, "traffic_control_put,total_put_records_per_stream", s(T0), s(T0))
    assert {label: points[-1][1] for label, points in got.items()} == {
        "traffic_control_put": 1, "total_put_records_per_stream": 5}
    await b.close()


async def test_a_failed_flush_takes_nothing(store: MemoryStore, clock: FakeClock) -> None:
    """The store refuses the write (a full disk): the minute's counts are added by the next flush."""
    b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b.start()
    await b.create_stream("s1", 1)
    await put(b, "s1", 0, [1, 1])
    minute = T0 // MINUTE
    real_write = store.meta_write

    async def refuse(changes: dict[bytes, bytes | None]) -> None:
        raise OSError("no space left on device")

    store.meta_write = refuse   # type: ignore[method-assign]
    with pytest.raises(OSError):
        await b.metric_series.flush(minute)
    store.meta_write = real_write   # type: ignore[method-assign]
    clock.now += MINUTE
    await b.metric_series.flush(minute + 1)
    assert await series(b, "s1", "total_put_records_per_stream", T0, clock.now) == [
        (minute * 60, 0), ((minute + 1) * 60, 2)]
    await b.close()


async def test_a_query_during_a_shared_flush_counts_each_record_once(clock: FakeClock) -> None:
    """On a shared store a flush adds a stream's counts with a compare-and-set; a query reading the
    rows while it was applied but before the flush noted it also added the same counts as not
    flushed yet: 200 for 100 records (the review). Flushes and queries take turns now."""
    import asyncio

    from broker.storage.base import Durability, StoreCapabilities

    class SharedStore(MemoryStore):
        capabilities = StoreCapabilities(Durability.NONE, shared=True)
        gate: asyncio.Event | None = None

        async def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
            applied = await super().meta_cas(key, expected, new)
            if self.gate is not None and key.startswith(PREFIX):
                await self.gate.wait()   # applied, its answer not back yet
            return applied

    store = SharedStore()
    broker = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await broker.start()
    try:
        await broker.create_stream("s", 1)
        await put(broker, "s", 0, [1] * 100)
        store.gate = asyncio.Event()
        flushing = asyncio.ensure_future(broker.metric_series.flush(T0 // MINUTE))
        await asyncio.sleep(0.05)
        asking = asyncio.ensure_future(series(broker, "s", "total_put_records_per_stream", T0, T0))
        await asyncio.sleep(0.05)
        store.gate.set()
        await flushing
        assert await asking == [(T0 // MINUTE * 60, 100)]
    finally:
        await broker.close()
