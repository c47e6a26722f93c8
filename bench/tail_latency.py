#!/usr/bin/env python3
"""End-to-end tail latency of a Sluice broker: put-to-receive time of records consumed by push vs
long poll.

Starts its own broker (`python -m broker` on a temporary data dir, OS-chosen ports, readiness read
from the ready line) unless --grpc/--http point at a running one. For each consumer mode in turn,
one producer thread sends one record every 1/rate s (default 500 records/s: one every 2 ms) for a
fixed time, each with its send time (time.perf_counter_ns, CLOCK_MONOTONIC: one clock for the
whole machine) in the payload, to a partition of its own, while one consumer thread tails that
partition:

    push            gRPC Subscribe from a LATEST cursor, max_wait_ms=0 (each record sent at once)
    long-poll gRPC  GetRecords with wait_ms=1000, looping at once on the cursor it returns
    long-poll REST  the DIS GetRecords route with our wait_ms=1000, one keep-alive HTTP connection

Latency is consumer receive time minus producer send time: the PutRecords round trip up to its
commit, the wake-up, the read and the delivery. Reported per mode: p50/p90/p99/max in ms, and the
PutRecords p50. Producer and consumer each have their own connection; requests are pre-built and
only their payload changes. A first 0.2 s of records warms the path up and is not counted. Every
record must arrive once and in order, else the script exits 1.

    .venv/bin/python bench/tail_latency.py                       # 5 s per mode, 500 records/s
    .venv/bin/python bench/tail_latency.py --seconds 1 --rate 1000
    .venv/bin/python bench/tail_latency.py --modes push,poll     # without the REST door
    .venv/bin/python bench/tail_latency.py --grpc 127.0.0.1:50051 --http 127.0.0.1:8080
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from binascii import a2b_base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from broker.launcher import BrokerProcess  # noqa: E402
from client._pb.sluice.v1 import sluice_pb2 as pb  # noqa: E402
from client._pb.sluice.v1 import sluice_pb2_grpc  # noqa: E402

try:
    import orjson
    _loads: Callable[[bytes], object] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a broker dependency, but stay runnable without it
    _loads = json.loads

PROJECT = "bench"
CALL_TIMEOUT = 30.0
WAIT_MS = 1000
WARM_UP_S = 0.2
HEADER = struct.Struct(">BQq")      # warm-up flag, index, send time (perf_counter_ns)
MODES = {"push": "push gRPC", "poll": "long-poll gRPC", "rest": "long-poll REST"}


# -- a broker of our own -----------------------------------------------------------------------

class OwnBroker:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
        self.broker = BrokerProcess(self.dir / "data", "--log-level", "WARNING")
        try:
            self.broker.start(timeout=60)
        except RuntimeError as exc:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SystemExit(str(exc)) from None

    def stop(self) -> None:
        try:
            self.broker.stop(60)
        except subprocess.TimeoutExpired:
            self.broker.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _channel(target: str) -> grpc.Channel:
    # a private subchannel pool: one HTTP/2 connection per channel, as separate clients would have
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


# -- consumers ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """What a consumer saw: per measured record, receive - send in ns; and whether it was in order."""
    expected: int
    latencies: list[int] = field(default_factory=list)
    received: int = 0
    out_of_order: int = 0
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def take(self, payloads: list[bytes], now: int) -> None:
        for data in payloads:
            warm, index, sent = HEADER.unpack_from(data)
            if index != self.received:
                self.out_of_order += 1
            self.received += 1
            if not warm:
                self.latencies.append(now - sent)
        if self.received >= self.expected:
            self.done.set()


class Consumer:
    """Tails one partition on a thread of its own; `stop()` ends it."""

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

    def stop(self) -> None:
        self.stopping = True


class PushConsumer(Consumer):
    def __init__(self, tally: Tally, target: str, cursor: str) -> None:
        super().__init__(tally)
        self.channel = _channel(target)
        self.call = sluice_pb2_grpc.SluiceStub(self.channel).Subscribe(
            pb.SubscribeRequest(partition_cursor=cursor, max_wait_ms=0))

    def consume(self) -> None:
        take, clock, tally = self.tally.take, time.perf_counter_ns, self.tally
        for message in self.call:
            now = clock()
            take(message.data, now)
            if tally.received >= tally.expected:
                return

    def stop(self) -> None:
        super().stop()
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


class GrpcPollConsumer(Consumer):
    def __init__(self, tally: Tally, target: str, cursor: str) -> None:
        super().__init__(tally)
        self.channel = _channel(target)
        self.get = sluice_pb2_grpc.SluiceStub(self.channel).GetRecords
        self.request = pb.GetRecordsRequest(partition_cursor=cursor, wait_ms=WAIT_MS)

    def consume(self) -> None:
        take, clock, tally, request, get = self.tally.take, time.perf_counter_ns, self.tally, self.request, self.get
        while tally.received < tally.expected and not self.stopping:
            resp = get(request, timeout=CALL_TIMEOUT)
            now = clock()
            if resp.data:
                take(resp.data, now)
            request.partition_cursor = resp.next_partition_cursor

    def stop(self) -> None:
        super().stop()
        self.thread.join(WAIT_MS / 1000 + 5)
        self.channel.close()


class RestPollConsumer(Consumer):
    def __init__(self, tally: Tally, host: str, port: int, cursor: str) -> None:
        super().__init__(tally)
        self.conn = http.client.HTTPConnection(host, port, timeout=CALL_TIMEOUT)   # keep-alive, reused
        self.cursor = cursor

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
            body = _loads(raw)
            records = body["records"]  # type: ignore[index]
            if records:
                take([a2b_base64(r["data"]) for r in records], now)
            cursor = body["next_partition_cursor"]  # type: ignore[index]

    def stop(self) -> None:
        super().stop()
        self.thread.join(WAIT_MS / 1000 + 5)
        self.conn.close()


# -- one run -----------------------------------------------------------------------------------

@dataclass
class Result:
    mode: str
    sent: int = 0
    tally: Tally | None = None
    put_latencies: list[float] = field(default_factory=list)
    late_sends: int = 0
    error: str = ""

    @staticmethod
    def _pct(values: list, q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    def latency_ms(self, q: float) -> float:
        return self._pct(self.tally.latencies if self.tally else [], q) / 1e6

    @property
    def ok(self) -> bool:
        t = self.tally
        return bool(t and not self.error and not t.error and t.received == self.sent and not t.out_of_order
                    and t.latencies)

    @property
    def verdict(self) -> str:
        t = self.tally
        if t is None or self.error or t.error:
            return "error"
        if t.received != self.sent:
            return f"LOST {self.sent - t.received}"
        return "ok" if not t.out_of_order else f"DISORDER {t.out_of_order}"


def run_mode(mode: str, args: argparse.Namespace, grpc_target: str, http_target: str | None,
             stream: str, partition: int) -> Result:
    result = Result(MODES[mode])
    producer_channel = _channel(grpc_target)
    stub = sluice_pb2_grpc.SluiceStub(producer_channel)
    cursor = stub.GetCursor(pb.GetCursorRequest(stream_name=stream, partition_id=str(partition),
                                                cursor_type=pb.LATEST), timeout=CALL_TIMEOUT).partition_cursor
    interval_ns = int(1e9 / args.rate)
    warm_up = max(1, int(WARM_UP_S * args.rate))
    total = warm_up + int(args.seconds * args.rate)
    tally = Tally(total)
    result.tally = tally
    consumer: Consumer
    if mode == "push":
        consumer = PushConsumer(tally, grpc_target, cursor)
    elif mode == "poll":
        consumer = GrpcPollConsumer(tally, grpc_target, cursor)
    else:
        assert http_target
        host, _, port = http_target.rpartition(":")
        consumer = RestPollConsumer(tally, host, int(port), cursor)
    consumer.thread.start()

    request = pb.PutRecordsRequest(stream_name=stream, records=[pb.PutRecordsEntry(partition_id=str(partition))])
    entry = request.records[0]
    pad = os.urandom(max(0, args.record_size - HEADER.size))
    put = stub.PutRecords
    clock, sleep = time.perf_counter_ns, time.sleep
    try:
        start = clock() + 50_000_000   # 50 ms from now: the consumer is in its first wait by then
        for i in range(total):
            due = start + i * interval_ns
            now = clock()
            if due > now:
                sleep((due - now) / 1e9)
            elif now - due > interval_ns:
                result.late_sends += 1
            sent = clock()
            entry.data = HEADER.pack(i < warm_up, i, sent) + pad
            resp = put(request, timeout=CALL_TIMEOUT)
            if i >= warm_up:
                result.put_latencies.append((clock() - sent) / 1e6)
            if resp.failed_record_count:
                raise RuntimeError(f"record {i} failed: {resp.failures[0].error_code}")
            result.sent += 1
        tally.done.wait(10)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        consumer.stop()
        producer_channel.close()
    return result


# -- output ------------------------------------------------------------------------------------

def print_table(results: list[Result], args: argparse.Namespace, broker_note: str) -> None:
    print(f"Sluice tail latency (put -> receive): 1 producer at {args.rate:g} records/s x {args.record_size} B, "
          f"{args.seconds:g} s per mode, 1 consumer per mode; long polls wait_ms={WAIT_MS}")
    print(f"broker: {broker_note}; cpus: {os.cpu_count()}")
    header = ("mode", "records", "p50 ms", "p90 ms", "p99 ms", "max ms", "put p50 ms", "verified")
    rows = [header]
    for r in results:
        n = len(r.tally.latencies) if r.tally else 0
        rows.append((r.mode, f"{n:,}", f"{r.latency_ms(0.50):.2f}", f"{r.latency_ms(0.90):.2f}",
                     f"{r.latency_ms(0.99):.2f}", f"{r.latency_ms(1.0):.2f}",
                     f"{Result._pct(r.put_latencies, 0.5):.2f}", r.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    for r in results:
        for e in (r.error, r.tally.error if r.tally else ""):
            if e:
                print(f"  {r.mode} error: {e}")
        if r.late_sends:
            print(f"  {r.mode}: {r.late_sends} sends went out more than one interval late (a slow PutRecords)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc", metavar="HOST:PORT", help="measure this running broker (gRPC door)")
    p.add_argument("--http", metavar="[http://]HOST:PORT", help="its REST door, for the REST long-poll mode")
    p.add_argument("--modes", default="push,poll,rest",
                   help="comma-separated: push, poll (gRPC long poll), rest (REST long poll); default all")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per mode (default 5)")
    p.add_argument("--rate", type=float, default=500.0, help="records per second (default 500)")
    p.add_argument("--record-size", type=int, default=100, help="payload bytes per record (default 100, min 17)")
    args = p.parse_args(argv)
    modes = [m.strip().lower() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}")
    args.modes = modes
    if args.seconds <= 0 or args.rate <= 0:
        p.error("--seconds and --rate must be positive")
    if args.record_size < HEADER.size:
        p.error(f"--record-size must be at least {HEADER.size}")
    if args.http and not args.grpc:
        p.error("--http needs --grpc (streams are created over gRPC)")
    if args.grpc and "rest" in modes and not args.http:
        p.error("with --grpc, the rest mode needs --http (or leave it out with --modes)")
    if args.http:
        parts = urlsplit(args.http if "://" in args.http else f"http://{args.http}")
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            p.error(f"--http wants http://HOST:PORT or HOST:PORT, got {args.http!r}")
        args.http = f"{parts.hostname}:{parts.port}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own = None if args.grpc else OwnBroker()
    grpc_target = args.grpc or own.broker.grpc_target  # type: ignore[union-attr]
    http_target = args.http or (own.broker.http_target if own else None)
    note = f"external grpc={args.grpc}" if own is None else "started here (python -m broker, RocksDB on a temp dir)"
    results: list[Result] = []
    stream = f"bench-latency-{uuid.uuid4().hex[:8]}"
    try:
        with _channel(grpc_target) as channel:
            stub = sluice_pb2_grpc.SluiceStub(channel)
            stub.CreateStream(pb.CreateStreamRequest(stream_name=stream, partition_count=len(args.modes)),
                              timeout=CALL_TIMEOUT)
            try:
                for partition, mode in enumerate(args.modes):   # one after the other, a partition each
                    print(f"... {MODES[mode]}: {args.rate:g} records/s for {args.seconds:g} s",
                          file=sys.stderr, flush=True)
                    results.append(run_mode(mode, args, grpc_target, http_target, stream, partition))
            finally:
                stub.DeleteStream(pb.DeleteStreamRequest(stream_name=stream), timeout=CALL_TIMEOUT)
    finally:
        if own is not None:
            own.stop()
    print_table(results, args, note)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
