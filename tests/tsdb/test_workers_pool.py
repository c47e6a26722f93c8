"""TsdbWorkers (broker/tsdb/workers.py) on its own: a put never waits forever for a worker, and
no worker process outlives close(). Found in review: a put waiting for an idle worker when the
last one died and could not be replaced, or when the pool closed, waited for ever; a replacement
starting during close() was left running."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
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


def spawn_running(code: str) -> Any:
    """A stand-in for workers._spawn: a Python process running `code`, the worker's end of the
    socket pair passed to it (its number in $FD: what it writes there is what the pool reads)."""
    def spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                env={**os.environ, "FD": str(theirs.fileno())})
        theirs.close()
        return proc, mine
    return spawn


@pytest.mark.parametrize("code, says", [
    ("import sys; sys.exit(3)", "did not start (exit status 3)"),                     # dies while starting
    ("import os, time; os.write(int(os.environ['FD']), b'xxxx'); time.sleep(30)", "not ready"),   # garbage
])
async def test_a_worker_that_cannot_start_fails_the_start_and_is_not_left_running(
        monkeypatch: pytest.MonkeyPatch, code: str, says: str) -> None:
    spawned: list[int] = []
    stand_in = spawn_running(code)

    def spy() -> Any:
        proc, sock = stand_in()
        spawned.append(proc.pid)
        return proc, sock
    monkeypatch.setattr(W, "_spawn", spy)
    pool = W.TsdbWorkers(1)
    with pytest.raises(RuntimeError, match=says.replace("(", r"\(").replace(")", r"\)")):
        await pool.start()
    assert spawned and not [pid for pid in spawned if alive(pid)]
    await pool.close()


async def test_a_worker_is_taken_only_once_it_says_it_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """One that stays silent (slow imports) is not handed a put: start waits for it, and gives up
    after START_TIMEOUT_S, killing it."""
    spawned: list[int] = []
    stand_in = spawn_running("import time; time.sleep(30)")

    def spy() -> Any:
        proc, sock = stand_in()
        spawned.append(proc.pid)
        return proc, sock
    monkeypatch.setattr(W, "_spawn", spy)
    monkeypatch.setattr(W, "START_TIMEOUT_S", 1.0)
    pool = W.TsdbWorkers(1)
    started = asyncio.ensure_future(pool.start())
    await asyncio.sleep(0.5)
    assert not started.done() and pool._idle.empty()   # not ready: not taken
    with pytest.raises(RuntimeError, match="did not start"):
        await started
    assert spawned and not [pid for pid in spawned if alive(pid)]
    await pool.close()


async def test_a_started_pool_answers_its_first_put_at_once() -> None:
    """start() reads each worker's ready frame, and only that: the first put's answer is read as its own."""
    pool = W.TsdbWorkers(2)
    await pool.start()
    try:
        assert pool._idle.qsize() == 2
        for worker in pool._all:   # each has said it is ready and nothing more: nothing left to read
            assert not worker.reader._buffer   # type: ignore[attr-defined]
        async with asyncio.timeout(5):
            assert isinstance(await pool.group(body(), Registry(), 8, 1 << 20), Grouped)   # type: ignore[arg-type]
    finally:
        await pool.close()


def test_a_worker_imports_none_of_the_core() -> None:
    """A worker process loads the put path only: not the query engine (Polars, sqlglot), the doors
    (aiohttp, gRPC) or the core (each would cost every worker its start time and memory)."""
    heavy = ("polars", "sqlglot", "aiohttp", "grpc", "broker.core.broker")
    out = subprocess.run([sys.executable, "-c", "import sys, broker.tsdb.workers; "
                          f"print([m for m in {heavy!r} if m in sys.modules])"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


async def test_an_unshielded_job_cancelled_half_way_costs_only_its_worker() -> None:
    """A put without a sync_timeout is not shielded (it is never cancelled, but at shutdown): if
    its job is cancelled all the same, that worker, half way through a frame, is replaced, and the
    pool goes on."""
    pool = W.TsdbWorkers(1)
    await pool.start()
    (first,) = pool._all
    try:
        job = asyncio.ensure_future(pool.group(body(100_000), Registry(), 8, 1 << 20,   # type: ignore[arg-type]
                                               cancellable=False))
        await asyncio.sleep(0.05)
        assert pool._idle.empty() and not job.done()   # the worker has the body
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert pool.replaced == 1
        async with asyncio.timeout(30):
            await asyncio.gather(*pool._replacing)   # (meanwhile a put is worked on in the broker)
            answer = await pool.group(body(), Registry(), 8, 1 << 20)   # type: ignore[arg-type]
        assert isinstance(answer, Grouped) and pool._all[0] is not first
    finally:
        await pool.close()
    await asyncio.sleep(0.5)
    assert not alive(first.proc.pid) and not [pid for pid in children() if alive(pid)]


async def test_a_shielded_job_whose_put_gives_up_finishes_and_keeps_its_worker() -> None:
    """A put with a sync_timeout may be cancelled while a worker has its body: the job is shielded,
    so the worker finishes the frame and is idle again, not replaced."""
    pool = W.TsdbWorkers(1)
    await pool.start()
    (first,) = pool._all
    try:
        job = asyncio.ensure_future(pool.group(body(100_000), Registry(), 8, 1 << 20))   # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert pool._idle.empty() and not job.done()   # the worker has the body
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        async with asyncio.timeout(30):
            answer = await pool.group(body(), Registry(), 8, 1 << 20)   # type: ignore[arg-type]
        assert isinstance(answer, Grouped) and pool._all == [first] and pool.replaced == 0 and pool.jobs == 2
    finally:
        await pool.close()


async def test_a_worker_slower_than_the_job_timeout_is_replaced_and_its_put_worked_on_here(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(W, "JOB_TIMEOUT_S", 0.5)
    pool = W.TsdbWorkers(1)
    await pool.start()
    (stuck,) = pool._all
    os.kill(stuck.proc.pid, signal.SIGSTOP)   # alive, and never answering
    try:
        async with asyncio.timeout(10):
            assert await pool.group(body(), Registry(), 8, 1 << 20) is None   # type: ignore[arg-type]
        assert pool.replaced == 1 and pool.fallbacks == 1
        assert f"tsdb worker {stuck.proc.pid} failed (took longer than 0.5 s)" in caplog.text
        async with asyncio.timeout(30):
            await asyncio.gather(*pool._replacing)
            assert isinstance(await pool.group(body(), Registry(), 8, 1 << 20), Grouped)   # type: ignore[arg-type]
    finally:
        await pool.close()
    await asyncio.sleep(0.5)
    assert not alive(stuck.proc.pid) and not [pid for pid in children() if alive(pid)]


async def test_close_while_a_replacement_is_still_importing_does_not_wait_for_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop right after a worker died: its replacement, not ready yet, is killed by close()
    instead of being waited for until it has imported everything (or START_TIMEOUT_S)."""
    pool = W.TsdbWorkers(1)
    await pool.start()
    (worker,) = pool._all
    spawned: list[int] = []
    stand_in = spawn_running("import time; time.sleep(30)")   # a start that takes its time

    def spy() -> Any:
        proc, sock = stand_in()
        spawned.append(proc.pid)
        return proc, sock
    monkeypatch.setattr(W, "_spawn", spy)
    worker.proc.kill()
    worker.proc.wait()
    assert await pool.group(body(), Registry(), 8, 1 << 20) is None   # type: ignore[arg-type]

    async with asyncio.timeout(10):
        while not (spawned and pool._starting):   # noqa: ASYNC110 - polling: the replacement spawned, not ready
            await asyncio.sleep(0.02)
    async with asyncio.timeout(10):   # not the replacement's 30 s, not START_TIMEOUT_S
        await pool.close()
    assert not pool._all and not [pid for pid in spawned if alive(pid)]


async def test_an_answer_that_comes_as_the_job_times_out_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timer kills the worker in the same turn as its answer completes: the worker is dead,
    so the put is worked on here and the worker replaced, not handed the next put."""
    real_call = W._Worker.call

    async def call_then_time_out(self: Any, header: bytes, body: bytes) -> Any:
        answer = await real_call(self, header, body)
        self.overdue()
        return answer
    monkeypatch.setattr(W._Worker, "call", call_then_time_out)
    pool = W.TsdbWorkers(1)
    await pool.start()
    try:
        assert await pool.group(body(), Registry(), 8, 1 << 20) is None   # type: ignore[arg-type]
        assert pool.replaced == 1 and pool.jobs == 0
    finally:
        await pool.close()
