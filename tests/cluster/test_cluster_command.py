"""`sluice-cluster` (`make cluster`) as a user runs it: it prints the addresses and a ready line, the
cluster serves through the printed failover target, SIGTERM stops every process it started (exit 0),
and run again on the same --dir the data is still there."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from broker.cluster import hold_dir, note_holders
from client import Client

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"sluice cluster ready: --nats-servers (\S+); failover gRPC target (\S+);")


def start(dir_: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "broker.cluster", "--dir", str(dir_), "--nats-port", "0",
                             "--grpc-port", "0", "--http-port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    found: list[re.Match[str]] = []

    def read() -> None:
        assert proc.stdout
        for line in proc.stdout:
            lines.append(line)
            m = READY.search(line)
            if m:
                found.append(m)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(120)
    assert found, "".join(lines)
    return proc, found[0].group(2), lines


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def stop(proc: subprocess.Popen[str]) -> None:
    kids = children(proc.pid)
    assert len(kids) == 5, kids   # three nats-servers, two brokers
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert proc.stdout
    rest = proc.stdout.read()
    proc.stdout.close()
    assert "sluice-cluster: stopped" in rest, rest
    for kid in kids:   # every one of them gone (not left behind as orphans)
        assert not Path(f"/proc/{kid}").exists() or "zombie" in Path(f"/proc/{kid}/status").read_text().lower(), kid


def test_the_command_starts_serves_stops_and_keeps_its_data(tmp_path: Path) -> None:
    proc, target, lines = start(tmp_path / "c")
    try:
        text = "".join(lines)
        assert text.count("  nats n") == 3 and "[meta leader]" in text and text.count("  broker ") == 2, text
        with Client(target) as c:
            c.create_stream("kept", 2)
            (put,) = c.put_records("kept", [b"still here"], partition_id=1)
            assert put.ok and put.seq == 0
    finally:
        if proc.poll() is None:
            stop(proc)
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"nats", "broker-a", "broker-b", "broker-a.log"}

    proc, target, _ = start(tmp_path / "c")   # the same --dir: the data is there
    try:
        with Client(target) as c:
            assert [r.data for r in c.get_records(c.get_cursor("kept", 1)).records] == [b"still here"]
    finally:
        if proc.poll() is None:
            stop(proc)


def test_a_dir_stays_held_while_a_node_that_inherited_the_lock_runs(tmp_path: Path) -> None:
    """sluice-cluster SIGKILLed leaves its nats-servers running (the JetStream probe); run again on
    the same --dir it started a second nats-server on each store dir. The nodes inherit the lock
    on the dir, so it holds until the last of them is gone, and a second run is refused, naming them."""
    fd = hold_dir(tmp_path)
    node = subprocess.Popen(["sleep", "60"], pass_fds=(fd,))   # a node started with the lock
    note_holders(fd, [os.getpid(), node.pid])
    os.close(fd)   # the supervisor killed: its descriptors closed
    try:
        try:
            hold_dir(tmp_path)
            raise AssertionError("the dir was taken while a node still held it")
        except RuntimeError as exc:
            assert f"{node.pid}" in str(exc) and "in use" in str(exc), exc
    finally:
        node.kill()
        node.wait()
    os.close(hold_dir(tmp_path))   # free once the node is gone
