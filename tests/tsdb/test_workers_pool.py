"""TsdbWorkers (broker/tsdb/workers.py) on its own: a put never waits forever for a worker, and
no worker process outlives close(). Found in review: a put waiting for an idle worker when the
last one died and could not be replaced, or when the pool closed, waited for ever; a replacement
starting during close() was left running."""
from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest

from broker.tsdb import workers as W
from broker.tsdb.put import Grouped
from tests.tsdb.test_workers import alive

NOW_S = 1_700_000_000


class Registry:
    """What TsdbWorkers reads of a SeriesRegistry."""

    def __init__(self, stream_id: int = 1) -> None:
        self.stream_id = stream_id
        self._kinds: dict[str, str] = {}
        self.learned: list[str] = []

    def kinds(self) -> dict[str, str]:
        return self._kinds


def body(n: int = 400) -> bytes:
    return json.dumps([{"metric": "m", "timestamp": NOW_S, "value": i, "tags": {"host": f"h{i}"}}
                       for i in range(n)]).encode()


async def test_a_worker_answers_and_learns_the_types_it_is_told() -> None:
    pool = W.TsdbWorkers(1)
    await pool.start()
    try:
        reg = Registry()
        first = await pool.group(body(), reg, 8, 1 << 20)   # type: ignore[arg-type]
        assert isinstance(first, Grouped) and not first.parts and len(first.pending) == 400
        for i in range(400):
            key = f'["m",[["host","h{i}"]]]'
            reg._kinds[key] = "long"
            reg.learned.append(key)
        again = await pool.group(body(), reg, 8, 1 << 20)   # type: ignore[arg-type]
        assert isinstance(again, Grouped) and not again.pending
        assert sum(len(p.indices) for p in again.parts.values()) == 400 and pool.jobs == 2
    finally:
        await pool.close()


async def test_a_waiting_put_gives_up_when_no_worker_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = W.TsdbWorkers(1)
    await pool.start()
    (worker,) = pool._all
    worker.proc.kill()
    worker.proc.wait()

    def no_spawn() -> Any:
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(W, "_spawn", no_spawn)
    reg = Registry()
    first = asyncio.ensure_future(pool.group(body(), reg, 8, 1 << 20))   # type: ignore[arg-type]
    second = asyncio.ensure_future(pool.group(body(), reg, 8, 1 << 20))   # type: ignore[arg-type]
    assert await first is None                          # worked on in the broker
    assert await asyncio.wait_for(second, 5) is None   # not waiting for ever
    assert pool.fallbacks == 2 and not pool._all
    await pool.close()


async def test_close_while_a_put_waits_for_a_worker_ends_that_wait() -> None:
    pool = W.TsdbWorkers(1)
    await pool.start()
    (worker,) = pool._all
    os.kill(worker.proc.pid, signal.SIGSTOP)   # busy: its job does not finish on its own
    reg = Registry()
    first = asyncio.ensure_future(pool.group(body(), reg, 8, 1 << 20))   # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(pool.group(body(), reg, 8, 1 << 20))   # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    await pool.close()
    assert await asyncio.wait_for(second, 5) is None
    assert await asyncio.wait_for(first, 5) is None
    assert not alive(worker.proc.pid)


async def test_a_put_that_stops_waiting_for_a_worker_costs_the_pool_nothing() -> None:
    # a put whose sync_timeout runs out while it waits for an idle worker is cancelled: it must let
    # go of its place in the queue, and the worker it would have had goes to the next put
    pool = W.TsdbWorkers(1)
    await pool.start()
    try:
        (worker,) = pool._all
        os.kill(worker.proc.pid, signal.SIGSTOP)   # busy with the first put until continued
        reg = Registry()
        first = asyncio.ensure_future(pool.group(body(), reg, 8, 1 << 20))   # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(pool.group(body(), reg, 8, 1 << 20))   # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        os.kill(worker.proc.pid, signal.SIGCONT)
        assert isinstance(await asyncio.wait_for(first, 30), Grouped)
        assert isinstance(await asyncio.wait_for(pool.group(body(), reg, 8, 1 << 20), 30),   # type: ignore[arg-type]
                          Grouped)
        assert pool._all == [worker] and pool.jobs == 2 and pool.fallbacks == 0
    finally:
        await pool.close()


async def test_close_during_a_replacement_leaves_no_worker() -> None:
    pool = W.TsdbWorkers(1)
    await pool.start()
    (worker,) = pool._all
    worker.proc.kill()
    worker.proc.wait()
    assert await pool.group(body(), Registry(), 8, 1 << 20) is None   # type: ignore[arg-type]
    assert pool._replacing and pool.replaced == 1
    spawned: list[int] = []
    real = W._spawn

    def spy() -> Any:
        proc, sock = real()
        spawned.append(proc.pid)
        return proc, sock
    W._spawn = spy   # (the replacement may already be past it: then it was spawned before)
    try:
        await pool.close()
    finally:
        W._spawn = real
    await asyncio.sleep(1.0)
    assert not pool._all
    assert not [pid for pid in spawned if alive(pid)]
    assert not [pid for pid in children() if alive(pid)]


def children() -> list[int]:
    """This process's child processes that are tsdb workers."""
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        pids = [int(c) for c in f.read().split()]
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"broker.tsdb.workers" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out
