"""Push consumption (Subscribe) over real gRPC against a broker process on loopback.

* A subscriber receives what is written after it subscribed: in order, each record once, over many
  batches.
* A stalled subscriber - one that stops reading and keeps its call open - costs the broker one
  batch, not a queue: producers keep writing at full speed, the broker's memory (VmRSS from
  /proc) stays flat while hundreds of MB flow past, and once the subscriber reads again it goes
  on exactly where it stopped.
* SIGTERM ends open subscriptions with UNAVAILABLE at once and the broker exits 0 promptly, even
  when one of them is stalled.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable

import grpc
import pytest
from conftest import eventually

from broker.launcher import ROOT, BrokerProcess
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc
from client.client import Client

TIMEOUT = 30.0
# Brokers these tests load as fast as they can, past the default write limit per partition: they
# test push delivery under load, not throttling (tests/limits/), so it is off.
UNTHROTTLED = ("--partition-records-per-s", "0", "--partition-bytes-per-s", "0")
MB = 1_000_000
BIG_MESSAGES = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def channel(target: str) -> grpc.Channel:
    """A channel with its own HTTP/2 connection, as a separate client process would have."""
    return grpc.insecure_channel(target, options=[*BIG_MESSAGES, ("grpc.use_local_subchannel_pool", 1)])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def put(stub: sluice_pb2_grpc.SluiceStub, stream: str, partition: int, payloads: list[bytes]) -> list[int]:
    resp = stub.PutRecords(pb.PutRecordsRequest(stream_name=stream, records=pb.RecordList(entries=[
        pb.PutRecordsEntry(data=d, partition_id=partition) for d in payloads])), timeout=TIMEOUT)
    assert resp.failed_record_count == 0, resp.failures
    return list(resp.seqs)


# -- in order, exactly once ------------------------------------------------------------------------


def test_subscriber_gets_records_written_after_it_subscribed_in_order_exactly_once(broker: BrokerProcess,
                                                                                   stream_name: str) -> None:
    total, per_put, cap = 2000, 20, 37
    with Client(broker.grpc_target) as client:
        client.create_stream(stream_name, 2)
        client.put_records(stream_name, [b"before-0", b"before-1", b"before-2"], partition_id=0)
        cursor = client.get_cursor(stream_name, 0, "LATEST")      # subscribe from here: after "before-*"
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                with Client(broker.grpc_target) as producer:
                    for i in range(0, total, per_put):
                        producer.put_records(stream_name, [b"r%05d" % j for j in range(i, i + per_put)],
                                             partition_id=0)
                        producer.put_records(stream_name, [b"elsewhere"], partition_id=1)
                        if i % 200 == 0:
                            time.sleep(0.01)   # let the subscriber catch up now and then: small batches too
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=produce)
        pages = []
        received = 0
        deadline = time.monotonic() + 60
        subscription = client.subscribe(cursor=cursor, max_records=cap)
        thread.start()
        try:
            for page in subscription:
                pages.append(page)
                received += len(page.records)
                if received >= total or errors or time.monotonic() > deadline:
                    break
        finally:
            subscription.close()
            thread.join(TIMEOUT)
        assert not errors, errors
        assert not thread.is_alive()
    records = [r for page in pages for r in page.records]
    assert [r.seq for r in records] == list(range(3, 3 + total))   # each once, in order, no gap
    assert [r.data for r in records] == [b"r%05d" % j for j in range(total)]
    batches = [len(page.records) for page in pages if page.records]
    assert max(batches) <= cap
    assert len(batches) >= total // cap                                     # many batches, not one


# -- a stalled subscriber ----------------------------------------------------------------------------


RECORD = 256 * 1024          # payload bytes: a 4 MiB PutRecords carries 16 of them
PER_PUT = 16
WARM_UP_PUTS = 40            # ~170 MB before measuring: RocksDB's memtables reach their steady size
STALLED_PUTS = 120           # ~500 MB written past the stalled subscriber
MAX_GROWTH_MB = 150          # what the stalled subscriber may cost the broker, at most
MAX_PUT_S = 2.0


def payloads(first_index: int, filler: bytes) -> list[bytes]:
    """Records that say which one they are: the first 8 bytes are the record's index."""
    return [struct.pack(">Q", first_index + k) + filler for k in range(PER_PUT)]


@pytest.mark.slow
def test_a_stalled_subscriber_neither_slows_producers_nor_grows_broker_memory(
        start_broker: Callable[..., BrokerProcess], stream_name: str) -> None:
    broker = start_broker("--log-level", "WARNING", *UNTHROTTLED)
    assert broker.proc is not None
    pid = broker.proc.pid
    filler = os.urandom(RECORD - 8)
    producer_channel, subscriber_channel = channel(broker.grpc_target), channel(broker.grpc_target)
    producer = sluice_pb2_grpc.SluiceStub(producer_channel)
    subscriber = sluice_pb2_grpc.SluiceStub(subscriber_channel)
    call = None
    try:
        producer.CreateStream(pb.CreateStreamRequest(stream_name=stream_name, partition_count=1), timeout=TIMEOUT)
        # warm up on another stream, so this one holds only what the subscriber is to see
        producer.CreateStream(pb.CreateStreamRequest(stream_name=stream_name + "-w", partition_count=1),
                              timeout=TIMEOUT)
        for i in range(WARM_UP_PUTS):
            put(producer, stream_name + "-w", 0, payloads(i * PER_PUT, filler))

        cursor = producer.GetCursor(pb.GetCursorRequest(stream_name=stream_name, partition_id=0,
                                                        cursor_type=pb.CURSOR_TYPE_LATEST), timeout=TIMEOUT).cursor
        call = subscriber.Subscribe(pb.SubscribeRequest(cursor=cursor), timeout=120)
        assert put(producer, stream_name, 0, payloads(0, filler)) == list(range(PER_PUT))
        first = next(call).records              # one message - then this subscriber stops reading
        assert list(first.seqs) == list(range(len(first.seqs))) and first.seqs

        before = rss_mb(pid)
        samples = [before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                samples.append(rss_mb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        latencies = []
        began = time.perf_counter()
        for i in range(1, STALLED_PUTS + 1):
            started = time.perf_counter()
            seqs = put(producer, stream_name, 0, payloads(i * PER_PUT, filler))
            latencies.append(time.perf_counter() - started)
            assert seqs == list(range(i * PER_PUT, (i + 1) * PER_PUT))
        elapsed = time.perf_counter() - began
        time.sleep(0.5)                          # let the broker settle before the "after" reading
        sampling.set()
        sampler.join(5)
        after = rss_mb(pid)
        written_mb = STALLED_PUTS * PER_PUT * RECORD / MB
        peak = max([*samples, after])
        print(f"\nstalled subscriber: {written_mb:.0f} MB written in {elapsed:.1f} s "
              f"({written_mb / elapsed:.0f} MB/s), "
              f"PutRecords p50 {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms "
              f"max {max(latencies) * 1000:.0f} ms; broker VmRSS before {before:.0f} MB, peak {peak:.0f} MB "
              f"(+{peak - before:.0f}), after {after:.0f} MB")
        assert max(latencies) < MAX_PUT_S, f"a PutRecords took {max(latencies):.2f} s while a subscriber was stalled"
        assert written_mb / elapsed > 20, f"producers slowed to {written_mb / elapsed:.1f} MB/s"
        assert peak - before < MAX_GROWTH_MB, (
            f"broker memory grew {peak - before:.0f} MB while {written_mb:.0f} MB flowed past a stalled subscriber")

        # reading again: it goes on right after the first message, every record once, in order
        expected_total = (STALLED_PUTS + 1) * PER_PUT
        next_seq = first.seqs[-1] + 1
        resumed = time.monotonic()
        for message in call:
            for seq, data in zip(message.records.seqs, message.records.data):
                assert seq == next_seq, f"expected {next_seq}, got {seq}"
                assert len(data) == RECORD and struct.unpack_from(">Q", data)[0] == seq and data[8:] == filler
                next_seq += 1
            if next_seq == expected_total:
                break
            assert time.monotonic() - resumed < 60
        assert next_seq == expected_total
    finally:
        if call is not None:
            call.cancel()
        producer_channel.close()
        subscriber_channel.close()


# -- SIGTERM -----------------------------------------------------------------------------------------


def test_sigterm_is_not_held_by_http_streams_whose_consumers_do_not_read(
        start_broker: Callable[..., BrokerProcess]) -> None:
    """An SSE tail and a Timeplus streaming query whose clients stopped reading: their last write
    (write_eof drains too) waited for the client, so a stop took twice --shutdown-grace (21.8 s
    with grace 10: aiohttp waits the grace, cancels the request - not the write - and waits
    again). At a stop, writes waiting for their clients are dropped."""
    grace, stream_name = 10, "stalled"   # a name SQL takes as it is
    broker = start_broker(*UNTHROTTLED, "--shutdown-grace", str(grace))
    assert broker.proc is not None
    chan = channel(broker.grpc_target)
    stub = sluice_pb2_grpc.SluiceStub(chan)
    readers: list[socket.socket] = []
    try:
        stub.CreateStream(pb.CreateStreamRequest(stream_name=stream_name, partition_count=1), timeout=TIMEOUT)
        filler = b"x" * (RECORD - 8)   # text: the query's raw column is the record itself
        for i in range(10):   # ~40 MB: far more than the sockets and the broker's buffers hold
            put(stub, stream_name, 0, payloads(i * PER_PUT, filler))
        query = json.dumps({"sql": f"select * from {stream_name} settings seek_to='earliest'"}).encode()
        for request in (f"GET /sluice/v1/tail?stream-name={stream_name}&partition-id=0&cursor-type=TRIM_HORIZON "
                        "HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
                        b"POST /api/v1beta2/queries HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(query), query)):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect((broker.host, broker.http_port))
            reader.sendall(request)
            readers.append(reader)
            head = reader.recv(12)
            assert head.startswith(b"HTTP/1.1 200"), (request[:60], head)   # the stream began; then nothing is read
        time.sleep(1)   # the broker's writes fill the socket and wait
        sent = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        try:
            code = broker.proc.wait(4 * grace)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the broker did not exit within {4 * grace} s of SIGTERM") from None
        exited = time.monotonic() - sent
        print(f"\nSIGTERM with two stalled HTTP streams: exit {code} after {exited:.2f} s (grace {grace} s)")
        assert code == 0
        assert exited < grace, f"the broker took {exited:.1f} s to exit, past its grace of {grace} s"
    finally:
        for reader in readers:
            reader.close()
        chan.close()


def test_sigterm_ends_open_subscriptions_with_unavailable_and_exits_promptly(
        start_broker: Callable[..., BrokerProcess], stream_name: str) -> None:
    broker = start_broker(*UNTHROTTLED)
    assert broker.proc is not None
    chan = channel(broker.grpc_target)
    stalled_chan = channel(broker.grpc_target)
    stub = sluice_pb2_grpc.SluiceStub(chan)
    try:
        stub.CreateStream(pb.CreateStreamRequest(stream_name=stream_name, partition_count=4), timeout=TIMEOUT)
        # partition 3 holds ~40 MB: a subscriber that reads one message of it and stops is stalled
        filler = os.urandom(RECORD - 8)
        for i in range(10):
            put(stub, stream_name, 3, payloads(i * PER_PUT, filler))
        stalled = sluice_pb2_grpc.SluiceStub(stalled_chan).Subscribe(pb.SubscribeRequest(
            stream_name=stream_name, partition_id=3, cursor_type=pb.CURSOR_TYPE_TRIM_HORIZON))
        assert next(stalled).records.seqs

        ended: dict[str, tuple[object, float]] = {}
        calls = {f"idle-{p}": stub.Subscribe(pb.SubscribeRequest(stream_name=stream_name, partition_id=p,
                                                                cursor_type=pb.CURSOR_TYPE_LATEST)) for p in range(2)}
        # The lingering subscription starts from a cursor taken before its record is written. With
        # cursor_type=LATEST in the SubscribeRequest the broker looks the tail up when it handles the
        # call - on a worker thread, while the put below commits on the writer thread - so on a busy
        # machine the tail could already be past the record, and the subscription got nothing.
        lingering_cursor = stub.GetCursor(pb.GetCursorRequest(stream_name=stream_name, partition_id=2,
                                                              cursor_type=pb.CURSOR_TYPE_LATEST), timeout=TIMEOUT)
        calls["lingering"] = stub.Subscribe(pb.SubscribeRequest(cursor=lingering_cursor.cursor, max_wait_ms=20_000))
        # The long poll, too, is sent from here, before the put: a call the broker has taken before
        # the put's answer came back cannot arrive after SIGTERM (and be refused as a new call).
        poll_cursor = stub.GetCursor(pb.GetCursorRequest(stream_name=stream_name, partition_id=0,
                                                         cursor_type=pb.CURSOR_TYPE_LATEST), timeout=TIMEOUT).cursor
        long_poll = stub.GetRecords.future(pb.GetRecordsRequest(cursor=poll_cursor, wait_ms=20_000), timeout=60)

        received: dict[str, int] = {}

        def follow(name: str, it: grpc.Call) -> None:
            try:
                for message in it:
                    received[name] = received.get(name, 0) + len(message.records.seqs)
                ended[name] = ("OK", time.monotonic())
            except grpc.RpcError as exc:
                ended[name] = (exc.code(), time.monotonic())

        long_poll_ended = threading.Event()

        def long_poll_done(call: grpc.Future) -> None:
            try:
                ended["long-poll"] = (f"OK {len(call.result().seqs)} records", time.monotonic())
            except grpc.RpcError as exc:
                ended["long-poll"] = (exc.code(), time.monotonic())
            long_poll_ended.set()

        long_poll.add_done_callback(long_poll_done)
        threads = [threading.Thread(target=follow, args=item, daemon=True) for item in calls.items()]
        for t in threads:
            t.start()
        # the lingering subscription gets a record and waits for more (max_wait_ms 20 s); what it
        # holds goes out at SIGTERM whether or not it had fetched the record by then
        put(stub, stream_name, 2, [b"lingering"])
        time.sleep(0.5)                        # usually long enough for it to be lingering: not relied on
        assert not ended, ended

        sent = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        try:
            code = broker.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the broker did not exit within 15 s of SIGTERM; "
                                 f"open calls: {sorted(ended)}") from None
        exited = time.monotonic() - sent
        for t in threads:
            t.join(5)
        long_poll_ended.wait(5)
        stalled_code = None
        try:
            for _ in stalled:
                pass
        except grpc.RpcError as exc:
            stalled_code = exc.code()
        print(f"\nSIGTERM: exit {code} after {exited:.2f} s; " +
              ", ".join(f"{n}: {c} after {t - sent:.2f} s" for n, (c, t) in sorted(ended.items())))
        assert code == 0
        assert exited < 5.0, f"the broker took {exited:.1f} s to exit"
        assert set(ended) == {"idle-0", "idle-1", "lingering", "long-poll"}
        for name in ("idle-0", "idle-1", "lingering"):
            status, when = ended[name]
            assert status == grpc.StatusCode.UNAVAILABLE, (name, status)
            assert when - sent < 2.0, (name, when - sent)
        assert received == {"lingering": 1}     # the batch it was collecting went out before the end
        assert ended["long-poll"][0] == "OK 0 records" and ended["long-poll"][1] - sent < 2.0
        assert stalled_code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), stalled_code
    finally:
        chan.close()
        stalled_chan.close()


_GONE_CONSUMERS = """
import sys, time, urllib.request
from client import Client
target, http, kind = sys.argv[1:4]
if kind == "grpc":
    next(iter(Client(target).subscription("gone", 0, "TRIM_HORIZON")))
else:
    urllib.request.urlopen(f"{http}/sluice/v1/tail?stream-name=gone&partition-id=0&cursor-type=TRIM_HORIZON").read(1000)
print("READY", flush=True)
time.sleep(3600)   # reads no more: the broker's writes wait on flow control
"""


def _metrics(broker: BrokerProcess) -> str:
    return urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=TIMEOUT).read().decode()  # type: ignore[no-any-return]


def test_a_push_consumer_that_dies_mid_stream_is_no_broker_error(start_broker: Callable[..., BrokerProcess]) -> None:
    """A Subscribe and a tail whose consumer stops reading and is then killed: the broker's blocked
    write fails. It was logged as an unhandled error with a traceback and counted INTERNAL (the
    scaling and gRPC probes): a consumer going away is not the broker's error."""
    broker = start_broker(*UNTHROTTLED)
    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream("gone", 1)
        for _ in range(10):   # 20 MB: more than the sockets' buffers hold
            c.put_records("gone", [b"x" * 20_000] * 100, partition_id=0)
    for kind in ("grpc", "tail"):
        consumer = subprocess.Popen([sys.executable, "-c", _GONE_CONSUMERS, broker.grpc_target, broker.http_url, kind],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert consumer.stdout is not None and consumer.stdout.readline().strip() == "READY"
            time.sleep(1)   # the broker's next write blocks on the unread connection
        finally:
            consumer.kill()
            consumer.communicate()
    eventually(lambda: "sluice_subscriptions_open 0.0" in _metrics(broker), timeout=TIMEOUT)   # both ended
    assert 'reason="INTERNAL"' not in _metrics(broker)
    assert not [line for line in broker.stderr_lines if "unhandled error" in line or "Traceback" in line]
