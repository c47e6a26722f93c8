"""Retention: trim records older than each stream's retention window."""
from __future__ import annotations

from typing import Iterable

from broker.errors import BrokerError, ErrorCode
from broker.model import StreamConfig
from broker.storage.base import Store


async def enforce_retention(store: Store, streams: Iterable[StreamConfig], now_ms: int) -> int:
    """Trim every partition of `streams` up to its retention cutoff; returns how many moved."""
    moved = 0
    for config in streams:
        cutoff = now_ms - config.retention_ms
        sid = config.stream_id
        for p in range(config.readable_partition_count):
            try:
                before = (await store.bounds(sid, p)).first_seq
                await store.trim(sid, p, await store.seq_at_time(sid, p, cutoff))
                moved += (await store.bounds(sid, p)).first_seq != before
            except BrokerError as exc:
                if exc.code is not ErrorCode.STREAM_NOT_FOUND:  # deleted meanwhile: fine
                    raise
                break
    return moved
