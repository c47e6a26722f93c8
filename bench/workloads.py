"""The workloads of bench/run.py, the same for every system and door (bench/drivers.py drives the
doors; this module holds the clocks, the CPU meters, the data set and the verdicts).

    W1 put   200,000 records of 256 random bytes (fixed seed), partition keys drawn from 10,000 ids,
             a 4-partition stream, batches of 500, 4 concurrent producers each waiting for its ack.
             records/s, MB/s (10^6 payload bytes/s), batch latency p50/p99.
    W2 read  every W1 record back from every partition from TRIM_HORIZON, one reader per partition,
             the largest GetRecords the system takes. records/s.
    W3 tail  one producer sends 1 record every 2 ms for 5 s, a consumer tails the partition:
             put-to-receive p50/p99 per consumer mode (push, long poll / poll).
    memory   W1 rounds until N records are stored, then W1 in a loop for M minutes, the server's
             VmRSS sampled every second (`memory_fill`, `memory_loop`).

Every workload reports the client's CPU seconds (time.process_time: all threads of this process)
and the server's (utime+stime from /proc/<pid>/stat), so a reader sees who was saturated on the
shared cores. Request bytes are built before the clock starts.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:   # drivers imports this module; the workloads only call the drivers' methods
    from drivers import Driver, QueryDriver, TableDriver, TailDriver

SEED = 20261121
RECORD_SIZE = 256
KEY_IDS = 10_000
PARTITIONS = 4
BATCH = 500
PRODUCERS = 4
W1_RECORDS = 200_000
W3_INTERVAL_S = 0.002
W3_SECONDS = 5.0
W3_RECORD_SIZE = 100
W3_WARM_UP_S = 0.2            # the first 0.2 s of records warm the path up and are not counted
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
    """utime+stime of a process (all its threads) and of its live children (a broker's
    --decode-workers), from /proc; nan if unknown."""
    if not pid:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / _TICK   # fields 14, 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return float("nan")
    children: list[int] = []
    try:   # children are listed under the thread that started them
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        pass
    for child in children:
        try:
            with open(f"/proc/{child}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            pass
    return total


class CpuMeter:
    """Wall clock, client CPU (this process) and server CPU (a pid) between start() and stop()."""

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.wall = self.client = self.server = 0.0

    def start(self) -> CpuMeter:
        self._w, self._c, self._s = time.perf_counter(), time.process_time(), proc_cpu_seconds(self.pid)
        return self

    def stop(self) -> CpuMeter:
        self.wall = time.perf_counter() - self._w
        self.client = time.process_time() - self._c
        self.server = proc_cpu_seconds(self.pid) - self._s
        return self


# -- results ------------------------------------------------------------------------------------

def pct(values: Sequence[float], q: float) -> float:
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
    workload: str        # W1 put, W2 read, W3 push (unary put), W6 (...), W3t push, W3t long-poll, ...
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

    def measure(self, meter: CpuMeter) -> Row:
        self.seconds, self.client_cpu_s, self.server_cpu_s = meter.wall, meter.client, meter.server
        if self.workload.startswith(("W1", "W2")) and meter.wall > 0:
            self.rate = self.records / meter.wall
            self.mb_s = self.rate * RECORD_SIZE / 1e6
        return self

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _num(v: float, fmt: str) -> str:
    return "-" if math.isnan(v) or (v == 0.0 and fmt != ".2f") else format(v, fmt)


LATENCY_ROWS = ("W3", "W6", "T2")   # rows whose figure is a latency, not a rate


def format_table(rows: list[Row]) -> str:
    header = ("system", "door", "durability", "workload", "records", "rec/s", "MB/s", "p50 ms", "p99 ms",
              "wall s", "client cpu s", "server cpu s", "ok")
    lines = [header]
    for r in rows:
        w3 = r.workload.startswith(LATENCY_ROWS)
        lines.append((r.system, r.door, r.durability, r.workload, f"{r.records:,}",
                      "-" if w3 else f"{r.rate:,.0f}", "-" if w3 or r.workload.startswith("T") else f"{r.mb_s:.2f}",
                      _num(r.p50_ms, ".2f"), _num(r.p99_ms, ".2f"), f"{r.seconds:.2f}",
                      _num(r.client_cpu_s, ".2f"), _num(r.server_cpu_s, ".2f"),
                      "ok" if r.ok else ("FAIL " + r.note)[:60]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(c.ljust(w) if i < 4 or i == len(header) - 1 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
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
        for prefix, name in (("W3 push (", "W3 push (asyncio)"), ("W6 (", "W6"), ("W3t", "W3t (threads)")):
            s3 = [r.p99_ms for r in sluice if r.workload.startswith(prefix) and r.door == "gRPC"]
            p3 = [r.p99_ms for r in peers if r.system == peer and r.workload.startswith(prefix)]
            if s3 and p3:
                best_s, best_p = min(s3), min(p3)
                out.append((f"{name} best p99 ms (peer/sluice)", peer, best_s, best_p,
                            best_p / best_s if best_s else 0.0))
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


# -- W1, W2: throughput on one door ------------------------------------------------------------

def w1(driver: Driver, stream: str, bodies: list[Any], data: Dataset) -> Row:
    """PRODUCERS threads released together, producer p sending batches p, p+P, ... of the pre-built
    bodies and waiting for each acknowledgement; then the store's count must equal the data set's."""
    row = Row(driver.system, driver.door, driver.durability, "W1 put")
    producers = [driver.producer([bodies[i] for i in producer_batches(len(bodies), p)]) for p in range(PRODUCERS)]
    meter = CpuMeter(driver.pid).start()
    errors = run_threads([p.run for p in producers])
    meter.stop()
    failed = sum(p.failed() for p in producers)
    lat = [x for p in producers for x in p.latencies]
    row.records = data.records - failed if not errors else len(lat) * BATCH
    row.measure(meter)
    row.p50_ms, row.p99_ms = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
    counts = list(driver.stored(stream).values())
    stored = None if None in counts else sum(counts)   # type: ignore[arg-type]
    row.extra = {"batches": len(lat), "failed_records": failed, "stored": stored}
    if errors or failed or (stored is not None and stored != data.records):
        row.ok, row.note = False, (errors[0] if errors else f"failed={failed} stored={stored}/{data.records}")
    return row


def w1_round(driver: Driver, bodies: list[Any]) -> None:
    """One W1 pass as w1() runs it (new connections per producer), unmeasured; raises unless all acked."""
    producers = [driver.producer([bodies[i] for i in producer_batches(len(bodies), p)]) for p in range(PRODUCERS)]
    errors = run_threads([p.run for p in producers])
    failed = sum(p.failed() for p in producers)
    if errors or failed:
        raise RuntimeError(errors[0] if errors else f"{failed} records failed")


def w2(driver: Driver, stream: str, written: int) -> Row:
    """One reader thread per partition from TRIM_HORIZON, released together, until it has read the
    partition's stored count (or, where the system cannot count, until it reads nothing)."""
    row = Row(driver.system, driver.door, driver.durability, "W2 read")
    per_partition = driver.stored(stream)
    counts: dict[str, int] = {}
    readers = [driver.reader(stream, p, n, counts) for p, n in per_partition.items()]
    meter = CpuMeter(driver.pid).start()
    errors = run_threads(readers)
    meter.stop()
    row.records = sum(counts.values())
    row.measure(meter)
    known = [n for n in per_partition.values() if n is not None]
    expected = sum(known) if len(known) == len(per_partition) else written
    row.extra = {"expected": expected, "per_partition": counts, "read_limit": driver.read_limit}
    if errors or row.records != expected:
        row.ok, row.note = False, (errors[0] if errors else f"read {row.records}/{expected}")
    return row


# -- W3: put-to-receive latency ----------------------------------------------------------------

HEADER = struct.Struct(">Qq")   # a W3 payload starts with: index, send time (perf_counter_ns)


@dataclass
class Tally:
    """What a W3 consumer saw: per counted record, receive - send in ns; and whether it was in order."""
    expected: int
    warm: int                     # records with index < warm are not counted
    latencies: list[int] = field(default_factory=list)
    received: int = 0
    out_of_order: int = 0
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def take(self, payloads: list[bytes], now: int) -> None:
        for data in payloads:
            index, sent = HEADER.unpack_from(data)
            if index != self.received:
                self.out_of_order += 1
            self.received += 1
            if index >= self.warm:
                self.latencies.append(now - sent)
        if self.received >= self.expected:
            self.done.set()


@dataclass
class TailRun:
    tally: Tally
    sent: int = 0
    put_latencies: list[float] = field(default_factory=list)   # ms
    late_sends: int = 0
    error: str = ""

    @property
    def verdict(self) -> str:
        t = self.tally
        if self.error or t.error:
            return self.error or t.error
        if t.received != self.sent:
            return f"LOST {self.sent - t.received}"
        if t.out_of_order:
            return f"DISORDER {t.out_of_order}"
        return "ok" if t.latencies else "no records counted"


def tail_run(driver: TailDriver, stream: str, partition: int, mode: str, seconds: float, rate: float) -> TailRun:
    """One producer sends a record every 1/rate s to `partition`, its send time in the payload, while
    one consumer (`mode`) tails the partition. The first W3_WARM_UP_S of records are not counted."""
    interval_ns = int(1e9 / rate)
    warm = max(1, int(W3_WARM_UP_S * rate))
    tally = Tally(warm + int(seconds * rate), warm)
    run = TailRun(tally)
    send, close = driver.tail_sender(stream, partition)
    try:
        consumer = driver.tail(stream, partition, mode, tally)
    except BaseException:
        close()
        raise
    pad = os.urandom(W3_RECORD_SIZE - HEADER.size)
    pack, clock, sleep, put_latencies = HEADER.pack, time.perf_counter_ns, time.sleep, run.put_latencies
    try:
        start = clock() + 50_000_000   # 50 ms from now: the consumer is in its first wait by then
        for i in range(tally.expected):
            due = start + i * interval_ns
            now = clock()
            if due > now:
                sleep((due - now) / 1e9)
            elif now - due > interval_ns:
                run.late_sends += 1
            sent = clock()
            send(pack(i, sent) + pad)
            if i >= warm:
                put_latencies.append((clock() - sent) / 1e6)
            run.sent += 1
        tally.done.wait(10)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        consumer.stop()
        close()
    return run


def w3t(driver: Driver, stream: str, seconds: float, rate: float = 1 / W3_INTERVAL_S) -> list[Row]:
    """W3 on threads (issue 4's, `--workloads w3t`): a stream with a partition per consumer mode of
    the door; the modes run one after the other."""
    driver.create_stream(stream, len(driver.w3_modes))
    rows = []
    for partition, (mode, label) in enumerate(driver.w3_modes):
        row = Row(driver.system, driver.door, driver.durability, label)
        meter = CpuMeter(driver.pid).start()
        res = tail_run(driver, stream, partition, mode, seconds, rate)
        meter.stop()
        lat = res.tally.latencies
        row.records = len(lat)
        row.measure(meter)
        row.p50_ms, row.p99_ms = pct(lat, 0.5) / 1e6, pct(lat, 0.99) / 1e6
        row.extra = {"mode": mode, "sent": res.sent, "received": res.tally.received, "rate": rate,
                     "put_p50_ms": pct(res.put_latencies, 0.5), "p90_ms": pct(lat, 0.9) / 1e6,
                     "max_ms": pct(lat, 1.0) / 1e6, "late_sends": res.late_sends, "producer": driver.w3_producer}
        if res.verdict != "ok":
            row.ok, row.note = False, res.verdict
        rows.append(row)
    return rows


# -- W3 and W6 on asyncio: the trickle path (issue 14) -----------------------------------------
#
# W3  one producer, open loop: a record every 2 ms for 5 s (+0.2 s uncounted warm-up) to one
#     partition, each send a task of its own (the next is not held back by the last one's answer),
#     while a push consumer in the same asyncio process tails the partition. put-to-receive
#     p50/p99/max, the put's own p50, and the broker's CPU per record.
# W6  200 producers (a connection each), one record per request at 10 requests/s each for 20 s,
#     each waiting for its answer (a late answer delays that producer's next request: counted as
#     late). request latency p50/p99/max, the broker's CPU per record.
# Both run once per produce mode of the driver (drivers.AioSluice / AioNats: produce_modes).

W6_PRODUCERS = 200
W6_RATE = 10.0                 # requests/s per producer
W6_SECONDS = 20.0
W6_RECORD_SIZE = 100
W6_PARTITIONS = 4
QUICK.update({"w6_seconds": 2.0})
TARGETS = {"w3_p99_x_peer": 1.5, "w6_p99_x_peer": 2.0, "w3_cpu_ms_per_record": 0.25}


@dataclass
class OpenTally:
    """What an open-loop W3 consumer saw. Records may be acknowledged out of order when puts
    overlap (open loop over unary calls), so arrival order is counted, not judged; every index
    must arrive exactly once."""
    expected: int
    warm: int
    latencies: list[int] = field(default_factory=list)
    received: int = 0
    duplicates: int = 0
    reordered: int = 0
    highest: int = -1
    seen: bytearray = field(default_factory=bytearray)
    done: Any = None               # an asyncio.Event, made on the workload's loop

    def take(self, payloads: list[bytes], now: int) -> None:
        seen, unpack = self.seen, HEADER.unpack_from
        for data in payloads:
            index, sent = unpack(data)
            if seen[index]:
                self.duplicates += 1
                continue
            seen[index] = 1
            if index < self.highest:
                self.reordered += 1
            else:
                self.highest = index
            self.received += 1
            if index >= self.warm:
                self.latencies.append(now - sent)
        if self.received >= self.expected and self.done is not None:
            self.done.set()


def _cpu_per_record_ms(row: Row, records: int) -> float:
    return row.server_cpu_s / records * 1000 if records and not math.isnan(row.server_cpu_s) else float("nan")


async def _w3_open(driver: Any, stream: str, partition: int, mode: str, label: str, seconds: float,
                   rate: float) -> Row:
    import asyncio
    row = Row(driver.system, driver.door, driver.durability, f"W3 push ({label})")
    interval_ns = int(1e9 / rate)
    warm = max(1, int(W3_WARM_UP_S * rate))
    expected = warm + int(seconds * rate)
    tally = OpenTally(expected, warm, seen=bytearray(expected), done=asyncio.Event())
    consumer = await driver.push(stream, partition, tally.take)
    sender = await driver.sender(stream, mode, partition=partition)
    pad = os.urandom(W3_RECORD_SIZE - HEADER.size)
    pack, clock = HEADER.pack, time.perf_counter_ns
    put_latencies: list[float] = []
    errors: list[str] = []
    inflight: set[asyncio.Task[None]] = set()
    late = 0

    async def put(payload: bytes, sent: int, counted: bool) -> None:
        try:
            await sender.send(payload)
        except Exception as exc:  # a failure is reported, not raised
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            return
        if counted:
            put_latencies.append((clock() - sent) / 1e6)

    meter = CpuMeter(driver.pid)
    try:
        start = clock() + 50_000_000
        meter.start()
        for i in range(expected):
            due = start + i * interval_ns
            now = clock()
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
            elif now - due > interval_ns:
                late += 1
            sent = clock()
            task = asyncio.ensure_future(put(pack(i, sent) + pad, sent, i >= warm))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(list(inflight))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await tally.done.wait()
        meter.stop()
    finally:
        await consumer.close()
        await sender.close()
    lat = tally.latencies
    row.records = len(lat)
    row.measure(meter)
    row.p50_ms, row.p99_ms = pct(lat, 0.5) / 1e6, pct(lat, 0.99) / 1e6
    row.extra = {"mode": mode, "sent": expected, "received": tally.received, "rate": rate, "open_loop": True,
                 "put_p50_ms": pct(put_latencies, 0.5), "put_p99_ms": pct(put_latencies, 0.99),
                 "p90_ms": pct(lat, 0.9) / 1e6, "max_ms": pct(lat, 1.0) / 1e6, "late_sends": late,
                 "reordered": tally.reordered, "duplicates": tally.duplicates,
                 "server_cpu_ms_per_record": _cpu_per_record_ms(row, expected)}
    if errors:
        row.ok, row.note = False, f"{len(errors)} puts failed: {errors[0]}"
    elif tally.received != expected or tally.duplicates:
        row.ok, row.note = False, f"received {tally.received}/{expected}, {tally.duplicates} duplicates"
    elif not lat:
        row.ok, row.note = False, "no records counted"
    return row


def w3_open(driver: Any, stream: str, seconds: float, rate: float = 1 / W3_INTERVAL_S) -> list[Row]:
    """W3 (asyncio, open loop) per produce mode of the driver, one partition each, one after the other."""
    import asyncio

    async def go() -> list[Row]:
        await driver.create_stream(stream, len(driver.produce_modes))
        return [await _w3_open(driver, stream, n, mode, label, seconds, rate)
                for n, (mode, label) in enumerate(driver.produce_modes)]
    return asyncio.run(go())


async def _w6(driver: Any, stream: str, mode: str, label: str, producers: int, rate: float,
              seconds: float) -> Row:
    import asyncio
    row = Row(driver.system, driver.door, driver.durability, f"W6 ({label})")
    senders = await asyncio.gather(*(driver.sender(stream, mode, key=f"dev-{n}") for n in range(producers)))
    payloads = [os.urandom(W6_RECORD_SIZE) for _ in range(16)]
    try:
        # one request per producer before the clock: connections and calls open, first-call costs paid
        await asyncio.gather(*(s.send(payloads[0]) for s in senders))
        per = int(seconds * rate)
        interval = 1 / rate
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        errors: list[str] = []
        late = [0]
        start = loop.time() + 0.1

        async def run(n: int, sender: Any) -> None:
            phase = start + interval * n / producers   # spread evenly over the interval
            clock = time.perf_counter
            for i in range(per):
                delay = phase + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif -delay > interval:
                    late[0] += 1
                t = clock()
                try:
                    await sender.send(payloads[i & 15])
                except Exception as exc:  # a failure is reported, not raised
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    return
                latencies.append(clock() - t)

        meter = CpuMeter(driver.pid).start()
        await asyncio.gather(*(run(n, s) for n, s in enumerate(senders)))
        meter.stop()
    finally:
        await asyncio.gather(*(s.close() for s in senders), return_exceptions=True)
    records = len(latencies)
    row.records = records
    row.measure(meter)
    row.rate = records / meter.wall if meter.wall > 0 else 0.0
    row.p50_ms, row.p99_ms = pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000
    row.extra = {"mode": mode, "producers": producers, "rate_per_producer": rate, "requests": records,
                 "max_ms": pct(latencies, 1.0) * 1000, "p90_ms": pct(latencies, 0.9) * 1000, "late_requests": late[0],
                 "server_cpu_ms_per_record": _cpu_per_record_ms(row, records)}
    if errors:
        row.ok, row.note = False, f"{len(errors)} requests failed: {errors[0]}"
    elif records != producers * per:
        row.ok, row.note = False, f"{records}/{producers * per} requests answered"
    return row


def w6(driver: Any, stream: str, seconds: float, producers: int = W6_PRODUCERS, rate: float = W6_RATE) -> list[Row]:
    """W6 per produce mode of the driver, a stream each (W6_PARTITIONS partitions, producer n's
    records keyed dev-n); every record (with the warm-up ones) must be stored."""
    import asyncio

    async def go() -> list[Row]:
        rows = []
        for mode, label in driver.produce_modes:
            name = f"{stream}-{mode}"
            await driver.create_stream(name, W6_PARTITIONS)
            row = await _w6(driver, name, mode, label, producers, rate, seconds)
            stored = await driver.stored(name)
            row.extra["stored"] = stored
            if row.ok and stored != row.records + producers:
                row.ok, row.note = False, f"stored {stored}/{row.records + producers}"
            rows.append(row)
        return rows
    return asyncio.run(go())


def trickle_table(rows: list[Row]) -> str:
    """W3 and W6, every system side by side: latency, the broker's CPU per record."""
    out = [("system", "door", "durability", "workload", "records", "p50 ms", "p99 ms", "max ms", "put p50 ms",
            "server cpu ms/rec", "client cpu s", "ok")]
    for r in rows:
        if not r.workload.startswith(("W3 push (", "W6 (")):
            continue
        e = r.extra
        out.append((r.system, r.door, r.durability, r.workload, f"{r.records:,}", _num(r.p50_ms, ".2f"),
                    _num(r.p99_ms, ".2f"), _num(e.get("max_ms", float("nan")), ".2f"),
                    _num(e.get("put_p50_ms", float("nan")), ".2f"),
                    _num(e.get("server_cpu_ms_per_record", float("nan")), ".3f"),
                    _num(r.client_cpu_s, ".2f"), "ok" if r.ok else ("FAIL " + r.note)[:60]))
    return _plain_table(out) if len(out) > 1 else ""


def trickle_verdicts(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 14's targets, Sluice (WAL) against JetStream in the same run."""
    def find(system: str, prefix: str) -> list[Row]:
        return [r for r in rows if r.system == system and r.workload.startswith(prefix) and r.ok
                and (system != "Sluice" or r.durability == "wal")]
    checks = []
    for prefix, key, name in (("W3 push (", "w3_p99_x_peer", "W3 push p99"), ("W6 (", "w6_p99_x_peer", "W6 p99")):
        peer = find("NATS JetStream", prefix)
        for r in find("Sluice", prefix):
            if peer:
                limit = TARGETS[key] * peer[0].p99_ms
                checks.append((f"{name} <= {TARGETS[key]:g}x JetStream's ({r.workload})",
                               f"{r.p99_ms:.2f} ms vs {peer[0].p99_ms:.2f} ms = {r.p99_ms / peer[0].p99_ms:.2f}x",
                               "met" if r.p99_ms <= limit else "NOT MET"))
    for r in find("Sluice", "W3 push ("):
        cpu = r.extra.get("server_cpu_ms_per_record", float("nan"))
        checks.append((f"W3 broker CPU per record <= {TARGETS['w3_cpu_ms_per_record']:g} ms ({r.workload})",
                       f"{cpu:.3f} ms", "met" if cpu <= TARGETS["w3_cpu_ms_per_record"] else "NOT MET"))
    return checks


# -- core: the broker core's share of the trickle path, in process ------------------------------

CORE_RECORDS = 20_000
CORE_WARM_UP = 500


def core_trickle(records: int = CORE_RECORDS) -> dict[str, Any]:
    """The core's put -> notify -> push path without a door: a Broker on a RocksStore (WAL) in this
    process, one push subscriber (`Broker.subscribe`, max_wait 0), and `records` single-record
    put_records, each awaited until the subscriber got it. CPU (this process: time.process_time)
    and wall time per record. What W3 costs the broker beyond this is the gRPC door and grpc.aio."""
    import asyncio
    import tempfile

    from broker.core.broker import Broker
    from broker.model import PutEntry
    from broker.storage.rocks import RocksStore

    async def go(tmp: str) -> dict[str, Any]:
        broker = Broker(RocksStore(os.path.join(tmp, "db")), cursor_secret=b"k" * 32)
        await broker.start()
        try:
            await broker.create_stream("core", 1)
            cursor = await broker.get_cursor("core", "0", "LATEST")
            got: asyncio.Queue[int] = asyncio.Queue()

            async def subscriber() -> None:
                async for batch in broker.subscribe(cursor, None, 0):
                    for r in batch.records:
                        got.put_nowait(r.seq)
            task = asyncio.ensure_future(subscriber())
            entry = [PutEntry(os.urandom(W3_RECORD_SIZE), partition_id="0")]
            seqs = []
            for n in range(CORE_WARM_UP + records):
                if n == CORE_WARM_UP:
                    cpu, wall = time.process_time(), time.perf_counter()
                await broker.put_records("core", entry)
                seqs.append(await asyncio.wait_for(got.get(), 10))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        finally:
            await broker.close()
        return {"records": records, "cpu_us_per_record": cpu / records * 1e6,
                "wall_us_per_record": wall / records * 1e6, "in_order": seqs == list(range(len(seqs)))}

    with tempfile.TemporaryDirectory(prefix="sluice-core-") as tmp:
        return asyncio.run(go(tmp))


# -- memory: the server's RSS with N records stored, then over a W1 loop -----------------------

MEMORY_RECORDS = 1_000_000
MEMORY_MINUTES = 5.0
TARGET_RSS_MIB = 300.0
FLAT_SLOPE_MIB_MIN = 2.0    # second-half least-squares slope
FLAT_GROWTH_MIB = 30.0      # median of the last minute - median of the first (single samples swing ±20 MiB)
SETTLE_S = 2.0
SAMPLE_S = 1.0


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

    def start(self) -> RssSampler:
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


def dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:   # the running broker's compactions delete files under us
            pass
    return total


def _stored_total(driver: Driver, stream: str) -> int:
    return sum(n or 0 for n in driver.stored(stream).values())


def memory(driver: Driver, stream: str, bodies: list[Any], per_round: int, records: int, minutes: float,
           data_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """fill: W1 rounds until `records` are stored, SETTLE_S of rest, VmRSS/VmHWM. loop: W1 rounds back
    to back for `minutes`, VmRSS sampled every SAMPLE_S; RSS start/end/min/max, the least-squares
    slope over the second half (the first is warm-up), first/last minute medians."""
    assert driver.pid
    pid = driver.pid
    say(f"fill: W1 until {records:,} records are stored")
    t0, written, rounds = time.perf_counter(), 0, 0
    while written < records:
        w1_round(driver, bodies)
        written, rounds = written + per_round, rounds + 1
    fill_s = time.perf_counter() - t0
    stored = _stored_total(driver, stream)
    if stored != written:
        raise RuntimeError(f"fill: stored {stored:,}, acknowledged {written:,}")
    time.sleep(SETTLE_S)   # let the last flush/compaction and the gRPC threads settle
    mem = status_mib(pid)
    fill = {"records_stored": stored, "rounds": rounds, "seconds": fill_s, "rate": written / fill_s,
            "rss_mib": mem["VmRSS"], "hwm_mib": mem["VmHWM"]}
    say(f"  {stored:,} stored in {fill_s:.1f} s; VmRSS {mem['VmRSS']:.1f} MiB, VmHWM {mem['VmHWM']:.1f} MiB")

    say(f"loop: W1 for {minutes:g} min, VmRSS every {SAMPLE_S:g} s")
    sampler = RssSampler(pid).start()
    try:
        t0, written, rounds = time.perf_counter(), 0, 0
        deadline = t0 + minutes * 60
        while time.perf_counter() < deadline:   # the last round may run past the deadline (~1 s)
            w1_round(driver, bodies)
            written, rounds = written + per_round, rounds + 1
        loop_s = time.perf_counter() - t0
    finally:
        sampler.stop()
    end_stored = _stored_total(driver, stream)
    if end_stored != stored + written:
        raise RuntimeError(f"loop: stored {end_stored:,}, expected {stored + written:,}")
    samples = sampler.samples
    half, last = samples[-1][0] / 2, samples[-1][0]
    rss = [r for _, r in samples]
    first_minute = [r for t, r in samples if t <= 60] or rss[:1]
    last_minute = [r for t, r in samples if t >= last - 60] or rss[-1:]
    loop = {"seconds": loop_s, "rounds": rounds, "records_written": written, "rate": written / loop_s,
            "records_stored_end": end_stored, "rss_start_mib": rss[0], "rss_end_mib": rss[-1],
            "rss_min_mib": min(rss), "rss_max_mib": max(rss),
            "rss_first_minute_median_mib": statistics.median(first_minute),
            "rss_last_minute_median_mib": statistics.median(last_minute),
            "slope_second_half_mib_per_min": slope_mib_per_min([s for s in samples if s[0] >= half]),
            "hwm_end_mib": status_mib(pid)["VmHWM"],
            "data_dir_bytes_end": dir_bytes(data_dir), "samples": samples}
    return {"fill": fill, "loop": loop}


def memory_verdicts(res: dict[str, Any], minutes: float) -> list[tuple[str, str, str]]:
    fill, loop = res["fill"], res["loop"]
    rss_ok = fill["rss_mib"] < TARGET_RSS_MIB
    if fill["records_stored"] < MEMORY_RECORDS:   # fewer records than the target: shown, not judged
        rss_v = f"not judged ({fill['records_stored']:,} < {MEMORY_RECORDS:,} stored)"
    else:
        rss_v = "met" if rss_ok else "NOT MET"
    growth = loop["rss_last_minute_median_mib"] - loop["rss_first_minute_median_mib"]
    slope = loop["slope_second_half_mib_per_min"]
    flat_ok = slope < FLAT_SLOPE_MIB_MIN and growth < FLAT_GROWTH_MIB   # nan slope (too short) -> not met
    flat_v = ("met" if flat_ok else "NOT MET") + ("" if minutes >= 5 else f" (over {minutes:g} min, not 5)")
    return [
        (f"VmRSS < {TARGET_RSS_MIB:g} MiB with {MEMORY_RECORDS:,} records stored",
         f"{fill['rss_mib']:.1f} MiB with {fill['records_stored']:,}", rss_v),
        ((f"flat: 2nd-half slope < {FLAT_SLOPE_MIB_MIN:g} MiB/min and last-minute median - first-minute "
         f"median < {FLAT_GROWTH_MIB:g} MiB"),
         f"{slope:+.2f} MiB/min, {growth:+.1f} MiB", flat_v),
    ]


def _plain_table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def format_memory(res: dict[str, Any], checks: list[tuple[str, str, str]]) -> str:
    fill, loop = res["fill"], res["loop"]
    rows = [("phase", "wall s", "W1 rounds", "records written", "rec/s", "records stored", "VmRSS MiB"),
            ("fill", f"{fill['seconds']:.1f}", str(fill["rounds"]), f"{fill['records_stored']:,}",
             f"{fill['rate']:,.0f}", f"{fill['records_stored']:,}",
             f"{fill['rss_mib']:.1f} ({SETTLE_S:g} s after; VmHWM {fill['hwm_mib']:.1f})"),
            ("loop", f"{loop['seconds']:.1f}", str(loop["rounds"]), f"{loop['records_written']:,}",
             f"{loop['rate']:,.0f}", f"{loop['records_stored_end']:,}",
             (f"start {loop['rss_start_mib']:.1f}, end {loop['rss_end_mib']:.1f}, min {loop['rss_min_mib']:.1f}, "
             f"max {loop['rss_max_mib']:.1f}; VmHWM {loop['hwm_end_mib']:.1f}"))]
    n_half = sum(1 for t, _ in loop["samples"] if t >= loop["samples"][-1][0] / 2)
    return "\n".join([
        _plain_table(rows),
        (f"loop: {len(loop['samples'])} VmRSS samples, second-half slope {loop['slope_second_half_mib_per_min']:+.2f} "
        f"MiB/min ({n_half} samples); data dir at the end {loop['data_dir_bytes_end'] / 2**30:.2f} GiB"),
        "",
        _plain_table([("target", "measured", "verdict"), *checks])])


# -- the Timeplus door: T1-T4 (issue 8), `run.py timeplus` ------------------------------------
#
#   T1 ingest  TP_ROWS rows of the 5-column schema below in compact bodies of TP_BATCH rows, 4
#              producers (one keep-alive connection each), bodies built before the clock; rows/s,
#              batch latency; then the stored count. ClickHouse takes the same rows (JSONEachRow).
#   T2 query   `select * from s` with batching_policy {count: 1, time_ms: 1} read as SSE while one
#              producer ingests a row (index, perf_counter_ns send time) every 2 ms: tail_run.
#   T3 scan    T3_ROWS rows stored, then `select * from table(s) where i < ...` (~10 % kept) read
#              to the final `event: query`; rows scanned/s = stored rows / seconds.
#   T4 memory  a grouped query over rows of T4_KEYS distinct keys, fed at T4_RATE rows/s for M
#              minutes; the broker's VmRSS every second: start, max, end, slope, per-minute medians.
#              The control is the same ingest with no query, on a broker of its own: the log's own
#              growth (6M records in 5 min: memtables, table readers, block cache), so the verdict
#              judges the query by its slope minus the control's.

TP_SCHEMA: tuple[tuple[str, str], ...] = (
    ("s", "string"), ("i", "int64"), ("f", "float64"), ("b", "bool"), ("ts", "datetime64(3)"))
TP_ROWS = 200_000
TP_BATCH = 500
TP_I_RANGE = 1_000_000           # `i` is uniform in [0, TP_I_RANGE): `i < TP_I_RANGE / 10` keeps ~10 %
T2_SCHEMA: tuple[tuple[str, str], ...] = (("seq", "int64"), ("sent", "int64"))
T2_SECONDS = 5.0
T3_ROWS = 1_000_000
T3_BATCH = 10_000                # the fill's compact requests
T3_CUT = TP_I_RANGE // 10
T3_BATCHING = {"count": 10_000, "time_ms": 100}
T4_SCHEMA: tuple[tuple[str, str], ...] = (("k", "string"), ("v", "int64"))
T4_KEYS = 100_000
T4_RATE = 20_000                 # rows/s fed during T4
T4_BATCH = 1_000
T4_MINUTES = 5.0
T4_QUERIES = {
    "tumble": "select k, count(*) from tumble({s}, 1s) group by window_start, k",
    "global": "select k, count(*) from {s} group by k",
}
T4_BATCHING = {"count": 10_000, "time_ms": 500}
TP_QUICK = {"t1_rows": 20_000, "t2_seconds": 1.0, "t3_rows": 100_000, "t4_minutes": 0.25}
_TS0_MS = 1_795_248_000_000      # 2026-11-21 00:00:00 UTC


def make_table_rows(rows: int, seed: int = SEED) -> list[list[Any]]:
    """T1/T3's rows in TP_SCHEMA order, from a fixed seed: s one of KEY_IDS ids, i uniform in
    [0, TP_I_RANGE), f in [0, 1000) to 3 decimals, b a coin, ts one millisecond apart from 2026-11-21."""
    rng = random.Random(seed)
    rand, below = rng.random, rng.randrange
    second = ""
    out: list[list[Any]] = []
    for n in range(rows):
        ms = _TS0_MS + n
        if n % 1000 == 0 or not second:
            second = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000))
        out.append([f"id-{below(KEY_IDS)}", below(TP_I_RANGE), round(rand() * 1000, 3), rand() < 0.5,
                    f"{second}.{ms % 1000:03d}"])
    return out


def t1(driver: TableDriver, table: str, bodies: list[bytes], rows: int) -> Row:
    """PRODUCERS threads released together, producer p POSTing bodies p, p+P, ..., each waiting for
    its answer; then the stored count must equal `rows`."""
    row = Row(driver.system, driver.door, driver.durability, "T1 ingest")
    producers = [driver.producer(table, [bodies[i] for i in producer_batches(len(bodies), p)])
                 for p in range(PRODUCERS)]
    meter = CpuMeter(driver.pid).start()
    errors = run_threads([p.run for p in producers])
    meter.stop()
    lat = [x for p in producers for x in p.latencies]
    row.records = rows if not errors else sum(len(p.latencies) for p in producers) * TP_BATCH
    row.measure(meter)
    row.rate = row.records / meter.wall if meter.wall > 0 else 0.0
    row.p50_ms, row.p99_ms = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
    stored = None if errors else driver.count(table)
    row.extra = {"requests": len(lat), "rows_per_request": TP_BATCH, "body_bytes": sum(len(b) for b in bodies),
                 "stored": stored, "count_by": driver.count_method}
    if errors or stored != rows:
        row.ok, row.note = False, (errors[0] if errors else f"stored={stored}/{rows}")
    return row


def t2(driver: QueryDriver, stream: str, seconds: float, rate: float = 1 / W3_INTERVAL_S) -> Row:
    """tail_run over the Timeplus door: the consumer a streaming `select * from stream`, the
    producer one compact row (index, send time) per ingest request; latency = receive - send."""
    driver.create_table(stream, T2_SCHEMA)
    row = Row(driver.system, driver.door, driver.durability, "T2 query (SSE)")
    meter = CpuMeter(driver.pid).start()
    res = tail_run(driver, stream, 0, "sse", seconds, rate)
    meter.stop()
    lat = res.tally.latencies
    row.records = len(lat)
    row.measure(meter)
    row.p50_ms, row.p99_ms = pct(lat, 0.5) / 1e6, pct(lat, 0.99) / 1e6
    row.extra = {"sent": res.sent, "received": res.tally.received, "rate": rate, "batching_policy": {
                 "count": 1, "time_ms": 1}, "ingest_p50_ms": pct(res.put_latencies, 0.5),
                 "p90_ms": pct(lat, 0.9) / 1e6, "max_ms": pct(lat, 1.0) / 1e6, "late_sends": res.late_sends}
    if res.verdict != "ok":
        row.ok, row.note = False, res.verdict
    return row


def fill(driver: TableDriver, table: str, bodies: list[bytes]) -> float:
    """Every body ingested by PRODUCERS threads (unmeasured set-up); returns the seconds it took."""
    producers = [driver.producer(table, [bodies[i] for i in producer_batches(len(bodies), p)])
                 for p in range(PRODUCERS)]
    t0 = time.perf_counter()
    errors = run_threads([p.run for p in producers])
    if errors:
        raise RuntimeError(f"fill: {errors[0]}")
    return time.perf_counter() - t0


def t3(driver: QueryDriver, stream: str, bodies: list[bytes], data: list[list[Any]]) -> Row:
    """The rows stored, then one bounded `select * from table(stream) where i < T3_CUT`, timed from
    the request to the final `event: query`; every matching row must come back."""
    driver.create_table(stream, TP_SCHEMA)
    fill_s = fill(driver, stream, bodies)
    stored = driver.count(stream)
    expected = sum(1 for r in data if r[1] < T3_CUT)
    sql = f"select * from table({stream}) where i < {T3_CUT}"
    row = Row(driver.system, driver.door, driver.durability, "T3 scan")
    meter = CpuMeter(driver.pid).start()
    result, final = driver.bounded(sql, T3_BATCHING)
    meter.stop()
    row.records = stored
    row.measure(meter)
    row.rate = stored / meter.wall if meter.wall > 0 else 0.0
    row.extra = {"sql": sql, "batching_policy": T3_BATCHING, "rows_returned": len(result), "expected": expected,
                 "stored": stored, "fill_seconds": fill_s, "fill_rate": len(data) / fill_s,
                 "final_status": final.get("status"), "count_by": driver.count_method, "framing": driver.framing}
    if stored != len(data) or len(result) != expected:
        row.ok, row.note = False, f"stored={stored}/{len(data)} returned={len(result)}/{expected}"
    return row


def t4_bodies(driver: QueryDriver, keys: int, batch: int = T4_BATCH) -> list[bytes]:
    """Compact bodies covering keys k-0 .. k-(keys-1) once, `batch` rows each, in a shuffled order."""
    names = [f"k-{n}" for n in range(keys)]
    random.Random(SEED).shuffle(names)
    return driver.bodies("", [c for c, _ in T4_SCHEMA], [[k, n] for n, k in enumerate(names)], batch)


def t4(driver: QueryDriver, stream: str, minutes: float, keys: int, rate: float, query: str | None,
       say: Callable[[str], None]) -> tuple[Row, dict[str, Any]]:
    """A grouped query (T4_QUERIES[query]) read by a thread of its own while one producer feeds
    `rate` rows/s cycling over `keys` distinct keys for `minutes`; the broker's VmRSS every second.
    `query` None is the control: the same ingest and sampling, no query."""
    assert driver.pid, "T4 needs the broker's pid"
    driver.create_table(stream, T4_SCHEMA)
    bodies = t4_bodies(driver, keys)
    sql = T4_QUERIES[query].format(s=stream) if query else ""
    time.sleep(SETTLE_S)
    rss0 = status_mib(driver.pid)["VmRSS"]
    q = driver.query(sql, T4_BATCHING) if query else None
    seen: dict[str, int] = {"rows": 0}
    failure: list[str] = []

    def read() -> None:
        assert q is not None   # started only with a query
        try:
            for name, data, _ in q.events():
                seen[name] = seen.get(name, 0) + 1
                if name == "message":
                    seen["rows"] += len(orjson.loads(data))
        except Exception as exc:  # reported in the row
            if not q.closing:
                failure.append(f"query: {type(exc).__name__}: {exc}"[:300])

    reader = threading.Thread(target=read, daemon=True)
    if q is not None:
        reader.start()
    say(f"T4: {sql or 'control, no query'!r}, {rate:,.0f} rows/s over {keys:,} keys for {minutes:g} min, "
        f"VmRSS every {SAMPLE_S:g} s")
    send, close = driver.sender(stream)
    sampler = RssSampler(driver.pid).start()
    meter = CpuMeter(driver.pid).start()
    sent, late = 0, 0
    try:
        interval = T4_BATCH / rate
        t0 = time.perf_counter()
        deadline = t0 + minutes * 60
        n = 0
        while not failure:
            due = t0 + n * interval
            now = time.perf_counter()
            if due >= deadline:
                break
            if due > now:
                time.sleep(due - now)
            elif now - due > 1.0:
                late += 1
            send(bodies[n % len(bodies)])
            sent += T4_BATCH
            n += 1
    except Exception as exc:  # reported in the row
        failure.append(f"ingest: {type(exc).__name__}: {exc}"[:300])
    finally:
        meter.stop()
        sampler.stop()
        close()
        if q is not None:
            time.sleep(min(2.0, minutes * 60 / 10))   # the last window closes / last emission
            q.closing = True
            with contextlib.suppress(Exception):
                q.cancel()
            reader.join(5)
            q.close()
            reader.join(5)
    samples = sampler.samples
    rss = [r for _, r in samples]
    half = samples[-1][0] / 2
    row = Row(driver.system, driver.door, driver.durability, f"T4 memory ({query or 'control'})")
    row.records = sent
    row.measure(meter)
    row.rate = sent / meter.wall if meter.wall > 0 else 0.0
    res = {"sql": sql, "keys": keys, "rate": rate, "minutes": minutes, "rows_sent": sent, "late_batches": late,
           "result_rows": seen.pop("rows"), "events": seen, "rss_before_query_mib": rss0,
           "rss_start_mib": rss[0], "rss_max_mib": max(rss), "rss_min_mib": min(rss), "rss_end_mib": rss[-1],
           "slope_second_half_mib_per_min": slope_mib_per_min([s for s in samples if s[0] >= half]),
           "rss_minute_medians_mib": minute_medians(samples),
           "hwm_end_mib": status_mib(driver.pid)["VmHWM"], "samples": samples}
    row.extra = {k: v for k, v in res.items() if k != "samples"}
    if failure:
        row.ok, row.note = False, failure[0]
    elif query and not res["result_rows"]:
        row.ok, row.note = False, "the query returned no rows"
    return row, res


def minute_medians(samples: list[tuple[float, float]]) -> list[float]:
    """The median VmRSS of each whole or partial minute of (seconds, MiB) samples."""
    minutes: dict[int, list[float]] = {}
    for t, r in samples:
        minutes.setdefault(int(t // 60), []).append(r)
    return [statistics.median(v) for _, v in sorted(minutes.items())]


def t4_verdict(res: dict[str, Any], control: dict[str, Any] | None, query: str, minutes: float,
               full_minutes: float = T4_MINUTES) -> tuple[str, str, str]:
    """RSS bounded under the query: its 2nd-half slope minus the control's (the log's own growth
    under the same ingest) below FLAT_SLOPE_MIB_MIN; without a control, the query's slope alone."""
    slope = res["slope_second_half_mib_per_min"]
    short = "" if minutes >= full_minutes else f" (over {minutes:g} min, not {full_minutes:g})"
    span = f"{res['rss_start_mib']:.1f} -> max {res['rss_max_mib']:.1f} -> {res['rss_end_mib']:.1f} MiB"
    if control is None:
        return (f"T4 RSS bounded: 2nd-half slope < {FLAT_SLOPE_MIB_MIN:g} MiB/min", f"{span}, {slope:+.2f} MiB/min",
                ("met" if slope < FLAT_SLOPE_MIB_MIN else "NOT MET") + short)
    own = slope - control["slope_second_half_mib_per_min"]   # nan (too short) -> not met
    return (f"T4 RSS bounded: {query} query's 2nd-half slope - control's < {FLAT_SLOPE_MIB_MIN:g} MiB/min",
            f"{slope:+.2f} - {control['slope_second_half_mib_per_min']:+.2f} = {own:+.2f} MiB/min; end "
            f"{res['rss_end_mib']:.1f} vs {control['rss_end_mib']:.1f} MiB "
            f"({res['rss_end_mib'] - control['rss_end_mib']:+.1f})", ("met" if own < FLAT_SLOPE_MIB_MIN else "NOT MET")
            + short)


def format_verdicts(checks: list[tuple[str, str, str]]) -> str:
    return _plain_table([("target", "measured", "verdict"), *checks])


# -- run.py sources: S1, a JetStream source draining a stream into Sluice ---------------------------

S1_MESSAGES = 200_000
S1_QUICK = 20_000
S1_SIZE = 1024                 # bytes per JSON message
S1_SCHEMA: tuple[tuple[str, str], ...] = (("i", "int64"), ("device", "string"), ("value", "float64"),
                                          ("ok", "bool"), ("note", "string"))
S1_POLL_S = 0.01
S1_STALL_S = 30.0


def s1_messages(n: int, size: int = S1_SIZE, seed: int = SEED) -> list[bytes]:
    """n JSON objects of exactly `size` bytes (fixed seed): S1_SCHEMA's fields, `note` padding them
    with letters sliced from a few random pools (random text without a random draw per byte)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    pools = ["".join(rng.choices(letters, k=2 * size)) for _ in range(64)]
    out = []
    for i in range(n):
        obj = {"i": i, "device": f"device_{rng.randrange(100)}", "value": round(rng.uniform(0, 100), 3),
               "ok": rng.random() < 0.5, "note": ""}
        pad = size - len(orjson.dumps(obj))
        if pad < 0:
            raise ValueError(f"messages of {size} bytes are too small for the fields")
        start = rng.randrange(size)
        obj["note"] = pools[i % len(pools)][start:start + pad]
        out.append(orjson.dumps(obj))
    return out


def s1_sluice(tp: Any, table: str, body: dict[str, Any], n: int, nats_pid: int | None, label: str) -> Row:
    """Create the source (the clock starts just before) and poll its counters every 10 ms until it
    wrote n rows; then the stream's own count must be n. server cpu = the broker; the nats-server's
    in extra."""
    nats0 = proc_cpu_seconds(nats_pid)
    meter = CpuMeter(tp.pid).start()
    sid = tp.create_source(body)["id"]
    last, stall_at = -1, 0.0
    while True:
        got = tp.source(sid)
        written = got["stats"]["rows_written"]
        if written >= n:
            break
        if written != last:
            last, stall_at = written, time.monotonic() + S1_STALL_S
        elif time.monotonic() > stall_at:
            raise RuntimeError(f"no progress for {S1_STALL_S:g} s at {written:,} rows: {got['status']} "
                               f"{got['message']}")
        time.sleep(S1_POLL_S)
    meter.stop()
    nats_cpu = proc_cpu_seconds(nats_pid) - nats0
    stored = tp.count(table)
    final = tp.source(sid)
    tp.delete_source(sid)
    row = Row("Sluice", "nats_jetstream source", tp.durability, label, records=n).measure(meter)
    row.rate, row.mb_s = n / meter.wall, n * S1_SIZE / meter.wall / 1e6
    row.extra.update({"nats_server_cpu_s": nats_cpu, "stored": stored, "stats": final["stats"],
                      "properties": body["properties"]})
    if stored != n or final["stats"]["error_count"]:
        row.ok, row.note = False, f"stored {stored:,} of {n:,}, {final['stats']['error_count']} errors"
    return row


def s1_peer(drain: Any, stream: str, consumer: str, n: int, batch: int, nats_pid: int | None, label: str) -> Row:
    """The same stream drained by a plain nats-py pull consumer in this process (fetch + ack): client
    cpu = that consumer, server cpu = the nats-server."""
    meter = CpuMeter(nats_pid).start()
    got = drain.drain(stream, consumer, n, batch)
    meter.stop()
    row = Row("nats-py", "pull consumer (fetch+ack)", "-", label, records=got).measure(meter)
    row.rate, row.mb_s = got / meter.wall, got * S1_SIZE / meter.wall / 1e6
    row.extra["batch"] = batch
    if got != n:
        row.ok, row.note = False, f"drained {got:,} of {n:,}"
    return row
