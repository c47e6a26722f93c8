"""sluice-cluster's start-up (broker/cluster.py): a NATS port another process holds is an error,
not a node taken for up; the command (and NatsCluster.start) then stops what it started; SIGHUP
stops it like SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from broker.cluster import NatsCluster, NatsNode, free_port, nats_server_exe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def squatter() -> Iterator[socket.socket]:
    try:
        nats_server_exe()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    yield s
    s.close()


def test_a_node_whose_port_is_taken_is_not_taken_for_up(tmp_path: Path, squatter: socket.socket) -> None:
    node = NatsNode("n1", tmp_path, squatter.getsockname()[1], free_port(), free_port(), [free_port()])
    with pytest.raises(RuntimeError, match=r"address already in use|exited"):
        node.start(timeout=10)
    assert not node.running


def test_a_cluster_whose_second_node_cannot_start_stops_the_first(tmp_path: Path, squatter: socket.socket) -> None:
    # the first node was left running behind the error (a test fixture that failed in its set-up
    # then leaked it: a "subprocess still running" warning in some later test)
    cluster = NatsCluster(tmp_path, 3)
    cluster.nodes[1].http_port = squatter.getsockname()[1]
    with pytest.raises(RuntimeError, match=r"n2 exited"):
        cluster.start(timeout=10)
    assert not any(n.running for n in cluster.nodes)
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in left


def test_the_command_with_a_taken_port_fails_and_leaves_nothing_running(tmp_path: Path,
                                                                        squatter: socket.socket) -> None:
    port = squatter.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "broker.cluster", "--dir", str(tmp_path), "--brokers", "1",
                           "--nats-port", str(port), "--grpc-port", "0", "--http-port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sluice-cluster: error" in done.stderr and "address already in use" in done.stderr
    assert "ready" not in done.stdout
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in left   # no nats-server of its own left running


def test_sighup_stops_the_command(tmp_path: Path) -> None:
    try:
        nats_server_exe()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    proc = subprocess.Popen([sys.executable, "-m", "broker.cluster", "--dir", str(tmp_path),
                             "--brokers", "1", "--nats-port", "0", "--grpc-port", "0", "--http-port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"sluice cluster ready", line):
                ready.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(90), "".join(lines)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 0, "".join(lines)
        assert any("sluice-cluster: stopped" in line for line in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
        assert proc.stdout
        proc.stdout.close()
