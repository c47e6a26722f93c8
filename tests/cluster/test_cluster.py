"""Issue 13's "done when" on a real 3-node JetStream cluster (R=3) with two brokers: records written
through broker a read through broker b in order; 4 producers while a nats-server node is SIGKILLed
(every acknowledged record readable, no seq gap or reuse, the producers go on); a broker SIGKILLed
under load (clients fail over to the other, nothing acknowledged lost); the whole cluster killed and
restarted, the brokers on EMPTY data dirs (everything is there, old cursors work).

The tests run in file order on one cluster and build on each other: each reads back and remembers
what its streams hold (`LOGS`), and the last one checks all of it after the restart.

Failover is gRPC's own: the clients' target names both brokers (`ipv4:a,b`, SluiceCluster's
failover_target) and pick_first moves to the next address when the connected one goes away; a call
in flight then fails (UNAVAILABLE) and the producer here retries it, as client.Producer does.

What a producer's outcome allows (the store's promise, issue 13 point 2): a record acknowledged is
stored once at the seq it was given; a record refused per record (a reason in a 200 answer) is not
stored; a record whose whole request failed (the call broke, or a retriable request-level error)
has an unknown outcome: stored at most once. Every attempt sends fresh payloads, so each is
accounted for exactly."""
from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from broker.cluster import ClusterBroker, SluiceCluster, nats_server_exe
from client import Client
from client.errors import SluiceError

PROJECT = "clu"
PARTITIONS = 4
BATCH = 10
LOGS: dict[str, dict[int, list[tuple[int, bytes]]]] = {}   # stream -> partition -> [(seq, data)] as verified


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceCluster]:
    """Both brokers running, then the module's streams created through broker a (b learns of them
    from the catalogue events)."""
    try:
        nats_server_exe()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    made = SluiceCluster(tmp_path_factory.mktemp("cluster"), prefix="cf").start()
    with Client(made.brokers[0].grpc_target, project=PROJECT) as c:
        for name in ("ab", "nodekill", "failover"):
            c.create_stream(name, PARTITIONS)
    yield made
    made.stop()


def read_log(client: Client, stream: str) -> dict[int, list[tuple[int, bytes]]]:
    out: dict[int, list[tuple[int, bytes]]] = {}
    for p in range(PARTITIONS):
        cursor = client.get_cursor(stream, p, "TRIM_HORIZON")
        got: list[tuple[int, bytes]] = []
        while True:
            page = client.get_records(cursor, limit=500)
            got += [(r.seq, r.data) for r in page.records]
            if not page.records:
                break
            cursor = page.next_cursor
        out[p] = got
    return out


_readers = itertools.count(1)


@contextmanager
def fresh_reader(cluster: SluiceCluster) -> Iterator[Client]:
    """A client of a broker started now on an empty data dir: the checks read what JetStream holds
    through a broker that took part in nothing (stateless), beside what a and b answer."""
    broker: ClusterBroker = cluster.start_broker(cluster.new_broker(f"reader{next(_readers)}"))
    try:
        with Client(broker.grpc_target, project=PROJECT) as c:
            yield c
    finally:
        broker.stop(20)


def check_gap_free(log: dict[int, list[tuple[int, bytes]]]) -> None:
    for p, records in log.items():
        assert [seq for seq, _ in records] == list(range(len(records))), f"partition {p}: a gap or a reused seq"
        datas = [d for _, d in records]
        assert len(set(datas)) == len(datas), f"partition {p}: a record stored twice"


# -- records through a, read through b --------------------------------------------------------------

def test_records_written_through_a_are_read_through_b_in_order(cluster: SluiceCluster) -> None:
    a, b = cluster.brokers
    sent: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PARTITIONS)}
    with Client(a.grpc_target, project=PROJECT) as ca:
        for round_ in range(20):
            datas = [b"ab-%d-%d" % (round_, i) for i in range(25)]
            for d, r in zip(datas, ca.put_records("ab", [(d, f"key{i % 7}") for i, d in enumerate(datas)])):
                assert r.ok, r
                sent[r.partition_id].append((r.seq, d))
    with Client(b.grpc_target, project=PROJECT) as cb:
        got = read_log(cb, "ab")
    assert got == {p: sorted(v) for p, v in sent.items()}
    check_gap_free(got)
    assert sum(len(v) for v in got.values()) == 500
    LOGS["ab"] = got


def test_a_stream_created_through_a_is_served_by_b_at_once(cluster: SluiceCluster) -> None:
    a, b = cluster.brokers
    with Client(a.grpc_target, project=PROJECT) as ca, Client(b.grpc_target, project=PROJECT) as cb:
        ca.create_stream("live", 1)
        (put,) = ca.put_records("live", [b"one"], partition_id=0)
        assert put.ok
        assert [r.data for r in cb.get_records(cb.get_cursor("live", 0)).records] == [b"one"]


def test_appends_through_a_after_b_read_are_seen_by_b(cluster: SluiceCluster) -> None:
    a, b = cluster.brokers
    with Client(a.grpc_target, project=PROJECT) as ca, Client(b.grpc_target, project=PROJECT) as cb:
        before = len(read_log(cb, "ab")[0])
        (put,) = ca.put_records("ab", [b"later"], partition_id=0)
        assert put.ok and put.seq == before
        got = read_log(cb, "ab")[0]
        LOGS["ab"] = read_log(ca, "ab")
        assert got[-1] == (before, b"later")


# -- load while something dies ----------------------------------------------------------------------

@dataclass
class Load:
    """Producers putting batches of BATCH fresh records; what each attempt came to."""

    stream: str
    targets: list[str]
    acked: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    refused: set[bytes] = field(default_factory=set)
    unknown: set[bytes] = field(default_factory=set)
    oks: list[list[float]] = field(default_factory=list)      # per producer: when each batch was acknowledged
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i, target in enumerate(self.targets):
            self.oks.append([])
            t = threading.Thread(target=self._produce, args=(i, target), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _produce(self, i: int, target: str) -> None:
        with Client(target, project=PROJECT, timeout=15) as c:
            n = 0
            while not self.stop.is_set():
                datas = [b"p%d-%d-%d" % (i, n, k) for k in range(BATCH)]
                n += 1
                try:
                    results = c.put_records(self.stream, [(d, f"k{i}-{k % 5}") for k, d in enumerate(datas)])
                except SluiceError as exc:
                    with self.lock:
                        self.unknown.update(datas)
                        self.errors.append(f"{exc.reason}")
                    time.sleep(0.05)
                    continue
                with self.lock:
                    for d, r in zip(datas, results):
                        if r.ok:
                            self.acked[d] = (r.partition_id, r.seq)
                        else:
                            self.refused.add(d)
                            self.errors.append(r.reason)
                    if all(r.ok for r in results):
                        self.oks[i].append(time.monotonic())
                    else:
                        time.sleep(0.05)

    def wait_for(self, batches_each: int, since: float, timeout: float = 90.0) -> None:
        """Until every producer had `batches_each` batches acknowledged after `since`."""
        deadline = time.monotonic() + timeout
        while not all(sum(t > since for t in oks) >= batches_each for oks in self.oks):
            assert time.monotonic() < deadline, f"producers stuck: {[sum(t > since for t in o) for o in self.oks]} " \
                                                f"batches since; errors {self.errors[-5:]}"
            assert all(t.is_alive() for t in self.threads), "a producer thread died"
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
            assert not t.is_alive()

    def longest_pause(self, since: float) -> float:
        """The longest time any producer went without an acknowledged batch, from `since` on."""
        worst = 0.0
        for oks in self.oks:
            times = [since] + [t for t in oks if t > since]
            worst = max(worst, max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else 0.0)
        return worst

    def verify(self, log: dict[int, list[tuple[int, bytes]]]) -> None:
        check_gap_free(log)
        stored = {d: (p, seq) for p, records in log.items() for seq, d in records}
        for d, (p, seq) in self.acked.items():
            assert stored.get(d) == (p, seq), (
                f"acknowledged {d!r} at {(p, seq)}, stored at {stored.get(d)}; partition {p} reads "
                f"{len(log[p])} records, at {seq}: {log[p][seq] if seq < len(log[p]) else None}")
        assert not self.refused & stored.keys(), "a record refused per record was stored"
        extra = stored.keys() - self.acked.keys()
        assert extra <= self.unknown, f"stored records nobody sent: {sorted(extra)[:5]}"
        print(f"\n{self.stream}: {len(self.acked)} acknowledged, {len(self.refused)} refused per record, "
              f"{len(self.unknown)} in failed requests of which {len(extra)} stored; "
              f"errors seen: {sorted(set(self.errors))}")


def test_a_nats_node_sigkilled_under_four_producers(cluster: SluiceCluster) -> None:
    a, b = cluster.brokers
    load = Load("nodekill", [a.grpc_target, b.grpc_target, a.grpc_target, b.grpc_target]).start()
    try:
        load.wait_for(20, since=0)
        leader = cluster.nats.wait_for_leader()
        victim = next(n for n in cluster.nats.nodes if n.name == leader)   # the meta leader: the worst one
        killed_at = time.monotonic()
        victim.kill()
        load.wait_for(30, since=killed_at)
        pause = load.longest_pause(killed_at)
    finally:
        load.finish()
    print(f"\nSIGKILLed nats {victim.name} (meta leader): the longest producer pause after it was {pause:.2f}s")
    with fresh_reader(cluster) as c:
        log = read_log(c, "nodekill")
    load.verify(log)
    LOGS["nodekill"] = log
    cluster.nats.start()   # the node back (its store kept): the next tests have three again


def test_a_broker_sigkilled_clients_fail_over_to_the_other(cluster: SluiceCluster) -> None:
    a, _ = cluster.brokers
    load = Load("failover", [cluster.failover_target] * 4).start()   # pick_first: all on broker a first
    try:
        load.wait_for(20, since=0)
        killed_at = time.monotonic()
        a.kill()
        load.wait_for(30, since=killed_at)
        pause = load.longest_pause(killed_at)
    finally:
        load.finish()
    print(f"\nSIGKILLed broker a: the longest producer pause after it was {pause:.2f}s")
    with fresh_reader(cluster) as c:
        log = read_log(c, "failover")
    load.verify(log)
    LOGS["failover"] = log
    cluster.start_broker(a)   # back on its ports, on the same data dir (it needs nothing from it)
    with Client(a.grpc_target, project=PROJECT) as ca:
        assert read_log(ca, "failover") == log


def test_the_whole_cluster_killed_and_restarted_keeps_everything(cluster: SluiceCluster) -> None:
    assert set(LOGS) >= {"ab", "nodekill", "failover"}, "runs after the tests above"
    a, b = cluster.brokers
    with Client(a.grpc_target, project=PROJECT) as ca:
        ca.create_app("reader")
        ca.commit_checkpoint("reader", "ab", 1, 7)
        old_cursor = ca.get_cursor("ab", 2, "AT_SEQUENCE_NUMBER", starting_seq=3)
    for broker in cluster.brokers:
        broker.kill()
    for node in cluster.nats.nodes:
        node.kill()
    cluster.nats.start()
    for broker in cluster.brokers:   # on EMPTY data dirs: a broker keeps nothing others need
        broker.data_dir = broker.data_dir.with_name(broker.data_dir.name + "-after-restart")
        cluster.start_broker(broker)
    for broker in (b, a):
        with Client(broker.grpc_target, project=PROJECT) as c:
            assert set(c.list_streams().stream_names) >= {"ab", "failover", "nodekill"}
            for stream, log in LOGS.items():
                assert read_log(c, stream) == log, f"{stream} through broker {broker.name}"
            assert c.get_checkpoint("reader", "ab", 1).seq == 7
            assert [r.seq for r in c.get_records(old_cursor, limit=2).records] == [3, 4]
    with Client(cluster.failover_target, project=PROJECT) as c:   # and numbering goes on where it stopped
        (put,) = c.put_records("nodekill", [b"after the restart"], partition_id=0)
        assert put.ok and put.seq == len(LOGS["nodekill"][0])
