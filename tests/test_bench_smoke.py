"""bench/put_records.py still runs: a 1-second smoke run through both doors against its own broker."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(gRPC|REST)\s*\|\s*wal\s*\|\s*([\d,]+)\s*\|\s*([\d.]+)\s*\|\s*([\d,]+)\s*\|\s*([\d.]+)\s*\|"
                 r"\s*([\d.]+)\s*\|\s*(\d+)\s*\|\s*(\S+)\s*$", re.MULTILINE)


def test_bench_quick_run_reports_both_doors(tmp_path):
    # run from elsewhere: the script must find the repository and start its broker on its own
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "put_records.py"), "--quick", "--seconds", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    assert "records/s" in out.stdout and "p99 ms" in out.stdout
    rows = {m.group(1): m.groups() for m in ROW.finditer(out.stdout)}
    assert set(rows) == {"gRPC", "REST"}, out.stdout
    for door, (_, rate, mbs, batches, p50, p99, failed, verified) in rows.items():
        assert int(rate.replace(",", "")) > 0, door
        assert float(mbs) > 0 and int(batches.replace(",", "")) > 0, door
        assert 0 < float(p50) <= float(p99), door
        assert failed == "0" and verified == "ok", door
    assert "1 s per door" in out.stdout
    assert not list(tmp_path.iterdir()), "the benchmark must clean up after itself"


LATENCY_ROW = re.compile(r"^(push gRPC|long-poll gRPC|long-poll REST)\s*\|\s*([\d,]+)\s*\|\s*([\d.]+)\s*\|"
                         r"\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*(\S+)\s*$", re.MULTILINE)


def test_tail_latency_quick(tmp_path):
    """bench/tail_latency.py still runs: 1 s per consumer mode against its own broker."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tail_latency.py"), "--seconds", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    assert "p99 ms" in out.stdout and "500 records/s" in out.stdout
    rows = {m.group(1): m.groups() for m in LATENCY_ROW.finditer(out.stdout)}
    assert {"push gRPC", "long-poll gRPC"} <= set(rows), out.stdout
    for mode, (_, records, p50, p90, p99, worst, put_p50, verified) in rows.items():
        assert int(records.replace(",", "")) == 500, mode          # 1 s at 500 records/s, all received
        assert 0 < float(p50) <= float(p90) <= float(p99) <= float(worst), mode
        assert float(put_p50) > 0 and verified == "ok", mode
    assert not list(tmp_path.iterdir()), "the benchmark must clean up after itself"


SUITE_ROW = re.compile(r"^Sluice\s*\|\s*(gRPC|REST)\s*\|\s*wal\s*\|\s*(W1 put|W2 read|W3 push|W3 long-poll)\s*\|"
                       r"\s*([\d,]+)\s*\|.*\|\s*(ok|FAIL.*)$", re.MULTILINE)


def test_bench_suite_quick(tmp_path):
    """bench/run.py --quick (make bench's runner): W1/W2/W3 over gRPC and REST in WAL mode, a JSON file."""
    results = tmp_path / "results"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--durability", "wal",
                          "--w3-seconds", "0.5", "--results-dir", str(results)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    rows = {(m.group(1), m.group(2)): (int(m.group(3).replace(",", "")), m.group(4))
            for m in SUITE_ROW.finditer(out.stdout)}
    assert set(rows) == {("gRPC", "W1 put"), ("gRPC", "W2 read"), ("gRPC", "W3 push"), ("gRPC", "W3 long-poll"),
                         ("REST", "W1 put"), ("REST", "W2 read"), ("REST", "W3 long-poll")}, out.stdout
    for key, (records, verdict) in rows.items():
        assert verdict == "ok" and records > 0, key
    assert rows[("gRPC", "W1 put")][0] == rows[("gRPC", "W2 read")][0] == 20_000
    files = list(results.glob("*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    assert len(doc["rows"]) == 7 and all(r["ok"] for r in doc["rows"])
    assert all(r["client_cpu_s"] is not None and r["server_cpu_s"] is not None for r in doc["rows"])


def test_memory_bench_quick(tmp_path):
    """bench/memory.py (make bench-memory) still runs: a short fill and a few seconds of W1 loop."""
    results = tmp_path / "results"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--minutes", "0.05",
                          "--records", "200000", "--results-dir", str(results)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    [path] = list(results.glob("memory-*.json"))
    res = json.loads(path.read_text())
    fill, loop = res["fill"], res["loop"]
    assert fill["records_stored"] == 200_000 and 20 < fill["rss_mib"] < 2000
    assert loop["records_stored_end"] == 200_000 + loop["records_written"] and loop["records_written"] > 0
    assert loop["samples"] and loop["rss_min_mib"] <= loop["rss_max_mib"]
    assert "VmRSS < 300 MiB" in out.stdout and "not judged" in out.stdout   # 200,000 < 1,000,000 stored
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "the benchmark must clean up after itself"
