"""Per-partition write throttling (core/throttle.py) in-process: the buckets alone with a clock the
test moves, then the Broker's write paths (PutRecords rows and columns, typed ingest rows, routed
appends) over a memory store with that clock."""
from __future__ import annotations

from dataclasses import replace
from typing import AsyncIterator, Sequence

import pytest

from broker.core import routing
from broker.core.broker import Broker
from broker.core.limits import DEFAULT_LIMITS
from broker.core.throttle import PartitionThrottle
from broker.errors import BrokerError, ErrorCode, server_error
from broker.model import AppendBatch, PutColumns, PutEntry
from broker.storage.base import AppendOutcome
from broker.storage.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the buckets ----------------------------------------------------------------------------------

def test_a_bucket_admits_one_second_then_refills_at_its_rate() -> None:
    clock = Clock()
    t = PartitionThrottle(10, 0, clock)
    assert t.admit(1, 0, [1] * 25, 25) == 10          # burst: one second's worth
    assert t.admit(1, 0, [1] * 5, 5) == 0
    assert t.admit(1, 1, [1] * 5, 5) == 5             # another partition has its own bucket
    assert t.admit(2, 0, [1] * 5, 5) == 5             # and another stream
    clock.now += 0.5
    assert t.admit(1, 0, [1] * 25, 25) == 5
    clock.now += 100                                   # never more than one second banked
    assert t.admit(1, 0, [1] * 25, 25) == 10


def test_bytes_admit_the_prefix_that_fits() -> None:
    clock = Clock()
    t = PartitionThrottle(0, 100, clock)
    assert t.admit(1, 0, [30, 30, 30, 30], 120) == 3  # 90 fit, the fourth would make 120
    assert t.admit(1, 0, [5], 5) == 1                  # 10 left
    assert t.admit(1, 0, [6], 6) == 0                  # 5 left
    clock.now += 1
    assert t.admit(1, 0, [60, 60], 120) == 1


def test_a_record_larger_than_the_bucket_goes_in_when_the_bucket_is_full() -> None:
    clock = Clock()
    t = PartitionThrottle(0, 100, clock)
    assert t.admit(1, 0, [250, 1], 251) == 1           # full: one record into debt
    clock.now += 1                                     # -150 + 100: still in debt
    assert t.admit(1, 0, [1], 1) == 0
    clock.now += 1.5
    assert t.admit(1, 0, [1], 1) == 1


def test_all_or_nothing_takes_nothing_when_one_partition_is_over() -> None:
    clock = Clock()
    t = PartitionThrottle(10, 0, clock)
    assert t.admit_all(1, [(0, 6, 60), (1, 6, 60)])
    assert not t.admit_all(1, [(0, 2, 20), (1, 5, 50)])   # partition 1 has 4 left
    assert t.admit_all(1, [(0, 4, 40)])                   # partition 0 kept its 4: nothing was taken
    assert t.admit_whole(1, 2, 30, 300)                   # over the burst, but the bucket is full
    assert not t.admit_whole(1, 2, 1, 10)


# -- the broker's write paths ---------------------------------------------------------------------

@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    store = MemoryStore()
    b = Broker(store, cursor_secret=b"s", limits=replace(DEFAULT_LIMITS, partition_records_per_s=10,
                                                          partition_bytes_per_s=1000))
    await b.start()
    assert b.writes._throttle is not None
    b.writes._throttle._clock = Clock()   # refill only when the test says so
    yield b
    await b.close()
    await store.close()


def _clock(broker: Broker) -> Clock:
    clock = broker.writes._throttle._clock  # type: ignore[union-attr]
    assert isinstance(clock, Clock)
    return clock


def _codes(result_failures: list[tuple[int, BrokerError]]) -> dict[int, str]:
    return {i: e.code.reason for i, e in result_failures}


async def test_only_the_excess_fails_and_the_admitted_are_gap_free(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    result = await broker.put_records("s", [PutEntry(b"r%d" % i, partition_id="0") for i in range(25)]
                                      + [PutEntry(b"x", partition_id="1")])
    assert result.seqs[:10] == list(range(10))
    assert _codes(result.failures) == dict.fromkeys(range(10, 25), "THROTTLED")
    assert result.failures[0][1].code.dis_code == "DIS.4303"
    assert result.partitions[25] == 1 and result.seqs[25] == 0      # the other partition is not touched
    assert [i for i, _ in result.failures] == sorted(i for i, _ in result.failures)
    _clock(broker).now += 1
    again = await broker.put_records("s", [PutEntry(b"r%d" % i, partition_id="0") for i in range(10, 25)])
    assert again.seqs[:10] == list(range(10, 20))                   # on from where the first stopped
    cursor = await broker.get_cursor("s", "0", "TRIM_HORIZON")
    records = (await broker.get_records(cursor)).records
    assert [r.data for r in records] == [b"r%d" % i for i in range(20)]


async def test_a_refused_record_refuses_the_later_ones_of_its_partition(broker: Broker) -> None:
    """Bytes: a small record after a refused big one would fit, but must not overtake it."""
    await broker.create_stream("s", 1)
    result = await broker.put_records("s", [PutEntry(b"a" * 600, partition_key="k"),
                                            PutEntry(b"b" * 600, partition_key="k"),
                                            PutEntry(b"c", partition_key="k")])
    assert result.seqs[0] == 0 and _codes(result.failures) == {1: "THROTTLED", 2: "THROTTLED"}


async def test_keyed_columns_are_cut_per_partition(broker: Broker) -> None:
    await broker.create_stream("s", 4)
    keys = [f"key-{i % 8}" for i in range(64)]
    result = await broker.put_records("s", PutColumns([b"v%d" % i for i in range(64)], partition_keys=keys))
    by_partition: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_partition.setdefault(routing.partition_for_hash(routing.key_hash(k), 4), []).append(i)
    failed = set(_codes(result.failures))
    for indices in by_partition.values():
        admitted = indices[:10]
        assert [result.seqs[i] for i in admitted] == list(range(len(admitted)))
        assert set(indices[10:]) <= failed and not set(admitted) & failed
    assert len(failed) == sum(max(len(ix) - 10, 0) for ix in by_partition.values())


async def test_typed_rows_are_all_or_nothing(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    assert await broker.append_rows("s", [b"r"] * 20) == 20         # 10 per partition: the burst
    with pytest.raises(BrokerError) as refused:
        await broker.append_rows("s", [b"r"] * 2)
    assert refused.value.code is ErrorCode.THROTTLED
    _clock(broker).now += 1
    assert await broker.append_rows("s", [b"r"] * 2) == 2


async def test_routed_appends_fail_per_partition(broker: Broker) -> None:
    await broker.create_stream("s", 2)
    first = await broker.append_partitioned("s", {0: ([b"p"] * 10, 0), 1: ([b"q"] * 3, 0)})
    assert first == {0: 0, 1: 0}
    second = await broker.append_partitioned("s", {0: ([b"p"], 0), 1: ([b"q"] * 3, 0)})
    assert isinstance(second[0], BrokerError) and second[0].code is ErrorCode.THROTTLED
    assert second[1] == 3


class RefusingStore(MemoryStore):
    """Answers STORAGE_FULL for the partitions in `refuse` (nothing of their batches written)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[int] = set()

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        ok = iter(await super().append([b for b in batches if b.partition not in self.refuse]))
        return [server_error(ErrorCode.STORAGE_FULL) if b.partition in self.refuse else next(ok) for b in batches]


async def test_what_the_store_refused_gives_back_its_write_limit() -> None:
    """A partition's batch the store refused (STORAGE_FULL: nothing of it written) kept what it took
    of the write limit: a PutRecords or an ingest sent again once the store took writes failed
    THROTTLED, against records never written. What they took goes back."""
    store = RefusingStore()
    b = Broker(store, cursor_secret=b"s", limits=replace(DEFAULT_LIMITS, partition_records_per_s=10,
                                                          partition_bytes_per_s=1000))
    await b.start()
    try:
        clock = b.writes._throttle._clock = Clock()   # type: ignore[union-attr]   # refills when told
        await b.create_stream("s", 2)
        store.refuse = {0}
        with pytest.raises(BrokerError) as refused:   # the partition's whole second's worth
            await b.put_records("s", [PutEntry(b"r", partition_id="0")] * 10)
        assert refused.value.code is ErrorCode.STORAGE_FULL
        store.refuse = set()
        again = await b.put_records("s", [PutEntry(b"r", partition_id="0")] * 10)
        assert again.failures == [] and again.seqs == list(range(10))
        clock.now += 1
        store.refuse = {0, 1}
        with pytest.raises(BrokerError) as refused:
            await b.append_rows("s", [b"r"] * 20)   # 10 a partition: each one's whole second's worth
        assert refused.value.code is ErrorCode.STORAGE_FULL
        store.refuse = set()
        assert await b.append_rows("s", [b"r"] * 20) == 20
    finally:
        await b.close()
        await store.close()


async def test_limits_off_admit_everything() -> None:
    store = MemoryStore()
    b = Broker(store, cursor_secret=b"s", limits=replace(DEFAULT_LIMITS, partition_records_per_s=0,
                                                          partition_bytes_per_s=0))
    await b.start()
    try:
        assert b.writes._throttle is None
        await b.create_stream("s", 1)
        result = await b.put_records("s", [PutEntry(b"x", partition_id="0")] * 10_000)
        assert not result.failures
        result = await b.put_records("s", [PutEntry(b"x", partition_id="0")] * 10_000)
        assert not result.failures and result.seqs[-1] == 19_999
    finally:
        await b.close()
        await store.close()
