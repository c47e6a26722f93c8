"""RocksDB only: the one-value-per-batch layout (broker/storage/keys.py).

The contract tests already cover the behaviour; these pin what the layout makes easy to get
wrong: reads and time lookups that start inside a batch, a trim that cuts through a batch (the
batch stays stored, the "T" key hides its head), a backwards seek that must not land in the
neighbouring partition, and the value encoding itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from broker.model import AppendBatch, PartitionBounds, Record, StreamConfig
from broker.storage import keys
from broker.storage.rocks_engine import RocksEngine

BIG = 1 << 30


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture
def store(path: str) -> Iterator[RocksEngine]:
    s = RocksEngine(path)
    yield s
    s.close()


def stored_batches(store: RocksEngine, sid: int, partition: int) -> list[int]:
    """First seqs of the batch values physically stored for the partition."""
    prefix = keys.partition_key(keys.RECORD, sid, partition)
    return [keys.record_seq(k) for k in store._db.keys(from_key=prefix) if k.startswith(prefix)]


def fill(store: RocksEngine, sid: int, partition: int, sizes: list[int], ts: list[int] | None = None) -> None:
    """One batch per entry of `sizes`; payload of record seq s is b"%d" % s."""
    seq = store.bounds(sid, partition).next_seq
    for i, n in enumerate(sizes):
        stamp = ts[i] if ts else 1000
        store.append([AppendBatch(sid, partition, stamp, [(None, b"%d" % (seq + j)) for j in range(n)])])
        seq += n


# -- the encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pkeys", [
    [None, None, None],
    ["a", "", "ключ-🔑", "x" * 300],
    [None, "k", "", None, "🔑"],
    [""],
    [None],
])
def test_batch_value_round_trips_every_key_mode_and_every_slice(pkeys: list[str | None]) -> None:
    items = [(k, bytes([i]) * i) for i, k in enumerate(pkeys)]
    value = keys.encode_batch(77, items)
    assert keys.batch_header(value) == (len(items), 77)
    expected = [Record(10 + i, 77, k, d) for i, (k, d) in enumerate(items)]
    for lo in range(len(items)):
        for hi in range(lo + 1, len(items) + 1):
            assert keys.decode_batch(value, 10, lo, hi, BIG, False) == (expected[lo:hi], sum(range(lo, hi)))


def test_batch_decode_budget_and_at_least_one() -> None:
    value = keys.encode_batch(5, [(None, b"x" * 10)] * 4 + [(None, b"")])
    recs = lambda out: [r.seq for r in out[0]]  # noqa: E731
    assert recs(keys.decode_batch(value, 0, 0, 5, 30, False)) == [0, 1, 2]
    assert recs(keys.decode_batch(value, 0, 1, 5, 29, False)) == [1, 2]
    assert recs(keys.decode_batch(value, 0, 0, 5, 5, False)) == []
    assert keys.decode_batch(value, 0, 0, 5, 5, True) == ([Record(0, 5, None, b"x" * 10)], 10)
    assert keys.decode_batch(value, 0, 2, 5, -3, True)[1] == 10          # budget already overdrawn
    assert recs(keys.decode_batch(value, 0, 3, 5, 10, False)) == [3, 4]   # empty payload fits exactly
    assert recs(keys.decode_batch(value, 0, 4, 5, 0, False)) == [4]


# -- the store ---------------------------------------------------------------------------------------


def test_one_value_per_batch_and_reads_start_inside_batches(store: RocksEngine) -> None:
    sid = store.create_stream(StreamConfig("s", 2)).stream_id
    fill(store, sid, 0, [3, 4, 1, 5])                 # batches at 0, 3, 7, 8; next_seq 13
    fill(store, sid, 1, [2])
    store.append([AppendBatch(sid, 0, 1, [])])        # an empty batch stores nothing
    assert stored_batches(store, sid, 0) == [0, 3, 7, 8]
    everything = [Record(s, 1000, None, b"%d" % s) for s in range(13)]
    for start in range(14):
        for limit in (1, 2, 5, 100):
            assert store.read(sid, 0, start, limit, BIG) == everything[start:start + limit]
    # max_bytes stops mid-batch and across batches (payloads "0".."9" are 1 byte, "10".. are 2)
    assert [r.seq for r in store.read(sid, 0, 2, 100, 6)] == [2, 3, 4, 5, 6, 7]
    assert [r.seq for r in store.read(sid, 0, 9, 100, 3)] == [9, 10]
    assert [r.seq for r in store.read(sid, 0, 11, 100, 0)] == [11]


def test_trim_through_a_batch_keeps_it_stored_but_hidden_across_restarts(path: str) -> None:
    store = RocksEngine(path)
    sid = store.create_stream(StreamConfig("s", 2)).stream_id
    fill(store, sid, 0, [4])                           # the neighbouring partition has data
    fill(store, sid, 1, [3, 4, 3], ts=[100, 200, 300])  # batches at 0, 3, 7; next_seq 10
    store.trim(sid, 1, 5)
    assert stored_batches(store, sid, 1) == [3, 7]    # batch 0..2 dropped, 3..6 straddles the cut
    assert stored_batches(store, sid, 0) == [0]

    def check(s: RocksEngine) -> None:
        assert s.bounds(sid, 1) == PartitionBounds(5, 10, 300)
        assert [r.seq for r in s.read(sid, 1, 0, 100, BIG)] == [5, 6, 7, 8, 9]
        assert s.read(sid, 1, 3, 1, BIG) == [Record(5, 200, None, b"5")]
        assert s.seq_at_time(sid, 1, 0) == 5          # not the straddling batch's first seq, 3
        assert s.seq_at_time(sid, 1, 200) == 5
        assert s.seq_at_time(sid, 1, 201) == 7
        assert s.seq_at_time(sid, 1, 301) == 10
        assert [r.seq for r in s.read(sid, 0, 0, 100, BIG)] == [0, 1, 2, 3]

    check(store)
    store.close()
    store = RocksEngine(path)                           # the "T" key, not the stored keys, is the truth
    check(store)
    store.trim(sid, 1, 6)                              # still inside the same batch: nothing dropped
    assert stored_batches(store, sid, 1) == [3, 7]
    store.trim(sid, 1, 7)                              # exactly at a batch start: the batch before goes
    assert stored_batches(store, sid, 1) == [7]
    assert [r.seq for r in store.read(sid, 1, 0, 100, BIG)] == [7, 8, 9]
    store.trim(sid, 1, 10)
    assert stored_batches(store, sid, 1) == [] and stored_batches(store, sid, 0) == [0]
    assert store.append([AppendBatch(sid, 1, 50, [(None, b"new")])]) == [10]
    assert store.read(sid, 1, 0, 10, BIG) == [Record(10, 300, None, b"new")]
    store.close()


def test_seq_at_time_binary_searches_batches(store: RocksEngine) -> None:
    sid = store.create_stream(StreamConfig("s", 1)).stream_id
    stamps = [10, 20, 20, 30, 45, 45, 60]
    fill(store, sid, 0, [1, 5, 2, 7, 3, 1, 4], ts=stamps)   # firsts 0, 1, 6, 8, 15, 18, 19; next 23
    firsts = [0, 1, 6, 8, 15, 18, 19]
    for t in range(70):
        expected = next((f for f, s in zip(firsts, stamps) if s >= t), 23)
        assert store.seq_at_time(sid, 0, t) == expected, t


def test_a_read_racing_a_trim_never_strays_into_the_neighbouring_partition(store: RocksEngine) -> None:
    """A lock-free read may use a first_seq read before a trim committed: the batch holding its
    start is gone, and a backwards seek from it lands in the partition before. It must go on from
    the partition's next stored batch, never decode a neighbour's batch."""
    sid = store.create_stream(StreamConfig("s", 2)).stream_id
    fill(store, sid, 0, [5])
    fill(store, sid, 1, [3, 3, 3])                     # batches at 0, 3, 6
    store.trim(sid, 1, 4)                              # drops the batch at 0; 3..5 straddles
    store._first[(sid, 1)] = 0                         # what the racing reader had cached
    assert [r.seq for r in store.read(sid, 1, 0, 100, BIG)] == [3, 4, 5, 6, 7, 8]
    assert store.seq_at_time(sid, 1, 0) == 3
    store.trim(sid, 1, 9)                              # everything gone, neighbour intact
    store._first[(sid, 1)] = 0
    assert store.read(sid, 1, 0, 100, BIG) == []
    assert store.seq_at_time(sid, 1, 0) == 9
    assert [r.seq for r in store.read(sid, 0, 0, 100, BIG)] == [0, 1, 2, 3, 4]
