"""Retention: trim records older than each stream's retention window."""
from __future__ import annotations

import logging
from typing import Iterable

from broker.errors import BrokerError, ErrorCode
from broker.model import StreamConfig
from broker.storage.base import Store

log = logging.getLogger(__name__)


async def enforce_retention(store: Store, streams: Iterable[StreamConfig], now_ms: int) -> int:
    """Trim every partition of `streams` up to its retention cutoff; returns how many moved. A
    partition the store fails on (UNAVAILABLE, ...) is logged and skipped: the others are still
    trimmed, and the next pass tries it again. An empty partition costs one bounds lookup (from
    memory, mostly) and one with nothing old enough one time lookup: no trim is asked (each was a
    thread hop: ~250 us of CPU a partition a pass, 26 s a pass over 100,000 mostly empty ones)."""
    moved = 0
    for config in streams:
        cutoff = now_ms - config.retention_ms
        sid = config.stream_id
        for p in range(config.readable_partition_count):
            try:
                bounds = await store.bounds(sid, p)
                if bounds.first_seq >= bounds.next_seq:
                    continue   # nothing stored: nothing to trim
                cut = await store.seq_at_time(sid, p, cutoff)
                if cut <= bounds.first_seq:
                    continue   # the oldest record kept is within the window
                await store.trim(sid, p, cut)
                moved += (await store.bounds(sid, p)).first_seq != bounds.first_seq
            except BrokerError as exc:
                if exc.code is ErrorCode.STREAM_NOT_FOUND:  # deleted meanwhile: fine
                    break
                log.warning("retention: partition %d of stream %s/%s skipped this pass: %s", p, config.project,
                            config.stream_name, exc.message)
    return moved
