"""broker/process.py: the open-files limit a broker raises for itself, and accept failures logged
at a bounded rate (the durability probe: out of descriptors, RocksDB could not open its next log
file, and asyncio logged tens of thousands of tracebacks in seconds)."""
from __future__ import annotations

import asyncio
import errno
import logging
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker.launcher import BrokerProcess
from broker.process import ACCEPT_ERROR_EVERY_S, LoopErrors

ROOT = Path(__file__).resolve().parents[1]


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here is {hard}")
    script = textwrap.dedent("""
        import resource
        from broker.process import raise_open_files_limit
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    raised, now = map(int, out.stdout.split())
    expected = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    assert raised == now == expected, out.stderr


def test_a_broker_started_under_a_low_soft_limit_raises_it(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))   # inherited by the broker
    try:
        broker = BrokerProcess(tmp_path / "data", "--store", "memory").start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert broker.proc is not None
        limits = Path(f"/proc/{broker.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert int(line.split()[3]) > 1024, line
    finally:
        broker.stop()


def test_accept_failures_are_logged_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    handler = LoopErrors(clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        failure = {"message": "socket.accept() out of system resource",
                   "exception": OSError(errno.EMFILE, "Too many open files")}
        with caplog.at_level(logging.ERROR, logger="sluice"):
            for _ in range(1000):
                handler(loop, failure)
            now[0] += ACCEPT_ERROR_EVERY_S
            handler(loop, failure)
        lines = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
        assert len(lines) == 2 and all(r.exc_info is None for r in lines)
        assert "999 more such failures" in lines[1].getMessage()
        caplog.clear()
        with caplog.at_level(logging.ERROR):   # anything else: as asyncio reports it
            handler(loop, {"message": "something else", "exception": RuntimeError("x")})
        assert any("something else" in r.getMessage() for r in caplog.records)
    finally:
        loop.close()
