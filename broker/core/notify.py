"""Wake-ups on the write path: readers wait for a partition to grow instead of polling.

Protocol, which cannot miss a wake-up: a reader `register()`s *before* it reads; if the read finds
nothing it awaits the returned future. A writer calls `notify()` after its commit is visible to
reads, which resolves every future registered for those partitions. A commit that lands between
the registration and the read is seen by the read; one that lands after it resolves the future.
Lives on the event loop only (no locks); costs one dict lookup per written partition when nobody waits.
"""
from __future__ import annotations

import asyncio
from typing import Iterable

PartitionRef = tuple[int, int]   # (stream_id, partition)


class WriteNotifier:
    def __init__(self) -> None:
        self._waiters: dict[PartitionRef, list[asyncio.Future[None]]] = {}
        self.closed = False

    def register(self, stream_id: int, partition: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:  # shutting down: nobody waits any more
            future.set_result(None)
        else:
            self._waiters.setdefault((stream_id, partition), []).append(future)
        return future

    def close(self) -> None:
        """Shutdown: wake every waiter now, and every later one at once."""
        self.closed = True
        self.notify(list(self._waiters))

    def discard(self, stream_id: int, partition: int, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get((stream_id, partition))
        if waiters is not None:
            try:
                waiters.remove(future)
            except ValueError:
                pass
            if not waiters:
                del self._waiters[(stream_id, partition)]
        if not future.done():
            future.cancel()

    def notify(self, partitions: Iterable[PartitionRef]) -> None:
        for ref in partitions:
            waiters = self._waiters.pop(ref, None)
            if waiters:
                for future in waiters:
                    if not future.done():
                        future.set_result(None)

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())
