"""PutColumns, the columnar PutRecords form: it must route, number and fail exactly as the
record-at-a-time form does, whichever internal path (keyed fast path or per record) it takes."""
from __future__ import annotations

import asyncio
from typing import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.broker import Broker
from broker.core.writes import WritePath
from broker.errors import BrokerError, ErrorCode
from broker.model import PutColumns, PutEntry, PutRecordsResult
from broker.storage.memory import MemoryStore

SECRET = b"columns-test-secret"
Row = tuple[bytes, str, str, str]   # data, partition_key, explicit_hash_key, partition_id ("" = not set)

KEYS = ["", "k1", "k2", "user-7", "device-42", "k" * 257]
HASHES = ["", "0", "4611686018427387904", str(2 ** 63), "abc"]
PIDS = ["", "1", "shardId-0000000003", "9", "zero"]
rows = st.tuples(st.binary(max_size=6), st.sampled_from(KEYS), st.sampled_from(HASHES), st.sampled_from(PIDS))
keyed_rows = st.tuples(st.binary(max_size=6), st.sampled_from(KEYS[1:5]), st.just(""), st.just(""))


def as_entries(batch: Sequence[Row]) -> list[PutEntry]:
    return [PutEntry(d, k or None, h or None, p or None) for d, k, h, p in batch]


def as_columns(batch: Sequence[Row]) -> PutColumns:
    data, keys, hashes, pids = (list(col) for col in zip(*batch))
    return PutColumns(data, keys if any(keys) else None, hashes if any(hashes) else None, pids if any(pids) else None)


async def both_ways(batch: Sequence[Row]) -> tuple[PutRecordsResult, PutRecordsResult, Broker]:
    broker = Broker(MemoryStore(), cursor_secret=SECRET)
    await broker.start()
    for name in ("by-entry", "by-column"):
        await broker.create_stream(name, 4)
    return (await broker.put_records("by-entry", as_entries(batch)),
            await broker.put_records("by-column", as_columns(batch)), broker)


async def stored(broker: Broker, stream: str) -> list[list[tuple[int, str | None, bytes]]]:
    out = []
    for p in range(4):
        cursor = await broker.get_cursor(stream, str(p), "TRIM_HORIZON")
        result = await broker.get_records(cursor, 10_000)
        out.append([(r.seq, r.partition_key, r.data) for r in result.records])
    return out


def check_alike(batch: Sequence[Row]) -> None:
    async def run() -> None:
        by_entry, by_column, broker = await both_ways(batch)
        try:
            routed = [i for i, (_, k, h, p) in enumerate(batch) if k or h or p]   # unrouted ones are spread
            assert [by_column.partitions[i] for i in routed] == [by_entry.partitions[i] for i in routed]
            assert [(i, e.code) for i, e in by_column.failures] == [(i, e.code) for i, e in by_entry.failures]
            column_log, entry_log = await stored(broker, "by-column"), await stored(broker, "by-entry")
            if len(routed) == len(batch):
                assert by_column.seqs == by_entry.seqs
                assert column_log == entry_log
            else:   # the spread ones may land elsewhere, but the same records are stored
                assert sorted((r[1] or "", r[2]) for log in column_log for r in log) == \
                    sorted((r[1] or "", r[2]) for log in entry_log for r in log)
        finally:
            await broker.close()
    asyncio.run(run())


@settings(max_examples=80, deadline=None)
@given(st.lists(rows, min_size=1, max_size=30))
def test_columns_route_number_and_fail_like_entries(batch: list[Row]) -> None:
    check_alike(batch)


@settings(max_examples=40, deadline=None)
@given(st.lists(keyed_rows, min_size=1, max_size=60))
def test_the_keyed_fast_path_routes_and_numbers_like_entries(batch: list[Row]) -> None:
    check_alike(batch)


def test_an_all_keyed_batch_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = WritePath._route_entries

    def spy(self: WritePath, *args: object) -> object:
        calls.append(1)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(WritePath, "_route_entries", spy)
    keyed = [(bytes([i]), f"key-{i % 7}", "", "") for i in range(50)]
    check_alike(keyed)
    assert len(calls) == 1          # only the entry form went record by record
    check_alike([*keyed, (b"x", "", "", "2")])   # a partition id: the columns fall back too
    assert len(calls) == 3


def test_mismatched_column_lengths_are_invalid_requests() -> None:
    async def run() -> None:
        broker = Broker(MemoryStore(), cursor_secret=SECRET)
        await broker.start()
        await broker.create_stream("s", 2)
        try:
            for columns in (PutColumns([b"a", b"b"], ["k"]), PutColumns([b"a"], None, ["1", "2"]),
                            PutColumns([b"a"], None, None, [])):
                with pytest.raises(BrokerError) as exc:
                    await broker.put_records("s", columns)
                assert exc.value.code is ErrorCode.INVALID_REQUEST and "one per record" in exc.value.message
            with pytest.raises(BrokerError) as exc:
                await broker.put_records("s", PutColumns([]))
            assert exc.value.code is ErrorCode.EMPTY_REQUEST
            with pytest.raises(BrokerError) as exc:
                await broker.put_records("s", PutColumns([b"x" * (1 << 20)] * 6, ["k"] * 6))
            assert exc.value.code is ErrorCode.REQUEST_TOO_LARGE
        finally:
            await broker.close()
    asyncio.run(run())


def test_oversized_records_and_long_keys_fail_alone_in_a_keyed_batch() -> None:
    batch = [(b"ok", "a", "", ""), (b"x" * ((1 << 20) + 1), "b", "", ""), (b"ok2", "k" * 257, "", ""),
             (b"ok3", "a", "", "")]

    async def run() -> None:
        _, by_column, broker = await both_ways(batch)
        await broker.close()
        assert [(i, e.code.dis_code) for i, e in by_column.failures] == [(1, "DIS.4200"), (2, "DIS.4200")]
        assert by_column.seqs[0] != -1 and by_column.seqs[3] == by_column.seqs[0] + 1
    asyncio.run(run())
    check_alike(batch)


