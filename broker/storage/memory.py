"""In-memory Store: the reference model the RocksDB store is tested against, and a real store
for tests and ephemeral brokers. It implements the full contract of `base.Store`, including the
rules that are easy to get wrong (numbering survives trims, at-least-one-record reads)."""
from __future__ import annotations

import bisect
import threading
from dataclasses import replace
from typing import Sequence

from broker.errors import ErrorCode, client_error
from broker.model import AppendBatch, PartitionBounds, Record, StreamConfig


class _Partition:
    __slots__ = ("records", "timestamps", "first_seq", "next_seq", "last_ts")

    def __init__(self) -> None:
        self.records: list[Record] = []      # records[i].seq == first_seq + i
        self.timestamps: list[int] = []      # parallel to records, non-decreasing
        self.first_seq = 0
        self.next_seq = 0
        self.last_ts = 0


class MemoryStore:
    fsync = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, StreamConfig] = {}
        self._partitions: dict[tuple[int, int], _Partition] = {}
        self._next_stream_id = 1
        self._meta: dict[bytes, bytes] = {}

    def create_stream(self, config: StreamConfig) -> StreamConfig:
        with self._lock:
            if config.name in self._streams:
                raise client_error(ErrorCode.STREAM_EXISTS, stream=config.name)
            stored = replace(config, stream_id=self._next_stream_id)
            self._next_stream_id += 1
            self._streams[config.name] = stored
            for p in range(stored.partition_count):
                self._partitions[(stored.stream_id, p)] = _Partition()
            return stored

    def drop_stream(self, name: str) -> None:
        with self._lock:
            config = self._streams.pop(name, None)
            if config is None:
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=name)
            for p in range(config.partition_count):
                del self._partitions[(config.stream_id, p)]

    def list_streams(self) -> list[StreamConfig]:
        with self._lock:
            return sorted(self._streams.values(), key=lambda c: c.name)

    def append(self, batches: Sequence[AppendBatch]) -> list[int | None]:
        firsts: list[int | None] = []
        with self._lock:
            for batch in batches:
                part = self._partitions.get((batch.stream_id, batch.partition))
                if part is None:
                    firsts.append(None)
                    continue
                ts = max(batch.timestamp_ms, part.last_ts)
                first = part.next_seq
                part.records.extend(Record(first + i, ts, key, data) for i, (key, data) in enumerate(batch.items))
                part.timestamps.extend([ts] * len(batch.items))
                part.next_seq += len(batch.items)
                part.last_ts = ts
                firsts.append(first)
        return firsts

    def _partition(self, stream_id: int, partition: int) -> _Partition:
        part = self._partitions.get((stream_id, partition))
        if part is None:
            if not any(c.stream_id == stream_id for c in self._streams.values()):
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {stream_id}")
            raise client_error(ErrorCode.PARTITION_NOT_FOUND, partition_id=partition)
        return part

    def read(self, stream_id: int, partition: int, start_seq: int, limit: int, max_bytes: int) -> list[Record]:
        with self._lock:
            part = self._partition(stream_id, partition)
            start = max(start_seq, part.first_seq) - part.first_seq
            out: list[Record] = []
            total = 0
            for rec in part.records[start:start + limit]:
                total += len(rec.data)
                if out and total > max_bytes:
                    break
                out.append(rec)
            return out

    def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        with self._lock:
            part = self._partition(stream_id, partition)
            return PartitionBounds(part.first_seq, part.next_seq, part.last_ts)

    def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        with self._lock:
            part = self._partition(stream_id, partition)
            return part.first_seq + bisect.bisect_left(part.timestamps, timestamp_ms)

    def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        with self._lock:
            part = self._partition(stream_id, partition)
            cut = min(before_seq, part.next_seq) - part.first_seq
            if cut <= 0:
                return
            del part.records[:cut]
            del part.timestamps[:cut]
            part.first_seq += cut

    def meta_get(self, key: bytes) -> bytes | None:
        with self._lock:
            return self._meta.get(key)

    def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        with self._lock:
            return sorted((k, v) for k, v in self._meta.items() if k.startswith(prefix))

    def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        with self._lock:
            for key, value in changes.items():
                if value is None:
                    self._meta.pop(key, None)
                else:
                    self._meta[key] = value

    def close(self) -> None:
        pass
