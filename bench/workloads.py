"""Workloads W1/W2/W3 of issue 4, shared by bench/run.py (Sluice) and bench/peers.py (NATS, kinesalite).

    W1 put   200,000 records of 256 random bytes (fixed seed), partition keys drawn from 10,000 ids,
             a 4-partition stream, batches of 500, 4 concurrent producers each waiting for its ack.
             records/s, MB/s (10^6 payload bytes/s), batch latency p50/p99.
    W2 read  every W1 record back from every partition from TRIM_HORIZON, one reader per partition,
             the largest GetRecords the system takes. records/s.
    W3 tail  one producer sends 1 record every 2 ms for 5 s, a consumer tails the partition:
             put-to-receive p50/p99 per consumer mode (push, long poll / poll).

Every workload reports the client's CPU seconds (time.process_time: all threads of this process)
and the server's (utime+stime from /proc/<pid>/stat), so a reader sees who was saturated on the
shared cores. Request bytes are built before the clock starts.
"""
from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

SEED = 20261121
RECORD_SIZE = 256
KEY_IDS = 10_000
PARTITIONS = 4
BATCH = 500
PRODUCERS = 4
W1_RECORDS = 200_000
W3_INTERVAL_S = 0.002
W3_SECONDS = 5.0
QUICK = {"w1_records": 20_000, "w3_seconds": 1.0}
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Dataset:
    """The W1 records: (partition_key, payload) in batches of BATCH, from a fixed seed."""
    batches: list[list[tuple[str, bytes]]]

    @property
    def records(self) -> int:
        return sum(len(b) for b in self.batches)


def make_dataset(records: int = W1_RECORDS, seed: int = SEED) -> Dataset:
    rng = random.Random(seed)
    flat = [(f"id-{rng.randrange(KEY_IDS)}", rng.randbytes(RECORD_SIZE)) for _ in range(records)]
    return Dataset([flat[i:i + BATCH] for i in range(0, records, BATCH)])


def producer_batches(n_batches: int, producer: int, producers: int = PRODUCERS) -> list[int]:
    """Batch indexes producer p sends: p, p+P, p+2P, ... (each producer sends its share in order)."""
    return list(range(producer, n_batches, producers))


# -- CPU meters ---------------------------------------------------------------------------------

def proc_cpu_seconds(pid: int | None) -> float:
    """utime+stime of a process (all its threads), from /proc; nan if unknown."""
    if not pid:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK   # fields 14, 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return float("nan")


class CpuMeter:
    """Wall clock, client CPU (this process) and server CPU (a pid) between start() and stop()."""

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.wall = self.client = self.server = 0.0

    def start(self) -> "CpuMeter":
        self._w, self._c, self._s = time.perf_counter(), time.process_time(), proc_cpu_seconds(self.pid)
        return self

    def stop(self) -> "CpuMeter":
        self.wall = time.perf_counter() - self._w
        self.client = time.process_time() - self._c
        self.server = proc_cpu_seconds(self.pid) - self._s
        return self


# -- results ------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


@dataclass
class Row:
    """One line of the table: one workload (and mode) on one system/door/durability."""
    system: str          # Sluice, NATS JetStream, kinesalite
    door: str            # gRPC, REST, nats, kinesis-json
    durability: str      # wal, fsync, file (no fsync), memory
    workload: str        # W1 put, W2 read, W3 push, W3 long-poll, W3 poll
    records: int = 0
    seconds: float = 0.0
    rate: float = 0.0             # records/s (W1, W2)
    mb_s: float = 0.0             # payload MB/s (W1, W2)
    p50_ms: float = float("nan")  # batch latency (W1) or put-to-receive (W3)
    p99_ms: float = float("nan")
    client_cpu_s: float = float("nan")
    server_cpu_s: float = float("nan")
    ok: bool = True
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def measure(self, meter: CpuMeter) -> "Row":
        self.seconds, self.client_cpu_s, self.server_cpu_s = meter.wall, meter.client, meter.server
        if self.workload.startswith(("W1", "W2")) and meter.wall > 0:
            self.rate = self.records / meter.wall
            self.mb_s = self.rate * RECORD_SIZE / 1e6
        return self

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()}


def _num(v: float, fmt: str) -> str:
    return "-" if v != v or v == 0.0 and fmt != ".2f" else format(v, fmt)


def format_table(rows: list[Row]) -> str:
    header = ("system", "door", "durability", "workload", "records", "rec/s", "MB/s", "p50 ms", "p99 ms",
              "wall s", "client cpu s", "server cpu s", "ok")
    lines = [header]
    for r in rows:
        w3 = r.workload.startswith("W3")
        lines.append((r.system, r.door, r.durability, r.workload, f"{r.records:,}",
                      "-" if w3 else f"{r.rate:,.0f}", "-" if w3 else f"{r.mb_s:.2f}",
                      _num(r.p50_ms, ".2f"), _num(r.p99_ms, ".2f"), f"{r.seconds:.2f}",
                      _num(r.client_cpu_s, ".2f"), _num(r.server_cpu_s, ".2f"),
                      "ok" if r.ok else ("FAIL " + r.note)[:60]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(c.ljust(w) if i < 4 or i == len(header) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: list[Row]) -> str:
    out = ["| system | door | durability | workload | records | rec/s | MB/s | p50 ms | p99 ms | client cpu s "
           "| server cpu s | ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w3 = r.workload.startswith("W3")
        out.append(f"| {r.system} | {r.door} | {r.durability} | {r.workload} | {r.records:,} | "
                   f"{'-' if w3 else f'{r.rate:,.0f}'} | {'-' if w3 else f'{r.mb_s:.2f}'} | "
                   f"{_num(r.p50_ms, '.2f')} | {_num(r.p99_ms, '.2f')} | {_num(r.client_cpu_s, '.2f')} | "
                   f"{_num(r.server_cpu_s, '.2f')} | {'ok' if r.ok else 'FAIL ' + r.note[:60]} |")
    return "\n".join(out)


def ratios(rows: list[Row]) -> list[tuple[str, str, float, float, float]]:
    """(workload, peer, sluice figure, peer figure, sluice/peer) for Sluice WAL vs each peer.

    Throughput (W1, W2): Sluice rec/s / peer rec/s (higher is better for Sluice). Latency (W3):
    peer p99 / Sluice p99 (also > 1 when Sluice is better). Sluice's best door in WAL mode per
    workload family (gRPC for W1/W2, the gRPC push/long-poll for W3) is compared.
    """
    out = []
    sluice = [r for r in rows if r.system == "Sluice" and r.durability == "wal" and r.ok]
    peers = [r for r in rows if r.system != "Sluice" and r.ok]
    for peer in sorted({r.system for r in peers}):
        for wl in ("W1 put", "W2 read"):
            s = [r.rate for r in sluice if r.workload == wl and r.door == "gRPC"]
            s_rest = [r.rate for r in sluice if r.workload == wl and r.door == "REST"]
            p = [r.rate for r in peers if r.system == peer and r.workload == wl]
            if s and p and p[0] > 0:
                out.append((f"{wl} rec/s (gRPC)", peer, s[0], p[0], s[0] / p[0]))
            if s_rest and p and p[0] > 0:
                out.append((f"{wl} rec/s (REST)", peer, s_rest[0], p[0], s_rest[0] / p[0]))
        s3 = [r.p99_ms for r in sluice if r.workload.startswith("W3") and r.door == "gRPC"]
        p3 = [r.p99_ms for r in peers if r.system == peer and r.workload.startswith("W3")]
        if s3 and p3:
            best_s, best_p = min(s3), min(p3)
            out.append(("W3 best p99 ms (peer/sluice)", peer, best_s, best_p, best_p / best_s if best_s else 0.0))
    return out


def format_ratios(rs: list[tuple[str, str, float, float, float]]) -> str:
    lines = ["| figure | peer | Sluice | peer | ratio |", "|---|---|---|---|---|"]
    for wl, peer, s, p, ratio in rs:
        fmt = ",.0f" if "rec/s" in wl else ".2f"
        lines.append(f"| {wl} | {peer} | {format(s, fmt)} | {format(p, fmt)} | {ratio:.2f}x |")
    return "\n".join(lines)


def run_threads(fns: list[Callable[[], None]]) -> list[str]:
    """Runs fns on threads released together; returns their errors."""
    errors: list[str] = []
    gate = threading.Barrier(len(fns) + 1)

    def wrap(fn: Callable[[], None]) -> None:
        try:
            gate.wait()
            fn()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=wrap, args=(f,), daemon=True) for f in fns]
    for t in threads:
        t.start()
    gate.wait()
    for t in threads:
        t.join()
    return errors
