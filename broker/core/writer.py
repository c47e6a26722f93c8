"""The committer: one task folds every producer's pending appends into one store append.

Producers call `append(batches)` and await a future. A single task takes *everything* queued
since the last append and hands it to the store in one call (for RocksDB: one WriteBatch, one WAL
write, one fsync when enabled). While that append runs, new requests queue up and form the next
batch, so the commit rate adapts to load without a timer. The store decides where the write runs
(see storage/rocks.py); one append at a time keeps a total order of commits, and so of the
sequence numbers the store assigns.
"""
from __future__ import annotations

import asyncio
import logging
import time
from operator import itemgetter
from typing import Sequence

from broker.core.stats import BrokerStats
from broker.errors import BrokerError, ErrorCode, server_error
from broker.model import AppendBatch, payload_bytes
from broker.storage.base import AppendOutcome, Store

log = logging.getLogger(__name__)

_Pending = tuple[Sequence[AppendBatch], "asyncio.Future[list[AppendOutcome]]"]
_data = itemgetter(1)


class Committer:
    def __init__(self, store: Store, stats: BrokerStats | None = None) -> None:
        self._store = store
        self._stats = stats if stats is not None else BrokerStats()
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.commits = 0   # observability and tests: how many store appends were made

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sluice-committer")

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        """Per batch: its first sequence number, None (its stream is gone) or the error that
        refused it. Raises the store's error when the whole append failed."""
        if self._closing:
            raise server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")
        future: asyncio.Future[list[AppendOutcome]] = asyncio.get_running_loop().create_future()
        self._pending.append((batches, future))
        self._wakeup.set()
        # no shield: the future is this producer's alone. A producer that goes away cancels it and
        # nothing else - its batches stay queued and are committed with the others, whose futures
        # the committer resolves (it skips one that is done)
        return await future

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            pending, self._pending = self._pending, []
            flat = [b for batches, _ in pending for b in batches]
            began = time.perf_counter()
            try:
                outcomes = await self._store.append(flat)
            except BrokerError as exc:
                self._stats.committed(0.0, 0, False)
                self._fail(pending, exc)
                continue
            except Exception:  # a bug, not a storage condition: never leave producers hanging
                log.exception("store append failed")
                self._stats.committed(0.0, 0, False)
                self._fail(pending, server_error(ErrorCode.UNAVAILABLE, detail="commit failed"))
                continue
            self.commits += 1
            self._count(flat, outcomes, time.perf_counter() - began)
            i = 0
            for batches, future in pending:
                n = len(batches)
                if not future.done():
                    future.set_result(outcomes[i:i + n])
                i += n

    def _count(self, flat: list[AppendBatch], outcomes: list[AppendOutcome], seconds: float) -> None:
        """Metrics of one commit: per batch written, its records and payload bytes (summed in C)."""
        stats = self._stats
        total = 0
        for batch, outcome in zip(flat, outcomes):
            if type(outcome) is int:
                n = len(batch.items)
                total += n
                stats.appended(batch.stream_id, batch.partition, n, payload_bytes(batch.items))
        stats.committed(seconds, total, True)

    @staticmethod
    def _fail(pending: list[_Pending], exc: BrokerError) -> None:
        for _, future in pending:
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        """Stop taking appends, commit everything already queued."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
