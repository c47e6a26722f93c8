"""In-memory Store: the reference model the RocksDB store is tested against, and a real store
for tests and ephemeral brokers. It implements the full contract of `base.Store`, including the
rules that are easy to get wrong (numbering survives trims, at-least-one-record reads).

Every method runs to completion on the event loop (no await inside), so each is atomic without a
lock; the coroutine signatures are the interface's."""
from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Sequence

from broker.errors import ErrorCode, client_error
from broker.model import AppendBatch, PartitionBounds, Record, StreamConfig
from broker.settings import Settings
from broker.storage.base import AppendOutcome, Durability, Store, StoreCapabilities, changed_fields


class _Partition:
    __slots__ = ("records", "timestamps", "first_seq", "next_seq", "last_ts")

    def __init__(self) -> None:
        self.records: list[Record] = []      # records[i].seq == first_seq + i
        self.timestamps: list[int] = []      # parallel to records, non-decreasing
        self.first_seq = 0
        self.next_seq = 0
        self.last_ts = 0


class MemoryStore(Store):
    capabilities = StoreCapabilities(Durability.NONE)

    def __init__(self) -> None:
        self._streams: dict[tuple[str, str], StreamConfig] = {}
        self._by_id: dict[int, StreamConfig] = {}
        self._partitions: dict[tuple[int, int], _Partition] = {}
        self._next_stream_id = 1
        self._meta: dict[bytes, bytes] = {}

    @classmethod
    async def from_settings(cls, settings: Settings) -> MemoryStore:
        return cls()

    async def create_stream(self, config: StreamConfig) -> StreamConfig:
        if config.key in self._streams:
            raise client_error(ErrorCode.STREAM_EXISTS, stream=config.stream_name)
        stored = replace(config, stream_id=self._next_stream_id)
        self._next_stream_id += 1
        self._streams[stored.key] = self._by_id[stored.stream_id] = stored
        for p in range(stored.partition_count):
            self._partitions[(stored.stream_id, p)] = _Partition()
        return stored

    async def update_stream(self, config: StreamConfig, fields: Sequence[str] | None = None) -> StreamConfig:
        stored = self._by_id.get(config.stream_id)
        if stored is None:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {config.stream_id}")
        config = changed_fields(stored, config, fields)
        self._streams[config.key] = self._by_id[config.stream_id] = config
        for p in range(config.readable_partition_count):
            self._partitions.setdefault((config.stream_id, p), _Partition())
        return config

    async def drop_stream(self, stream_id: int) -> None:
        config = self._by_id.pop(stream_id, None)
        if config is None:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {stream_id}")
        del self._streams[config.key]
        # every partition it ever had (a scale event's history may have aged out of the config)
        for key in [k for k in self._partitions if k[0] == stream_id]:
            del self._partitions[key]

    async def list_streams(self) -> list[StreamConfig]:
        return [self._streams[k] for k in sorted(self._streams)]

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        firsts: list[AppendOutcome] = []
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
            if stream_id not in self._by_id:
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {stream_id}")
            raise client_error(ErrorCode.PARTITION_NOT_FOUND, partition_id=partition)
        return part

    async def read(self, stream_id: int, partition: int, start_seq: int, limit: int, max_bytes: int) -> list[Record]:
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

    async def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        part = self._partition(stream_id, partition)
        return PartitionBounds(part.first_seq, part.next_seq, part.last_ts)

    async def bounds_many(self, partitions: Sequence[tuple[int, int]]) -> list[PartitionBounds | None]:
        out: list[PartitionBounds | None] = []
        for stream_id, partition in partitions:
            if stream_id not in self._by_id:
                out.append(None)
                continue
            part = self._partition(stream_id, partition)
            out.append(PartitionBounds(part.first_seq, part.next_seq, part.last_ts))
        return out

    async def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        part = self._partition(stream_id, partition)
        return part.first_seq + bisect.bisect_left(part.timestamps, timestamp_ms)

    async def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        part = self._partition(stream_id, partition)
        cut = min(before_seq, part.next_seq) - part.first_seq
        if cut <= 0:
            return
        del part.records[:cut]
        del part.timestamps[:cut]
        part.first_seq += cut

    async def meta_get(self, key: bytes) -> bytes | None:
        return self._meta.get(key)

    async def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, v in self._meta.items() if k.startswith(prefix))

    async def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        for key, value in changes.items():
            if value is None:
                self._meta.pop(key, None)
            else:
                self._meta[key] = value

    async def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        if self._meta.get(key) != expected:
            return False
        if new is None:
            self._meta.pop(key, None)
        else:
            self._meta[key] = new
        return True

    async def close(self) -> None:
        pass
