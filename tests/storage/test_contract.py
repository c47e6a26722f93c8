"""The Store contract (broker/storage/base.py), run over every implementation.

`store` is parametrized over every registered store: the in-memory reference model, the RocksDB
store on a real directory and the JetStream store on a single-node nats-server (R=1, a prefix of
its own per test); every test in the first part runs against each, and again on a 3-node cluster at
R=3 in tests/cluster/test_store_contract_cluster.py. The last part is RocksDB only: it
closes and reopens the directory and checks that nothing the contract promises was lost.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from broker.errors import BrokerError, ErrorCode
from broker.model import (
    AppendBatch,
    ColumnDef,
    Packed,
    PartitionBounds,
    Record,
    ScaleEvent,
    StreamConfig,
    StreamSchema,
    payload_bytes,
)
from broker.settings import Settings
from broker.storage import STORES, keys, open_store
from broker.storage.base import Store
from broker.storage.rocks import RocksStore
from tests.storage.conftest import delete_prefix, fresh_prefix

BIG = 1 << 30  # a max_bytes / limit that never binds


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every registered store, built through the registry as the broker builds it."""
    if request.param == "jetstream":
        url = request.getfixturevalue("jetstream_server").url
        prefix = fresh_prefix()
        s = await open_store(Settings(store="jetstream", data_dir=str(tmp_path / "data"), nats_servers=url,
                                      nats_prefix=prefix, replicas=1))
        yield s
        await s.close()
        await delete_prefix(url, prefix)
        return
    s = await open_store(Settings(store=request.param, data_dir=str(tmp_path / "data")))
    yield s
    await s.close()


def batch(sid: int, partition: int, ts: int, *payloads: bytes, key: str | None = None) -> AppendBatch:
    return AppendBatch(sid, partition, ts, [(key, p) for p in payloads])


def seqs(records: list[Record]) -> list[int]:
    return [r.seq for r in records]


def payloads(records: list[Record]) -> list[bytes]:
    return [r.data for r in records]


async def fill(store: Store, sid: int, partition: int, n: int, ts: int = 1000, size: int = 1) -> None:
    """n records numbered by payload: b"0", b"1", ... (padded to `size` bytes)."""
    await store.append([batch(sid, partition, ts, *(str(i).encode().ljust(size, b".") for i in range(n)))])


def assert_code(exc_info: pytest.ExceptionInfo[BrokerError], code: ErrorCode) -> None:
    assert isinstance(exc_info.value, BrokerError)
    assert exc_info.value.code is code


# -- streams ---------------------------------------------------------------------------------------


async def test_create_assigns_fresh_ids_and_list_is_sorted_by_name(store: Store) -> None:
    b = await store.create_stream(StreamConfig("beta", 2, retention_hours=48, data_type="JSON", created_ms=7))
    a = await store.create_stream(StreamConfig("alpha", 1))
    assert a.stream_id > 0 and b.stream_id > 0 and a.stream_id != b.stream_id
    assert (b.stream_name, b.partition_count, b.retention_hours, b.data_type, b.created_ms) == \
        ("beta", 2, 48, "JSON", 7)
    assert (await store.list_streams()) == [a, b]


async def test_create_existing_name_is_stream_exists(store: Store) -> None:
    first = await store.create_stream(StreamConfig("s", 1))
    with pytest.raises(BrokerError) as exc_info:
        await store.create_stream(StreamConfig("s", 3))
    assert_code(exc_info, ErrorCode.STREAM_EXISTS)
    assert (await store.list_streams()) == [first]  # the failed create changed nothing


async def test_the_same_name_in_two_projects_is_two_streams(store: Store) -> None:
    a = await store.create_stream(StreamConfig("s", 1, project="p1"))
    b = await store.create_stream(StreamConfig("s", 2, project="p2"))
    c = await store.create_stream(StreamConfig("s", 1))
    assert len({a.stream_id, b.stream_id, c.stream_id}) == 3
    assert [(x.project, x.stream_name) for x in await store.list_streams()] == [("default", "s"), ("p1", "s"),
                                                                               ("p2", "s")]
    with pytest.raises(BrokerError) as exc_info:
        await store.create_stream(StreamConfig("s", 1, project="p1"))
    assert_code(exc_info, ErrorCode.STREAM_EXISTS)
    await fill(store, a.stream_id, 0, 2)
    await store.drop_stream(b.stream_id)
    assert await store.list_streams() == [c, a]
    assert payloads(await store.read(a.stream_id, 0, 0, 10, BIG)) == [b"0", b"1"]


async def test_drop_unknown_is_stream_not_found(store: Store) -> None:
    with pytest.raises(BrokerError) as exc_info:
        await store.drop_stream(987654)
    assert_code(exc_info, ErrorCode.STREAM_NOT_FOUND)


async def test_drop_removes_stream_and_its_partitions(store: Store) -> None:
    keep = await store.create_stream(StreamConfig("keep", 1))
    gone = await store.create_stream(StreamConfig("gone", 2))
    await fill(store, gone.stream_id, 1, 3)
    await fill(store, keep.stream_id, 0, 2)
    await store.drop_stream(gone.stream_id)
    assert (await store.list_streams()) == [keep]
    for call in (lambda: store.bounds(gone.stream_id, 1), lambda: store.read(gone.stream_id, 1, 0, 10, BIG)):
        with pytest.raises(BrokerError) as exc_info:
            await call()
        assert_code(exc_info, ErrorCode.STREAM_NOT_FOUND)
    with pytest.raises(BrokerError) as exc_info:
        await store.drop_stream(gone.stream_id)
    assert_code(exc_info, ErrorCode.STREAM_NOT_FOUND)
    assert payloads(await store.read(keep.stream_id, 0, 0, 10, BIG)) == [b"0", b"1"]


async def test_stream_ids_are_never_reused_and_a_recreated_name_starts_empty(store: Store) -> None:
    old = await store.create_stream(StreamConfig("s", 1))
    await fill(store, old.stream_id, 0, 5, ts=5000)
    await store.drop_stream(old.stream_id)
    new = await store.create_stream(StreamConfig("s", 1))
    assert new.stream_id not in (0, old.stream_id)
    assert (await store.bounds(new.stream_id, 0)) == PartitionBounds(0, 0, 0)
    assert (await store.read(new.stream_id, 0, 0, 10, BIG)) == []
    assert (await store.append([batch(new.stream_id, 0, 10, b"x")])) == [0]
    other = await store.create_stream(StreamConfig("other", 1))
    assert other.stream_id not in (old.stream_id, new.stream_id)


# -- append ----------------------------------------------------------------------------------------


async def test_append_numbers_from_zero_consecutively_per_partition(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 3))).stream_id
    assert (await store.append([batch(sid, 0, 1, b"a", b"b", b"c")])) == [0]
    assert (await store.append([batch(sid, 1, 1, b"p1")])) == [0]        # partitions number independently
    assert (await store.append([batch(sid, 0, 1, b"d")])) == [3]
    assert (await store.append([batch(sid, 1, 1, b"q1", b"r1")])) == [1]
    assert seqs(await store.read(sid, 0, 0, 10, BIG)) == [0, 1, 2, 3]
    assert payloads(await store.read(sid, 0, 0, 10, BIG)) == [b"a", b"b", b"c", b"d"]
    assert payloads(await store.read(sid, 1, 0, 10, BIG)) == [b"p1", b"q1", b"r1"]
    assert (await store.bounds(sid, 2)) == PartitionBounds(0, 0, 0)


async def test_a_packed_batch_is_stored_as_its_records(store: Store) -> None:
    """model.Packed (keyless records in the batch layout, as tsdb workers send them): the same
    records, numbering and read-back as the (None, data) items it stands for, empty payloads too."""
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    datas = [b"a", b"", b"ccc" * 100, b"d"]
    packed = Packed.of(datas)
    assert packed.datas() == datas and list(packed) == [(None, d) for d in datas] and len(packed) == 4
    assert payload_bytes(packed) == payload_bytes([(None, d) for d in datas]) == 302 and packed.biggest == 300
    assert await store.append([AppendBatch(sid, 0, 5, packed), batch(sid, 0, 6, b"e")]) == [0, 4]
    assert await store.append([AppendBatch(sid, 0, 7, Packed.of([b"f"]))]) == [5]
    records = await store.read(sid, 0, 0, 10, BIG)
    assert [(r.seq, r.partition_key, r.data) for r in records] == \
        [(i, None, d) for i, d in enumerate([*datas, b"e", b"f"])]
    assert payloads(await store.read(sid, 0, 2, 2, BIG)) == [b"ccc" * 100, b"d"]


async def test_append_several_batches_for_one_partition_in_one_call(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    firsts = await store.append([batch(sid, 0, 1, b"a", b"b"), batch(sid, 1, 1, b"x"),
                                 batch(sid, 0, 1, b"c", b"d", b"e"), batch(sid, 0, 1, b"f")])
    assert firsts == [0, 0, 2, 5]
    recs = await store.read(sid, 0, 0, 100, BIG)
    assert seqs(recs) == list(range(6))
    assert payloads(recs) == [b"a", b"b", b"c", b"d", b"e", b"f"]
    assert (await store.bounds(sid, 0)).next_seq == 6 and (await store.bounds(sid, 1)).next_seq == 1


async def test_append_to_a_dropped_stream_yields_none_and_writes_the_rest(store: Store) -> None:
    live = (await store.create_stream(StreamConfig("live", 1))).stream_id
    dead = (await store.create_stream(StreamConfig("dead", 1))).stream_id
    await fill(store, live, 0, 2)
    await store.drop_stream(dead)
    firsts = await store.append([batch(live, 0, 1, b"x"), batch(dead, 0, 1, b"lost"), batch(live, 0, 1, b"y", b"z")])
    assert firsts == [2, None, 3]
    assert payloads(await store.read(live, 0, 0, 10, BIG)) == [b"0", b"1", b"x", b"y", b"z"]
    assert (await store.append([batch(dead, 0, 1, b"lost")])) == [None]
    assert [c.stream_name for c in (await store.list_streams())] == ["live"]  # the dropped stream did not come back


# -- read ------------------------------------------------------------------------------------------


async def test_read_start_and_limit(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    await fill(store, sid, 0, 10)
    assert seqs(await store.read(sid, 0, 3, 4, BIG)) == [3, 4, 5, 6]
    assert payloads(await store.read(sid, 0, 3, 4, BIG)) == [b"3", b"4", b"5", b"6"]
    assert seqs(await store.read(sid, 0, 8, 100, BIG)) == [8, 9]
    assert seqs(await store.read(sid, 0, 0, 1, BIG)) == [0]
    assert (await store.read(sid, 0, 10, 5, BIG)) == []   # at next_seq
    assert (await store.read(sid, 0, 50, 5, BIG)) == []   # beyond it


async def test_read_max_bytes_stops_before_exceeding(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    await fill(store, sid, 0, 6, size=10)               # six records of exactly 10 bytes
    assert seqs(await store.read(sid, 0, 0, 100, 30)) == [0, 1, 2]    # exactly at the limit: included
    assert seqs(await store.read(sid, 0, 0, 100, 29)) == [0, 1]
    assert seqs(await store.read(sid, 0, 2, 100, 25)) == [2, 3]
    assert seqs(await store.read(sid, 0, 0, 2, 1000)) == [0, 1]       # limit binds before max_bytes


async def test_read_returns_one_record_even_when_it_exceeds_max_bytes(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    await store.append([batch(sid, 0, 1, b"x" * 100, b"y", b"z")])
    assert payloads(await store.read(sid, 0, 0, 10, 10)) == [b"x" * 100]
    assert payloads(await store.read(sid, 0, 0, 10, 0)) == [b"x" * 100]
    assert payloads(await store.read(sid, 0, 1, 10, 1)) == [b"y"]


async def test_read_block_is_read_as_columns(store: Store) -> None:
    """read_block (the scan path) returns what read returns: the same records, payloads and
    timestamps, for every start, limit and byte budget, across stored batch boundaries."""
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    for ts, n in ((100, 3), (200, 1), (300, 5)):
        await store.append([batch(sid, 0, ts, *(f"{ts}-{i}".encode().ljust(4 + i, b"+") for i in range(n)))])
    await store.trim(sid, 0, 1)
    for start in range(11):
        for limit in (1, 2, 4, 9, 100):
            for max_bytes in (0, 6, 13, 40, BIG):
                records = await store.read(sid, 0, start, limit, max_bytes)
                block = await store.read_block(sid, 0, start, limit, max_bytes)
                assert block.data == payloads(records)
                if records:
                    assert block.first_seq == records[0].seq and block.next_seq == records[-1].seq + 1
                stamps = [ts for n, ts in block.times for _ in range(n)]
                assert stamps == [r.timestamp_ms for r in records]
                assert all(n > 0 for n, _ in block.times)


async def test_a_typed_stream_keeps_its_schema(store: Store) -> None:
    schema = StreamSchema((ColumnDef("a", "int32"), ColumnDef("b", "nullable(string)", "'x'")), "d", "append", "a")
    created = await store.create_stream(StreamConfig("typed", 2, project="ws", schema=schema))
    assert created.schema == schema
    assert [c.schema for c in await store.list_streams()] == [schema]


async def test_read_empty_payloads_never_exceed_max_bytes(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    await store.append([batch(sid, 0, 1, b"", b"", b"", b"a")])
    assert payloads(await store.read(sid, 0, 0, 10, 0)) == [b"", b"", b""]


@pytest.mark.parametrize("key", [None, "", "k", "ключ-🔑", "x" * 256])
async def test_partition_key_and_payload_round_trip(store: Store, key: str | None) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    data = bytes(range(256))
    await store.append([batch(sid, 0, 42, data, key=key)])
    assert (await store.read(sid, 0, 0, 10, BIG)) == [Record(0, 42, key, data)]


async def test_mixed_keys_in_one_batch_round_trip(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    await store.append([AppendBatch(sid, 0, 5, [(None, b"a"), ("k1", b"b"), (None, b""), ("k2", b"\x00\xff")])])
    assert (await store.read(sid, 0, 0, 10, BIG)) == [Record(0, 5, None, b"a"), Record(1, 5, "k1", b"b"),
                                              Record(2, 5, None, b""), Record(3, 5, "k2", b"\x00\xff")]


# -- bounds and time -------------------------------------------------------------------------------


async def test_bounds_track_first_next_and_last_timestamp(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    assert (await store.bounds(sid, 0)) == PartitionBounds(0, 0, 0)
    await store.append([batch(sid, 0, 1000, b"a", b"b", b"c")])
    assert (await store.bounds(sid, 0)) == PartitionBounds(0, 3, 1000)
    assert (await store.bounds(sid, 0)).last_seq == 2
    await store.append([batch(sid, 0, 2500, b"d")])
    assert (await store.bounds(sid, 0)) == PartitionBounds(0, 4, 2500)
    assert (await store.bounds(sid, 1)) == PartitionBounds(0, 0, 0)


async def test_bounds_many_answers_each_pair_in_order_and_none_for_a_dropped_stream(store: Store) -> None:
    a = (await store.create_stream(StreamConfig("a", 2))).stream_id
    b = (await store.create_stream(StreamConfig("b", 1))).stream_id
    gone = (await store.create_stream(StreamConfig("gone", 1))).stream_id
    await store.append([batch(a, 1, 1000, b"x", b"y"), batch(b, 0, 2000, b"z")])
    await store.trim(a, 1, 1)
    await store.drop_stream(gone)
    pairs = [(b, 0), (a, 1), (gone, 0), (a, 0)]
    assert await store.bounds_many(pairs) == [PartitionBounds(0, 1, 2000), PartitionBounds(1, 2, 1000), None,
                                              PartitionBounds(0, 0, 0)]
    assert await store.bounds_many(pairs * 40) == (await store.bounds_many(pairs)) * 40   # past any inline budget
    assert await store.bounds_many([]) == []


async def test_timestamps_never_decrease_within_a_partition(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    await store.append([batch(sid, 0, 5000, b"a")])
    (await store.append([batch(sid, 0, 1000, b"b")]))                       # older clock: raised to 5000
    await store.append([batch(sid, 0, 7000, b"c"), batch(sid, 0, 6000, b"d"), batch(sid, 1, 1000, b"other")])
    recs = await store.read(sid, 0, 0, 10, BIG)
    assert [r.timestamp_ms for r in recs] == [5000, 5000, 7000, 7000]
    assert (await store.bounds(sid, 0)).last_ts == 7000
    assert (await store.read(sid, 1, 0, 10, BIG))[0].timestamp_ms == 1000   # partitions keep their own clock
    assert (await store.bounds(sid, 1)).last_ts == 1000


async def test_seq_at_time(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    assert (await store.seq_at_time(sid, 0, 123)) == 0                      # empty partition: next_seq
    await store.append([batch(sid, 0, 100, b"0", b"1"), batch(sid, 0, 200, b"2"), batch(sid, 0, 300, b"3", b"4")])
    expected = {0: 0, 99: 0, 100: 0, 101: 2, 150: 2, 200: 2, 201: 3, 299: 3, 300: 3, 301: 5, 10**12: 5}
    assert {t: (await store.seq_at_time(sid, 0, t)) for t in expected} == expected
    await store.trim(sid, 0, 2)
    assert (await store.seq_at_time(sid, 0, 50)) == 2                       # before all retained: first retained
    assert (await store.seq_at_time(sid, 0, 250)) == 3
    assert (await store.seq_at_time(sid, 1, 50)) == 0


# -- trim ------------------------------------------------------------------------------------------


async def test_trim_drops_records_and_keeps_numbering(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    await fill(store, sid, 0, 10, ts=100)
    await fill(store, sid, 1, 3, ts=100)
    await store.trim(sid, 0, 4)
    assert (await store.bounds(sid, 0)) == PartitionBounds(4, 10, 100)
    assert seqs(await store.read(sid, 0, 0, 100, BIG)) == list(range(4, 10))   # start before first: from first
    assert payloads(await store.read(sid, 0, 4, 1, BIG)) == [b"4"]
    assert (await store.bounds(sid, 1)) == PartitionBounds(0, 3, 100)           # other partition untouched
    assert (await store.append([batch(sid, 0, 200, b"new")])) == [10]
    assert (await store.read(sid, 0, 10, 1, BIG)) == [Record(10, 200, None, b"new")]


async def test_trim_beyond_next_clamps_and_numbering_continues(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    await fill(store, sid, 0, 5, ts=100)
    await store.trim(sid, 0, 1000)
    assert (await store.bounds(sid, 0)) == PartitionBounds(5, 5, 100)
    assert (await store.read(sid, 0, 0, 100, BIG)) == []
    assert (await store.seq_at_time(sid, 0, 0)) == 5
    assert (await store.append([batch(sid, 0, 50, b"a", b"b")])) == [5]
    assert (await store.bounds(sid, 0)) == PartitionBounds(5, 7, 100)
    assert seqs(await store.read(sid, 0, 0, 100, BIG)) == [5, 6]


async def test_trim_is_idempotent_and_never_moves_backwards(store: Store) -> None:
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    (await store.trim(sid, 0, 3))                                             # empty partition: clamps to 0
    assert (await store.bounds(sid, 0)) == PartitionBounds(0, 0, 0)
    await fill(store, sid, 0, 8)
    await store.trim(sid, 0, 5)
    await store.trim(sid, 0, 5)
    assert (await store.bounds(sid, 0)).first_seq == 5
    await store.trim(sid, 0, 2)
    await store.trim(sid, 0, 0)
    assert (await store.bounds(sid, 0)).first_seq == 5
    assert seqs(await store.read(sid, 0, 0, 100, BIG)) == [5, 6, 7]
    await store.trim(sid, 0, 6)
    assert seqs(await store.read(sid, 0, 0, 100, BIG)) == [6, 7]


# -- metadata: meta_get / meta_scan / meta_write / meta_cas ------------------------------------------


async def test_meta_get_of_a_missing_key_is_none_and_a_put_round_trips(store: Store) -> None:
    assert (await store.meta_get(b"app/a")) is None
    await store.meta_write({b"app/a": b"one", b"app/b": b""})
    assert (await store.meta_get(b"app/a")) == b"one"
    assert (await store.meta_get(b"app/b")) == b""                 # an empty value is a value, not a delete
    assert (await store.meta_get(b"app/")) is None                  # no prefix matching in meta_get
    assert (await store.meta_get(b"app/aa")) is None
    await store.meta_write({b"app/a": b"two"})                    # overwrite
    assert (await store.meta_get(b"app/a")) == b"two"


async def test_meta_write_applies_puts_and_deletes_together(store: Store) -> None:
    await store.meta_write({b"k1": b"v1", b"k2": b"v2", b"k3": b"v3"})
    await store.meta_write({b"k1": None, b"k2": b"v2'", b"k4": b"v4", b"never": None})  # deleting an absent key: fine
    assert (await store.meta_scan(b"")) == [(b"k2", b"v2'"), (b"k3", b"v3"), (b"k4", b"v4")]
    assert (await store.meta_get(b"k1")) is None and (await store.meta_get(b"never")) is None
    await store.meta_write({})                                     # nothing to do: changes nothing
    assert (await store.meta_scan(b"k")) == [(b"k2", b"v2'"), (b"k3", b"v3"), (b"k4", b"v4")]
    await store.meta_write({b"k2": None, b"k3": None, b"k4": None})
    assert (await store.meta_scan(b"")) == []


async def test_meta_write_is_seen_whole_or_not_at_all_by_concurrent_readers(store: Store) -> None:
    """Atomicity as a reader sees it: every write sets all of k0..k7 to round i and moves the one
    "d" key from round i-1 to round i; a scan racing the writes must never see a mix of rounds."""
    names = [b"k%d" % i for i in range(8)]
    await store.meta_write({**dict.fromkeys(names, b"0"), b"d0": b"0"})
    done = asyncio.Event()
    torn: list[list[tuple[bytes, bytes]]] = []
    scans = 0

    async def reader() -> None:
        # RocksStore scans on a pool thread while the writes run on its writer thread: a real race
        nonlocal scans
        while not done.is_set() and len(torn) < 5:
            rows = await store.meta_scan(b"")
            scans += 1
            values = {v for k, v in rows if k.startswith(b"k")}
            marks = [(k, v) for k, v in rows if k.startswith(b"d")]
            if len(values) != 1 or len(rows) != 9 or len(marks) != 1 or marks[0] != (b"d" + marks[0][1], *values):
                torn.append(rows)
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL over often, so scans land between (and inside) writes
    rounds = 0
    deadline = time.monotonic() + 20
    try:
        # write until the reader has raced enough scans against us (a fixed round count finished
        # before the reader was ever scheduled on a loaded machine), bounded in time
        while (rounds < 1000 or scans <= 50) and time.monotonic() < deadline:
            rounds += 1
            r = str(rounds).encode()
            await store.meta_write({**dict.fromkeys(names, r), b"d" + str(rounds - 1).encode(): None, b"d" + r: r})
            await asyncio.sleep(0)   # a store that never suspends would otherwise starve the reader
    finally:
        done.set()
        await asyncio.wait_for(task, 10)
        sys.setswitchinterval(switch)
    assert torn == [], torn[:2]
    assert scans > 50
    assert (await store.meta_scan(b"d")) == [(b"d%d" % rounds, b"%d" % rounds)]


async def test_meta_scan_is_in_key_order_and_bounded_by_the_prefix(store: Store) -> None:
    inside = [b"ab", b"ab\x00", b"ab\x00\xff", b"ab\x01", b"ab/x", b"abc", b"ab\xfe\xff", b"ab\xff", b"ab\xff\x00",
              b"ab\xff\xff", b"ab\xff\xff\xff"]
    outside = [b"", b"a", b"aa\xff", b"aa\xff\xff", b"a\xff", b"ac", b"ac\x00", b"b", b"AB", b"\xff", b"\xff\xff"]
    await store.meta_write({k: b"v" + k for k in inside + outside})
    assert (await store.meta_scan(b"ab")) == [(k, b"v" + k) for k in sorted(inside)]
    assert [k for k, _ in (await store.meta_scan(b"ab\xff"))] == \
        [b"ab\xff", b"ab\xff\x00", b"ab\xff\xff", b"ab\xff\xff\xff"]
    assert [k for k, _ in (await store.meta_scan(b"ab\xff\xff"))] == [b"ab\xff\xff", b"ab\xff\xff\xff"]
    assert [k for k, _ in (await store.meta_scan(b"\xff"))] == [b"\xff", b"\xff\xff"]   # a prefix of only 0xff bytes
    assert [k for k, _ in (await store.meta_scan(b"a"))] == sorted(k for k in inside + outside if k.startswith(b"a"))
    assert [k for k, _ in (await store.meta_scan(b""))] == sorted(inside + outside)   # everything, in order
    assert (await store.meta_scan(b"abd")) == [] and (await store.meta_scan(b"zzz")) == []


async def test_meta_is_isolated_from_streams_and_records(store: Store) -> None:
    """Metadata keys live in their own space: a key spelled like a record, stream or high-water
    mark key neither reads nor clobbers the log, and the log never shows up in a meta scan."""
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    await fill(store, sid, 0, 3)
    lookalikes = [keys.record_key(sid, 0, 0), keys.record_key(sid, 0, 3), keys.stream_key("default", "s"),
                  keys.partition_key(keys.HWM, sid, 0), keys.partition_key(keys.TRIM, sid, 0), keys.NEXT_STREAM_ID]
    assert all([(await store.meta_get(k)) is None for k in lookalikes])
    assert (await store.meta_scan(b"")) == []
    await store.meta_write(dict.fromkeys(lookalikes, b"\x00" * 30))
    assert (await store.bounds(sid, 0)) == PartitionBounds(0, 3, 1000)
    assert payloads(await store.read(sid, 0, 0, 10, BIG)) == [b"0", b"1", b"2"]
    assert (await store.list_streams())[0].stream_name == "s" and len(await store.list_streams()) == 1
    assert (await store.append([batch(sid, 0, 1000, b"3")])) == [3]                  # numbering untouched
    other = await store.create_stream(StreamConfig("t", 1))
    assert other.stream_id != sid
    await store.meta_write(dict.fromkeys(lookalikes))                          # deleting them spares the log
    assert payloads(await store.read(sid, 0, 0, 10, BIG)) == [b"0", b"1", b"2", b"3"]
    assert [c.stream_name for c in (await store.list_streams())] == ["s", "t"]
    # and the other way round: dropping or trimming a stream leaves metadata alone
    await store.meta_write({b"R": b"r", b"S" + b"s": b"cfg?", b"ckpt/s": b"7"})
    await store.trim(sid, 0, 4)
    await store.drop_stream(sid)
    assert (await store.meta_scan(b"")) == [(b"R", b"r"), (b"Ss", b"cfg?"), (b"ckpt/s", b"7")]


async def test_meta_cas_sets_only_when_the_value_is_the_expected_one(store: Store) -> None:
    assert await store.meta_cas(b"L", None, b"a")                  # create if absent
    assert not await store.meta_cas(b"L", None, b"b")              # it exists now
    assert await store.meta_get(b"L") == b"a"
    assert not await store.meta_cas(b"L", b"x", b"b")              # another value
    assert not await store.meta_cas(b"L", b"", b"b")               # empty is a value, not absence
    assert await store.meta_cas(b"L", b"a", b"b")
    assert await store.meta_get(b"L") == b"b"
    assert await store.meta_cas(b"L", b"b", b"")                   # to an empty value
    assert await store.meta_get(b"L") == b""
    assert not await store.meta_cas(b"L", None, b"c")
    assert await store.meta_cas(b"L", b"", b"c")
    assert not await store.meta_cas(b"L", b"b", None)              # a delete of another value: refused
    assert await store.meta_cas(b"L", b"c", None)                  # a delete
    assert await store.meta_get(b"L") is None
    assert not await store.meta_cas(b"L", b"c", None)              # gone: nothing to compare with
    assert await store.meta_cas(b"L", None, None)                  # absent stays absent: True, no change
    assert await store.meta_get(b"L") is None
    assert await store.meta_cas(b"L", None, b"again")              # created again after a delete
    assert await store.meta_scan(b"") == [(b"L", b"again")]


async def test_meta_cas_sees_meta_write_and_long_binary_keys(store: Store) -> None:
    key = b"\x00long key \xff" * 4                                   # past the JetStream key's one-token prefix
    await store.meta_write({key: b"w", b"other": b"o"})
    assert not await store.meta_cas(key, None, b"c")
    assert await store.meta_cas(key, b"w", b"c")
    await store.meta_write({key: None})
    assert await store.meta_cas(key, None, b"d")
    assert await store.meta_scan(b"\x00long") == [(key, b"d")]
    assert await store.meta_get(b"other") == b"o"


async def test_meta_cas_read_modify_write_loses_no_update(store: Store) -> None:
    """Concurrent increments of one counter, each read -> meta_cas -> retry on False: every
    increment lands exactly once (what leases and registries built on meta_cas rely on)."""
    tasks, rounds = 6, 15

    async def bump() -> int:
        conflicts = 0
        for _ in range(rounds):
            while True:
                old = await store.meta_get(b"n")
                new = str(int(old or b"0") + 1).encode()
                if await store.meta_cas(b"n", old, new):
                    break
                conflicts += 1
            await asyncio.sleep(0)
        return conflicts

    await asyncio.gather(*(bump() for _ in range(tasks)))
    assert await store.meta_get(b"n") == str(tasks * rounds).encode()


async def test_update_stream_adds_partitions_and_keeps_every_record(store: Store) -> None:
    """UpdatePartitionCount's storage half: a new layout of the same stream; partitions past the
    old ones exist (empty, numbered from 0), the old ones keep their records and numbering."""
    s = await store.create_stream(StreamConfig("s", 2))
    await fill(store, s.stream_id, 1, 3)
    up = replace(s, partition_count=4, scale_events=(ScaleEvent(5, 2, 4, (0, 3, 0, 0)),))
    assert await store.update_stream(up) == up
    assert await store.list_streams() == [up]
    assert await store.bounds(s.stream_id, 3) == PartitionBounds(0, 0, 0)
    assert (await store.append([batch(s.stream_id, 3, 9, b"x"), batch(s.stream_id, 1, 9, b"y")])) == [0, 3]
    assert payloads(await store.read(s.stream_id, 1, 0, BIG, BIG)) == [b"0", b"1", b"2", b"y"]
    # a scale-down keeps the closed partitions readable: they stay in readable_partition_count
    down = replace(up, partition_count=1, scale_events=(*up.scale_events, ScaleEvent(6, 4, 1, (0, 4, 0, 1))))
    await store.update_stream(down)
    assert down.readable_partition_count == 4
    assert payloads(await store.read(s.stream_id, 3, 0, BIG, BIG)) == [b"x"]
    await store.drop_stream(s.stream_id)
    assert await store.list_streams() == []


async def test_update_unknown_stream_is_stream_not_found(store: Store) -> None:
    with pytest.raises(BrokerError) as e:
        await store.update_stream(StreamConfig("nope", 2, stream_id=99))
    assert_code(e, ErrorCode.STREAM_NOT_FOUND)


# -- RocksDB only: restarts ------------------------------------------------------------------------


@pytest.fixture
def rocks_dir(tmp_path: Path) -> str:
    return str(tmp_path / "rocks")


@pytest.fixture
async def open_rocks(rocks_dir: str) -> AsyncIterator[Callable[[], RocksStore]]:
    """Open the directory; every store opened through this is closed after the test."""
    opened: list[RocksStore] = []

    def open_() -> RocksStore:
        s = RocksStore(rocks_dir)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()


async def test_restart_keeps_a_typed_stream_schema(open_rocks: Callable[[], RocksStore]) -> None:
    schema = StreamSchema((ColumnDef("t", "datetime64(3)"), ColumnDef("j", "json")), mode="append")
    store = open_rocks()
    await store.create_stream(StreamConfig("typed", 1, project="ws", schema=schema))
    await store.close()
    store = open_rocks()
    assert [(c.key, c.schema) for c in await store.list_streams()] == [(("ws", "typed"), schema)]


async def test_restart_keeps_a_scaled_layout(open_rocks: Callable[[], RocksStore]) -> None:
    store = open_rocks()
    s = await store.create_stream(StreamConfig("scaled", 2))
    await fill(store, s.stream_id, 0, 2)
    scaled = await store.update_stream(replace(s, partition_count=3,
                                               scale_events=(ScaleEvent(7, 2, 3, (2, 0, 0)),)))
    await fill(store, s.stream_id, 2, 1)
    await store.close()
    store = open_rocks()
    assert await store.list_streams() == [scaled]
    assert (await store.bounds(s.stream_id, 2)).next_seq == 1
    assert (await store.append([batch(s.stream_id, 0, 9, b"z")])) == [2]


async def test_restart_keeps_streams_records_bounds_and_trim_point(open_rocks: Callable[[], RocksStore]) -> None:
    s = open_rocks()
    a = await s.create_stream(StreamConfig("a", 2, retention_hours=72, created_ms=99))
    b = await s.create_stream(StreamConfig("b", 1))
    (await s.append([batch(a.stream_id, 0, 1000, b"a0", b"a1", b"a2", b"a3", key="k"),
              batch(a.stream_id, 1, 2000, b"x"), batch(b.stream_id, 0, 3000, b"b0")]))
    await s.trim(a.stream_id, 0, 2)
    await s.drop_stream(b.stream_id)
    await s.close()

    s = open_rocks()
    assert (await s.list_streams()) == [a]
    assert (await s.bounds(a.stream_id, 0)) == PartitionBounds(2, 4, 1000)
    assert (await s.bounds(a.stream_id, 1)) == PartitionBounds(0, 1, 2000)
    assert (await s.read(a.stream_id, 0, 0, 10, BIG)) == [Record(2, 1000, "k", b"a2"), Record(3, 1000, "k", b"a3")]
    assert (await s.read(a.stream_id, 1, 0, 10, BIG)) == [Record(0, 2000, None, b"x")]
    assert (await s.seq_at_time(a.stream_id, 0, 0)) == 2
    # numbering continues, the time floor survived, a dropped id stays dead
    assert (await s.append([batch(a.stream_id, 0, 500, b"a4"), batch(b.stream_id, 0, 1, b"lost")])) == [4, None]
    assert (await s.read(a.stream_id, 0, 4, 10, BIG)) == [Record(4, 1000, None, b"a4")]
    c = await s.create_stream(StreamConfig("b", 1))
    assert c.stream_id not in (a.stream_id, b.stream_id)
    assert (await s.bounds(c.stream_id, 0)) == PartitionBounds(0, 0, 0)


async def test_restart_after_trimming_everything_never_reuses_seqs(open_rocks: Callable[[], RocksStore]) -> None:
    s = open_rocks()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    await fill(s, sid, 0, 7, ts=100)
    await s.trim(sid, 0, 7)
    await s.close()
    s = open_rocks()
    assert (await s.bounds(sid, 0)) == PartitionBounds(7, 7, 100)
    assert (await s.append([batch(sid, 0, 200, b"after")])) == [7]
    await s.close()
    s = open_rocks()
    assert (await s.read(sid, 0, 0, 10, BIG)) == [Record(7, 200, None, b"after")]
    assert (await s.bounds(sid, 0)) == PartitionBounds(7, 8, 200)


async def test_restart_many_times_keeps_counting(open_rocks: Callable[[], RocksStore]) -> None:
    s = open_rocks()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    for round_ in range(5):
        assert (await s.append([batch(sid, 0, round_, str(round_).encode())])) == [round_]
        await s.close()
        s = open_rocks()
    assert payloads(await s.read(sid, 0, 0, 10, BIG)) == [b"0", b"1", b"2", b"3", b"4"]


async def test_close_is_idempotent(open_rocks: Callable[[], RocksStore]) -> None:
    s = open_rocks()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    await s.append([batch(sid, 0, 1, b"x")])
    await s.close()
    await s.close()
    assert payloads(await open_rocks().read(sid, 0, 0, 10, BIG)) == [b"x"]


async def test_restart_keeps_metadata_puts_deletes_and_scan_order(open_rocks: Callable[[], RocksStore]) -> None:
    s = open_rocks()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    await fill(s, sid, 0, 2)
    await s.meta_write({b"a/1": b"x", b"a/2": b"y", b"a\xff": b"z", b"b": b"w"})
    await s.meta_write({b"a/2": None, b"a/3": b"new"})
    await s.close()
    s = open_rocks()
    assert (await s.meta_scan(b"")) == [(b"a/1", b"x"), (b"a/3", b"new"), (b"a\xff", b"z"), (b"b", b"w")]
    assert (await s.meta_get(b"a/2")) is None and (await s.meta_get(b"a/3")) == b"new"
    assert payloads(await s.read(sid, 0, 0, 10, BIG)) == [b"0", b"1"]              # the log is intact beside it
    await s.meta_write({b"a/1": None})
    await s.close()
    s = open_rocks()
    assert (await s.meta_scan(b"a")) == [(b"a/3", b"new"), (b"a\xff", b"z")]


class _PausingDb:
    """The real Rdict with one interleaving point: the reader thread's first `get` of `key`
    reads, then waits until the test lets it go on. Everything else passes straight through."""

    def __init__(self, db: object, key: bytes, reader: threading.Thread) -> None:
        self._db = db
        self._key = key
        self._reader = reader
        self.has_read = threading.Event()
        self.resume = threading.Event()

    def get(self, key: bytes, *args: object) -> object:
        value = self._db.get(key, *args)  # type: ignore[attr-defined]
        if key == self._key and threading.current_thread() is self._reader and not self.has_read.is_set():
            self.has_read.set()
            assert self.resume.wait(10)
        return value

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


@pytest.mark.parametrize("what", ["hwm", "trim"])
async def test_cold_cache_read_racing_a_write_never_rolls_the_cache_back(open_rocks: Callable[[], RocksStore],
                                                                   what: str) -> None:
    """A lock-free reader fills the partition cache from a value it read before a concurrent
    append/trim committed; it must not overwrite the newer value the writer cached meanwhile
    (a stale high-water mark would make the next append reuse sequence numbers)."""
    s = open_rocks()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    await fill(s, sid, 0, 5)
    await s.close()
    s = open_rocks()                                   # caches are cold after a reopen
    kind = keys.HWM if what == "hwm" else keys.TRIM
    engine = s._engine                                 # the race is inside the blocking engine
    reader = threading.Thread(target=engine.bounds, args=(sid, 0))
    db = _PausingDb(engine._db, keys.partition_key(kind, sid, 0), reader)
    engine._db = db  # type: ignore[assignment]
    reader.start()
    assert db.has_read.wait(10)                        # the reader holds the old value...
    if what == "hwm":
        assert (await s.append([batch(sid, 0, 2000, b"5")])) == [5]
    else:
        await s.trim(sid, 0, 3)
    db.resume.set()                                    # ...and now stores it
    reader.join(10)
    assert not reader.is_alive()
    if what == "hwm":
        assert (await s.bounds(sid, 0)) == PartitionBounds(0, 6, 2000)
        assert (await s.append([batch(sid, 0, 2000, b"6")])) == [6]
        assert payloads(await s.read(sid, 0, 0, 10, BIG)) == [b"0", b"1", b"2", b"3", b"4", b"5", b"6"]
    else:
        assert (await s.bounds(sid, 0)) == PartitionBounds(3, 5, 1000)
        assert seqs(await s.read(sid, 0, 0, 10, BIG)) == [3, 4]


async def test_rocks_reads_after_close_are_catalogued_errors(tmp_path: Path) -> None:
    """A read still running when shutdown closes the store gets a retriable ServerError
    (DIS.5250), never a raw backend exception that would become INTERNAL."""
    store = RocksStore(str(tmp_path / "db"))
    config = await store.create_stream(StreamConfig("s", 2))
    await store.close()
    with pytest.raises(BrokerError) as info:
        (await store.bounds(config.stream_id, 1))   # cold cache: this goes to RocksDB
    assert info.value.code is ErrorCode.UNAVAILABLE


def test_every_store_declares_the_interface() -> None:
    """mypy checks a class against the Store protocol only where it says it implements it."""
    import importlib
    for target in STORES.values():
        module, _, name = target.partition(":")
        assert Store in getattr(importlib.import_module(module), name).__mro__


async def test_a_directory_of_an_older_layout_is_refused_untouched(rocks_dir: str) -> None:
    import rocksdict

    from broker.storage.rocks import FormatMismatch
    old = rocksdict.Rdict(rocks_dir, rocksdict.Options(raw_mode=True))
    old[b"Sorders"] = b'{"name": "orders", "partition_count": 1}'     # format 1: no version key
    old.close()
    with pytest.raises(FormatMismatch) as info:
        RocksStore(rocks_dir)
    assert "format 1" in str(info.value) and "format 2" in str(info.value)
    old = rocksdict.Rdict(rocks_dir, rocksdict.Options(raw_mode=True))
    assert old[b"Sorders"] and old.get(keys.FORMAT_VERSION) is None     # nothing was written to it
    old.close()


async def test_a_new_directory_records_its_format(open_rocks: Callable[[], RocksStore]) -> None:
    s = open_rocks()
    await s.close()
    s = open_rocks()                                      # reopening our own format is fine
    assert await s.list_streams() == []
