"""The DIS monitoring series with two brokers on one JetStream store: each adds its own counts to
the same minute rows, and both answer the sum. Each kept its own copy of the hour's rows and wrote
it whole over the shared key: with 100 + 30 records in one minute through brokers A and B, A
answered 100 and B 30 (the JetStream probe)."""
from __future__ import annotations

from typing import Awaitable, Callable

from broker.core.broker import Broker
from broker.model import PutEntry
from broker.storage.jetstream import JetStreamStore

HOUR = 3_600_000
T0 = 1_700_000_040_000 // HOUR * HOUR + 5 * 60_000 + 7_000


async def test_two_brokers_add_their_counts_to_the_same_minutes(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    clock = [T0]
    brokers = [Broker(await opener(), cursor_secret=b"m" * 32, clock_ms=lambda: clock[0]) for _ in range(2)]
    for b in brokers:
        await b.start()
    a, b = brokers
    try:
        await a.create_stream("s", 1)
        minute = T0 // 60_000
        for broker, n in ((a, 100), (b, 30)):
            result = await broker.put_records("s", [PutEntry(b"x", partition_id="0")] * n)
            assert result.failed_record_count == 0
        for broker in brokers:
            assert await broker.metric_series.flush(minute) == 1
        clock[0] += 60_000
        for broker, n in ((a, 10), (b, 7)):
            await broker.put_records("s", [PutEntry(b"y", partition_id="0")] * n)
            await broker.metric_series.flush(minute + 1)
        label = "total_put_records_per_stream"
        for broker in brokers:
            got = await broker.stream_metrics("s", label, None, T0 // 1000, clock[0] // 1000)
            assert got[label] == [(minute * 60, 130), ((minute + 1) * 60, 17)]
    finally:
        for broker in brokers:
            await broker.close()
