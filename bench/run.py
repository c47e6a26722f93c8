#!/usr/bin/env python3
"""Sluice's benchmark, the one entry point: the W1/W2/W3 suite of issue 4 against Sluice through
the gRPC and the DIS REST doors in both durability modes (WAL: the broker's default; fsync:
`--fsync`), optionally against NATS JetStream and kinesalite in the same run, and the broker's
memory over a long W1 loop. See bench/README.md.

    .venv/bin/python bench/run.py                      # W1/W2/W3, both doors, WAL and fsync (make bench)
    .venv/bin/python bench/run.py --quick              # small counts: a smoke run
    .venv/bin/python bench/run.py --doors grpc --durability wal --workloads w1,w2
    .venv/bin/python bench/run.py --workloads w3 --durability wal     # tail latency only
    .venv/bin/python bench/run.py --compare            # + the peers (make bench-compare installs them)
    .venv/bin/python bench/run.py --grpc HOST:PORT --http HOST:PORT   # a broker already running
    .venv/bin/python bench/run.py memory               # broker RSS, 1,000,000 records + 5 min (make bench-memory)

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
import sys
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import drivers
import workloads as wl

COMMANDS = ("suite", "memory")


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
        if "w3" in args.workloads:
            _say(f"{name}: W3 tail {args.w3_seconds:g} s per mode")
            w3_rows = wl.w3(driver, w3_stream, args.w3_seconds, args.w3_rate)
            rows.extend(w3_rows)
            _say("  " + "; ".join(_brief(r) for r in w3_rows))
    except Exception as exc:  # noqa: BLE001 - a failure is reported, not raised
        rows.append(wl.Row(driver.system, driver.door, driver.durability, "error", ok=False,
                           note=f"{type(exc).__name__}: {exc}"[:300]))
        _say(f"  error: {rows[-1].note}")
    return rows


def run_sluice(args: argparse.Namespace, data: wl.Dataset) -> list[wl.Row]:
    """One fresh broker per durability mode (or the running one of --grpc/--http), every door on it."""
    rows: list[wl.Row] = []
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
    return rows


def run_peers(args: argparse.Namespace, data: wl.Dataset) -> list[wl.Row]:
    rows: list[wl.Row] = []
    for peer in args.peers:
        try:
            with drivers.PEERS[peer]() as driver:
                rows += run_driver(driver, args, data, {}, "w1", "w3")
        except Exception as exc:  # noqa: BLE001 - not installed, or would not start: a FAIL row
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
    p.add_argument("--workloads", default="w1,w2,w3", help="comma-separated: w1, w2, w3 (w2 reads what w1 wrote)")
    p.add_argument("--records", type=int, help=f"W1 records (default {wl.W1_RECORDS:,})")
    p.add_argument("--w3-seconds", type=float, help=f"W3 seconds per mode (default {wl.W3_SECONDS:g})")
    p.add_argument("--w3-rate", type=float, default=1 / wl.W3_INTERVAL_S,
                   help=f"W3 records per second (default {1 / wl.W3_INTERVAL_S:g})")
    p.add_argument("--compare", action="store_true",
                   help="also run NATS JetStream and kinesalite (installed: see make bench-compare)")
    p.add_argument("--peers", default="nats,kinesalite", help="with --compare: comma-separated nats, kinesalite")
    p.add_argument("--no-sluice", action="store_true", help="with --compare: only the peers")
    p.add_argument("--grpc", metavar="HOST:PORT", help="a running broker's gRPC door instead of fresh brokers")
    p.add_argument("--http", metavar="HOST:PORT", help="with --grpc: that broker's REST door")
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
    args.peers = split(args.peers, set(drivers.PEERS), "--peers")
    if "w2" in args.workloads and "w1" not in args.workloads:
        p.error("w2 reads what w1 wrote: add w1")
    args.records = args.records or (wl.QUICK["w1_records"] if args.quick else wl.W1_RECORDS)
    args.w3_seconds = args.w3_seconds or (wl.QUICK["w3_seconds"] if args.quick else wl.W3_SECONDS)
    if args.records < 1 or args.w3_seconds <= 0 or args.w3_rate <= 0:
        p.error("--records, --w3-seconds and --w3-rate must be positive")
    if args.http and not args.grpc:
        p.error("--http needs --grpc (the REST door's W3 producer is gRPC)")
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
    title = (f"W1: {args.records:,} records x {wl.RECORD_SIZE} B, keys from {wl.KEY_IDS:,} ids, {wl.PARTITIONS} partitions, "
             f"batches of {wl.BATCH}, {wl.PRODUCERS} producers; W2: read back from TRIM_HORIZON, 1 reader/partition; "
             f"W3: 1 record / {1000 / args.w3_rate:g} ms for {args.w3_seconds:g} s")
    print(title)
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f}; started {started:%Y-%m-%d %H:%M:%S} UTC"
          + (f"; broker: external grpc={args.grpc}" + (f" http={args.http}" if args.http else "") if args.grpc else ""))
    print(wl.format_table(rows))
    rs = wl.ratios(rows)
    if rs:
        print("\nSluice (WAL) / peer:")
        print(wl.format_ratios(rs))
    path = _results_path(args, started)
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv],
        "cpus": os.cpu_count(), "loadavg_before": load_before,
        "config": {"records": args.records, "record_size": wl.RECORD_SIZE, "key_ids": wl.KEY_IDS,
                   "partitions": wl.PARTITIONS, "batch": wl.BATCH, "producers": wl.PRODUCERS, "seed": wl.SEED,
                   "w3_interval_s": 1 / args.w3_rate, "w3_seconds": args.w3_seconds,
                   "w3_record_size": wl.W3_RECORD_SIZE, "doors": args.doors, "durability": args.durability,
                   "workloads": args.workloads, "compare": args.compare,
                   "peers": args.peers if args.compare else [], "external": args.grpc},
        "rows": [r.as_dict() for r in rows],
        "ratios": [{"figure": f, "peer": p, "sluice": s, "peer_value": v, "ratio": r} for f, p, s, v, r in rs],
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
    args = p.parse_args(argv)
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
            except Exception as exc:  # noqa: BLE001 - a failure is reported, not raised
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


def main(argv: list[str] | None = None) -> int:
    """`run.py [suite] [options]` or `run.py memory [options]`; the suite is the default command."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else "suite"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    return memory_main(rest) if command == "memory" else suite_main(rest)


if __name__ == "__main__":
    sys.exit(main())
