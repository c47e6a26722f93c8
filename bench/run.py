#!/usr/bin/env python3
"""Sluice's benchmark, the one entry point: the W1/W2/W3 suite of issue 4 against Sluice through
the gRPC and the DIS REST doors in both durability modes (WAL: the broker's default; fsync:
`--fsync`), optionally against NATS JetStream and kinesalite in the same run, and the broker's
memory over a long W1 loop; (`timeplus`) the Timeplus door's T1-T4 of issue 8, with ClickHouse's
HTTP insert beside T1; and (`sources`) rows/s from a JetStream source into Sluice beside a plain
nats-py pull consumer. See bench/README.md.

    .venv/bin/python bench/run.py                      # W1/W2/W3, both doors, WAL and fsync (make bench)
    .venv/bin/python bench/run.py --quick              # small counts: a smoke run
    .venv/bin/python bench/run.py --doors grpc --durability wal --workloads w1,w2
    .venv/bin/python bench/run.py --workloads w3 --durability wal     # tail latency only
    .venv/bin/python bench/run.py --compare            # + the peers (make bench-compare installs them)
    .venv/bin/python bench/run.py --grpc HOST:PORT --http HOST:PORT   # a broker already running
    .venv/bin/python bench/run.py --store rocksdb,jetstream --durability wal --compare --peers nats \
        --doors grpc --workloads w1,w2                 # Sluice on RocksDB and on JetStream (R=1), nats-py direct
    .venv/bin/python bench/run.py memory               # broker RSS, 1,000,000 records + 5 min (make bench-memory)
    .venv/bin/python bench/run.py timeplus             # Timeplus door T1-T4, ClickHouse beside T1 (make bench-timeplus)
    .venv/bin/python bench/run.py timeplus --quick --workloads t1,t2,t3 --clickhouse no   # a smoke run
    .venv/bin/python bench/run.py sources              # a JetStream source into Sluice, 1 KiB JSON (make bench-sources)
    .venv/bin/python bench/run.py sources --quick --ack-policy both                     # a smoke run
    .venv/bin/python bench/run.py core                 # the core's put -> notify -> push, in process (issue 14)
    .venv/bin/python bench/run.py cluster              # W1/W2 through 2 brokers on a 3-node JetStream (R=3), beside
                                                       # the embedded store and nats-py direct (issue 13)
    .venv/bin/python bench/run.py tsdb --peers yes     # OpenTSDB door: /api/put points/s, /api/query latency,
                                                       # VictoriaMetrics and InfluxDB beside (make bench-tsdb)

Modules: bench/workloads.py holds the workloads (the clocks, CPU meters, data set, verdicts and
tables), bench/drivers.py a driver per door of each system (the only code here that speaks a wire
protocol) and the servers; this file parses the command line, starts the servers, runs the
workloads on each driver and writes the table and bench/results/<UTC time>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import drivers  # noqa: E402 - after the sys.path line above
import workloads as wl  # noqa: E402

COMMANDS = ("suite", "memory", "timeplus", "sources", "tsdb", "core", "cluster")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _brief(r: wl.Row) -> str:
    if r.workload == "error":
        return f"error: {r.note}"
    if r.workload.startswith("W3"):
        s = f"{r.workload}: p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms"
    else:
        s = f"{r.workload}: {r.rate:,.0f} rec/s"
    return s + f" (client cpu {r.client_cpu_s:.2f} s, server cpu {r.server_cpu_s:.2f} s, wall {r.seconds:.2f} s)" + \
        ("" if r.ok else f" FAIL {r.note}")


def _results_path(args: argparse.Namespace, started: dt.datetime, prefix: str = "") -> Path:
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{prefix}{started:%Y%m%dT%H%M%SZ}.json"


# -- the suite: W1/W2/W3 -----------------------------------------------------------------------

def run_driver(driver: Any, args: argparse.Namespace, data: wl.Dataset, bodies: dict[Any, list[Any]],
               w1_stream: str, w3_stream: str) -> list[wl.Row]:
    """The chosen workloads on one door: W1 into w1_stream, W2 reads it back, W3 on w3_stream."""
    name = f"{driver.system} {driver.door}/{driver.durability}"
    rows: list[wl.Row] = []
    try:
        if {"w1", "w2"} & set(args.workloads):
            driver.create_stream(w1_stream, wl.PARTITIONS)
        if "w1" in args.workloads:
            key = (type(driver), w1_stream)
            if key not in bodies:   # the same bytes for both durability modes
                bodies[key] = driver.bodies(w1_stream, data)
            _say(f"{name}: W1 put {data.records:,} records")
            rows.append(wl.w1(driver, w1_stream, bodies[key], data))
            _say("  " + _brief(rows[-1]))
        if "w2" in args.workloads:
            _say(f"{name}: W2 read")
            rows.append(wl.w2(driver, w1_stream, data.records))
            _say("  " + _brief(rows[-1]))
        if "w3t" in args.workloads:
            _say(f"{name}: W3t tail (threads) {args.w3_seconds:g} s per mode")
            w3_rows = wl.w3t(driver, w3_stream + "t", args.w3_seconds, args.w3_rate)
            rows.extend(w3_rows)
            _say("  " + "; ".join(_brief(r) for r in w3_rows))
    except Exception as exc:
        rows.append(wl.Row(driver.system, driver.door, driver.durability, "error", ok=False,
                           note=f"{type(exc).__name__}: {exc}"[:300]))
        _say(f"  error: {rows[-1].note}")
    return rows


def run_sluice_on_jetstream(args: argparse.Namespace, data: wl.Dataset) -> list[wl.Row]:
    """One broker with --store jetstream on a fresh single-node nats-server (R=1), every door on it;
    the CPU split of broker and nats-server over all its workloads is printed after."""
    rows: list[wl.Row] = []
    try:
        with drivers.nats_server(max_payload_mb=8) as nats_srv, drivers.sluice_broker("wal", extra=(
                "--store", "jetstream", "--nats-servers", nats_srv.url, "--replicas", "1")) as broker:
            assert broker.proc
            before = (wl.proc_cpu_seconds(broker.proc.pid), wl.proc_cpu_seconds(nats_srv.pid))
            rows += run_sluice_doors(args, data, {}, broker.grpc_target, broker.http_target, JETSTREAM_MODE,
                                     broker.proc.pid, "")
            args.jetstream_cpu = (wl.proc_cpu_seconds(broker.proc.pid) - before[0],
                                  wl.proc_cpu_seconds(nats_srv.pid) - before[1])
    except RuntimeError as exc:   # the broker or nats-server did not start
        rows.append(wl.Row("Sluice", "-", JETSTREAM_MODE, "error", ok=False, note=str(exc)[:300]))
        _say(f"Sluice/{JETSTREAM_MODE}: {exc}")
    return rows


JETSTREAM_MODE = "jetstream R=1"


def jetstream_ratios(rows: list[wl.Row]) -> list[str]:
    """Sluice on JetStream / JetStream driven directly by nats-py, W1 and W2 (issue 13: W1 >= 0.7x)."""
    out = []
    for workload in ("W1 put", "W2 read"):
        s = [r.rate for r in rows if r.system == "Sluice" and r.durability == JETSTREAM_MODE and r.ok
             and r.workload == workload and r.door == "gRPC"]
        p = [r.rate for r in rows if r.system == drivers.Nats.system and r.ok and r.workload == workload]
        if s and p and p[0] > 0:
            out.append(f"| {workload} rec/s (gRPC) | {s[0]:,.0f} | {p[0]:,.0f} | {s[0] / p[0]:.2f} |")
    return out


SKIPPED: list[str] = []   # produce modes a tree lacks (printed under the W3/W6 table and in the JSON)


def run_trickle(driver: Any, args: argparse.Namespace, w3_stream: str, w6_stream: str) -> list[wl.Row]:
    """W3 (asyncio, open loop) and W6 on an asyncio driver (drivers.AioSluice, AioNats), every
    produce mode it has."""
    name = f"{driver.system} {driver.door}/{driver.durability}"
    rows: list[wl.Row] = []
    for _mode, label, why in driver.missing:
        SKIPPED.append(f"{name} {label}: not run, {why}")
        _say(f"  {SKIPPED[-1]}")
    try:
        if "w3" in args.workloads:
            _say(f"{name}: W3 push (asyncio, open loop) {args.w3_seconds:g} s per produce mode")
            got = wl.w3_open(driver, w3_stream, args.w3_seconds, args.w3_rate)
            rows.extend(got)
            _say("  " + "; ".join(_brief(r) for r in got))
        if "w6" in args.workloads:
            _say(f"{name}: W6 {args.w6_producers} producers x {args.w6_rate:g} requests/s for {args.w6_seconds:g} s "
                 "per produce mode")
            got = wl.w6(driver, w6_stream, args.w6_seconds, args.w6_producers, args.w6_rate)
            rows.extend(got)
            _say("  " + "; ".join(_brief(r) for r in got))
    except Exception as exc:  # a failure is reported, not raised
        rows.append(wl.Row(driver.system, driver.door, driver.durability, "error", ok=False,
                           note=f"{type(exc).__name__}: {exc}"[:300]))
        _say(f"  error: {rows[-1].note}")
    return rows


def run_sluice(args: argparse.Namespace, data: wl.Dataset) -> list[wl.Row]:
    """One fresh broker per durability mode (or the running one of --grpc/--http), every door on it."""
    rows: list[wl.Row] = []
    if "jetstream" in args.store:
        rows += run_sluice_on_jetstream(args, data)
    if "rocksdb" not in args.store:
        return rows
    bodies: dict[Any, list[Any]] = {}
    for durability in args.durability:
        if args.grpc:   # a broker of someone else's: fresh stream names, its CPU is not ours to read
            suffix = f"-{uuid.uuid4().hex[:8]}"
            rows += run_sluice_doors(args, data, bodies, args.grpc, args.http, "external", None, suffix)
            continue
        try:
            with drivers.sluice_broker(durability) as broker:
                assert broker.proc
                rows += run_sluice_doors(args, data, bodies, broker.grpc_target, broker.http_target, durability,
                                         broker.proc.pid, "")
        except RuntimeError as exc:   # the broker did not start (its log tail is in the message)
            rows.append(wl.Row("Sluice", "-", durability, "error", ok=False, note=str(exc)[:300]))
            _say(f"Sluice/{durability}: {exc}")
    return rows


def run_sluice_doors(args: argparse.Namespace, data: wl.Dataset, bodies: dict[Any, list[Any]], grpc_target: str,
                     http_target: str | None, durability: str, pid: int | None, suffix: str) -> list[wl.Row]:
    rows: list[wl.Row] = []
    grpc_door = drivers.SluiceGrpc(grpc_target, durability, pid)
    try:
        for d in args.doors:
            driver = grpc_door if d == "grpc" else drivers.SluiceRest(http_target or "", grpc_door)
            rows += run_driver(driver, args, data, bodies, f"w1-{d}{suffix}", f"w3-{d}{suffix}")
    finally:
        grpc_door.close()
    if {"w3", "w6"} & set(args.workloads) and "grpc" in args.doors:
        rows += run_trickle(drivers.AioSluice(grpc_target, durability, pid), args, f"w3a{suffix}", f"w6{suffix}")
    return rows


def run_peers(args: argparse.Namespace, data: wl.Dataset) -> list[wl.Row]:
    rows: list[wl.Row] = []
    for peer in args.peers:
        try:
            with drivers.PEERS[peer]() as driver:
                rows += run_driver(driver, args, data, {}, "w1", "w3")
                if {"w3", "w6"} & set(args.workloads) and hasattr(driver, "aio"):
                    rows += run_trickle(driver.aio(), args, "w3a", "w6")
        except Exception as exc:
            rows.append(wl.Row(*drivers.PEER_NAMES[peer], "error", ok=False, note=f"{type(exc).__name__}: {exc}"[:300]))
            _say(f"{peer}: error: {rows[-1].note}")
    return rows


def parse_suite(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py [suite]", description=__doc__.split("\n\n")[0],
                                epilog="The other command: bench/run.py memory --help",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {wl.QUICK['w1_records']:,} W1 records, W3 {wl.QUICK['w3_seconds']:g} s per mode")
    p.add_argument("--doors", default="grpc,rest", help="comma-separated: grpc, rest (default both)")
    p.add_argument("--durability", default="wal,fsync", help="comma-separated: wal, fsync (default both)")
    p.add_argument("--workloads", default="w1,w2,w3,w6,w3t",
                   help="comma-separated: w1, w2, w3, w6, w3t (w2 reads what w1 wrote; w3 and w6 are gRPC only)")
    p.add_argument("--records", type=int, help=f"W1 records (default {wl.W1_RECORDS:,})")
    p.add_argument("--w3-seconds", type=float, help=f"W3 seconds per mode (default {wl.W3_SECONDS:g})")
    p.add_argument("--w3-rate", type=float, default=1 / wl.W3_INTERVAL_S,
                   help=f"W3 records per second (default {1 / wl.W3_INTERVAL_S:g})")
    p.add_argument("--w6-seconds", type=float, help=f"W6 seconds per produce mode (default {wl.W6_SECONDS:g})")
    p.add_argument("--w6-producers", type=int, default=wl.W6_PRODUCERS,
                   help=f"W6 concurrent producers (default {wl.W6_PRODUCERS})")
    p.add_argument("--w6-rate", type=float, default=wl.W6_RATE,
                   help=f"W6 requests per second per producer (default {wl.W6_RATE:g})")
    p.add_argument("--compare", action="store_true",
                   help="also run NATS JetStream and kinesalite (installed: see make bench-compare)")
    p.add_argument("--peers", default="nats,kinesalite", help="with --compare: comma-separated nats, kinesalite")
    p.add_argument("--no-sluice", action="store_true", help="with --compare: only the peers")
    p.add_argument("--grpc", metavar="HOST:PORT", help="a running broker's gRPC door instead of fresh brokers")
    p.add_argument("--http", metavar="HOST:PORT", help="with --grpc: that broker's REST door")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    p.add_argument("--store", default="rocksdb",
                   help="comma-separated: rocksdb (default; a broker per --durability mode), jetstream (one broker "
                        "with --store jetstream on a fresh single-node nats-server, R=1); with --compare --peers "
                        "nats the same W1/W2 driven directly by nats-py run beside them")
    args = p.parse_args(argv)
    args.jetstream_cpu = None

    def split(value: str, allowed: set[str], flag: str) -> list[str]:
        items = [x.strip().lower() for x in value.split(",") if x.strip()]
        if not items or set(items) - allowed:
            p.error(f"{flag} takes {', '.join(sorted(allowed))}")
        return items

    args.doors = split(args.doors, {"grpc", "rest"}, "--doors")
    args.durability = split(args.durability, {"wal", "fsync"}, "--durability")
    args.workloads = split(args.workloads, {"w1", "w2", "w3", "w6", "w3t"}, "--workloads")
    args.peers = split(args.peers, set(drivers.PEERS), "--peers")
    if "w2" in args.workloads and "w1" not in args.workloads:
        p.error("w2 reads what w1 wrote: add w1")
    args.records = args.records or (wl.QUICK["w1_records"] if args.quick else wl.W1_RECORDS)
    args.w3_seconds = args.w3_seconds or (wl.QUICK["w3_seconds"] if args.quick else wl.W3_SECONDS)
    args.w6_seconds = args.w6_seconds or (wl.QUICK["w6_seconds"] if args.quick else wl.W6_SECONDS)
    if args.records < 1 or args.w3_seconds <= 0 or args.w3_rate <= 0 or args.w6_seconds <= 0 \
            or args.w6_producers < 1 or args.w6_rate <= 0:
        p.error("--records, --w3-seconds, --w3-rate, --w6-seconds, --w6-producers and --w6-rate must be positive")
    if args.http and not args.grpc:
        p.error("--http needs --grpc (the REST door's W3 producer is gRPC)")
    args.store = split(args.store, {"rocksdb", "jetstream"}, "--store")
    if "jetstream" in args.store and args.grpc:
        p.error("--store jetstream starts its own broker: not with --grpc")
    if args.grpc:
        if "rest" in args.doors and not args.http:
            p.error("with --grpc, the rest door needs --http (or --doors grpc)")
        args.http = args.http.removeprefix("http://").rstrip("/") if args.http else None
        args.durability = ["external"]
    return args


def suite_main(argv: list[str]) -> int:
    args = parse_suite(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    _say(f"building the W1 data set: {args.records:,} records x {wl.RECORD_SIZE} B, seed {wl.SEED}")
    data = wl.make_dataset(args.records)
    rows: list[wl.Row] = []
    if not args.no_sluice:
        rows += run_sluice(args, data)
    if args.compare:
        rows += run_peers(args, data)
    title = (f"W1: {args.records:,} records x {wl.RECORD_SIZE} B, keys from {wl.KEY_IDS:,} ids, "
             f"{wl.PARTITIONS} partitions, batches of {wl.BATCH}, {wl.PRODUCERS} producers; "
             f"W2: read back from TRIM_HORIZON, 1 reader/partition; "
             f"W3: 1 record / {1000 / args.w3_rate:g} ms for {args.w3_seconds:g} s")
    print(title)
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f}; started {started:%Y-%m-%d %H:%M:%S} UTC"
          + (f"; broker: external grpc={args.grpc}" + (f" http={args.http}" if args.http else "") if args.grpc else ""))
    print(wl.format_table(rows))
    trickle = wl.trickle_table(rows)
    checks = wl.trickle_verdicts(rows)
    if trickle:
        print(f"\nW3 (asyncio, open loop, 1 record / {1000 / args.w3_rate:g} ms for {args.w3_seconds:g} s, push "
              "consumer) "
              f"and W6 ({args.w6_producers} producers x {args.w6_rate:g} requests/s of 1 record for "
              f"{args.w6_seconds:g} s), side by side:")
        print(trickle)
        for line in SKIPPED:
            print(line)
    if checks:
        print()
        print(wl.format_verdicts(checks))
    rs = wl.ratios(rows)
    if rs:
        print("\nSluice (WAL) / peer:")
        print(wl.format_ratios(rs))
    js_ratios = jetstream_ratios(rows)
    if js_ratios:
        print("\nSluice on JetStream / JetStream direct (nats-py):")
        print("| figure | Sluice on JetStream | JetStream direct | ratio |\n|---|---|---|---|")
        print("\n".join(js_ratios))
    if args.jetstream_cpu:
        print(f"\nSluice on JetStream, CPU over all its workloads: broker {args.jetstream_cpu[0]:.2f} s, "
              f"nats-server {args.jetstream_cpu[1]:.2f} s")
    path = _results_path(args, started)
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv],
        "cpus": os.cpu_count(), "loadavg_before": load_before,
        "config": {"records": args.records, "record_size": wl.RECORD_SIZE, "key_ids": wl.KEY_IDS,
                   "partitions": wl.PARTITIONS, "batch": wl.BATCH, "producers": wl.PRODUCERS, "seed": wl.SEED,
                   "w3_interval_s": 1 / args.w3_rate, "w3_seconds": args.w3_seconds,
                   "w3_record_size": wl.W3_RECORD_SIZE, "w6_seconds": args.w6_seconds,
                   "w6_producers": args.w6_producers, "w6_rate": args.w6_rate, "doors": args.doors,
                   "durability": args.durability,
                   "workloads": args.workloads, "compare": args.compare,
                   "peers": args.peers if args.compare else [], "external": args.grpc, "store": args.store},
        "jetstream_cpu_s": args.jetstream_cpu,
        "rows": [r.as_dict() for r in rows],
        "ratios": [{"figure": f, "peer": p, "sluice": s, "peer_value": v, "ratio": r} for f, p, s, v, r in rs],
        "verdicts": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks], "skipped": SKIPPED,
    }, indent=1))
    print(f"\nresults: {path}")
    return 0 if rows and all(r.ok for r in rows) else 1


# -- memory ------------------------------------------------------------------------------------

def parse_memory(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py memory",
                                description="Broker RSS with 1,000,000 records stored (W1 over gRPC until then), "
                                            "then over a W1 loop: the memory target of issue 4.")
    p.add_argument("--minutes", type=float, default=wl.MEMORY_MINUTES,
                   help=f"length of the W1 loop (default {wl.MEMORY_MINUTES:g})")
    p.add_argument("--records", type=int, default=wl.MEMORY_RECORDS,
                   help=f"records stored before the first reading (default {wl.MEMORY_RECORDS:,})")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    p.add_argument("--store", default="rocksdb",
                   help="comma-separated: rocksdb (default; a broker per --durability mode), jetstream (one broker "
                        "with --store jetstream on a fresh single-node nats-server, R=1); with --compare --peers "
                        "nats the same W1/W2 driven directly by nats-py run beside them")
    args = p.parse_args(argv)
    args.jetstream_cpu = None
    if args.minutes <= 0 or args.records < 1:
        p.error("--minutes and --records must be positive")
    return args


def memory_main(argv: list[str]) -> int:
    """One fresh broker with default settings, one 4-partition stream, W1 over gRPC as the suite
    runs it (the same pre-built requests every round, new connections per producer per round)."""
    args = parse_memory(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill` also stops the broker, like Ctrl-C
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    overrides = {k: v for k, v in os.environ.items() if k.startswith("SLUICE_")}
    if overrides:   # BrokerProcess passes our environment on: these change the broker's settings
        _say(f"warning: SLUICE_* variables set, the broker does not run with default settings: {overrides}")
    _say(f"building the W1 data set: {wl.W1_RECORDS:,} records x {wl.RECORD_SIZE} B, seed {wl.SEED}")
    data = wl.make_dataset(wl.W1_RECORDS)
    stream = "memory-w1"
    try:
        with drivers.sluice_broker("wal") as broker:
            assert broker.proc
            driver = drivers.SluiceGrpc(broker.grpc_target, "wal", broker.proc.pid)
            try:
                bodies = driver.bodies(stream, data)   # the same requests every round
                driver.create_stream(stream, wl.PARTITIONS)
                res = wl.memory(driver, stream, bodies, data.records, args.records, args.minutes,
                                broker.data_dir, _say)
            except Exception as exc:
                _say(f"error: {type(exc).__name__}: {exc}")
                if broker.stderr_lines:
                    _say("broker log (tail):\n" + "".join(broker.stderr_lines[-20:]))
                return 1
            finally:
                driver.close()
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except RuntimeError as exc:   # the broker did not start (its log tail is in the message)
        _say(f"error: {exc}")
        return 1

    checks = wl.memory_verdicts(res, args.minutes)
    print(f"Broker memory: W1 over gRPC ({data.records:,} records x {wl.RECORD_SIZE} B, keys from {wl.KEY_IDS:,} ids, "
          f"{wl.PARTITIONS} partitions, batches of {wl.BATCH}, {wl.PRODUCERS} producers) until {args.records:,} "
          f"stored, then looped for {args.minutes:g} min")
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f}; started {started:%Y-%m-%d %H:%M:%S} UTC")
    print(wl.format_memory(res, checks))
    path = _results_path(args, started, "memory-")
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv],
        "cpus": os.cpu_count(), "loadavg_before": load_before, "broker_args": drivers.BROKER_ARGS,
        "sluice_env": overrides,
        "config": {"records": args.records, "minutes": args.minutes, "w1_records": data.records,
                   "record_size": wl.RECORD_SIZE, "key_ids": wl.KEY_IDS, "partitions": wl.PARTITIONS,
                   "batch": wl.BATCH, "producers": wl.PRODUCERS, "seed": wl.SEED, "sample_s": wl.SAMPLE_S,
                   "settle_s": wl.SETTLE_S},
        "criteria": {"rss_mib_below": wl.TARGET_RSS_MIB, "at_records": wl.MEMORY_RECORDS,
                     "flat_slope_mib_per_min_below": wl.FLAT_SLOPE_MIB_MIN, "flat_growth_mib_below": wl.FLAT_GROWTH_MIB,
                     "slope_over": "second half of the loop"},
        **res,
        "verdicts": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks],
    }, indent=1))
    print(f"\nresults: {path}")
    return 0


# -- timeplus: T1-T4 over the Timeplus door (issue 8), ClickHouse's HTTP insert beside T1 ------

TP_WORKLOADS = ("t1", "t2", "t3", "t4")
T1_TARGET_RATIO = 0.4
T2_TARGET_BEYOND_MS = 10.0
T3_TARGET_RATE = 1_000_000


def parse_timeplus(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py timeplus",
                                description="The Timeplus door's figures (issue 8): T1 compact ingest (and "
                                            "ClickHouse's JSONEachRow insert of the same rows), T2 query delivery "
                                            "latency over SSE, T3 a bounded scan with a filter, T4 broker RSS under a "
                                            "grouped query.")
    q = wl.TP_QUICK
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: T1 {q['t1_rows']:,} rows, T2 {q['t2_seconds']:g} s, T3 {q['t3_rows']:,} rows, "
                        f"T4 {q['t4_minutes']:g} min")
    p.add_argument("--workloads", default=",".join(TP_WORKLOADS), help="comma-separated: t1, t2, t3, t4 (default all)")
    p.add_argument("--rows", type=int, help=f"T1 rows (default {wl.TP_ROWS:,})")
    p.add_argument("--t2-seconds", type=float, help=f"T2 seconds (default {wl.T2_SECONDS:g})")
    p.add_argument("--t3-rows", type=int, help=f"T3 rows stored before the scan (default {wl.T3_ROWS:,})")
    p.add_argument("--minutes", type=float, help=f"T4 minutes (default {wl.T4_MINUTES:g})")
    p.add_argument("--t4-keys", type=int, default=wl.T4_KEYS, help=f"T4 distinct keys (default {wl.T4_KEYS:,})")
    p.add_argument("--t4-rate", type=float, default=wl.T4_RATE, help=f"T4 rows/s fed (default {wl.T4_RATE:,})")
    p.add_argument("--t4-query", choices=sorted(wl.T4_QUERIES), default="tumble",
                   help="T4's query: tumble = " + wl.T4_QUERIES["tumble"].format(s="s") + "; global = "
                        + wl.T4_QUERIES["global"].format(s="s") + " (default tumble)")
    p.add_argument("--t4-control", choices=("yes", "no", "only"), default="yes",
                   help="T4's control first: the same ingest with no query on a broker of its own (the log's own "
                        "growth; the verdict judges the query's slope minus the control's); only = the control alone "
                        "(default yes)")
    p.add_argument("--clickhouse", choices=("auto", "yes", "no"), default="auto",
                   help="T1 into ClickHouse too: auto = if clickhouse-server is installed (default)")
    p.add_argument("--clickhouse-engine", choices=("MergeTree", "Memory"), default="MergeTree",
                   help="the ClickHouse table's engine (default MergeTree: stored parts, like Sluice's log)")
    p.add_argument("--http", metavar="HOST:PORT", help="a running broker's HTTP port instead of fresh brokers")
    p.add_argument("--pid", type=int, help="with --http: the broker's pid (server CPU; T4 needs it)")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    p.add_argument("--store", default="rocksdb",
                   help="comma-separated: rocksdb (default; a broker per --durability mode), jetstream (one broker "
                        "with --store jetstream on a fresh single-node nats-server, R=1); with --compare --peers "
                        "nats the same W1/W2 driven directly by nats-py run beside them")
    args = p.parse_args(argv)
    args.jetstream_cpu = None
    items = [x.strip().lower() for x in args.workloads.split(",") if x.strip()]
    if not items or set(items) - set(TP_WORKLOADS):
        p.error(f"--workloads takes {', '.join(TP_WORKLOADS)}")
    args.workloads = items
    args.rows = args.rows or (q["t1_rows"] if args.quick else wl.TP_ROWS)
    args.t2_seconds = args.t2_seconds or (q["t2_seconds"] if args.quick else wl.T2_SECONDS)
    args.t3_rows = args.t3_rows or (q["t3_rows"] if args.quick else wl.T3_ROWS)
    args.minutes = args.minutes or (q["t4_minutes"] if args.quick else wl.T4_MINUTES)
    if min(args.rows, args.t3_rows, args.t4_keys) < 1 or min(args.t2_seconds, args.minutes, args.t4_rate) <= 0:
        p.error("--rows, --t2-seconds, --t3-rows, --minutes, --t4-keys and --t4-rate must be positive")
    if args.pid and not args.http:
        p.error("--pid goes with --http")
    if args.http and "t4" in args.workloads and not args.pid:
        p.error("t4 on a running broker needs its --pid (its RSS is the figure)")
    if args.http:
        args.http = args.http.removeprefix("http://").rstrip("/")
    return args


def _tp_error(system: str, door: str, durability: str, workload: str, exc: BaseException) -> wl.Row:
    row = wl.Row(system, door, durability, workload, ok=False, note=f"{type(exc).__name__}: {exc}"[:300])
    _say(f"  {workload}: error: {row.note}")
    return row


def _tp_brief(r: wl.Row) -> str:
    if r.workload.startswith("T2"):
        s = f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms max {r.extra.get('max_ms', float('nan')):.2f} ms"
    elif r.workload.startswith("T4"):
        s = (f"VmRSS start {r.extra['rss_start_mib']:.1f} max {r.extra['rss_max_mib']:.1f} "
             f"end {r.extra['rss_end_mib']:.1f} MiB, 2nd-half slope {r.extra['slope_second_half_mib_per_min']:+.2f} "
             f"MiB/min, minute medians {' '.join(f'{m:.0f}' for m in r.extra['rss_minute_medians_mib'])}, "
             f"{r.extra['result_rows']:,} result rows")
    else:
        s = f"{r.rate:,.0f} rows/s"
    return f"{r.workload}: {s} (wall {r.seconds:.2f} s)" + ("" if r.ok else f" FAIL {r.note}")


def run_timeplus_sluice(driver: drivers.TimeplusRest, args: argparse.Namespace, data: list[list[Any]],
                        suffix: str) -> list[wl.Row]:
    """T1, T2, T3 (those chosen) on one broker's Timeplus door."""
    rows: list[wl.Row] = []
    columns = [c for c, _ in wl.TP_SCHEMA]
    steps: list[tuple[str, str, Callable[[], wl.Row]]] = []
    if "t1" in args.workloads:
        def t1() -> wl.Row:
            stream = f"t1_ingest{suffix}"
            driver.create_table(stream, wl.TP_SCHEMA)
            bodies = driver.bodies(stream, columns, data[:args.rows], wl.TP_BATCH)
            return wl.t1(driver, stream, bodies, args.rows)
        steps.append(("t1", f"T1 ingest {args.rows:,} rows", t1))
    if "t2" in args.workloads:
        steps.append(("t2", f"T2 query delivery, {args.t2_seconds:g} s",
                      lambda: wl.t2(driver, f"t2_latency{suffix}", args.t2_seconds)))
    if "t3" in args.workloads:
        def t3() -> wl.Row:
            bodies = driver.bodies("", columns, data[:args.t3_rows], wl.T3_BATCH)
            return wl.t3(driver, f"t3_scan{suffix}", bodies, data[:args.t3_rows])
        steps.append(("t3", f"T3 bounded scan of {args.t3_rows:,} rows", t3))
    for key, label, step in steps:
        _say(f"Sluice Timeplus: {label}")
        try:
            rows.append(step())
            _say("  " + _tp_brief(rows[-1]))
        except Exception as exc:  # a failure is reported, not raised
            rows.append(_tp_error(driver.system, driver.door, driver.durability, key.upper(), exc))
    return rows


def run_timeplus_t4(driver: drivers.TimeplusRest, args: argparse.Namespace, suffix: str,
                    control: bool = False) -> tuple[wl.Row, Any]:
    """T4 with the chosen query, or (`control`) the same ingest with none."""
    query = None if control else args.t4_query
    try:
        row, res = wl.t4(driver, f"t4_{'control' if control else 'memory'}{suffix}", args.minutes, args.t4_keys,
                         args.t4_rate, query, _say)
        _say("  " + _tp_brief(row))
        return row, res
    except Exception as exc:  # a failure is reported, not raised
        return _tp_error(driver.system, driver.door, driver.durability, "T4 control" if control else "T4", exc), None


def run_timeplus_clickhouse(args: argparse.Namespace, data: list[list[Any]]) -> list[wl.Row]:
    if args.clickhouse == "no" or "t1" not in args.workloads:
        return []
    if args.clickhouse == "auto" and not drivers.clickhouse_exe():
        _say("ClickHouse: clickhouse-server not installed, skipped (make bench-peers installs it)")
        return []
    _say(f"ClickHouse: T1 insert {args.rows:,} rows ({args.clickhouse_engine})")
    try:
        with drivers.clickhouse_server(args.clickhouse_engine) as ch:
            columns = [c for c, _ in wl.TP_SCHEMA]
            ch.create_table("t1_ingest", wl.TP_SCHEMA)
            row = wl.t1(ch, "t1_ingest", ch.bodies("t1_ingest", columns, data[:args.rows], wl.TP_BATCH), args.rows)
            row.extra["version"] = ch.version
            _say("  " + _tp_brief(row))
            return [row]
    except Exception as exc:  # not installed, or would not start: a FAIL row
        return [_tp_error("ClickHouse", "HTTP JSONEachRow", f"{args.clickhouse_engine} (tmpfs)", "T1", exc)]


def timeplus_verdicts(rows: list[wl.Row], t4: dict[str, Any] | None, minutes: float,
                      t4_control: dict[str, Any] | None = None, t4_query: str = "tumble") -> list[tuple[str, str, str]]:
    """issue 8's figures: T1 >= 0.4x ClickHouse, T2 p99 <= time_ms + 10 ms, T3 >= 1M rows/s, T4 flat
    (beyond the control's slope when there is one)."""
    out = []
    get = {(r.system, r.workload): r for r in rows if r.ok}
    s1, c1 = get.get(("Sluice", "T1 ingest")), get.get(("ClickHouse", "T1 ingest"))
    if s1 and c1 and c1.rate > 0:
        ratio = s1.rate / c1.rate
        out.append((f"T1 ingest >= {T1_TARGET_RATIO:g}x ClickHouse's HTTP insert",
                    f"{s1.rate:,.0f} / {c1.rate:,.0f} rows/s = {ratio:.2f}x",
                    "met" if ratio >= T1_TARGET_RATIO else "NOT MET"))
    t2 = get.get(("Sluice", "T2 query (SSE)"))
    if t2:
        limit = drivers.T2_BATCHING["time_ms"] + T2_TARGET_BEYOND_MS
        out.append((f"T2 delivery p99 <= time_ms + {T2_TARGET_BEYOND_MS:g} ms = {limit:g} ms", f"{t2.p99_ms:.2f} ms",
                    "met" if t2.p99_ms <= limit else "NOT MET"))
    t3 = get.get(("Sluice", "T3 scan"))
    if t3:
        judged = t3.records >= wl.T3_ROWS
        out.append((f"T3 bounded scan with a WHERE >= {T3_TARGET_RATE:,} rows/s",
                    f"{t3.rate:,.0f} rows/s over {t3.records:,}",
                    ("met" if t3.rate >= T3_TARGET_RATE else "NOT MET") + ("" if judged else " (not 1M rows)")))
    if t4:
        out.append(wl.t4_verdict(t4, t4_control, t4_query, minutes))
    return out


def timeplus_main(argv: list[str]) -> int:
    args = parse_timeplus(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill` also stops the servers, like Ctrl-C
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    need = max(args.rows if "t1" in args.workloads else 0, args.t3_rows if "t3" in args.workloads else 0)
    _say(f"building the rows: {need:,} x {len(wl.TP_SCHEMA)} columns, seed {wl.SEED}")
    data = wl.make_table_rows(need)
    rows: list[wl.Row] = []
    t4: dict[str, Any] | None = None
    t4_control: dict[str, Any] | None = None
    early = [w for w in args.workloads if w != "t4"]
    t4_phases = [] if "t4" not in args.workloads else \
        {"yes": ["t4-control", "t4"], "no": ["t4"], "only": ["t4-control"]}[args.t4_control]

    def t4_phase(driver: drivers.TimeplusRest, phase: str, suffix: str) -> None:
        nonlocal t4, t4_control
        row, res = run_timeplus_t4(driver, args, suffix, control=phase == "t4-control")
        rows.append(row)
        if phase == "t4-control":
            t4_control = res
        else:
            t4 = res
    try:
        if args.http:   # a broker of someone else's: fresh stream names
            suffix = f"_{uuid.uuid4().hex[:8]}"
            driver = drivers.TimeplusRest(args.http, "external", args.pid)
            if early:
                rows += run_timeplus_sluice(driver, args, data, suffix)
            for t4p in t4_phases:   # one broker: the control's log is still there under the query
                t4_phase(driver, t4p, suffix)
        else:
            for phase in ([early] if early else []) + [[t4p] for t4p in t4_phases]:
                try:   # each T4 run on a broker of its own: its RSS starts from a fresh process
                    with drivers.sluice_broker("wal") as broker:
                        assert broker.proc
                        driver = drivers.TimeplusRest(broker.http_target, "wal", broker.proc.pid)
                        if phase[0].startswith("t4"):
                            t4_phase(driver, phase[0], "")
                        else:
                            rows += run_timeplus_sluice(driver, args, data, "")
                        if not all(r.ok for r in rows) and broker.stderr_lines:
                            _say("broker log (tail):\n" + "".join(broker.stderr_lines[-20:]))
                except RuntimeError as exc:   # the broker did not start (its log tail is in the message)
                    rows.append(_tp_error("Sluice", "Timeplus", "wal", "broker", exc))
        rows += run_timeplus_clickhouse(args, data)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130

    checks = timeplus_verdicts(rows, t4, args.minutes, t4_control, args.t4_query)
    print(f"Timeplus door: T1 {args.rows:,} rows x {len(wl.TP_SCHEMA)} columns "
          f"({', '.join(t for _, t in wl.TP_SCHEMA)}), compact bodies of {wl.TP_BATCH} rows, {wl.PRODUCERS} producers; "
          f"T2 1 row / {wl.W3_INTERVAL_S * 1000:g} ms for {args.t2_seconds:g} s, batching {drivers.T2_BATCHING}; "
          f"T3 table() scan of {args.t3_rows:,} rows keeping i < {wl.T3_CUT:,}; T4 {args.t4_query} over "
          f"{args.t4_keys:,} keys at {args.t4_rate:,.0f} rows/s for {args.minutes:g} min"
          + {"yes": ", after a control without the query", "no": "", "only": " (the control only: no query)"}[
              args.t4_control])
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f}; started {started:%Y-%m-%d %H:%M:%S} UTC"
          + (f"; broker: external http={args.http}" if args.http else ""))
    print(wl.format_table(rows))
    if checks:
        print()
        print(wl.format_verdicts(checks))
    path = _results_path(args, started, "timeplus-")
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv],
        "cpus": os.cpu_count(), "loadavg_before": load_before, "broker_args": drivers.BROKER_ARGS,
        "config": {"t1_rows": args.rows, "schema": wl.TP_SCHEMA, "batch": wl.TP_BATCH, "producers": wl.PRODUCERS,
                   "seed": wl.SEED, "t2_seconds": args.t2_seconds, "t2_interval_s": wl.W3_INTERVAL_S,
                   "t2_batching": drivers.T2_BATCHING, "t3_rows": args.t3_rows, "t3_batch": wl.T3_BATCH,
                   "t3_cut": wl.T3_CUT, "t3_batching": wl.T3_BATCHING, "t4_minutes": args.minutes,
                   "t4_keys": args.t4_keys, "t4_rate": args.t4_rate, "t4_query": args.t4_query,
                   "t4_batching": wl.T4_BATCHING, "t4_control": args.t4_control, "workloads": args.workloads,
                   "clickhouse": args.clickhouse,
                   "clickhouse_engine": args.clickhouse_engine, "external": args.http},
        "rows": [r.as_dict() for r in rows],
        "t4": t4,
        "t4_control": t4_control,
        "verdicts": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks],
    }, indent=1))
    print(f"\nresults: {path}")
    return 0 if rows and all(r.ok for r in rows) else 1


# -- sources: rows/s from a JetStream source into Sluice (issue 9), a plain pull consumer beside ---

S1_ACK_POLICIES = ("explicit", "all")


def parse_sources(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py sources",
                                description="S1: a JetStream stream filled with 1 KiB JSON messages before the clock, "
                                            "drained into a Sluice stream by a nats_jetstream source (rows/s until "
                                            "the source wrote them all), and for comparison by a plain nats-py pull "
                                            "consumer (fetch + ack) in the same run.")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {wl.S1_QUICK:,} messages")
    p.add_argument("--messages", type=int, help=f"messages in the stream (default {wl.S1_MESSAGES:,})")
    p.add_argument("--max-ack-pending", type=int, default=1024,
                   help="the consumers' max_ack_pending (default 1024, the source's default; both pull half of it "
                        "per request)")
    p.add_argument("--ack-policy", choices=(*S1_ACK_POLICIES, "both"), default="explicit",
                   help="the durable consumers' ack policy: explicit (what the source creates), all (made before "
                        "the source starts; the source follows it), or both, one after the other (default explicit)")
    p.add_argument("--peer", choices=("yes", "no"), default="yes", help="the nats-py pull consumer too (default yes)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the drains (each policy in turn, a fresh broker each time; default 1)")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    p.add_argument("--store", default="rocksdb",
                   help="comma-separated: rocksdb (default; a broker per --durability mode), jetstream (one broker "
                        "with --store jetstream on a fresh single-node nats-server, R=1); with --compare --peers "
                        "nats the same W1/W2 driven directly by nats-py run beside them")
    args = p.parse_args(argv)
    args.jetstream_cpu = None
    args.messages = args.messages or (wl.S1_QUICK if args.quick else wl.S1_MESSAGES)
    if args.messages < 1 or args.max_ack_pending < 2 or args.rounds < 1:
        p.error("--messages and --rounds must be positive and --max-ack-pending at least 2")
    args.policies = list(S1_ACK_POLICIES) if args.ack_policy == "both" else [args.ack_policy]
    return args


def sources_main(argv: list[str]) -> int:
    args = parse_sources(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill` also stops the servers, like Ctrl-C
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    n, batch = args.messages, max(1, args.max_ack_pending // 2)
    _say(f"building {n:,} JSON messages of {wl.S1_SIZE} B, seed {wl.SEED}")
    payloads = wl.s1_messages(n)
    rows: list[wl.Row] = []
    nats_version = ""
    try:
        with drivers.nats_server() as nats_srv:
            drain = drivers.JetStreamDrain(nats_srv)
            nats_version = drivers.nats_server_version()
            _say(f"NATS: filling JetStream stream S1 with {n:,} messages")
            drain.fill("S1", "s1.data", payloads)
            for rnd in range(args.rounds):
                for policy in args.policies:
                    label = f"S1 drain (ack {policy})"
                    rows.append(_s1_sluice(args, nats_srv, drain, policy, rnd, label))
                    if args.peer == "yes":
                        peer = f"peer_{policy}_{rnd}"
                        drain.add_consumer("S1", peer, policy, args.max_ack_pending)
                        _say(f"nats-py: pull consumer, fetch({batch}) + ack, ack {policy}")
                        try:
                            rows.append(wl.s1_peer(drain, "S1", peer, n, batch, nats_srv.pid, label))
                            _say("  " + _brief_s1(rows[-1]))
                        except Exception as exc:  # a failure is reported, not raised
                            rows.append(_tp_error("nats-py", "pull consumer (fetch+ack)", "-", label, exc))
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except RuntimeError as exc:   # a server did not start
        _say(f"error: {exc}")
        return 1

    print(f"S1: a JetStream stream (file storage, nats-server {nats_version}) holding {n:,} JSON messages of "
          f"{wl.S1_SIZE} B drained into a typed Sluice stream ({', '.join(c + ' ' + t for c, t in wl.S1_SCHEMA)}) by a "
          f"nats_jetstream source (durable pull consumer, max_ack_pending {args.max_ack_pending}, pulls of {batch}, "
          f"ack after the append); peer: a nats-py pull consumer, fetch({batch}) + ack, no Sluice. MB/s = 10^6 "
          f"message bytes/s; server cpu = the broker (Sluice rows) or the nats-server (peer rows)")
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f}; started {started:%Y-%m-%d %H:%M:%S} UTC")
    print(wl.format_table(rows))
    print()
    for policy in args.policies:
        rates = {system: sorted(r.rate for r in rows if r.ok and r.system == system
                                and r.workload == f"S1 drain (ack {policy})") for system in ("Sluice", "nats-py")}
        if rates["Sluice"] and rates["nats-py"]:
            med = {k: statistics.median(v) for k, v in rates.items()}
            print(f"ack {policy}: Sluice's source / nats-py pull consumer alone = {med['Sluice']:,.0f} / "
                  f"{med['nats-py']:,.0f} rows/s = {med['Sluice'] / med['nats-py']:.2f}x"
                  + (f" (medians of {args.rounds} rounds)" if args.rounds > 1 else ""))
    path = _results_path(args, started, "sources-")
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv],
        "cpus": os.cpu_count(), "loadavg_before": load_before, "broker_args": drivers.BROKER_ARGS,
        "config": {"messages": n, "size": wl.S1_SIZE, "schema": wl.S1_SCHEMA, "seed": wl.SEED,
                   "max_ack_pending": args.max_ack_pending, "pull_batch": batch, "ack_policies": args.policies,
                   "rounds": args.rounds,
                   "peer": args.peer, "nats_server": nats_version},
        "rows": [r.as_dict() for r in rows],
    }, indent=1))
    print(f"\nresults: {path}")
    return 0 if rows and all(r.ok for r in rows) else 1


def _s1_sluice(args: argparse.Namespace, nats_srv: drivers.Nats, drain: drivers.JetStreamDrain, policy: str,
               rnd: int, label: str) -> wl.Row:
    """One drain by the source on a fresh broker (so no run inherits another's compactions)."""
    n = args.messages
    consumer = f"sluice_{policy}_{rnd}"
    if policy != "explicit":   # the source follows an existing consumer's policy
        drain.add_consumer("S1", consumer, policy, args.max_ack_pending)
    body = {"name": "s1", "type": "nats_jetstream", "stream": "s1",
            "properties": {"url": nats_srv.url, "stream": "S1", "data_type": "json", "durable": consumer,
                           "max_ack_pending": args.max_ack_pending}}
    _say(f"Sluice: nats_jetstream source, {n:,} messages, ack {policy}")
    try:
        with drivers.sluice_broker("wal") as broker:
            assert broker.proc
            tp = drivers.TimeplusRest(broker.http_target, "wal", broker.proc.pid)
            tp.create_table("s1", wl.S1_SCHEMA)
            try:
                row = wl.s1_sluice(tp, "s1", body, n, nats_srv.pid, label)
            except Exception:
                if broker.stderr_lines:
                    _say("broker log (tail):\n" + "".join(broker.stderr_lines[-20:]))
                raise
        _say("  " + _brief_s1(row))
        return row
    except Exception as exc:  # a failure is reported, not raised
        return _tp_error("Sluice", "nats_jetstream source", "wal", label, exc)


def _brief_s1(r: wl.Row) -> str:
    return (f"{r.workload}: {r.rate:,.0f} rows/s, {r.mb_s:.1f} MB/s (wall {r.seconds:.2f} s, client cpu "
            f"{r.client_cpu_s:.2f} s, server cpu {r.server_cpu_s:.2f} s"
            + (f", nats-server cpu {r.extra['nats_server_cpu_s']:.2f} s" if "nats_server_cpu_s" in r.extra else "")
            + ")" + ("" if r.ok else f" FAIL {r.note}"))


def tsdb_main(argv: list[str]) -> int:
    """The OpenTSDB door's put and query figures, with VictoriaMetrics and InfluxDB (bench/tsdb.py)."""
    import tsdb  # bench/tsdb.py
    return tsdb.main(argv)


def cluster_main(argv: list[str]) -> int:
    """W1/W2 through two brokers on a 3-node JetStream cluster (R=3), beside the embedded store and
    nats-py direct on the same cluster, with the CPU split per process (bench/cluster.py, issue 13)."""
    import cluster  # bench/cluster.py
    return cluster.main(argv)


def core_main(argv: list[str]) -> int:
    """The broker core's share of the trickle path (workloads.core_trickle), in this process."""
    p = argparse.ArgumentParser(prog="bench/run.py core", description=wl.core_trickle.__doc__)
    p.add_argument("--records", type=int, default=wl.CORE_RECORDS, help=f"default {wl.CORE_RECORDS:,}")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    if args.records < 1:
        p.error("--records must be positive")
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    res = wl.core_trickle(args.records)
    print(f"core put -> notify -> push, 1 subscriber, {res['records']:,} single-record puts: "
          f"{res['cpu_us_per_record']:.1f} us CPU/record, {res['wall_us_per_record']:.1f} us wall/record"
          f"{'' if res['in_order'] else ' FAIL: records lost or out of order'} (load average before "
          f"{load_before[0]:.2f})")
    path = _results_path(args, started, "core-")
    path.write_text(json.dumps({"started_utc": started.isoformat(), "loadavg_before": load_before, **res}, indent=1))
    print(f"results: {path}")
    return 0 if res["in_order"] else 1


def main(argv: list[str] | None = None) -> int:
    """`run.py [suite] [options]`, `run.py memory|timeplus|sources|tsdb [options]`; the suite is the
    default command."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else "suite"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    return {"memory": memory_main, "timeplus": timeplus_main, "sources": sources_main,
            "tsdb": tsdb_main, "core": core_main, "cluster": cluster_main}.get(command, suite_main)(rest)


if __name__ == "__main__":
    sys.exit(main())
