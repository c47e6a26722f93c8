"""The event loop's turns while some work runs: a test that the work leaves the loop to others
counts turns, not times (a busy machine stretches every gap, not their count)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

TICK_S = 0.005


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[list[int]]:
    """`[n]`: the turns a ticker (one per TICK_S at most) got inside the block, final once it
    exits. Work done on the loop in one go leaves it at most 1 (the ticker wakes after it)."""
    turns = [0]
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            await asyncio.sleep(TICK_S)
            turns[0] += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)   # the ticker is in its first sleep when the work begins
    try:
        yield turns
    finally:
        done.set()
        await ticker
