"""`bench/run.py cluster` (issue 13): W1 put and W2 read through TWO brokers over a 3-node JetStream
cluster (R=3, broker/cluster.py's SluiceCluster on loopback), next to the embedded store (one broker,
RocksDB, WAL) and to JetStream driven directly by nats-py (the suite's `Nats` driver, its stream R=3
on the same cluster), all in one run, with the CPU split per process: brokers, nats-servers, client.

Two brokers: W1's producers alternate between broker a and b (producer p -> broker p % 2), and so do
W2's readers (partition p -> broker p % 2); the stream is created through broker a (b learns of it
from the catalogue events) and counted through a. `--restart-before-read yes` restarts both brokers
after the stream is created and between W1 and its count/W2 (never inside a measurement): what the
runs before the cross-broker notifications needed, kept to compare.

Every figure is for this machine in this run; compare within a run (the ratios), not across runs.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import drivers
import workloads as wl

from broker.cluster import SluiceCluster

ROLES = ("brokers", "nats", "client")


LAST_CPU: dict[int, float] = {}   # CPU seconds of a process, read just before it was stopped


class CpuSplit:
    """CPU seconds per role (brokers, nats-servers, this client process) between start() and stop(), of
    the processes running at start() (a broker restarted in between counts up to its stop)."""

    def __init__(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}

    @staticmethod
    def _cpu(pid: int) -> float:
        now = wl.proc_cpu_seconds(pid)
        return LAST_CPU.get(pid, 0.0) if math.isnan(now) else now

    def start(self) -> CpuSplit:
        self._roles = self.pids()
        self._start = {pid: self._cpu(pid) for pids in self._roles.values() for pid in pids}
        self._client = time.process_time()
        return self

    def stop(self) -> CpuSplit:
        self.used = {role: sum(self._cpu(pid) - self._start[pid] for pid in pids) for role, pids in self._roles.items()}
        self.used["client"] = time.process_time() - self._client
        return self


class SluiceTwoBrokers(drivers.SluiceGrpc):
    """The suite's gRPC driver, spread over several brokers: producers and readers take them in turn."""

    def __init__(self, cluster: SluiceCluster, durability: str, restart_before_read: bool, brokers: int = 2) -> None:
        self.cluster, self.targets = cluster, cluster.grpc_targets[:brokers]
        self.restart_before_read, self.dirty = restart_before_read, False
        self._next_producer = self._next_reader = 0
        super().__init__(self.targets[0], durability, None)

    def create_stream(self, stream: str, partitions: int) -> None:
        """Through broker a (the others learn of it from the catalogue events; restarted with --restart-before-read)."""
        super().create_stream(stream, partitions)
        self.dirty = True
        self._settle()

    def producer(self, bodies: list[bytes]) -> Any:
        self.target = self.targets[self._next_producer % len(self.targets)]
        self._next_producer += 1
        self.dirty = True
        return super().producer(bodies)

    def _settle(self) -> None:
        """Before counting or reading what both brokers wrote: restart them (see the module doc)."""
        if not (self.dirty and self.restart_before_read):
            return
        self.channel.close()
        for broker in self.cluster.brokers:
            if broker.proc:
                LAST_CPU[broker.proc.pid] = wl.proc_cpu_seconds(broker.proc.pid)
            broker.stop(30)
            self.cluster.start_broker(broker)   # same ports, so the targets stay valid
        self.channel = drivers._channel(self.targets[0])
        self.stub = drivers.sluice_pb2_grpc.SluiceStub(self.channel)
        self.dirty = False

    def stored(self, stream: str) -> dict[str, int | None]:
        """Each partition's count as the broker that knows most: a broker's own appends are in its
        head when they are acknowledged, the other's a notification later (at most once, and in
        flight right after W1) - the last appender of a partition always knows its exact head."""
        self._settle()
        counts: dict[str, int | None] = {}
        for target in self.targets:
            channel = drivers._channel(target)
            try:
                stub = drivers.sluice_pb2_grpc.SluiceStub(channel)
                desc = stub.DescribeStream(drivers.pb.DescribeStreamRequest(stream_name=stream, limit=1000),
                                           timeout=drivers.CALL_TIMEOUT)
            finally:
                channel.close()
            for part in desc.partitions:
                key = str(part.partition_id)
                counts[key] = max(counts.get(key) or 0, part.next_seq - part.first_seq)
        return counts

    def reader(self, stream: str, partition: str, expected: int | None, counts: dict[str, int]) -> Callable[[], None]:
        self._settle()
        self.target = self.targets[self._next_reader % len(self.targets)]
        self._next_reader += 1
        return super().reader(stream, partition, expected, counts)


class NatsR3(drivers.Nats):
    """The suite's nats-py driver with its stream replicated like the brokers' (R=3) on the cluster."""

    durability = "file R=3"

    def create_stream(self, stream: str, partitions: int) -> None:
        from nats.js.api import StorageType, StreamConfig

        async def add(js: Any) -> None:
            await js.add_stream(StreamConfig(name=stream.upper(), subjects=[f"{stream}.*"], storage=StorageType.FILE,
                                             num_replicas=3))
        drivers._nats_run(self.url, add)


def _measured(driver: Any, split_pids: Callable[[], dict[str, list[int]]], stream: str, data: wl.Dataset,
              workloads: list[str], label: str) -> list[tuple[wl.Row, dict[str, float]]]:
    out: list[tuple[wl.Row, dict[str, float]]] = []
    bodies = driver.bodies(stream, data)
    driver.create_stream(stream, wl.PARTITIONS)
    if "w1" in workloads:
        print(f"{label}: W1 put {data.records:,} records", flush=True)
        split = CpuSplit(split_pids).start()
        row = wl.w1(driver, stream, bodies, data)
        out.append((row, split.stop().used))
        print(f"  {row.rate:,.0f} rec/s {'ok' if row.ok else 'FAIL ' + row.note}", flush=True)
        if not row.ok and isinstance(driver, SluiceTwoBrokers):   # what the brokers said
            for broker in driver.cluster.brokers:
                said = broker.log_path.read_text().splitlines()[-8:] if broker.log_path else []
                print(f"  broker {broker.name}'s log ends:\n    " + "\n    ".join(said), flush=True)
    if "w2" in workloads:
        print(f"{label}: W2 read", flush=True)
        driver.stored(stream)   # a restart, when one is due, before the meter starts
        split = CpuSplit(split_pids).start()
        row = wl.w2(driver, stream, data.records)
        out.append((row, split.stop().used))
        print(f"  {row.rate:,.0f} rec/s {'ok' if row.ok else 'FAIL ' + row.note}", flush=True)
    return out


@contextmanager
def _cluster(tmp: Path) -> Iterator[SluiceCluster]:
    cluster = SluiceCluster(tmp / "cluster", prefix="bench", broker_args=drivers.BROKER_ARGS, log_files=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = wl.make_dataset(args.records)
    results: list[tuple[str, wl.Row, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        if "embedded" in args.systems:
            with drivers.sluice_broker("wal") as broker:
                assert broker.proc
                driver = drivers.SluiceGrpc(broker.grpc_target, "wal", broker.proc.pid)
                try:
                    pid = broker.proc.pid
                    for row, used in _measured(driver, lambda: {"brokers": [pid], "nats": []}, "w1e", data,
                                               args.workloads, "Sluice, 1 broker, embedded RocksDB"):
                        results.append(("Sluice, 1 broker, embedded RocksDB (WAL)", row, used))
                finally:
                    driver.close()
        if {"sluice", "sluice1", "nats"} & set(args.systems):
            with _cluster(Path(tmp)) as cluster:
                def pids() -> dict[str, list[int]]:   # after a restart the brokers have new pids
                    return {"brokers": [b.proc.pid for b in cluster.brokers if b.proc],
                            "nats": [n.proc.pid for n in cluster.nats.nodes if n.proc]}
                if "sluice" in args.systems:
                    two = SluiceTwoBrokers(cluster, "jetstream R=3", args.restart_before_read == "yes")
                    try:
                        for row, used in _measured(two, pids, "w1c", data, args.workloads,
                                                   "Sluice, 2 brokers, JetStream R=3"):
                            results.append(("Sluice, 2 brokers, 3-node JetStream R=3", row, used))
                    finally:
                        two.close()
                if "sluice1" in args.systems:   # the same, one broker: no numbering conflicts between brokers
                    one = SluiceTwoBrokers(cluster, "jetstream R=3", args.restart_before_read == "yes", brokers=1)
                    try:
                        for row, used in _measured(one, pids, "w1o", data, args.workloads,
                                                   "Sluice, 1 broker, JetStream R=3"):
                            results.append(("Sluice, 1 broker, 3-node JetStream R=3", row, used))
                    finally:
                        one.close()
                if "nats" in args.systems:
                    first = cluster.nats.nodes[0]
                    assert first.proc
                    direct = NatsR3(first.port, first.proc.pid)
                    for row, used in _measured(direct, pids, "w1n", data, args.workloads,
                                               "nats-py direct, 3-node JetStream R=3"):
                        results.append(("nats-py direct, 3-node JetStream R=3", row, used))
    return {"records": data.records, "rows": [
        {**row.as_dict(), "label": system, "cpu_split_s": used} for system, row, used in results]}


def table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = ["| system | workload | rec/s | p50 / p99 batch ms | CPU s: brokers | nats-servers | client | "
             "server CPU µs/record | ok |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        used = r["cpu_split_s"]
        server = used.get("brokers", 0.0) + used.get("nats", 0.0)
        per = server / r["records"] * 1e6 if r["records"] else math.nan
        lat = f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}" if r.get("p50_ms") is not None else "-"
        lines.append(f"| {r['label']} | {r['workload']} | {r['rate']:,.0f} | {lat} | {used.get('brokers', 0):.2f} | "
                     f"{used.get('nats', 0):.2f} | {used.get('client', 0):.2f} | {per:.1f} | "
                     f"{'yes' if r['ok'] else 'NO: ' + r['note']} |")
    by = {(r["label"].split(",")[0], r["workload"]): r["rate"] for r in rows if r["ok"]}
    lines.append("")
    for workload in ("W1 put", "W2 read"):
        s = next((r["rate"] for r in rows if r["ok"] and r["workload"] == workload and "embedded" in r["label"]), None)
        n = by.get(("nats-py direct", workload))
        for brokers in ("2 brokers", "1 broker, 3-node"):
            two = [r["rate"] for r in rows if r["ok"] and r["workload"] == workload and brokers in r["label"]]
            if two and n:
                lines.append(f"{workload}: Sluice ({brokers.split(',')[0]}) on the cluster / nats-py direct = "
                             f"{two[0] / n:.2f}" + (f"; / embedded = {two[0] / s:.2f}" if s else ""))
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20,000 records (a smoke run)")
    p.add_argument("--records", type=int, help=f"W1 records (default {wl.W1_RECORDS:,})")
    p.add_argument("--workloads", default="w1,w2", help="comma-separated: w1, w2 (default both)")
    p.add_argument("--systems", default="embedded,sluice,sluice1,nats",
                   help="comma-separated: embedded (one broker, RocksDB), sluice (two brokers on the cluster), "
                        "sluice1 (one broker on the cluster), nats (nats-py direct on the cluster); default all")
    p.add_argument("--restart-before-read", choices=("yes", "no"), default="no",
                   help="restart both brokers after creating the stream and between W1 and its count/W2 "
                        "(default no: see bench/cluster.py)")
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.records = args.records or (20_000 if args.quick else wl.W1_RECORDS)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.systems = [s for s in args.systems.split(",") if s]
    if set(args.workloads) - {"w1", "w2"} or set(args.systems) - {"embedded", "sluice", "sluice1", "nats"}:
        p.error("--workloads takes w1,w2; --systems embedded,sluice,sluice1,nats")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report = run(args)
    print(table(report))
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cluster-{started}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\n{path}")
    return 0 if all(r["ok"] for r in report["rows"]) else 1
