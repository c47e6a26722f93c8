"""Fixtures for the source tests: a real `nats-server` (Debian's package, `make test` installs it) on a
free loopback port with JetStream and a store of its own, restartable on the same port and store;
an in-process broker with the sources manager (fast retries); and the ways rows are read back: a
bounded Timeplus query (in-process or `POST /api/v1beta2/queries` on a broker process) and the DIS
door's GetRecords (`/v2/{project}/...`).
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence
from urllib.parse import urlencode

import nats
import orjson
import pytest
from nats.js.api import StorageType, StreamConfig

from broker.core.broker import Broker
from broker.launcher import free_port
from broker.model import ColumnDef, StreamSchema
from broker.sources import base
from broker.sources.manager import Sources
from broker.storage.rocks import RocksStore

P = "default"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def nats_server_exe() -> str:
    exe = shutil.which("nats-server", path=SEARCH_PATH)
    if not exe:
        pytest.fail("nats-server is not installed: `make test` installs it (apt-get install nats-server)")
    return exe


class NatsServer:
    """`nats-server -js -sd <dir> -a 127.0.0.1 -p <port>`; `stop()`/`start()` keep port and store."""

    def __init__(self, store: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.store, self.port, self.extra = store, port or free_port(), extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store.parent / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        """Returns once this process serves: it said "Server is ready" (one more time than the log
        held before), so a restart is never taken for done because something else holds the port -
        with two test workers another's nats-server may get a port freed by a stop()."""
        cmd = [nats_server_exe(), "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port), *self.extra]
        ready_before = self.log.read_bytes().count(b"Server is ready") if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                if self.log.read_bytes().count(b"Server is ready") <= ready_before:
                    raise OSError("not ready yet")
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server not accepting on {self.port} after {timeout}s") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store").start()
    yield server
    server.stop()


# -- talking to NATS from the tests ----------------------------------------------------------------

async def publish(url: str, subject: str, payloads: Sequence[bytes | str]) -> None:
    """Core NATS publish, flushed (the server has them when this returns)."""
    nc = await nats.connect(url)
    try:
        for p in payloads:
            await nc.publish(subject, p.encode() if isinstance(p, str) else p)
        await nc.flush()
    finally:
        await nc.close()


async def js_publish(url: str, subject: str, payloads: Sequence[bytes | str]) -> None:
    """JetStream publish: each waits for the stream's ack (stored when this returns)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for p in payloads:
            await js.publish(subject, p.encode() if isinstance(p, str) else p)
    finally:
        await nc.close()


async def with_js(url: str, fn: Callable[[Any], Any]) -> Any:
    """`await fn(jetstream context)` on a fresh connection (set-up and checks)."""
    nc = await nats.connect(url)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


async def js_stream(url: str, name: str, subjects: list[str]) -> None:
    async def add(js: Any) -> None:
        await js.add_stream(StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE))
    await with_js(url, add)


async def consumer_info(url: str, stream: str, consumer: str) -> Any:
    async def info(js: Any) -> Any:
        return await js.consumer_info(stream, consumer)
    return await with_js(url, info)


def docs(n: int, start: int = 0, **extra: Any) -> list[bytes]:
    return [orjson.dumps({"i": i, **extra}) for i in range(start, start + n)]


# -- an in-process broker with the sources manager --------------------------------------------------

class Sluice:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> None:
        self.store = RocksStore(str(self.path))
        self.broker = Broker(self.store, cursor_secret=b"sources-test")
        await self.broker.start()
        self.sources = Sources(self.broker)
        await self.sources.start()

    async def close(self) -> None:
        await self.sources.close()
        await self.broker.close()
        await self.store.close()

    async def typed(self, name: str, columns: list[tuple[str, str]], partitions: int = 1) -> None:
        await self.broker.create_stream(name, partitions, project=P,
                                        schema=StreamSchema(tuple(ColumnDef(n, t) for n, t in columns)))

    async def create(self, name: str, type_: str, target: str, /, **properties: Any) -> Any:
        """Create a source writing to stream `target`; keyword arguments are its properties."""
        return await self.sources.create(P, {"name": name, "type": type_, "stream": target,
                                             "properties": properties})

    def state(self, name: str) -> Any:
        return self.sources.get(P, name).state

    async def query(self, sql: str) -> list[list[Any]]:
        """A bounded query through the in-process Queries (the Timeplus door's engine): every row."""
        run = await self.broker.queries.start(P, sql)
        rows: list[list[Any]] = []
        try:
            while (batch := await asyncio.wait_for(run.results.get(), 30)) is not None:
                rows += batch
        finally:
            run.release()
        return rows

    async def column(self, stream: str, col: str = "i") -> list[Any]:
        return [r[0] for r in await self.query(f"select {col} from table({stream})")]

    async def rows(self, stream: str) -> list[dict[str, Any]]:
        """Every record of the stream, all partitions, decoded (read as a DIS consumer would)."""
        out: list[dict[str, Any]] = []
        described = await self.broker.describe_stream(stream, project=P)
        for p in range(described.config.partition_count):
            cursor = await self.broker.get_cursor(stream, p, "TRIM_HORIZON", project=P)
            while True:
                got = await self.broker.get_records(cursor, 10_000, project=P)
                out += [orjson.loads(r.data) for r in got.records]
                if not got.records:
                    break
                cursor = got.next_cursor
        return out


def _fast_backoff(self: base.Backoff, base_s: float = 0.05, cap_s: float = 0.3, rng: Any = None) -> None:
    self.base, self.cap, self.attempt, self._rng = 0.05, 0.3, 0, random.Random(1)


@pytest.fixture
async def sluice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sluice]:
    # retries come quickly here: the tests wait for recoveries, not for backoff
    monkeypatch.setattr(base.Backoff, "__init__", _fast_backoff)
    s = Sluice(tmp_path / "db")
    await s.open()
    yield s
    await s.close()


async def eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.05)


# -- a broker process: REST, bounded queries over SSE, DIS GetRecords -------------------------------

def rest(base_url: str, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """One JSON request on a fresh connection: (status, parsed body or None)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = _conn(host, int(port), timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def _conn(host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(host, port, timeout=timeout)


def tp_query(base_url: str, sql: str, timeout: float = 60) -> list[list[Any]]:
    """A bounded query over `POST /api/v1beta2/queries` (server-sent events): every row."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = _conn(host, int(port), timeout)
    try:
        conn.request("POST", "/api/v1beta2/queries", body=json.dumps({"sql": sql}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:500]
        rows: list[list[Any]] = []
        event: str | None = None
        queries = 0
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event is None:
                    rows += data
                elif event == "query":
                    queries += 1
                    if queries == 2:   # a bounded query's final query object
                        break
                event = None
        return rows
    finally:
        conn.close()


def dis_read_all(base_url: str, stream: str, partitions: int = 1, project: str = P) -> list[bytes]:
    """Every record's data through the DIS door: GetCursor TRIM_HORIZON, then GetRecords until empty."""
    out: list[bytes] = []
    for pid in range(partitions):
        status, body = rest(base_url, "GET", f"/v2/{project}/cursors?" + urlencode(
            {"stream-name": stream, "partition-id": str(pid), "cursor-type": "TRIM_HORIZON"}))
        assert status == 200, body
        cursor = body["partition_cursor"]
        while True:
            status, body = rest(base_url, "GET", f"/v2/{project}/records?" + urlencode(
                {"partition-cursor": cursor, "limit": 10000}))
            assert status == 200, body
            if not body["records"]:
                break
            out += [base64.b64decode(r["data"]) for r in body["records"]]
            cursor = body["next_partition_cursor"]
    return out
