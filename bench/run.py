#!/usr/bin/env python3
"""The benchmark suite of issue 4: W1 put, W2 read, W3 tail latency against Sluice, through the gRPC
and the DIS REST doors, in both durability modes (WAL: the broker's default; fsync: `--fsync`).

One fresh broker per durability mode (`python -m broker` on a temp dir, ports from its ready line).
Per door: W1 writes the fixed-seed data set into a 4-partition stream, W2 reads it all back, then
W3 measures put-to-receive latency (bench/tail_latency.py's producer and consumers: gRPC push and
gRPC long poll on the gRPC door, REST long poll on the REST door). With --compare the same
workloads also run against NATS JetStream and kinesalite (bench/peers.py), in the same run, and the
Sluice/peer ratios are printed. See bench/README.md.

    .venv/bin/python bench/run.py                      # everything (make bench)
    .venv/bin/python bench/run.py --quick              # small counts: a smoke run
    .venv/bin/python bench/run.py --doors grpc --durability wal --workloads w1,w2
    .venv/bin/python bench/run.py --compare            # + peers (make bench-compare installs them)
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from urllib.parse import quote

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import grpc  # noqa: E402
import orjson  # noqa: E402

import tail_latency  # noqa: E402
import workloads as wl  # noqa: E402
from broker.launcher import BrokerProcess  # noqa: E402
from client._pb.sluice.v1 import sluice_pb2 as pb  # noqa: E402
from client._pb.sluice.v1 import sluice_pb2_grpc  # noqa: E402

PROJECT = "bench"
CALL_TIMEOUT = 120.0
READ_LIMIT = 10_000
FETCH_BYTES = 10 * 1024 * 1024
SYSTEM = "Sluice"


def _channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])


# -- the doors ----------------------------------------------------------------------------------

class GrpcDoor:
    name = "gRPC"

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = _channel(target)
        self.stub = sluice_pb2_grpc.SluiceStub(self.channel)

    def create_stream(self, stream: str, partitions: int) -> None:
        self.stub.CreateStream(pb.CreateStreamRequest(stream_name=stream, partition_count=partitions),
                               timeout=CALL_TIMEOUT)

    def stored(self, stream: str) -> dict[str, int]:
        desc = self.stub.DescribeStream(pb.DescribeStreamRequest(stream_name=stream, limit_partitions=1000),
                                        timeout=CALL_TIMEOUT)
        return {p.partition_id: p.next_sequence_number - p.first_sequence_number for p in desc.partitions}

    def bodies(self, stream: str, data: wl.Dataset) -> list[bytes]:
        # the columnar form, as client.Client sends it: parallel arrays, not a message per record
        return [pb.PutRecordsRequest(stream_name=stream, columns=pb.RecordColumns(
            data=[d for _, d in batch], partition_keys=[k for k, _ in batch])).SerializeToString()
            for batch in data.batches]

    def producer(self, bodies: list[bytes]) -> tuple[Callable[[], None], Callable[[], list[int]], list[float]]:
        channel = _channel(self.target)
        call = channel.unary_unary("/sluice.v1.Sluice/PutRecords", request_serializer=None,
                                   response_deserializer=None)
        warm = channel.unary_unary("/sluice.v1.Sluice/ListStreams", request_serializer=None,
                                   response_deserializer=None)
        warm(b"", timeout=CALL_TIMEOUT)   # connection up before the clock
        raw: list[bytes] = []
        lat: list[float] = []

        def run() -> None:
            clock = time.perf_counter
            for body in bodies:
                t = clock()
                raw.append(call(body, timeout=CALL_TIMEOUT))
                lat.append(clock() - t)
            channel.close()

        def failed() -> list[int]:
            return [pb.PutRecordsResponse.FromString(r).failed_record_count for r in raw]

        return run, failed, lat

    def reader(self, stream: str, partition: str, expected: int, counts: dict[str, int]) -> Callable[[], None]:
        cursor = self.stub.GetCursor(pb.GetCursorRequest(stream_name=stream, partition_id=partition,
                                                         cursor_type=pb.TRIM_HORIZON),
                                     timeout=CALL_TIMEOUT).partition_cursor
        channel = _channel(self.target)
        call = channel.unary_unary("/sluice.v1.Sluice/GetRecords", request_serializer=None,
                                   response_deserializer=pb.GetRecordsResponse.FromString)
        call(pb.GetRecordsRequest(partition_cursor=cursor, limit=1).SerializeToString(), timeout=CALL_TIMEOUT)

        def run() -> None:
            n, c, empty = 0, cursor, 0
            while n < expected and empty < 3:
                resp = call(pb.GetRecordsRequest(partition_cursor=c, limit=READ_LIMIT,
                                                 max_fetch_bytes=FETCH_BYTES).SerializeToString(),
                            timeout=CALL_TIMEOUT)
                got = len(resp.sequence_numbers)
                n += got
                empty = empty + 1 if not got else 0
                c = resp.next_partition_cursor
            counts[partition] = n
            channel.close()

        return run

    def close(self) -> None:
        self.channel.close()


class RestDoor:
    name = "REST"

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.host, self.port = host, int(port)

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=CALL_TIMEOUT)

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def create_stream(self, stream: str, partitions: int) -> None:
        status, raw = self._request("POST", f"/v2/{PROJECT}/streams",
                                    json.dumps({"stream_name": stream, "partition_count": partitions}).encode())
        if status != 201:
            raise RuntimeError(f"create stream over REST: HTTP {status} {raw[:300]!r}")

    def stored(self, stream: str) -> dict[str, int]:
        status, raw = self._request("GET", f"/v2/{PROJECT}/streams/{stream}?limit_partitions=1000")
        if status != 200:
            raise RuntimeError(f"describe stream over REST: HTTP {status} {raw[:300]!r}")
        out = {}
        for p in orjson.loads(raw)["partitions"]:
            first, last = (int(x) for x in p["sequence_number_range"].strip("[]").split(":"))
            out[str(p["partition_id"])] = max(0, last - first + 1) if last >= first else 0
        return out

    def bodies(self, stream: str, data: wl.Dataset) -> list[bytes]:
        return [orjson.dumps({"stream_name": stream, "records": [
            {"data": base64.b64encode(d).decode(), "partition_key": k} for k, d in batch]}) for batch in data.batches]

    def producer(self, bodies: list[bytes]) -> tuple[Callable[[], None], Callable[[], list[int]], list[float]]:
        conn = self._conn()
        conn.request("GET", f"/v2/{PROJECT}/streams?limit=1")   # connection up before the clock
        conn.getresponse().read()
        path, headers = f"/v2/{PROJECT}/records", {"Content-Type": "application/json"}
        raw: list[tuple[int, bytes]] = []
        lat: list[float] = []

        def run() -> None:
            clock = time.perf_counter
            for body in bodies:
                t = clock()
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                raw.append((resp.status, resp.read()))
                lat.append(clock() - t)
            conn.close()

        def failed() -> list[int]:
            return [int(orjson.loads(b)["failed_record_count"]) if s == 200 else 1 << 30 for s, b in raw]

        return run, failed, lat

    def reader(self, stream: str, partition: str, expected: int, counts: dict[str, int]) -> Callable[[], None]:
        status, raw = self._request("GET", f"/v2/{PROJECT}/cursors?stream-name={stream}&partition-id={partition}"
                                    "&cursor-type=TRIM_HORIZON")
        if status != 200:
            raise RuntimeError(f"cursor over REST: HTTP {status} {raw[:300]!r}")
        cursor = orjson.loads(raw)["partition_cursor"]
        conn = self._conn()
        prefix = f"/v2/{PROJECT}/records?limit={READ_LIMIT}&max_fetch_bytes={FETCH_BYTES}&partition-cursor="
        conn.request("GET", f"/v2/{PROJECT}/records?limit=1&partition-cursor={quote(cursor, safe='')}")
        conn.getresponse().read()

        def run() -> None:
            n, c, empty = 0, cursor, 0
            while n < expected and empty < 3:
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

    def close(self) -> None:
        pass


# -- the workloads on one door -----------------------------------------------------------------

def w1(door: GrpcDoor | RestDoor, durability: str, stream: str, bodies: list[bytes], data: wl.Dataset,
       pid: int) -> wl.Row:
    row = wl.Row(SYSTEM, door.name, durability, "W1 put")
    producers = [door.producer([bodies[i] for i in wl.producer_batches(len(bodies), p)])
                 for p in range(wl.PRODUCERS)]
    meter = wl.CpuMeter(pid).start()
    errors = wl.run_threads([run for run, _, _ in producers])
    meter.stop()
    failed = sum(sum(f()) for _, f, _ in producers)
    lat = [x for _, _, ls in producers for x in ls]
    row.records = data.records - failed if not errors else sum(len(ls) for _, _, ls in producers) * wl.BATCH
    row.measure(meter)
    row.p50_ms, row.p99_ms = wl.pct(lat, 0.5) * 1000, wl.pct(lat, 0.99) * 1000
    stored = sum(door.stored(stream).values())
    row.extra = {"batches": len(lat), "failed_records": failed, "stored": stored}
    if errors or failed or stored != data.records:
        row.ok, row.note = False, (errors[0] if errors else f"failed={failed} stored={stored}/{data.records}")
    return row


def w2(door: GrpcDoor | RestDoor, durability: str, stream: str, pid: int) -> wl.Row:
    row = wl.Row(SYSTEM, door.name, durability, "W2 read")
    per_partition = door.stored(stream)
    counts: dict[str, int] = {}
    readers = [door.reader(stream, p, n, counts) for p, n in per_partition.items()]
    meter = wl.CpuMeter(pid).start()
    errors = wl.run_threads(readers)
    meter.stop()
    row.records = sum(counts.values())
    row.measure(meter)
    expected = sum(per_partition.values())
    row.extra = {"expected": expected, "per_partition": counts, "read_limit": READ_LIMIT}
    if errors or row.records != expected:
        row.ok, row.note = False, (errors[0] if errors else f"read {row.records}/{expected}")
    return row


def w3(door_name: str, durability: str, grpc_target: str, http_target: str, seconds: float,
       pid: int) -> list[wl.Row]:
    """bench/tail_latency.py's run_mode: gRPC door -> push + long poll; REST door -> REST long poll."""
    modes = ["push", "poll"] if door_name == "gRPC" else ["rest"]
    names = {"push": "W3 push", "poll": "W3 long-poll", "rest": "W3 long-poll"}
    args = SimpleNamespace(rate=1 / wl.W3_INTERVAL_S, seconds=seconds, record_size=100)
    stream = f"w3-{door_name.lower()}"
    with _channel(grpc_target) as channel:
        sluice_pb2_grpc.SluiceStub(channel).CreateStream(
            pb.CreateStreamRequest(stream_name=stream, partition_count=len(modes)), timeout=CALL_TIMEOUT)
    rows = []
    for partition, mode in enumerate(modes):
        meter = wl.CpuMeter(pid).start()
        res = tail_latency.run_mode(mode, args, grpc_target, http_target, stream, partition)  # type: ignore[arg-type]
        meter.stop()
        row = wl.Row(SYSTEM, door_name, durability, names[mode])
        lat = res.tally.latencies if res.tally else []
        row.records = len(lat)
        row.measure(meter)
        row.p50_ms, row.p99_ms = wl.pct(lat, 0.5) / 1e6, wl.pct(lat, 0.99) / 1e6
        row.extra = {"mode": res.mode, "put_p50_ms": wl.pct(res.put_latencies, 0.5),
                     "max_ms": wl.pct(lat, 1.0) / 1e6, "late_sends": res.late_sends,
                     "producer": "gRPC PutRecords (one record per call)"}
        if not res.ok:
            row.ok, row.note = False, res.error or (res.tally.error if res.tally else "") or res.verdict
        rows.append(row)
    return rows


def run_sluice(args: argparse.Namespace, data: wl.Dataset, rows: list[wl.Row]) -> None:
    bodies: dict[str, list[bytes]] = {}
    for durability in args.durability:
        tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
        broker = BrokerProcess(tmp / "data", "--log-level", "WARNING", *(["--fsync"] if durability == "fsync" else []))
        try:
            broker.start(timeout=60)
            assert broker.proc
            pid = broker.proc.pid
            for d in args.doors:
                door: GrpcDoor | RestDoor = GrpcDoor(broker.grpc_target) if d == "grpc" else RestDoor(broker.http_target)
                stream = f"w1-{d}"
                try:
                    if {"w1", "w2"} & set(args.workloads):
                        door.create_stream(stream, wl.PARTITIONS)
                    if "w1" in args.workloads:
                        if d not in bodies:   # the same bytes for both durability modes
                            bodies[d] = door.bodies(stream, data)
                        _say(f"Sluice {door.name}/{durability}: W1 put {data.records:,} records")
                        rows.append(w1(door, durability, stream, bodies[d], data, pid))
                        _say("  " + _brief(rows[-1]))
                    if "w2" in args.workloads:
                        _say(f"Sluice {door.name}/{durability}: W2 read")
                        rows.append(w2(door, durability, stream, pid))
                        _say("  " + _brief(rows[-1]))
                    if "w3" in args.workloads:
                        _say(f"Sluice {door.name}/{durability}: W3 tail {args.w3_seconds:g} s per mode")
                        rows.extend(w3(door.name, durability, broker.grpc_target, broker.http_target,
                                       args.w3_seconds, pid))
                        _say("  " + "; ".join(_brief(r) for r in rows[-2:] if r.workload.startswith("W3")))
                except Exception as exc:
                    rows.append(wl.Row(SYSTEM, door.name, durability, "error", ok=False,
                                       note=f"{type(exc).__name__}: {exc}"[:300]))
                    _say(f"  error: {rows[-1].note}")
                finally:
                    door.close()
        finally:
            try:
                broker.stop(60)
            except subprocess.TimeoutExpired:
                broker.kill()
            except AssertionError:
                pass
            shutil.rmtree(tmp, ignore_errors=True)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _brief(r: wl.Row) -> str:
    if r.workload.startswith("W3"):
        s = f"{r.workload}: p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms"
    else:
        s = f"{r.workload}: {r.rate:,.0f} rec/s"
    return s + f" (client cpu {r.client_cpu_s:.2f} s, server cpu {r.server_cpu_s:.2f} s, wall {r.seconds:.2f} s)" + \
        ("" if r.ok else f" FAIL {r.note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {wl.QUICK['w1_records']:,} W1 records, W3 {wl.QUICK['w3_seconds']:g} s per mode")
    p.add_argument("--doors", default="grpc,rest", help="comma-separated: grpc, rest (default both)")
    p.add_argument("--durability", default="wal,fsync", help="comma-separated: wal, fsync (default both)")
    p.add_argument("--workloads", default="w1,w2,w3", help="comma-separated: w1, w2, w3 (w2 reads what w1 wrote)")
    p.add_argument("--records", type=int, help=f"W1 records (default {wl.W1_RECORDS:,})")
    p.add_argument("--w3-seconds", type=float, help=f"W3 seconds per mode (default {wl.W3_SECONDS:g})")
    p.add_argument("--compare", action="store_true",
                   help="also run NATS JetStream and kinesalite (installed: see make bench-compare)")
    p.add_argument("--peers", default="nats,kinesalite", help="with --compare: comma-separated nats, kinesalite")
    p.add_argument("--no-sluice", action="store_true", help="with --compare: only the peers")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)

    def split(value: str, allowed: set[str], flag: str) -> list[str]:
        items = [x.strip().lower() for x in value.split(",") if x.strip()]
        if not items or set(items) - allowed:
            p.error(f"{flag} takes {', '.join(sorted(allowed))}")
        return items

    args.doors = split(args.doors, {"grpc", "rest"}, "--doors")
    args.durability = split(args.durability, {"wal", "fsync"}, "--durability")
    args.workloads = split(args.workloads, {"w1", "w2", "w3"}, "--workloads")
    args.peers = split(args.peers, {"nats", "kinesalite"}, "--peers")
    if "w2" in args.workloads and "w1" not in args.workloads:
        p.error("w2 reads what w1 wrote: add w1")
    args.records = args.records or (wl.QUICK["w1_records"] if args.quick else wl.W1_RECORDS)
    args.w3_seconds = args.w3_seconds or (wl.QUICK["w3_seconds"] if args.quick else wl.W3_SECONDS)
    if args.records < 1 or args.w3_seconds <= 0:
        p.error("--records and --w3-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    _say(f"building the W1 data set: {args.records:,} records x {wl.RECORD_SIZE} B, seed {wl.SEED}")
    data = wl.make_dataset(args.records)
    rows: list[wl.Row] = []
    if not args.no_sluice:
        run_sluice(args, data, rows)
    if args.compare:
        import peers   # noqa: PLC0415 - only with --compare (needs nats-py, nats-server, kinesalite)
        rows.extend(peers.run_peers(args, data))
    title = (f"W1: {args.records:,} records x {wl.RECORD_SIZE} B, keys from {wl.KEY_IDS:,} ids, {wl.PARTITIONS} partitions, "
             f"batches of {wl.BATCH}, {wl.PRODUCERS} producers; W2: read back from TRIM_HORIZON, 1 reader/partition; "
             f"W3: 1 record / {wl.W3_INTERVAL_S * 1000:g} ms for {args.w3_seconds:g} s")
    print(title)
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f}; started {started:%Y-%m-%d %H:%M:%S} UTC")
    print(wl.format_table(rows))
    rs = wl.ratios(rows)
    if rs:
        print("\nSluice (WAL) / peer:")
        print(wl.format_ratios(rs))
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv],
        "cpus": os.cpu_count(), "loadavg_before": load_before,
        "config": {"records": args.records, "record_size": wl.RECORD_SIZE, "key_ids": wl.KEY_IDS,
                   "partitions": wl.PARTITIONS, "batch": wl.BATCH, "producers": wl.PRODUCERS, "seed": wl.SEED,
                   "w3_interval_s": wl.W3_INTERVAL_S, "w3_seconds": args.w3_seconds, "doors": args.doors,
                   "durability": args.durability, "workloads": args.workloads, "compare": args.compare},
        "rows": [r.as_dict() for r in rows],
        "ratios": [{"figure": f, "peer": p, "sluice": s, "peer_value": v, "ratio": r} for f, p, s, v, r in rs],
    }, indent=1))
    print(f"\nresults: {path}")
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
