"""Door drivers for bench/run.py: one class per door of each system benchmarked, all with the one
small interface below, so every workload in bench/workloads.py runs unchanged on any of them.

    SluiceGrpc   Sluice's gRPC door. The timed loops send pre-serialised bytes through raw unary
                 calls (`channel.unary_unary(..., request_serializer=None)`): the columnar
                 PutRecords form, GetRecords; set-up, Subscribe and the long poll use the stubs.
    SluiceRest   Sluice's DIS REST door: JSON + base64 over keep-alive http.client connections.
                 Its W3 producer is SluiceGrpc's (W3 always produces over gRPC, one record a call).
    Nats         NATS JetStream (`nats-server -js`): a lean raw-protocol client (RawNats) for W1/W2,
                 nats-py for set-up and W3. One subject per partition: <stream>.<n>.
    Kinesalite   kinesalite (the Kinesis JSON API over HTTP, `X-Amz-Target: Kinesis_20131202.*`).
    TimeplusRest Sluice's Timeplus door (`/api/v1beta2`): typed streams, compact ingest, streaming
                 SQL read as server-sent events (`SseQuery`); the T1-T4 workloads of
                 `run.py timeplus`, T2 through W3's `tail`/`tail_sender` interface.
    ClickHouseHttp  ClickHouse's HTTP interface (`INSERT ... FORMAT JSONEachRow`): T1's peer.

The interface (duck-typed; `Driver` spells it out): `create_stream`, `stored` (records per
partition, None where the system cannot tell), `bodies` (every W1 request built before the clock),
`producer` (a `Producer`: the timed loop, its batch latencies, the failures counted after the
clock), `reader` (a W2 reader for one partition), `tail` (a W3 consumer thread feeding a tally)
and `tail_sender` (W3's one-record producer). Drivers own connections, never measurements: the
clocks, the CPU meters and the verdicts are in bench/workloads.py.

The servers: `sluice_broker()`, `nats_server()`, `kinesalite_server()`, `clickhouse_server()`
(context managers).

Every use of the generated gRPC code (`client._pb.sluice.v1`) is in this module, in the methods
of `SluiceGrpc` and its two tail consumers (`_GrpcPush`, `_GrpcPoll`), and nowhere else in bench/.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from binascii import a2b_base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence, TypeVar
from urllib.parse import quote

import grpc
import orjson
import workloads as wl

from broker.launcher import BrokerProcess
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc

BENCH = Path(__file__).resolve().parent
KINESALITE = BENCH / ".peers" / "node_modules" / "kinesalite" / "cli.js"
PROJECT = "default"           # the DIS door's {project_id}; gRPC calls carry no project, i.e. "default"
CALL_TIMEOUT = 120.0
READ_LIMIT = 10_000           # W2: the largest GetRecords each system takes
FETCH_BYTES = 10 * 1024 * 1024
WAIT_MS = 1000                # W3 long polls
B = TypeVar("B")              # a producer's body: bytes, or what its wire needs (NATS: frame and count)


@dataclass
class Producer:
    """A W1 producer: `run` is the timed loop (sends every body, appends each batch's latency in
    seconds to `latencies`); `failed()`, called after the clock, counts the records refused."""
    run: Callable[[], None]
    failed: Callable[[], int]
    latencies: list[float]


def timed_producer(bodies: Sequence[B], send: Callable[[B], object], close: Callable[[], None],
                   failed: Callable[[], int]) -> Producer:
    """The timed loop every producer shares: each body sent in turn (`send` waits for its
    acknowledgement), its latency kept; `close` after the last, also on an error."""
    latencies: list[float] = []

    def run() -> None:
        clock = time.perf_counter
        try:
            for body in bodies:
                t = clock()
                send(body)
                latencies.append(clock() - t)
        finally:
            close()

    return Producer(run, failed, latencies)


class Tally(Protocol):
    """What a W3 consumer feeds (bench/workloads.py's Tally)."""
    expected: int
    received: int
    done: threading.Event
    error: str

    def take(self, payloads: list[bytes], now: int) -> None: ...


class Driver(Protocol):
    """One door of one system. Set-up calls (create_stream, stored, bodies, and building a producer,
    reader, tail or tail_sender) happen before a clock starts; what they return runs timed:
    `Producer.run`, a reader (one partition until it has read `expected` records, or, with None,
    until it reads nothing), a `Consumer` calling `tally.take(payloads, receive time)` per batch,
    and `send(payload)` of a tail_sender (returns once the record is acknowledged, raises if not).
    `stored` gives the records per partition, keyed by the ids `reader` takes (None: cannot tell).
    """
    system: str                           # Sluice, NATS JetStream, kinesalite
    door: str                             # gRPC, REST, nats, kinesis-json
    durability: str                       # wal, fsync, file (no fsync), memory, external
    pid: int | None                       # the server's pid, for its CPU seconds (None: unknown)
    w3_modes: tuple[tuple[str, str], ...]  # (mode, row label) of the W3 consumers on this door
    w3_producer: str                      # how W3 records are produced, for the JSON
    read_limit: int

    def create_stream(self, stream: str, partitions: int) -> None: ...
    def stored(self, stream: str) -> dict[str, int | None]: ...
    def bodies(self, stream: str, data: wl.Dataset) -> list[Any]: ...
    def producer(self, bodies: list[Any]) -> Producer: ...
    def reader(self, stream: str, partition: str, expected: int | None,
               counts: dict[str, int]) -> Callable[[], None]: ...
    def tail(self, stream: str, partition: int, mode: str, tally: Tally) -> Consumer: ...
    def tail_sender(self, stream: str, partition: int) -> tuple[Callable[[bytes], None], Callable[[], None]]: ...
    def close(self) -> None: ...


class TailDriver(Protocol):
    """What W3's tail_run needs of a door (every Driver has it; so has TimeplusRest, for T2)."""
    def tail(self, stream: str, partition: int, mode: str, tally: Tally) -> Consumer: ...
    def tail_sender(self, stream: str, partition: int) -> tuple[Callable[[bytes], None], Callable[[], None]]: ...


class TableDriver(Protocol):
    """A door taking typed rows (T1): TimeplusRest, ClickHouseHttp. `bodies` builds the requests of
    `batch` rows each (before a clock), `producer` is T1's timed loop over some of them, `count` the
    rows stored (`count_method` says how it was counted)."""
    system: str
    door: str
    durability: str
    pid: int | None
    count_method: str

    def create_table(self, name: str, schema: tuple[tuple[str, str], ...]) -> None: ...
    def bodies(self, name: str, columns: list[str], rows: list[list[Any]], batch: int) -> list[bytes]: ...
    def producer(self, name: str, bodies: list[bytes]) -> Producer: ...
    def count(self, name: str) -> int: ...


class QueryDriver(TableDriver, TailDriver, Protocol):
    """A door with streaming SQL as well (T2-T4): TimeplusRest."""
    framing: dict[str, Any]

    def sender(self, name: str) -> tuple[Callable[[bytes], bytes], Callable[[], None]]: ...
    def query(self, sql: str, batching: dict[str, int] | None) -> SseQuery: ...
    def bounded(self, sql: str, batching: dict[str, int] | None) -> tuple[list[list[Any]], dict[str, Any]]: ...


class Consumer:
    """A W3 consumer tailing one partition on a thread of its own; `start()`, then `stop()`."""

    join_s = 5.0

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stopping = False

    def _run(self) -> None:
        try:
            self.consume()
        except Exception as exc:
            if not self.stopping:
                self.tally.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.tally.done.set()

    def consume(self) -> None:
        raise NotImplementedError

    def start(self) -> Consumer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(self.join_s)
        self.close()

    def close(self) -> None:
        pass


# -- Sluice, gRPC door: the only code in bench/ that touches client._pb ------------------------

def _channel(target: str) -> grpc.Channel:
    # a private subchannel pool: one HTTP/2 connection per channel, as separate clients would have
    return grpc.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])


class SluiceGrpc:
    system, door, read_limit = "Sluice", "gRPC", READ_LIMIT
    w3_modes: tuple[tuple[str, str], ...] = (("push", "W3t push"), ("poll", "W3t long-poll"))
    w3_producer = "gRPC PutRecords (one record per call)"

    def __init__(self, target: str, durability: str, pid: int | None) -> None:
        self.target, self.durability, self.pid = target, durability, pid
        self.channel = _channel(target)
        self.stub = sluice_pb2_grpc.SluiceStub(self.channel)

    def create_stream(self, stream: str, partitions: int) -> None:
        self.stub.CreateStream(pb.CreateStreamRequest(stream_name=stream, partition_count=partitions),
                               timeout=CALL_TIMEOUT)

    def stored(self, stream: str) -> dict[str, int | None]:
        desc = self.stub.DescribeStream(pb.DescribeStreamRequest(stream_name=stream, limit=1000),
                                        timeout=CALL_TIMEOUT)
        return {str(p.partition_id): p.next_seq - p.first_seq for p in desc.partitions}

    def bodies(self, stream: str, data: wl.Dataset) -> list[bytes]:
        # the columnar form, as client.Client sends it: parallel arrays, not a message per record
        return [pb.PutRecordsRequest(stream_name=stream, columns=pb.RecordColumns(
            data=[d for _, d in batch], partition_keys=[k for k, _ in batch])).SerializeToString()
            for batch in data.batches]

    def producer(self, bodies: list[bytes]) -> Producer:
        channel = _channel(self.target)
        call = channel.unary_unary("/sluice.v1.Sluice/PutRecords", request_serializer=None,
                                   response_deserializer=None)
        warm = channel.unary_unary("/sluice.v1.Sluice/ListStreams", request_serializer=None,
                                   response_deserializer=None)
        warm(b"", timeout=CALL_TIMEOUT)   # connection up before the clock
        raw: list[bytes] = []

        def failed() -> int:
            return sum(pb.PutRecordsResponse.FromString(r).failed_record_count for r in raw)

        return timed_producer(bodies, lambda body: raw.append(call(body, timeout=CALL_TIMEOUT)), channel.close,
                              failed)

    def reader(self, stream: str, partition: str, expected: int | None,
               counts: dict[str, int]) -> Callable[[], None]:
        cursor = self._cursor(stream, int(partition), pb.CURSOR_TYPE_TRIM_HORIZON)
        channel = _channel(self.target)
        call = channel.unary_unary("/sluice.v1.Sluice/GetRecords", request_serializer=None,
                                   response_deserializer=pb.GetRecordsResponse.FromString)
        call(pb.GetRecordsRequest(cursor=cursor, limit=1).SerializeToString(), timeout=CALL_TIMEOUT)
        want = expected if expected is not None else 1 << 62

        def run() -> None:
            n, c, empty = 0, cursor, 0
            while n < want and empty < 3:
                resp = call(pb.GetRecordsRequest(cursor=c, limit=READ_LIMIT,
                                                 max_fetch_bytes=FETCH_BYTES).SerializeToString(),
                            timeout=CALL_TIMEOUT)
                got = len(resp.seqs)
                n += got
                empty = empty + 1 if not got else 0
                c = resp.next_cursor
            counts[partition] = n
            channel.close()

        return run

    def _cursor(self, stream: str, partition: int, cursor_type: pb.CursorType) -> str:
        return self.stub.GetCursor(pb.GetCursorRequest(stream_name=stream, partition_id=partition,
                                                       cursor_type=cursor_type),
                                   timeout=CALL_TIMEOUT).cursor  # type: ignore[no-any-return]

    def latest_cursor(self, stream: str, partition: int) -> str:
        return self._cursor(stream, partition, pb.CURSOR_TYPE_LATEST)

    def tail(self, stream: str, partition: int, mode: str, tally: Tally) -> Consumer:
        cursor = self.latest_cursor(stream, partition)
        cls = _GrpcPush if mode == "push" else _GrpcPoll
        return cls(tally, self.target, cursor).start()

    def tail_sender(self, stream: str, partition: int) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        """One record per PutRecords, to a given partition; only the payload changes between calls."""
        channel = _channel(self.target)
        channel.unary_unary("/sluice.v1.Sluice/ListStreams", request_serializer=None,
                            response_deserializer=None)(b"", timeout=CALL_TIMEOUT)   # connection up first
        put = sluice_pb2_grpc.SluiceStub(channel).PutRecords
        request = pb.PutRecordsRequest(stream_name=stream, records=pb.RecordList(
            entries=[pb.PutRecordsEntry(partition_id=partition)]))
        entry = request.records.entries[0]

        def send(payload: bytes) -> None:
            entry.data = payload
            resp = put(request, timeout=CALL_TIMEOUT)
            if resp.failed_record_count:
                raise RuntimeError(f"a record failed: {resp.failures[0].reason}")

        return send, channel.close

    def close(self) -> None:
        self.channel.close()


class _GrpcPush(Consumer):
    """Subscribe from a LATEST cursor, max_wait_ms=0 (each record pushed at once)."""

    def __init__(self, tally: Tally, target: str, cursor: str) -> None:
        super().__init__(tally)
        self.channel = _channel(target)
        self.call = sluice_pb2_grpc.SluiceStub(self.channel).Subscribe(
            pb.SubscribeRequest(cursor=cursor, max_wait_ms=0))

    def consume(self) -> None:
        take, clock, tally = self.tally.take, time.perf_counter_ns, self.tally
        for message in self.call:
            now = clock()
            if message.WhichOneof("event") == "records":   # not a heartbeat
                take(message.records.data, now)
            if tally.received >= tally.expected:
                return

    def stop(self) -> None:
        self.stopping = True
        self.call.cancel()
        super().stop()

    def close(self) -> None:
        self.channel.close()


class _GrpcPoll(Consumer):
    """GetRecords with wait_ms=1000, the next poll sent as soon as one returns."""
    join_s = WAIT_MS / 1000 + 5

    def __init__(self, tally: Tally, target: str, cursor: str) -> None:
        super().__init__(tally)
        self.channel = _channel(target)
        self.get = sluice_pb2_grpc.SluiceStub(self.channel).GetRecords
        self.request = pb.GetRecordsRequest(cursor=cursor, wait_ms=WAIT_MS)

    def consume(self) -> None:
        take, clock, tally, request, get = self.tally.take, time.perf_counter_ns, self.tally, self.request, self.get
        while tally.received < tally.expected and not self.stopping:
            resp = get(request, timeout=CALL_TIMEOUT)
            now = clock()
            if resp.data:
                take(resp.data, now)
            request.cursor = resp.next_cursor

    def close(self) -> None:
        self.channel.close()


# -- Sluice, DIS REST door ---------------------------------------------------------------------

class SluiceRest:
    system, door, read_limit = "Sluice", "REST", READ_LIMIT
    w3_modes: tuple[tuple[str, str], ...] = (("rest", "W3t long-poll"),)
    w3_producer = SluiceGrpc.w3_producer

    def __init__(self, target: str, grpc_door: SluiceGrpc) -> None:
        host, _, port = target.rpartition(":")
        self.host, self.port = host, int(port)
        self.grpc = grpc_door            # W3's producer
        self.durability, self.pid = grpc_door.durability, grpc_door.pid

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=CALL_TIMEOUT)

    def _request(self, method: str, path: str, body: bytes | None = None, want: int = 200) -> bytes:
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status != want:
            raise RuntimeError(f"{method} {path.split('?')[0]}: HTTP {resp.status} {raw[:300]!r}")
        return raw

    def create_stream(self, stream: str, partitions: int) -> None:
        self._request("POST", f"/v2/{PROJECT}/streams",
                      json.dumps({"stream_name": stream, "partition_count": partitions}).encode(), want=201)

    def stored(self, stream: str) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for p in orjson.loads(self._request("GET", f"/v2/{PROJECT}/streams/{stream}?limit_partitions=1000"))[
                "partitions"]:
            first, last = (int(x) for x in p["sequence_number_range"].strip("[]").split(":"))
            out[str(p["partition_id"])] = max(0, last - first + 1) if last >= first else 0
        return out

    def bodies(self, stream: str, data: wl.Dataset) -> list[bytes]:
        return [orjson.dumps({"stream_name": stream, "records": [
            {"data": base64.b64encode(d).decode(), "partition_key": k} for k, d in batch]}) for batch in data.batches]

    def producer(self, bodies: list[bytes]) -> Producer:
        conn = self._conn()
        conn.request("GET", f"/v2/{PROJECT}/streams?limit=1")   # connection up before the clock
        conn.getresponse().read()
        path, headers = f"/v2/{PROJECT}/records", {"Content-Type": "application/json"}
        raw: list[tuple[int, bytes]] = []

        def send(body: bytes) -> None:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            raw.append((resp.status, resp.read()))

        def failed() -> int:
            return sum(int(orjson.loads(b)["failed_record_count"]) if s == 200 else 1 << 30 for s, b in raw)

        return timed_producer(bodies, send, conn.close, failed)

    def _cursor(self, stream: str, partition: str, cursor_type: str) -> str:
        raw = self._request("GET", f"/v2/{PROJECT}/cursors?stream-name={stream}&partition-id={partition}"
                            f"&cursor-type={cursor_type}")
        return orjson.loads(raw)["partition_cursor"]  # type: ignore[no-any-return]

    def reader(self, stream: str, partition: str, expected: int | None,
               counts: dict[str, int]) -> Callable[[], None]:
        cursor = self._cursor(stream, partition, "TRIM_HORIZON")
        conn = self._conn()
        prefix = f"/v2/{PROJECT}/records?limit={READ_LIMIT}&max_fetch_bytes={FETCH_BYTES}&partition-cursor="
        conn.request("GET", f"/v2/{PROJECT}/records?limit=1&partition-cursor={quote(cursor, safe='')}")
        conn.getresponse().read()
        want = expected if expected is not None else 1 << 62

        def run() -> None:
            n, c, empty = 0, cursor, 0
            while n < want and empty < 3:
                conn.request("GET", prefix + quote(c, safe=""))
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:300]!r}")
                doc = orjson.loads(body)
                got = len(doc["records"])
                n += got
                empty = empty + 1 if not got else 0
                c = doc["next_partition_cursor"]
            counts[partition] = n
            conn.close()

        return run

    def tail(self, stream: str, partition: int, mode: str, tally: Tally) -> Consumer:
        return _RestPoll(tally, self._conn(), self._cursor(stream, str(partition), "LATEST")).start()

    def tail_sender(self, stream: str, partition: int) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        return self.grpc.tail_sender(stream, partition)

    def close(self) -> None:
        pass


class _RestPoll(Consumer):
    """The DIS GetRecords route with our wait_ms=1000, on one keep-alive connection."""
    join_s = WAIT_MS / 1000 + 5

    def __init__(self, tally: Tally, conn: http.client.HTTPConnection, cursor: str) -> None:
        super().__init__(tally)
        self.conn, self.cursor = conn, cursor

    def consume(self) -> None:
        take, clock, tally, conn = self.tally.take, time.perf_counter_ns, self.tally, self.conn
        prefix = f"/v2/{PROJECT}/records?wait_ms={WAIT_MS}&partition-cursor="
        cursor = self.cursor
        while tally.received < tally.expected and not self.stopping:
            conn.request("GET", prefix + quote(cursor, safe=""))
            resp = conn.getresponse()
            raw = resp.read()
            now = clock()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {raw[:300]!r}")
            body = orjson.loads(raw)
            records = body["records"]
            if records:
                take([a2b_base64(r["data"]) for r in records], now)
            cursor = body["next_partition_cursor"]

    def close(self) -> None:
        self.conn.close()


# -- NATS JetStream ----------------------------------------------------------------------------

def _partition(key: str) -> int:
    return zlib.crc32(key.encode()) % wl.PARTITIONS


class RawNats:
    """A lean blocking NATS protocol client for the throughput workloads (nats-py builds a Msg object
    and runs a coroutine per message, which made the client, not the server, the bottleneck)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0
        self._line()   # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\nPING\r\n')
        while self._line() != b"PONG":
            pass

    def _fill(self) -> None:
        chunk = self.sock.recv(4 << 20)
        if not chunk:
            raise ConnectionError("NATS server closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return line
            self._fill()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def subscribe(self, subject: str) -> None:
        """SUB, then a PING/PONG round trip: the subscription is in place when this returns."""
        self.send(f"SUB {subject} 1\r\nPING\r\n".encode())
        while self._line() != b"PONG":
            pass

    def messages(self, n: int) -> tuple[int, int, bytes]:
        """Reads until n MSG frames came: (messages, status frames, last status line or error payload)."""
        got = status = 0
        last = b""
        buf = self.buf
        while got < n:
            if self.pos > 1 << 22:   # drop what was parsed (no offsets are held here)
                del self.buf[:self.pos]
                self.pos = 0
                buf = self.buf
            i = buf.find(b"\r\n", self.pos)
            if i < 0:
                self._fill()
                buf = self.buf
                continue
            line = buf[self.pos:i]
            if line.startswith(b"MSG "):
                size = int(line[line.rfind(b" ") + 1:])
                end = i + 2 + size + 2
                while len(self.buf) < end:
                    self._fill()
                buf = self.buf
                if b'"error"' in buf[i + 2:i + 2 + size]:
                    last = bytes(buf[i + 2:i + 2 + size])
                    status += 1
                got += 1
                self.pos = end
            elif line.startswith(b"HMSG "):   # a status (e.g. 408 request timeout / 404 no messages)
                size = int(line[line.rfind(b" ") + 1:])
                end = i + 2 + size + 2
                while len(self.buf) < end:
                    self._fill()
                buf = self.buf
                last = bytes(buf[i + 2:i + 2 + size])
                self.pos = end
                status += 1
                return got, status, last
            else:
                self.pos = i + 2
                if line == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    raise RuntimeError(bytes(line).decode())
        return got, status, last

    def close(self) -> None:
        self.sock.close()


def _nats_run(url: str, fn: Callable[[Any], Any]) -> Any:
    """Runs `await fn(jetstream)` on a fresh nats-py connection (set-up and checks, never timed)."""
    import nats

    async def go() -> Any:
        nc = await nats.connect(url)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()
    return asyncio.run(go())


class Nats:
    """A JetStream stream per benchmark stream (name upper-cased), file storage, subjects <stream>.<n>."""
    system, door, durability, read_limit = "NATS JetStream", "nats", "file (no fsync)", READ_LIMIT
    w3_modes: tuple[tuple[str, str], ...] = (("push", "W3t push"), ("poll", "W3t poll (pull, 1 s wait)"))
    w3_producer = "nats-py js.publish (waits for the PubAck)"

    def __init__(self, port: int, pid: int) -> None:
        self.port, self.pid, self.url = port, pid, f"nats://127.0.0.1:{port}"
        self._producers = 0

    def create_stream(self, stream: str, partitions: int) -> None:
        from nats.js.api import StorageType, StreamConfig

        async def add(js: Any) -> None:
            await js.add_stream(StreamConfig(name=stream.upper(), subjects=[f"{stream}.*"], storage=StorageType.FILE))
        _nats_run(self.url, add)

    def stored(self, stream: str) -> dict[str, int | None]:
        async def info(js: Any) -> dict[str, int | None]:
            state = (await js.stream_info(stream.upper(), subjects_filter=f"{stream}.*")).state
            return dict(state.subjects or {})
        return _nats_run(self.url, info)  # type: ignore[no-any-return]

    def bodies(self, stream: str, data: wl.Dataset) -> list[list[tuple[bytes, bytes]]]:
        """Per batch, (subject, payload) per record; `producer` renders its frames (its own ack inbox)."""
        return [[(f"{stream}.{_partition(k)}".encode(), d) for k, d in batch] for batch in data.batches]

    def producer(self, bodies: list[list[tuple[bytes, bytes]]]) -> Producer:
        """Per batch: its PUBs, each with a reply subject on this producer's ack inbox, in one write
        (JetStream async publish: the batch is the window in flight), then wait for all PubAcks."""
        p = self._producers
        self._producers += 1
        conn = RawNats(self.port)
        conn.subscribe(f"_INBOX.w1p{p}.*")
        frames = [b"".join(b"PUB %s _INBOX.w1p%d.%d %d\r\n%s\r\n" % (subject, p, i, len(d), d)
                           for i, (subject, d) in enumerate(batch)) for batch in bodies]
        bad: list[bytes] = []

        def send(frame_and_size: tuple[bytes, int]) -> None:
            frame, n = frame_and_size
            conn.send(frame)
            _, errs, last = conn.messages(n)
            if errs:
                bad.append(last)

        return timed_producer(list(zip(frames, [len(batch) for batch in bodies])), send, conn.close,
                              lambda: len(bad))

    def reader(self, stream: str, partition: str, expected: int | None,
               counts: dict[str, int]) -> Callable[[], None]:
        """A pull consumer on the partition's subject (AckPolicy none, from the first message), read
        on a raw socket in batches of 10,000 ($JS.API.CONSUMER.MSG.NEXT)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        name, jstream = "r" + partition.rsplit(".", 1)[1], stream.upper()
        extra: dict[str, Any] = (   # older nats-py has no max_batch
            {"max_batch": READ_LIMIT} if "max_batch" in getattr(ConsumerConfig, "__dataclass_fields__", {}) else {})

        async def add(js: Any) -> None:
            await js.add_consumer(jstream, ConsumerConfig(durable_name=name, filter_subject=partition,
                                                          ack_policy=AckPolicy.NONE,
                                                          deliver_policy=DeliverPolicy.ALL, **extra))
        _nats_run(self.url, add)
        conn = RawNats(self.port)
        conn.send(f"SUB _INBOX.{name} 1\r\n".encode())
        n = expected or 0

        def run() -> None:
            got, misses = 0, 0
            while got < n and misses < 3:
                want = min(READ_LIMIT, n - got)
                body = b'{"batch":%d,"expires":5000000000}' % want
                conn.send(b"PUB $JS.API.CONSUMER.MSG.NEXT.%s.%s _INBOX.%s %d\r\n%s\r\n"
                          % (jstream.encode(), name.encode(), name.encode(), len(body), body))
                m, status, _ = conn.messages(want)
                got += m
                misses = misses + 1 if status and not m else 0
            counts[partition] = got
            conn.close()

        return run

    def tail(self, stream: str, partition: int, mode: str, tally: Tally) -> Consumer:
        return _NatsTail(tally, self.url, stream, partition, mode).start()

    def aio(self) -> AioNats:
        """W3 (asyncio) and W6: this server through nats-py on one event loop."""
        return AioNats(self.port, self.pid)

    def tail_sender(self, stream: str, partition: int) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        """js.publish, which waits for the PubAck, driven on this thread's own event loop."""
        import nats
        loop = asyncio.new_event_loop()
        nc = loop.run_until_complete(nats.connect(self.url))
        publish, subject, run = nc.jetstream().publish, f"{stream}.{partition}", loop.run_until_complete

        def send(payload: bytes) -> None:
            run(publish(subject, payload))

        def close() -> None:
            loop.run_until_complete(nc.close())
            loop.close()

        return send, close

    def close(self) -> None:
        pass


class _NatsTail(Consumer):
    """nats-py on this thread's own loop: an ordered push consumer, or a pull consumer fetching 1
    at a time with a 1 s wait (NATS's long poll). `start()` returns once it is subscribed."""

    def __init__(self, tally: Tally, url: str, stream: str, partition: int, mode: str) -> None:
        super().__init__(tally)
        self.url, self.jstream, self.subject, self.mode = url, stream.upper(), f"{stream}.{partition}", mode
        self.ready = threading.Event()

    def start(self) -> Consumer:
        super().start()
        self.ready.wait(10)
        return self

    def consume(self) -> None:
        try:
            asyncio.run(self._consume())
        finally:
            self.ready.set()

    async def _consume(self) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        take, clock, done = self.tally.take, time.perf_counter_ns, self.tally.done
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        if self.mode == "push":
            async def cb(msg: Any) -> None:
                take([msg.data], clock())
            await js.subscribe(self.subject, stream=self.jstream, ordered_consumer=True,
                               deliver_policy=DeliverPolicy.NEW, cb=cb)
            self.ready.set()
            while not done.is_set() and not self.stopping:  # noqa: ASYNC110 - `stopping` is set from another thread
                await asyncio.sleep(0.05)
        else:
            sub = await js.pull_subscribe(self.subject, stream=self.jstream, config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.NEW))
            self.ready.set()
            while not done.is_set() and not self.stopping:
                try:
                    msgs = await sub.fetch(batch=1, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    take([m.data], clock())
        await nc.close()


class JetStreamDrain:
    """`run.py sources`: a JetStream stream filled before the clock (RawNats PUBs, no per-message
    ack; the stream's count says when they are all in), durable pull consumers made on it, and the
    peer figure: a plain nats-py pull consumer draining it (fetch + ack, as Sluice's source does)."""

    def __init__(self, nats: Nats) -> None:
        self.nats = nats

    def fill(self, stream: str, subject: str, payloads: Sequence[bytes], chunk: int = 2000) -> None:
        from nats.js.api import StorageType, StreamConfig

        async def add(js: Any) -> None:
            await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE))
        _nats_run(self.nats.url, add)
        conn = RawNats(self.nats.port)
        try:
            head = b"PUB %s %%d\r\n" % subject.encode()
            for i in range(0, len(payloads), chunk):
                conn.send(b"".join(head % len(p) + p + b"\r\n" for p in payloads[i:i + chunk]) + b"PING\r\n")
                while conn._line() != b"PONG":   # one round trip per chunk: the server keeps up
                    pass
        finally:
            conn.close()
        deadline = time.monotonic() + 120
        while (stored := self.count(stream)) < len(payloads):
            if time.monotonic() > deadline:
                raise RuntimeError(f"JetStream stream {stream} holds {stored:,} of {len(payloads):,} messages")
            time.sleep(0.05)

    def count(self, stream: str) -> int:
        async def info(js: Any) -> int:
            return int((await js.stream_info(stream)).state.messages)
        return _nats_run(self.nats.url, info)  # type: ignore[no-any-return]

    def add_consumer(self, stream: str, name: str, ack_policy: str, max_ack_pending: int) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        async def add(js: Any) -> None:
            await js.add_consumer(stream, ConsumerConfig(durable_name=name, ack_policy=AckPolicy(ack_policy),
                                                         max_ack_pending=max_ack_pending,
                                                         deliver_policy=DeliverPolicy.ALL))
        _nats_run(self.nats.url, add)

    def drain(self, stream: str, consumer: str, n: int, batch: int) -> int:
        """nats-py `pull_subscribe_bind` + `fetch(batch)` + an ack per message (the consumer's
        policy `all`: the last of each batch), until n messages came; returns how many."""
        from nats.js.api import AckPolicy

        async def go(js: Any) -> int:
            info = await js.consumer_info(stream, consumer)
            sub = await js.pull_subscribe_bind(consumer, stream=stream)
            got = 0
            while got < n:
                msgs = await sub.fetch(batch, timeout=10)
                got += len(msgs)
                if info.config.ack_policy == AckPolicy.EXPLICIT:
                    for m in msgs:
                        await m.ack()
                elif info.config.ack_policy == AckPolicy.ALL:
                    await msgs[-1].ack()
            await js._nc.flush()
            return got
        return _nats_run(self.nats.url, go)  # type: ignore[no-any-return]


# -- kinesalite --------------------------------------------------------------------------------

class Kinesalite:
    """Raw HTTP JSON, keep-alive http.client connections. Kinesis has no long poll: W3 polls back to back."""
    system, door, durability, read_limit = "kinesalite", "kinesis-json", "memory", READ_LIMIT
    w3_modes: tuple[tuple[str, str], ...] = (("poll", "W3t poll (back to back)"),)
    w3_producer = "PutRecord over HTTP (one record per call)"

    def __init__(self, port: int, pid: int) -> None:
        self.port, self.pid = port, pid

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=CALL_TIMEOUT)

    @staticmethod
    def headers(action: str) -> dict[str, str]:
        return {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"Kinesis_20131202.{action}",
                "X-Amz-Date": "20261121T000000Z",
                "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDBENCH/20261121/us-east-1/kinesis/aws4_request, "
                                 "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=00"}

    def call(self, action: str, body: dict[str, Any], conn: http.client.HTTPConnection | None = None) -> Any:
        c = conn or self.conn()
        try:
            c.request("POST", "/", body=orjson.dumps(body), headers=self.headers(action))
            resp = c.getresponse()
            raw = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{action}: HTTP {resp.status} {raw[:300]!r}")
            return orjson.loads(raw) if raw else {}
        finally:
            if conn is None:
                c.close()

    def create_stream(self, stream: str, partitions: int) -> None:
        self.call("CreateStream", {"StreamName": stream, "ShardCount": partitions})
        for _ in range(200):
            if self.call("DescribeStream", {"StreamName": stream})["StreamDescription"]["StreamStatus"] == "ACTIVE":
                return
            time.sleep(0.05)
        raise RuntimeError("stream never became ACTIVE")

    def _shards(self, stream: str) -> list[str]:
        described = self.call("DescribeStream", {"StreamName": stream})
        return [s["ShardId"] for s in described["StreamDescription"]["Shards"]]

    def stored(self, stream: str) -> dict[str, int | None]:
        return dict.fromkeys(self._shards(stream))   # Kinesis does not count a shard's records

    def bodies(self, stream: str, data: wl.Dataset) -> list[bytes]:
        return [orjson.dumps({"StreamName": stream, "Records": [
            {"Data": base64.b64encode(d).decode(), "PartitionKey": key} for key, d in batch]})
            for batch in data.batches]

    def producer(self, bodies: list[bytes]) -> Producer:
        conn = self.conn()
        self.call("ListStreams", {}, conn)   # connection up before the clock
        headers = self.headers("PutRecords")
        raw: list[bytes] = []

        def send(body: bytes) -> None:
            conn.request("POST", "/", body=body, headers=headers)
            resp = conn.getresponse()
            raw.append(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"PutRecords HTTP {resp.status}: {raw[-1][:200]!r}")

        def failed() -> int:
            return sum(orjson.loads(r).get("FailedRecordCount", 0) for r in raw)

        return timed_producer(bodies, send, conn.close, failed)

    def reader(self, stream: str, partition: str, expected: int | None,
               counts: dict[str, int]) -> Callable[[], None]:
        """GetShardIterator TRIM_HORIZON, then GetRecords Limit 10,000 until it comes back empty twice."""
        conn = self.conn()
        it = self.call("GetShardIterator", {"StreamName": stream, "ShardId": partition,
                                            "ShardIteratorType": "TRIM_HORIZON"}, conn)["ShardIterator"]
        headers = self.headers("GetRecords")

        def run() -> None:
            nonlocal it
            n, empty = 0, 0
            while empty < 2 and it:
                conn.request("POST", "/", body=orjson.dumps({"ShardIterator": it, "Limit": READ_LIMIT}),
                             headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GetRecords HTTP {resp.status}: {raw[:200]!r}")
                doc = orjson.loads(raw)
                got = len(doc["Records"])
                n += got
                empty = 0 if got else empty + 1
                it = doc.get("NextShardIterator")
            counts[partition] = n
            conn.close()

        return run

    def tail(self, stream: str, partition: int, mode: str, tally: Tally) -> Consumer:
        conn = self.conn()
        it = self.call("GetShardIterator", {"StreamName": stream, "ShardId": self._shards(stream)[partition],
                                            "ShardIteratorType": "LATEST"}, conn)["ShardIterator"]
        return _KinesisPoll(tally, conn, it, self.headers("GetRecords")).start()

    def tail_sender(self, stream: str, partition: int) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        if partition:   # a fixed partition key lands on shard 0 only with one shard
            raise ValueError("the kinesalite W3 producer writes to a one-shard stream")
        conn, headers = self.conn(), self.headers("PutRecord")
        prefix, suffix = b'{"StreamName":"' + stream.encode() + b'","PartitionKey":"k","Data":"', b'"}'

        def send(payload: bytes) -> None:
            conn.request("POST", "/", body=prefix + base64.b64encode(payload) + suffix, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"PutRecord HTTP {resp.status}: {raw[:200]!r}")

        return send, conn.close

    def close(self) -> None:
        pass


class _KinesisPoll(Consumer):
    def __init__(self, tally: Tally, conn: http.client.HTTPConnection, it: str, headers: dict[str, str]) -> None:
        super().__init__(tally)
        self.conn, self.it, self.headers = conn, it, headers

    def consume(self) -> None:
        take, clock, done = self.tally.take, time.perf_counter_ns, self.tally.done
        conn, headers = self.conn, self.headers
        it = self.it
        while not done.is_set() and not self.stopping:
            conn.request("POST", "/", body=orjson.dumps({"ShardIterator": it, "Limit": READ_LIMIT}), headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            now = clock()
            if resp.status != 200:
                raise RuntimeError(f"GetRecords HTTP {resp.status}: {raw[:200]!r}")
            doc = orjson.loads(raw)
            if doc["Records"]:
                take([base64.b64decode(r["Data"]) for r in doc["Records"]], now)
            it = doc["NextShardIterator"]

    def close(self) -> None:
        self.conn.close()


# -- Sluice's Timeplus door, and ClickHouse for T1 -----------------------------------------------

class HttpStatusError(RuntimeError):
    """A non-2xx answer, with the request that got it (the door's findings quote both)."""

    def __init__(self, method: str, path: str, status: int, body: bytes, sent: bytes | None = None) -> None:
        self.method, self.path, self.status, self.body = method, path, status, body
        shown = "" if not sent else f" (request body {sent[:120]!r})"
        super().__init__(f"{method} {path}{shown}: HTTP {status} {body[:300]!r}")


def _http_sender(host: str, port: int, path: str,
                 headers: dict[str, str]) -> tuple[Callable[[bytes], bytes], Callable[[], None]]:
    """POST bodies to one path over one keep-alive connection; send(body) returns the response body
    and raises HttpStatusError on anything but 2xx. The connection is opened before it returns."""
    conn = http.client.HTTPConnection(host, port, timeout=CALL_TIMEOUT)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(body: bytes) -> bytes:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if not 200 <= resp.status < 300:
            raise HttpStatusError("POST", path, resp.status, raw, body)
        return raw

    return send, conn.close


def _http_producer(host: str, port: int, path: str, headers: dict[str, str], bodies: list[bytes]) -> Producer:
    """A T1 producer: every body POSTed in turn on its own keep-alive connection (opened before the
    clock), each batch's latency kept; a non-2xx answer stops it with an error (nothing to count after)."""
    send, close = _http_sender(host, port, path, headers)
    return timed_producer(bodies, send, close, lambda: 0)


class SseQuery:
    """One streaming query of the Timeplus door: `POST /api/v1beta2/queries` read as server-sent
    events over its own connection. The constructor returns once the first event (the query's
    metadata: `meta`, `header`) is in; `events()` yields (event name, data bytes, receive time in
    perf_counter_ns) for the rest: name "message" for row batches (no `event:` line), "metrics",
    and "query" for the final metadata of a bounded query. A non-200 answer raises HttpStatusError."""

    def __init__(self, host: str, port: int, prefix: str, sql: str, batching: dict[str, int] | None,
                 timeout: float = CALL_TIMEOUT) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        body: dict[str, Any] = {"sql": sql}
        if batching:
            body["batching_policy"] = batching
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = orjson.dumps(body)
        self.conn.request("POST", f"{prefix}/queries", body=sent, headers=TP_HEADERS)
        self.resp = self.conn.getresponse()
        if self.resp.status != 200:
            raw = self.resp.read()
            self.conn.close()
            raise HttpStatusError("POST", f"{prefix}/queries", self.resp.status, raw, sent)
        self.chunked = self.resp.getheader("Transfer-Encoding", "").lower() == "chunked"
        self.content_type = self.resp.getheader("Content-Type", "")
        self._events = self._read()
        first = next(self._events, None)
        if first is None or first[0] != "query":
            self.close()
            raise RuntimeError(f"query {sql!r}: the first SSE event is not the metadata: {first!r}")
        self.meta: dict[str, Any] = orjson.loads(first[1])
        self.id: str = self.meta["id"]
        self.header: list[str] = [c["name"] for c in self.meta["result"]["header"]]
        self.closing = False

    def _read(self) -> Iterator[tuple[str, bytes, int]]:
        read, clock, buf = self.resp.read1, time.perf_counter_ns, b""
        while True:
            try:
                chunk = read(1 << 16)
            except (OSError, ValueError, http.client.HTTPException):
                if self.closing:
                    return
                raise
            now = clock()
            if not chunk:
                return
            buf += chunk
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                block, buf = buf[:end], buf[end + 2:]
                name, data = "message", []
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        data.append(line[6:] if line[5:6] == b" " else line[5:])
                    elif line.startswith(b"event:"):
                        name = line[6:].strip().decode()
                if data:
                    yield name, b"\n".join(data), now

    def events(self) -> Iterator[tuple[str, bytes, int]]:
        return self._events

    def cancel(self) -> None:
        """POST .../queries/{id}/cancel (body `null`, as the SDK sends it) on a connection of its own."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("POST", f"{self.prefix}/queries/{self.id}/cancel", body=b"null", headers=TP_HEADERS)
            resp = conn.getresponse()
            raw = resp.read()
            if not 200 <= resp.status < 300:
                raise HttpStatusError("POST", f"{self.prefix}/queries/{self.id}/cancel", resp.status, raw, b"null")
        finally:
            conn.close()

    def close(self) -> None:
        """Drops the connection; a thread blocked in events() gets the end of its iterator."""
        self.closing = True
        with contextlib.suppress(OSError, AttributeError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


TP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class TimeplusRest:
    """Sluice's Timeplus door (`/api/v1beta2/...`, workspace `default`), as the SDK's requests look
    (Content-Type application/json everywhere), over keep-alive http.client connections: typed
    streams, compact ingest, streaming queries read as SSE (`SseQuery`)."""
    system, door = "Sluice", "Timeplus"
    prefix = "/api/v1beta2"

    def __init__(self, target: str, durability: str, pid: int | None) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").rpartition(":")
        self.host, self.port, self.durability, self.pid = host, int(port), durability, pid
        self.count_method = ""
        self.framing: dict[str, Any] = {}   # the last query's Content-Type and chunking, for the JSON

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CALL_TIMEOUT)
        try:
            conn.request(method, self.prefix + path, body=body, headers=TP_HEADERS)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _ok(self, method: str, path: str, body: bytes | None = None) -> bytes:
        status, raw = self._request(method, path, body)
        if not 200 <= status < 300:
            raise HttpStatusError(method, self.prefix + path, status, raw, body)
        return raw

    def create_table(self, name: str, schema: tuple[tuple[str, str], ...]) -> None:
        """A typed stream (dropped first if it exists): the SDK's create body with our columns."""
        status, _ = self._request("GET", f"/streams/{name}")
        if status == 200:
            self._ok("DELETE", f"/streams/{name}", b"null")
        self._ok("POST", "/streams", orjson.dumps({
            "name": name, "columns": [{"name": c, "type": t} for c, t in schema], "event_time_column": None,
            "event_time_timezone": None, "logstore_retention_bytes": None, "logstore_retention_ms": None,
            "ttl_expression": None, "description": None, "mode": "append", "primary_key": None}))

    def bodies(self, name: str, columns: list[str], rows: list[list[Any]], batch: int) -> list[bytes]:
        """Compact-format bodies: {"columns": [...], "data": [[...], ...]}, `batch` rows each."""
        return [orjson.dumps({"columns": columns, "data": rows[i:i + batch]}) for i in range(0, len(rows), batch)]

    def _ingest_path(self, name: str) -> str:
        return f"{self.prefix}/streams/{name}/ingest"

    def producer(self, name: str, bodies: list[bytes]) -> Producer:
        return _http_producer(self.host, self.port, self._ingest_path(name), TP_HEADERS, bodies)

    def sender(self, name: str) -> tuple[Callable[[bytes], bytes], Callable[[], None]]:
        return _http_sender(self.host, self.port, self._ingest_path(name), TP_HEADERS)

    def count(self, name: str) -> int:
        """row_count of GET .../streams/{name}/stats; if the door has no stats, a bounded count(*)."""
        status, raw = self._request("GET", f"/streams/{name}/stats")
        if status == 200:
            self.count_method = "stats row_count"
            return int(orjson.loads(raw)["row_count"])
        self.count_method = f"select count(*) from table() (stats: HTTP {status})"
        rows, _ = self.bounded(f"select count(*) from table({name})", None)
        return int(rows[0][0])

    def query(self, sql: str, batching: dict[str, int] | None) -> SseQuery:
        q = SseQuery(self.host, self.port, self.prefix, sql, batching)
        self.framing = {"content_type": q.content_type, "chunked": q.chunked}
        return q

    def bounded(self, sql: str, batching: dict[str, int] | None) -> tuple[list[list[Any]], dict[str, Any]]:
        """A bounded query read to its end: (every row, the final `event: query` metadata)."""
        q = self.query(sql, batching)
        rows: list[list[Any]] = []
        final: dict[str, Any] = {}
        try:
            for name, data, _ in q.events():
                if name == "message":
                    rows.extend(orjson.loads(data))
                elif name == "query":
                    final = orjson.loads(data)
        finally:
            q.close()
        if not final:
            raise RuntimeError(f"{sql!r}: the response ended without the final `event: query`")
        return rows, final

    # `run.py sources`: a source created, watched through its counters, deleted

    def create_source(self, body: dict[str, Any]) -> dict[str, Any]:
        return orjson.loads(self._ok("POST", "/sources", orjson.dumps(body)))  # type: ignore[no-any-return]

    def source(self, source_id: str) -> dict[str, Any]:
        return orjson.loads(self._ok("GET", f"/sources/{source_id}"))  # type: ignore[no-any-return]

    def delete_source(self, source_id: str) -> None:
        self._ok("DELETE", f"/sources/{source_id}")

    # W3's interface, so bench/workloads.py's tail_run drives T2 unchanged: the consumer is a
    # streaming query, the sender ingests one compact row (index, send time) per request.

    def tail(self, stream: str, partition: int, mode: str, tally: Tally) -> Consumer:
        return _TimeplusTail(tally, self.query(f"select * from {stream}", T2_BATCHING)).start()

    def tail_sender(self, stream: str, partition: int) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        post, close = self.sender(stream)
        unpack = wl.HEADER.unpack_from

        def send(payload: bytes) -> None:
            index, sent = unpack(payload)
            post(b'{"columns":["seq","sent"],"data":[[%d,%d]]}' % (index, sent))

        return send, close


T2_BATCHING = {"count": 1, "time_ms": 1}


class _TimeplusTail(Consumer):
    """T2's consumer: the rows of a running `select * from s`, each turned back into W3's payload
    header (index, send time) for the tally, with the time its SSE event was read."""

    def __init__(self, tally: Tally, query: SseQuery) -> None:
        super().__init__(tally)
        self.query = query
        self.events: dict[str, int] = {}

    def consume(self) -> None:
        seq, sent = self.query.header.index("seq"), self.query.header.index("sent")
        take, pack, tally, events = self.tally.take, wl.HEADER.pack, self.tally, self.events
        for name, data, now in self.query.events():
            events[name] = events.get(name, 0) + 1
            if name == "message":
                take([pack(r[seq], r[sent]) for r in orjson.loads(data)], now)
                if tally.received >= tally.expected:
                    return

    def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(Exception):
            self.query.cancel()
        self.thread.join(1.0)
        self.query.close()
        super().stop()


class ClickHouseHttp:
    """ClickHouse's HTTP interface: `INSERT INTO t FORMAT JSONEachRow` bodies over keep-alive
    connections, T1 only. Debian's 18.16 has neither DateTime64 nor Bool: the table's `b` is UInt8
    (it takes JSON true/false) and `ts` DateTime, fed the same `YYYY-MM-DD HH:MM:SS.mmm` text with
    `date_time_input_format=best_effort` (which parses the milliseconds and keeps the seconds)."""
    system, door = "ClickHouse", "HTTP JSONEachRow"
    TYPES: ClassVar[dict[str, str]] = {"string": "String", "int64": "Int64", "float64": "Float64", "bool": "UInt8",
                                       "datetime64(3)": "DateTime"}

    def __init__(self, port: int, pid: int, engine: str, version: str) -> None:
        self.host, self.port, self.engine, self.version = "127.0.0.1", port, engine, version
        self.pid: int | None = pid
        self.durability = f"{engine} (tmpfs)"
        self.count_method = "select count()"

    def sql(self, query: str, body: bytes = b"") -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CALL_TIMEOUT)
        try:
            conn.request("POST", "/?query=" + quote(query), body=body)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise HttpStatusError("POST", query, resp.status, raw)
        return raw

    def create_table(self, name: str, schema: tuple[tuple[str, str], ...]) -> None:
        cols = ", ".join(f"{c} {self.TYPES[t]}" for c, t in schema)
        engine = "MergeTree() ORDER BY tuple()" if self.engine == "MergeTree" else "Memory"
        self.sql(f"DROP TABLE IF EXISTS {name}")
        self.sql(f"CREATE TABLE {name} ({cols}) ENGINE = {engine}")

    def bodies(self, name: str, columns: list[str], rows: list[list[Any]], batch: int) -> list[bytes]:
        """JSONEachRow: one object per row, a line each, `batch` rows a body."""
        return [b"\n".join(orjson.dumps(dict(zip(columns, r))) for r in rows[i:i + batch])
                for i in range(0, len(rows), batch)]

    def _insert_path(self, name: str) -> str:
        return "/?date_time_input_format=best_effort&query=" + quote(f"INSERT INTO {name} FORMAT JSONEachRow")

    def producer(self, name: str, bodies: list[bytes]) -> Producer:
        return _http_producer(self.host, self.port, self._insert_path(name), {}, bodies)

    def count(self, name: str) -> int:
        return int(self.sql(f"SELECT count() FROM {name}"))


CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/log/server.log</log><errorlog>{dir}/log/error.log</errorlog></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <keep_alive_timeout>60</keep_alive_timeout>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size>
  <users_config>{dir}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mlock_executable>false</mlock_executable>
</yandex>
"""
CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"""


def clickhouse_exe() -> str | None:
    """Debian's clickhouse-server is in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which("clickhouse-server") or shutil.which("clickhouse-server", path="/usr/sbin:/usr/local/sbin")


@contextlib.contextmanager
def clickhouse_server(engine: str = "MergeTree") -> Iterator[ClickHouseHttp]:
    """`clickhouse-server --config-file=<generated>` as a plain process (not the system service),
    its data, tmp and log directories on tmpfs (/dev/shm), on free loopback ports; removed after."""
    exe = clickhouse_exe()
    if not exe:
        raise RuntimeError("clickhouse-server not installed (make bench-peers installs it)")
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="bench-clickhouse-", dir=shm if shm.is_dir() else None))
    http_port, tcp_port = _free_port(), _free_port()
    (tmp / "config.xml").write_text(CLICKHOUSE_CONFIG.format(dir=tmp, http_port=http_port, tcp_port=tcp_port))
    (tmp / "users.xml").write_text(CLICKHOUSE_USERS)
    with _server([exe, f"--config-file={tmp / 'config.xml'}"], http_port, tmp) as (port, pid):
        probe = ClickHouseHttp(port, pid, engine, "")
        for _ in range(100):   # the HTTP port accepts a little before queries work
            try:
                version = probe.sql("SELECT version()").decode().strip()
                break
            except (OSError, RuntimeError):
                time.sleep(0.1)
        else:
            raise RuntimeError("clickhouse-server answers no query")
        yield ClickHouseHttp(port, pid, engine, version)


# -- the servers -------------------------------------------------------------------------------

# Otherwise the broker's defaults (memory settings included). The peers we compare with have no
# write throttling, so neither does a bench broker: its per-partition limits are off (0).
# W6's 200 producers are one client address: with the streaming produce call each holds a stream,
# which the per-client limits count as a subscription (64 by default).
BROKER_ARGS = ("--log-level", "WARNING", "--partition-records-per-s", "0", "--partition-bytes-per-s", "0",
               "--max-subscriptions-per-client", "1024")


@contextlib.contextmanager
def sluice_broker(durability: str, extra: Sequence[str] = ()) -> Iterator[BrokerProcess]:
    """A fresh `python -m broker` on a temp dir (`--fsync` for fsync, then `extra`), stopped and removed after."""
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    broker = BrokerProcess(tmp / "data", *BROKER_ARGS, *(["--fsync"] if durability == "fsync" else []), *extra)
    try:
        broker.start(timeout=60)
        yield broker
    finally:
        try:
            code = broker.stop(60) if broker.proc else None
            if code:
                print(f"broker exited with {code}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            broker.kill()
        except AssertionError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(cmd: list[str], port: int, cleanup: Path | None = None) -> Iterator[tuple[int, int]]:
    """Starts cmd, waits until `port` accepts connections; yields (port, pid); stops it after."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listening on {port} after 30 s") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


def nats_server_version() -> str:
    exe = shutil.which("nats-server", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if not exe:
        return ""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().rpartition(" ")[2]


@contextlib.contextmanager
def nats_server(max_payload_mb: int = 0) -> Iterator[Nats]:
    """`nats-server -js -sd <tmp>` (Debian's package) on a free loopback port; with `max_payload_mb`
    that max_payload (a Sluice JetStream store's servers need 8 MB: a PutRecords is up to 5 MB)."""
    exe = shutil.which("nats-server", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if not exe:
        raise RuntimeError("nats-server not installed (make bench-peers, make bench-sources)")
    tmp, port = Path(tempfile.mkdtemp(prefix="bench-nats-")), _free_port()
    cmd = [exe, "-js", "-sd", str(tmp / "store"), "-a", "127.0.0.1", "-p", str(port)]
    if max_payload_mb:
        (tmp / "nats.conf").write_text(f"max_payload: {max_payload_mb}MB\n")
        cmd += ["-c", str(tmp / "nats.conf")]
    with _server(cmd, port, tmp) as (port, pid):
        yield Nats(port, pid)


@contextlib.contextmanager
def kinesalite_server() -> Iterator[Kinesalite]:
    """`node bench/.peers/node_modules/kinesalite/cli.js` (its default in-memory store)."""
    node = shutil.which("node")
    if not node or not KINESALITE.exists():
        raise RuntimeError(f"node or {KINESALITE} missing (make bench-compare installs it)")
    port = _free_port()
    with _server([node, str(KINESALITE), "--port", str(port), "--createStreamMs", "0", "--shardLimit", "100"],
                 port) as (port, pid):
        yield Kinesalite(port, pid)


PEERS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "nats": nats_server, "kinesalite": kinesalite_server}
PEER_NAMES = {"nats": (Nats.system, Nats.door, Nats.durability),
              "kinesalite": (Kinesalite.system, Kinesalite.door, Kinesalite.durability)}


# -- W3 and W6 on asyncio: the trickle path (issue 14) ------------------------------------------
# The producers and the consumer of these two workloads live in one asyncio process, as a Python
# service would run them: grpc.aio for Sluice, nats-py for JetStream. A driver here has:
#   produce_modes    (mode, label) of its producers: Sluice "unary" (PutRecords, one record a call)
#                    and "stream" (PutRecordsStream, one record a batch), JetStream "publish"
#   create_stream(stream, partitions), stored(stream) -> records stored
#   sender(stream, mode, partition=, key=) -> AioSender: `send(payload)` returns once the record is
#                    acknowledged (raises if it is not); several sends may be in flight at once
#   push(stream, partition, take) -> AioPush: every record written after it returns goes to
#                    `take(payloads, receive time ns)`, in order
# Every coroutine runs on the loop of the one `asyncio.run` a workload makes.

AIO_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]   # one HTTP/2 connection per channel


def has_produce_stream() -> bool:
    """Whether this tree's contract has the streaming produce call (issue 14 point 2)."""
    return "PutRecordsStream" in pb.DESCRIPTOR.services_by_name["Sluice"].methods_by_name


class AioSender(Protocol):
    async def send(self, payload: bytes) -> None: ...
    async def close(self) -> None: ...


class AioPush(Protocol):
    async def close(self) -> None: ...


class AioSluice:
    """Sluice's gRPC door on grpc.aio: unary PutRecords or the PutRecordsStream bidi call; a
    Subscribe push consumer (from LATEST, max_wait_ms=0)."""
    system, door = "Sluice", "gRPC"

    def __init__(self, target: str, durability: str, pid: int | None) -> None:
        self.target, self.durability, self.pid = target, durability, pid
        self.produce_modes: tuple[tuple[str, str], ...] = (("unary", "unary put"),) + (
            (("stream", "stream put"),) if has_produce_stream() else ())
        self.missing = () if has_produce_stream() else (
            ("stream", "stream put", "no PutRecordsStream in this tree's sluice.proto (issue 14 point 2)"),)

    def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target, options=AIO_OPTIONS)

    async def create_stream(self, stream: str, partitions: int) -> None:
        async with self._channel() as channel:
            await sluice_pb2_grpc.SluiceStub(channel).CreateStream(
                pb.CreateStreamRequest(stream_name=stream, partition_count=partitions), timeout=CALL_TIMEOUT)

    async def stored(self, stream: str) -> int:
        async with self._channel() as channel:
            desc = await sluice_pb2_grpc.SluiceStub(channel).DescribeStream(
                pb.DescribeStreamRequest(stream_name=stream, limit=1000), timeout=CALL_TIMEOUT)
        return sum(p.next_seq - p.first_seq for p in desc.partitions)

    async def sender(self, stream: str, mode: str, partition: int | None = None,
                     key: str | None = None) -> AioSender:
        channel = self._channel()
        await channel.channel_ready()
        entry = pb.PutRecordsEntry(partition_id=partition) if partition is not None \
            else pb.PutRecordsEntry(partition_key=key)
        if mode == "stream":
            return _SluiceStreamSender(channel, stream, entry)
        return _SluiceUnarySender(channel, stream, entry)

    async def push(self, stream: str, partition: int, take: Callable[[list[bytes], int], None]) -> AioPush:
        channel = self._channel()
        stub = sluice_pb2_grpc.SluiceStub(channel)
        cursor = (await stub.GetCursor(pb.GetCursorRequest(stream_name=stream, partition_id=partition,
                                                           cursor_type=pb.CURSOR_TYPE_LATEST),
                                       timeout=CALL_TIMEOUT)).cursor
        call = stub.Subscribe(pb.SubscribeRequest(cursor=cursor, max_wait_ms=0))
        clock = time.perf_counter_ns

        async def consume() -> None:
            async for message in call:
                now = clock()
                if message.WhichOneof("event") == "records":   # not a heartbeat
                    take(message.records.data, now)

        return _AioTask(asyncio.ensure_future(consume()), call.cancel, channel.close)


class _AioTask:
    """A consumer task, and how to stop it."""

    def __init__(self, task: asyncio.Future[None], cancel: Callable[[], Any],
                 close: Callable[[], Any] | None = None) -> None:
        self.task, self._cancel, self._close = task, cancel, close

    async def close(self) -> None:
        self._cancel()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        if self._close is not None:
            res = self._close()
            if asyncio.iscoroutine(res):
                await res


class _SluiceUnarySender:
    """One PutRecords call per record; the request object reused, only its payload changes. It is
    serialised here: grpc.aio serialises a request in the call's own task, after `send` would
    already have changed the payload for the next, overlapping call."""

    def __init__(self, channel: grpc.aio.Channel, stream: str, entry: pb.PutRecordsEntry) -> None:
        self.channel = channel
        self.put = channel.unary_unary("/sluice.v1.Sluice/PutRecords", request_serializer=None,
                                       response_deserializer=pb.PutRecordsResponse.FromString)
        self.request = pb.PutRecordsRequest(stream_name=stream, records=pb.RecordList(entries=[entry]))
        self.entry = self.request.records.entries[0]

    async def send(self, payload: bytes) -> None:
        self.entry.data = payload
        resp = await self.put(self.request.SerializeToString(), timeout=CALL_TIMEOUT)
        if resp.failed_record_count:
            raise RuntimeError(f"a record failed: {resp.failures[0].reason}")

    async def close(self) -> None:
        await self.channel.close()


class _SluiceStreamSender:
    """One PutRecordsStream call for the sender's life: each record a batch of its own (batch id
    1, 2, ...), the answers matched in order by a reader task. Writes are serialised (grpc.aio
    allows one write at a time on a call)."""

    def __init__(self, channel: grpc.aio.Channel, stream: str, entry: pb.PutRecordsEntry) -> None:
        self.channel = channel
        self.call = sluice_pb2_grpc.SluiceStub(channel).PutRecordsStream()
        self.stream, self.entry = stream, entry
        self.next_id = 1
        self.pending: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self.lock = asyncio.Lock()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for resp in self.call:
                batch_id, future = self.pending.popleft()
                if future.done():
                    continue
                if resp.batch_id != batch_id:
                    future.set_exception(RuntimeError(f"answer for batch {resp.batch_id}, expected {batch_id}"))
                elif resp.WhichOneof("outcome") == "error":
                    future.set_exception(RuntimeError(f"batch refused: {resp.error.reason} {resp.error.message}"))
                elif resp.result.failed_record_count:
                    future.set_exception(RuntimeError(f"a record failed: {resp.result.failures[0].reason}"))
                else:
                    future.set_result(None)
        except Exception as exc:  # the call broke: every batch still waiting fails with it
            for _, future in self.pending:
                if not future.done():
                    future.set_exception(exc)
            raise
        for _, future in self.pending:   # the server ended the call
            if not future.done():
                future.set_exception(RuntimeError("PutRecordsStream ended with batches unanswered"))

    async def send(self, payload: bytes) -> None:
        batch_id, self.next_id = self.next_id, self.next_id + 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((batch_id, future))
        make = pb.PutRecordsStreamRequest
        request = make(batch_id=batch_id, stream_name=self.stream, records=pb.RecordList(entries=[self.entry]))
        request.records.entries[0].data = payload
        async with self.lock:
            await self.call.write(request)
        await future

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call.done_writing()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.reader, 5)
        self.call.cancel()
        await self.channel.close()


class AioNats:
    """NATS JetStream through nats-py: `js.publish` (waits for the PubAck) per record, an ordered
    push consumer (DeliverPolicy.NEW). Subjects <stream>.<partition>; a key's partition is its
    CRC-32 modulo the partitions, as W1 routes."""
    system, door, durability = Nats.system, "nats-py", Nats.durability
    produce_modes: tuple[tuple[str, str], ...] = (("publish", "js.publish"),)
    missing: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, port: int, pid: int) -> None:
        self.url, self.pid = f"nats://127.0.0.1:{port}", pid
        self.partitions: dict[str, int] = {}

    async def create_stream(self, stream: str, partitions: int) -> None:
        import nats
        from nats.js.api import StorageType, StreamConfig
        nc = await nats.connect(self.url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=stream.upper(), subjects=[f"{stream}.*"],
                                                         storage=StorageType.FILE))
        finally:
            await nc.close()
        self.partitions[stream] = partitions

    async def stored(self, stream: str) -> int:
        import nats
        nc = await nats.connect(self.url)
        try:
            return int((await nc.jetstream().stream_info(stream.upper())).state.messages)
        finally:
            await nc.close()

    async def sender(self, stream: str, mode: str, partition: int | None = None,
                     key: str | None = None) -> AioSender:
        import nats
        if partition is None:
            partition = zlib.crc32((key or "").encode()) % self.partitions.get(stream, 1)
        return _NatsSender(await nats.connect(self.url), f"{stream}.{partition}")

    async def push(self, stream: str, partition: int, take: Callable[[list[bytes], int], None]) -> AioPush:
        import nats
        from nats.js.api import DeliverPolicy
        nc = await nats.connect(self.url)
        clock = time.perf_counter_ns

        async def cb(msg: Any) -> None:
            take([msg.data], clock())
        sub = await nc.jetstream().subscribe(f"{stream}.{partition}", stream=stream.upper(), ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.NEW, cb=cb)

        async def close() -> None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await nc.close()
        return _AioTask(asyncio.ensure_future(asyncio.sleep(0)), lambda: None, close)


class _NatsSender:
    def __init__(self, nc: Any, subject: str) -> None:
        self.nc, self.subject = nc, subject
        self.publish = nc.jetstream().publish

    async def send(self, payload: bytes) -> None:
        await self.publish(self.subject, payload)   # raises on an error PubAck

    async def close(self) -> None:
        await self.nc.close()
