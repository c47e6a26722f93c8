"""Per-partition write throttling, as DIS and Kinesis do: a token bucket per (stream, partition)
for records per second and one for payload bytes per second, each holding at most one second of
its rate (the burst). Writes take tokens; what the buckets cannot cover fails with THROTTLED
(DIS.4303, retriable), the rest is written.

Cost: one bucket check per partition per batch, never per record, except when a batch's payload
is more than the byte bucket holds - then the prefix that fits is found with one C-level prefix
sum and a bisect.

Progress for requests larger than a bucket (possible only with limits configured below a
request's size): a full bucket admits them anyway and goes into debt, which refill repays before
anything else is admitted. The long-run rate holds; nothing is starved.
"""
from __future__ import annotations

import time
from bisect import bisect_right
from itertools import accumulate
from typing import Callable, Sequence

from broker.core.routing import format_partition_id
from broker.errors import BrokerError, ErrorCode, client_error


class PartitionThrottle:
    """Token buckets per (stream id, partition). `records_per_s` / `bytes_per_s`: 0 = that limit
    is off. `clock`: monotonic seconds (tests pass their own)."""

    __slots__ = ("records_per_s", "bytes_per_s", "_clock", "_buckets")

    def __init__(self, records_per_s: int, bytes_per_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.records_per_s = records_per_s
        self.bytes_per_s = bytes_per_s
        self._clock = clock
        # (stream id, partition) -> [record tokens, byte tokens, last refill]; a new one starts full
        self._buckets: dict[tuple[int, int], list[float]] = {}

    def forget(self, stream_id: int) -> None:
        """Drop a deleted stream's buckets."""
        self._buckets = {k: b for k, b in self._buckets.items() if k[0] != stream_id}

    def _bucket(self, stream_id: int, partition: int) -> list[float]:
        now = self._clock()
        bucket = self._buckets.get((stream_id, partition))
        if bucket is None:
            bucket = self._buckets[(stream_id, partition)] = [float(self.records_per_s), float(self.bytes_per_s), now]
        else:
            elapsed = now - bucket[2]
            if elapsed > 0:
                bucket[0] = min(bucket[0] + elapsed * self.records_per_s, self.records_per_s)
                bucket[1] = min(bucket[1] + elapsed * self.bytes_per_s, self.bytes_per_s)
                bucket[2] = now
        return bucket

    def admit(self, stream_id: int, partition: int, sizes: Sequence[int], total: int) -> int:
        """How many of a partition's records, taken in order, may be written now (their tokens
        are taken): `sizes` their payload sizes, `total` their sum."""
        bucket = self._bucket(stream_id, partition)
        n = len(sizes)
        k = n
        if self.records_per_s and bucket[0] < n:
            k = int(bucket[0]) if bucket[0] >= 1 else 0
        spent = total
        if self.bytes_per_s and bucket[1] < total and k:
            prefix = list(accumulate(sizes[:k]))
            fits = bisect_right(prefix, bucket[1])
            if not fits and bucket[1] >= self.bytes_per_s:   # a full bucket: one record in debt
                fits = 1
            k = fits
            spent = prefix[k - 1] if k else 0
        elif k < n:
            spent = sum(sizes[:k])
        if k:
            bucket[0] -= k
            bucket[1] -= spent
        return k

    def admit_whole(self, stream_id: int, partition: int, count: int, total: int) -> bool:
        """May `count` records of `total` payload bytes all be written now? Takes their tokens
        if so, none otherwise. A full bucket admits a batch larger than it (into debt)."""
        bucket = self._bucket(stream_id, partition)
        return self._fits(bucket, count, total) and self._take(bucket, count, total)

    def admit_all(self, stream_id: int, batches: Sequence[tuple[int, int, int]]) -> bool:
        """`batches`: (partition, count, payload bytes). All of them or none: tokens are taken
        only when every partition's bucket covers its batch."""
        buckets = [(self._bucket(stream_id, p), count, total) for p, count, total in batches]
        if not all(self._fits(b, count, total) for b, count, total in buckets):
            return False
        for b, count, total in buckets:
            self._take(b, count, total)
        return True

    def refund(self, stream_id: int, partition: int, count: int, total: int) -> None:
        """Give back the tokens `count` records of `total` payload bytes took when they were
        admitted and then not written (their append refused as a whole before it was made): at
        most up to a full bucket."""
        bucket = self._buckets.get((stream_id, partition))
        if bucket is None:
            return
        bucket[0] = min(bucket[0] + count, self.records_per_s)
        bucket[1] = min(bucket[1] + total, self.bytes_per_s)

    def _fits(self, bucket: list[float], count: int, total: int) -> bool:
        records_ok = not self.records_per_s or bucket[0] >= count or bucket[0] >= self.records_per_s
        bytes_ok = not self.bytes_per_s or bucket[1] >= total or bucket[1] >= self.bytes_per_s
        return records_ok and bytes_ok

    @staticmethod
    def _take(bucket: list[float], count: int, total: int) -> bool:
        bucket[0] -= count
        bucket[1] -= total
        return True

    def error(self, partition: int) -> BrokerError:
        """The THROTTLED error of a partition's refused records (one shared by all of them)."""
        limits = []
        if self.records_per_s:
            limits.append(f"{self.records_per_s} records/s")
        if self.bytes_per_s:
            limits.append(f"{self.bytes_per_s} bytes/s")
        return client_error(ErrorCode.THROTTLED, detail=f"partition {format_partition_id(partition)} is over its "
                                                        f"write limit ({' and '.join(limits)})")


def throttle_for(records_per_s: int, bytes_per_s: int) -> PartitionThrottle | None:
    """None when both limits are off: the write path then skips throttling entirely."""
    return PartitionThrottle(records_per_s, bytes_per_s) if records_per_s or bytes_per_s else None
