"""The Broker in-process, over a real RocksStore on disk, with a clock the test moves.

Covers group commit under concurrent producers, retention, the five cursor types, routing
precedence and spread, per-record failures, delete/recreate, draining on close, cursor expiry.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from pathlib import Path
from typing import AsyncIterator, Awaitable

import pytest

from broker.core import apps, routing
from broker.core.broker import Broker
from broker.core.leases import StoreLeases
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import PutEntry, PutRecordsResult, Record
from broker.storage.memory import MemoryStore
from broker.storage.rocks import RocksStore

SECRET = b"broker-test-secret"
T0 = 1_700_000_000_000
SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture
async def broker(db_path: str, clock: FakeClock) -> AsyncIterator[Broker]:
    store = RocksStore(db_path)
    b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b.start()
    yield b
    await b.close()
    await store.close()


async def raises(awaitable: Awaitable[object], code: ErrorCode) -> BrokerError:
    with pytest.raises(BrokerError) as exc_info:
        await awaitable
    assert exc_info.value.code is code, exc_info.value
    return exc_info.value


async def put(broker: Broker, stream: str, *payloads: bytes, partition_id: str | None = "0") -> PutRecordsResult:
    result = await broker.put_records(stream, [PutEntry(p, partition_id=partition_id) for p in payloads])
    assert result.failures == []
    return result


async def read_all(broker: Broker, cursor: str, limit: int | None = None) -> tuple[list[Record], str]:
    """Follow next_cursor until a read comes back empty."""
    out: list[Record] = []
    while True:
        result = await broker.get_records(cursor, limit)
        cursor = result.next_cursor
        if not result.records:
            return out, cursor
        out.extend(result.records)


async def read_from(broker: Broker, stream: str, partition: str, cursor_type: str, **kw: object) -> list[Record]:
    cursor = await broker.get_cursor(stream, partition, cursor_type, **kw)  # type: ignore[arg-type]
    return (await read_all(broker, cursor))[0]


def data_of(records: list[Record]) -> list[bytes]:
    return [r.data for r in records]


# -- (a) group commit under concurrent producers --------------------------------------------------


async def test_concurrent_producers_get_unique_gap_free_sequence_numbers(broker: Broker) -> None:
    await broker.create_stream("s", 3)
    producers, calls_each, per_call = 8, 30, 5

    async def produce(i: int) -> list[tuple[int, bytes]]:
        acked: list[tuple[int, bytes]] = []
        for c in range(calls_each):
            payloads = [f"p{i}-c{c}-r{r}".encode() for r in range(per_call)]
            result = await put(broker, "s", *payloads, partition_id="shardId-0000000001")
            assert result.partitions == [1] * per_call
            assert result.seqs == list(range(result.seqs[0], result.seqs[0] + per_call))  # one request: one run
            acked.extend(zip(result.seqs, payloads))
        return acked

    commits_before = broker.commits
    acked = await asyncio.gather(*(produce(i) for i in range(producers)))
    calls = producers * calls_each
    total = calls * per_call

    every_seq = [seq for mine in acked for seq, _ in mine]
    assert sorted(every_seq) == list(range(total))            # unique and gap-free
    for mine in acked:
        seqs = [seq for seq, _ in mine]
        assert all(a < b for a, b in itertools.pairwise(seqs))     # each producer's own seqs increase
    assert broker.commits - commits_before < calls            # group commit folded requests together

    records, _ = await read_all(broker, await broker.get_cursor("s", "1", "TRIM_HORIZON"))
    assert [(r.seq, r.data) for r in records] == sorted(pair for mine in acked for pair in mine)
    for other in ("0", "2"):
        assert await read_from(broker, "s", other, "TRIM_HORIZON") == []


# -- (b) retention --------------------------------------------------------------------------------


async def test_retention_trims_expired_records_and_numbering_continues(broker: Broker, clock: FakeClock) -> None:
    await broker.create_stream("s", 1)                       # retention 24 h
    assert (await put(broker, "s", b"old0", b"old1", b"old2")).seqs == [0, 1, 2]     # written at T0
    clock.advance(2 * HOUR)
    assert (await put(broker, "s", b"new3", b"new4")).seqs == [3, 4]                 # at T0 + 2 h
    clock.advance(23 * HOUR)                                 # now T0 + 25 h: only the first write expired
    stale = await broker.get_cursor("s", "0", "AT_SEQUENCE_NUMBER", "1")            # fresh cursor at seq 1

    assert await broker.enforce_retention() == 1
    assert await broker.enforce_retention() == 0             # nothing more to do

    horizon = await read_from(broker, "s", "0", "TRIM_HORIZON")
    assert [(r.seq, r.data) for r in horizon] == [(3, b"new3"), (4, b"new4")]

    err = await raises(broker.get_records(stale), ErrorCode.CURSOR_RECORD_EXPIRED)
    assert err.code.dis_code == "DIS.4226"
    assert (err.fields["seq"], err.fields["earliest"]) == (1, 3)

    err = await raises(broker.get_cursor("s", "0", "AT_SEQUENCE_NUMBER", "1"), ErrorCode.SEQUENCE_OUT_OF_RANGE)
    assert err.code.dis_code == "DIS.4224"
    assert "[1][ should be within ][3][ ][4]" in err.message
    await raises(broker.get_cursor("s", "0", "AFTER_SEQUENCE_NUMBER", "1"), ErrorCode.SEQUENCE_OUT_OF_RANGE)
    assert data_of(await read_from(broker, "s", "0", "AFTER_SEQUENCE_NUMBER", starting_seq="2")) \
        == [b"new3", b"new4"]

    err = await raises(broker.get_cursor("s", "0", "AT_TIMESTAMP", timestamp_ms=T0), ErrorCode.TIMESTAMP_EXPIRED)
    assert err.code.dis_code == "DIS.4300"
    assert str(clock.now - 24 * HOUR) in err.message
    await raises(broker.get_cursor("s", "0", "AT_TIMESTAMP", timestamp_ms=clock.now - 24 * HOUR - 1),
                 ErrorCode.TIMESTAMP_EXPIRED)
    assert data_of(await read_from(broker, "s", "0", "AT_TIMESTAMP", timestamp_ms=clock.now - 24 * HOUR)) \
        == [b"new3", b"new4"]                                # the oldest timestamp still accepted

    assert (await put(broker, "s", b"new5")).seqs == [5]     # numbering continues after a trim

    clock.advance(25 * HOUR)                                 # everything is now expired
    assert await broker.enforce_retention() == 1
    assert await read_from(broker, "s", "0", "TRIM_HORIZON") == []
    description = await broker.describe_stream("s")
    assert (description.partitions[0].bounds.first_seq, description.partitions[0].bounds.next_seq) == (6, 6)
    assert (await put(broker, "s", b"new6")).seqs == [6]     # never reused, even with nothing retained
    assert [(r.seq, r.data) for r in await read_from(broker, "s", "0", "TRIM_HORIZON")] == [(6, b"new6")]


async def test_retention_cutoff_is_exact_and_per_stream(broker: Broker, clock: FakeClock) -> None:
    await broker.create_stream("day", 1)
    await broker.create_stream("three-days", 1, retention_hours=72)
    await put(broker, "day", b"d0")
    await put(broker, "three-days", b"t0")
    clock.advance(24 * HOUR)                                 # age == retention: still kept
    assert await broker.enforce_retention() == 0
    assert data_of(await read_from(broker, "day", "0", "TRIM_HORIZON")) == [b"d0"]
    clock.advance(1)                                         # one millisecond older: gone
    assert await broker.enforce_retention() == 1
    assert await read_from(broker, "day", "0", "TRIM_HORIZON") == []
    assert data_of(await read_from(broker, "three-days", "0", "TRIM_HORIZON")) == [b"t0"]
    clock.advance(48 * HOUR)
    assert await broker.enforce_retention() == 1
    assert await read_from(broker, "three-days", "0", "TRIM_HORIZON") == []


# -- (c) the five cursor types --------------------------------------------------------------------


async def test_all_cursor_types_position_correctly(broker: Broker, clock: FakeClock) -> None:
    await broker.create_stream("s", 2)
    for i in range(5):                                       # r0..r4 at T0+1s .. T0+5s
        clock.advance(SECOND)
        await put(broker, "s", f"r{i}".encode())

    assert data_of(await read_from(broker, "s", "0", "TRIM_HORIZON")) == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    assert data_of(await read_from(broker, "s", "0", "AT_SEQUENCE_NUMBER", starting_seq="2")) \
        == [b"r2", b"r3", b"r4"]
    assert data_of(await read_from(broker, "s", "0", None, starting_seq="3")) == [b"r3", b"r4"]
    assert data_of(await read_from(broker, "s", "0", "AFTER_SEQUENCE_NUMBER", starting_seq="2")) \
        == [b"r3", b"r4"]
    assert data_of(await read_from(broker, "s", "0", "AT_TIMESTAMP", timestamp_ms=T0 + 3 * SECOND)) \
        == [b"r2", b"r3", b"r4"]
    assert data_of(await read_from(broker, "s", "0", "AT_TIMESTAMP", timestamp_ms=T0 + 3 * SECOND + 1)) \
        == [b"r3", b"r4"]
    assert data_of(await read_from(broker, "s", "0", "AT_TIMESTAMP", timestamp_ms=T0 - HOUR)) \
        == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    assert await read_from(broker, "s", "0", "AT_TIMESTAMP", timestamp_ms=T0 + HOUR) == []
    assert await read_from(broker, "s", "1", "TRIM_HORIZON") == []

    latest = await broker.get_cursor("s", "0", "LATEST")
    after_last = await broker.get_cursor("s", "0", "AFTER_SEQUENCE_NUMBER", "4")
    at_future = await broker.get_cursor("s", "0", "AT_TIMESTAMP", timestamp_ms=clock.now + 1)
    empty = await broker.get_records(latest)
    assert empty.records == []
    clock.advance(SECOND)
    await put(broker, "s", b"r5")
    for cursor in (latest, empty.next_cursor, after_last, at_future):
        records, _ = await read_all(broker, cursor)
        assert [(r.seq, r.data) for r in records] == [(5, b"r5")]


async def test_reading_in_pages_follows_next_cursor(broker: Broker, clock: FakeClock) -> None:
    await broker.create_stream("s", 1)
    for i in range(7):
        clock.advance(SECOND)
        await put(broker, "s", f"r{i}".encode())
    first = await broker.get_records(await broker.get_cursor("s", "0", "TRIM_HORIZON"), limit=3)
    assert [r.seq for r in first.records] == [0, 1, 2]
    assert first.millis_behind_latest == 4 * SECOND          # newest is r6, 4 s after r2
    rest, end = await read_all(broker, first.next_cursor, limit=3)
    assert [r.seq for r in rest] == [3, 4, 5, 6]
    assert (await broker.get_records(end)).records == []     # an empty read keeps its place
    await put(broker, "s", b"r7")
    assert data_of((await broker.get_records(end)).records) == [b"r7"]


async def test_get_cursor_rejects_bad_arguments(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    await put(broker, "s", b"a", b"b")
    cases = [
        (dict(cursor_type="BOGUS"), ErrorCode.INVALID_CURSOR_TYPE, "DIS.4215"),
        (dict(cursor_type="AT_SEQUENCE_NUMBER", starting_seq="abc"), ErrorCode.INVALID_SEQUENCE,
         "DIS.4216"),
        (dict(cursor_type="AT_SEQUENCE_NUMBER", starting_seq="-1"), ErrorCode.INVALID_SEQUENCE,
         "DIS.4216"),
        (dict(cursor_type="AT_SEQUENCE_NUMBER"), ErrorCode.INVALID_SEQUENCE, "DIS.4216"),
        (dict(cursor_type="AT_SEQUENCE_NUMBER", starting_seq="3"), ErrorCode.SEQUENCE_OUT_OF_RANGE,
         "DIS.4224"),
        (dict(cursor_type="AFTER_SEQUENCE_NUMBER", starting_seq="2"), ErrorCode.SEQUENCE_OUT_OF_RANGE,
         "DIS.4224"),
        (dict(cursor_type="AT_TIMESTAMP"), ErrorCode.INVALID_REQUEST, "DIS.4200"),
    ]
    for kwargs, code, dis in cases:
        err = await raises(broker.get_cursor("s", "0", **kwargs), code)  # type: ignore[arg-type]
        assert err.code.dis_code == dis
    # next_seq itself is a valid AT position (the same as LATEST)
    await broker.get_cursor("s", "0", "AT_SEQUENCE_NUMBER", "2")
    # leading zeros, as Java's Long.parseLong reads them; the digits still bound the number
    at = await broker.get_cursor("s", "0", "AT_SEQUENCE_NUMBER", "0" * 30 + "1")
    assert [r.seq for r in (await broker.get_records(at)).records] == [1]
    err = await raises(broker.get_cursor("s", "0", "AT_SEQUENCE_NUMBER", "0" * 3 + "9" * 5000),
                       ErrorCode.INVALID_SEQUENCE)
    assert err.code.dis_code == "DIS.4216"
    await raises(broker.get_cursor("s", "2", "TRIM_HORIZON"), ErrorCode.PARTITION_NOT_FOUND)
    await raises(broker.get_cursor("s", "x", "TRIM_HORIZON"), ErrorCode.INVALID_PARTITION_ID)
    await raises(broker.get_cursor("nope", "0", "TRIM_HORIZON"), ErrorCode.STREAM_NOT_FOUND)


async def test_get_records_rejects_forged_and_foreign_cursors(broker: Broker, clock: FakeClock) -> None:
    sid = (await broker.create_stream("s", 1)).stream_id
    await put(broker, "s", b"a")
    cursor = await broker.get_cursor("s", "0", "TRIM_HORIZON")
    for bad in ("", "garbage", cursor[:-1], cursor[:-1] + ("A" if cursor[-1] != "A" else "B"), None, 42):
        err = await raises(broker.get_records(bad), ErrorCode.INVALID_CURSOR)
        assert err.code.dis_code == "DIS.4217"
    # another broker with the same stream id but another secret: only the secret differs
    other = Broker(MemoryStore(), cursor_secret=b"another secret", clock_ms=clock)
    await other.start()
    try:
        assert (await other.create_stream("s", 1)).stream_id == sid
        await raises(other.get_records(cursor), ErrorCode.INVALID_CURSOR)
        await raises(broker.get_records(await other.get_cursor("s", "0", "TRIM_HORIZON")), ErrorCode.INVALID_CURSOR)
    finally:
        await other.close()
    assert data_of((await broker.get_records(cursor)).records) == [b"a"]


# -- (d) routing ----------------------------------------------------------------------------------


def key_for_partition(partition: int, count: int) -> str:
    return next(k for k in (f"key-{i}" for i in itertools.count())
                if routing.partition_for_hash(routing.key_hash(k), count) == partition)


async def test_routing_precedence_partition_id_then_hash_key_then_partition_key(broker: Broker) -> None:
    await broker.create_stream("s", 4)
    key = key_for_partition(3, 4)
    hash_key = str(routing.hash_ranges(4)[2][0])            # the first hash of partition 2
    result = await broker.put_records("s", [
        PutEntry(b"a", partition_key=key, explicit_hash_key=hash_key, partition_id="shardId-0000000001"),
        PutEntry(b"b", partition_key=key, explicit_hash_key=hash_key),
        PutEntry(b"c", partition_key=key),
        PutEntry(b"d", explicit_hash_key=str(routing.hash_ranges(4)[0][1])),   # last hash of partition 0
        PutEntry(b"e", explicit_hash_key="9223372036854775807"),
        PutEntry(b"f", partition_id="0"),
    ])
    assert result.failures == []
    assert result.partitions == [1, 2, 3, 0, 3, 0]
    assert result.seqs == [0, 0, 0, 0, 1, 1]
    by_partition = {p: await read_from(broker, "s", str(p), "TRIM_HORIZON") for p in range(4)}
    assert [(r.data, r.partition_key) for r in by_partition[1]] == [(b"a", key)]   # the key is kept
    assert [(r.data, r.partition_key) for r in by_partition[2]] == [(b"b", key)]
    assert [(r.data, r.partition_key) for r in by_partition[3]] == [(b"c", key), (b"e", None)]
    assert [(r.data, r.partition_key) for r in by_partition[0]] == [(b"d", None), (b"f", None)]


async def test_a_key_always_lands_in_the_same_partition(broker: Broker) -> None:
    await broker.create_stream("s", 7)
    keys = [f"user-{i}" for i in range(40)]
    first = await broker.put_records("s", [PutEntry(b"1", partition_key=k) for k in keys])
    second = await broker.put_records("s", [PutEntry(b"2", partition_key=k) for k in reversed(keys)])
    assert first.partitions == [routing.partition_for_hash(routing.key_hash(k), 7) for k in keys]
    assert second.partitions == first.partitions[::-1]
    assert len(set(first.partitions)) > 1


async def test_unkeyed_records_spread_evenly_over_all_partitions(broker: Broker) -> None:
    count = 5
    await broker.create_stream("s", count)
    one_request = await broker.put_records("s", [PutEntry(b"x") for _ in range(100)])
    assert one_request.failures == []
    assert Counter(one_request.partitions) == dict.fromkeys(range(count), 20)

    single = Counter()
    for _ in range(100):                                     # one record per request
        single.update((await broker.put_records("s", [PutEntry(b"y")])).partitions)
    assert set(single) == set(range(count))
    assert max(single.values()) - min(single.values()) <= 10, single

    empty_key = await broker.put_records("s", [PutEntry(b"z", partition_key="") for _ in range(10)])
    assert set(empty_key.partitions) == set(range(count))   # "" is no key: spread, not hashed


# -- (e) per-record failures ----------------------------------------------------------------------


async def test_per_record_failures_do_not_stop_the_batch_and_keep_input_order(broker: Broker) -> None:
    await broker.create_stream("s", 4)
    rejected = client_error(ErrorCode.BAD_BODY, detail="data is not valid base64")
    entries = [
        PutEntry(b"ok0", partition_id="0"),
        PutEntry(b"bad-id", partition_id="zero"),                    # DIS.4201
        PutEntry(b"missing", partition_id="shardId-0000000009"),     # DIS.4302
        PutEntry(b"ok1", partition_id="0"),
        PutEntry(b"bad-hash", explicit_hash_key="abc"),              # DIS.4200
        PutEntry(b"x" * (1024 * 1024 + 1), partition_id="1"),        # DIS.4200: over 1 MB
        PutEntry(b"hash-too-big", explicit_hash_key=str(2**63)),    # DIS.4200
        PutEntry(b"long-key", partition_key="k" * 257),              # DIS.4200
        PutEntry(b"undecodable", partition_id="2", rejected=rejected),  # the door's verdict stands
        PutEntry(b"ok2", partition_id="2"),
        PutEntry(b"ok3", partition_id="0"),
    ]
    result = await broker.put_records("s", entries)
    assert result.partitions == [0, -1, -1, 0, -1, -1, -1, -1, -1, 2, 0]
    assert result.seqs == [0, -1, -1, 1, -1, -1, -1, -1, -1, 0, 2]
    assert [(i, e.code.dis_code) for i, e in result.failures] == [
        (1, "DIS.4201"), (2, "DIS.4302"), (4, "DIS.4200"), (5, "DIS.4200"), (6, "DIS.4200"), (7, "DIS.4200"),
        (8, "DIS.4300")]
    assert result.failures[0][1].code is ErrorCode.INVALID_PARTITION_ID
    assert result.failures[1][1].code is ErrorCode.PARTITION_NOT_FOUND
    assert result.failures[-1][1] is rejected
    assert result.failed_record_count == 7
    assert data_of(await read_from(broker, "s", "0", "TRIM_HORIZON")) == [b"ok0", b"ok1", b"ok3"]
    assert data_of(await read_from(broker, "s", "1", "TRIM_HORIZON")) == []
    assert data_of(await read_from(broker, "s", "2", "TRIM_HORIZON")) == [b"ok2"]
    assert data_of(await read_from(broker, "s", "3", "TRIM_HORIZON")) == []


async def test_a_batch_where_every_record_fails_writes_nothing(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    commits = broker.commits
    result = await broker.put_records("s", [PutEntry(b"a", partition_id="5"), PutEntry(b"b", partition_id="?")])
    assert result.seqs == [-1, -1] and result.failed_record_count == 2
    assert broker.commits == commits
    assert (await put(broker, "s", b"c")).seqs == [0]


async def test_whole_request_errors(broker: Broker) -> None:
    await broker.create_stream("s", 1)
    err = await raises(broker.put_records("nope", [PutEntry(b"a")]), ErrorCode.STREAM_NOT_FOUND)
    assert err.code.dis_code == "DIS.4301"
    err = await raises(broker.put_records("s", []), ErrorCode.EMPTY_REQUEST)
    assert err.code.dis_code == "DIS.4202"
    await raises(broker.put_records("s", [PutEntry(b"x" * (1024 * 1024)) for _ in range(6)]),
                 ErrorCode.REQUEST_TOO_LARGE)
    assert await read_from(broker, "s", "0", "TRIM_HORIZON") == []


# -- (f) delete and recreate ----------------------------------------------------------------------


async def test_delete_then_recreate_starts_a_new_log(broker: Broker) -> None:
    old = await broker.create_stream("s", 2)
    await put(broker, "s", b"a", b"b", b"c")
    horizon = await broker.get_cursor("s", "0", "TRIM_HORIZON")
    _, after = await read_all(broker, horizon)

    await broker.delete_stream("s")
    for cursor in (horizon, after):
        err = await raises(broker.get_records(cursor), ErrorCode.STREAM_NOT_FOUND)
        assert err.code.dis_code == "DIS.4301"
    await raises(broker.put_records("s", [PutEntry(b"x")]), ErrorCode.STREAM_NOT_FOUND)
    await raises(broker.get_cursor("s", "0", "TRIM_HORIZON"), ErrorCode.STREAM_NOT_FOUND)
    await raises(broker.delete_stream("s"), ErrorCode.STREAM_NOT_FOUND)
    assert (await broker.list_streams()).total == 0

    new = await broker.create_stream("s", 2)
    assert new.stream_id != old.stream_id
    for cursor in (horizon, after):                          # old cursors stay dead
        await raises(broker.get_records(cursor), ErrorCode.STREAM_NOT_FOUND)
    assert await read_from(broker, "s", "0", "TRIM_HORIZON") == []
    assert (await put(broker, "s", b"fresh")).seqs == [0]
    assert [(r.seq, r.data) for r in await read_from(broker, "s", "0", "TRIM_HORIZON")] == [(0, b"fresh")]
    await raises(broker.create_stream("s", 1), ErrorCode.STREAM_EXISTS)


# -- (g) close drains -----------------------------------------------------------------------------


async def test_close_commits_every_queued_put_and_they_survive_a_reopen(db_path: str, clock: FakeClock) -> None:
    store = RocksStore(db_path)
    b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b.start()
    await b.create_stream("s", 2)
    tasks = [asyncio.create_task(b.put_records("s", [PutEntry(f"m{i}".encode(), partition_id=str(i % 2)),
                                                     PutEntry(f"n{i}".encode(), partition_id=str(i % 2))]))
             for i in range(40)]
    await asyncio.sleep(0)                                   # every task has queued its append...
    assert b.commits == 0                                    # ...and none has been committed yet
    await b.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert all(r.failures == [] for r in results)
    await raises(b.put_records("s", [PutEntry(b"late")]), ErrorCode.UNAVAILABLE)
    await store.close()

    store = RocksStore(db_path)
    try:
        b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
        await b.start()
        for p in (0, 1):
            stored = {(r.seq, r.data) for r in await read_from(b, "s", str(p), "TRIM_HORIZON")}
            acked = {(seq, data) for i, r in enumerate(results) if i % 2 == p
                     for seq, data in zip(r.seqs, (f"m{i}".encode(), f"n{i}".encode()))}
            assert len(acked) == 40
            assert stored == acked
        assert (await put(b, "s", b"after-restart")).seqs == [40]
        await b.close()
    finally:
        await store.close()


async def test_a_cursor_survives_a_broker_restart(db_path: str, clock: FakeClock) -> None:
    store = RocksStore(db_path)
    b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b.start()
    await b.create_stream("s", 1)
    await put(b, "s", b"a", b"b")
    cursor = await b.get_cursor("s", "0", "AT_SEQUENCE_NUMBER", "1")
    await b.close()
    await store.close()
    store = RocksStore(db_path)
    try:
        b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
        await b.start()
        assert data_of((await b.get_records(cursor)).records) == [b"b"]
        await b.close()
    finally:
        await store.close()


# -- (h) cursor expiry ----------------------------------------------------------------------------


async def test_cursors_expire_five_minutes_after_they_were_issued(broker: Broker, clock: FakeClock) -> None:
    await broker.create_stream("s", 1)
    await put(broker, "s", b"a")
    cursor = await broker.get_cursor("s", "0", "TRIM_HORIZON")
    clock.advance(5 * MINUTE)                                # exactly the TTL: still valid
    result = await broker.get_records(cursor)
    assert data_of(result.records) == [b"a"]
    clock.advance(1)
    err = await raises(broker.get_records(cursor), ErrorCode.CURSOR_EXPIRED)
    assert err.code.dis_code == "DIS.4225"
    assert (await broker.get_records(result.next_cursor)).records == []   # next_cursor was issued later
    clock.advance(5 * MINUTE)
    await raises(broker.get_records(result.next_cursor), ErrorCode.CURSOR_EXPIRED)


# -- found in review: cancellation and races at the edges ----------------------------------------

class SlowCreateStore(MemoryStore):
    """A real store whose create_stream takes a while, so a caller can go away in the middle."""

    async def create_stream(self, config):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        return await super().create_stream(config)


async def test_a_cancelled_create_stream_still_leaves_a_usable_stream() -> None:
    broker = Broker(SlowCreateStore(), cursor_secret=b"k" * 32)
    await broker.start()
    try:
        task = asyncio.ensure_future(broker.create_stream("s", 2))
        await asyncio.sleep(0.05)
        task.cancel()                     # e.g. the gRPC client's deadline passed
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):              # the store call finishes on the writer thread
            if (await broker.list_streams()).streams:
                break
            await asyncio.sleep(0.02)
        assert [c.stream_name for c in (await broker.list_streams()).streams] == ["s"]
        result = await broker.put_records("s", [PutEntry(b"x", partition_id="1")])
        assert result.seqs == [0] and not result.failures
        await broker.delete_stream("s")
        assert (await broker.list_streams()).streams == []
    finally:
        await broker.close()


class TrimDuringReadStore(MemoryStore):
    """A real store where a retention trim lands between the broker's bounds check and its read."""

    trim_on_read = False

    async def read(self, stream_id, partition, start_seq, limit, max_bytes):  # type: ignore[no-untyped-def]
        if self.trim_on_read:
            await self.trim(stream_id, partition, start_seq + 2)
        return await super().read(stream_id, partition, start_seq, limit, max_bytes)


async def test_a_trim_between_bounds_and_read_is_reported_not_skipped() -> None:
    store = TrimDuringReadStore()
    broker = Broker(store, cursor_secret=b"k" * 32)
    await broker.start()
    try:
        await broker.create_stream("s", 1)
        await broker.put_records("s", [PutEntry(b"%d" % i, partition_id="0") for i in range(5)])
        cursor = await broker.get_cursor("s", "0", "TRIM_HORIZON")
        store.trim_on_read = True
        with pytest.raises(BrokerError) as info:
            await broker.get_records(cursor)
        assert info.value.code is ErrorCode.CURSOR_RECORD_EXPIRED
    finally:
        await broker.close()


# -- projects are namespaces ---------------------------------------------------------------------


async def test_the_same_stream_name_in_two_projects_is_two_streams(broker: Broker) -> None:
    await broker.create_stream("s", 1, project="p1")
    await broker.create_stream("s", 2, project="p2")
    await raises(broker.create_stream("s", 1, project="p1"), ErrorCode.STREAM_EXISTS)
    await raises(broker.describe_stream("s"), ErrorCode.STREAM_NOT_FOUND)       # not in "default"
    assert [c.stream_name for c in (await broker.list_streams(project="p1")).streams] == ["s"]
    assert (await broker.list_streams()).total == 0
    assert (await broker.describe_stream("s", project="p2")).config.partition_count == 2

    one = await broker.put_records("s", [PutEntry(b"one", partition_id="0")], project="p1")
    two = await broker.put_records("s", [PutEntry(b"two", partition_id="0")], project="p2")
    assert one.seqs == two.seqs == [0]                                            # separate logs
    c1 = await broker.get_cursor("s", 0, "TRIM_HORIZON", project="p1")
    assert data_of((await broker.get_records(c1, project="p1")).records) == [b"one"]
    # a cursor is honoured only in its stream's project
    await raises(broker.get_records(c1, project="p2"), ErrorCode.INVALID_CURSOR)
    with pytest.raises(BrokerError) as info:
        await anext(broker.subscribe(c1, project="p2"))
    assert info.value.code is ErrorCode.INVALID_CURSOR

    await broker.delete_stream("s", project="p1")
    await raises(broker.get_cursor("s", "0", "TRIM_HORIZON", project="p1"), ErrorCode.STREAM_NOT_FOUND)
    c2 = await broker.get_cursor("s", "0", "TRIM_HORIZON", project="p2")
    assert data_of((await broker.get_records(c2, project="p2")).records) == [b"two"]


async def test_apps_checkpoints_and_groups_belong_to_a_project(broker: Broker, clock: FakeClock) -> None:
    for project in ("p1", "p2"):
        await broker.create_stream("s", 2, project=project)
        await broker.put_records("s", [PutEntry(b"x", partition_id="0")], project=project)
    await broker.create_app("app", project="p1")
    await raises(broker.describe_app("app", project="p2"), ErrorCode.APP_NOT_FOUND)
    await broker.create_app("app", project="p2")                 # the same name, another project
    await broker.commit_checkpoint("app", "s", "0", "0", "m1", project="p1")
    assert (await broker.get_checkpoint("app", "s", 0, project="p1")).metadata == "m1"  # type: ignore[union-attr]
    assert await broker.get_checkpoint("app", "s", 0, project="p2") is None
    assert (await broker.describe_app("app", project="p1")).stream_names == ("s",)
    assert (await broker.describe_app("app", project="p2")).stream_names == ()
    assert [a.name for a in (await broker.list_apps(project="p1"))[1]] == ["app"]
    assert (await broker.list_apps())[0] == 0
    # one member id in two projects' groups: two groups, each hands out all its partitions
    assert (await broker.heartbeat("app", "s", "m", project="p1"))[0] == [0, 1]
    assert (await broker.heartbeat("app", "s", "m", project="p2"))[0] == [0, 1]
    await broker.delete_app("app", project="p1")
    assert (await broker.describe_app("app", project="p2")).name == "app"
    await broker.delete_stream("s", project="p2")                # its checkpoints go with it
    await broker.create_stream("s", 2, project="p2")
    assert await broker.get_checkpoint("app", "s", 0, project="p2") is None


async def test_a_deleted_streams_checkpoints_go_for_every_app_and_only_its_own(broker: Broker) -> None:
    for project in ("p1", "p2"):
        for stream in ("s", "t"):
            await broker.create_stream(stream, 2, project=project)
            await broker.put_records(stream, [PutEntry(b"x", partition_id=str(p)) for p in (0, 1)], project=project)
        for app in ("a", "b"):
            await broker.create_app(app, project=project)
            for stream in ("s", "t"):
                for partition in ("0", "1"):
                    await broker.commit_checkpoint(app, stream, partition, "0", project=project)
    s_id = broker.catalogue.get("p1", "s").stream_id
    await broker.delete_stream("s", project="p1")
    left = [apps.checkpoint_ref(k) for k, _ in await broker.store.meta_scan(apps.checkpoint_project_prefix("p1"))]
    assert left and all(sid != s_id for sid, _ in left) and len(left) == 4   # a and b on t, 2 partitions each
    for app in ("a", "b"):   # the other project's stream of the same name keeps its checkpoints
        assert (await broker.get_checkpoint(app, "s", 1, project="p2")) is not None


@pytest.mark.parametrize("shared", [False, True], ids=["local leases", "store leases"])
async def test_a_deleted_apps_group_leases_go_with_it(db_path: str, clock: FakeClock, shared: bool) -> None:
    """An app deleted and made again under its name: its new members get every partition at once,
    not what leases of the deleted app's members left over until those run out (up to 5 minutes).
    The same name's group in another project keeps its leases."""
    store = RocksStore(db_path)
    broker = Broker(store, cursor_secret=SECRET, clock_ms=clock, leases=StoreLeases(store) if shared else None)
    await broker.start()
    try:
        for project in ("p1", "p2"):
            await broker.create_stream("s", 3, project=project)
            await broker.create_app("app", project=project)
        for project in ("p1", "p2"):
            assert (await broker.heartbeat("app", "s", "old", lease_ms=300_000, project=project))[0] == [0, 1, 2]
        await broker.delete_app("app", project="p1")
        await broker.create_app("app", project="p1")
        assert (await broker.heartbeat("app", "s", "new", project="p1"))[0] == [0, 1, 2]
        assert (await broker.heartbeat("app", "s", "new", project="p2"))[0] == []   # "old" holds them there
    finally:
        await broker.close()
        await store.close()


@contextlib.asynccontextmanager
async def _reopened(db_path: str, clock: FakeClock) -> AsyncIterator[Broker]:
    """A broker (re)started on the store at `db_path`, closed with it after."""
    store = RocksStore(db_path)
    b = Broker(store, cursor_secret=SECRET, clock_ms=clock)
    await b.start()
    try:
        yield b
    finally:
        await b.close()
        await store.close()


async def test_after_a_restart_no_partition_a_longer_lease_may_still_cover_is_granted(
        db_path: str, clock: FakeClock) -> None:
    """Members choose their leases (1 s to 5 min). A member with a 60 s lease holds both
    partitions; the broker restarts. A member with a 1 s lease must not be given them once its own
    lease has passed since the start: the first member may work on them for up to 60 s more, and
    re-claims them with its next heartbeat (the grace was the calling member's lease)."""
    async with _reopened(db_path, clock) as b:
        await b.create_stream("s", 2)
        await b.create_app("app")
        assert (await b.heartbeat("app", "s", "long", lease_ms=60 * SECOND))[0] == [0, 1]
    clock.advance(2 * SECOND)
    async with _reopened(db_path, clock) as b:
        for _ in range(10):   # every 1.5 s: a heartbeat each third of its lease would be closer
            assert (await b.heartbeat("app", "s", "short", lease_ms=SECOND))[0] == []
            clock.advance(1500)
        assert (await b.heartbeat("app", "s", "long", [0, 1], lease_ms=60 * SECOND))[0] == [0, 1]
        clock.advance(2 * MINUTE)          # every lease granted before the restart is over by now
        assert (await b.heartbeat("app", "s", "long", [0, 1], lease_ms=60 * SECOND))[0] == [0, 1]
        assert (await b.heartbeat("app", "s", "short", lease_ms=SECOND))[0] == []   # "long" is revoked one
        assert (await b.heartbeat("app", "s", "long", [0, 1], lease_ms=60 * SECOND))[0] == [0]
        assert (await b.heartbeat("app", "s", "long", [0], lease_ms=60 * SECOND))[0] == [0]
        assert (await b.heartbeat("app", "s", "short", lease_ms=SECOND))[0] == [1]


async def test_after_a_restart_a_new_group_is_served_at_once_and_an_old_one_after_a_lease(
        db_path: str, clock: FakeClock) -> None:
    """A group that never had a member waits for nothing. One that had members, whose leases all
    ran out while the broker was down, waits one lease of the caller: its members come back within
    it and get the balance they had, not whatever the first to return was given alone."""
    async with _reopened(db_path, clock) as b:
        await b.create_stream("s", 2)
        await b.create_app("old")
        await b.create_app("new")
        assert (await b.heartbeat("old", "s", "m", lease_ms=10 * SECOND))[0] == [0, 1]
    clock.advance(MINUTE)   # down for longer than the old group's horizon (two of its leases)
    async with _reopened(db_path, clock) as b:
        assert (await b.heartbeat("new", "s", "first", lease_ms=10 * SECOND))[0] == [0, 1]
        assert (await b.heartbeat("old", "s", "b", lease_ms=10 * SECOND))[0] == []
        clock.advance(3 * SECOND)
        assert (await b.heartbeat("old", "s", "a", lease_ms=10 * SECOND))[0] == []
        clock.advance(7 * SECOND)   # a lease after the start: both back, each its share
        assert (await b.heartbeat("old", "s", "a", lease_ms=10 * SECOND))[0] == [0]
        assert (await b.heartbeat("old", "s", "b", lease_ms=10 * SECOND))[0] == [1]


async def test_a_clock_set_back_at_a_restart_holds_partitions_no_longer_than_two_of_the_longest_leases(
        db_path: str, clock: FakeClock) -> None:
    async with _reopened(db_path, clock) as b:
        await b.create_stream("s", 1)
        await b.create_app("app")
        assert (await b.heartbeat("app", "s", "m", lease_ms=5 * MINUTE))[0] == [0]
    clock.advance(-HOUR)   # the horizon stored is an hour and ten minutes away on the new clock
    async with _reopened(db_path, clock) as b:
        assert (await b.heartbeat("app", "s", "other", lease_ms=5 * MINUTE))[0] == []
        clock.advance(10 * MINUTE)
        assert (await b.heartbeat("app", "s", "other", lease_ms=5 * MINUTE))[0] == [0]


async def test_the_restart_grace_is_stored_about_once_a_lease_and_goes_with_its_stream_and_app(
        broker: Broker, clock: FakeClock) -> None:
    from broker.core.leases import HORIZON_PREFIX
    await broker.create_stream("s", 1)
    await broker.create_stream("t", 1)
    await broker.create_app("a")
    await broker.create_app("b")
    horizons = []
    for _ in range(9):   # three leases' worth of heartbeats, one each third of a lease
        await broker.heartbeat("a", "s", "m", [0], lease_ms=30 * SECOND)
        [(_, value)] = await broker.store.meta_scan(HORIZON_PREFIX)
        horizons.append(int.from_bytes(value, "big"))
        assert horizons[-1] >= clock() + 30 * SECOND   # never behind a lease it granted
        clock.advance(10 * SECOND)
    assert len(set(horizons)) == 3, horizons
    await broker.heartbeat("b", "s", "m", lease_ms=30 * SECOND)
    await broker.heartbeat("a", "t", "m", lease_ms=30 * SECOND)
    assert len(await broker.store.meta_scan(HORIZON_PREFIX)) == 3
    await broker.delete_stream("t")
    await asyncio.sleep(0.05)   # the delete's chores (the leases of the stream's groups)
    assert len(await broker.store.meta_scan(HORIZON_PREFIX)) == 2
    await broker.delete_app("a")
    assert len(await broker.store.meta_scan(HORIZON_PREFIX)) == 1


@pytest.mark.parametrize("project", ["", "a/b", "x" * 65, "ü", None, "p\0"])
async def test_a_malformed_project_is_invalid_request(broker: Broker, project: object) -> None:
    await raises(broker.create_stream("s", 1, project=project), ErrorCode.INVALID_REQUEST)  # type: ignore[arg-type]
    await raises(broker.list_streams(project=project), ErrorCode.INVALID_REQUEST)  # type: ignore[arg-type]
    await raises(broker.describe_stream("s", project=project), ErrorCode.INVALID_REQUEST)  # type: ignore[arg-type]
    await raises(broker.create_app("a", project=project), ErrorCode.INVALID_REQUEST)  # type: ignore[arg-type]


@pytest.mark.parametrize("seq", ["9" * 5000, "1" + "0" * 19, "9223372036854775808", "-1", "1e3", " 1", "١",
                                 "", 2**63, -1, True, 1.5, None])
async def test_sequence_numbers_of_any_size_or_shape_are_invalid_sequence(broker: Broker, seq: object) -> None:
    await broker.create_stream("s", 1)
    await broker.put_records("s", [PutEntry(b"x", partition_id="0")])
    await broker.create_app("app")
    await raises(broker.get_cursor("s", "0", "AT_SEQUENCE_NUMBER", seq), ErrorCode.INVALID_SEQUENCE)
    await raises(broker.commit_checkpoint("app", "s", "0", seq), ErrorCode.INVALID_SEQUENCE)


async def test_integer_partition_ids_and_sequence_numbers_are_accepted(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    await broker.put_records("s", [PutEntry(b"a", partition_id=1), PutEntry(b"b", partition_id=1)])  # type: ignore[arg-type]
    cursor = await broker.get_cursor("s", 1, "AT_SEQUENCE_NUMBER", 1)
    assert data_of((await broker.get_records(cursor)).records) == [b"b"]
    await broker.create_app("app")
    await broker.commit_checkpoint("app", "s", 1, 1)
    assert (await broker.get_checkpoint("app", "s", 1)).seq == 1  # type: ignore[union-attr]


class SlowDropStore(MemoryStore):
    async def drop_stream(self, stream_id):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.2)
        return await super().drop_stream(stream_id)


async def test_a_cancelled_delete_still_drops_checkpoints_and_wakes_long_polls() -> None:
    broker = Broker(SlowDropStore(), cursor_secret=b"k" * 32)
    await broker.start()
    try:
        await broker.create_stream("s", 1)
        await broker.put_records("s", [PutEntry(b"x", partition_id="0")])
        await broker.create_app("app")
        await broker.commit_checkpoint("app", "s", "0", "0")
        poll = asyncio.ensure_future(broker.get_records(await broker.get_cursor("s", "0", "LATEST"), wait_ms=15000))
        await asyncio.sleep(0.05)
        task = asyncio.ensure_future(broker.delete_stream("s"))
        await asyncio.sleep(0.05)
        task.cancel()                      # e.g. the gRPC client's deadline passed mid-drop
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(BrokerError) as info:
            await asyncio.wait_for(poll, 5)    # woken by the delete, not at its 15 s deadline
        assert info.value.code is ErrorCode.STREAM_NOT_FOUND
        assert await broker.store.meta_scan(b"C") == []    # no checkpoint left behind
    finally:
        await broker.close()


# -- every stream of a project at once (the web console's streams page) ---------------------------

async def test_stream_summaries_give_every_stream_and_partition_bounds_of_one_project(broker: Broker,
                                                                                     clock: FakeClock) -> None:
    await broker.create_stream("b", 2)
    await broker.create_stream("a", 1)
    await broker.create_stream("a", 3, project="other")
    await put(broker, "b", b"x", b"y", partition_id="1")
    await put(broker, "a", b"z")
    clock.advance(25 * HOUR)
    await put(broker, "a", b"kept")
    await broker.enforce_retention()   # the first three records expire: first seqs move
    got = await broker.stream_summaries()
    assert [(s.config.stream_name, s.records, [(b.first_seq, b.next_seq) for b in s.first]) for s in got] == \
        [("a", 1, [(1, 2)]), ("b", 0, [(0, 0), (2, 2)])]
    assert got[0].last_ts == T0 + 25 * HOUR and got[1].last_ts == T0
    other = await broker.stream_summaries(project="other")
    assert [(s.config.stream_name, len(s.first)) for s in other] == [("a", 3)]
    assert await broker.stream_summaries(project="nobody") == []
    await raises(broker.stream_summaries(project="bad project"), ErrorCode.INVALID_REQUEST)


class UnsettledStore(MemoryStore):
    """A real store whose append to partition 1 could not be settled (maybe written, maybe not)."""

    async def append(self, batches):  # type: ignore[no-untyped-def]
        from broker.storage.base import OutcomeUnknown
        out = await super().append([b for b in batches if b.partition != 1])
        it = iter(out)
        return [OutcomeUnknown("not settled") if b.partition == 1 else next(it) for b in batches]


async def test_an_unsettled_partition_fails_the_whole_request_as_retriable() -> None:
    """An outcome the store could not settle is not a per-record failure (that would tell the
    producer the records were certainly not written): the request fails UNAVAILABLE, retriable."""
    broker = Broker(UnsettledStore(), cursor_secret=b"k" * 32)
    await broker.start()
    try:
        await broker.create_stream("s", 2)
        await raises(broker.put_records("s", [PutEntry(b"a", partition_id="0"), PutEntry(b"b", partition_id="1")]),
                     ErrorCode.UNAVAILABLE)
        result = await broker.put_records("s", [PutEntry(b"c", partition_id="0")])   # other partitions: as before
        assert not result.failures
    finally:
        await broker.close()


@pytest.mark.parametrize("member", ["", "x" * 201, None, 7])
async def test_heartbeat_and_leave_refuse_the_same_member_ids(broker: Broker, member: object) -> None:
    await broker.create_stream("s", 1)
    await broker.create_app("app")
    await raises(broker.heartbeat("app", "s", member), ErrorCode.INVALID_REQUEST)
    await raises(broker.leave_group("app", "s", member), ErrorCode.INVALID_REQUEST)


async def test_listing_apps_scans_the_store_twice_whatever_their_number() -> None:
    """The apps, then every checkpoint of the project once (each app's checkpoints were a scan of
    their own: 1,000 apps took ~1 s a list, and the console lists them every 2 s)."""
    class Counting(MemoryStore):
        scans = 0

        async def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
            self.scans += 1
            return await super().meta_scan(prefix)

    store = Counting()
    broker = Broker(store, cursor_secret=SECRET)
    await broker.start()
    try:
        for name in ("s", "t"):
            await broker.create_stream(name, 2)
            await broker.put_records(name, [PutEntry(b"x", partition_id="0")])
        for i in range(60):
            await broker.create_app(f"app{i:02d}")
            for stream in ("s", "t")[:1 + i % 2]:
                await broker.commit_checkpoint(f"app{i:02d}", stream, "0", "0")
        store.scans = 0
        total, page, more = await broker.list_apps(limit=100)
        assert store.scans == 2 and total == 60 and not more
        assert [a.stream_names for a in page[:2]] == [("s",), ("s", "t")]
        assert [a.name for a in (await broker.list_apps(limit=5, start_after="app10", stream_name="t"))[1]] == [
            "app11", "app13", "app15", "app17", "app19"]
    finally:
        await broker.close()
