"""A full disk: writes are refused with STORAGE_FULL, nothing acknowledged is lost, nothing refused
is ever read, and once space returns the store takes writes again - without a restart - with
sequence numbers that run on without a gap (broker/storage/rocks_engine.py tells how).

The disk is a real tmpfs of 64 MiB the test mounts in its tmp dir (root only: skipped with the
reason otherwise) and always unmounts; a filler file takes the space and gives it back. RocksDB's
own resume needs a whole memtable free, so the tests choose memtables and freed space to reach
each path: the store's reopen (less freed than a memtable), RocksDB resuming by itself (the
reopen ruled out), and a real broker process with its health and log lines.
"""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.errors import BrokerError, ErrorCode
from broker.launcher import BrokerProcess
from broker.model import AppendBatch, StreamConfig
from broker.storage import keys, rocks_engine
from broker.storage.base import StorageState
from broker.storage.memory import MemoryStore
from broker.storage.rocks import RocksStore
from client import Client
from client.errors import SluiceError

MIB = 1 << 20
SERVICE = "sluice.v1.Sluice"
DEADLINE_S = 60.0   # recovery: RocksDB's own resume polls every 5 s, the store's every second


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted on a fresh directory; unmounted after the test, whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip() or out.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)   # busy: detach


def fill_up(disk: Path) -> Path:
    """Take every free byte of `disk` with a filler file; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (MIB, 4096):
            try:
                while f.write(b"\0" * chunk) == chunk:
                    pass
            except OSError:
                pass
    return filler


def give_back(filler: Path, nbytes: int) -> None:
    os.truncate(filler, max(filler.stat().st_size - nbytes, 0))


async def writable(store: RocksStore, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while store.storage_state is not StorageState.OK:
        assert time.monotonic() < deadline, f"the store did not recover within {timeout}s"
        await asyncio.sleep(0.1)


def test_a_memory_store_never_refuses_writes() -> None:
    assert MemoryStore().storage_state is StorageState.OK


# -- the store on its own ------------------------------------------------------------------------


class Ledger:
    """What a producer was told: acknowledged payloads by (partition, seq), and refused ones."""

    def __init__(self) -> None:
        self.acked: dict[tuple[int, int], bytes] = {}
        self.refused: set[bytes] = set()
        self._n = 0

    def payloads(self, count: int, size: int = 1000) -> list[bytes]:
        out = []
        for _ in range(count):
            out.append(f"{self._n:09d}".encode() + os.urandom(size - 9))   # incompressible: it fills the disk
            self._n += 1
        return out

    async def append(self, store: RocksStore, sid: int, partitions: int, per_batch: int = 20) -> bool:
        """One append of a batch per partition; True when acknowledged, False when refused."""
        batches = {p: self.payloads(per_batch) for p in range(partitions)}
        try:
            firsts = await store.append([AppendBatch(sid, p, 1000, [(None, d) for d in data])
                                         for p, data in batches.items()])
        except BrokerError as exc:
            assert exc.code is ErrorCode.STORAGE_FULL, exc
            self.refused.update(d for data in batches.values() for d in data)
            return False
        for (p, data), first in zip(batches.items(), firsts):
            assert isinstance(first, int)
            self.acked.update(((p, first + i), d) for i, d in enumerate(data))
        return True

    async def check(self, store: RocksStore, sid: int, partitions: int) -> None:
        """Every acknowledged record readable at its seq, seqs from 0 without a gap, nothing more."""
        for p in range(partitions):
            mine = sorted(seq for part, seq in self.acked if part == p)
            assert mine == list(range(len(mine))), f"partition {p}: acknowledged seqs have a gap"
            bounds = await store.bounds(sid, p)
            assert bounds.next_seq == len(mine)
            records = await store.read(sid, p, 0, 1 << 30, 1 << 40)
            assert [r.seq for r in records] == mine
            assert [r.data for r in records] == [self.acked[(p, s)] for s in mine]
            assert not {r.data for r in records} & self.refused


async def fill_until_refused(store: RocksStore, ledger: Ledger, sid: int, partitions: int) -> None:
    for _ in range(10_000):
        if not await ledger.append(store, sid, partitions):
            break
    else:
        raise AssertionError("the disk never filled")
    assert store.storage_state is StorageState.FULL
    for _ in range(3):   # refused again, at once: RocksDB is in its background-error state
        assert not await ledger.append(store, sid, partitions)


@pytest.fixture
async def open_store(small_disk: Path) -> AsyncIterator[Callable[..., RocksStore]]:
    opened: list[RocksStore] = []

    def open_(**options: int) -> RocksStore:
        opened.append(RocksStore(str(small_disk / "db"), **options))
        return opened[-1]

    yield open_
    for s in opened:
        await s.close()


async def test_a_store_refused_for_a_full_disk_reopens_once_space_returns(
        small_disk: Path, open_store: Callable[..., RocksStore], caplog: pytest.LogCaptureFixture) -> None:
    """Less is freed than a memtable (16 MiB), so RocksDB would stay refused for good: the store
    reopens the database, and goes on numbering where the acknowledged records end. Until there is
    room for that, it says how much it needs."""
    store = open_store(memtable_mb=16)
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    ledger = Ledger()
    for _ in range(50):                       # ~2 MiB before the disk fills
        assert await ledger.append(store, sid, 2)
    filler = fill_up(small_disk)
    await fill_until_refused(store, ledger, sid, 2)
    await ledger.check(store, sid, 2)         # reads go on while writes are refused
    with caplog.at_level("WARNING", logger="broker.storage.rocks"):
        await asyncio.sleep(1.5)              # the store probes meanwhile: still no room
    assert store.storage_state is StorageState.FULL
    told = [r.getMessage() for r in caplog.records if "reopening the store needs" in r.getMessage()]
    assert len(told) == 1, caplog.text        # once a minute, not once a probe
    free, needed = (float(told[0].split(" MiB")[i].split()[-1]) for i in (0, 1))
    assert free < 1 < needed, told[0]

    give_back(filler, 6 * MIB)
    await writable(store)
    assert store.reopens == 1
    for _ in range(5):
        assert await ledger.append(store, sid, 2)
    await ledger.check(store, sid, 2)

    await store.close()
    again = open_store(memtable_mb=16)
    await ledger.check(again, sid, 2)


async def test_rocksdb_resuming_by_itself_is_noticed(
        small_disk: Path, open_store: Callable[..., RocksStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the reopen ruled out (it would never have room), the probe write sees RocksDB resume
    by itself once a whole memtable is free."""
    monkeypatch.setattr(rocks_engine, "REOPEN_RESERVE_BYTES", 1 << 50)
    store = open_store(memtable_mb=1)
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    ledger = Ledger()
    assert await ledger.append(store, sid, 1)
    filler = fill_up(small_disk)
    await fill_until_refused(store, ledger, sid, 1)
    filler.unlink()
    await writable(store)
    assert store.reopens == 0
    assert await ledger.append(store, sid, 1)
    await ledger.check(store, sid, 1)


async def test_a_refused_batch_found_on_disk_after_a_reopen_is_taken_back(tmp_path: Path) -> None:
    """A WAL record written whole whose fsync then failed would replay on reopen: the reopen finds
    the partition's durable mark past the acknowledged one and removes what lies beyond it."""
    store = RocksStore(str(tmp_path / "db"))
    try:
        sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
        assert await store.append([AppendBatch(sid, 0, 1000, [(None, b"a"), (None, b"b")])]) == [0]
        engine = store._engine
        # what the refused append would have left: its batch and the mark after it, unacknowledged
        ghost = rocks_engine.rocksdict.WriteBatch(raw_mode=True)
        ghost.put(keys.record_key(sid, 0, 2), keys.encode_batch(2000, [(None, b"ghost"), (None, b"ghost")]))
        ghost.put(keys.partition_key(keys.HWM, sid, 0), keys.encode_hwm(4, 2000))
        engine._db.write(ghost)
        with engine._lock:
            engine._reopen()
        assert (await store.bounds(sid, 0)).next_seq == 2
        assert [r.data for r in await store.read(sid, 0, 0, 100, 1 << 20)] == [b"a", b"b"]
        assert await store.append([AppendBatch(sid, 0, 3000, [(None, b"c")])]) == [2]
    finally:
        await store.close()
    store = RocksStore(str(tmp_path / "db"))
    try:
        assert [r.data for r in await store.read(sid, 0, 0, 100, 1 << 20)] == [b"a", b"b", b"c"]
        assert (await store.bounds(sid, 0)).next_seq == 3
    finally:
        await store.close()


# -- a broker process ------------------------------------------------------------------------------


def health_of(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status)


def wait_for(check: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        time.sleep(0.1)


class Producer:
    """Puts records through the gRPC door and keeps what each was told."""

    def __init__(self, client: Client, stream: str, partitions: int) -> None:
        self.client, self.stream, self.partitions = client, stream, partitions
        self.ledger = Ledger()
        self.reasons: set[str] = set()

    def put(self, per_partition: int = 25) -> bool:
        """One request of `per_partition` records for each partition; True when all were acknowledged."""
        sent = [(d, None, p) for p in range(self.partitions) for d in self.ledger.payloads(per_partition)]
        try:
            results = self.client.put_routed(self.stream, sent)
        except SluiceError as exc:   # every record refused: the request fails as a whole
            self.reasons.add(exc.reason)
            self.ledger.refused.update(d for d, _, _ in sent)
            return False
        for (data, _, _), r in zip(sent, results):
            if r.ok:
                self.ledger.acked[(r.partition_id, r.seq)] = data
            else:
                self.reasons.add(r.reason)
                self.ledger.refused.add(data)
        return all(r.ok for r in results)

    def check(self, client: Client) -> None:
        """Every acknowledged record readable at its seq, seqs from 0 without a gap, nothing more."""
        for p in range(self.partitions):
            mine = sorted(seq for part, seq in self.ledger.acked if part == p)
            assert mine == list(range(len(mine))), f"partition {p}: acknowledged seqs have a gap"
            got = []
            cursor = client.get_cursor(self.stream, p, "TRIM_HORIZON")
            while True:
                page = client.get_records(cursor, limit=1000)
                if not page.records:
                    break
                got += page.records
                cursor = page.next_cursor
            assert [r.seq for r in got] == mine
            assert [r.data for r in got] == [self.ledger.acked[(p, s)] for s in mine]
            assert not {r.data for r in got} & self.ledger.refused


def dis_put(broker: BrokerProcess, stream: str, payloads: list[bytes]) -> dict[str, Any]:
    body = {"stream_name": stream, "records": [{"data": base64.b64encode(d).decode(), "partition_id": "0"}
                                               for d in payloads]}
    answer = requests.post(f"{broker.http_url}/v2/default/records", json=body, timeout=30)
    return {"status": answer.status_code, **answer.json()}


def test_a_broker_on_a_full_disk_recovers_without_a_restart(small_disk: Path) -> None:
    data_dir = small_disk / "data"
    broker = BrokerProcess(data_dir, "--memtable-mb", "16").start()
    try:
        client = Client(broker.grpc_target, timeout=30)
        client.create_stream("full", 2)
        producer = Producer(client, "full", 2)
        for _ in range(20):                    # ~1 MiB before the disk fills
            assert producer.put()
        assert health_of(broker.grpc_target) == health_pb2.HealthCheckResponse.SERVING
        filler = fill_up(small_disk)
        give_back(filler, 2 * MIB)             # the records fill the rest
        for _ in range(1000):
            if not producer.put():
                break
        else:
            raise AssertionError("the disk never filled")
        assert producer.reasons == {"STORAGE_FULL"}
        assert not producer.put() and producer.reasons == {"STORAGE_FULL"}
        wait_for(lambda: health_of(broker.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING)
        # the DIS door too: every record of the request refused, so the request fails as a whole
        refused = dis_put(broker, "full", [b"dis-1", b"dis-2"])
        assert (refused["status"], refused["error_code"], refused["reason"]) == (507, "DIS.5250", "STORAGE_FULL")
        producer.ledger.refused.update((b"dis-1", b"dis-2"))
        producer.check(client)                 # reads go on while writes are refused

        give_back(filler, 8 * MIB)             # less than a memtable: RocksDB alone would stay refused
        wait_for(lambda: producer.put(1))      # a producer retrying gets in, with no restart
        wait_for(lambda: health_of(broker.grpc_target) == health_pb2.HealthCheckResponse.SERVING)
        for _ in range(10):
            assert producer.put()
        producer.check(client)
        log = "".join(broker.stderr_lines)
        assert "WARNING" in log and "storage full: writes are refused with STORAGE_FULL" in log, log
        assert "INFO" in log and "storage writable again" in log, log
        client.close()
    finally:
        broker.kill()   # the crash path: what was acknowledged must be in the WAL

    broker = BrokerProcess(data_dir).start()
    try:
        with Client(broker.grpc_target, timeout=30) as client:
            producer.client = client
            producer.check(client)
            assert producer.put()
            producer.check(client)
    finally:
        broker.stop()
