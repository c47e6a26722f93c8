"""The same W1/W2/W3 (bench/workloads.py) against real peers on loopback, for `bench/run.py --compare`.

NATS JetStream: `nats-server -js -sd <tmp>` (Debian package nats-server), a file-storage stream with
one subject per partition (w1.0..w1.3; a record's subject is crc32(partition key) % 4). Setup and
W3 use nats-py; W1/W2 a lean raw-protocol client (RawNats).
    W1  4 producer threads, each its own socket speaking the NATS protocol directly (nats-py made
        the client the bottleneck); per batch of 500: the 500 PUBs, each with a reply subject on
        the producer's ack inbox, pre-built as one write (JetStream async publish: the window in
        flight is the batch), then wait for all 500 PubAcks. Latency per batch.
    W2  one pull consumer per partition subject (AckPolicy none, DeliverPolicy all), each read by a
        thread with its own raw socket, fetching batches of 10,000 ($JS.API.CONSUMER.MSG.NEXT).
    W3  push: an ordered push consumer; poll: a pull consumer fetching 1 at a time with a 1 s wait
        (NATS's long poll). Producer: js.publish (waits for the PubAck) every 2 ms, consumer on a
        thread and connection of its own.
kinesalite: `node .../kinesalite/cli.js --port P --createStreamMs 0` (the npm package; in-memory
store, its default). Client: raw HTTP JSON (Kinesis_20131202 API) over keep-alive http.client.
    W1  4 producer threads, PutRecords of 500 pre-built bodies (base64 data, PartitionKey).
    W2  per shard GetShardIterator TRIM_HORIZON, GetRecords Limit 10,000 until it comes back empty.
    W3  poll: a consumer thread calling GetRecords back to back (Kinesis has no long poll);
        producer PutRecord every 2 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import orjson

import workloads as wl

BENCH = Path(__file__).resolve().parent
KINESALITE = BENCH / ".peers" / "node_modules" / "kinesalite" / "cli.js"
HEADER = struct.Struct(">Qq")   # index, send time (perf_counter_ns)
W3_WARM = 100                   # first records not counted (0.2 s at 500/s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _say(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr, flush=True)


def _partition(key: str) -> int:
    return zlib.crc32(key.encode()) % wl.PARTITIONS


# -- NATS JetStream ---------------------------------------------------------------------------

NATS = "NATS JetStream"


def run_nats(data: wl.Dataset, w3_seconds: float, workloads: list[str]) -> list[wl.Row]:
    exe = shutil.which("nats-server")
    if not exe:
        return [wl.Row(NATS, "nats", "file", "error", ok=False, note="nats-server not installed (make bench-compare)")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    port = _free_port()
    proc = subprocess.Popen([exe, "-js", "-sd", str(tmp), "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[wl.Row] = []
    try:
        _wait_port(port, proc)
        url = f"nats://127.0.0.1:{port}"
        if "w1" in workloads:
            _say(f"{NATS}: W1 put {data.records:,} records")
            rows.append(_nats_w1(url, port, data, proc.pid))
            _say(f"  {rows[-1].rate:,.0f} rec/s")
        if "w2" in workloads:
            _say(f"{NATS}: W2 read")
            rows.append(_nats_w2(url, port, data.records, proc.pid))
            _say(f"  {rows[-1].rate:,.0f} rec/s")
        if "w3" in workloads:
            for mode in ("push", "poll"):
                _say(f"{NATS}: W3 {mode} {w3_seconds:g} s")
                rows.append(_nats_w3(url, mode, w3_seconds, proc.pid))
                _say(f"  p50 {rows[-1].p50_ms:.2f} p99 {rows[-1].p99_ms:.2f} ms")
    except Exception as exc:
        rows.append(wl.Row(NATS, "nats", "file", "error", ok=False, note=f"{type(exc).__name__}: {exc}"[:300]))
        _say(f"  error: {rows[-1].note}")
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


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


async def _nats_setup_w1(url: str) -> None:
    import nats
    from nats.js.api import StorageType, StreamConfig
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(StreamConfig(name="W1", subjects=["w1.*"], storage=StorageType.FILE))
    await nc.close()


async def _nats_setup_w2(url: str) -> dict[str, int]:
    """One pull consumer per partition subject (AckPolicy none, from the first message)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info("W1", subjects_filter="w1.*")
    per_subject = dict(info.state.subjects or {})
    for subject in per_subject:
        await js.add_consumer("W1", ConsumerConfig(durable_name="r" + subject.split(".")[1], filter_subject=subject,
                                                   ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                                                   max_batch=10_000) if _has_max_batch() else
                              ConsumerConfig(durable_name="r" + subject.split(".")[1], filter_subject=subject,
                                             ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
    await nc.close()
    return per_subject


def _has_max_batch() -> bool:
    from nats.js.api import ConsumerConfig
    return "max_batch" in getattr(ConsumerConfig, "__dataclass_fields__", {})


async def _nats_stored(url: str, stream: str) -> int:
    import nats
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(stream)
    await nc.close()
    return int(info.state.messages)


def _nats_w1(url: str, port: int, data: wl.Dataset, pid: int) -> wl.Row:
    """Per producer and batch: 500 PUBs with a reply subject on its ack inbox in one write (JetStream
    async publish, the batch is the window in flight), then wait for the 500 PubAcks."""
    row = wl.Row(NATS, "nats", "file (no fsync)", "W1 put")
    asyncio.run(_nats_setup_w1(url))
    fns, lats, bad = [], [], []
    for p in range(wl.PRODUCERS):
        conn = RawNats(port)
        conn.send(f"SUB _INBOX.w1p{p}.* 1\r\nPING\r\n".encode())
        conn.messages(0)
        while conn._line() != b"PONG":
            pass
        frames = [b"".join(b"PUB w1.%d _INBOX.w1p%d.%d %d\r\n%s\r\n" % (_partition(k), p, i, len(d), d)
                           for i, (k, d) in enumerate(data.batches[b]))
                  for b in wl.producer_batches(len(data.batches), p)]
        sizes = [len(data.batches[b]) for b in wl.producer_batches(len(data.batches), p)]
        lat: list[float] = []
        lats.append(lat)

        def run(conn: RawNats = conn, frames: list[bytes] = frames, sizes: list[int] = sizes,
                lat: list[float] = lat) -> None:
            clock = time.perf_counter
            for frame, n in zip(frames, sizes):
                t = clock()
                conn.send(frame)
                got, errs, last = conn.messages(n)
                lat.append(clock() - t)
                if errs:
                    bad.append(last)
            conn.close()
        fns.append(run)
    meter = wl.CpuMeter(pid).start()
    errors = wl.run_threads(fns)
    meter.stop()
    stored = asyncio.run(_nats_stored(url, "W1"))
    lat = [x for ls in lats for x in ls]
    row.records = data.records
    row.measure(meter)
    row.p50_ms, row.p99_ms = wl.pct(lat, 0.5) * 1000, wl.pct(lat, 0.99) * 1000
    row.extra = {"stored": stored, "ack_errors": len(bad), "client": "raw NATS protocol, 1 socket per producer",
                 "publish": "async, ack window = batch of 500"}
    if errors or stored != data.records or bad:
        row.ok, row.note = False, errors[0] if errors else f"stored {stored}/{data.records}, ack errors {bad[:1]}"
    return row


def _nats_w2(url: str, port: int, expected_total: int, pid: int) -> wl.Row:
    """Per partition subject: a pull consumer, fetched in batches of 10,000 ($JS.API.CONSUMER.MSG.NEXT)."""
    row = wl.Row(NATS, "nats", "file (no fsync)", "W2 read")
    per_subject = asyncio.run(_nats_setup_w2(url))
    counts: dict[str, int] = {}
    fns = []
    for subject, n in per_subject.items():
        name = "r" + subject.split(".")[1]
        conn = RawNats(port)
        conn.send(f"SUB _INBOX.{name} 1\r\n".encode())

        def run(conn: RawNats = conn, name: str = name, n: int = n, subject: str = subject) -> None:
            got, misses = 0, 0
            while got < n and misses < 3:
                want = min(10_000, n - got)
                body = b'{"batch":%d,"expires":5000000000}' % want
                conn.send(b"PUB $JS.API.CONSUMER.MSG.NEXT.W1.%s _INBOX.%s %d\r\n%s\r\n"
                          % (name.encode(), name.encode(), len(body), body))
                m, status, _ = conn.messages(want)
                got += m
                misses = misses + 1 if status and not m else 0
            counts[subject] = got
            conn.close()
        fns.append(run)
    meter = wl.CpuMeter(pid).start()
    errors = wl.run_threads(fns)
    meter.stop()
    row.records = sum(counts.values())
    row.measure(meter)
    row.extra = {"per_subject": counts, "fetch_batch": 10_000, "client": "raw NATS protocol, 1 socket per reader"}
    if errors or row.records != expected_total:
        row.ok, row.note = False, errors[0] if errors else f"read {row.records}/{expected_total}"
    return row


def _nats_w3(url: str, mode: str, seconds: float, pid: int) -> wl.Row:
    """Consumer on a thread with its own loop and connection; producer on this thread's loop."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
    row = wl.Row(NATS, "nats", "file (no fsync)", "W3 push" if mode == "push" else "W3 poll (pull, 1 s wait)")
    subject = f"w3.{mode}"
    total = W3_WARM + int(seconds / wl.W3_INTERVAL_S)
    latencies: list[int] = []
    seen: list[int] = []
    ready, done = threading.Event(), threading.Event()
    errors: list[str] = []
    stop = threading.Event()

    def take(data: bytes) -> None:
        now = time.perf_counter_ns()
        index, sent = HEADER.unpack_from(data)
        seen.append(index)
        if index >= W3_WARM:
            latencies.append(now - sent)
        if len(seen) >= total:
            done.set()

    async def consume() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        if mode == "push":
            async def cb(msg: Any) -> None:
                take(msg.data)
            await js.subscribe(subject, stream="W3", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, cb=cb)
            ready.set()
            while not done.is_set() and not stop.is_set():
                await asyncio.sleep(0.05)
        else:
            sub = await js.pull_subscribe(subject, stream="W3", config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.NEW))
            ready.set()
            while not done.is_set() and not stop.is_set():
                try:
                    msgs = await sub.fetch(batch=1, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    take(m.data)
        await nc.close()

    def consumer_thread() -> None:
        try:
            asyncio.run(consume())
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            ready.set()

    async def produce() -> tuple[wl.CpuMeter, int]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            await js.add_stream(StreamConfig(name="W3", subjects=["w3.*"], storage=StorageType.FILE))
        except Exception:
            pass
        th = threading.Thread(target=consumer_thread, daemon=True)
        th.start()
        ready.wait(10)
        await asyncio.sleep(0.05)
        pad = os.urandom(100 - HEADER.size)
        interval = int(wl.W3_INTERVAL_S * 1e9)
        meter = wl.CpuMeter(pid).start()
        start = time.perf_counter_ns() + 10_000_000
        for i in range(total):
            now = time.perf_counter_ns()
            due = start + i * interval
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
            await js.publish(subject, HEADER.pack(i, time.perf_counter_ns()) + pad)
        done.wait(10)
        meter.stop()
        stop.set()
        th.join(5)
        await nc.close()
        return meter, total

    meter, sent = asyncio.run(produce())
    row.records = len(latencies)
    row.measure(meter)
    row.p50_ms, row.p99_ms = wl.pct(latencies, 0.5) / 1e6, wl.pct(latencies, 0.99) / 1e6
    in_order = seen == list(range(len(seen)))
    row.extra = {"sent": sent, "received": len(seen), "in_order": in_order, "max_ms": wl.pct(latencies, 1.0) / 1e6}
    if errors or len(seen) != sent or not in_order:
        row.ok, row.note = False, errors[0] if errors else f"received {len(seen)}/{sent} in_order={in_order}"
    return row


# -- kinesalite ---------------------------------------------------------------------------------

KIN = "kinesalite"


class Kinesis:
    def __init__(self, port: int) -> None:
        self.port = port

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

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

    def create(self, name: str, shards: int) -> list[str]:
        self.call("CreateStream", {"StreamName": name, "ShardCount": shards})
        for _ in range(200):
            desc = self.call("DescribeStream", {"StreamName": name})["StreamDescription"]
            if desc["StreamStatus"] == "ACTIVE":
                return [s["ShardId"] for s in desc["Shards"]]
            time.sleep(0.05)
        raise RuntimeError("stream never became ACTIVE")


def run_kinesalite(data: wl.Dataset, w3_seconds: float, workloads: list[str]) -> list[wl.Row]:
    node = shutil.which("node")
    if not node or not KINESALITE.exists():
        return [wl.Row(KIN, "kinesis-json", "memory", "error", ok=False,
                       note=f"node or {KINESALITE} missing (make bench-compare installs it)")]
    port = _free_port()
    proc = subprocess.Popen([node, str(KINESALITE), "--port", str(port), "--createStreamMs", "0",
                             "--shardLimit", "100"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[wl.Row] = []
    try:
        _wait_port(port, proc)
        k = Kinesis(port)
        if "w1" in workloads:
            shards = k.create("w1", wl.PARTITIONS)
            _say(f"{KIN}: W1 put {data.records:,} records")
            rows.append(_kin_w1(k, data, proc.pid))
            _say(f"  {rows[-1].rate:,.0f} rec/s")
            if "w2" in workloads:
                _say(f"{KIN}: W2 read")
                rows.append(_kin_w2(k, shards, data.records, proc.pid))
                _say(f"  {rows[-1].rate:,.0f} rec/s")
        if "w3" in workloads:
            _say(f"{KIN}: W3 poll {w3_seconds:g} s")
            rows.append(_kin_w3(k, w3_seconds, proc.pid))
            _say(f"  p50 {rows[-1].p50_ms:.2f} p99 {rows[-1].p99_ms:.2f} ms")
    except Exception as exc:
        rows.append(wl.Row(KIN, "kinesis-json", "memory", "error", ok=False, note=f"{type(exc).__name__}: {exc}"[:300]))
        _say(f"  error: {rows[-1].note}")
    finally:
        _stop(proc)
    return rows


def _kin_w1(k: Kinesis, data: wl.Dataset, pid: int) -> wl.Row:
    row = wl.Row(KIN, "kinesis-json", "memory", "W1 put")
    bodies = [orjson.dumps({"StreamName": "w1", "Records": [
        {"Data": base64.b64encode(d).decode(), "PartitionKey": key} for key, d in batch]}) for batch in data.batches]
    headers = k.headers("PutRecords")
    lats: list[list[float]] = []
    raws: list[list[bytes]] = []
    fns = []
    for p in range(wl.PRODUCERS):
        mine = [bodies[i] for i in wl.producer_batches(len(bodies), p)]
        conn = k.conn()
        k.call("ListStreams", {}, conn)   # connection up before the clock
        lat: list[float] = []
        raw: list[bytes] = []
        lats.append(lat)
        raws.append(raw)

        def run(conn: http.client.HTTPConnection = conn, mine: list[bytes] = mine, lat: list[float] = lat,
                raw: list[bytes] = raw) -> None:
            clock = time.perf_counter
            for body in mine:
                t = clock()
                conn.request("POST", "/", body=body, headers=headers)
                resp = conn.getresponse()
                raw.append(resp.read())
                lat.append(clock() - t)
                if resp.status != 200:
                    raise RuntimeError(f"PutRecords HTTP {resp.status}: {raw[-1][:200]!r}")
            conn.close()
        fns.append(run)
    meter = wl.CpuMeter(pid).start()
    errors = wl.run_threads(fns)
    meter.stop()
    failed = sum(orjson.loads(r).get("FailedRecordCount", 0) for rs in raws for r in rs)
    all_lat = [x for ls in lats for x in ls]
    row.records = data.records - failed
    row.measure(meter)
    row.p50_ms, row.p99_ms = wl.pct(all_lat, 0.5) * 1000, wl.pct(all_lat, 0.99) * 1000
    row.extra = {"failed_records": failed, "store": "in-memory (kinesalite default)"}
    if errors or failed or len(all_lat) != len(bodies):
        row.ok, row.note = False, errors[0] if errors else f"failed {failed}"
    return row


def _kin_w2(k: Kinesis, shards: list[str], expected: int, pid: int) -> wl.Row:
    row = wl.Row(KIN, "kinesis-json", "memory", "W2 read")
    counts: dict[str, int] = {}
    headers = k.headers("GetRecords")
    fns = []
    for shard in shards:
        conn = k.conn()
        it = k.call("GetShardIterator", {"StreamName": "w1", "ShardId": shard, "ShardIteratorType": "TRIM_HORIZON"},
                    conn)["ShardIterator"]

        def run(conn: http.client.HTTPConnection = conn, it: str = it, shard: str = shard) -> None:
            n, empty = 0, 0
            while empty < 2 and it:
                conn.request("POST", "/", body=orjson.dumps({"ShardIterator": it, "Limit": 10_000}), headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GetRecords HTTP {resp.status}: {raw[:200]!r}")
                doc = orjson.loads(raw)
                got = len(doc["Records"])
                n += got
                empty = 0 if got else empty + 1
                it = doc.get("NextShardIterator")
            counts[shard] = n
            conn.close()
        fns.append(run)
    meter = wl.CpuMeter(pid).start()
    errors = wl.run_threads(fns)
    meter.stop()
    row.records = sum(counts.values())
    row.measure(meter)
    row.extra = {"per_shard": counts, "limit": 10_000}
    if errors or row.records != expected:
        row.ok, row.note = False, errors[0] if errors else f"read {row.records}/{expected}"
    return row


def _kin_w3(k: Kinesis, seconds: float, pid: int) -> wl.Row:
    row = wl.Row(KIN, "kinesis-json", "memory", "W3 poll (back to back)")
    shard = k.create("w3", 1)[0]
    conn = k.conn()
    it = k.call("GetShardIterator", {"StreamName": "w3", "ShardId": shard, "ShardIteratorType": "LATEST"},
                conn)["ShardIterator"]
    total = W3_WARM + int(seconds / wl.W3_INTERVAL_S)
    latencies: list[int] = []
    seen: list[int] = []
    stop = threading.Event()
    errors: list[str] = []
    headers = k.headers("GetRecords")

    def consume() -> None:
        nonlocal it
        try:
            while len(seen) < total and not stop.is_set():
                conn.request("POST", "/", body=orjson.dumps({"ShardIterator": it, "Limit": 10_000}), headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                now = time.perf_counter_ns()
                if resp.status != 200:
                    raise RuntimeError(f"GetRecords HTTP {resp.status}: {raw[:200]!r}")
                doc = orjson.loads(raw)
                for r in doc["Records"]:
                    index, sent = HEADER.unpack_from(base64.b64decode(r["Data"]))
                    seen.append(index)
                    if index >= W3_WARM:
                        latencies.append(now - sent)
                it = doc["NextShardIterator"]
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    th = threading.Thread(target=consume, daemon=True)
    th.start()
    pconn = k.conn()
    put_headers = k.headers("PutRecord")
    pad = os.urandom(100 - HEADER.size)
    interval = int(wl.W3_INTERVAL_S * 1e9)
    meter = wl.CpuMeter(pid).start()
    start = time.perf_counter_ns() + 20_000_000
    for i in range(total):
        now = time.perf_counter_ns()
        due = start + i * interval
        if due > now:
            time.sleep((due - now) / 1e9)
        data = base64.b64encode(HEADER.pack(i, time.perf_counter_ns()) + pad).decode()
        pconn.request("POST", "/", body=b'{"StreamName":"w3","PartitionKey":"k","Data":"' + data.encode() + b'"}',
                      headers=put_headers)
        resp = pconn.getresponse()
        resp.read()
    deadline = time.monotonic() + 10
    while len(seen) < total and time.monotonic() < deadline and th.is_alive():
        time.sleep(0.01)
    meter.stop()
    stop.set()
    th.join(5)
    pconn.close()
    conn.close()
    row.records = len(latencies)
    row.measure(meter)
    row.p50_ms, row.p99_ms = wl.pct(latencies, 0.5) / 1e6, wl.pct(latencies, 0.99) / 1e6
    in_order = seen == list(range(len(seen)))
    row.extra = {"sent": total, "received": len(seen), "in_order": in_order, "max_ms": wl.pct(latencies, 1.0) / 1e6}
    if errors or len(seen) != total or not in_order:
        row.ok, row.note = False, errors[0] if errors else f"received {len(seen)}/{total} in_order={in_order}"
    return row


def run_peers(args: argparse.Namespace, data: wl.Dataset) -> list[wl.Row]:
    rows: list[wl.Row] = []
    if "nats" in args.peers:
        rows += run_nats(data, args.w3_seconds, args.workloads)
    if "kinesalite" in args.peers:
        rows += run_kinesalite(data, args.w3_seconds, args.workloads)
    return rows


if __name__ == "__main__":   # pragma: no cover - use bench/run.py --compare
    print(json.dumps("use: bench/run.py --compare [--no-sluice]"))
