"""Push across brokers (issue 13 point 4): two brokers with `--store jetstream` on one single-node
nats-server (R=1); a producer puts one record every `--interval-ms` through broker A (gRPC
PutRecords) while a gRPC Subscribe consumer reads the partition through broker B (woken by A's
core-NATS notification) or through A itself (woken by its own write path), modes alternating.
Prints put-to-receive latency (p50/p99/max, the put call included) per mode and the brokers' CPU.

    .venv/bin/python bench/cross_push.py [--seconds 5] [--interval-ms 2] [--rounds 2]
"""
from __future__ import annotations

import argparse
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import drivers
import workloads as wl

from client import Client

_STAMP = struct.Struct(">d")


def one_mode(producer: Client, consumer: Client, stream: str, n: int, interval_s: float) -> list[float]:
    producer.create_stream(stream, 1)
    cursor = consumer.get_cursor(stream, 0, "LATEST")
    latencies: list[float] = []
    done = threading.Event()

    def consume() -> None:
        for page in consumer.subscribe(cursor=cursor):
            now = time.perf_counter()
            latencies.extend(now - _STAMP.unpack_from(r.data)[0] for r in page.records)
            if len(latencies) >= n:
                break
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(0.3)   # the Subscribe call is open (its cursor was taken before: nothing is missed either way)
    start = time.perf_counter()
    for i in range(n):
        pause = start + i * interval_s - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        producer.put_records(stream, [_STAMP.pack(time.perf_counter()) + bytes(56)], partition_id=0)
    if not done.wait(30):
        raise RuntimeError(f"{stream}: {len(latencies)} of {n} records arrived")
    return sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--interval-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    n = int(args.seconds * 1000 / args.interval_ms)
    extra = ("--store", "jetstream", "--replicas", "1", "--nats-prefix", "crosspush")
    with drivers.nats_server(max_payload_mb=8) as nats_srv, \
            drivers.sluice_broker("wal", extra=(*extra, "--nats-servers", nats_srv.url)) as a, \
            drivers.sluice_broker("wal", extra=(*extra, "--nats-servers", nats_srv.url)) as b:
        assert a.proc and b.proc
        pids = {"broker A": a.proc.pid, "broker B": b.proc.pid, "nats-server": nats_srv.pid}
        before = {k: wl.proc_cpu_seconds(p) for k, p in pids.items()}
        print(f"one record every {args.interval_ms:g} ms for {args.seconds:g} s through broker A, "
              f"push consumer on B or on A, {args.rounds} rounds")
        print("consumer             | records | p50 ms | p99 ms | max ms")
        with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
            for r in range(args.rounds):
                for label, consumer in (("on B (other broker)", cb), ("on A (same broker)", ca)):
                    lat = one_mode(ca, consumer, f"x{r}{label[3]}", n, args.interval_ms / 1000)
                    print(f"{label:20} | {len(lat):7,} | {lat[len(lat) // 2] * 1e3:6.2f} | "
                          f"{lat[int(len(lat) * 0.99)] * 1e3:6.2f} | {lat[-1] * 1e3:6.2f}")
        print("CPU s over all rounds: " + ", ".join(f"{k} {wl.proc_cpu_seconds(p) - before[k]:.2f}"
                                                   for k, p in pids.items()))


if __name__ == "__main__":
    main()
