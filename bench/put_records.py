#!/usr/bin/env python3
"""PutRecords throughput of a Sluice broker, through both front doors.

Starts its own broker (`python -m broker` on a temporary data dir, OS-chosen ports, readiness read
from the ready line) unless --grpc/--http point at a running one. For each door, P producer
threads each send batches of N records of S random bytes (base64 in the REST body) with partition
keys spread over the stream's partitions, back to back, for a fixed time. Each producer has its own
connection: a gRPC channel with a private subchannel pool, or one keep-alive `http.client`
connection. Requests are built and serialised before the clock starts, so the figures measure the
broker, not the client's encoder.

Reported per door: records/s, payload MB/s (10^6 bytes of record data per second), batches, and
batch latency p50/p99 in ms. Afterwards the stream is described and the stored record count must
equal the acknowledged count ("verified"); a mismatch makes the script exit 1.

    .venv/bin/python bench/put_records.py                  # 10 s per door, WAL durability
    .venv/bin/python bench/put_records.py --fsync          # also a broker started with --fsync
    .venv/bin/python bench/put_records.py --quick          # 2 s smoke run
    .venv/bin/python bench/put_records.py --grpc 127.0.0.1:50051 --http 127.0.0.1:8080
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

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
CALL_TIMEOUT = 60.0
VARIANTS_PER_PRODUCER = 4   # distinct pre-built requests per producer, sent round robin


# -- a broker of our own -----------------------------------------------------------------------

class OwnBroker:
    """A broker started here on a temp dir (broker.launcher: ports from its ready line)."""

    def __init__(self, fsync: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
        self.broker = BrokerProcess(self.dir / "data", "--log-level", "WARNING", *(["--fsync"] if fsync else []))
        try:
            self.broker.start(timeout=60)
        except RuntimeError as exc:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SystemExit(str(exc)) from None
        self.grpc_target = self.broker.grpc_target
        self.http_target = self.broker.http_target

    def stop(self) -> None:
        try:
            self.broker.stop(60)
        except subprocess.TimeoutExpired:
            self.broker.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the doors ---------------------------------------------------------------------------------

def _records(producer: int, variant: int, batch: int, size: int) -> list[tuple[str, bytes]]:
    """(partition_key, payload): keys differ per record so they hash over every partition."""
    return [(f"p{producer}-v{variant}-k{i}", os.urandom(size)) for i in range(batch)]


class GrpcDoor:
    name = "gRPC"

    def __init__(self, target: str) -> None:
        self.target = target

    def _channel(self) -> grpc.Channel:
        # a private subchannel pool: one HTTP/2 connection per producer, as separate clients would have
        return grpc.insecure_channel(self.target, options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])

    def create_stream(self, stream: str, partitions: int) -> None:
        with self._channel() as channel:
            sluice_pb2_grpc.SluiceStub(channel).CreateStream(
                pb.CreateStreamRequest(stream_name=stream, partition_count=partitions), timeout=CALL_TIMEOUT)

    def stored(self, stream: str) -> int:
        with self._channel() as channel:
            desc = sluice_pb2_grpc.SluiceStub(channel).DescribeStream(
                pb.DescribeStreamRequest(stream_name=stream, limit_partitions=1000), timeout=CALL_TIMEOUT)
        return sum(p.next_sequence_number - p.first_sequence_number for p in desc.partitions)

    def delete_stream(self, stream: str) -> None:
        with self._channel() as channel:
            sluice_pb2_grpc.SluiceStub(channel).DeleteStream(pb.DeleteStreamRequest(stream_name=stream),
                                                             timeout=CALL_TIMEOUT)

    def sender(self, stream: str, producer: int, batch: int, size: int) -> "Sender":
        bodies = [pb.PutRecordsRequest(stream_name=stream, records=[
            pb.PutRecordsEntry(data=d, partition_key=k) for k, d in _records(producer, v, batch, size)])
            .SerializeToString() for v in range(VARIANTS_PER_PRODUCER)]
        channel = self._channel()
        call = channel.unary_unary("/sluice.v1.Sluice/PutRecords", request_serializer=None,
                                   response_deserializer=pb.PutRecordsResponse.FromString)

        def send(i: int) -> int:
            return call(bodies[i % len(bodies)], timeout=CALL_TIMEOUT).failed_record_count  # type: ignore[no-any-return]

        return Sender(send, channel.close)


class RestDoor:
    name = "REST"

    def __init__(self, target: str) -> None:
        parts = urlsplit(target if "://" in target else f"http://{target}")
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise SystemExit(f"--http wants http://HOST:PORT or HOST:PORT, got {target!r}")
        self.host, self.port = parts.hostname, parts.port

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CALL_TIMEOUT)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def create_stream(self, stream: str, partitions: int) -> None:
        status, raw = self._request("POST", f"/v2/{PROJECT}/streams",
                                    {"stream_name": stream, "partition_count": partitions})
        if status != 201:
            raise RuntimeError(f"create stream over REST: HTTP {status} {raw[:300]!r}")

    def stored(self, stream: str) -> int:
        status, raw = self._request("GET", f"/v2/{PROJECT}/streams/{stream}?limit_partitions=1000")
        if status != 200:
            raise RuntimeError(f"describe stream over REST: HTTP {status} {raw[:300]!r}")
        total = 0
        for p in json.loads(raw)["partitions"]:
            first, last = (int(x) for x in p["sequence_number_range"].strip("[]").split(":"))
            total += last - first + 1
        return total

    def delete_stream(self, stream: str) -> None:
        self._request("DELETE", f"/v2/{PROJECT}/streams/{stream}")

    def sender(self, stream: str, producer: int, batch: int, size: int) -> "Sender":
        bodies = [json.dumps({"stream_name": stream, "records": [
            {"data": base64.b64encode(d).decode(), "partition_key": k} for k, d in _records(producer, v, batch, size)]
        }).encode() for v in range(VARIANTS_PER_PRODUCER)]
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CALL_TIMEOUT)  # keep-alive, reused
        path = f"/v2/{PROJECT}/records"
        headers = {"Content-Type": "application/json"}

        def send(i: int) -> int:
            conn.request("POST", path, body=bodies[i % len(bodies)], headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {raw[:300]!r}")
            return int(_loads(raw)["failed_record_count"])  # type: ignore[index]

        return Sender(send, conn.close)


@dataclass
class Sender:
    send: Callable[[int], int]   # sends pre-built request #i, returns its failed_record_count
    close: Callable[[], None]


# -- one run -----------------------------------------------------------------------------------

@dataclass
class Result:
    door: str
    durability: str
    seconds: float = 0.0
    batches: int = 0
    records: int = 0
    failed_records: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    verified: str = "-"

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run_door(door: GrpcDoor | RestDoor, durability: str, args: argparse.Namespace) -> Result:
    stream = f"bench-{door.name.lower()}-{durability}-{uuid.uuid4().hex[:8]}"
    door.create_stream(stream, args.partitions)
    senders = [door.sender(stream, p, args.batch, args.record_size) for p in range(args.producers)]
    result = Result(door.name, durability)
    lock = threading.Lock()
    start = threading.Barrier(args.producers + 1)
    finished: list[float] = []

    def produce(sender: Sender) -> None:
        latencies: list[float] = []
        batches = failed = 0
        errors: list[str] = []
        try:
            sender.send(0)  # warm-up: connection set up, not timed, not counted below
            start.wait()
            deadline = time.perf_counter() + args.seconds
            i = 1
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    failed += sender.send(i)
                except Exception as exc:  # report, keep the others going
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    break
                latencies.append(time.perf_counter() - began)
                batches += 1
                i += 1
        except threading.BrokenBarrierError:
            return
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            start.abort()
        finally:
            sender.close()
        with lock:
            result.latencies += latencies
            result.batches += batches
            result.failed_records += failed
            result.errors += errors
            finished.append(time.perf_counter())

    threads = [threading.Thread(target=produce, args=(s,), daemon=True) for s in senders]
    for t in threads:
        t.start()
    try:
        start.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    for t in threads:
        t.join(args.seconds + CALL_TIMEOUT + 30)
    result.seconds = (max(finished) if finished else time.perf_counter()) - began
    result.records = result.batches * args.batch - result.failed_records
    expected = (result.batches + len(finished)) * args.batch - result.failed_records  # + the warm-up batches
    try:
        stored = door.stored(stream)
        result.verified = "ok" if stored == expected and not result.errors else f"MISMATCH {stored}/{expected}"
        door.delete_stream(stream)
    except Exception as exc:
        result.verified = f"unchecked ({type(exc).__name__})"
    return result


# -- output ------------------------------------------------------------------------------------

def print_table(results: list[Result], args: argparse.Namespace, broker_note: str) -> None:
    print(f"Sluice PutRecords benchmark: {args.producers} producers/door x batches of {args.batch} records "
          f"x {args.record_size} B, {args.partitions} partitions, {args.seconds:g} s per door")
    print(f"broker: {broker_note}; cpus: {os.cpu_count()}")
    header = ("door", "durability", "records/s", "MB/s", "batches", "p50 ms", "p99 ms", "failed", "verified")
    rows = [header]
    for r in results:
        rate = r.records / r.seconds if r.seconds > 0 else 0.0
        rows.append((r.door, r.durability, f"{rate:,.0f}", f"{rate * args.record_size / 1e6:.2f}", f"{r.batches:,}",
                     f"{r.percentile(0.50):.1f}", f"{r.percentile(0.99):.1f}", f"{r.failed_records:,}", r.verified))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    rule = "-+-".join("-" * w for w in widths)
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print(rule)
    for r in results:
        for e in r.errors[:3]:
            print(f"  {r.door}/{r.durability} error: {e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc", metavar="HOST:PORT", help="benchmark this running broker's gRPC door")
    p.add_argument("--http", metavar="[http://]HOST:PORT", help="benchmark this running broker's REST door")
    p.add_argument("--doors", default="grpc,rest", help="comma-separated: grpc, rest (default both)")
    p.add_argument("--producers", type=int, default=4, help="concurrent producers per door (default 4)")
    p.add_argument("--batch", type=int, default=500, help="records per PutRecords (default 500)")
    p.add_argument("--record-size", type=int, default=256, help="payload bytes per record (default 256)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the benchmark stream (default 4)")
    p.add_argument("--seconds", type=float, help="measured seconds per door (default 10; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per door")
    p.add_argument("--fsync", action="store_true",
                   help="also benchmark a broker started with --fsync (only when the script starts the brokers)")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 10.0
    doors = [d.strip().lower() for d in args.doors.split(",") if d.strip()]
    if not doors or set(doors) - {"grpc", "rest"}:
        p.error("--doors takes grpc and/or rest")
    args.doors = doors
    for name in ("producers", "batch", "record_size", "partitions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    external = bool(args.grpc or args.http)
    if external:
        missing = [d for d in doors if not (args.grpc if d == "grpc" else args.http)]
        if missing:
            p.error(f"with --grpc/--http given, every door benchmarked needs its target: missing {missing} "
                    f"(or choose with --doors)")
        if args.fsync:
            p.error("--fsync starts its own --fsync broker: not with --grpc/--http")
    args.external = external
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[Result] = []
    if args.external:
        notes = "external" + (f" grpc={args.grpc}" if args.grpc else "") + (f" http={args.http}" if args.http else "")
        variants: list[tuple[str, OwnBroker | None]] = [("external", None)]
    else:
        notes = "started here (python -m broker, RocksDB on a temp dir)"
        variants = [("wal", None)] + ([("fsync", None)] if args.fsync else [])
    for durability, _ in variants:
        own = None if args.external else OwnBroker(fsync=durability == "fsync")
        try:
            grpc_target = args.grpc if own is None else own.grpc_target
            http_target = args.http if own is None else own.http_target
            for d in args.doors:
                door: GrpcDoor | RestDoor = GrpcDoor(grpc_target) if d == "grpc" else RestDoor(http_target)
                print(f"... {door.name} / {durability}: {args.producers} producers for {args.seconds:g} s",
                      file=sys.stderr, flush=True)
                results.append(run_door(door, durability, args))
        finally:
            if own is not None:
                own.stop()
    print_table(results, args, notes)
    bad = [r for r in results if r.verified != "ok" or r.errors or r.failed_records or not r.batches]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
