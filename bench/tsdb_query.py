#!/usr/bin/env python3
"""Query latency of the OpenTSDB door's engine (broker/tsdb/query.py), in-process over a real
RocksStore: one series of 1,000,000 points (one a second), optionally beside other series in the
same stream, then `run_query` timed for a few query shapes (median of --repeat runs, after one
warm-up run). No HTTP: the figure is the engine's (read, decode, aggregate, build the dps dict);
the door adds the JSON rendering. bench/run.py tsdb measures the same over HTTP.

    .venv/bin/python bench/tsdb_query.py                 # 1M points, no other series
    .venv/bin/python bench/tsdb_query.py --noise 1000000 # + 1M points of 10,000 other series
    .venv/bin/python bench/tsdb_query.py --points 100000 --repeat 3   # a smoke run

Points are written the way the put path writes them: records laid out by series.record_data,
through Broker.append_keyed (routed by the series key's hash), the broker's clock set to each
request's newest point as if the points were written as they happened.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.core.broker import Broker
from broker.core.routing import key_hash
from broker.storage.rocks import RocksStore
from broker.tsdb import query
from broker.tsdb.series import NUMERIC, SeriesRegistry, record_data, series_key

BASE_MS = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000
PER_PUT = 500


async def write(broker: Broker, clock: dict[str, int], points: list[tuple[str, int, float, dict[str, str]]]) -> None:
    for lo in range(0, len(points), PER_PUT):
        chunk = points[lo:lo + PER_PUT]
        clock["t"] = max(p[1] for p in chunk)
        await broker.append_keyed("tsdb", [(key_hash(series_key(m, tags)), record_data(m, ts, v, tags))
                                           for m, ts, v, tags in chunk], [p[1] for p in chunk])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=1_000_000, help="points of the queried series")
    ap.add_argument("--noise", type=int, default=0, help="points of 10,000 other series, written interleaved")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-tsdb-bench-") as tmp:
        store = RocksStore(str(Path(tmp) / "db"))
        clock = {"t": BASE_MS}
        broker = Broker(store, cursor_secret=b"bench", clock_ms=lambda: clock["t"])
        await broker.start()
        config = await broker.create_stream("tsdb", 8)
        registry = SeriesRegistry(broker, "default", config.stream_id)
        await registry.load()
        tags = {"host": "web01", "dc": "lga"}
        await registry.fix({series_key("sys.cpu.user", tags): NUMERIC})
        await registry.fix({series_key("sys.cpu.user", {"host": f"h{i}", "dc": "lga"}): NUMERIC
                            for i in range(10_000)} if args.noise else {})
        t0 = time.perf_counter()
        noise = 0
        for lo in range(0, args.points, 10_000):   # the other series' points interleaved in time
            n = min(10_000, args.points - lo)
            pts = [("sys.cpu.user", BASE_MS + i * 1000, float(i % 100), tags) for i in range(lo, lo + n)]
            k = args.noise * (lo + n) // args.points - noise
            pts += [("sys.cpu.user", BASE_MS + (lo + j * n // k) * 1000, 1.0,
                     {"host": f"h{(noise + j) % 10_000}", "dc": "lga"}) for j in range(k)]
            noise += k
            await write(broker, clock, sorted(pts, key=lambda p: p[1]))
        print(f"wrote {args.points:,} points of one series + {noise:,} of others in {time.perf_counter() - t0:.1f} s")
        end_s = (BASE_MS + args.points * 1000) // 1000
        one = {"host": "web01", "dc": "lga"}
        shapes: dict[str, dict[str, Any]] = {
            "sum, raw (every point out)": {"aggregator": "sum", "tags": one},
            "sum:1m-avg": {"aggregator": "sum", "downsample": "1m-avg", "tags": one},
            "sum:1h-max": {"aggregator": "sum", "downsample": "1h-max", "tags": one},
            "count:0all-count": {"aggregator": "count", "downsample": "0all-count", "tags": one},
            "sum:rate:1m-avg": {"aggregator": "sum", "downsample": "1m-avg", "rate": True, "tags": one},
        }
        if args.noise:   # every series of the metric: all partitions; zimsum: the noise series are
            # sparse over the whole range, so lerping them (sum) would take 10,000 x 16,667 values: a 413
            shapes["zimsum:1m-avg, all series"] = {"aggregator": "zimsum", "downsample": "1m-avg"}
            shapes["sum:1h-sum by host"] = {"aggregator": "sum", "downsample": "1h-sum", "tags": {"host": "*"}}
        now = BASE_MS + args.points * 1000 + 1000
        for name, sub in shapes.items():
            body = {"start": BASE_MS // 1000, "end": end_s, "queries": [{"metric": "sys.cpu.user", **sub}]}
            times = []
            for r in range(args.repeat + 1):
                t0 = time.perf_counter()
                out = await query.run_query(broker, registry, config, body, now)
                if r:
                    times.append(time.perf_counter() - t0)
            dps = sum(len(o["dps"]) for o in out)
            print(f"{name:28s} median {statistics.median(times) * 1000:7.0f} ms  "
                  f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}; {dps:,} dps)")
        await broker.close()
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
