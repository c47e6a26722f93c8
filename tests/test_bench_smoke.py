"""bench/put_records.py still runs: a 1-second smoke run through both doors against its own broker."""
from __future__ import annotations

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
