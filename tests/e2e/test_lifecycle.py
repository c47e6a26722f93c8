"""Process lifecycle: restart, crash (SIGKILL) under load, graceful drain on SIGTERM, command line
and environment configuration, --fsync. Every test runs its own broker process(es) on a temp dir."""
from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from broker.launcher import READY
from broker.settings import Settings
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
# The load tests write as fast as they can into a few partitions, well past the default write limit
# per partition: they test crashes and draining, not throttling (tests/limits/), so it is off.
UNTHROTTLED = ("--partition-records-per-s", "0", "--partition-bytes-per-s", "0")


# -- helpers -----------------------------------------------------------------------------------

class Conn:
    """A gRPC channel + stub to one broker process."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = sluice_pb2_grpc.SluiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, name: str, partitions: int) -> None:
        self.stub.CreateStream(pb.CreateStreamRequest(stream_name=name, partition_count=partitions), timeout=TIMEOUT)

    def put(self, name: str, entries: list[pb.PutRecordsEntry], timeout: float = TIMEOUT) -> pb.PutRecordsResponse:
        return self.stub.PutRecords(pb.PutRecordsRequest(stream_name=name, records=pb.RecordList(entries=entries)),
                                    timeout=timeout)

    def put_to(self, name: str, partition: int, payloads: list[bytes]) -> list[int]:
        resp = self.put(name, [pb.PutRecordsEntry(data=d, partition_id=partition) for d in payloads])
        assert resp.failed_record_count == 0, resp.failures
        return list(resp.seqs)

    def next_seqs(self, name: str) -> list[int]:
        desc = self.stub.DescribeStream(pb.DescribeStreamRequest(stream_name=name), timeout=TIMEOUT)
        assert all(p.first_seq == 0 for p in desc.partitions)
        return [p.next_seq for p in desc.partitions]

    def cursor(self, name: str, partition: int, kind: int = pb.CURSOR_TYPE_TRIM_HORIZON, seq: int | None = None) -> str:
        req = pb.GetCursorRequest(stream_name=name, partition_id=partition, cursor_type=kind)
        if seq is not None:
            req.starting_seq = seq
        return self.stub.GetCursor(req, timeout=TIMEOUT).cursor

    def read_from(self, token: str, max_pages: int = 10_000) -> tuple[list[int], list[bytes], str]:
        seqs: list[int] = []
        data: list[bytes] = []
        for _ in range(max_pages):
            page = self.stub.GetRecords(pb.GetRecordsRequest(cursor=token, limit=10_000,
                                                             max_fetch_bytes=10 * 1024 * 1024), timeout=TIMEOUT)
            token = page.next_cursor
            if not page.seqs:
                return seqs, data, token
            seqs += page.seqs
            data += page.data
        raise AssertionError("partition not drained")

    def read_all(self, name: str, partition: int) -> tuple[list[int], list[bytes]]:
        seqs, data, _ = self.read_from(self.cursor(name, partition))
        return seqs, data


def stopped_cleanly(proc) -> None:  # type: ignore[no-untyped-def]
    code = proc.stop(30)
    assert code == 0, "".join(proc.stderr_lines[-30:])
    assert any("stopped; store closed" in line for line in proc.stderr_lines), "".join(proc.stderr_lines[-30:])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(extra)
    return env


class RawBroker:
    """`python -m broker` with exactly the given arguments and environment (the conftest helper always
    passes --data-dir and the ports, which is what the env tests must avoid)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "broker", *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, pipe, sink: list[str], is_stdout: bool) -> None:  # type: ignore[no-untyped-def]
        for line in pipe:
            sink.append(line)
            if is_stdout and READY.search(line):  # the log on stderr repeats it: only stdout counts
                self._ready.set()

    def ready(self, timeout: float = 30.0) -> re.Match[str]:
        if not self._ready.wait(timeout):
            raise AssertionError("no ready line:\n" + "".join(self.stderr[-30:]))
        return next(m for m in map(READY.search, self.stdout) if m)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        for t in self._threads:
            t.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()
        return code


@pytest.fixture
def raw_broker() -> Iterator[list[RawBroker]]:
    started: list[RawBroker] = []
    yield started
    for b in started:
        b.stop()


# -- (a) restart -------------------------------------------------------------------------------

@pytest.mark.slow
def test_restart_keeps_every_record_seq_and_cursor(start_broker, tmp_path):
    data_dir = tmp_path / "restart"
    first = start_broker(data_dir=data_dir)
    written: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    with Conn(first.grpc_target) as c:
        c.create("orders", 3)
        c.create("other", 1)
        for round_ in range(4):
            for p, n in ((0, 5), (1, 1), (2, 7)):
                payloads = [f"p{p}-r{round_}-{i}".encode() for i in range(n)]
                seqs = c.put_to("orders", p, payloads)
                assert seqs == list(range(len(written[p]), len(written[p]) + n))
                written[p] += payloads
        # keyed records: wherever they land, they are acknowledged
        keyed = c.put("orders", [pb.PutRecordsEntry(data=f"k{i}".encode(), partition_key=f"key{i}") for i in range(20)])
        assert keyed.failed_record_count == 0
        for i, (p, s) in enumerate(zip(keyed.partition_ids, keyed.seqs)):
            assert s == len(written[p])
            written[p].append(f"k{i}".encode())
        c.put_to("other", 0, [b"lonely"])
        before = c.next_seqs("orders")
        assert before == [len(written[p]) for p in range(3)]
        # cursors taken before the restart: one from GetCursor, one from a GetRecords page
        at_seq_cursor = c.cursor("orders", 2, pb.CURSOR_TYPE_AT_SEQUENCE_NUMBER, 3)
        _, _, tail_cursor = c.read_from(c.cursor("orders", 0))
    stopped_cleanly(first)

    second = start_broker(data_dir=data_dir)
    with Conn(second.grpc_target) as c:
        assert c.next_seqs("orders") == before
        for p in range(3):
            assert c.read_all("orders", p) == (list(range(len(written[p]))), written[p])
        assert c.read_all("other", 0) == ([0], [b"lonely"])
        listed = c.stub.ListStreams(pb.ListStreamsRequest(), timeout=TIMEOUT)
        assert [s.stream_name for s in listed.streams] == ["orders", "other"]
        # the cursors still work: the cursor key is kept in the store
        assert c.read_from(at_seq_cursor)[0] == list(range(3, len(written[2])))
        assert c.read_from(tail_cursor)[0] == []
        # numbering continues: no reuse, no gap
        for p in range(3):
            assert c.put_to("orders", p, [b"after-1", b"after-2"]) == [before[p], before[p] + 1]
        assert c.read_from(tail_cursor)[:2] == ([before[0], before[0] + 1], [b"after-1", b"after-2"])
        # a new stream gets a fresh id: a cursor of "orders" does not leak into it
        c.create("fresh", 1)
        assert c.put_to("fresh", 0, [b"f"]) == [0]
    stopped_cleanly(second)

    third = start_broker(data_dir=data_dir)  # and once more: the post-restart writes survived too
    with Conn(third.grpc_target) as c:
        assert c.next_seqs("orders") == [n + 2 for n in before]
        assert c.read_all("fresh", 0) == ([0], [b"f"])


# -- (b) SIGKILL under load --------------------------------------------------------------------

@dataclasses.dataclass
class Acked:
    request_id: str
    partitions: list[int]
    seqs: list[int]
    payloads: list[bytes]


def _payload(request_id: str, index: int, size: int, pad: int) -> bytes:
    head = f"{request_id}|{index}|{size}|".encode()
    return head + bytes([65 + index % 26]) * pad


def _parse(payload: bytes) -> tuple[str, int, int]:
    request_id, index, size, _ = payload.split(b"|", 3)
    return request_id.decode(), int(index), int(size)


class Producer(threading.Thread):
    """Sends PutRecords until told to stop or the broker goes away; remembers what was acknowledged."""

    def __init__(self, target: str, stream: str, name: str, batch: int, hot: bool, deadline: float,
                 call_timeout: float = 5.0) -> None:
        super().__init__(daemon=True, name=name)
        self.target, self.stream, self.batch, self.hot, self.deadline = target, stream, batch, hot, deadline
        self.call_timeout = call_timeout
        self.acked: list[Acked] = []
        self.errors: list[grpc.StatusCode] = []
        self.problems: list[str] = []  # checked by the test thread: an assert in here would go unseen
        self.attempted = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with Conn(self.target) as c:
            n = 0
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                request_id = f"{self.name}-{n}"
                n += 1
                payloads = [_payload(request_id, i, self.batch, 64 + i % 50) for i in range(self.batch)]
                if self.hot:
                    entries = [pb.PutRecordsEntry(data=d, partition_id=0) for d in payloads]
                else:  # a request that spans every partition: must be atomic across them
                    entries = [pb.PutRecordsEntry(data=d, partition_key=f"{request_id}/{i}")
                               for i, d in enumerate(payloads)]
                self.attempted += 1
                try:
                    resp = c.put(self.stream, entries, timeout=self.call_timeout)
                except grpc.RpcError as exc:
                    self.errors.append(exc.code())
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED):
                        return  # the broker is gone
                    continue
                if resp.failed_record_count:
                    self.problems.append(f"{request_id}: {resp.failures[0]}")
                self.acked.append(Acked(request_id, list(resp.partition_ids), list(resp.seqs), payloads))


def _check_log(conn: Conn, stream: str, partitions: int, acked: list[Acked]) -> list[int]:
    """Everything acknowledged is at its seq; seqs are gap-free; every request present is whole.
    Returns next_seq per partition."""
    next_seqs = conn.next_seqs(stream)
    stored: dict[tuple[int, int], bytes] = {}
    present: dict[str, list[tuple[int, int, int]]] = {}  # request id -> (index, partition, seq)
    sizes: dict[str, int] = {}
    for p in range(partitions):
        seqs, data = conn.read_all(stream, p)
        assert seqs == list(range(next_seqs[p])), f"partition {p}: sequence numbers must be gap-free from 0"
        for s, d in zip(seqs, data):
            stored[(p, s)] = d
            request_id, index, size = _parse(d)
            present.setdefault(request_id, []).append((index, p, s))
            sizes[request_id] = size
    lost = [(a.request_id, p, s) for a in acked for p, s, d in zip(a.partitions, a.seqs, a.payloads)
            if stored.get((p, s)) != d]
    assert not lost, f"{len(lost)} acknowledged records lost or moved, e.g. {lost[:5]}"
    for request_id, items in present.items():
        # no torn request: all of it or none of it, each record exactly once
        assert sorted(i for i, _, _ in items) == list(range(sizes[request_id])), f"torn request {request_id}"
        by_partition: dict[int, list[tuple[int, int]]] = {}
        for index, p, s in items:
            by_partition.setdefault(p, []).append((index, s))
        for p, pairs in by_partition.items():  # within a partition: contiguous, in request order
            pairs.sort()
            seqs = [s for _, s in pairs]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"request {request_id} split in {p}"
    return next_seqs


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_record(start_broker, tmp_path):
    data_dir = tmp_path / "crash"
    victim = start_broker(*UNTHROTTLED, data_dir=data_dir)
    partitions = 4
    with Conn(victim.grpc_target) as c:
        c.create("load", partitions)
    deadline = time.monotonic() + 60
    producers = [Producer(victim.grpc_target, "load", f"hot{i}", 50, True, deadline) for i in range(4)]
    producers += [Producer(victim.grpc_target, "load", f"wide{i}", 40, False, deadline) for i in range(2)]
    for t in producers:
        t.start()
    # let the load build up (and be sure some of it was acknowledged), then pull the plug mid-flight
    time.sleep(1.5)
    limit = time.monotonic() + 20
    while sum(len(t.acked) for t in producers) < 20 and time.monotonic() < limit:
        time.sleep(0.05)
    victim.kill()
    for t in producers:
        t.join(15)
        assert not t.is_alive(), f"{t.name} hung after the broker died"
    assert not [p for t in producers for p in t.problems]
    acked = [a for t in producers for a in t.acked]
    assert len(acked) >= 20, "the load never got going"
    assert all(t.errors for t in producers), "every producer must have been cut off by the kill"
    attempted = sum(t.attempted for t in producers)

    survivor = start_broker(data_dir=data_dir)
    with Conn(survivor.grpc_target) as c:
        next_seqs = _check_log(c, "load", partitions, acked)
        acked_records = sum(len(a.seqs) for a in acked)
        total = sum(next_seqs)
        assert acked_records <= total, "more acknowledged than stored"
        # anything beyond the acknowledged records can only come from requests that were in flight
        assert total - acked_records <= (attempted - len(acked)) * 50
        # new writes continue after the highest seq, in every partition
        for p in range(partitions):
            assert c.put_to("load", p, [b"after|0|1|"]) == [next_seqs[p]]
    stopped_cleanly(survivor)


# -- (c) graceful drain ------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_drains_grpc_requests_in_flight(start_broker, tmp_path):
    data_dir = tmp_path / "drain"
    broker = start_broker(*UNTHROTTLED, data_dir=data_dir)
    with Conn(broker.grpc_target) as c:
        c.create("drain", 4)
    deadline = time.monotonic() + 60
    # big requests so that many are mid-flight when the signal lands
    producers = [Producer(broker.grpc_target, "drain", f"hot{i}", 2000, True, deadline, 30) for i in range(8)]
    producers += [Producer(broker.grpc_target, "drain", f"wide{i}", 1000, False, deadline, 30) for i in range(8)]
    for t in producers:
        t.start()
    limit = time.monotonic() + 20
    while sum(len(t.acked) for t in producers) < 16 and time.monotonic() < limit:
        time.sleep(0.05)
    time.sleep(0.3)
    stopped_cleanly(broker)
    for t in producers:
        t.join(20)
        assert not t.is_alive(), f"{t.name} hung after the broker stopped"
    assert not [p for t in producers for p in t.problems]
    errors = [code for t in producers for code in t.errors]
    assert errors, "the producers never noticed the shutdown"
    assert set(errors) == {grpc.StatusCode.UNAVAILABLE}, f"a refused request must be UNAVAILABLE: {set(errors)}"
    acked = [a for t in producers for a in t.acked]
    assert len(acked) >= 16

    again = start_broker(data_dir=data_dir)
    with Conn(again.grpc_target) as c:
        _check_log(c, "drain", 4, acked)


class RestProducer(threading.Thread):
    """PutRecords over the DIS REST door on one keep-alive connection."""

    def __init__(self, port: int, stream: str, name: str, batch: int, deadline: float) -> None:
        super().__init__(daemon=True, name=name)
        self.port, self.stream, self.batch, self.deadline = port, stream, batch, deadline
        self.acked: list[Acked] = []
        self.refusals: list[str] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        n = 0
        try:
            while time.monotonic() < self.deadline:
                request_id = f"{self.name}-{n}"
                n += 1
                payloads = [_payload(request_id, i, self.batch, 40) for i in range(self.batch)]
                body = json.dumps({"stream_name": self.stream, "records": [
                    {"data": base64.b64encode(d).decode(), "partition_key": f"{request_id}/{i}"}
                    for i, d in enumerate(payloads)]})
                try:
                    conn.request("POST", "/v2/default/records", body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    raw = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.refusals.append(type(exc).__name__)
                    return  # connection closed or refused: the broker is gone
                if resp.status != 200:
                    self.refusals.append(f"{resp.status} {raw[:200]!r}")
                    continue
                answer = json.loads(raw)
                if answer["failed_record_count"]:
                    self.refusals.append(f"partial failure {raw[:200]!r}")
                self.acked.append(Acked(request_id,
                                        [int(r["partition_id"].rsplit("-", 1)[1]) for r in answer["records"]],
                                        [int(r["sequence_number"]) for r in answer["records"]], payloads))
        finally:
            conn.close()


@pytest.mark.slow
def test_sigterm_drains_rest_requests_in_flight(start_broker, tmp_path):
    data_dir = tmp_path / "drain-rest"
    broker = start_broker(data_dir=data_dir)
    with Conn(broker.grpc_target) as c:
        c.create("drain", 4)
    deadline = time.monotonic() + 60
    producers = [RestProducer(broker.http_port, "drain", f"rest{i}", 1000, deadline) for i in range(8)]
    for t in producers:
        t.start()
    limit = time.monotonic() + 20
    while sum(len(t.acked) for t in producers) < 8 and time.monotonic() < limit:
        time.sleep(0.05)
    time.sleep(0.3)
    stopped_cleanly(broker)
    for t in producers:
        t.join(20)
        assert not t.is_alive(), f"{t.name} hung after the broker stopped"
    assert all(t.refusals for t in producers), "every producer must have seen the shutdown"
    refusals = [r for t in producers for r in t.refusals]
    # a refused request is a closed connection or a DIS "retry later"; never a 500 or a partial write
    bad = [r for r in refusals if not (r in ("ConnectionRefusedError", "ConnectionResetError", "RemoteDisconnected",
                                            "BrokenPipeError") or (r.startswith("503") and "DIS.5250" in r))]
    assert not bad, bad
    acked = [a for t in producers for a in t.acked]
    assert len(acked) >= 8

    again = start_broker(data_dir=data_dir)
    with Conn(again.grpc_target) as c:
        _check_log(c, "drain", 4, acked)


# -- (d) command line and environment ----------------------------------------------------------

def test_help_documents_every_option_and_env_var():
    out = subprocess.run([sys.executable, "-m", "broker", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, env=clean_env(COLUMNS="100"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    expected = {"data_dir", "host", "grpc_port", "http_port", "store", "fsync", "memtable_mb",
                "block_cache_mb", "malloc_arenas", "idle_timeout", "body_timeout",
                "shutdown_grace", "retention_interval", "subscribe_heartbeat", "log_level", "tsdb_stream",
                "tsdb_project", "tsdb_port", "tsdb_workers", "metrics_port",
                "auth_file", "allowed_hosts", "tls_cert", "tls_key", "partition_records_per_s", "partition_bytes_per_s",
                "max_connections_per_client", "max_requests_per_client", "max_subscriptions_per_client",
                "nats_servers", "nats_prefix", "replicas", "nats_creds", "nats_tls_ca"}
    assert {f.name for f in dataclasses.fields(Settings)} == expected, "a new setting needs a line here"
    for name in expected:
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} missing from --help"
        assert f"SLUICE_{name.upper()}" in text, f"SLUICE_{name.upper()} missing from --help"
    assert "--no-fsync" in text
    for word in ("0 = any free port", "fsync", "RocksDB", "SIGTERM"):
        assert word in text, word


def test_environment_alone_configures_the_broker(raw_broker, tmp_path):
    data_dir = tmp_path / "from-env"
    b = RawBroker([], clean_env(SLUICE_GRPC_PORT="0", SLUICE_HTTP_PORT="0", SLUICE_DATA_DIR=str(data_dir)))
    raw_broker.append(b)
    m = b.ready()
    grpc_port, http_port = int(m.group(2)), int(m.group(4))
    assert grpc_port > 0 and http_port > 0 and grpc_port != http_port
    assert m.group(1) == m.group(3) == "127.0.0.1"
    with Conn(f"127.0.0.1:{grpc_port}") as c:
        c.create("env", 1)
        assert c.put_to("env", 0, [b"x"]) == [0]
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    try:
        conn.request("GET", "/v2/default/streams")   # gRPC without sluice-project: project "default"
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["stream_names"] == ["env"]
    finally:
        conn.close()
    assert b.stop() == 0
    assert (data_dir / "rocksdb").is_dir()


def test_flags_win_over_environment(raw_broker, tmp_path):
    env_dir, flag_dir = tmp_path / "env-dir", tmp_path / "flag-dir"
    b = RawBroker(["--data-dir", str(flag_dir), "--grpc-port", "0"],
                  clean_env(SLUICE_GRPC_PORT="1", SLUICE_HTTP_PORT="0", SLUICE_DATA_DIR=str(env_dir),
                            SLUICE_LOG_LEVEL="WARNING"))
    raw_broker.append(b)
    m = b.ready()
    assert int(m.group(2)) not in (0, 1)
    assert b.stop() == 0
    assert (flag_dir / "rocksdb").is_dir()
    assert not env_dir.exists()
    # SLUICE_LOG_LEVEL=WARNING was honoured: the INFO ready/stop log lines are absent
    assert not any("stopped; store closed" in line for line in b.stderr), b.stderr


# bad flags and SLUICE_* values, ports in use, data dirs held or unwritable: test_startup_errors.py


# -- (e) --fsync -------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsync_mode_keeps_data_across_stop_and_kill(start_broker, tmp_path):
    data_dir = tmp_path / "fsync"
    first = start_broker("--fsync", data_dir=data_dir)
    with Conn(first.grpc_target) as c:
        c.create("durable", 2)
        assert c.put_to("durable", 0, [b"a", b"b"]) == [0, 1]
        assert c.put_to("durable", 1, [b"c"]) == [0]
    stopped_cleanly(first)

    second = start_broker("--fsync", data_dir=data_dir)
    with Conn(second.grpc_target) as c:
        assert c.read_all("durable", 0) == ([0, 1], [b"a", b"b"])
        assert c.read_all("durable", 1) == ([0], [b"c"])
        assert c.put_to("durable", 1, [b"d", b"e"]) == [1, 2]
    second.kill()  # acknowledged with fsync: even a crash right after cannot lose it

    third = start_broker(data_dir=data_dir)  # and the data is readable without --fsync too
    with Conn(third.grpc_target) as c:
        assert c.read_all("durable", 1) == ([0, 1, 2], [b"c", b"d", b"e"])
        assert c.next_seqs("durable") == [2, 3]
