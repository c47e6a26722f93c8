"""The DIS monitoring series: per stream and partition, what happened each minute, kept durably for
the stream's retention window and answered to `show_stream_metrics` / `show_partition_metrics`
(shared/spec/dis-api.md section 3).

Where the numbers come from: core/stats.py's cumulative counters. Once a minute (app.py's task)
`flush` takes each stream's counters, subtracts what the last flush saw, and adds the difference to
that minute's row. Nothing extra runs on the write or read path. A query adds the difference not
yet flushed to the current minute, so a query right after some traffic sees it.

Metadata key layout (the store's opaque metadata; see storage/keys.py "X"):

    b"Z" + stream_id u64 + hour u32 (epoch hour, >= 1)   JSON {"<minute of the hour>": row}
    b"Z" + stream_id u64 + u32 0                         u32 BE: the oldest hour that may be stored

    row = {"s": [the 10 stream values, STREAM_FIELDS order], "p": {"<partition>": [4 values]}}

One value per stream and hour (at most 60 rows): a week of minutes is 168 keys, not 10,080, and a
flush rewrites one small value per active stream. Minutes without traffic are not stored; they read
as 0. Trimming needs no scan: the hour-0 key says where the stored hours start, and each flush
deletes the hours that left the retention window. A deleted stream's keys go with it (`forget`).

Time units: DIS gives `start_time` / `end_time` as 10-digit Unix seconds (its API reference and
the SDK's docstrings), and a data point's `timestamp` is the start of its minute in the same unit.
A 13-digit value is taken as milliseconds (our spec's reading; both are accepted) [ours].
"""
from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, Callable, Sequence

from broker.core.catalogue import StreamCatalogue
from broker.core.stats import BrokerStats, StreamStats
from broker.errors import ErrorCode, client_error
from broker.model import StreamConfig
from broker.storage.base import Store

PREFIX = b"Z"
_KEY = struct.Struct(">QI")
_U32 = struct.Struct(">I")
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
MAX_PERIOD_S = 7 * 24 * 3600   # DIS.4204: "The monitoring period cannot be longer than 7 days"

# Row fields, in stored order. The label names are DIS's own (the SDK's ShowStreamMetricsRequest).
STREAM_FIELDS = ("total_put_bytes_per_stream", "total_get_bytes_per_stream", "total_put_records_per_stream",
                 "total_get_records_per_stream", "put_latency_ms_sum", "get_latency_ms_sum",
                 "total_put_req_suc_per_stream", "total_get_req_suc_per_stream", "traffic_control_put",
                 "traffic_control_get")
PARTITION_LABELS = ("total_put_bytes_per_partition", "total_get_bytes_per_partition",
                    "total_put_records_per_partition", "total_get_records_per_partition")
# label -> how to read it from a row: ("sum", field index) or ("avg", sum index, count index)
STREAM_LABELS: dict[str, tuple[int, ...]] = {
    "total_put_bytes_per_stream": (0,), "total_get_bytes_per_stream": (1,),
    "total_put_records_per_stream": (2,), "total_get_records_per_stream": (3,),
    "total_put_req_latency": (4, 6), "total_get_req_latency": (5, 7),   # average ms per request
    "total_put_req_suc_per_stream": (6,), "total_get_req_suc_per_stream": (7,),
    "traffic_control_put": (8,), "traffic_control_get": (9,),
    # DIS's English reference spells these two with "controll"; the SDK and the enum do not
    "traffic_controll_put": (8,), "traffic_controll_get": (9,),
}

Row = dict[str, Any]
Block = dict[str, Row]


def series_key(stream_id: int, hour: int) -> bytes:
    return PREFIX + _KEY.pack(stream_id, hour)


def stream_prefix(stream_id: int) -> bytes:
    return PREFIX + struct.pack(">Q", stream_id)


def _snapshot(s: StreamStats) -> tuple[list[int], dict[int, list[int]]]:
    """The cumulative counters a row is the difference of."""
    stream = [sum(s.put_bytes), sum(s.get_bytes), sum(s.put_records), sum(s.get_records),
              round(s.put_latency_ms), round(s.get_latency_ms), s.put_requests, s.get_requests,
              s.throttled_put_requests, 0]   # reads are not throttled: traffic_control_get stays 0
    partitions: dict[int, list[int]] = {}
    for p in range(max(len(s.put_records), len(s.get_records))):
        row = [_at(s.put_bytes, p), _at(s.get_bytes, p), _at(s.put_records, p), _at(s.get_records, p)]
        if any(row):
            partitions[p] = row
    return stream, partitions


def _at(values: list[int], i: int) -> int:
    return values[i] if i < len(values) else 0


def _minus(a: list[int], b: list[int] | None) -> list[int]:
    return list(a) if b is None else [x - y for x, y in zip(a, b)]


def _add_row(row: Row | None, stream: list[int], partitions: dict[int, list[int]]) -> Row:
    """A new row: `row` (left as it is) plus the given counts."""
    if row is None:
        row = {"s": [0] * len(STREAM_FIELDS), "p": {}}
    added: dict[str, list[int]] = dict(row["p"])
    for p, values in partitions.items():
        old = added.get(str(p))
        added[str(p)] = list(values) if old is None else [x + y for x, y in zip(old, values)]
    return {"s": [x + y for x, y in zip(row["s"], stream)], "p": added}


def parse_period(start: object, end: object, now_ms: int) -> tuple[int, int]:
    """The query's [start, end] in seconds. Raises INVALID_METRICS_PERIOD (missing, not an integer,
    start after end) and METRICS_PERIOD_TOO_LONG (longer than 7 days, or starting more than 7 days
    ago: DIS keeps a week of monitoring)."""
    bounds = []
    for name, value in (("start_time", start), ("end_time", end)):
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise client_error(ErrorCode.INVALID_METRICS_PERIOD,
                               detail=f"{name} must be a Unix time in seconds (10 digits), got {value!r:.40}")
        bounds.append(value // 1000 if value >= 10**12 else value)   # 13 digits: milliseconds
    lo, hi = bounds
    if lo > hi:
        raise client_error(ErrorCode.INVALID_METRICS_PERIOD, detail=f"start_time {lo} is after end_time {hi}")
    if hi - lo > MAX_PERIOD_S or lo < now_ms // 1000 - MAX_PERIOD_S:
        raise client_error(ErrorCode.METRICS_PERIOD_TOO_LONG)
    return lo, hi


def parse_labels(label: object, label_list: object, known: Sequence[str] | dict[str, Any]) -> list[str]:
    """The labels asked for: `label_list` (comma-separated) wins over `label`, as DIS says.
    Raises INVALID_METRICS_LABEL for none or one this endpoint does not know."""
    raw = label_list if label_list else label
    if not isinstance(raw, str) or not raw.strip():
        raise client_error(ErrorCode.INVALID_METRICS_LABEL, detail="give label or label_list")
    labels = [part.strip() for part in raw.split(",") if part.strip()]
    for name in labels:
        if name not in known:
            raise client_error(ErrorCode.INVALID_METRICS_LABEL, detail=f"unknown label [{name[:80]}]")
    if not labels:
        raise client_error(ErrorCode.INVALID_METRICS_LABEL, detail="give label or label_list")
    return labels


class MetricSeries:
    def __init__(self, catalogue: StreamCatalogue, store: Store, stats: BrokerStats,
                 clock_ms: Callable[[], int]) -> None:
        self._catalogue = catalogue
        self._store = store
        self._stats = stats
        self._now = clock_ms
        self._seen: dict[int, tuple[list[int], dict[int, list[int]]]] = {}   # stream id -> last flushed snapshot
        self._blocks: dict[int, tuple[int, Block]] = {}   # stream id -> (hour, its block as stored)
        self._oldest: dict[int, int] = {}                 # stream id -> oldest hour maybe stored
        # several brokers of a shared store add to the same rows: each adds its counts with a
        # compare-and-set of the hour's block, and reads blocks from the store, not from a copy
        self._shared = store.capabilities.shared
        # a flush and a query's read of rows plus the counts not flushed yet, one at a time: a flush
        # landing between the two made the answer count a minute twice (or not at all)
        self._lock = asyncio.Lock()

    # -- writing ----------------------------------------------------------------------------------

    async def flush(self, minute: int | None = None) -> int:
        """Add every stream's counters since the last flush to `minute` (epoch minutes; default
        the current one) and trim hours past each stream's retention, in one metadata write.
        Returns how many streams had something to add. If the write fails (a full disk) nothing
        is taken: the next flush adds the same counts (to its own minute). On a shared store a
        stream's counts are added by a compare-and-set of its own; one whose answer is lost (a
        timeout that did apply) is added again by the next flush."""
        async with self._lock:
            return await self._flush(minute)

    async def _flush(self, minute: int | None) -> int:
        now = self._now()
        minute = now // MINUTE_MS if minute is None else minute
        hour = minute // 60
        changes: dict[bytes, bytes | None] = {}
        seen: dict[int, tuple[list[int], dict[int, list[int]]]] = {}
        blocks: dict[int, tuple[int, Block]] = {}
        added: dict[int, tuple[list[int], dict[int, list[int]]]] = {}   # shared: added to the stored block
        oldest: dict[int, int] = {}
        for config in self._catalogue.all():
            sid = config.stream_id
            stats = self._stats.streams.get(sid)
            if stats is not None:
                snapshot = _snapshot(stats)
                delta = self._delta(sid, snapshot)
                if delta is not None:
                    seen[sid] = snapshot
                    if self._shared:
                        added[sid] = delta
                    else:
                        block = dict(await self._block(sid, hour))   # rows are replaced, never changed
                        key = str(minute % 60)
                        block[key] = _add_row(block.get(key), *delta)
                        blocks[sid] = (hour, block)
                        changes[series_key(sid, hour)] = json.dumps(block, separators=(",", ":")).encode()
                    first = await self._oldest_hour(sid)
                    if first is None or hour < first:
                        oldest[sid] = hour
                        changes[series_key(sid, 0)] = _U32.pack(hour)
            await self._trim(config, now, oldest.get(sid), changes, oldest)
        if changes or added:
            if changes:
                await self._store.meta_write(changes)
            for sid, delta in added.items():
                await self._add_shared(sid, minute, delta)
                self._seen[sid] = seen[sid]   # added: a failure of the next is not added twice
            # a stream deleted while this flush awaited the store: its keys just written would
            # outlive it (its deletion already removed the older ones), so take them back out
            gone = {key: None for sid in seen if self._catalogue.by_id(sid) is None
                    for key in (series_key(sid, hour), series_key(sid, 0))}
            if gone:
                await self._store.meta_write(gone)   # type: ignore[arg-type]
        self._seen.update(seen)
        self._blocks.update(blocks)
        self._oldest.update(oldest)
        for sid in [s for s in self._seen if self._catalogue.by_id(s) is None]:   # deleted meanwhile
            self._drop_memory(sid)
        return len(seen)

    async def _add_shared(self, sid: int, minute: int, delta: tuple[list[int], dict[int, list[int]]]) -> None:
        """This broker's counts added to the minute's row as stored, whatever other brokers added."""
        key, field = series_key(sid, minute // 60), str(minute % 60)
        while True:
            raw = await self._store.meta_get(key)
            block: Block = json.loads(raw) if raw else {}
            block[field] = _add_row(block.get(field), *delta)
            if await self._store.meta_cas(key, raw, json.dumps(block, separators=(",", ":")).encode()):
                return

    def _delta(self, sid: int, snapshot: tuple[list[int], dict[int, list[int]]]) \
            -> tuple[list[int], dict[int, list[int]]] | None:
        """The counters' change since the last flush (None: nothing happened)."""
        stream, partitions = snapshot
        old_stream, old_partitions = self._seen.get(sid, (None, {}))
        d_stream = _minus(stream, old_stream)
        d_parts = {p: d for p, v in partitions.items() if any(d := _minus(v, old_partitions.get(p)))}
        return (d_stream, d_parts) if any(d_stream) or d_parts else None

    async def _block(self, sid: int, hour: int) -> Block:
        held = self._blocks.get(sid)
        if held is not None and held[0] == hour:
            return held[1]
        raw = await self._store.meta_get(series_key(sid, hour))   # a restart within the hour
        block: Block = json.loads(raw) if raw else {}
        return block

    async def _oldest_hour(self, sid: int) -> int | None:
        if sid not in self._oldest:
            raw = await self._store.meta_get(series_key(sid, 0))
            if raw is None:
                return None
            self._oldest[sid] = _U32.unpack(raw)[0]
        return self._oldest[sid]

    async def _trim(self, config: StreamConfig, now: int, staged: int | None, changes: dict[bytes, bytes | None],
                    oldest: dict[int, int]) -> None:
        """Delete the hours wholly before the retention window (the hour holding its start stays)."""
        sid = config.stream_id
        first = staged if staged is not None else await self._oldest_hour(sid)
        cutoff = max((now - config.retention_ms) // HOUR_MS, 1)
        if first is None or first >= cutoff:
            return
        for hour in range(first, cutoff):
            changes[series_key(sid, hour)] = None
        oldest[sid] = cutoff
        changes[series_key(sid, 0)] = _U32.pack(cutoff)

    def _drop_memory(self, sid: int) -> None:
        self._seen.pop(sid, None)
        self._blocks.pop(sid, None)
        self._oldest.pop(sid, None)

    async def forget(self, stream_id: int) -> None:
        """A deleted stream's series, stored and in memory."""
        self._drop_memory(stream_id)
        doomed: dict[bytes, bytes | None] = {k: None for k, _ in await self._store.meta_scan(stream_prefix(stream_id))}
        if doomed:
            await self._store.meta_write(doomed)

    # -- reading ----------------------------------------------------------------------------------

    async def query(self, config: StreamConfig, partition: int | None, labels: list[str],
                    start_s: int, end_s: int) -> dict[str, list[tuple[int, int]]]:
        """Per label, one (timestamp in seconds, value) per minute that overlaps [start_s, end_s],
        the stream's life and its retention window, up to now; minutes without traffic are 0."""
        now = self._now()
        # every minute that overlaps the period, the stream's life and its retention window
        first = max(start_s * 1000, config.created_ms, now - config.retention_ms) // MINUTE_MS
        last = min(end_s * 1000, now) // MINUTE_MS
        async with self._lock:
            rows = await self._rows(config.stream_id, first, last)
            live = self._pending(config.stream_id)
        if live is not None and first <= now // MINUTE_MS <= last:
            m = now // MINUTE_MS
            rows[m] = _add_row(rows.get(m), *live)
        out: dict[str, list[tuple[int, int]]] = {}
        for label in labels:
            points = []
            for m in range(first, last + 1):
                row = rows.get(m)
                points.append((m * 60, 0 if row is None else _value(row, label, partition)))
            out[label] = points
        return out

    def _pending(self, sid: int) -> tuple[list[int], dict[int, list[int]]] | None:
        stats = self._stats.streams.get(sid)
        if stats is None:
            return None
        stream, partitions = _snapshot(stats)
        old_stream, old_partitions = self._seen.get(sid, (None, {}))
        d_parts = {p: d for p, v in partitions.items() if any(d := _minus(v, old_partitions.get(p)))}
        return _minus(stream, old_stream), d_parts

    async def _rows(self, sid: int, first: int, last: int) -> dict[int, Row]:
        rows: dict[int, Row] = {}
        if first > last:
            return rows
        for hour in range(first // 60, last // 60 + 1):
            held = None if self._shared else self._blocks.get(sid)
            if held is not None and held[0] == hour:
                block = held[1]
            else:
                raw = await self._store.meta_get(series_key(sid, hour))
                block = json.loads(raw) if raw else {}
            for minute, row in block.items():
                rows[hour * 60 + int(minute)] = row
        return rows


def _value(row: Row, label: str, partition: int | None) -> int:
    if partition is not None:
        values = row["p"].get(str(partition))
        return 0 if values is None else int(values[PARTITION_LABELS.index(label)])
    how = STREAM_LABELS[label]
    s = row["s"]
    if len(how) == 2:   # an average over the minute's requests
        count = s[how[1]]
        return round(s[how[0]] / count) if count else 0
    return int(s[how[0]])
