"""`GroupConsumer`: the members of one app share a stream's partitions (consumer group).

    def handle(partition: int, records: list[Record]) -> None: ...

    GroupConsumer("127.0.0.1:50051", "billing", "orders", handle).run()   # until stop() / Ctrl-C

Membership is the broker's lease protocol (broker/core/leases.py): a heartbeat thread calls
Heartbeat every lease/3 with the partitions this member still works on (`held`); the answer is
the partitions it may work on now. For each granted partition a worker thread reads it in order
(`PartitionConsumer`, resuming after the app's checkpoint, else at `start`), calls
`handler(partition, records)` and commits the last record of a handled batch as the checkpoint
every `checkpoint_every` records or `checkpoint_interval` seconds, whichever comes first.

* Revocation (the partition is left out of an answer, e.g. a member joined): the worker finishes
  its current batch, commits, and stops; only then is the partition left out of `held`, so the
  broker releases it and grants it to the new owner, which resumes exactly after that checkpoint.
  The release is announced at once (an extra heartbeat), not at the next tick.
* Crash of a member: its lease runs out after `lease_ms`, the survivors' next heartbeat grants its
  partitions, and they resume after its last checkpoint. Records it handled after that checkpoint
  are handled again: delivery is at-least-once, in order per partition.
* Losing the broker: heartbeats are retried; if none succeeds before this member's lease would
  end, every worker is stopped without committing (another member may own the partition by
  then), and partitions are claimed again once the broker answers.
* `stop()` (or the end of `run()`): stop the heartbeats, stop every worker (each commits), then
  LeaveGroup so the partitions are free at once.
* Scale events (UpdatePartitionCount): every partition that exists - ACTIVE, and DELETED ones
  still holding records - is shared out; workers follow the parent-before-child rule of
  client/consumer.py through the app's checkpoints, so each key's records reach `handler` in
  order across the change. A worker commits where it starts (its `start` or checkpoint) at once,
  so a child never waits for records the group chose to skip; a partition new to the group whose
  segment continues a parent the group was reading, or (at LATEST or AT_TIMESTAMP) that a scale
  event made after the app was created, starts at that segment, not at `start`.
* Retention: a checkpoint of records trimmed while they were handled is refused by the broker
  (SEQUENCE_OUT_OF_RANGE); it is dropped with a warning and the worker goes on (a consumer that
  resumes before the oldest record moves to it).
* An exception from `handler` is fatal: the failing batch is not committed (earlier ones are),
  the consumer stops, and `run()` / `join()` raise it. Transient broker errors (every retriable
  one of client/errors.py: unreachable, stopping, throttled, a full disk) are retried with
  backoff, in the heartbeats and the workers; the others (the stream deleted, ...) are fatal.

Limits: a handler that runs longer than the lease keeps working on a partition the broker may
have given to another member meanwhile (nothing can pre-empt it) - keep batches shorter than the
lease. Revocation waits for the current poll (at most `wait_ms`, default lease/4 capped at 1 s).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from typing import Callable

from client.client import Client, Record
from client.consumer import (
    APP_THERE,
    PartitionConsumer,
    StartPosition,
    checked_batch,
    checked_lease,
    checked_mode_and_start,
    checked_wait,
)
from client.errors import SluiceError

log = logging.getLogger(__name__)

Handler = Callable[[int, list[Record]], None]


class _Worker:
    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.stop = threading.Event()
        self.commit_on_exit = True
        self.thread: threading.Thread | None = None


class GroupConsumer:
    """One member of `app`'s consumer group on `stream`; see the module docstring.

    `target`: a "host:port" target (a new `Client` with `project`, `api_key`, `tls_ca`) or a
    `Client` (shared, not closed here). `member_id`: unique per member (default a uuid).
    `on_assign(partition)`, `on_release(partition)` and `on_commit(partition, seq)` are optional
    callbacks (called on the worker and heartbeat threads) for logging and tests.
    """

    def __init__(self, target: Client | str, app: str, stream: str, handler: Handler, *,
                 member_id: str | None = None, lease_ms: int = 10_000, checkpoint_every: int = 100,
                 checkpoint_interval: float = 1.0, mode: str = "pull", start: StartPosition = "TRIM_HORIZON",
                 batch: int = 1000, wait_ms: int | None = None,
                 on_assign: Callable[[int], None] | None = None, on_release: Callable[[int], None] | None = None,
                 on_commit: Callable[[int, int], None] | None = None, project: str | None = None,
                 api_key: str | None = None, tls_ca: str | bytes | os.PathLike[str] | None = None) -> None:
        if checkpoint_every < 1 or checkpoint_interval < 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval >= 0")
        # before the Client is made: 0 made the heartbeat interval 0 (hundreds a second), and a value
        # past the wire's uint32 failed in the heartbeat thread with protobuf's range error
        lease_ms = checked_lease(lease_ms)
        checked_mode_and_start(mode, start)   # else only a worker found out, after the member joined
        self._own_client = isinstance(target, str)
        self._client = Client(target, project=project, api_key=api_key, tls_ca=tls_ca) if isinstance(target, str) \
            else target
        # heartbeats and commits must not outlive the lease they protect
        self._fast = self._client.with_timeout(max(lease_ms / 3000, 0.5))
        self.app = app
        self.stream = stream
        self.handler = handler
        self.member_id = member_id or uuid.uuid4().hex
        self.lease_ms = lease_ms
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.mode = mode
        self.start_position = start
        # checked now, not in a partition's worker thread (a fatal error there, raised from run())
        self.batch = checked_batch(batch)
        self.wait_ms = checked_wait(wait_ms) if wait_ms is not None else max(50, min(1000, lease_ms // 4))
        self._on_assign = on_assign
        self._on_release = on_release
        self._on_commit = on_commit
        self._lock = threading.Lock()
        self._workers: dict[int, _Worker] = {}
        self._wake = threading.Event()      # heartbeat now (a partition was released)
        self._stopping = threading.Event()
        self._done = threading.Event()      # stopped (by stop() or a fatal error)
        self._error: BaseException | None = None
        self._heartbeats: threading.Thread | None = None
        self._started = False
        self._app_ms: int | None = None   # the app's creation, on the broker's clock (see _start_for)
        self._stopped = False
        self.last_heartbeat: float | None = None   # time.monotonic() when the last answered one was sent

    # -- public API ------------------------------------------------------------------------------

    @property
    def assignment(self) -> set[int]:
        """Partitions with a worker right now (including ones being released)."""
        with self._lock:
            return set(self._workers)

    @property
    def error(self) -> BaseException | None:
        """The fatal error that stopped the consumer, if any."""
        return self._error

    def start(self) -> GroupConsumer:
        """Create the app if missing and start heartbeating; returns at once."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        try:
            self._client.create_app(self.app)
        except SluiceError as exc:
            if exc.reason not in APP_THERE:
                raise
        self._heartbeats = threading.Thread(target=self._heartbeat_loop, name=f"sluice-group-{self.member_id}",
                                            daemon=True)
        self._heartbeats.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the consumer stops (stop() or a fatal error); re-raise a fatal error.
        Returns False if `timeout` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set() and not self._stopping.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._stopping.wait(0.5 if left is None else min(left, 0.5))
        if self._error is not None:
            raise self._error
        return True

    def run(self) -> None:
        """start(), work until stop() is called or a fatal error (re-raised), then stop cleanly.
        KeyboardInterrupt / SystemExit stop it cleanly too."""
        self.start()
        try:
            self.join()
        finally:
            self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop heartbeats and workers (each commits its checkpoint), then leave the group.
        Idempotent: a call while another is stopping waits for it (at most `timeout`). From the
        handler or a callback (the member's own threads) it returns at once, the stop going on
        on a thread of its own."""
        me = threading.current_thread()
        with self._lock:
            own = me is self._heartbeats or any(w.thread is me for w in self._workers.values())
            already, self._stopped = self._stopped, True
        if already:
            if not own:
                self._done.wait(timeout)
            return
        if own:
            # joining its own thread failed ("cannot join current thread"): that was the group's
            # fatal error, and the member was left half stopped, its other workers running
            threading.Thread(target=self._stop, args=(timeout,), name=f"sluice-stop-{self.member_id}",
                             daemon=True).start()
            return
        self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._heartbeats is not None:
            self._heartbeats.join(max(deadline - time.monotonic(), 0.1))
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.stop.set()
        for w in workers:
            if w.thread is not None:
                w.thread.join(max(deadline - time.monotonic(), 0.1))
        if self._started:
            try:
                self._fast.leave_group(self.app, self.stream, self.member_id)
            except SluiceError as exc:
                log.warning("leave_group failed (the lease will run out instead): %s", exc)
        if self._own_client:
            self._client.close()
        self._done.set()   # last: a stop() waiting for this one returns with everything closed

    def __enter__(self) -> GroupConsumer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- heartbeat thread ------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        log.error("consumer group member %s stops: %r", self.member_id, exc)
        self._stopping.set()
        self._wake.set()

    def _heartbeat_loop(self) -> None:
        interval = self.lease_ms / 3000
        margin = min(1.0, self.lease_ms / 6000)
        lease_until: float | None = None
        while not self._stopping.is_set():
            self._wake.clear()
            held = self.assignment
            sent = time.monotonic()
            if lease_until is not None and sent >= lease_until - margin:
                # the lease ends before any answer could renew it: stop now, not after the call
                log.warning("member %s lost its lease: stopping every partition", self.member_id)
                self._revoke(set(), commit=False)
                lease_until = None
            # a heartbeat must not outlive the lease it renews: the answer would come too late
            budget = interval if lease_until is None else max(min(interval, lease_until - margin - sent), 0.05)
            try:
                granted = self._client.with_timeout(budget).heartbeat(
                    self.app, self.stream, self.member_id, held, self.lease_ms)
                mine, lease_ms = granted.partition_ids, granted.lease_ms
            except SluiceError as exc:
                if not exc.retriable:   # e.g. the stream or app was deleted
                    self._fail(exc)
                    return
                # unreachable, throttled, stopping (CANCELLED), full: try again, within the lease
                if lease_until is not None and time.monotonic() >= lease_until - margin:
                    log.warning("member %s lost its lease (%s): stopping every partition", self.member_id, exc)
                    self._revoke(set(), commit=False)
                    lease_until = None
                self._wake.wait(min(interval, 0.5))
                continue
            except Exception as exc:
                self._fail(exc)
                return
            lease_until = sent + lease_ms / 1000
            self.last_heartbeat = sent
            self._revoke(set(mine), commit=True)
            if self._stopping.is_set():
                return
            for p in mine:
                self._grant(p)
            self._wake.wait(interval)

    def _revoke(self, keep: set[int], *, commit: bool) -> None:
        with self._lock:
            for p, w in self._workers.items():
                if p not in keep and not w.stop.is_set():
                    w.commit_on_exit = commit
                    w.stop.set()

    def _grant(self, p: int) -> None:
        with self._lock:
            if p in self._workers or self._stopping.is_set():
                return  # still running, or still finishing a revocation (we hold it meanwhile)
            w = _Worker(p)
            w.thread = threading.Thread(target=self._work, args=(w,), name=f"sluice-group-p{p}", daemon=True)
            self._workers[p] = w
        if self._on_assign:
            self._on_assign(p)
        w.thread.start()

    # -- partition workers -----------------------------------------------------------------------

    def _start_for(self, p: int) -> StartPosition:
        """Where to start on a partition without a checkpoint: `start`, except from the first
        segment a scale event made after the app was created (and after an AT_TIMESTAMP start),
        or that gave records of keys the group was reading (a parent has the app's checkpoint).
        At LATEST, a partition a scale-up added was started after the records written to it
        before its worker began: 180 of 400 never handled (the scaling probe). The line is the
        group's, the app's creation on the broker's clock: a member's own start lost the records
        of such a partition to a member that joined later (the second review). A group started
        long after its app was made reads such partitions from their segment: at-least-once."""
        start = self.start_position
        if start == "TRIM_HORIZON":
            return start
        try:
            if self._client.get_checkpoint(self.app, self.stream, p) is not None:
                return self.start_position   # resumes after it
            desc = self._client.describe_stream(self.stream, limit=1000)
            info = next((i for i in desc.partitions if i.partition_id == p), None)
            if info is not None and info.segments:
                if self._app_ms is None:
                    self._app_ms = self._client.describe_app(self.app).created_ms
                since = self._app_ms if start == "LATEST" else \
                    max(self._app_ms, start[1]) if isinstance(start, tuple) and start[0] == "AT_TIMESTAMP" else None
                for segment in info.segments:
                    later = since is not None and segment.timestamp_ms >= since
                    if later or any(self._client.get_checkpoint(self.app, self.stream, q) is not None
                                    for q, _ in segment.parents):
                        return "AT_SEQUENCE_NUMBER", max(segment.start_seq, info.first_seq)
        except SluiceError as exc:
            log.warning("partition %d starts at %r: %s", p, self.start_position, exc)
        return self.start_position

    def _work(self, w: _Worker) -> None:
        p = w.partition
        consumer: PartitionConsumer | None = None
        handled: int | None = None       # last seq the handler returned for
        committed: int | None = None
        since_commit = 0
        last_commit = time.monotonic()
        backoff = 0.05

        def commit(client: Client) -> bool:
            nonlocal committed, since_commit, last_commit
            if handled is None or handled == committed:
                return True
            try:
                client.commit_checkpoint(self.app, self.stream, p, handled)
            except SluiceError as exc:
                if exc.reason == "SEQUENCE_OUT_OF_RANGE":
                    # retention trimmed what was handled meanwhile: that checkpoint is past use (a
                    # consumer resuming before the oldest record moves to it, client/consumer.py).
                    # Fatal before: lagging members - those near the edge - stopped.
                    log.warning("checkpoint %d of partition %d not kept: %s", handled, p, exc)
                    committed, since_commit, last_commit = handled, 0, time.monotonic()
                    return True
                if not exc.retriable:
                    raise
                log.warning("checkpoint of partition %d not committed yet: %s", p, exc)
                return False
            committed, since_commit, last_commit = handled, 0, time.monotonic()
            if self._on_commit:
                self._on_commit(p, handled)
            return True

        try:
            # inside the try: whatever fails here still ends in `finally`, which frees the partition
            consumer = PartitionConsumer(self._client, self.stream, p, app=self.app, start=self._start_for(p),
                                         mode=self.mode, wait_ms=self.wait_ms, batch=self.batch)
            while not w.stop.is_set():
                try:
                    records = consumer.poll()
                except SluiceError as exc:
                    if not exc.retriable:
                        raise
                    w.stop.wait(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                if records:
                    self.handler(p, records)
                    handled = records[-1].seq
                    since_commit += len(records)
                    if w.stop.is_set() and not w.commit_on_exit:
                        break   # the lease was lost meanwhile: another member may own it, and commit
                elif handled is None and consumer.position:
                    # Where the app starts on this partition (`start`, or its checkpoint): what lies
                    # before counts as read. Committed, so a child of this partition after a scale
                    # event does not wait for records the group chose to skip (client/consumer.py).
                    handled = consumer.position - 1
                    since_commit += 1
                if since_commit and (since_commit >= self.checkpoint_every
                                     or time.monotonic() - last_commit >= self.checkpoint_interval):
                    commit(self._fast)
            if w.commit_on_exit:
                deadline = time.monotonic() + self.lease_ms / 3000
                while not commit(self._fast) and time.monotonic() < deadline:
                    time.sleep(0.05)
        except BaseException as exc:
            if w.commit_on_exit:
                try:
                    commit(self._fast)   # what the handler finished before the failure
                except BaseException:
                    pass
            self._fail(exc)
        finally:
            if consumer is not None:
                consumer.close()
            if self._on_release:   # before it leaves `held`: nobody else can have it yet
                try:
                    self._on_release(p)
                except Exception:
                    log.exception("on_release callback failed")
            with self._lock:
                del self._workers[p]
            self._wake.set()   # tell the broker now, so the next owner need not wait a tick
