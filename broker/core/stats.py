"""Plain counters of the broker's work, for metrics (api/metrics.py renders them for Prometheus at
scrape time) and the DIS monitoring series (core/metric_series.py). Nothing here knows Prometheus.

Rule 1: counting is per batch or per request, never a Python call per record. A batch adds its
record count and its payload bytes (summed by `map(len, ...)` in C) to a few ints.
Rule 2: everything is cumulative since the broker started (Prometheus counters; the per-minute
series takes differences). Nothing is reset, except a stream's counters when it is deleted: its
series disappear from the scrape (bounded label cardinality).
Rule 3: one event loop writes these (no lock); a scrape reads them on the same loop.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import Counter, OrderedDict
from typing import Mapping

from broker.errors import BrokerError

# Seconds. Request latency: from a cached GetRecords (~0.1 ms) to a long poll (up to 30 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds. One store append (one RocksDB WriteBatch): microseconds to a slow fsync.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Records per commit (how well group commit folds concurrent producers).
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)


class Histogram:
    """Fixed buckets, plain ints: `counts[i]` observations <= bounds[i] (and > bounds[i-1]);
    the last slot is +Inf. Cumulated only when scraped."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


def _grow(values: list[int], index: int) -> None:
    if index >= len(values):
        values.extend([0] * (index + 1 - len(values)))


class StreamStats:
    """One stream's counters. Per partition: lists indexed by partition (they grow when a stream
    gains partitions). Latencies are summed in milliseconds (DIS reports averages per minute)."""

    __slots__ = ("put_records", "put_bytes", "get_records", "get_bytes", "put_requests", "put_latency_ms",
                 "get_requests", "get_latency_ms", "throttled_put_requests", "throttled_records", "failures")

    def __init__(self) -> None:
        self.put_records: list[int] = []
        self.put_bytes: list[int] = []
        self.get_records: list[int] = []
        self.get_bytes: list[int] = []
        self.put_requests = 0           # put calls answered (a partial failure is still an answer)
        self.put_latency_ms = 0.0
        self.get_requests = 0
        self.get_latency_ms = 0.0
        self.throttled_put_requests = 0   # put calls with at least one record refused THROTTLED
        self.throttled_records = 0
        self.failures: Counter[str] = Counter()   # per-record failures by catalogue reason


FORGOTTEN_REMEMBERED = 1024   # deleted streams' ids kept, for the requests still in flight at the delete


class BrokerStats:
    """Every counter of one broker. The doors record request latency (`observe_request`); the core
    records the rest. Streams are keyed by stream id; `forget` drops a deleted stream's."""

    def __init__(self) -> None:
        self.streams: dict[int, StreamStats] = {}
        self.requests: dict[tuple[str, str], Histogram] = {}    # (door, verb) -> latency in seconds
        self.request_errors: Counter[tuple[str, str]] = Counter()   # (door, reason)
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.commit_records = Histogram(BATCH_BUCKETS)
        self.commit_failures = 0
        self.subscriptions = 0          # open push subscriptions (gRPC Subscribe, SSE tails, query readers)
        self.produce_streams = 0        # open PutRecordsStream calls (streaming produce; not subscriptions)
        # a shared store: partitions woken by other brokers' appends (one per partition per burst),
        # and their stream creates, scales and deletes taken into the catalogue
        self.remote_appends = 0
        self.remote_stream_changes = 0
        # the streams forgotten last (ids are never reused): a read or put in flight when its stream
        # went counts into a scratch StreamStats, not a new entry nobody would ever drop
        self._forgotten: OrderedDict[int, None] = OrderedDict()

    def stream(self, stream_id: int) -> StreamStats:
        s = self.streams.get(stream_id)
        if s is None:
            if stream_id in self._forgotten:
                return StreamStats()
            s = self.streams[stream_id] = StreamStats()
        return s

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self._forgotten[stream_id] = None
        while len(self._forgotten) > FORGOTTEN_REMEMBERED:
            self._forgotten.popitem(last=False)

    # -- the write path ---------------------------------------------------------------------------

    def appended(self, stream_id: int, partition: int, records: int, payload: int) -> None:
        """One committed batch of one partition."""
        s = self.stream(stream_id)
        _grow(s.put_records, partition)
        _grow(s.put_bytes, partition)
        s.put_records[partition] += records
        s.put_bytes[partition] += payload

    def put_request(self, stream_id: int, seconds: float, failures: Mapping[str, int] | None = None) -> None:
        """One put call of any door, answered; `failures`: how many of its records (or items) were
        refused, by catalogue reason (counted per partition or per reason by the caller)."""
        s = self.stream(stream_id)
        s.put_requests += 1
        s.put_latency_ms += seconds * 1000
        if failures:
            s.failures.update(failures)
            throttled = failures.get("THROTTLED", 0)
            if throttled:
                s.throttled_put_requests += 1
                s.throttled_records += throttled

    def throttled_request(self, stream_id: int, records: int) -> None:
        """A put refused as a whole for the write limit (a typed ingest's all-or-nothing)."""
        s = self.stream(stream_id)
        s.throttled_put_requests += 1
        s.throttled_records += records
        s.failures["THROTTLED"] += records

    def committed(self, seconds: float, records: int, ok: bool) -> None:
        if ok:
            self.commit_seconds.observe(seconds)
            self.commit_records.observe(records)
        else:
            self.commit_failures += 1

    # -- the read path ----------------------------------------------------------------------------

    def read(self, stream_id: int, partition: int, records: int, payload: int) -> None:
        """Records handed to a consumer (GetRecords, a subscription's batch)."""
        s = self.stream(stream_id)
        _grow(s.get_records, partition)
        _grow(s.get_bytes, partition)
        s.get_records[partition] += records
        s.get_bytes[partition] += payload

    def get_request(self, stream_id: int, seconds: float) -> None:
        s = self.stream(stream_id)
        s.get_requests += 1
        s.get_latency_ms += seconds * 1000

    # -- the doors --------------------------------------------------------------------------------

    def observe_request(self, door: str, verb: str, seconds: float, error: BrokerError | None = None) -> None:
        """One request of a door (`verb`: its route or RPC name, a fixed set per door)."""
        h = self.requests.get((door, verb))
        if h is None:
            h = self.requests[(door, verb)] = Histogram(LATENCY_BUCKETS)
        h.observe(seconds)
        if error is not None:
            self.request_errors[(door, error.code.reason)] += 1
