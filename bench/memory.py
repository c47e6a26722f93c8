#!/usr/bin/env python3
"""Broker memory against the performance issue's target: "Broker RSS under 300 MiB with 1,000,000
records stored; memory stays flat over a 5-minute W1 loop."

One fresh broker (default settings, temp data dir). Phase "fill": W1 over gRPC (bench/workloads.py,
bench/run.py's GrpcDoor) runs again and again until --records are stored, then, 2 s later, the
broker's VmRSS and VmHWM are read from /proc/<pid>/status. Phase "loop": W1 keeps running for
--minutes while a side thread samples VmRSS every second; the verdict on "flat" uses the
least-squares slope over the second half (after warm-up) and the difference of the first and
last minute's median RSS (single samples swing by tens of MiB around flushes). Retention is 24 h, so the store keeps growing through the loop (on disk; RSS should not grow with it).

    .venv/bin/python bench/memory.py                         # 1,000,000 records, 5 min (make bench-memory)
    .venv/bin/python bench/memory.py --minutes 0.5 --records 400000   # a smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import workloads as wl  # noqa: E402
from broker.launcher import BrokerProcess  # noqa: E402
from run import GrpcDoor  # noqa: E402

TARGET_RECORDS = 1_000_000
TARGET_RSS_MIB = 300.0
FLAT_SLOPE_MIB_MIN = 2.0    # second-half least-squares slope
FLAT_GROWTH_MIB = 30.0      # median of the last minute - median of the first (single samples swing ±20 MiB)
SETTLE_S = 2.0
SAMPLE_S = 1.0
STREAM = "memory-w1"


def status_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process in MiB (/proc reports kB)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


class RssSampler:
    """VmRSS of a pid every SAMPLE_S on a side thread, as (seconds since start, MiB).

    Ticks are scheduled from the start time, not slept back to back, so a tick delayed by the
    producers' threads (GIL, two shared cores) does not shift the rest; the regression uses the
    actual times anyway.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def _sample(self) -> None:
        self.samples.append((time.monotonic() - self._t0, status_mib(self.pid)["VmRSS"]))

    def _run(self) -> None:
        k = 0
        while True:
            self._sample()
            k += 1
            if self._stop.wait(max(0.0, self._t0 + k * SAMPLE_S - time.monotonic())):
                return

    def start(self) -> "RssSampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._sample()   # the "end" figure is taken right after the last W1 round


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return float("nan")
    return statistics.linear_regression([t for t, _ in samples], [r for _, r in samples]).slope * 60


def w1_round(door: GrpcDoor, bodies: list[bytes]) -> None:
    """One W1 pass exactly as bench/run.py runs it (a fresh channel per producer); raises unless all acked."""
    producers = [door.producer([bodies[i] for i in wl.producer_batches(len(bodies), p)])
                 for p in range(wl.PRODUCERS)]
    errors = wl.run_threads([run for run, _, _ in producers])
    failed = sum(sum(f()) for _, f, _ in producers)
    if errors or failed:
        raise RuntimeError(errors[0] if errors else f"{failed} records failed")


def dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:   # the running broker's compactions delete files under us
            pass
    return total


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, broker: BrokerProcess, data: wl.Dataset) -> dict[str, Any]:
    assert broker.proc
    pid = broker.proc.pid
    door = GrpcDoor(broker.grpc_target)
    bodies, records = door.bodies(STREAM, data), data.records   # the same requests every round
    sampler: RssSampler | None = None
    try:
        door.create_stream(STREAM, wl.PARTITIONS)
        _say(f"fill: W1 until {args.records:,} records are stored")
        t0, written, rounds = time.perf_counter(), 0, 0
        while written < args.records:
            w1_round(door, bodies)
            written, rounds = written + records, rounds + 1
        fill_s = time.perf_counter() - t0
        stored = sum(door.stored(STREAM).values())
        if stored != written:
            raise RuntimeError(f"fill: stored {stored:,}, acknowledged {written:,}")
        time.sleep(SETTLE_S)   # let the last flush/compaction and the gRPC threads settle
        mem = status_mib(pid)
        fill = {"records_stored": stored, "rounds": rounds, "seconds": fill_s, "rate": written / fill_s,
                "rss_mib": mem["VmRSS"], "hwm_mib": mem["VmHWM"]}
        _say(f"  {stored:,} stored in {fill_s:.1f} s; VmRSS {mem['VmRSS']:.1f} MiB, VmHWM {mem['VmHWM']:.1f} MiB")

        _say(f"loop: W1 for {args.minutes:g} min, VmRSS every {SAMPLE_S:g} s")
        sampler = RssSampler(pid).start()
        t0, written, rounds = time.perf_counter(), 0, 0
        deadline = t0 + args.minutes * 60
        while time.perf_counter() < deadline:   # the last round may run past the deadline (~1 s)
            w1_round(door, bodies)
            written, rounds = written + records, rounds + 1
        loop_s = time.perf_counter() - t0
        sampler.stop()
        end_stored = sum(door.stored(STREAM).values())
        if end_stored != stored + written:
            raise RuntimeError(f"loop: stored {end_stored:,}, expected {stored + written:,}")
        samples = sampler.samples
        half = samples[-1][0] / 2
        rss = [r for _, r in samples]
        last = samples[-1][0]
        first_minute = [r for t, r in samples if t <= 60] or rss[:1]
        last_minute = [r for t, r in samples if t >= last - 60] or rss[-1:]
        loop = {"seconds": loop_s, "rounds": rounds, "records_written": written, "rate": written / loop_s,
                "records_stored_end": end_stored, "rss_start_mib": rss[0], "rss_end_mib": rss[-1],
                "rss_min_mib": min(rss), "rss_max_mib": max(rss),
                "rss_first_minute_median_mib": statistics.median(first_minute),
                "rss_last_minute_median_mib": statistics.median(last_minute),
                "slope_second_half_mib_per_min": slope_mib_per_min([s for s in samples if s[0] >= half]),
                "hwm_end_mib": status_mib(pid)["VmHWM"],
                "data_dir_bytes_end": dir_bytes(broker.data_dir), "samples": samples}
        return {"fill": fill, "loop": loop}
    finally:
        if sampler:
            sampler.stop()
        door.close()


def verdicts(res: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str, str]]:
    fill, loop = res["fill"], res["loop"]
    rss_ok = fill["rss_mib"] < TARGET_RSS_MIB
    if fill["records_stored"] < TARGET_RECORDS:   # fewer records than the target: shown, not judged
        rss_v = f"not judged ({fill['records_stored']:,} < {TARGET_RECORDS:,} stored)"
    else:
        rss_v = "met" if rss_ok else "NOT MET"
    growth = loop["rss_last_minute_median_mib"] - loop["rss_first_minute_median_mib"]
    slope = loop["slope_second_half_mib_per_min"]
    flat_ok = slope < FLAT_SLOPE_MIB_MIN and growth < FLAT_GROWTH_MIB   # nan slope (too short) -> not met
    flat_v = ("met" if flat_ok else "NOT MET") + ("" if args.minutes >= 5 else f" (over {args.minutes:g} min, not 5)")
    return [
        (f"VmRSS < {TARGET_RSS_MIB:g} MiB with {TARGET_RECORDS:,} records stored",
         f"{fill['rss_mib']:.1f} MiB with {fill['records_stored']:,}", rss_v),
        (f"flat: 2nd-half slope < {FLAT_SLOPE_MIB_MIN:g} MiB/min and last-minute median - first-minute "
         f"median < {FLAT_GROWTH_MIB:g} MiB",
         f"{slope:+.2f} MiB/min, {growth:+.1f} MiB", flat_v),
    ]


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def report(res: dict[str, Any], checks: list[tuple[str, str, str]]) -> str:
    fill, loop = res["fill"], res["loop"]
    rows = [("phase", "wall s", "W1 rounds", "records written", "rec/s", "records stored", "VmRSS MiB"),
            ("fill", f"{fill['seconds']:.1f}", str(fill["rounds"]), f"{fill['records_stored']:,}",
             f"{fill['rate']:,.0f}", f"{fill['records_stored']:,}",
             f"{fill['rss_mib']:.1f} ({SETTLE_S:g} s after; VmHWM {fill['hwm_mib']:.1f})"),
            ("loop", f"{loop['seconds']:.1f}", str(loop["rounds"]), f"{loop['records_written']:,}",
             f"{loop['rate']:,.0f}", f"{loop['records_stored_end']:,}",
             f"start {loop['rss_start_mib']:.1f}, end {loop['rss_end_mib']:.1f}, min {loop['rss_min_mib']:.1f}, "
             f"max {loop['rss_max_mib']:.1f}; VmHWM {loop['hwm_end_mib']:.1f}")]
    n_half = sum(1 for t, _ in loop["samples"] if t >= loop["samples"][-1][0] / 2)
    return "\n".join([
        table(rows),
        f"loop: {len(loop['samples'])} VmRSS samples, second-half slope {loop['slope_second_half_mib_per_min']:+.2f} "
        f"MiB/min ({n_half} samples); data dir at the end {loop['data_dir_bytes_end'] / 2**30:.2f} GiB",
        "",
        table([("target", "measured", "verdict"), *checks])])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="length of the W1 loop (default 5)")
    p.add_argument("--records", type=int, default=TARGET_RECORDS,
                   help=f"records stored before the first reading (default {TARGET_RECORDS:,})")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.records < 1:
        p.error("--minutes and --records must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill` also stops the broker, like Ctrl-C
    started = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    overrides = {k: v for k, v in os.environ.items() if k.startswith("SLUICE_")}
    if overrides:   # BrokerProcess passes our environment on: these change the broker's settings
        _say(f"warning: SLUICE_* variables set, the broker does not run with default settings: {overrides}")
    _say(f"building the W1 data set: {wl.W1_RECORDS:,} records x {wl.RECORD_SIZE} B, seed {wl.SEED}")
    data = wl.make_dataset(wl.W1_RECORDS)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-memory-"))
    broker_args = ("--log-level", "WARNING")   # as bench/run.py; the memory settings stay at their defaults
    broker = BrokerProcess(tmp / "data", *broker_args)
    try:
        broker.start(timeout=60)
        res = measure(args, broker, data)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:
        _say(f"error: {type(exc).__name__}: {exc}")
        if broker.stderr_lines:
            _say("broker log (tail):\n" + "".join(broker.stderr_lines[-20:]))
        return 1
    finally:
        try:
            code = broker.stop(60) if broker.proc else None
            if code:
                _say(f"broker exited with {code}")
        except subprocess.TimeoutExpired:
            broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    checks = verdicts(res, args)
    print(f"Broker memory: W1 over gRPC ({data.records:,} records x {wl.RECORD_SIZE} B, keys from {wl.KEY_IDS:,} ids, "
          f"{wl.PARTITIONS} partitions, batches of {wl.BATCH}, {wl.PRODUCERS} producers) until {args.records:,} "
          f"stored, then looped for {args.minutes:g} min")
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f}; started {started:%Y-%m-%d %H:%M:%S} UTC")
    print(report(res, checks))
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"memory-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv],
        "cpus": os.cpu_count(), "loadavg_before": load_before, "broker_args": broker_args,
        "sluice_env": overrides,
        "config": {"records": args.records, "minutes": args.minutes, "w1_records": data.records,
                   "record_size": wl.RECORD_SIZE, "key_ids": wl.KEY_IDS, "partitions": wl.PARTITIONS,
                   "batch": wl.BATCH, "producers": wl.PRODUCERS, "seed": wl.SEED, "sample_s": SAMPLE_S,
                   "settle_s": SETTLE_S},
        "criteria": {"rss_mib_below": TARGET_RSS_MIB, "at_records": TARGET_RECORDS,
                     "flat_slope_mib_per_min_below": FLAT_SLOPE_MIB_MIN, "flat_growth_mib_below": FLAT_GROWTH_MIB,
                     "slope_over": "second half of the loop"},
        **res,
        "verdicts": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks],
    }, indent=1))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
