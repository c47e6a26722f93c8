"""TsdbWorkers (`--tsdb-workers N`): processes that parse, check and sort big `/api/put` bodies, so
the per-point work of a put runs on more cores than the broker's one event loop.

A worker gets the body, the layout of the tsdb stream (stream id, partition count, the record size
limit) and the series types the broker's registry has learned since it last told this worker; it
answers put.parse + points.check_batch + put.group: per point its error, the points of series of a
known type sorted into their partitions' batches (records made, type-checked), and the points of
series it does not know, in array order. Everything that decides or stores stays in the broker
process (put.PutWrite): the types of new series (under the registry's lock), the append, the
commit and the acknowledgement after it. So the broker's cost of a put is per partition, plus the
hop. A known type never changes while its stream lives (a stream deleted and created again has
another id: the worker forgets what it knew), so a worker's types are never wrong, only behind.

Protocol: one AF_UNIX socketpair per worker (the worker gets its end by `pass_fds` and nobody else
holds it, so it sees EOF and exits when the broker dies, SIGKILL included); a frame is a 4-byte
big-endian length, then for a job a pickled header of its own length-prefixed and the body, for an
answer a pickle (the worker is our own child). A worker's first frame is an empty one, sent once
its imports are done: it is taken only then (a put must not queue behind a start), and one that
has not said so within START_TIMEOUT_S is killed. It imports the put path alone, not the broker's
core (broker.core.broker) or the query engine. One job at a time per worker; jobs wait for an
idle worker. Bodies under OFFLOAD_BYTES are worked on in the broker (a trickle of small puts pays
no hop). A worker that dies, answers garbage or takes longer than JOB_TIMEOUT_S is killed and
replaced, and that put is worked on in the broker: a request never fails for it. Workers run at a
lower priority (NICENESS).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from array import array
from typing import Any

from broker.errors import ErrorCode
from broker.model import Packed
from broker.tsdb.put import BadBody, Grouped, PackedPart, Part, sort
from broker.tsdb.series import SeriesRegistry

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 16 * 1024   # smaller bodies are worked on in the broker: the hop costs more than it saves
JOB_TIMEOUT_S = 60.0
START_TIMEOUT_S = 60.0   # a worker that has not said it is ready by then is killed (slow imports: a cold disk)
# Added to a worker's niceness: when the broker's event loop and a worker both want a core, the loop
# gets it. The loop is the one stage every put passes twice (the body in, the append and the answer
# out) and it serves every other door too; a worker that waits a little costs the put less than a
# loop that waits (bench/run.py tsdb: +3-5 % points/s, p50 latency 3.4 -> 3.0 ms on two cores).
NICENESS = 5
_RECHECK_S = 1.0   # a put waiting for an idle worker looks this often whether any is left
_LEN = struct.Struct(">I")
_READY = _LEN.pack(0)   # a worker's first frame, once it can take jobs


class _Worker:
    def __init__(self, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proc, self.reader, self.writer = proc, reader, writer
        self.registry: SeriesRegistry | None = None   # whose types it was told, and how many
        self.told = 0
        self.killed = False   # for taking longer than JOB_TIMEOUT_S

    def overdue(self) -> None:
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()

    async def call(self, header: bytes, body: bytes) -> Any:
        self.writer.write(_LEN.pack(4 + len(header) + len(body)) + _LEN.pack(len(header)) + header)
        self.writer.write(body)
        (n,) = _LEN.unpack(await self.reader.readexactly(4))
        return pickle.loads(await self.reader.readexactly(n))


class TsdbWorkers:
    """N worker processes; `group` hands one a put's body."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: list[_Worker] = []
        self._closing = False
        self._replacing: set[asyncio.Future[Any]] = set()   # replacements starting, workers being reaped
        self._starting: set[subprocess.Popen[bytes]] = set()   # spawned, not ready yet: close() kills them
        self.jobs = self.fallbacks = self.replaced = 0   # observability and tests

    async def start(self) -> None:
        """Every worker started and ready (they import side by side); raises the first failure,
        once none is starting any more (the caller closes the pool)."""
        started = await asyncio.gather(*(self._add() for _ in range(self.size)), return_exceptions=True)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _add(self) -> None:
        proc, mine = await asyncio.to_thread(_spawn)
        writer: asyncio.StreamWriter | None = None
        self._starting.add(proc)
        try:
            if self._closing:
                raise RuntimeError("closing")
            reader, writer = await asyncio.open_unix_connection(sock=mine, limit=2**22)
            # taken only once it has imported what it needs: a put must not queue behind a start
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    ready = await reader.readexactly(4)
            except (asyncio.IncompleteReadError, TimeoutError):
                with contextlib.suppress(subprocess.TimeoutExpired):   # closed its end: exiting, and why
                    await asyncio.to_thread(proc.wait, 1.0)
                raise RuntimeError(f"tsdb worker {proc.pid} did not start (exit status {proc.poll()})") from None
            if ready != _READY:
                raise RuntimeError(f"tsdb worker {proc.pid} started with {ready!r}, not ready")
            if self._closing:
                raise RuntimeError("closing")
        except BaseException:
            if writer is not None:
                writer.close()
            mine.close()
            proc.kill()
            await asyncio.to_thread(proc.wait)
            raise
        finally:
            self._starting.discard(proc)
        worker = _Worker(proc, reader, writer)
        self._all.append(worker)
        self._idle.put_nowait(worker)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._all]

    async def group(self, body: bytes, registry: SeriesRegistry, partition_count: int,
                    max_record_bytes: int, cancellable: bool = True) -> Grouped | BadBody | None:
        """The body checked and sorted by a worker for `registry`'s stream at `partition_count`
        partitions, BadBody when it holds no points to check, or None when no worker could take it
        (the caller works on it itself). `cancellable`: whether the caller may be cancelled while
        a worker has its body (a put with a sync_timeout)."""
        # the wait for an idle worker may be cancelled (a put whose sync_timeout ran out drops its
        # body); the job of a cancellable caller is shielded: a request that goes away must not
        # leave a worker half way through a frame. Others save the shield's task (a job cancelled
        # all the same costs that worker: it is dropped, and replaced unless the pool is closing)
        worker = await self._take()
        job = None if worker is None else self._group(worker, body, registry, partition_count, max_record_bytes)
        answer = None if job is None else await (asyncio.shield(job) if cancellable else job)
        if answer is None:
            self.fallbacks += 1
        return answer

    async def _take(self) -> _Worker | None:
        """An idle worker; None once there is none to wait for (all gone and not replaced, or closing)."""
        while self._all and not self._closing:
            if not self._idle.empty():   # no timer, no task: the common case under load
                return self._idle.get_nowait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECHECK_S):
                    return await self._idle.get()
        return None

    async def _group(self, worker: _Worker, body: bytes, registry: SeriesRegistry, partition_count: int,
                     max_record_bytes: int) -> Grouped | BadBody | None:
        forget = worker.registry is not registry
        told = 0 if forget else worker.told
        kinds = registry.kinds()
        news = [(k, kinds[k]) for k in registry.learned[told:]]
        header = pickle.dumps((registry.stream_id, partition_count, max_record_bytes, forget, news), protocol=5)
        # too slow: killed, so its answer ends (a timer handle per job, not a timeout scope: this is
        # every put's path)
        overdue = asyncio.get_running_loop().call_later(JOB_TIMEOUT_S, worker.overdue)
        try:
            answer = await worker.call(header, body)
            if worker.killed:   # its answer came in the turn its time ran out: it is dead all the same
                raise RuntimeError("killed as its answer came")
            grouped = _grouped(answer, registry.stream_id, partition_count)
        except asyncio.CancelledError:   # half way through a frame (an unshielded job): it cannot be trusted
            self._replace_worker(worker)
            raise
        except Exception as exc:   # died, garbage, too slow: a new one; this put is worked on here
            why = f"took longer than {JOB_TIMEOUT_S:g} s" if worker.killed else f"{type(exc).__name__}: {exc}"
            log.error("tsdb worker %d failed (%s); replacing it", worker.proc.pid, why)
            self._replace_worker(worker)
            return None
        finally:
            overdue.cancel()
        worker.registry, worker.told = registry, told + len(news)
        self._idle.put_nowait(worker)
        self.jobs += 1
        return grouped

    def _replace_worker(self, worker: _Worker) -> None:
        self._drop(worker)
        if not self._closing:
            self.replaced += 1
            self._replacing.add(task := asyncio.ensure_future(self._replace()))
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        try:
            await self._add()
        except Exception:
            if not self._closing:
                log.exception("could not start a tsdb worker; %d left", len(self._all))

    def _drop(self, worker: _Worker) -> None:
        if worker in self._all:
            self._all.remove(worker)
        worker.writer.close()
        if worker.proc.poll() is None:
            worker.proc.kill()
        # reaped off the loop (no zombie left behind)
        self._replacing.add(task := asyncio.ensure_future(asyncio.to_thread(worker.proc.wait)))
        task.add_done_callback(self._replacing.discard)

    async def close(self) -> None:
        self._closing = True
        # not cancelled: a worker being spawned in a thread would be lost with its socket; each
        # sees _closing once spawned and stops it, and one still importing is killed now (its
        # start ends at once instead of after its imports, or START_TIMEOUT_S)
        for proc in list(self._starting):
            if proc.poll() is None:
                proc.kill()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        workers, self._all = self._all, []
        for w in workers:
            w.writer.close()   # EOF: the worker exits
        for w in workers:
            try:
                await asyncio.wait_for(asyncio.to_thread(w.proc.wait), 5)
            except TimeoutError:
                w.proc.kill()
                await asyncio.to_thread(w.proc.wait)


def _grouped(answer: Any, stream_id: int, partition_count: int) -> Grouped | BadBody:
    """A worker's answer made a Grouped (or a BadBody); any other shape raises."""
    if answer[0] == "bad":
        return BadBody(ErrorCode[answer[1]], answer[2])
    tag, n, failed, parts, pending = answer
    if tag != "ok":
        raise ValueError(f"a worker's answer tagged {tag!r}")
    errors: list[str | None] = [None] * n
    for i, error in failed:
        errors[i] = error
    return Grouped(stream_id, partition_count, errors,
                   {p: PackedPart(Packed(count, offsets, blob, biggest), _indices(indices), latest)
                    for p, count, offsets, blob, biggest, indices, latest in parts}, pending)


def _indices(raw: bytes) -> array[int]:
    out = array("I")
    out.frombytes(raw)
    return out


def _spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "broker.tsdb.workers", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return proc, mine


# -- the worker's side ----------------------------------------------------------------------------

def _work(known: dict[str, str], header: tuple[Any, ...], body: bytes) -> tuple[Any, ...]:
    stream_id, partition_count, max_record_bytes, _, _ = header
    try:
        g = sort(body, stream_id, partition_count, known, max_record_bytes)
    except BadBody as exc:
        return "bad", exc.code.name, exc.details
    errors = g.errors
    failed = [] if errors.count(None) == len(errors) else [(i, e) for i, e in enumerate(errors) if e is not None]
    parts = []
    for p, part in g.parts.items():
        assert isinstance(part, Part)   # group() makes them so
        packed = Packed.of(part.records)   # two bytes objects, not one per record
        parts.append((p, packed.n, packed.offsets, packed.blob, packed.biggest, array("I", part.indices).tobytes(),
                      part.latest))
    return "ok", len(errors), failed, parts, g.pending


def _serve(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the broker decides when we stop: EOF
    with contextlib.suppress(OSError):   # raising one's own niceness is always allowed; a sandbox may say no
        os.nice(NICENESS)
    from broker import malloc
    # the broker's collector settings: with the defaults the young generation's threshold is
    # crossed several times per body, and full collections traverse every cached series form
    malloc.settle_gc()
    sock = socket.socket(fileno=fd)
    f = sock.makefile("rb", buffering=1 << 20)
    send = sock.sendall
    send(_READY)
    known: dict[str, str] = {}
    stream_id = None
    while True:
        head = f.read(4)
        if len(head) < 4:
            return
        (n,) = _LEN.unpack(head)
        frame = f.read(n)
        if len(frame) < n:
            return
        (h,) = _LEN.unpack_from(frame)
        header = pickle.loads(frame[4:4 + h])
        if header[3] or header[0] != stream_id:   # another stream (or registry): what was known is not
            known = {}   # a new mapping, not the old one emptied: put.fast_group's cache is keyed by it
            stream_id = header[0]
        known.update(header[4])
        out = pickle.dumps(_work(known, header, frame[4 + h:]), protocol=5)
        send(_LEN.pack(len(out)) + out)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
