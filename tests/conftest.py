"""Shared fixtures: a real broker process on loopback (ports chosen by the OS, readiness read from
its ready line - never a sleep), clients for both doors, and unique stream names."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The official DIS SDK writes $HOME/.huaweicloud/application_id when imported: keep it out of the
# real home directory. Must happen before anything imports huaweicloudsdkcore. Removed at exit
# (below), or every run and every xdist worker would leave one behind in /tmp.
os.environ["HOME"] = tempfile.mkdtemp(prefix="sluice-test-home-")

import itertools
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest

from broker.launcher import BrokerProcess

atexit.register(shutil.rmtree, os.environ["HOME"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]


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


def rest(broker: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, JSON answer or None) of one HTTP request with a JSON body to the broker's HTTP port."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(broker.http_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def eventually(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll until `check()` is true; fail with a clear message after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def in_thread_with_deadline(work: Callable[[], Any], timeout: float = 30.0) -> Any:
    """`work()`'s result, run in a thread: a client call that blocks forever (the timeplus SDK sets
    no timeouts) fails the test instead of hanging the suite."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{getattr(work, '__name__', 'the call')} hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")
