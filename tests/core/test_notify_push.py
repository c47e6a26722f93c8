"""Write wake-ups (broker/core/notify.py) as readers see them: long-poll GetRecords and push
subscriptions, in-process over a real RocksStore on disk, with the real clock.

The hammer test is the no-missed-wake-up check: many readers long-poll while several writers
append at random moments; every poll must come back with records well before its deadline,
shortly after the first write to its partition past its position. A lost wake-up shows up as a
poll that sleeps until its deadline.
"""
from __future__ import annotations

import asyncio
import random
from itertools import pairwise
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from broker.core.broker import Broker
from broker.core.limits import Limits
from broker.model import GetRecordsResult, PutEntry, Record
from broker.storage.rocks import RocksStore

SECRET = b"notify-push-test-secret"
MakeBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
async def make_broker(tmp_path: Path) -> AsyncIterator[MakeBroker]:
    made: list[tuple[Broker, RocksStore]] = []

    async def make(limits: Limits | None = None) -> Broker:
        store = RocksStore(str(tmp_path / f"db{len(made)}"))
        b = Broker(store, cursor_secret=SECRET, **({"limits": limits} if limits else {}))
        await b.start()
        made.append((b, store))
        return b

    yield make
    for b, store in made:
        await b.close()
        await store.close()


@pytest.fixture
async def broker(make_broker: MakeBroker) -> Broker:
    return await make_broker()


async def put(broker: Broker, stream: str, partition: int, *payloads: bytes) -> list[int]:
    result = await broker.put_records(stream, [PutEntry(p, partition_id=str(partition)) for p in payloads])
    assert result.failures == [] and result.partitions == [partition] * len(payloads)
    return result.seqs


async def waiting_readers(broker: Broker, n: int, timeout: float = 5.0) -> None:
    """Until `n` readers are parked on the notifier (registered, read nothing, waiting)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while broker.notifier.waiting < n:
        assert loop.time() < deadline, f"only {broker.notifier.waiting} of {n} readers are waiting"
        await asyncio.sleep(0.005)


# -- long poll ---------------------------------------------------------------------------------------


async def test_no_missed_wake_up_under_concurrent_writers_and_readers(broker: Broker) -> None:
    """Writes are sparse per partition (a few each, at random moments, over many partitions), so a
    wake-up that is lost is not papered over by the next write: the poll sleeps to its deadline."""
    partitions, readers_per_partition, writers, puts_per_writer = 200, 2, 4, 150
    wait_s = 8.0            # a missed wake-up sleeps this long; a prompt one returns in milliseconds
    prompt_s = 1.0          # "promptly": after the write it waits for, on a loaded 2-core machine
    await broker.create_stream("s", partitions)
    loop = asyncio.get_running_loop()
    rng = random.Random(1234)
    targets = list(range(partitions)) + [rng.randrange(partitions)
                                         for _ in range(writers * puts_per_writer - partitions)]
    rng.shuffle(targets)                              # every partition gets at least one write
    plan = [targets[w::writers] for w in range(writers)]
    pauses = [[rng.uniform(0, 0.004) for _ in range(puts_per_writer)] for _ in range(writers)]
    expected = [targets.count(p) for p in range(partitions)]
    acked: dict[tuple[int, int], float] = {}         # (partition, seq) -> when its put returned
    polls: list[tuple[int, int, float, float, list[int]]] = []   # partition, from seq, start, end, seqs got

    async def read(p: int) -> None:
        cursor = await broker.get_cursor("s", str(p), "TRIM_HORIZON")
        seq = 0
        while seq < expected[p]:
            started = loop.time()
            result = await broker.get_records(cursor, wait_ms=int(wait_s * 1000))
            got = [r.seq for r in result.records]
            polls.append((p, seq, started, loop.time(), got))
            assert got == list(range(seq, seq + len(got))), (p, seq, got)   # in order, no gap, no repeat
            seq += len(got)
            cursor = result.next_cursor

    async def write(w: int) -> None:
        for i, (p, pause) in enumerate(zip(plan[w], pauses[w])):
            await asyncio.sleep(pause)
            (seq,) = await put(broker, "s", p, f"w{w}-{i}".encode())
            acked[(p, seq)] = loop.time()

    readers = [asyncio.create_task(read(p)) for p in range(partitions) for _ in range(readers_per_partition)]
    await waiting_readers(broker, len(readers))
    await asyncio.wait_for(asyncio.gather(*(write(w) for w in range(writers)), *readers), 40)

    assert sum(expected) == len(acked) == writers * puts_per_writer
    first_ack = {}   # (partition, seq) -> the earliest ack of any record at or after seq
    for p in range(partitions):
        earliest = float("inf")
        for seq in reversed(range(expected[p])):
            earliest = min(earliest, acked[(p, seq)])
            first_ack[(p, seq)] = earliest
    waited = 0
    for p, seq, started, ended, got in polls:
        assert got, f"partition {p}: a poll from seq {seq} came back empty after {ended - started:.2f} s"
        assert ended - started < wait_s - 2, f"partition {p} seq {seq}: returned only at its deadline"
        write_seen = first_ack[(p, seq)]
        if write_seen > started:     # the poll had to wait for that write: it must wake up for it
            waited += 1
            assert ended - write_seen < prompt_s, (
                f"partition {p} seq {seq}: woke {ended - write_seen:.3f} s after the write it waited for")
    assert waited >= 400, f"only {waited} of {len(polls)} polls ever waited: the test did not exercise wake-ups"


class _PausingStore:
    """The real RocksStore with one interleaving point: the first read of partition 0 reads (and
    finds nothing), then holds its answer until the test has written and been acknowledged - the
    write lands after the read and before the reader waits. Everything else passes straight through."""

    def __init__(self, store: RocksStore) -> None:
        self._store = store
        self.has_read = asyncio.Event()
        self.resume = asyncio.Event()

    async def read(self, stream_id: int, partition: int, *args: int) -> list[Record]:
        records = await self._store.read(stream_id, partition, *args)
        if partition == 0 and not self.has_read.is_set():
            self.has_read.set()
            await asyncio.wait_for(self.resume.wait(), 10)
        return records

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


async def test_a_write_between_the_empty_read_and_the_wait_wakes_the_poll(tmp_path: Path) -> None:
    # a store whose read suspends (a network store, or a read on a thread) opens the gap
    store = RocksStore(str(tmp_path / "paused"))
    paused = _PausingStore(store)
    broker = Broker(paused, cursor_secret=SECRET)  # type: ignore[arg-type]
    await broker.start()
    try:
        await broker.create_stream("s", 1)
        loop = asyncio.get_running_loop()
        poll = asyncio.ensure_future(broker.get_records(await broker.get_cursor("s", "0", "LATEST"), wait_ms=8000))
        await asyncio.wait_for(paused.has_read.wait(), 10)             # the poll read nothing...
        await put(broker, "s", 0, b"in the gap")                        # ...the write lands and notifies...
        acked = loop.time()
        paused.resume.set()                                             # ...and only now may it wait
        result = await asyncio.wait_for(poll, 10)
        assert [r.data for r in result.records] == [b"in the gap"]
        assert loop.time() - acked < 1.0, "the wake-up was lost: the poll slept to its deadline"
    finally:
        paused.resume.set()
        await broker.close()
        await store.close()


async def test_long_poll_returns_empty_at_its_deadline_and_ignores_other_partitions(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    loop = asyncio.get_running_loop()
    cursor = await broker.get_cursor("s", "0", "LATEST")

    async def writes_elsewhere() -> None:
        for i in range(5):
            await asyncio.sleep(0.04)
            await put(broker, "s", 1, b"elsewhere%d" % i)

    started = loop.time()
    result, _ = await asyncio.gather(broker.get_records(cursor, wait_ms=400), writes_elsewhere())
    elapsed = loop.time() - started
    assert result.records == []
    assert 0.39 <= elapsed < 1.5, elapsed
    assert broker.notifier.waiting == 0                      # nothing left registered
    # the cursor it hands back still points where it was: the next write is read from it
    await put(broker, "s", 0, b"first")
    again = await broker.get_records(result.next_cursor, wait_ms=400)
    assert [r.data for r in again.records] == [b"first"]
    # wait_ms 0 (or none) answers at once
    started = loop.time()
    assert (await broker.get_records(again.next_cursor, wait_ms=0)).records == []
    assert (await broker.get_records(again.next_cursor)).records == []
    assert loop.time() - started < 0.3


async def test_long_poll_with_records_already_there_does_not_wait(broker: Broker) -> None:
    await broker.create_stream("s", 1)
    await put(broker, "s", 0, b"a", b"b")
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await broker.get_records(await broker.get_cursor("s", "0", "TRIM_HORIZON"), wait_ms=5000)
    assert [r.data for r in result.records] == [b"a", b"b"]
    assert loop.time() - started < 0.5


# -- subscribe ---------------------------------------------------------------------------------------


async def collect(batches: AsyncIterator[GetRecordsResult], records: int, timeout: float = 10.0
                  ) -> list[GetRecordsResult]:
    """Batches until `records` records arrived (heartbeats included in the list)."""
    out: list[GetRecordsResult] = []

    async def run() -> None:
        seen = 0
        while seen < records:
            batch = await anext(batches)
            out.append(batch)
            seen += len(batch.records)

    await asyncio.wait_for(run(), timeout)
    return out


async def test_subscribe_yields_records_written_after_subscribing_in_order(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    await put(broker, "s", 0, b"before-0", b"before-1")
    batches = broker.subscribe(await broker.get_cursor("s", "0", "LATEST"), max_records=7)
    consumer = asyncio.ensure_future(collect(batches, 300))
    await waiting_readers(broker, 1)
    for i in range(0, 300, 10):
        await put(broker, "s", 0, *(b"r%03d" % j for j in range(i, i + 10)))
        await put(broker, "s", 1, b"other partition")
        if i % 50 == 0:
            await asyncio.sleep(0.01)
    got = await consumer
    await batches.aclose()
    records = [r for b in got for r in b.records]
    assert [r.data for r in records] == [b"r%03d" % j for j in range(300)]
    assert [r.seq for r in records] == list(range(2, 302))
    assert all(0 < len(b.records) <= 7 for b in got)          # no heartbeat in this short run; cap held
    assert len(got) >= 300 // 7


async def test_subscribe_max_records_caps_each_batch(broker: Broker) -> None:
    await broker.create_stream("s", 1)
    await put(broker, "s", 0, *(b"%d" % i for i in range(25)))
    batches = broker.subscribe(await broker.get_cursor("s", "0", "TRIM_HORIZON"), max_records=10)
    got = await collect(batches, 25)
    await batches.aclose()
    assert [[r.seq for r in b.records] for b in got] == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


async def test_subscribe_batches_carry_at_most_subscribe_batch_bytes(broker: Broker) -> None:
    """What a stalled consumer makes the broker hold is one batch: at most SUBSCRIBE_BATCH_BYTES of
    payload (the largest record is no larger), also when max_wait_ms collects more."""
    from broker.core.reads import SUBSCRIBE_BATCH_BYTES

    await broker.create_stream("s", 1)
    third = SUBSCRIBE_BATCH_BYTES // 3 + 1   # three of them are past the cap, two are not
    await put(broker, "s", 0, *(bytes([65 + i]) * third for i in range(7)))
    for wait_ms in (0, 200):
        batches = broker.subscribe(await broker.get_cursor("s", "0", "TRIM_HORIZON"), max_records=100,
                                   max_wait_ms=wait_ms)
        def out() -> int:
            counts = broker.stats.stream(broker.catalogue.lookup("default", "s").stream_id).get_records
            return counts[0] if counts else 0
        before = out()
        got = await collect(batches, 7)
        await batches.aclose()
        assert [len(b.records) for b in got] == [2, 2, 2, 1], wait_ms
        # records_out counts each record once, also one read past a batch's bytes and read again
        assert out() - before == 7


async def _put_spread(broker: Broker, payloads: list[bytes], gap: float) -> float:
    """Put one record at a time, `gap` seconds apart; returns when the first one was acknowledged."""
    loop = asyncio.get_running_loop()
    first = 0.0
    for i, payload in enumerate(payloads):
        if i:
            await asyncio.sleep(gap)
        await put(broker, "s", 0, payload)
        first = first or loop.time()
    return first


async def test_subscribe_max_wait_collects_records_into_one_batch(broker: Broker) -> None:
    await broker.create_stream("s", 1)
    loop = asyncio.get_running_loop()
    batches = broker.subscribe(await broker.get_cursor("s", "0", "LATEST"), max_records=100, max_wait_ms=600)
    first_batch = asyncio.ensure_future(anext(batches))
    await waiting_readers(broker, 1)
    first_put = await _put_spread(broker, [b"a", b"b", b"c"], 0.1)   # all three within 200 ms
    batch = await asyncio.wait_for(first_batch, 5)
    arrived = loop.time()
    assert [r.data for r in batch.records] == [b"a", b"b", b"c"]
    assert arrived - first_put >= 0.5, "the batch was sent before max_wait_ms was up"
    assert arrived - first_put < 2.0
    await batches.aclose()


async def test_subscribe_max_wait_ends_early_when_the_batch_is_full(broker: Broker) -> None:
    await broker.create_stream("s", 1)
    loop = asyncio.get_running_loop()
    batches = broker.subscribe(await broker.get_cursor("s", "0", "LATEST"), max_records=3, max_wait_ms=5000)
    first_batch = asyncio.ensure_future(anext(batches))
    await waiting_readers(broker, 1)
    first_put = await _put_spread(broker, [b"a", b"b", b"c", b"d", b"e", b"f"], 0.05)
    batch = await asyncio.wait_for(first_batch, 5)
    assert [r.data for r in batch.records] == [b"a", b"b", b"c"]
    assert loop.time() - first_put < 2.0, "a full batch waited for max_wait_ms"
    batch = await asyncio.wait_for(anext(batches), 2)
    assert [r.data for r in batch.records] == [b"d", b"e", b"f"]
    await batches.aclose()


async def test_subscribe_max_wait_zero_sends_each_record_at_once(broker: Broker) -> None:
    await broker.create_stream("s", 1)
    loop = asyncio.get_running_loop()
    batches = broker.subscribe(await broker.get_cursor("s", "0", "LATEST"), max_records=100, max_wait_ms=0)
    first_batch = asyncio.ensure_future(anext(batches))
    await waiting_readers(broker, 1)
    await put(broker, "s", 0, b"a")
    acked = loop.time()
    batch = await asyncio.wait_for(first_batch, 5)
    assert [r.data for r in batch.records] == [b"a"]
    assert loop.time() - acked < 0.3
    await put(broker, "s", 0, b"b", b"c")    # one put: one batch (no reason to split it)
    batch = await asyncio.wait_for(anext(batches), 5)
    assert [r.data for r in batch.records] == [b"b", b"c"]
    await batches.aclose()


async def test_subscribe_sends_empty_heartbeats_after_silence(make_broker: MakeBroker) -> None:
    broker = await make_broker(Limits(subscribe_heartbeat_ms=200))
    await broker.create_stream("s", 1)
    loop = asyncio.get_running_loop()
    batches = broker.subscribe(await broker.get_cursor("s", "0", "LATEST"), max_wait_ms=0)
    started = loop.time()
    stamps = []
    for _ in range(3):
        batch = await asyncio.wait_for(anext(batches), 5)
        assert batch.records == [] and batch.next_cursor
        stamps.append(loop.time() - started)
    gaps = [b - a for a, b in pairwise([0.0, *stamps])]
    assert all(0.18 <= g < 1.5 for g in gaps), gaps
    # a heartbeat does not lose the position: the next record still arrives, promptly
    next_batch = asyncio.ensure_future(anext(batches))
    await waiting_readers(broker, 1)
    await put(broker, "s", 0, b"x")
    acked = loop.time()
    batch = await asyncio.wait_for(next_batch, 5)
    assert [(r.seq, r.data) for r in batch.records] == [(0, b"x")]
    assert loop.time() - acked < 0.15, "the record waited for the heartbeat timer"
    await batches.aclose()


# -- shutdown ----------------------------------------------------------------------------------------


async def test_begin_shutdown_wakes_long_polls_and_ends_subscriptions_at_once(broker: Broker) -> None:
    await broker.create_stream("s", 4)
    loop = asyncio.get_running_loop()
    cursors = [await broker.get_cursor("s", str(p), "LATEST") for p in range(4)]
    polls = [asyncio.ensure_future(broker.get_records(c, wait_ms=15_000)) for c in cursors]

    async def drain(cursor: str) -> int:
        n = 0
        async for batch in broker.subscribe(cursor, max_wait_ms=10_000):   # would linger 10 s, heartbeat 15 s
            n += len(batch.records)
        return n

    subs = [asyncio.ensure_future(drain(c)) for c in cursors]
    await waiting_readers(broker, 8)
    started = loop.time()
    broker.begin_shutdown()
    results = await asyncio.wait_for(asyncio.gather(*polls), 2)
    assert all(r.records == [] for r in results)
    assert await asyncio.wait_for(asyncio.gather(*subs), 2) == [0, 0, 0, 0]
    assert loop.time() - started < 1.0
    assert broker.shutting_down and broker.notifier.waiting == 0
    # from now on nobody waits: a new long poll answers at once, a new subscription ends at once
    started = loop.time()
    assert (await broker.get_records(cursors[0], wait_ms=15_000)).records == []
    assert await asyncio.wait_for(drain(cursors[1]), 2) == 0
    assert loop.time() - started < 1.0
    # writes still go on until close(), and a long poll still returns what is there
    await put(broker, "s", 2, b"late")
    assert [r.data for r in (await broker.get_records(cursors[2], wait_ms=15_000)).records] == [b"late"]


async def test_begin_shutdown_ends_a_subscription_that_is_lingering_over_a_partial_batch(broker: Broker) -> None:
    """A subscription collecting a batch (max_wait_ms) ends promptly too, delivering what it has."""
    await broker.create_stream("s", 1)
    loop = asyncio.get_running_loop()
    batches = broker.subscribe(await broker.get_cursor("s", "0", "LATEST"), max_records=100, max_wait_ms=10_000)
    first = asyncio.ensure_future(anext(batches))
    await waiting_readers(broker, 1)
    await put(broker, "s", 0, b"a")
    await waiting_readers(broker, 1)          # lingering: waiting for more before it sends
    started = loop.time()
    broker.begin_shutdown()
    batch = await asyncio.wait_for(first, 2)
    assert [r.data for r in batch.records] == [b"a"]
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(batches), 2)
    assert loop.time() - started < 1.0
