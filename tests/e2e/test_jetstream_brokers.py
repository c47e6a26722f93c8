"""Two broker processes on one single-node nats-server (`--store jetstream --replicas 1`, distinct
data dirs, one --nats-prefix): a write through A wakes B's subscriptions and long polls without
polling, B's LATEST cursor includes A's writes at once, and streams created, scaled and deleted
through A are B's streams too (a delete ends B's subscription as a local one would).

No polling, shown by behaviour: B's head cache of a partition moves only when told (A's core-NATS
notification) or when a cursor is taken; a reader on B that was not woken by the notification
would re-read that stale cache and find nothing. B's /metrics counts the wakes
(sluice_remote_appends_total)."""
from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from broker.launcher import BrokerProcess
from client import Client
from client.errors import SluiceError
from client.model import RecordsPage
from tests.conftest import eventually, rest
from tests.sources.conftest import NatsServer
from tests.storage.conftest import nats_config

WAIT_S = 10.0   # below the 15 s subscription heartbeat: a record that arrives came from a wake


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, BrokerProcess]]:
    base = tmp_path_factory.mktemp("two-brokers")
    nats = NatsServer(base / "nats-store", extra=("-c", str(nats_config(base)))).start()
    args = ("--store", "jetstream", "--nats-servers", nats.url, "--replicas", "1", "--nats-prefix", "pair")
    a = BrokerProcess(base / "a", *args).start()
    b = BrokerProcess(base / "b", *args).start()
    yield a, b
    for proc in (a, b):
        proc.stop(15)
    nats.stop()


_names = iter(range(10**6))


@pytest.fixture
def name() -> str:
    return f"x{next(_names)}"


def metric(proc: BrokerProcess, family: str) -> float:
    with urllib.request.urlopen(proc.http_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{family} (\S+)$", text, re.M)
    assert found, f"{family} not in /metrics"
    return float(found.group(1))


def pages_in_thread(sub: Iterator[RecordsPage]) -> queue.Queue[RecordsPage | SluiceError]:
    """Every page (or the error) a subscription yields, from a thread."""
    out: queue.Queue[RecordsPage | SluiceError] = queue.Queue()

    def run() -> None:
        try:
            for page in sub:
                out.put(page)
        except SluiceError as exc:
            out.put(exc)
    threading.Thread(target=run, daemon=True).start()
    return out


def next_records(pages: queue.Queue[RecordsPage | SluiceError]) -> list[bytes]:
    """The next non-empty page's records (heartbeats skipped)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        page = pages.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(page, BaseException):
            raise page
        if page.records:
            return [r.data for r in page.records]


def test_a_subscription_on_b_is_woken_by_a_put_through_a(pair: tuple[BrokerProcess, BrokerProcess],
                                                         name: str) -> None:
    a, b = pair
    with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
        ca.create_stream(name, 2)
        woken_before = metric(b, "sluice_remote_appends_total")
        sub = cb.subscription(cursor=cb.get_cursor(name, 1, "LATEST"))   # from here on, whenever it starts
        pages = pages_in_thread(sub)
        try:
            for round_ in range(3):
                ca.put_records(name, [b"r%d-%d" % (round_, i) for i in range(3)], partition_id=1)
                got: list[bytes] = []
                while len(got) < 3:
                    got += next_records(pages)
                assert got == [b"r%d-%d" % (round_, i) for i in range(3)]
        finally:
            sub.cancel()
        assert metric(b, "sluice_remote_appends_total") >= woken_before + 3


def test_a_long_poll_on_b_returns_what_a_put_through_a_wrote(pair: tuple[BrokerProcess, BrokerProcess],
                                                             name: str) -> None:
    a, b = pair
    with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
        ca.create_stream(name, 1)
        cursor = cb.get_cursor(name, 0, "LATEST")
        answer: queue.Queue[RecordsPage] = queue.Queue()
        threading.Thread(target=lambda: answer.put(cb.get_records(cursor, wait_ms=20_000)), daemon=True).start()
        time.sleep(0.3)   # let the long poll start waiting (if it has not, it reads the record at once: same result)
        (put,) = ca.put_records(name, [b"late"], partition_id=0)
        page = answer.get(timeout=WAIT_S)
        assert [(r.seq, r.data) for r in page.records] == [(put.seq, b"late")]


def test_latest_and_sequence_cursors_on_b_right_after_writes_on_a(pair: tuple[BrokerProcess, BrokerProcess],
                                                                  name: str) -> None:
    a, b = pair
    with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
        ca.create_stream(name, 1)
        cb.get_records(cb.get_cursor(name, 0, "TRIM_HORIZON"))   # B has read the partition: its head is cached
        for i in range(5):
            results = ca.put_records(name, [b"w%d" % i], partition_id=0)
        last = results[0].seq
        # at once, no notification awaited: LATEST is after A's last write, A's seqs are in range on B
        latest = cb.get_cursor(name, 0, "LATEST")
        at = cb.get_cursor(name, 0, "AT_SEQUENCE_NUMBER", starting_seq=last)
        (after,) = ca.put_records(name, [b"after"], partition_id=0)
        assert [r.data for r in cb.get_records(latest, wait_ms=5000).records] == [b"after"]
        assert [r.seq for r in cb.get_records(at, wait_ms=5000).records] == [last, after.seq]


def test_a_stream_created_through_a_is_described_by_b_at_once(pair: tuple[BrokerProcess, BrokerProcess],
                                                              name: str) -> None:
    a, b = pair
    with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
        ca.create_stream(name, 3)
        assert cb.describe_stream(name).stream.partition_count == 3     # a lookup miss asks the store
        (put,) = cb.put_records(name, [b"via b"], partition_id=2)
        assert [r.data for r in ca.get_records(ca.get_cursor(name, 2, "TRIM_HORIZON")).records] == [b"via b"]
        assert put.seq == 0
        other = name + "-listed"
        ca.create_stream(other, 1)
        eventually(lambda: other in cb.list_streams(limit=100).stream_names)   # from A's event


def test_a_delete_through_a_ends_subscriptions_on_b(pair: tuple[BrokerProcess, BrokerProcess], name: str) -> None:
    a, b = pair
    with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
        ca.create_stream(name, 1)
        sub = cb.subscription(cursor=cb.get_cursor(name, 0, "LATEST"))
        pages = pages_in_thread(sub)
        ca.put_records(name, [b"one"], partition_id=0)
        assert next_records(pages) == [b"one"]
        ca.delete_stream(name)
        with pytest.raises(SluiceError) as err:
            next_records(pages)
        assert err.value.reason == "STREAM_NOT_FOUND"
        eventually(lambda: name not in cb.list_streams(limit=100).stream_names)
        with pytest.raises(SluiceError) as err:
            cb.describe_stream(name)
        assert err.value.reason == "STREAM_NOT_FOUND"


def test_a_scale_through_a_is_seen_by_b(pair: tuple[BrokerProcess, BrokerProcess], name: str) -> None:
    a, b = pair
    with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
        ca.create_stream(name, 1)
        assert cb.describe_stream(name).stream.partition_count == 1
        ca.update_partition_count(name, 3)
        eventually(lambda: cb.describe_stream(name).stream.partition_count == 3)
        (put,) = cb.put_records(name, [b"p2"], partition_id=2)
        assert not put.reason, put
        # B routes keyed records by the new layout: every partition gets some
        results = cb.put_records(name, [(b"k", f"key-{i}") for i in range(60)])
        assert {r.partition_id for r in results} == {0, 1, 2}
        ca.update_partition_count(name, 1)
        eventually(lambda: cb.describe_stream(name).stream.partition_count == 1)
        assert {r.partition_id for r in cb.put_records(name, [(b"k", f"key-{i}") for i in range(20)])} == {0}


def post(proc: BrokerProcess, path: str, body: object) -> int:
    request = urllib.request.Request(proc.http_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_typed_rows_ingested_through_b_into_a_stream_just_created_through_a(
        pair: tuple[BrokerProcess, BrokerProcess], name: str) -> None:
    a, b = pair
    create = {"name": name, "columns": [{"name": "v", "type": "int64"}]}
    assert post(a, "/api/v1beta2/streams", create) == 201
    assert post(b, f"/api/v1beta2/streams/{name}/ingest", {"columns": ["v"], "data": [[1], [2]]}) < 300
    assert post(b, "/api/v1beta2/streams", create) in (400, 409)   # it exists
    with Client(a.grpc_target) as ca:
        records = ca.get_records(ca.get_cursor(name, 0, "TRIM_HORIZON")).records
        assert [json.loads(r.data)["v"] for r in records] == [1, 2]


def test_a_source_created_through_b_on_a_stream_just_created_through_a(
        pair: tuple[BrokerProcess, BrokerProcess], name: str) -> None:
    """B checked a source's stream in its own catalogue only: "stream [x] does not exist" until
    A's event came (the audit, from the code); B's sink did the same."""
    a, b = pair
    columns = [{"name": "device", "type": "string"}, {"name": "number", "type": "float64"},
               {"name": "time", "type": "datetime64(3)"}]
    assert post(a, "/api/v1beta2/streams", {"name": name, "columns": columns}) == 201
    source = {"name": name, "type": "stream_generator", "stream": name,
              "properties": {"template": "iot", "interval": "20ms"}}
    status, answer = rest(b, "POST", "/api/v1beta2/sources", source)
    assert status == 201, answer
    with Client(a.grpc_target) as ca:
        eventually(lambda: len(ca.get_records(ca.get_cursor(name, 0, "TRIM_HORIZON")).records) >= 3)
    assert rest(b, "DELETE", f"/api/v1beta2/sources/{answer['id']}")[0] in (200, 204)


def test_both_brokers_writing_both_brokers_pushing_every_record_once_in_order(
        pair: tuple[BrokerProcess, BrokerProcess], name: str) -> None:
    """Producers on A and on B append to the same two partitions at once (numbering conflicts,
    notifications crossing local appends); a subscriber per partition on each broker gets every
    record exactly once, in seq order, the same as a read from the start."""
    a, b = pair
    per_producer, partitions = 150, 2
    with Client(a.grpc_target) as ca, Client(b.grpc_target) as cb:
        ca.create_stream(name, partitions)
        subs = {(who, p): client.subscription(cursor=client.get_cursor(name, p, "LATEST"))
                for who, client in (("a", ca), ("b", cb)) for p in range(partitions)}
        got: dict[tuple[str, int], list[tuple[int, bytes]]] = {key: [] for key in subs}
        total = 2 * per_producer   # records per partition
        threads = []
        for key, sub in subs.items():
            def read(key: tuple[str, int] = key, sub: Iterator[RecordsPage] = sub) -> None:
                for page in sub:
                    got[key] += [(r.seq, r.data) for r in page.records]
                    if len(got[key]) >= total:
                        return
            threads.append(threading.Thread(target=read, daemon=True))
        for t in threads:
            t.start()

        def produce(client: Client, tag: bytes) -> None:
            for i in range(per_producer):
                for p in range(partitions):
                    (r,) = client.put_records(name, [tag + b"-%d" % i], partition_id=p)
                    assert not r.reason, r
        producers = [threading.Thread(target=produce, args=(c, t)) for c, t in ((ca, b"a"), (cb, b"b"))]
        for t in producers:
            t.start()
        for t in producers:
            t.join(60)
        for t in threads:
            t.join(WAIT_S)
        for sub in subs.values():
            sub.cancel()
        for p in range(partitions):
            stored = []
            cursor = ca.get_cursor(name, p, "TRIM_HORIZON")
            while page := ca.get_records(cursor, limit=1000):
                if not page.records:
                    break
                stored += [(r.seq, r.data) for r in page.records]
                cursor = page.next_cursor
            assert [seq for seq, _ in stored] == list(range(total))              # gap-free, no reuse
            assert sorted(d for _, d in stored) == sorted([b"a-%d" % i for i in range(per_producer)] +
                                                          [b"b-%d" % i for i in range(per_producer)])
            for who in ("a", "b"):
                assert got[(who, p)] == stored, (who, p)                          # each once, in order


def test_points_put_through_a_are_queried_and_suggested_through_b_at_once(
        pair: tuple[BrokerProcess, BrokerProcess], name: str) -> None:
    """B's series registry catches up with A's series when a query or suggest asks (it loaded them
    once, at its first put: a metric made through A was "No such name" on B, and a series of a
    known metric made through A was silently left out of B's sums); B reads up to every append
    acknowledged anywhere (its cached end of a partition could lag A's last put)."""
    a, b = pair
    now = int(time.time())
    metric_name = f"js.{name}"
    first = {"metric": metric_name, "timestamp": now, "value": 1, "tags": {"host": "b"}}
    assert rest(b, "POST", "/api/put", [first])[0] == 204
    query = {"start": now - 10, "queries": [{"metric": metric_name, "aggregator": "sum"}]}
    assert rest(b, "POST", "/api/query", query)[1] == [   # B's registry is loaded now
        {"metric": metric_name, "tags": {"host": "b"}, "aggregateTags": [], "dps": {str(now): 1}}]
    for i in range(5):   # new series through A, each queried through B right after A's answer
        point = {"metric": metric_name, "timestamp": now, "value": 10 ** (i + 1), "tags": {"host": f"a{i}"}}
        assert rest(a, "POST", "/api/put", [point])[0] == 204
        status, outs = rest(b, "POST", "/api/query", query)
        assert status == 200 and outs[0]["dps"] == {str(now): 1 + sum(10 ** (j + 1) for j in range(i + 1))}, outs
    fresh = f"js.{name}.new"   # a metric only A has written
    assert rest(a, "POST", "/api/put", [{"metric": fresh, "timestamp": now, "value": 7, "tags": {"host": "a"}}])[0] \
        == 204
    status, outs = rest(b, "POST", "/api/query", {"start": now - 10,
                                                  "queries": [{"metric": fresh, "aggregator": "sum"}]})
    assert (status, outs[0]["dps"]) == (200, {str(now): 7}), outs
    with urllib.request.urlopen(f"{b.http_url}/api/suggest?type=metrics&q=js.{name}", timeout=10) as resp:
        assert json.loads(resp.read()) == [metric_name, fresh]
