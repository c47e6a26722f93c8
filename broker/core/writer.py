"""Group commit: one writer folds every producer's pending appends into one store commit.

Producers call `append(batches)` and await a future. A single task takes *everything* queued
since the last commit and hands it to the store in one `append` call (one RocksDB WriteBatch, one
WAL write, one fsync when enabled) on a dedicated thread. While that commit runs, new requests
queue up and form the next group, so the commit rate adapts to load without a timer.
The one exception: a lone group of a few records in WAL mode is committed on the event loop
itself (see `_inline`), because the thread hops would cost more than the write.

Why a single dedicated thread and no asyncio.Lock: the RocksDB write blocks, so it must leave the
event loop; running every write on the same thread gives a total order of commits for free
(sequence numbers are assigned inside the store, in that order), and nothing on the event loop
ever waits on a lock while a blocking call is in progress.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from broker.errors import BrokerError, ErrorCode, server_error
from broker.model import AppendBatch
from broker.storage.base import Store

log = logging.getLogger(__name__)

# A group of at most this many records, in WAL mode, is committed on the event loop (see _inline).
INLINE_COMMIT_RECORDS = 4

_Pending = tuple[Sequence[AppendBatch], "asyncio.Future[list[int | None]]"]


class GroupCommitter:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-writer")
        self._task: asyncio.Task[None] | None = None
        self._blocking = 0   # run_blocking calls in flight
        self.commits = 0   # observability and tests: how many store commits were made

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sluice-group-commit")

    async def append(self, batches: Sequence[AppendBatch]) -> list[int | None]:
        """First sequence number per batch (None: its stream is gone). Raises the store's error."""
        if self._closing:
            raise server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")
        future: asyncio.Future[list[int | None]] = asyncio.get_running_loop().create_future()
        self._pending.append((batches, future))
        self._wakeup.set()
        # shield: a producer that goes away must not cancel a commit other producers share
        return await asyncio.shield(future)

    async def run_blocking(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run a store mutation on the writer thread: serialised with the commits, though not
        necessarily after appends still waiting to form their group."""
        self._blocking += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._blocking -= 1

    def _inline(self, batches: Sequence[AppendBatch]) -> bool:
        """Whether to commit this group on the event loop itself: a lone small write to the WAL
        (tens of microseconds) costs less than the two thread hops to the writer thread and back,
        which are a large part of a trickle producer's latency. Never with fsync (milliseconds),
        and never while a store mutation runs on the writer thread (it holds the store's lock)."""
        return not self._store.fsync and self._blocking == 0 \
            and sum(len(b.items) for b in batches) <= INLINE_COMMIT_RECORDS

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            group, self._pending = self._pending, []
            flat = [b for batches, _ in group for b in batches]
            try:
                if self._inline(flat):
                    firsts = self._store.append(flat)
                else:
                    firsts = await loop.run_in_executor(self._executor, self._store.append, flat)
            except BrokerError as exc:
                self._fail(group, exc)
                continue
            except Exception:  # a bug, not a storage condition: never leave producers hanging
                log.exception("group commit failed")
                self._fail(group, server_error(ErrorCode.UNAVAILABLE, detail="commit failed"))
                continue
            self.commits += 1
            i = 0
            for batches, future in group:
                n = len(batches)
                if not future.done():
                    future.set_result(firsts[i:i + n])
                i += n

    @staticmethod
    def _fail(group: list[_Pending], exc: BrokerError) -> None:
        for _, future in group:
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        """Stop taking appends, commit everything already queued, stop the thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
