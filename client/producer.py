"""`Producer`: batched, retrying PutRecords on a background thread; `AsyncProducer` for asyncio.

    with Producer("127.0.0.1:50051", "orders") as producer:
        future = producer.send(b"payload", partition_key="customer-7")
        result = future.result()          # PutResult: .ok, .partition_id, .seq
                                          # or .reason / .message / .dis_code

How it works: `send()` appends the record to a buffer and returns a `concurrent.futures.Future`.
One sender thread takes batches off the buffer - a batch is sent once it holds
`max_batch_records` records or `max_batch_bytes` payload bytes, or its oldest record has waited
`linger_ms` - and sends them over one long-lived PutRecordsStream call (streaming produce), each
batch with an id the broker's answer echoes, so a producer pays no per-request call setup.
`max_in_flight` batches (default 8; 1 with `ordered=True`, see below) may be unacknowledged at a
time; the sender waits while that many are, and `send()` blocks once `max_buffered_records` are
unresolved: memory stays bounded and the caller is held back instead. A reader thread resolves
each batch's records from its answer, in order.

A broker without PutRecordsStream (an older one: UNIMPLEMENTED) is remembered and the producer
falls back to one unary PutRecords at a time; `streaming=False` asks for that from the start. A
broker that refuses to open the stream (TOO_MANY_REQUESTS) gets PutRecords for 30 s, then a stream
again. Either way the batches handed back keep their place: newer ones go behind them. A stream on
which nothing was sent for `stream_idle_ms` (60 s) is ended; the next batch opens a new one. A
batch whose encoded size is over the broker's message limit (`_wire.MAX_MESSAGE`, or less once a
broker ended a stream RESOURCE_EXHAUSTED for a message too large: then only the largest batch in
flight fails, the others are retried) is sent by PutRecords, which fails it alone.

A broken stream (the broker restarted, the connection dropped) fails the batches it had not
acknowledged like a failed request (retriable: they are retried, see below), and the next batch
opens a new stream. Only unacknowledged batches are sent again: an acknowledged record is stored
and never resent. A batch the broker stored but could not acknowledge before the break is stored
twice, so duplicates are bounded by the unacknowledged window: at most `max_in_flight` batches
(`max_in_flight * max_batch_records` records) per break. The call has no deadline, but each batch
has the Client's `timeout`: when the oldest unacknowledged batch has waited that long, the call is
cancelled and its batches fail DEADLINE_EXCEEDED (retriable, retried as a timed-out PutRecords).
HTTP/2 keepalive (client/_wire.py) notices a broker host that vanished.

Every future resolves to a `PutResult`, never to an exception:

* success: `partition_id`, `seq`;
* a non-retriable refusal (e.g. INVALID_PARTITION_ID, INVALID_REQUEST for a record too large,
  STREAM_NOT_FOUND): at once, with the broker's reason, message and DIS code;
* a retriable one (client/errors.py's table says which: UNAVAILABLE, STORAGE_FULL, INTERNAL, ...),
  per record or for the whole request, including a request that never reached the broker (down,
  restarting, draining) - is retried with exponential backoff (`backoff_ms`, doubling, capped at
  `max_backoff_ms`) up to `max_retries` times, and not once `delivery_timeout_ms` has passed since
  the record was sent to the producer (default 2 minutes, as Kafka's `delivery.timeout.ms`); after
  that the last failure is the result. The defaults wait out about 30 s of a broker that refuses
  connections (more than a restart takes); against one that takes calls and never answers, each
  attempt lasts the client's timeout, and the delivery timeout bounds the whole. When
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
records may land after newer ones.) For that an ordered producer has one unacknowledged batch at a
time (`max_in_flight` is 1): a newer batch already in flight could be written before an older
batch's retried records. The broker fails retriable errors for a whole request, or - a
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
import itertools
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterator

import grpc

from client import _wire
from client._pb.sluice.v1 import sluice_pb2 as pb
from client.client import Client, PutResult
from client.errors import SluiceError, from_rpc_error, is_retriable

CLOSED = "CLOSED"
# The broker's PutRecords limits (README, broker/core/limits.py): a batch past either is refused whole.
PUT_MAX_RECORDS = 10_000
PUT_MAX_BYTES = 5 * 1024 * 1024


class BufferFullError(Exception):
    """`send(..., timeout=...)` found the producer's buffer full for longer than the timeout."""


@dataclass
class ProducerStats:
    """Counters, for tests and monitoring. `records_sent` counts every attempt of every record;
    `requests` every batch sent (PutRecords calls and PutRecordsStream batches alike)."""
    requests: int = 0
    failed_requests: int = 0
    records_sent: int = 0
    retries: int = 0
    delivered: int = 0
    failed: int = 0
    streams_opened: int = 0     # PutRecordsStream calls opened (1, plus one per broken stream)
    stream_breaks: int = 0      # of those, ended while batches were unacknowledged
    resent_batches: int = 0     # unacknowledged batches of a broken stream, to be sent again
    max_in_flight_seen: int = 0 # the most unacknowledged batches at one time


@dataclass
class _Pending:
    data: bytes
    key: str | None
    partition_id: int | None
    future: Future[PutResult]
    enqueued: float
    order: int = 0          # the order send() took it in (records put back keep their place)
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
    streaming: bool = True
    max_in_flight: int = 8
    stream_idle_s: float = 60.0
    delivery_timeout_s: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)


UNARY_AFTER_REFUSAL_S = 30.0   # a broker refused to open a stream: PutRecords only for this long


@dataclass
class _Batch:
    """A batch sent on a stream, not acknowledged yet."""
    batch_id: int
    live: list[_Pending]
    sent: float     # monotonic
    size: int       # encoded bytes


class _Stream:
    """One PutRecordsStream call: the requests the gRPC thread sends, and the batches sent and not
    acknowledged yet, oldest first (answers come in that order)."""

    def __init__(self) -> None:
        self.requests: queue.SimpleQueue[pb.PutRecordsStreamRequest | None] = queue.SimpleQueue()
        self.inflight: deque[_Batch] = deque()
        self.answered = False     # the broker has the RPC (an UNIMPLEMENTED now is not "absent")
        self.expired = False      # cancelled by us: the oldest batch went unanswered too long
        self.last_sent = time.monotonic()
        self.call: Any = None
        self.reader: threading.Thread | None = None

    def request_iterator(self) -> Iterator[pb.PutRecordsStreamRequest]:
        while (request := self.requests.get()) is not None:
            yield request

    def end(self) -> None:
        """No more batches: the call ends once the broker answered those sent (and gRPC's request
        thread, blocked on the queue, finishes)."""
        self.requests.put(None)


class Producer:
    """Batches records sent from any thread into PutRecords requests; see the module docstring.

    `client_or_target`: a `Client` (shared, not closed by the producer) or a "host:port" target
    (the producer opens and closes its own connection, with `project`, `api_key` and `tls_ca`:
    see `Client`).
    `max_buffered_records` bounds the records not yet resolved; `send()` blocks while it is reached.
    `streaming`: use PutRecordsStream when the broker has it (default); `max_in_flight`: the most
    unacknowledged batches on it (1 when `ordered`); `stream_idle_ms`: end a stream nothing was
    sent on for that long. An exception opening the stream (a closed Client: ValueError) fails the
    batch's futures with it, as PutRecords does. `delivery_timeout_ms`: a record that old is not
    retried again (see the module docstring).
    """

    def __init__(self, client_or_target: Client | str, stream: str, *, max_batch_records: int = 500,
                 max_batch_bytes: int = 1_000_000, linger_ms: float = 5, max_retries: int = 20,
                 backoff_ms: float = 50, max_backoff_ms: float = 2_000, ordered: bool = False,
                 max_buffered_records: int = 100_000, streaming: bool = True, max_in_flight: int = 8,
                 stream_idle_ms: float = 60_000, project: str | None = None, api_key: str | None = None,
                 tls_ca: str | bytes | os.PathLike[str] | None = None, delivery_timeout_ms: float = 120_000) -> None:
        if max_batch_records < 1 or max_batch_bytes < 1 or max_buffered_records < 1 or max_in_flight < 1:
            raise ValueError("batch, buffer and in-flight limits must be positive")
        if max_batch_records > PUT_MAX_RECORDS or max_batch_bytes > PUT_MAX_BYTES:
            # a bigger batch is refused whole by the broker: its records failed, good ones too
            raise ValueError(f"a batch holds at most {PUT_MAX_RECORDS} records and {PUT_MAX_BYTES} payload bytes "
                             "(the broker's PutRecords limits): max_batch_records, max_batch_bytes")
        if not delivery_timeout_ms > 0:
            raise ValueError("delivery_timeout_ms must be positive")
        if max_retries < 0 or backoff_ms < 0 or linger_ms < 0 or stream_idle_ms < 0:
            raise ValueError("max_retries, backoff_ms, linger_ms and stream_idle_ms must not be negative")
        self._own_client = isinstance(client_or_target, str)
        self._client = Client(client_or_target, project=project, api_key=api_key, tls_ca=tls_ca) \
            if isinstance(client_or_target, str) else client_or_target
        self.stream = stream
        self._opt = _Options(max_batch_records, max_batch_bytes, linger_ms / 1000, max_retries, backoff_ms / 1000,
                             max(max_backoff_ms, backoff_ms) / 1000, ordered, max_buffered_records, streaming,
                             1 if ordered else max_in_flight, stream_idle_ms / 1000, delivery_timeout_ms / 1000)
        self._timeout = self._client.timeout   # a stream's batch unanswered this long: the call is given up
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
        self._stream: _Stream | None = None       # the open PutRecordsStream call
        self._streaming = streaming               # False once the broker said UNIMPLEMENTED
        self._unary_until = 0.0                   # PutRecords only until then (the broker refused a stream)
        self._max_stream_bytes = _wire.MAX_MESSAGE  # larger batches go by PutRecords (lowered by a refusal)
        self._batch_ids = itertools.count(1)
        self._orders = itertools.count()
        self.stats = ProducerStats()
        self._own = threading.local()   # .thread set on the producer's threads, where callbacks run
        self._thread = threading.Thread(target=self._run, name=f"sluice-producer-{stream}", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------

    def send(self, data: bytes, partition_key: str | None = None, partition_id: int | None = None, *,
             timeout: float | None = None) -> Future[PutResult]:
        """Queue one record; the future resolves to its `PutResult`. With `partition_id` the record
        goes to that partition (wins over the key); with only `partition_key` the broker hashes the
        key; with neither it spreads records. Blocks while the buffer is full - at most `timeout`
        seconds (in a record's done-callback: not at all), then raises `BufferFullError`. Raises
        RuntimeError once the producer is closed, and TypeError / ValueError for arguments no
        broker could take (a partition id is a uint32)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if partition_key is not None and not isinstance(partition_key, str):
            raise TypeError("partition_key must be a str")
        if partition_key is not None and not partition_key.isascii():
            try:   # a lone surrogate cannot go on the wire: refused here, not with the whole batch it joins
                partition_key.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("partition_key is not encodable as UTF-8 (it holds a lone surrogate)") from None
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
                if getattr(self._own, "thread", False):   # a callback: waiting would wait for itself
                    raise BufferFullError(f"{self._unresolved} records buffered, and a record's done-callback "
                                          "cannot wait for room")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BufferFullError(f"{self._unresolved} records buffered")
                self._cond.wait(remaining)
            record.enqueued = time.monotonic()
            record.order = next(self._orders)
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
        its outcome. Raises TimeoutError if some are still pending after `timeout` seconds, and
        RuntimeError in a record's done-callback (the producer's thread, which it would wait for)."""
        self._not_in_callback("flush")
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
        undelivered when the timeout runs out resolve with reason "CLOSED". Idempotent. Not from
        a record's done-callback (RuntimeError, as flush)."""
        self._not_in_callback("close")
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
                if self._stream is not None:   # unacknowledged batches: CLOSED too (the reader skips them)
                    leftovers.extend(r for b in self._stream.inflight for r in b.live)
                    self._stream.inflight.clear()
            stream, self._stream = self._stream, None
            self._cond.notify_all()
        self._resolve([(r, PutResult(-1, -1, CLOSED, "producer closed before the record was delivered"))
                       for r in leftovers])
        if stream is not None:
            stream.end()   # everything sent was answered (or given up): the call ends cleanly
            if self._aborted:
                stream.call.cancel()
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.1)
        self._thread.join(remaining)
        if stream is not None and stream.reader is not None:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.1)
            stream.reader.join(remaining)
        if self._own_client:
            self._client.close()  # cancels a request still in flight; its records resolve then

    def _not_in_callback(self, call: str) -> None:
        # a future's callbacks run on the thread that resolves it: waiting there for the producer
        # to resolve records waited for itself, for ever
        if getattr(self._own, "thread", False):
            raise RuntimeError(f"{call}() in a record's done-callback would wait for itself: "
                               "call it from another thread")

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sender thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        self._own.thread = True
        while True:
            expired: _Stream | None = None
            with self._cond:
                while True:
                    if self._aborted or (self._closing and not self._unresolved):
                        return
                    now = time.monotonic()
                    stream = self._stream
                    if stream is not None:
                        if stream.expired:   # cancelled: wait for its reader to hand its batches back
                            self._cond.wait()
                            continue
                        if stream.inflight and now - stream.inflight[0].sent >= self._timeout:
                            stream.expired = True   # no answer in time: give the call up
                            expired = stream
                            break
                        if not stream.inflight and now - stream.last_sent >= self._opt.stream_idle_s:
                            self._stream = None   # idle: end it (the broker answered everything); the
                            stream.end()          # next batch opens a new one
                            continue
                        if len(stream.inflight) >= self._opt.max_in_flight:
                            # the window is full: wait for an answer, the stream's end or its deadline
                            self._cond.wait(self._stream_wakeup(stream, now))
                            continue
                    batch = self._take_batch(now)
                    if batch:
                        break
                    waits = [w for w in (self._wakeup(now), self._stream_wakeup(stream, now)) if w is not None]
                    self._cond.wait(min(waits) if waits else None)
                use_stream = self._use_stream(now)
            if expired is not None:
                expired.call.cancel()   # its reader ends it: the batches are failed DEADLINE_EXCEEDED
            elif use_stream:
                self._send_stream(batch)
            else:
                self._send(batch)

    def _use_stream(self, now: float) -> bool:
        return self._streaming and now >= self._unary_until

    def _stream_wakeup(self, stream: _Stream | None, now: float) -> float | None:
        """Seconds until the open stream's oldest batch times out, or until it counts as idle."""
        if stream is None:
            return None
        if stream.inflight:
            return max(stream.inflight[0].sent + self._timeout - now, 0.0) + 0.0005
        return max(stream.last_sent + self._opt.stream_idle_s - now, 0.0) + 0.0005

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

    def _live(self, batch: list[_Pending]) -> list[_Pending]:
        """The records of `batch` whose futures were not cancelled (marked running now)."""
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
        return live

    def _send(self, batch: list[_Pending]) -> None:
        """One unary PutRecords (no stream: the broker lacks it, or `streaming=False`)."""
        live = self._live(batch)
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
        with self._cond:
            self.stats.requests += 1
            self.stats.records_sent += len(live)
            done = self._settle(live, results, retriable, failed_request)
        self._resolve(done)

    def _settle(self, live: list[_Pending], results: list[PutResult], retriable: list[bool],
                failed_request: bool) -> list[tuple[_Pending, PutResult]]:
        """The outcome of one request (a PutRecords or a stream's batch) for its records, with the
        lock held: retriable failures go back for a retry (ordered: to the front of the queue, in
        the same step, so no newer record can be taken in between); returns the records resolved
        (their futures are set by `_resolve`, outside the lock)."""
        now = time.monotonic()
        done: list[tuple[_Pending, PutResult]] = []
        again_list: list[_Pending] = []
        self.stats.failed_requests += failed_request
        for r, res, retry in zip(live, results, retriable):
            if retry and r.attempts < self._opt.max_retries and not self._aborted \
                    and now - r.enqueued < self._opt.delivery_timeout_s:
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
        self._cond.notify_all()
        return done

    # -- streaming produce -----------------------------------------------------------------------

    def _send_stream(self, batch: list[_Pending]) -> None:
        """Send one batch on the open PutRecordsStream call (opening one if there is none)."""
        live = self._live(batch)
        if not live:
            return
        batch_id = next(self._batch_ids)
        try:
            request = _wire.put_records_stream(batch_id, self.stream, [(r.data, r.key, r.partition_id) for r in live])
            size = request.ByteSize()
        except Exception as exc:  # a bug or a bad argument: fail these records loudly (as _send does)
            self._fail(live, exc)
            return
        failure: BaseException | None = None
        with self._cond:
            now = time.monotonic()
            if self._aborted:   # close() gave up while this batch was being built: no new call now
                closed = PutResult(-1, -1, CLOSED, "producer closed before the record was delivered")
                done = [(r, closed) for r in live]
            elif not self._use_stream(now):
                # the stream was refused or found missing meanwhile, and its batches went back to the
                # queue: this newer one goes back behind them, to be sent by PutRecords in order
                self._requeue(live)
                self._cond.notify_all()
                return
            elif size > self._max_stream_bytes:
                done = []   # too large for the broker: PutRecords fails it alone (the stream would end)
            else:
                stream = self._stream
                if stream is None:
                    try:
                        stream = self._stream = self._open_stream()
                    except Exception as exc:   # e.g. the shared Client was closed: ValueError
                        failure = exc
                if stream is not None:
                    stream.inflight.append(_Batch(batch_id, live, now, size))
                    stream.last_sent = now
                    stream.requests.put(request)
                    self.stats.requests += 1
                    self.stats.records_sent += len(live)
                    self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, len(stream.inflight))
                    return
                done = []
        if failure is not None:
            with self._cond:
                self.stats.requests += 1
                self.stats.failed_requests += 1
            self._fail(live, failure)
        elif done:
            self._resolve(done)
        else:
            self._send(live)

    def _requeue(self, records: list[_Pending]) -> None:
        """With the lock held: put records back into the queue, untouched (no retry counted), in
        their place: behind the records older than them, ahead of the newer ones."""
        if not records:
            return
        q = self._queue
        head: list[_Pending] = []
        while q and q[0].order < records[0].order:
            head.append(q.popleft())
        q.extendleft(reversed(records))
        q.extendleft(reversed(head))
        self._queued_bytes += sum(r.size for r in records)

    def _open_stream(self) -> _Stream:
        """With the lock held: a new call and its reader thread."""
        stream = _Stream()
        stream.call = self._client.put_records_stream(stream.request_iterator())
        stream.reader = threading.Thread(target=self._read_stream, args=(stream,), daemon=True,
                                         name=f"sluice-producer-{self.stream}-answers")
        stream.reader.start()
        self.stats.streams_opened += 1
        return stream

    def _read_stream(self, stream: _Stream) -> None:
        """The reader thread of one call: resolve each batch from its answer, then, when the call
        ends, hand back what it left unacknowledged."""
        self._own.thread = True
        error: BaseException | None = None
        try:
            for response in stream.call:
                if not self._answered(stream, response):
                    error = SluiceError(grpc.StatusCode.INTERNAL, "", "answer out of order on the produce stream",
                                        "INTERNAL")
                    stream.call.cancel()
                    break
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:   # a bug here must not leave batches unresolved, nor the call open
            error = exc
            stream.call.cancel()
        self._stream_ended(stream, error)

    def _answered(self, stream: _Stream, response: pb.PutRecordsStreamResponse) -> bool:
        """One batch's answer; False when it does not match the oldest unacknowledged batch."""
        with self._cond:
            if not stream.inflight:   # close() gave up on them (they resolved CLOSED)
                return True
            sent = stream.inflight[0]
            stream.answered = True
        live = sent.live
        if response.batch_id != sent.batch_id:
            return False
        results: list[PutResult]
        if response.WhichOneof("outcome") == "error":
            results = _wire.batch_failure(response.error, len(live))
            retriable = [is_retriable(response.error.reason)] * len(live)
            failed_request = True
        else:
            results = _wire.put_results(response.result)
            if len(results) != len(live):
                return False
            retriable = [not res.ok and is_retriable(res.reason) for res in results]
            failed_request = False
        with self._cond:
            if not stream.inflight or stream.inflight[0] is not sent:
                return True   # close() gave up on it meanwhile
            stream.inflight.popleft()
            done = self._settle(live, results, retriable, failed_request)
        self._resolve(done)
        return True

    def _stream_error(self, stream: _Stream, error: BaseException | None) -> SluiceError:
        if stream.expired:
            return SluiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "",
                               f"no answer on the produce stream within {self._timeout:g}s", "DEADLINE_EXCEEDED")
        if isinstance(error, grpc.RpcError):
            return from_rpc_error(error)
        if isinstance(error, SluiceError):
            return error
        if error is not None:
            return SluiceError(grpc.StatusCode.UNAVAILABLE, "", f"the produce stream failed: {error!r}",
                               "UNAVAILABLE")
        # ended without a status while batches were unanswered (a proxy's doing)
        return SluiceError(grpc.StatusCode.UNAVAILABLE, "", "the produce stream ended early", "UNAVAILABLE")

    def _stream_ended(self, stream: _Stream, error: BaseException | None) -> None:
        """The call is over. Its unacknowledged batches: with a broker without the RPC, or one that
        refused to open it (TOO_MANY_REQUESTS), back to the queue untouched (sent as PutRecords:
        for good, resp. for a while); else failed like a request that did not get through -
        retriable, so retried - and nothing acknowledged is sent again. A call ended by a message
        too large for the broker (RESOURCE_EXHAUSTED without the broker's ErrorInfo) fails only
        the largest batch (for good), the others are retried; and batches that large go by
        PutRecords from then on."""
        exc = self._stream_error(stream, error)
        status = exc.status
        absent = status == grpc.StatusCode.UNIMPLEMENTED and not stream.answered
        refused = exc.reason == "TOO_MANY_REQUESTS" and not stream.answered
        too_large = exc.reason == "RESOURCE_EXHAUSTED"   # the transport's: no ErrorInfo
        again = exc.retriable   # CANCELLED too: the broker cancels calls when a stop outlasts its grace
        done: list[tuple[_Pending, PutResult]] = []
        with self._cond:
            if self._stream is stream:
                self._stream = None
            sent = list(stream.inflight)
            unacked = [r for b in sent for r in b.live]
            stream.inflight.clear()
            stream.end()   # lets gRPC's request thread finish
            if absent or refused:
                if absent:
                    self._streaming = False
                else:
                    self._unary_until = time.monotonic() + UNARY_AFTER_REFUSAL_S
                self._requeue(unacked)
                self._cond.notify_all()
            elif unacked:
                self.stats.stream_breaks += 1
                self.stats.resent_batches += len(sent)
                result = PutResult(-1, -1, exc.reason, exc.message, exc.code)
                retriable = [again] * len(unacked)
                if too_large:
                    culprit = max(sent, key=lambda b: b.size)
                    self._max_stream_bytes = min(self._max_stream_bytes, culprit.size - 1)
                    retriable = [b is not culprit for b in sent for _ in b.live]
                    self.stats.resent_batches -= 1
                done = self._settle(unacked, [result] * len(unacked), retriable, True)
            else:
                self._cond.notify_all()
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
