"""Streaming produce (PutRecordsStream) end to end: the raw RPC and `Producer` over it, against real
broker processes - ordering across many batches, per-record failures (a bad partition id,
throttling), a bad batch in the middle of a stream, a broker killed (SIGKILL) and restarted
mid-stream, a client that disappears mid-stream - and against in-process gRPC servers for what a
real broker cannot be made to do: a core that does not answer (backpressure on both sides) and a
broker without the RPC (the client falls back to PutRecords).

No timing assertions: "blocked" is checked as "did not happen yet while the other side holds it"."""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from conftest import ROOT, eventually

from broker.api import grpc_service
from broker.api.grpc_render import status_code, trailers
from broker.api.grpc_service import PRODUCE_STREAM_WINDOW, SluiceServicer, add_servicer
from broker.api.limits import ClientLimits, GrpcLimits
from broker.app import grpc_max_message, grpc_options
from broker.core.broker import Broker
from broker.core.limits import DEFAULT_LIMITS
from broker.errors import ErrorCode, client_error
from broker.launcher import BrokerProcess
from broker.model import PutRecordsResult
from broker.settings import Settings
from broker.storage.memory import MemoryStore
from client import AsyncClient, BufferFullError, Client, Producer, _wire
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc as pb_grpc

TIMEOUT = 30.0


def batch(batch_id: int, stream: str, payloads: list[bytes], partition_ids: list[int] | None = None,
          keys: list[str] | None = None) -> pb.PutRecordsStreamRequest:
    return pb.PutRecordsStreamRequest(batch_id=batch_id, stream_name=stream, columns=pb.RecordColumns(
        data=payloads, partition_ids=partition_ids or (), partition_keys=keys or ()))


def read_partition(client: Client, stream: str, partition: int) -> list[bytes]:
    cursor = client.get_cursor(stream, partition, "TRIM_HORIZON")
    out: list[bytes] = []
    while True:
        page = client.get_records(cursor, limit=10_000)
        if not page.records:
            return out
        out.extend(r.data for r in page.records)
        cursor = page.next_cursor


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[Client]:
    with Client(broker.grpc_target, timeout=10) as c:
        yield c


# -- the RPC against a real broker ---------------------------------------------------------------

def test_answers_come_in_order_and_records_keep_their_order(broker: BrokerProcess, client: Client,
                                                            stream_name: str) -> None:
    client.create_stream(stream_name, 2)
    stub = pb_grpc.SluiceStub(grpc.insecure_channel(broker.grpc_target))
    requests = [batch(i, stream_name, [f"{i}:{k}".encode() for k in range(20)], [i % 2] * 20) for i in range(1, 301)]
    answers = list(stub.PutRecordsStream(iter(requests), timeout=TIMEOUT))
    assert [a.batch_id for a in answers] == list(range(1, 301))
    assert all(a.WhichOneof("outcome") == "result" and a.result.failed_record_count == 0 for a in answers)
    for p in (0, 1):   # each partition's seqs run on without a gap, batch after batch
        seqs = [s for a in answers if a.batch_id % 2 == p for s in a.result.seqs]
        assert seqs == list(range(len(seqs)))
        stored = read_partition(client, stream_name, p)
        assert stored == [f"{i}:{k}".encode() for i in range(1, 301) if i % 2 == p for k in range(20)]
    # each batch is one observation of the door/verb latency
    with urllib.request.urlopen(broker.http_url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    counts = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("sluice_request_duration_seconds_count")
              and 'door="grpc"' in line and 'verb="put_records_stream"' in line]
    assert counts and counts[0] >= 300


def test_per_record_failures_and_a_bad_batch_in_the_middle(broker: BrokerProcess, client: Client,
                                                           stream_name: str) -> None:
    client.create_stream(stream_name, 2)
    stub = pb_grpc.SluiceStub(grpc.insecure_channel(broker.grpc_target))
    requests = [
        batch(1, stream_name, [b"a", b"b", b"c"], [0, 7, 1]),          # one record with a bad partition id
        batch(2, "no-such-stream", [b"x"]),                          # refused as a whole
        pb.PutRecordsStreamRequest(batch_id=3, stream_name=stream_name, columns=pb.RecordColumns()),  # empty
        batch(4, stream_name, [b"x", b"y"], keys=["only one key"]),  # columns of unequal lengths
        batch(5, stream_name, [b"d", b"e"], [0, 1]),                 # and the stream goes on
    ]
    answers = list(stub.PutRecordsStream(iter(requests), timeout=TIMEOUT))
    assert [a.batch_id for a in answers] == [1, 2, 3, 4, 5]
    first = answers[0].result
    assert first.failed_record_count == 1 and list(first.seqs) == [0, -1, 0]
    assert first.failures[0].index == 1 and first.failures[0].reason == "PARTITION_NOT_FOUND"
    assert first.failures[0].dis_code
    errors = [a.error for a in answers[1:4]]
    assert [a.WhichOneof("outcome") for a in answers[1:4]] == ["error"] * 3
    assert errors[0].reason == "STREAM_NOT_FOUND" and errors[0].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert errors[1].reason == "EMPTY_REQUEST"
    assert all(e.dis_code and e.message for e in errors)
    assert errors[1].code == errors[2].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert list(answers[4].result.seqs) == [1, 1]
    assert read_partition(client, stream_name, 0) == [b"a", b"d"]


def test_garbage_batch_is_answered_and_the_stream_goes_on(broker: BrokerProcess, client: Client,
                                                          stream_name: str) -> None:
    client.create_stream(stream_name, 1)
    channel = grpc.insecure_channel(broker.grpc_target)
    call = channel.stream_stream("/sluice.v1.Sluice/PutRecordsStream", request_serializer=None,
                                 response_deserializer=pb.PutRecordsStreamResponse.FromString)
    raw = [batch(1, stream_name, [b"one"]).SerializeToString(), b"\x12\x02\xff\xfe",   # invalid UTF-8 name
           batch(3, stream_name, [b"three"]).SerializeToString()]
    answers = list(call(iter(raw), timeout=TIMEOUT))
    assert [a.batch_id for a in answers] == [1, 0, 3]   # garbage has no id to echo: 0, in its place
    assert answers[1].error.reason == "BAD_BODY" and answers[1].error.dis_code == "DIS.4300"
    assert "malformed protobuf" in answers[1].error.message
    assert read_partition(client, stream_name, 0) == [b"one", b"three"]


def test_throttled_records_fail_per_record_and_the_producer_retries_them(start_broker: Callable[..., BrokerProcess],
                                                                         stream_name: str) -> None:
    slow = start_broker("--partition-records-per-s", "200")
    with Client(slow.grpc_target, timeout=10) as client:
        client.create_stream(stream_name, 1)
        stub = pb_grpc.SluiceStub(grpc.insecure_channel(slow.grpc_target))
        answers = list(stub.PutRecordsStream(iter([batch(i, stream_name, [b"x"] * 300, [0] * 300)
                                                   for i in (1, 2)]), timeout=TIMEOUT))
        throttled = [f for a in answers for f in a.result.failures]
        assert throttled and {f.reason for f in throttled} == {"THROTTLED"}
        first = answers[0].result   # the excess is a suffix of the batch's records, never one in the middle
        cut = [f.index for f in first.failures]
        assert cut == list(range(300 - len(cut), 300))
        # the Producer retries throttled records until they fit; ordered: each key keeps its order
        with Producer(client, stream_name, ordered=True, max_batch_records=100, max_retries=200, backoff_ms=20,
                      max_backoff_ms=100) as producer:
            futures = [producer.send(f"k{i % 3}:{i}".encode(), partition_key=f"k{i % 3}") for i in range(600)]
            producer.flush(120)
        assert all(f.result().ok for f in futures)
        assert producer.stats.retries > 0 and producer.stats.streams_opened == 1
        mine = [r for r in read_partition(client, stream_name, 0) if r.startswith(b"k")]
        for k in range(3):
            assert [int(r.split(b":")[1]) for r in mine if r.startswith(f"k{k}:".encode())] == list(range(k, 600, 3))


def test_producer_uses_the_stream_with_a_window_and_keeps_key_order(client: Client, stream_name: str) -> None:
    client.create_stream(stream_name, 3)
    with Producer(client, stream_name, max_batch_records=50, linger_ms=1) as producer:
        futures = [producer.send(f"k{i % 7}:{i}".encode(), partition_key=f"k{i % 7}") for i in range(20_000)]
        producer.flush(60)
    results = [f.result() for f in futures]
    assert all(r.ok for r in results)
    assert producer.stats.streams_opened == 1 and producer.stats.requests >= 400
    assert 1 <= producer.stats.max_in_flight_seen <= 8
    stored = [r for p in range(3) for r in read_partition(client, stream_name, p)]
    assert sorted(stored) == sorted(f"k{i % 7}:{i}".encode() for i in range(20_000))
    for k in range(7):   # without retries, pipelined batches are stored in the order they were sent
        mine = [int(r.split(b":")[1]) for r in stored if r.startswith(f"k{k}:".encode())]
        assert mine == list(range(k, 20_000, 7))


async def test_async_client_stream_with_write_and_read(broker: BrokerProcess, client: Client,
                                                       stream_name: str) -> None:
    """grpc.aio, as an asyncio service (or the benchmarks) would use it: write batches, read answers."""
    client.create_stream(stream_name, 1)
    async with AsyncClient(broker.grpc_target) as aclient:
        call = aclient.put_records_stream()
        for i in range(1, 4):
            await call.write(_wire.put_records_stream(i, stream_name, [(b"a%d" % i, None, 0), (b"b%d" % i, None, 0)]))
        answers = [await call.read() for _ in range(3)]
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    assert [(a.batch_id, list(a.result.seqs)) for a in answers] == [(1, [0, 1]), (2, [2, 3]), (3, [4, 5])]


def test_each_batch_is_authorized_so_a_revoked_key_stops_writing(start_broker: Callable[..., BrokerProcess],
                                                                   tmp_path: Path, stream_name: str) -> None:
    admin, producer = "a" * 60, "p" * 60
    keys = {admin: "admin", producer: "producer"}

    def auth_file(names: dict[str, str]) -> str:
        return "".join(f'[[api_keys]]\nkey = "{k}"\nworkspace = "p1"\nrole = "{r}"\n' for k, r in names.items())

    path = tmp_path / "auth.toml"
    path.write_text(auth_file(keys))
    proc = start_broker("--auth-file", str(path))
    with Client(proc.grpc_target, api_key=admin) as c:
        c.create_stream(stream_name, 1)
    requests: queue.SimpleQueue[pb.PutRecordsStreamRequest | None] = queue.SimpleQueue()
    stub = pb_grpc.SluiceStub(grpc.insecure_channel(proc.grpc_target))
    call = stub.PutRecordsStream(iter(requests.get, None), metadata=(("authorization", f"Bearer {producer}"),),
                                 timeout=TIMEOUT)
    answers = iter(call)
    requests.put(batch(1, stream_name, [b"allowed"]))
    assert next(answers).result.failed_record_count == 0
    path.write_text(auth_file({admin: "admin"}))          # the producer's key is revoked ...
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)                     # ... and the file re-read, the call still open
    outcome = None
    for i in range(2, 200):
        requests.put(batch(i, stream_name, [b"after %d" % i]))
        answer = next(answers)
        if answer.WhichOneof("outcome") == "error":
            outcome = answer.error
            break
        time.sleep(0.05)   # the reload is asynchronous to us
    requests.put(None)
    assert outcome is not None and outcome.reason.startswith("AUTH_"), outcome
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED.value[0]


def test_a_key_rebound_to_another_project_stops_writing_not_writes_there(
        start_broker: Callable[..., BrokerProcess], tmp_path: Path, stream_name: str) -> None:
    """The call was opened in the key's project p1: after a reload binds the key to p2 (which has a
    stream of the same name), its batches are refused, never appended to p2's stream."""
    producer, admins = "p" * 60, {"1" * 60: "p1", "2" * 60: "p2"}

    def auth_file(workspace: str) -> str:
        return "".join([f'[[api_keys]]\nkey = "{k}"\nworkspace = "{w}"\nrole = "admin"\n' for k, w in admins.items()]
                       + [f'[[api_keys]]\nkey = "{producer}"\nworkspace = "{workspace}"\nrole = "producer"\n'])

    path = tmp_path / "auth.toml"
    path.write_text(auth_file("p1"))
    proc = start_broker("--auth-file", str(path))
    for key in admins:
        with Client(proc.grpc_target, api_key=key) as c:
            c.create_stream(stream_name, 1)
    requests: queue.SimpleQueue[pb.PutRecordsStreamRequest | None] = queue.SimpleQueue()
    stub = pb_grpc.SluiceStub(grpc.insecure_channel(proc.grpc_target))
    call = stub.PutRecordsStream(iter(requests.get, None), metadata=(("authorization", f"Bearer {producer}"),),
                                 timeout=TIMEOUT)
    answers = iter(call)
    requests.put(batch(1, stream_name, [b"for p1"]))
    assert next(answers).result.failed_record_count == 0
    path.write_text(auth_file("p2"))                          # the producer's key now belongs to p2 ...
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)                     # ... and the file re-read, the call still open
    outcome = None
    for i in range(2, 200):
        requests.put(batch(i, stream_name, [b"after %d" % i]))
        answer = next(answers)
        if answer.WhichOneof("outcome") == "error":
            outcome = answer.error
            break
        time.sleep(0.05)   # the reload is asynchronous to us
    requests.put(None)
    assert outcome is not None and outcome.reason == "PERMISSION_DENIED", outcome
    with Client(proc.grpc_target, api_key="2" * 60) as p2:
        assert p2.get_records(p2.get_cursor(stream_name, 0, "TRIM_HORIZON")).records == []


# -- a broker killed mid-stream --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_broker_restarted_mid_stream_loses_nothing_acknowledged_and_resends_only_the_rest(
        start_broker: Callable[..., BrokerProcess], tmp_path: Path, stream_name: str, how: str) -> None:
    """SIGKILL: batches in flight may be stored unacknowledged, so resent: duplicates at most one
    window. SIGTERM: the broker answers the batches it took before it ends the call: none."""
    data = tmp_path / "killed"
    first = start_broker(data_dir=data)
    with Client(first.grpc_target, timeout=5) as c:
        c.create_stream(stream_name, 2)
    total, per_batch, window = 6000, 40, 8
    futures: list[Any] = []
    stop = threading.Event()
    producer = Producer(first.grpc_target, stream_name, max_batch_records=per_batch, linger_ms=1,
                        max_in_flight=window, max_retries=1000, backoff_ms=20, max_backoff_ms=200)

    def produce() -> None:
        for i in range(total):
            if stop.is_set():
                return
            futures.append(producer.send(f"r{i}".encode(), partition_key=f"k{i % 11}"))
            if i % 50 == 0:
                time.sleep(0.002)

    writer = threading.Thread(target=produce, daemon=True)
    try:
        writer.start()
        eventually(lambda: producer.stats.delivered >= 1000, timeout=20)
        if how == "kill":
            first.kill()                                    # SIGKILL: no drain, batches in flight
        else:
            first.stop(15)                                  # SIGTERM: drains, records keep coming
        acknowledged = [f.result().seq for f in list(futures) if f.done()]
        acknowledged_payloads = {f"r{i}".encode() for i, f in enumerate(list(futures)) if f.done() and f.result().ok}
        eventually(lambda: producer.stats.failed_requests >= 1, timeout=20)
        second = start_broker("--grpc-port", str(first.grpc_port), data_dir=data)
        writer.join(60)
        producer.flush(90)
    finally:
        stop.set()
        writer.join(10)
        producer.close(10)
    assert acknowledged and all(seq >= 0 for seq in acknowledged)
    assert len(futures) == total and all(f.result().ok for f in futures), \
        {f.result().reason for f in futures if not f.result().ok}
    stats = producer.stats
    assert stats.streams_opened >= 2 and (stats.stream_breaks >= 1 or how == "stop")
    # resent: only records of batches unacknowledged when a stream broke (and their later attempts)
    assert stats.records_sent - total == stats.retries
    with Client(second.grpc_target, timeout=5) as c:
        stored = read_partition(c, stream_name, 0) + read_partition(c, stream_name, 1)
    assert set(stored) == {f"r{i}".encode() for i in range(total)}      # nothing lost
    duplicates = len(stored) - total
    print(f"{how} mid-stream: {len(acknowledged)} acknowledged before it went down, {stats.stream_breaks} broken "
          f"stream(s), {stats.resent_batches} batches resent, {stats.retries} record retries, {duplicates} duplicates")
    # only batches in flight at the kill can have been stored unacknowledged (later streams found the
    # broker down): duplicates are bounded by one window
    assert 0 <= duplicates <= (window * per_batch if how == "kill" else 0)
    for payload in acknowledged_payloads:                               # acknowledged: never resent
        assert stored.count(payload) == 1, payload


def test_an_idle_stream_does_not_hold_up_a_graceful_stop(start_broker: Callable[..., BrokerProcess],
                                                          stream_name: str) -> None:
    """A producer's open, idle stream waits in its read, like a subscription in its write: the drain
    does not wait for it (else the stop would take the whole minute of grace)."""
    proc = start_broker("--shutdown-grace", "60")
    with Client(proc.grpc_target, timeout=10) as c:
        c.create_stream(stream_name, 1)
        producer = Producer(c, stream_name)
        try:
            assert producer.send(b"one").result(10).ok
            assert producer.stats.streams_opened == 1
            proc.stop(20)
        finally:
            producer.close(5)


# -- a client that disappears mid-stream ----------------------------------------------------------

CHILD = """
import sys, grpc
from client._pb.sluice.v1 import sluice_pb2 as pb, sluice_pb2_grpc as pb_grpc
target, stream = sys.argv[1], sys.argv[2]
def batches():
    i = 0
    while True:
        i += 1
        yield pb.PutRecordsStreamRequest(batch_id=i, stream_name=stream,
                                         columns=pb.RecordColumns(data=[b"c%d" % i] * 10, partition_ids=[0] * 10))
stub = pb_grpc.SluiceStub(grpc.insecure_channel(target))
for answer in stub.PutRecordsStream(batches()):
    assert answer.result.failed_record_count == 0
    print(answer.batch_id, flush=True)
    if answer.batch_id == 50:
        print("READY", flush=True)
        sys.stdin.readline()     # holds the call open, batches in flight, until killed
"""


def gauge(proc: BrokerProcess, name: str) -> float:
    with urllib.request.urlopen(proc.http_url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + " "))


def test_client_killed_mid_stream_frees_its_call(start_broker: Callable[..., BrokerProcess], stream_name: str) -> None:
    proc = start_broker("--max-subscriptions-per-client", "1", "--shutdown-grace", "60")
    with Client(proc.grpc_target, timeout=10) as c:
        c.create_stream(stream_name, 1)
    child = subprocess.Popen([sys.executable, "-c", CHILD, proc.grpc_target, stream_name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    acked: list[int] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "READY":
                break
            acked.append(int(line))
        assert acked[-1] == 50

        def another_stream() -> grpc.RpcError | None:
            stub = pb_grpc.SluiceStub(grpc.insecure_channel(proc.grpc_target))
            try:
                list(stub.PutRecordsStream(iter([batch(1, stream_name, [b"later"], [0])]), timeout=TIMEOUT))
                return None
            except grpc.RpcError as exc:
                return exc

        assert gauge(proc, "sluice_produce_streams_open") == 1
        assert gauge(proc, "sluice_subscriptions_open") == 0   # a produce stream is no subscription ...
        with Client(proc.grpc_target, timeout=10) as c:        # ... and holds no subscription slot
            sub = c.subscription(stream_name, 0, "TRIM_HORIZON")
            assert next(sub).records
            sub.cancel()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
    eventually(lambda: gauge(proc, "sluice_produce_streams_open") == 0, timeout=20)   # the broker freed the call
    assert another_stream() is None
    with Client(proc.grpc_target, timeout=10) as c:
        stored = read_partition(c, stream_name, 0)
    for i in acked:   # every acknowledged batch is stored
        assert stored.count(b"c%d" % i) == 10
    assert stored[-1] == b"later"
    proc.stop(20)   # nothing of the dead call holds the drain up (else: the whole minute of grace)


# -- in-process servers: a core that does not answer, a broker without the RPC -----------------------

class _Stats:
    produce_streams = 0

    def observe_request(self, *args: Any) -> None:
        pass


class StuckBroker:
    """Stands in for the core: put_records waits until released; counts the batches inside."""

    def __init__(self) -> None:
        self.stats = _Stats()
        self.inside = 0
        self.most_inside = 0
        self.done = 0
        self.records = 0
        self.release: asyncio.Event | None = None

    async def check_put(self, stream_name: str, count: int, project: str) -> None:
        pass

    async def put_records(self, stream_name: str, entries: Any, project: str,
                          handed: asyncio.Future[None] | None = None) -> PutRecordsResult:
        if handed is not None and not handed.done():   # "with the committer": the next batch may go on
            handed.set_result(None)
        if self.release is None:
            self.release = asyncio.Event()
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await self.release.wait()
        finally:
            self.inside -= 1
        self.done += 1
        n = len(entries)
        self.records += n
        return PutRecordsResult([0] * n, list(range(n)))


class InProcessServer:
    """A grpc.aio server on its own loop thread: the real servicer over `StuckBroker`."""

    def __init__(self, broker: StuckBroker, register: Callable[[SluiceServicer, grpc.aio.Server], None],
                 interceptors: tuple[Any, ...] = (), options: tuple[tuple[str, int], ...] = ()) -> None:
        self.broker = broker
        self.interceptors, self.options = interceptors, options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servicer = SluiceServicer(broker, sources=object())  # type: ignore[arg-type]
        self.server: grpc.aio.Server | None = None
        self.port = self.run(self._start(register))

    async def _start(self, register: Callable[[SluiceServicer, grpc.aio.Server], None]) -> int:
        self.server = grpc.aio.server(interceptors=self.interceptors, options=self.options)
        register(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def release(self) -> None:
        async def go() -> None:
            if self.broker.release is None:
                self.broker.release = asyncio.Event()
            self.broker.release.set()
        self.run(go())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        assert self.server is not None
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def stuck() -> Iterator[InProcessServer]:
    server = InProcessServer(StuckBroker(), add_servicer)
    yield server
    server.close()


def test_server_works_on_at_most_a_window_of_batches(stuck: InProcessServer) -> None:
    sent = 0
    big = [b"x" * 100_000] * 10   # 1 MB a batch
    # more than grpc's own buffers take: they hold ~7 batches here as a rule, but grpc tunes a
    # stream's window (BDP, memory pressure) and once, in a CI run, took all of 60
    total = 200

    def requests() -> Iterator[pb.PutRecordsStreamRequest]:
        nonlocal sent
        for i in range(1, total + 1):
            sent = i
            yield batch(i, "s", big)

    answers: list[pb.PutRecordsStreamResponse] = []
    call = pb_grpc.SluiceStub(grpc.insecure_channel(stuck.target, options=[
        ("grpc.max_send_message_length", 16 << 20)])).PutRecordsStream(requests(), timeout=TIMEOUT)
    reader = threading.Thread(target=lambda: answers.extend(call), daemon=True)
    reader.start()
    try:
        eventually(lambda: stuck.broker.inside == PRODUCE_STREAM_WINDOW)
        time.sleep(0.5)   # give a broken bound the chance to show
        assert stuck.broker.inside == stuck.broker.most_inside == PRODUCE_STREAM_WINDOW
        assert not answers
        assert sent < total, "the server stopped reading: HTTP/2 flow control holds the client back"
    finally:   # the call ends either way: its reader thread must not outlive the test with an error
        stuck.release()
        reader.join(TIMEOUT)
    assert [a.batch_id for a in answers] == list(range(1, total + 1))
    assert stuck.broker.most_inside == PRODUCE_STREAM_WINDOW and sent == total


def test_producer_blocks_the_caller_instead_of_buffering(stuck: InProcessServer) -> None:
    producer = Producer(stuck.target, "s", max_batch_records=10, linger_ms=0, max_in_flight=2,
                        max_buffered_records=100)
    try:
        futures = [producer.send(b"r%d" % i) for i in range(100)]
        with pytest.raises(BufferFullError):
            producer.send(b"one too many", timeout=0.3)
        eventually(lambda: stuck.broker.inside == 2)
        assert producer.stats.requests == 2 and producer.stats.max_in_flight_seen == 2
        assert not any(f.done() for f in futures)
        stuck.release()
        producer.flush(TIMEOUT)
        assert all(f.result().ok for f in futures)
        assert stuck.broker.most_inside == 2 and producer.stats.requests == 10
    finally:
        producer.close(5)


def _unary_only(servicer: SluiceServicer, server: grpc.aio.Server) -> None:
    """A broker from before streaming produce: PutRecords, no PutRecordsStream."""
    handler = grpc.unary_unary_rpc_method_handler(servicer.PutRecords,
                                                  request_deserializer=pb.PutRecordsRequest.FromString,
                                                  response_serializer=pb.PutRecordsResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(grpc_service.SERVICE_NAME,
                                                                          {"PutRecords": handler}),))


def test_producer_falls_back_to_put_records_and_remembers() -> None:
    server = InProcessServer(StuckBroker(), _unary_only)
    server.release()
    try:
        with Producer(server.target, "s", max_batch_records=10, linger_ms=0) as producer:
            futures = [producer.send(b"r%d" % i) for i in range(100)]
            producer.flush(TIMEOUT)
            more = [producer.send(b"m%d" % i) for i in range(50)]
            producer.flush(TIMEOUT)
        assert all(f.result().ok for f in futures + more)
        assert producer.stats.streams_opened == 1   # tried once, then PutRecords only
        assert producer.stats.retries == 0 and producer.stats.failed == 0
        assert server.broker.records == 150   # each record once, by PutRecords
    finally:
        server.close()


# -- regressions: limits, sizes, deadlines, keepalive, order, failures -------------------------------

def test_producers_hold_no_subscription_slot(start_broker: Callable[..., BrokerProcess], stream_name: str) -> None:
    """More producers than the subscription limit all write, over their streams, and a consumer of
    the same host can still subscribe: a produce stream is no subscription."""
    proc = start_broker("--max-subscriptions-per-client", "2")
    with Client(proc.grpc_target, timeout=10) as c:
        names = [f"{stream_name}-{i}" for i in range(4)]
        for name in names:
            c.create_stream(name, 1)
        producers = [Producer(c, name, max_retries=0) for name in names]
        try:
            for p in producers:
                assert p.send(b"x").result(TIMEOUT).ok
            assert all(p.stats.streams_opened == 1 for p in producers)   # all streams open at once
            assert gauge(proc, "sluice_produce_streams_open") == 4
            sub = c.subscription(names[0], 0, "TRIM_HORIZON")
            assert [r.data for r in next(sub).records] == [b"x"]
            sub.cancel()
        finally:
            for p in producers:
                p.close(10)


def test_each_stream_batch_takes_a_request_slot_until_answered() -> None:
    limits = ClientLimits.of(100, 2, 1)
    server = InProcessServer(StuckBroker(), add_servicer, interceptors=(GrpcLimits(limits, grpc_service.SERVICE_NAME),))
    try:
        requests: queue.SimpleQueue[pb.PutRecordsStreamRequest | None] = queue.SimpleQueue()
        call = pb_grpc.SluiceStub(grpc.insecure_channel(server.target)).PutRecordsStream(
            iter(requests.get, None), timeout=TIMEOUT)
        for i in range(1, 5):
            requests.put(batch(i, "s", [b"r%d" % i]))
        eventually(lambda: server.broker.inside == 2)
        eventually(lambda: server.servicer._stream_batches == 4)   # 3 and 4 read, and refused
        assert limits.requests.held("127.0.0.1") == 2 and limits.subscriptions.held("127.0.0.1") == 0
        server.release()
        answers = iter(call)
        first = [next(answers) for _ in range(4)]
        assert [a.batch_id for a in first] == [1, 2, 3, 4]
        assert [a.WhichOneof("outcome") for a in first] == ["result", "result", "error", "error"]
        assert {a.error.reason for a in first[2:]} == {"TOO_MANY_REQUESTS"}
        requests.put(batch(5, "s", [b"r5"]))   # the answers gave the slots back
        assert next(answers).WhichOneof("outcome") == "result"
        requests.put(None)
        assert list(answers) == []
        assert limits.requests.held("127.0.0.1") == 0
    finally:
        server.close()


def _refusing_stream(servicer: SluiceServicer, server: grpc.aio.Server) -> None:
    """A broker that refuses to open a PutRecordsStream call (one counting it as a subscription,
    past its limit): TOO_MANY_REQUESTS; PutRecords works."""
    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        error = client_error(ErrorCode.TOO_MANY_REQUESTS, detail="at most 1 open subscriptions")
        await context.abort(status_code(error), error.message, trailing_metadata=trailers(error))
    stream = grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=pb.PutRecordsStreamRequest.FromString,
                                                   response_serializer=pb.PutRecordsStreamResponse.SerializeToString)
    unary = grpc.unary_unary_rpc_method_handler(servicer.PutRecords,
                                                request_deserializer=pb.PutRecordsRequest.FromString,
                                                response_serializer=pb.PutRecordsResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        grpc_service.SERVICE_NAME, {"PutRecords": unary, "PutRecordsStream": stream}),))


def test_a_refused_stream_makes_the_producer_use_put_records() -> None:
    server = InProcessServer(StuckBroker(), _refusing_stream)
    server.release()
    try:
        with Producer(server.target, "s", max_batch_records=10, linger_ms=0, max_retries=0) as producer:
            futures = [producer.send(b"r%d" % i, partition_key="k") for i in range(100)]
            producer.flush(TIMEOUT)
        assert all(f.result().ok for f in futures)
        assert producer.stats.streams_opened == 1 and producer.stats.retries == 0   # not tried again for a while
        assert server.broker.records == 100
    finally:
        server.close()


def test_an_idle_stream_is_closed_and_reopened_for_the_next_batch() -> None:
    server = InProcessServer(StuckBroker(), add_servicer)
    server.release()
    try:
        with Producer(server.target, "s", linger_ms=0, stream_idle_ms=50) as producer:
            assert producer.send(b"a").result(TIMEOUT).ok
            eventually(lambda: server.broker.stats.produce_streams == 0)   # the producer ended its call
            assert producer.send(b"b").result(TIMEOUT).ok
            assert producer.stats.streams_opened == 2 and producer.stats.stream_breaks == 0
    finally:
        server.close()


def test_client_and_broker_message_limits_agree() -> None:
    assert _wire.MAX_MESSAGE == grpc_max_message(DEFAULT_LIMITS)
    options = dict(grpc_options(Settings(), grpc_max_message(DEFAULT_LIMITS)))
    assert options["grpc.max_receive_message_length"] == _wire.MAX_MESSAGE


def test_the_broker_accepts_the_clients_keepalive_pings() -> None:
    """An idle stream (no data either way) gets keepalive pings from the client: the broker's ping
    policy must allow them, or it answers GOAWAY too_many_pings and breaks the stream."""
    client = dict(_wire.CHANNEL_OPTIONS)
    server = dict(grpc_options(Settings(), grpc_max_message(DEFAULT_LIMITS)))
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server.get("grpc.http2.max_ping_strikes", 2) in (0, 2)


def test_a_batch_too_large_for_the_broker_fails_alone() -> None:
    """The broker takes smaller messages than the client thinks (grpc.aio's default, 4 MB): the
    stream ends RESOURCE_EXHAUSTED; only the oversized batch fails, the others in flight are
    retried, and a batch that large goes by PutRecords from then on (failing alone)."""
    server = InProcessServer(StuckBroker(), add_servicer)
    try:
        producer = Producer(server.target, "s", max_batch_records=1, linger_ms=0, max_retries=3, backoff_ms=10)
        small = [producer.send(b"ok%d" % i) for i in range(3)]
        eventually(lambda: server.broker.inside == 3)
        big = producer.send(b"x" * (5 << 20))
        eventually(lambda: big.done())
        server.release()
        producer.flush(TIMEOUT)
        assert [f.result().ok for f in small] == [True] * 3
        assert big.result().reason == "RESOURCE_EXHAUSTED"
        opened = producer.stats.streams_opened
        again = producer.send(b"y" * (5 << 20))   # by PutRecords now: the stream stays up
        later = producer.send(b"later")
        assert again.result(TIMEOUT).reason == "RESOURCE_EXHAUSTED" and later.result(TIMEOUT).ok
        assert producer.stats.streams_opened == opened and producer.stats.stream_breaks == 1
        producer.close(5)
    finally:
        server.close()


def test_a_record_larger_than_any_broker_message_never_goes_on_the_stream() -> None:
    server = InProcessServer(StuckBroker(), add_servicer, options=(("grpc.max_receive_message_length", 32 << 20),))
    server.release()
    try:
        with Producer(server.target, "s", linger_ms=0, max_retries=0) as producer:
            assert producer.send(b"before").result(TIMEOUT).ok
            big = producer.send(b"x" * (_wire.MAX_MESSAGE + 1))
            after = producer.send(b"after")
            assert big.result(TIMEOUT).reason == "RESOURCE_EXHAUSTED"   # the client's own refusal, as PutRecords
            assert after.result(TIMEOUT).ok
            assert producer.stats.streams_opened == 1 and producer.stats.stream_breaks == 0
    finally:
        server.close()


def test_a_broker_that_never_answers_times_the_stream_out(stuck: InProcessServer) -> None:
    with Client(stuck.target, timeout=0.5) as client:
        producer = Producer(client, "s", linger_ms=0, max_retries=1, backoff_ms=10)
        try:
            future = producer.send(b"x")
            result = future.result(TIMEOUT)   # no timing asserted: only that it resolves at all
            assert result.reason == "DEADLINE_EXCEEDED" and not result.ok
            assert producer.stats.streams_opened == 2 and producer.stats.retries == 1   # retried like unary
        finally:
            producer.close(1)


async def test_batches_of_a_call_stay_in_order_across_a_scale_event() -> None:
    """Batch 1 waits out a scale event; batch 2 arrives in the loop turn the event ends: it must not
    overtake batch 1 on its way to the committer (the scale event is ended as update_partition_count
    ends one)."""
    core = Broker(MemoryStore(), cursor_secret=b"s" * 32)
    await core.start()
    try:
        await core.create_stream("s", 1)
        sid = core.catalogue.get("default", "s").stream_id
        feed: asyncio.Queue[pb.PutRecordsStreamRequest | None] = asyncio.Queue()

        async def requests() -> Any:
            while (r := await feed.get()) is not None:
                yield r

        class Context:
            def __init__(self) -> None:
                self.out: list[pb.PutRecordsStreamResponse] = []

            def invocation_metadata(self) -> tuple[()]:
                return ()

            async def write(self, message: pb.PutRecordsStreamResponse) -> None:
                self.out.append(message)

        context = Context()
        call = asyncio.create_task(SluiceServicer(core, sources=object())  # type: ignore[arg-type]
                                   .PutRecordsStream(requests(), context))
        done = core.catalogue._scaling[sid] = asyncio.Event()
        feed.put_nowait(batch(1, "s", [b"b1"], [0]))
        await asyncio.sleep(0.05)   # batch 1 waits in catalogue.settled

        def end_scale() -> None:
            del core.catalogue._scaling[sid]
            done.set()

        feed.put_nowait(batch(2, "s", [b"b2"], [0]))
        asyncio.get_running_loop().call_soon(end_scale)
        await asyncio.sleep(0.05)
        feed.put_nowait(None)
        await call
        assert [(a.batch_id, list(a.result.seqs)) for a in context.out] == [(1, [0]), (2, [1])]
    finally:
        await core.close()


def test_a_closed_client_fails_the_records_instead_of_killing_the_sender(stuck: InProcessServer) -> None:
    stuck.release()
    client = Client(stuck.target, timeout=5)
    producer = Producer(client, "s", linger_ms=0, max_retries=1, backoff_ms=10)
    try:
        assert producer.send(b"a").result(TIMEOUT).ok
        client.close()
        future = producer.send(b"b")
        producer.flush(TIMEOUT)
        assert isinstance(future.exception(), ValueError)   # "Channel closed", as PutRecords would raise
        assert producer._thread.is_alive()
    finally:
        producer.close(1)


def test_an_error_reading_answers_ends_the_stream_and_the_batch_is_retried(stuck: InProcessServer,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    stuck.release()
    real = _wire.put_results
    calls = []

    def broken_once(resp: pb.PutRecordsResponse) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug decoding an answer")
        return real(resp)

    monkeypatch.setattr(_wire, "put_results", broken_once)
    with Producer(stuck.target, "s", linger_ms=0, max_retries=2, backoff_ms=10) as producer:
        assert producer.send(b"a").result(TIMEOUT).ok
        assert producer.stats.streams_opened == 2 and producer.stats.retries == 1


def test_the_delivery_timeout_bounds_retries_against_a_broker_that_never_answers() -> None:
    """Each attempt lasts the client's timeout: 20 retries of 30 s would keep a record (and close())
    for ~11 minutes; the delivery timeout ends its retrying instead."""
    server = InProcessServer(StuckBroker(), add_servicer)
    try:
        with Client(server.target, timeout=0.3) as client:
            producer = Producer(client, "s", linger_ms=0, delivery_timeout_ms=1_000)
            try:
                result = producer.send(b"a").result(TIMEOUT)
            finally:
                producer.close(TIMEOUT)
        assert not result.ok and result.reason == "DEADLINE_EXCEEDED", result
        assert 0 < producer.stats.retries < 20   # gave up on time, not on max_retries (20 by default)
    finally:
        server.release()
        server.close()


class Recording(StuckBroker):
    """PutRecords only (see _unary_only); keeps the payloads in the order they were stored."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[bytes] = []

    async def put_records(self, stream_name: str, entries: Any, project: str,
                          handed: asyncio.Future[None] | None = None) -> PutRecordsResult:
        self.got.extend(entries.data)
        return PutRecordsResult([0] * len(entries), list(range(len(entries))))


def test_falling_back_to_put_records_keeps_the_order() -> None:
    """Batches built while the UNIMPLEMENTED arrives go behind those the failed stream hands back."""
    for _ in range(20):
        server = InProcessServer(Recording(), _unary_only)
        try:
            with Producer(server.target, "s", max_batch_records=1, linger_ms=0, max_in_flight=1000) as producer:
                for i in range(200):
                    producer.send(b"%d" % i, partition_key="k")
                producer.flush(TIMEOUT)
            got = [int(x) for x in server.broker.got]  # type: ignore[attr-defined]
            assert got == list(range(200)) and producer.stats.retries == 0
        finally:
            server.close()
