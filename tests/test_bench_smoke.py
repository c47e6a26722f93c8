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
