"""Shared fixtures: a real broker process on loopback (ports chosen by the OS, readiness read from
its ready line - never a sleep), clients for both doors, and unique stream names."""
from __future__ import annotations

import os
import tempfile

# The official DIS SDK writes $HOME/.huaweicloud/application_id when imported: keep it out of the
# real home directory. Must happen before anything imports huaweicloudsdkcore.
os.environ["HOME"] = tempfile.mkdtemp(prefix="sluice-test-home-")

import itertools
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"sluice ready grpc=(\S+):(\d+) http=(\S+):(\d+)")


class BrokerProcess:
    """`python -m broker` as a child process. `start()` returns once both doors accept."""

    def __init__(self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.stderr_lines: list[str] = []

    def start(self, timeout: float = 30.0) -> "BrokerProcess":
        cmd = [sys.executable, "-m", "broker", "--data-dir", str(self.data_dir), "--grpc-port", "0",
               "--http-port", "0", *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **self.env})
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
            self.kill()
            raise RuntimeError("broker did not become ready:\n" + "".join(self.stderr_lines[-40:]))
        self.grpc_port, self.http_port = int(found[0].group(2)), int(found[0].group(4))
        return self

    def _drain_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        assert self.proc
        self._stderr_reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc:
            self._close_pipes()


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Factory: start_broker(*args, data_dir=None) -> a started BrokerProcess, stopped after the test."""
    started: list[BrokerProcess] = []

    def start(*args: str, data_dir: Path | None = None, env: dict[str, str] | None = None) -> BrokerProcess:
        proc = BrokerProcess(data_dir or tmp_path / "data", *args, env=env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            proc.stop(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One RocksDB broker shared by a session's end-to-end tests; tests use unique stream names."""
    proc = BrokerProcess(tmp_path_factory.mktemp("shared-broker") / "data").start()
    yield proc
    proc.stop(30)


_names = itertools.count()


@pytest.fixture
def stream_name() -> str:
    return f"t{next(_names)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def grpc_channel(broker: BrokerProcess) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(broker.grpc_target)
    yield channel
    channel.close()


@pytest.fixture
def sluice_stub(grpc_channel: grpc.Channel):  # type: ignore[no-untyped-def]
    from client._pb.sluice.v1 import sluice_pb2_grpc
    return sluice_pb2_grpc.SluiceStub(grpc_channel)


def make_dis_client(http_url: str, project_id: str = "proj1"):  # type: ignore[no-untyped-def]
    """The unmodified official SDK, pointed at a local broker over plain http (spec section 8)."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkdis.v2 import DisClient

    config = HttpConfig.get_default_config()
    config.retry_times = 0
    config.timeout = (5, 30)
    return (DisClient.new_builder().with_http_config(config)
            .with_credentials(BasicCredentials("AKTEST", "SKTEST", project_id))
            .with_endpoints([http_url]).build())


@pytest.fixture
def dis_client(broker: BrokerProcess):  # type: ignore[no-untyped-def]
    return make_dis_client(broker.http_url)


def eventually(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll until `check()` is true; fail with a clear message after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
