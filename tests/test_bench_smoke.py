"""bench/run.py, the one benchmark, still runs and reports real figures: a quick suite (W1/W2/W3 on
both doors, WAL only), the suite against an already running broker, and a short memory run."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from broker.launcher import BrokerProcess

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "bench" / "run.py")
COLUMNS = ("system", "door", "durability", "workload", "records", "rec/s", "MB/s", "p50 ms", "p99 ms", "wall s",
           "client cpu s", "server cpu s", "ok")
ROW_KEYS = {"system", "door", "durability", "workload", "records", "seconds", "rate", "mb_s", "p50_ms", "p99_ms",
            "client_cpu_s", "server_cpu_s", "ok", "note", "extra"}


def _bench(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # run from elsewhere: the script must find the repository and start its broker on its own
    out = subprocess.run([sys.executable, RUN, *args, "--results-dir", str(tmp_path / "results")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    return out


def _table(stdout: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """The printed table: (door, durability, workload) -> {column: cell}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split("|")[0].strip() == "system")
    assert [c.strip() for c in lines[start].split("|")] == list(COLUMNS)
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = dict(zip(COLUMNS, (c.strip() for c in line.split("|"))))
        rows[(cells["door"], cells["durability"], cells["workload"])] = cells
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def _check_figures(rows: dict[tuple[str, str, str], dict[str, str]]) -> None:
    for key, r in rows.items():
        assert r["ok"] == "ok", key
        assert _num(r["records"]) > 0 and _num(r["wall s"]) > 0, key
        if key[2].startswith(("W3", "W6")):
            assert r["rec/s"] == "-" and 0 < _num(r["p50 ms"]) <= _num(r["p99 ms"]), key
        else:
            assert _num(r["rec/s"]) > 0 and _num(r["MB/s"]) > 0, key
        if key[2] == "W1 put":   # batch latency
            assert 0 < _num(r["p50 ms"]) <= _num(r["p99 ms"]), key


def _result(tmp_path: Path, pattern: str = "*.json") -> dict:
    [path] = list((tmp_path / "results").glob(pattern))
    return json.loads(path.read_text())


def test_suite_quick_both_doors(tmp_path):
    """make bench's runner, quick and WAL only: W1/W2/W3 over gRPC and REST, a table and a JSON file."""
    out = _bench(tmp_path, "--quick", "--durability", "wal", "--w3-seconds", "0.5", "--workloads", "w1,w2,w3t")
    rows = _table(out.stdout)
    assert set(rows) == {("gRPC", "wal", "W1 put"), ("gRPC", "wal", "W2 read"), ("gRPC", "wal", "W3t push"),
                         ("gRPC", "wal", "W3t long-poll"), ("REST", "wal", "W1 put"), ("REST", "wal", "W2 read"),
                         ("REST", "wal", "W3t long-poll")}, out.stdout
    _check_figures(rows)
    for door in ("gRPC", "REST"):
        put, read = rows[(door, "wal", "W1 put")], rows[(door, "wal", "W2 read")]
        assert _num(put["records"]) == _num(read["records"]) == 20_000
        assert _num(rows[(door, "wal", "W3t long-poll")]["records"]) == 250   # 0.5 s at 500 records/s, all received

    doc = _result(tmp_path)
    assert {"started_utc", "command", "cpus", "loadavg_before", "config", "rows", "ratios"} <= set(doc)
    assert doc["config"]["records"] == 20_000 and doc["config"]["seed"] == 20261121
    assert doc["config"]["doors"] == ["grpc", "rest"] and doc["config"]["durability"] == ["wal"]
    assert len(doc["rows"]) == 7 and doc["ratios"] == []
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r) and r["ok"] and r["system"] == "Sluice", r
        assert r["client_cpu_s"] is not None and r["server_cpu_s"] is not None, r
    w1 = next(r for r in doc["rows"] if r["door"] == "gRPC" and r["workload"] == "W1 put")
    assert w1["extra"] == {"batches": 40, "failed_records": 0, "stored": 20_000} and w1["rate"] > 0
    push = next(r for r in doc["rows"] if r["workload"] == "W3t push")
    assert push["extra"]["sent"] == push["extra"]["received"] == 350 and push["extra"]["put_p50_ms"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"


def test_trickle_quick(tmp_path):
    """W3 (asyncio, open loop) and W6 at small sizes, Sluice and JetStream in one run (needs
    nats-server, which `make test` installs): the rows, the side-by-side table, the verdicts."""
    out = _bench(tmp_path, "--quick", "--durability", "wal", "--doors", "grpc", "--workloads", "w3,w6", "--compare",
                 "--peers", "nats", "--w3-seconds", "0.5", "--w6-seconds", "1", "--w6-producers", "20")
    rows = _table(out.stdout)
    modes = ["unary put"] + (["stream put"] if "PutRecordsStream" in (ROOT / "protos" / "sluice" / "v1" /
                                                                    "sluice.proto").read_text() else [])
    want = {("gRPC", "wal", f"W3 push ({m})") for m in modes} | {("gRPC", "wal", f"W6 ({m})") for m in modes} | {
        ("nats-py", "file (no fsync)", "W3 push (js.publish)"), ("nats-py", "file (no fsync)", "W6 (js.publish)")}
    assert set(rows) == want, out.stdout
    _check_figures(rows)
    assert "side by side" in out.stdout and "server cpu ms/rec" in out.stdout
    assert "W3 broker CPU per record <= 0.25 ms" in out.stdout and "W6 p99 <= 2x JetStream's" in out.stdout
    doc = _result(tmp_path)
    for r in doc["rows"]:
        assert r["ok"] and r["extra"]["server_cpu_ms_per_record"] > 0, r
        if r["workload"].startswith("W3"):   # 0.2 s warm-up + 0.5 s at 500 records/s, every one received
            assert r["extra"]["sent"] == r["extra"]["received"] == 350 and r["records"] == 250, r
        else:   # 20 producers x 10 requests/s x 1 s, and every record stored (with a warm-up one each)
            assert r["records"] == 200 and r["extra"]["stored"] == 220, r
    assert doc["config"]["w6_producers"] == 20 and len(doc["verdicts"]) >= 3
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"


def test_core_small(tmp_path):
    """bench/run.py core: the core's trickle path in process, CPU and wall time per record."""
    out = _bench(tmp_path, "core", "--records", "300")
    assert "us CPU/record" in out.stdout
    doc = _result(tmp_path, "core-*.json")
    assert doc["records"] == 300 and doc["in_order"] and 0 < doc["cpu_us_per_record"] < doc["wall_us_per_record"] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"


def test_suite_against_a_running_broker(tmp_path):
    """--grpc: the suite on a broker it did not start (fresh stream names, no server CPU figure)."""
    broker = BrokerProcess(tmp_path / "data", "--log-level", "WARNING").start(timeout=60)
    try:
        for _ in range(2):   # twice on one broker: the stream names must not collide
            out = _bench(tmp_path, "--grpc", broker.grpc_target, "--doors", "grpc", "--workloads", "w1,w2",
                         "--records", "4000")
            rows = _table(out.stdout)
            assert set(rows) == {("gRPC", "external", "W1 put"), ("gRPC", "external", "W2 read")}, out.stdout
            _check_figures(rows)
            assert rows[("gRPC", "external", "W1 put")]["server cpu s"] == "-"
            for path in (tmp_path / "results").glob("*.json"):
                path.unlink()
    finally:
        broker.stop(30)


def test_memory_quick(tmp_path):
    """make bench-memory's runner: a short fill and a few seconds of W1 loop."""
    out = _bench(tmp_path, "memory", "--minutes", "0.05", "--records", "200000")
    res = _result(tmp_path, "memory-*.json")
    assert {"config", "criteria", "fill", "loop", "verdicts", "broker_args"} <= set(res)
    fill, loop = res["fill"], res["loop"]
    assert fill["records_stored"] == 200_000 and 20 < fill["rss_mib"] < 2000 and fill["rate"] > 0
    assert loop["records_stored_end"] == 200_000 + loop["records_written"] and loop["records_written"] > 0
    assert loop["samples"] and loop["rss_min_mib"] <= loop["rss_max_mib"]
    assert "VmRSS < 300 MiB" in out.stdout and "not judged" in out.stdout   # 200,000 < 1,000,000 stored
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"


def test_timeplus_quick(tmp_path):
    """make bench-timeplus's runner, small and without ClickHouse: T1-T4 on the Timeplus door."""
    out = _bench(tmp_path, "timeplus", "--quick", "--clickhouse", "no", "--rows", "4000", "--t2-seconds", "0.5",
                 "--t3-rows", "20000", "--minutes", "0.05", "--t4-keys", "2000", "--t4-rate", "5000")
    rows = _table(out.stdout)
    assert set(rows) == {("Timeplus", "wal", "T1 ingest"), ("Timeplus", "wal", "T2 query (SSE)"),
                         ("Timeplus", "wal", "T3 scan"), ("Timeplus", "wal", "T4 memory (tumble)"),
                         ("Timeplus", "wal", "T4 memory (control)")}, out.stdout
    for key, r in rows.items():
        assert r["ok"] == "ok" and _num(r["records"]) > 0 and _num(r["wall s"]) > 0, key
    assert _num(rows[("Timeplus", "wal", "T1 ingest")]["records"]) == 4000
    assert _num(rows[("Timeplus", "wal", "T1 ingest")]["rec/s"]) > 0
    t2 = rows[("Timeplus", "wal", "T2 query (SSE)")]
    assert _num(t2["records"]) == 250 and 0 < _num(t2["p50 ms"]) <= _num(t2["p99 ms"])   # 0.5 s at 500 rows/s
    assert _num(rows[("Timeplus", "wal", "T3 scan")]["records"]) == 20_000
    assert "T2 delivery p99" in out.stdout and "T3 bounded scan" in out.stdout   # the verdicts

    doc = _result(tmp_path, "timeplus-*.json")
    assert {"config", "rows", "t4", "verdicts", "broker_args"} <= set(doc)
    by = {r["workload"]: r for r in doc["rows"]}
    assert by["T1 ingest"]["extra"]["stored"] == 4000 and by["T1 ingest"]["extra"]["requests"] == 8
    assert by["T2 query (SSE)"]["extra"]["sent"] == by["T2 query (SSE)"]["extra"]["received"] == 350
    t3 = by["T3 scan"]["extra"]
    assert t3["rows_returned"] == t3["expected"] > 0 and t3["stored"] == 20_000
    t4 = doc["t4"]
    assert t4["rows_sent"] > 0 and t4["result_rows"] > 0 and t4["samples"]
    assert 20 < t4["rss_start_mib"] <= t4["rss_max_mib"] < 4000 and t4["rss_minute_medians_mib"]
    control = doc["t4_control"]   # the same ingest without the query, on a broker of its own
    assert control["rows_sent"] > 0 and control["result_rows"] == 0 and control["samples"] and not control["sql"]
    assert "query's 2nd-half slope - control's" in out.stdout   # the verdict compares the slopes
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"


def test_sources_quick(tmp_path):
    """make bench-sources's runner, tiny: a JetStream source into Sluice and the nats-py peer, both ack
    policies (needs nats-server, which `make test` installs)."""
    out = _bench(tmp_path, "sources", "--messages", "3000", "--ack-policy", "both", "--max-ack-pending", "256")
    # the system column is wider here ("nats-py"): the header is "system  |"
    rows = _table("\n".join(line.replace("system  |", "system |", 1) if line.startswith("system  |") else
                            line for line in out.stdout.splitlines()))
    assert set(rows) == {(door, durability, f"S1 drain (ack {policy})") for policy in ("explicit", "all")
                         for door, durability in (("nats_jetstream source", "wal"),
                                                  ("pull consumer (fetch+ack)", "-"))}, out.stdout
    for key, r in rows.items():
        assert r["ok"] == "ok" and _num(r["records"]) == 3000 and _num(r["rec/s"]) > 0 and _num(r["MB/s"]) > 0, key
    assert "Sluice's source / nats-py pull consumer alone" in out.stdout
    doc = _result(tmp_path, "sources-*.json")
    assert doc["config"]["messages"] == 3000 and doc["config"]["size"] == 1024 and doc["config"]["pull_batch"] == 128
    for r in doc["rows"]:
        if r["system"] == "Sluice":
            assert r["extra"]["stored"] == 3000 and r["extra"]["stats"]["error_count"] == 0
            assert r["extra"]["stats"]["rows_written"] == 3000 and r["extra"]["stats"]["lag"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"


def test_bad_options_are_refused(tmp_path):
    for args in (["--workloads", "w2"], ["--doors", "kafka"], ["--http", "127.0.0.1:1"], ["memory", "--minutes", "0"],
                 ["timeplus", "--workloads", "t9"], ["timeplus", "--pid", "1"],
                 ["timeplus", "--http", "127.0.0.1:1", "--workloads", "t4"], ["sources", "--messages", "-1"],
                 ["sources", "--ack-policy", "none"]):
        out = subprocess.run([sys.executable, RUN, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 2 and "error:" in out.stderr, args


TSDB_COLUMNS = ["system", "door", "durability", "workload", "points", "points/s", "p50 ms", "p99 ms", "wall s",
                "client cpu s", "server cpu s", "ok"]


def test_tsdb_small(tmp_path):
    """bench/run.py tsdb at small sizes, Sluice only: put, q1 and q2 rows with real figures, and the JSON."""
    out = _bench(tmp_path, "tsdb", "--points", "10000", "--q2-points", "5000", "--q1-repeat", "3", "--q2-repeat", "2")
    lines = out.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("system |"))
    assert [c.strip() for c in lines[start].split("|")] == TSDB_COLUMNS
    rows = [dict(zip(TSDB_COLUMNS, (c.strip() for c in line.split("|")))) for line in lines[start + 2:start + 5]]
    assert [r["workload"] for r in rows] == ["put", "q1 one of 10k series", "q2 one 5,000-point series"], out.stdout
    assert all(r["system"] == "Sluice" and r["ok"] == "ok" for r in rows), out.stdout
    assert _num(rows[0]["points"]) == 10_000 and _num(rows[0]["points/s"]) > 0
    assert all(0 < _num(r["p50 ms"]) <= _num(r["p99 ms"]) for r in rows)
    assert "load average before" in out.stdout

    doc = _result(tmp_path, "tsdb-*.json")
    assert doc["config"]["points"] == 10_000 and doc["config"]["series"] == 10_000 and doc["config"]["batch"] == 500
    assert doc["config"]["peers"] == [] and doc["ratios"] == [] and len(doc["loadavg_after"]) == 3
    put, q1, q2 = doc["rows"]
    assert put["extra"]["stored"] == 10_000 and put["extra"]["requests"] == 20
    assert q1["extra"]["dps_returned"] == 1 and q1["extra"]["repeat"] == 3   # one round: one point a series
    assert q2["extra"]["dps_returned"] >= 80 and q2["extra"]["fill_rate"] > 0   # 5,000 s in 1-minute buckets
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"


def test_tsdb_bad_options_are_refused(tmp_path):
    for args in (["--workloads", "q1"], ["--workloads", "q9"], ["--peers", "kafka"], ["--no-sluice"],
                 ["--points", "0"], ["--durability", "none"], ["--passes", "0"]):
        out = subprocess.run([sys.executable, RUN, "tsdb", *args], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 2 and "error:" in out.stderr, args


def _bench_tsdb():   # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_tsdb", ROOT / "bench" / "tsdb.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tsdb_passes_are_judged_on_the_median_of_their_ratios():
    """--passes: a ratio per pass, each Sluice figure beside the peers' of its own pass; the verdict
    on the median of those ratios (not the ratio of the medians), every pass's ratio listed."""
    bt = _bench_tsdb()

    def put(system: str, rate: float, n: int, ok: bool = True):   # type: ignore[no-untyped-def]
        return bt.wl.Row(system, "OpenTSDB HTTP", "wal", "put", rate=rate, ok=ok, extra={"pass": n})
    rows = [put("Sluice", 500, 1), put("VictoriaMetrics", 2000, 1), put("InfluxDB", 300, 1),   # 0.25x, 1.67x
            put("Sluice", 300, 2), put("VictoriaMetrics", 900, 2), put("InfluxDB", 300, 2),    # 0.33x, 1.00x
            put("Sluice", 600, 3), put("VictoriaMetrics", 1900, 3), put("InfluxDB", 400, 3),   # 0.32x, 1.50x
            put("Sluice", 900, 4), put("VictoriaMetrics", 1, 4, ok=False), put("InfluxDB", 100, 4)]   # -, 9.00x
    per_pass = bt.pass_ratios(rows)
    assert [[round(r[4], 2) for r in rs] for rs in per_pass] == [[0.25, 1.67], [0.33, 1.0], [0.32, 1.5], [9.0]]
    medians = {peer: (s, p, round(ratio, 3)) for _, peer, s, p, ratio in bt.median_ratios(per_pass)}
    # VictoriaMetrics: 3 passes (its 4th failed); the median ratio 0.32 is no pass's Sluice/VM medians (500/1900)
    assert medians == {"VictoriaMetrics": (500, 1900, 0.316), "InfluxDB": (550, 300, 1.583)}
    verdicts = {target: (measured, verdict) for target, measured, verdict in bt.verdicts(bt.median_ratios(per_pass),
                                                                                       per_pass)}
    assert verdicts["put >= 0.3x VictoriaMetrics"] == (
        "median of 3 passes 0.32x (passes: 0.25, 0.33, 0.32; 2 of 3 >= 0.3x); medians 500 / 1,900 points/s", "met")
    assert verdicts["put >= 1.2x InfluxDB"][1] == "met" and "3 of 4 >= 1.2x" in verdicts["put >= 1.2x InfluxDB"][0]
    one = bt.verdicts(per_pass[0], per_pass[:1])   # one pass: judged on its own ratio, as before --passes
    assert one[0] == ("put >= 0.3x VictoriaMetrics", "500 / 2,000 points/s = 0.25x", "NOT MET")


def test_jetstream_store_quick(tmp_path):
    """--store jetstream: a broker on a fresh single-node nats-server, beside nats-py driving
    JetStream directly, with the ratio table and the CPU split."""
    out = _bench(tmp_path, "--quick", "--store", "jetstream", "--doors", "grpc", "--workloads", "w1,w2",
                 "--compare", "--peers", "nats", timeout=180)
    rows = _table(out.stdout)
    for workload in ("W1 put", "W2 read"):
        row = rows[("gRPC", "jetstream R=1", workload)]
        assert row["ok"] == "ok" and float(row["rec/s"].replace(",", "")) > 0, row
        assert rows[("nats", "file (no fsync)", workload)]["ok"] == "ok"
    assert not any(d == "wal" for _, d, _ in rows)   # --store jetstream alone: no RocksDB broker
    assert "Sluice on JetStream / JetStream direct (nats-py):" in out.stdout
    assert "Sluice on JetStream, CPU over all its workloads: broker" in out.stdout
    data = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert data["config"]["store"] == ["jetstream"] and len(data["jetstream_cpu_s"]) == 2


def test_cluster_quick(tmp_path):
    """run.py cluster: two brokers and nats-py direct on a 3-node JetStream cluster (R=3), every row ok,
    the CPU split per process in the JSON; nothing left behind."""
    out = _bench(tmp_path, "cluster", "--records", "4000", "--systems", "sluice,nats", timeout=240)
    assert "W1 put: Sluice (2 brokers) on the cluster / nats-py direct = " in out.stdout, out.stdout
    doc = _result(tmp_path, "cluster-*.json")
    systems = ("Sluice, 2 brokers, 3-node JetStream R=3", "nats-py direct, 3-node JetStream R=3")
    assert [(r["label"], r["workload"]) for r in doc["rows"]] == [
        (system, workload) for system in systems for workload in ("W1 put", "W2 read")]
    for r in doc["rows"]:
        assert r["ok"] and r["records"] == 4000 and r["rate"] > 0, r
        assert set(r["cpu_split_s"]) == {"brokers", "nats", "client"}, r
        assert all(v >= 0 for v in r["cpu_split_s"].values()), r   # measured (a NaN fails), not missing
    # the servers' CPU is counted: over the whole run (one row's share can round to 0 ticks - a 4,000
    # record read on an idle machine did)
    assert sum(r["cpu_split_s"]["nats"] for r in doc["rows"]) > 0, doc["rows"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"
