"""`Producer`: batched, retrying PutRecords on a background thread; `AsyncProducer` for asyncio.

    with Producer("127.0.0.1:50051", "orders") as producer:
        future = producer.send(b"payload", partition_key="customer-7")
        result = future.result()          # PutResult: .ok, .partition_id, .seq
                                          # or .reason / .message / .dis_code

How it works: `send()` appends the record to a buffer and returns a `concurrent.futures.Future`.
One sender thread takes batches off the buffer - a batch is sent once it holds
`max_batch_records` records or `max_batch_bytes` payload bytes, or its oldest record has waited
`linger_ms` - and sends them with one PutRecords. There is at most one request in flight.

Every future resolves to a `PutResult`, never to an exception:

* success: `partition_id`, `seq`;
* a non-retriable refusal (e.g. INVALID_PARTITION_ID, INVALID_REQUEST for a record too large,
  STREAM_NOT_FOUND): at once, with the broker's reason, message and DIS code;
* a retriable one (client/errors.py's table says which: UNAVAILABLE, STORAGE_FULL, INTERNAL, ...),
  per record or for the whole request, including a request that never reached the broker (down,
  restarting, draining) - is retried with exponential backoff (`backoff_ms`, doubling, capped at
  `max_backoff_ms`) up to `max_retries` times; after that the last failure is the result. When
  the broker could not be reached the reason is the gRPC status name ("UNAVAILABLE") and there
  is no DIS code.
  A whole request failing that way also pauses the producer (nothing is sent for a backoff that
  doubles with each failed request in a row), so a down or draining broker is not hammered.
* "CLOSED": the producer was closed (and its `close` timeout ran out) before the record was
  delivered.

Delivery is at-least-once: a request that timed out (DEADLINE_EXCEEDED) may have been written
before it is retried, so a record can be stored twice.

`ordered=True` keeps the order of records with the same partition key (or partition id): when a
batch comes back with retriable failures, those records - in their original order - are sent again
before any newer record, and nothing is sent until their backoff has passed. (Without it, retried
records may land after newer ones.) The broker fails retriable errors for a whole request, or - a
partition over its write limit (THROTTLED) - for a record and every later record of its partition
in the batch, so a retried record never has a later same-key record of its own batch already
written ahead of it. Under throttling, give `max_retries` room: a record may wait several rounds.

`AsyncProducer` is the same producer for asyncio code: it wraps a `Producer` (its sender thread
does the I/O) and hands out asyncio futures. That is the honest simple choice: the work is a
background batching loop either way, and sharing it keeps one implementation of the retry and
ordering rules. `send()` never blocks the event loop (when the buffer is full it awaits a worker
thread).
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from client.client import Client, PutResult
from client.errors import SluiceError, is_retriable

CLOSED = "CLOSED"


class BufferFullError(Exception):
    """`send(..., timeout=...)` found the producer's buffer full for longer than the timeout."""


@dataclass
class ProducerStats:
    """Counters, for tests and monitoring. `records_sent` counts every attempt of every record."""
    requests: int = 0
    failed_requests: int = 0
    records_sent: int = 0
    retries: int = 0
    delivered: int = 0
    failed: int = 0


@dataclass
class _Pending:
    data: bytes
    key: str | None
    partition_id: int | None
    future: Future[PutResult]
    enqueued: float
    attempts: int = 0       # retries so far
    due: float = 0.0        # monotonic time before which a retry must not be sent
    started: bool = False   # set_running_or_notify_cancel() done

    @property
    def size(self) -> int:
        return len(self.data) + len(self.key or "")


@dataclass
class _Options:
    max_batch_records: int
    max_batch_bytes: int
    linger_s: float
    max_retries: int
    backoff_s: float
    max_backoff_s: float
    ordered: bool
    max_buffered_records: int
    extra: dict[str, Any] = field(default_factory=dict)


class Producer:
    """Batches records sent from any thread into PutRecords requests; see the module docstring.

    `client_or_target`: a `Client` (shared, not closed by the producer) or a "host:port" target
    (the producer opens and closes its own connection, with `project`, `api_key` and `tls_ca`:
    see `Client`).
    `max_buffered_records` bounds the records not yet resolved; `send()` blocks while it is reached.
    """

    def __init__(self, client_or_target: Client | str, stream: str, *, max_batch_records: int = 500,
                 max_batch_bytes: int = 1_000_000, linger_ms: float = 5, max_retries: int = 5,
                 backoff_ms: float = 50, max_backoff_ms: float = 2_000, ordered: bool = False,
                 max_buffered_records: int = 100_000, project: str | None = None, api_key: str | None = None,
                 tls_ca: str | bytes | os.PathLike[str] | None = None) -> None:
        if max_batch_records < 1 or max_batch_bytes < 1 or max_buffered_records < 1:
            raise ValueError("batch and buffer limits must be positive")
        if max_retries < 0 or backoff_ms < 0 or linger_ms < 0:
            raise ValueError("max_retries, backoff_ms and linger_ms must not be negative")
        self._own_client = isinstance(client_or_target, str)
        self._client = Client(client_or_target, project=project, api_key=api_key, tls_ca=tls_ca) \
            if isinstance(client_or_target, str) else client_or_target
        self.stream = stream
        self._opt = _Options(max_batch_records, max_batch_bytes, linger_ms / 1000, max_retries, backoff_ms / 1000,
                             max(max_backoff_ms, backoff_ms) / 1000, ordered, max_buffered_records)
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()   # new records (ordered mode: retries go to the front)
        self._queued_bytes = 0
        self._retry: list[_Pending] = []         # unordered mode: records waiting for their backoff
        self._not_before = 0.0                   # nothing is sent before this (broker down; ordered retries)
        self._request_failures = 0               # whole requests failed retriably in a row
        self._unresolved = 0                     # sent to us, future not resolved yet
        self._flushing = 0                       # callers inside flush(): skip the linger
        self._closing = False                    # no new records; drain then stop
        self._aborted = False                    # close() timed out: resolve the rest as CLOSED
        self.stats = ProducerStats()
        self._thread = threading.Thread(target=self._run, name=f"sluice-producer-{stream}", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------

    def send(self, data: bytes, partition_key: str | None = None, partition_id: int | None = None, *,
             timeout: float | None = None) -> Future[PutResult]:
        """Queue one record; the future resolves to its `PutResult`. With `partition_id` the record
        goes to that partition (wins over the key); with only `partition_key` the broker hashes the
        key; with neither it spreads records. Blocks while the buffer is full - at most `timeout`
        seconds, then raises `BufferFullError`. Raises RuntimeError once the producer is closed, and
        TypeError / ValueError for arguments no broker could take (a partition id is a uint32)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if partition_key is not None and not isinstance(partition_key, str):
            raise TypeError("partition_key must be a str")
        if partition_id is not None and (not isinstance(partition_id, int) or isinstance(partition_id, bool)):
            raise TypeError("partition_id must be an int")
        if partition_id is not None and not 0 <= partition_id < 2**32:
            raise ValueError(f"partition_id must be within [0, 2^32), got {partition_id}")
        future: Future[PutResult] = Future()
        record = _Pending(bytes(data), partition_key, partition_id, future, 0.0)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closing:
                    raise RuntimeError("producer is closed")
                if self._unresolved < self._opt.max_buffered_records:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BufferFullError(f"{self._unresolved} records buffered")
                self._cond.wait(remaining)
            record.enqueued = time.monotonic()
            self._queue.append(record)
            self._queued_bytes += record.size
            self._unresolved += 1
            self._cond.notify_all()
        return future

    @property
    def pending(self) -> int:
        """Records sent to the producer whose outcome is not known yet."""
        with self._cond:
            return self._unresolved

    def flush(self, timeout: float | None = None) -> None:
        """Send everything buffered now (no linger) and wait until every record sent so far has
        its outcome. Raises TimeoutError if some are still pending after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._unresolved:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"{self._unresolved} records still pending after {timeout}s")
                    self._cond.wait(remaining)
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> None:
        """Flush (waiting at most `timeout` seconds), then stop the sender thread. Records still
        undelivered when the timeout runs out resolve with reason "CLOSED". Idempotent."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        try:
            self.flush(timeout)
        except TimeoutError:
            pass
        leftovers: list[_Pending] = []
        with self._cond:
            if self._unresolved:
                self._aborted = True
                leftovers = [*self._queue, *self._retry]
                self._queue.clear()
                self._retry.clear()
                self._queued_bytes = 0
            self._cond.notify_all()
        self._resolve([(r, PutResult(-1, -1, CLOSED, "producer closed before the record was delivered"))
                       for r in leftovers])
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.1)
        self._thread.join(remaining)
        if self._own_client:
            self._client.close()  # cancels a request still in flight; its records resolve then

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sender thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._aborted or (self._closing and not self._unresolved):
                        return
                    now = time.monotonic()
                    batch = self._take_batch(now)
                    if batch:
                        break
                    self._cond.wait(self._wakeup(now))
            self._send(batch)

    def _ready(self, now: float) -> bool:
        """Is there a batch worth sending in `_queue` now?"""
        q, opt = self._queue, self._opt
        if not q or now < self._not_before:
            return False
        return (len(q) >= opt.max_batch_records or self._queued_bytes >= opt.max_batch_bytes
                or self._flushing > 0 or self._closing or q[0].attempts > 0
                or now - q[0].enqueued >= opt.linger_s)

    def _take_batch(self, now: float) -> list[_Pending]:
        opt = self._opt
        batch: list[_Pending] = []
        size = 0
        if now < self._not_before:
            return batch
        if self._retry:  # unordered mode: due retries first
            due = [r for r in self._retry if r.due <= now]
            if due:
                for r in due[:opt.max_batch_records]:
                    if batch and size + r.size > opt.max_batch_bytes:
                        break
                    batch.append(r)
                    size += r.size
                taken = set(map(id, batch))
                self._retry = [r for r in self._retry if id(r) not in taken]
        if batch or self._ready(now):
            q = self._queue
            while q and len(batch) < opt.max_batch_records:
                if batch and size + q[0].size > opt.max_batch_bytes:
                    break
                r = q.popleft()
                self._queued_bytes -= r.size
                batch.append(r)
                size += r.size
        return batch

    def _wakeup(self, now: float) -> float | None:
        """Seconds until a batch may become ready without a new record arriving (None: never)."""
        times = []
        if self._queue:
            head = self._queue[0]
            times.append(head.enqueued + self._opt.linger_s if head.attempts == 0 else head.due)
        times.extend(r.due for r in self._retry)
        return max(max(min(times), self._not_before) - now, 0.0) + 0.0005 if times else None

    def _send(self, batch: list[_Pending]) -> None:
        live = []
        cancelled = 0
        for r in batch:
            if not r.started:
                r.started = True
                if not r.future.set_running_or_notify_cancel():
                    cancelled += 1
                    continue
            live.append(r)
        if cancelled:
            with self._cond:
                self._unresolved -= cancelled
                self._cond.notify_all()
        if not live:
            return
        retriable: list[bool]
        try:
            results = self._client.put_routed(self.stream, [(r.data, r.key, r.partition_id) for r in live])
            retriable = [not res.ok and is_retriable(res.reason) for res in results]
            failed_request = False
        except SluiceError as exc:
            again = exc.retriable
            results = [PutResult(-1, -1, exc.reason, exc.message, exc.code)] * len(live)
            retriable = [again] * len(live)
            failed_request = True
        except Exception as exc:  # a bug or a bad argument: fail these records loudly
            with self._cond:
                self.stats.requests += 1
                self.stats.failed_requests += 1
            self._fail(live, exc)
            return
        now = time.monotonic()
        done: list[tuple[_Pending, PutResult]] = []
        again_list: list[_Pending] = []
        with self._cond:
            self.stats.requests += 1
            self.stats.failed_requests += failed_request
            self.stats.records_sent += len(live)
            for r, res, retry in zip(live, results, retriable):
                if retry and r.attempts < self._opt.max_retries and not self._aborted:
                    r.attempts += 1
                    r.due = now + min(self._opt.backoff_s * 2 ** (r.attempts - 1), self._opt.max_backoff_s)
                    again_list.append(r)
                else:
                    done.append((r, res))
            self.stats.retries += len(again_list)
            if failed_request and retriable[0]:
                # the broker is unreachable or refusing everything: pause the whole producer, not
                # only these records, so new records do not hammer it (and a draining broker
                # sees the quiet it waits for)
                self._request_failures += 1
                pause = min(self._opt.backoff_s * 2 ** (self._request_failures - 1), self._opt.max_backoff_s)
                self._not_before = max(self._not_before, now + pause)
            elif not failed_request:
                self._request_failures = 0
            if again_list:
                if self._opt.ordered:
                    for r in reversed(again_list):
                        self._queue.appendleft(r)
                        self._queued_bytes += r.size
                    self._not_before = max(self._not_before, max(r.due for r in again_list))
                else:
                    self._retry.extend(again_list)
        self._resolve(done)

    def _resolve(self, done: list[tuple[_Pending, PutResult]]) -> None:
        """Set results first, then count them resolved, so flush() returns with futures done."""
        for r, res in done:
            if not r.started:
                r.started = True
                if not r.future.set_running_or_notify_cancel():
                    continue
            r.future.set_result(res)
        if done:
            with self._cond:
                self.stats.delivered += sum(res.ok for _, res in done)
                self.stats.failed += sum(not res.ok for _, res in done)
                self._unresolved -= len(done)
                self._cond.notify_all()

    def _fail(self, records: list[_Pending], exc: BaseException) -> None:
        for r in records:
            r.future.set_exception(exc)
        with self._cond:
            self.stats.failed += len(records)
            self._unresolved -= len(records)
            self._cond.notify_all()


class AsyncProducer:
    """`Producer` for asyncio code: same options, batching, retries and ordering (the work is done
    by a wrapped `Producer`'s sender thread). Use `async with`, and close it before the event loop
    ends.

        async with AsyncProducer(target, "orders") as producer:
            result = await producer.send_and_wait(b"x", partition_key="k")
            futures = [await producer.send(b"y") for _ in range(1000)]
            results = await asyncio.gather(*futures)
    """

    def __init__(self, client_or_target: Client | str, stream: str, **options: Any) -> None:
        self._producer = Producer(client_or_target, stream, **options)

    @property
    def stats(self) -> ProducerStats:
        return self._producer.stats

    @property
    def pending(self) -> int:
        return self._producer.pending

    async def send(self, data: bytes, partition_key: str | None = None,
                   partition_id: int | None = None) -> asyncio.Future[PutResult]:
        """Queue one record; returns an asyncio future of its `PutResult`. Awaits only while the
        buffer is full."""
        try:
            future = self._producer.send(data, partition_key, partition_id, timeout=0)
        except BufferFullError:
            future = await asyncio.to_thread(self._producer.send, data, partition_key, partition_id)
        return asyncio.wrap_future(future)

    async def send_and_wait(self, data: bytes, partition_key: str | None = None,
                            partition_id: int | None = None) -> PutResult:
        """Queue one record and wait for its outcome."""
        return await (await self.send(data, partition_key, partition_id))

    async def flush(self, timeout: float | None = None) -> None:
        """See `Producer.flush`."""
        await asyncio.to_thread(self._producer.flush, timeout)

    async def close(self, timeout: float | None = None) -> None:
        """See `Producer.close`."""
        await asyncio.to_thread(self._producer.close, timeout)

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
