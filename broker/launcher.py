"""Run a broker as a child process and wait until it is ready - for tests, benchmarks and scripts.

Readiness is the ready line `sluice ready grpc=HOST:PORT http=HOST:PORT` that `python -m broker`
prints on stdout once both doors accept connections, so callers never guess with a sleep and can
use port 0 (the OS picks free ports, the line says which). Imports nothing else from the broker.
"""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

READY = re.compile(r"sluice ready grpc=(\S+):(\d+) http=(\S+):(\d+)(?: tsdb=\S+:(\d+))?")
METRICS = re.compile(r" metrics=\S+:(\d+)")
TLS_ON = re.compile(r" tls=on\b")
ROOT = Path(__file__).resolve().parents[1]


_handed_out: set[int] = set()   # this process never hands the same port out twice


def free_port() -> int:
    """A loopback port free now, for a server started next (nats-server, a test's own server).

    Taken outside the kernel's ephemeral range: a freed ephemeral port (bind to 0, close) can be
    taken by any outgoing connection - a busy test run makes thousands - before the server binds
    it, and the server then exits with "address already in use"."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    # below the range when there is room there (the default: 10000-32767), else above it
    span = (10_000, low) if low - 10_000 >= 1000 else (high + 1, 65_536) if 65_535 - high >= 1000 else None
    rng = random.SystemRandom()
    for port in (rng.randrange(*span) for _ in range(200)) if span else ():
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:   # hardly possible: no room outside the range, or none free there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """`python -m broker --data-dir DIR --grpc-port 0 --http-port 0 *extra_args` as a child.

    stderr (the log) is collected in `stderr_lines`. `start()` returns once the broker is ready;
    `stop()` is the graceful path (SIGTERM), `kill()` the crash path (SIGKILL).
    """

    def __init__(self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self.grpc_port = 0
        self.http_port = 0
        self.tsdb_port: int | None = None   # with --tsdb-port: the OpenTSDB door's own port
        self.metrics_port: int | None = None   # with --metrics-port: /metrics, /healthz, /readyz alone
        self.tls = False                    # with --tls-cert: the doors speak TLS (https://)
        self.stderr_lines: list[str] = []
        self._stderr_reader: threading.Thread | None = None
        self._startup_logged = threading.Event()   # the stderr reader has read the logged ready line (or EOF)
        self.pass_fds: tuple[int, ...] = ()   # descriptors the broker inherits (sluice-cluster's dir lock)

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        cmd = [sys.executable, "-m", "broker", "--data-dir", str(self.data_dir), "--grpc-port", "0",
               "--http-port", "0", *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **self.env}, pass_fds=self.pass_fds)
        self._stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_reader.start()
        found: list[re.Match[str]] = []

        def read_ready() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                m = READY.search(line)
                if m:
                    found.append(m)
                    return

        reader = threading.Thread(target=read_ready, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            status = self.proc.poll()   # a broker that cannot start exits with one line on stderr
            self.kill()                 # (and waits for the stderr reader: the lines below are complete)
            raise RuntimeError(f"broker did not become ready (exit status {status}):\n"
                               + "".join(self.stderr_lines[-40:]))
        self.host = found[0].group(1)
        self.grpc_port, self.http_port = int(found[0].group(2)), int(found[0].group(4))
        self.tsdb_port = int(found[0].group(5)) if found[0].group(5) else None
        self.tls = TLS_ON.search(found[0].string) is not None
        metrics = METRICS.search(found[0].string)
        self.metrics_port = int(metrics.group(1)) if metrics else None
        return self

    def _drain_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "sluice ready" in line:
                self._startup_logged.set()
        self._startup_logged.set()

    def startup_log(self, timeout: float = 30.0) -> list[str]:
        """The log up to the broker's logged ready line, its last line of startup (at INFO): the
        broker writes it before the ready line on stdout that start() waits for, but stderr is
        read by another thread, so stderr_lines may not hold it yet when start() returns."""
        self._startup_logged.wait(timeout)
        lines = list(self.stderr_lines)
        ready = next((i for i, line in enumerate(lines) if "sluice ready" in line), len(lines) - 1)
        return lines[:ready + 1]

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.http_port}"

    @property
    def http_target(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close_pipes()
        return code

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc:
            self._close_pipes()

    def _close_pipes(self) -> None:
        assert self.proc
        if self._stderr_reader:
            self._stderr_reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()
