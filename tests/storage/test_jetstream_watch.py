"""Two JetStream stores of one deployment (two brokers): what one writes, the other is told of
through core NATS (storage/base.py StoreEvents) - its appends (the head cache raised, readers woken
once per burst), its creates, scales and deletes - and `find_stream` / `fresh_bounds` see another
store's changes before any notification arrives."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterable

import pytest

from broker.core.broker import Broker
from broker.core.cursors import decode_cursor, encode_cursor
from broker.model import AppendBatch, ColumnDef, PutEntry, StreamConfig, StreamSchema
from broker.storage.jetstream import JetStreamStore
from tests.storage.conftest import NatsServer, nats_config

BIG = 1 << 30


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the loop until `check()` holds (the notifications arrive on it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Events:
    def __init__(self) -> None:
        self.calls: list[set[tuple[int, int]]] = []
        self.changed: list[StreamConfig] = []
        self.dropped: list[int] = []

    def appended(self, partitions: Iterable[tuple[int, int]]) -> None:
        self.calls.append(set(partitions))

    def stream_changed(self, config: StreamConfig) -> None:
        self.changed.append(config)

    def stream_dropped(self, stream_id: int) -> None:
        self.dropped.append(stream_id)


@contextlib.asynccontextmanager
async def two_brokers(opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch,
                      *deaf: str) -> AsyncIterator[tuple[Broker, Broker, JetStreamStore]]:
    """Brokers a and b on two stores of one deployment, b's store deaf to the NATS handlers `deaf`
    (see deafen); (a, b, b's store), both started, closed after."""
    store_b = await opener()
    deafen(monkeypatch, store_b, *deaf)
    a, b = Broker(await opener(), cursor_secret=b"k"), Broker(store_b, cursor_secret=b"k")
    await a.start()
    await b.start()
    try:
        yield a, b, store_b
    finally:
        await a.close()
        await b.close()


def deafen(monkeypatch: pytest.MonkeyPatch, store: JetStreamStore, *handlers: str) -> None:
    """The store hears nothing on these NATS handlers (`_on_append`, `_on_catalogue`): another
    broker's notifications never reach it."""
    async def deaf(msg: object) -> None:
        return None
    for name in handlers:
        monkeypatch.setattr(store, name, deaf)


async def test_another_stores_appends_raise_the_head_and_wake_once_per_burst(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    a = await opener()
    sid = (await a.create_stream(StreamConfig("s", 2))).stream_id
    b = await opener()
    events = Events()
    await b.watch(events)
    assert (await b.bounds(sid, 0)).next_seq == 0   # b's head cache is loaded (and would stay stale)

    # a burst: 20 appends to partition 0 and one to 1, each its own JetStream message
    for i in range(20):
        await a.append([AppendBatch(sid, 0, 1000 + i, [(None, b"x%d" % i)])])
    await a.append([AppendBatch(sid, 1, 2000, [(None, b"y")])])
    await eventually(lambda: (sid, 1) in set().union(*events.calls))
    await eventually(lambda: b.remote_appends >= 2)
    bounds = await b.bounds(sid, 0)
    assert (bounds.next_seq, bounds.last_ts) == (20, 1019)          # from the notifications, no read
    assert (await b.bounds(sid, 1)).next_seq == 1
    assert [r.data for r in await b.read(sid, 0, 18, BIG, BIG)] == [b"x18", b"x19"]
    # its own appends are not reported back to it
    before = len(events.calls)
    await b.append([AppendBatch(sid, 1, 3000, [(None, b"z")])])
    await asyncio.sleep(0.2)   # (a negative: give a wrong notification time to arrive)
    assert len(events.calls) == before
    assert (await a.fresh_bounds(sid, 1)).next_seq == 2
    # a burst arriving at once (as under load; fake notifications): one wake for the partition, not one per message
    wakes = sum((sid, 0) in c for c in events.calls)
    for i in range(50):
        await a._nc.publish(f"{a._prefix}.w.{sid}.0", b"%d %d 1 1019 someone" % (21 + i, 20 + i))
    await eventually(lambda: b._heads[(sid, 0)].next_seq == 70)
    await asyncio.sleep(0.05)
    assert 1 <= sum((sid, 0) in c for c in events.calls) - wakes < 5


async def test_fresh_bounds_and_find_stream_need_no_notification(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """b does not watch: it learns of a's writes only by asking."""
    a = await opener()
    b = await opener()
    assert await b.find_stream("default", "late") is None
    config = await a.create_stream(StreamConfig("late", 1))
    found = await b.find_stream("default", "late")
    assert found == config
    assert (await b.bounds(config.stream_id, 0)).next_seq == 0
    await a.append([AppendBatch(config.stream_id, 0, 5, [(None, b"1"), (None, b"2")])])
    assert (await b.bounds(config.stream_id, 0)).next_seq == 0          # stale: nobody told it
    fresh = await b.fresh_bounds(config.stream_id, 0)
    assert (fresh.first_seq, fresh.next_seq, fresh.last_ts) == (0, 2, 5)
    assert (await b.bounds(config.stream_id, 0)).next_seq == 2          # and the cache moved on
    (first,) = await b.append([AppendBatch(config.stream_id, 0, 6, [(None, b"3")])])
    assert first == 2
    await a.trim(config.stream_id, 0, 2)                                  # a's retention, say
    assert (await b.bounds(config.stream_id, 0)).first_seq == 0          # b's cached trim point
    assert (await b.fresh_bounds(config.stream_id, 0)).first_seq == 2    # a cursor asks


async def test_another_stores_creates_scales_and_deletes_are_reported(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    a = await opener()
    b = await opener()
    events = Events()
    await b.watch(events)
    config = await a.create_stream(StreamConfig("cat", 1))
    await eventually(lambda: events.changed == [config])
    scaled = await a.update_stream(replace(config, partition_count=3))
    await eventually(lambda: events.changed == [config, scaled])
    assert (await b.bounds(config.stream_id, 2)).next_seq == 0           # b's store knows the new layout
    await a.drop_stream(config.stream_id)
    await eventually(lambda: events.dropped == [config.stream_id])
    again = await a.create_stream(StreamConfig("cat", 1))                # the name with a new stream id
    await eventually(lambda: events.changed[-1] == again)
    assert b.remote_stream_changes == 4


async def test_a_reconnect_reads_everything_again(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """Notifications sent while a store was away are lost: after its reconnect it forgets its heads
    (reloaded from JetStream), re-reads the catalogue and wakes every reader."""
    a = await opener()
    config = await a.create_stream(StreamConfig("gone", 1))
    b = await opener()
    events = Events()
    await b.watch(events)
    assert (await b.bounds(config.stream_id, 0)).next_seq == 0
    await a.append([AppendBatch(config.stream_id, 0, 5, [(None, b"1")])])
    await eventually(lambda: b.remote_appends == 1)
    b._heads[(config.stream_id, 0)] = replace(b._heads[(config.stream_id, 0)], next_seq=0, js_last=0)  # as if missed
    other = await a.create_stream(StreamConfig("other", 1))
    await eventually(lambda: other in events.changed)
    b._configs.pop(other.stream_id)   # as if its event was missed
    events.changed.clear()
    b._resync_soon("a test")
    await eventually(lambda: b.resyncs == 1)
    assert events.changed == [other]
    assert (config.stream_id, 0) in events.calls[-1]
    assert (await b.bounds(config.stream_id, 0)).next_seq == 1


async def test_a_streaming_query_on_one_broker_gets_rows_put_through_another(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """Two Brokers in-process on two stores of one deployment: a streaming query on B is woken by
    A's appends (B's notifier, from A's notification), a bounded one on B counts what A wrote a
    moment before (fresh bounds), and B's catalogue has A's stream without a restart."""
    from broker.core.broker import Broker
    from broker.model import ColumnDef, StreamSchema
    from broker.rows.encode import RowEncoder

    schema = StreamSchema((ColumnDef("k", "string"), ColumnDef("v", "int64")))
    encoder = RowEncoder(schema)
    a, b = Broker(await opener(), cursor_secret=b"k"), Broker(await opener(), cursor_secret=b"k")
    await a.start()
    await b.start()
    try:
        await a.create_stream("typed", 1, schema=schema)
        await a.append_rows("typed", encoder.compact(["k", "v"], [["x", 1], ["y", 2]], 1_000))
        bounded = await b.queries.start("default", "select v from table(typed)")   # B never saw 'typed' before
        rows: list[list[object]] = []
        while (item := await asyncio.wait_for(bounded.results.get(), 10)) is not None:
            rows += item
        assert sorted(rows) == [[1], [2]]

        streaming = await b.queries.start("default", "select v from typed")   # its LATEST cursors are taken
        await a.append_rows("typed", encoder.compact(["k", "v"], [["z", 3]], 2_000))
        assert await asyncio.wait_for(streaming.results.get(), 10) == [[3]]
        assert b.stats.remote_appends >= 1
        await b.queries.cancel("default", streaming.id)
    finally:
        await a.close()
        await b.close()


async def test_after_a_reconnect_the_store_reads_everything_again_and_is_notified_again(tmp_path: Path) -> None:
    """The NATS server restarts under two stores: the watching one re-reads (resync) once it is back,
    and notifications flow again on the restored subscriptions."""
    server = NatsServer(tmp_path / "store", extra=("-c", str(nats_config(tmp_path)))).start()
    a = b = None
    try:
        a = await JetStreamStore.open([server.url], prefix="rc", replicas=1)
        b = await JetStreamStore.open([server.url], prefix="rc", replicas=1)
        events = Events()
        await b.watch(events)
        config = await a.create_stream(StreamConfig("r", 1))
        await eventually(lambda: events.changed == [config])
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        # at least once: a's hint after its own reconnect ("notifications may have been lost") can
        # make b read again after its first re-read has ended (a loaded machine spreads them out)
        await eventually(lambda: b.resyncs >= 1 and a._nc.is_connected, timeout=20)
        assert (config.stream_id, 0) in events.calls[-1]    # every reader woken to re-read
        (first,) = await a.append([AppendBatch(config.stream_id, 0, 7, [(None, b"after")])])
        assert first == 0
        await eventually(lambda: b.remote_appends == 1)      # the append after it, notified again
        assert (await b.bounds(config.stream_id, 0)).next_seq == 1
    finally:
        for s in (a, b):
            if s is not None:
                await s.close()
        server.stop()


async def test_a_broker_finds_a_stream_created_elsewhere_before_its_event(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """B never gets A's catalogue events here: every verb that names the stream looks it up in the
    store before answering STREAM_NOT_FOUND."""
    from broker.errors import BrokerError, ErrorCode
    from broker.model import PutEntry

    async with two_brokers(opener, monkeypatch, "_on_catalogue") as (a, b, _):
        for name in (("described", "put", "cursor", "exists", "config", "query")):
            await a.create_stream(name, 1)
            assert b.catalogue.lookup("default", name) is None
            if name == "described":
                assert (await b.describe_stream(name)).config.stream_name == name
            elif name == "put":
                assert (await b.put_records(name, [PutEntry(b"x", partition_id="0")])).failed_record_count == 0
            elif name == "cursor":
                await b.get_cursor(name, 0, "LATEST")
            elif name == "exists":
                with pytest.raises(BrokerError) as err:
                    await b.create_stream(name, 1)
                assert err.value.code is ErrorCode.STREAM_EXISTS
            elif name == "config":
                assert (await b.stream_config(name)).stream_name == name
            else:
                run = await b.queries.start("default", f"select * from table({name})")
                await b.queries.cancel("default", run.id)
            assert b.catalogue.lookup("default", name) is not None, name
        for bad in ("nowhere", "no where", "a.>", "*", "x" * 300):   # never a KV key error (UNAVAILABLE)
            with pytest.raises(BrokerError) as err:
                await b.describe_stream(bad)
            assert err.value.code is ErrorCode.STREAM_NOT_FOUND, bad
        with pytest.raises(BrokerError) as err:
            await b.put_records("x", [PutEntry(b"x")], project="bad project.>")
        assert err.value.code is ErrorCode.INVALID_REQUEST


async def test_a_broker_behind_another_brokers_scale_delete_or_create_asks_the_store(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """B knows the streams but never gets A's later catalogue events. It answered from its old
    view with refusals clients take as final: PARTITION_NOT_FOUND for a partition A had just added,
    STREAM_EXISTS for a name A had just deleted, STREAM_NOT_FOUND for a cursor A had just issued.
    Each is asked of the store once, and answered from what it holds."""
    from broker.errors import BrokerError, ErrorCode
    from broker.model import PutEntry

    async with two_brokers(opener, monkeypatch, "_on_catalogue") as (a, b, store_b):
        for name in ("put", "cursor", "checkpoint", "deleted"):
            await a.create_stream(name, 2)
            await b.describe_stream(name)   # b knows it, at 2 partitions
        await b.create_app("app")
        for name in ("put", "cursor", "checkpoint"):
            await a.update_partition_count(name, 4)
        put = await b.put_records("put", [PutEntry(b"x", partition_id="0"), PutEntry(b"y", partition_id="3")])
        assert put.failed_record_count == 0 and put.partitions == [0, 3]
        assert await b.get_cursor("cursor", 3, "TRIM_HORIZON")
        await a.put_records("checkpoint", [PutEntry(b"c", partition_id="3")])
        await b.commit_checkpoint("app", "checkpoint", 3, 0)
        await a.delete_stream("deleted")
        assert (await b.create_stream("deleted", 1)).partition_count == 1
        # a partition that does not exist anywhere is still refused, after one look
        refused = await b.put_records("put", [PutEntry(b"z", partition_id="9")])
        assert refused.failures[0][1].code is ErrorCode.PARTITION_NOT_FOUND

        # the event arrives while the store is asked (the put was refused from the view before it)
        await a.create_stream("race", 2)
        await b.describe_stream("race")
        await a.update_partition_count("race", 4)
        real_find = store_b.find_stream

        async def event_meanwhile(project: str, name: str) -> StreamConfig | None:
            found = await real_find(project, name)
            if found is not None:
                b._stream_changed(found)   # as _OtherBrokers would, before this answer is read
            return found
        monkeypatch.setattr(store_b, "find_stream", event_meanwhile)
        put = await b.put_records("race", [PutEntry(b"y", partition_id="3")])
        assert put.failed_record_count == 0 and put.partitions == [3]
        monkeypatch.setattr(store_b, "find_stream", real_find)

        # cursors of a stream b has never heard of: a read and a subscription
        await a.create_stream("new", 1)
        await a.put_records("new", [PutEntry(b"r", partition_id="0")])
        cursor = await a.get_cursor("new", 0, "TRIM_HORIZON")
        assert [r.data for r in (await b.get_records(cursor)).records] == [b"r"]
        await a.create_stream("pushed", 1)
        await a.put_records("pushed", [PutEntry(b"p", partition_id="0")])
        batches = b.subscribe(await a.get_cursor("pushed", 0, "TRIM_HORIZON"))
        assert [r.data for r in (await anext(batches)).records] == [b"p"]
        await batches.aclose()
        # an SSE tail resuming (Last-Event-ID) with its URL's cursor, expired by now, of a stream b
        # has never heard of: the cursor only names the partition, so b learns the stream from it
        await a.create_stream("resumed", 1)
        await a.put_records("resumed", [PutEntry(b"q", partition_id="0")])
        old = decode_cursor(b"k", await a.get_cursor("resumed", 0, "TRIM_HORIZON"), 0, None)
        expired = encode_cursor(b"k", old._replace(issued_ms=old.issued_ms - 10 * 60_000))
        with pytest.raises(BrokerError) as err:
            await b.get_records(expired)
        assert err.value.code is ErrorCode.CURSOR_EXPIRED
        assert [r.data for r in (await b.get_records(await b.cursor_at(expired, 0))).records] == [b"q"]
        # a deleted stream's cursor: STREAM_NOT_FOUND, and its id is not looked up again
        await a.create_stream("gone", 1)
        cursor = await a.get_cursor("gone", 0, "TRIM_HORIZON")
        await a.delete_stream("gone")
        listed = 0
        real = store_b.list_streams

        async def counted() -> list[StreamConfig]:
            nonlocal listed
            listed += 1
            return await real()
        monkeypatch.setattr(store_b, "list_streams", counted)
        for _ in range(3):
            with pytest.raises(BrokerError) as err:
                await b.get_records(cursor)
            assert err.value.code is ErrorCode.STREAM_NOT_FOUND
        assert listed == 1


async def test_a_write_through_a_broker_behind_a_delete_and_create_goes_to_the_new_stream(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """b knows the stream (it wrote to it) and never hears that a deleted it and made it again. Its
    puts were refused STREAM_NOT_FOUND - final for a client - as the store no longer has the stream
    b holds under the name (the probe's t4c: 8 of 20, b only a moment behind). b now learns the
    stream from the store and puts once more, into the new one."""
    from broker.errors import BrokerError, ErrorCode

    async with two_brokers(opener, monkeypatch, "_on_catalogue") as (a, b, _):
        for name, entry in (("by-id", PutEntry(b"new", partition_id="0")), ("by-key", PutEntry(b"new", "k"))):
            await a.create_stream(name, 1)
            assert (await b.put_records(name, [PutEntry(b"old", partition_id="0")])).failed_record_count == 0
            await a.delete_stream(name)
            await a.create_stream(name, 1)
            put = await b.put_records(name, [entry])
            assert put.failed_record_count == 0 and put.seqs == [0], name
            cursor = await a.get_cursor(name, 0, "TRIM_HORIZON")
            assert [r.data for r in (await a.get_records(cursor)).records] == [b"new"]
            assert b.catalogue.lookup("default", name) == a.catalogue.lookup("default", name)
        # deleted and not made again: still STREAM_NOT_FOUND, after one look
        await a.create_stream("gone", 1)
        assert (await b.put_records("gone", [PutEntry(b"old", partition_id="0")])).failed_record_count == 0
        await a.delete_stream("gone")
        with pytest.raises(BrokerError) as err:
            await b.put_records("gone", [PutEntry(b"x", partition_id="0")])
        assert err.value.code is ErrorCode.STREAM_NOT_FOUND
        assert b.catalogue.lookup("default", "gone") is None


@pytest.mark.parametrize("column", [("new", "string", "x"), ("old", "int", 2), ("old", "string", "x")],
                         ids=["another schema", "same schema", "a column of another type"])
async def test_typed_rows_through_a_broker_behind_a_delete_and_create_go_to_the_new_stream(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch,
        column: tuple[str, str, object]) -> None:
    """A Timeplus ingest through b, which never hears that a deleted the typed stream and made it
    again: the rows were checked against the deleted stream's schema (400 for another schema's
    columns: the probe's t4d, 8 of 16; 400 BAD_ROW for a value of the new type in a column whose
    name the old schema has with another type) or written to the deleted stream (STREAM_NOT_FOUND).
    They are checked against the stream the name holds now and go to it."""
    import json

    from aiohttp.test_utils import TestClient, TestServer

    from broker.api.http_app import build_http_app

    name, kind, value = column
    async with two_brokers(opener, monkeypatch, "_on_catalogue") as (a, b, _), \
            TestClient(TestServer(build_http_app(a, body_timeout_s=5))) as via_a, \
            TestClient(TestServer(build_http_app(b, body_timeout_s=5))) as via_b:
        async def status(client: TestClient, method: str, path: str, body: object = None) -> int:
            resp = await client.request(method, path, json=body)
            assert resp.status < 300, (method, path, resp.status, await resp.text())
            return resp.status

        streams, ingest = "/api/v1beta2/streams", "/api/v1beta2/streams/ev/ingest"
        assert await status(via_a, "POST", streams, {"name": "ev", "columns": [{"name": "old", "type": "int"}]}) == 201
        assert await status(via_b, "POST", ingest, {"columns": ["old"], "data": [[1]]}) == 200
        assert await status(via_a, "DELETE", f"{streams}/ev") == 204
        assert await status(via_a, "POST", streams, {"name": "ev", "columns": [{"name": name, "type": kind}]}) == 201
        assert await status(via_b, "POST", ingest, {"columns": [name], "data": [[value]]}) == 200
        records = []
        for p in range(a.catalogue.get("default", "ev").partition_count):
            records += (await a.get_records(await a.get_cursor("ev", p, "TRIM_HORIZON"))).records
        assert [json.loads(r.data)[name] for r in records] == [value]
        # rows that fit neither schema are refused as before (after one look at the store)
        resp = await via_b.post(ingest, json={"columns": ["nope"], "data": [[1]]})
        assert resp.status == 400


async def test_two_brokers_scaling_one_stream_at_once_never_lose_an_event(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """B scales from a layout A has changed meanwhile: refused (UNAVAILABLE, retriable), not written
    over A's event; B's retry from the layout now stored goes through and keeps A's event."""
    from broker.errors import BrokerError, ErrorCode
    from broker.model import ScaleEvent

    a, b = await opener(), await opener()
    config = await a.create_stream(StreamConfig("sc", 1))
    assert await b.find_stream("default", "sc") == config
    by_a = await a.update_stream(replace(config, partition_count=2,
                                         scale_events=(ScaleEvent(1000, 1, 2, (0, 0)),)))
    stale = replace(config, partition_count=3, scale_events=(ScaleEvent(1001, 1, 3, (0, 0, 0)),))
    with pytest.raises(BrokerError) as err:
        await b.update_stream(stale)
    assert err.value.code is ErrorCode.UNAVAILABLE and "another broker" in err.value.message
    assert b._configs[config.stream_id] == by_a          # b has the layout now stored
    retried = replace(by_a, partition_count=3, scale_events=(*by_a.scale_events, ScaleEvent(1002, 2, 3, (0, 0, 0))))
    assert await b.update_stream(retried) == retried
    assert await a.find_stream("default", "sc") == retried
    assert await b.update_stream(retried) == retried      # the same layout again: a retry, not a conflict


async def test_an_at_timestamp_cursor_on_one_broker_sees_another_brokers_newest_records(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    async with two_brokers(opener, monkeypatch, "_on_append") as (a, b, _):
        await a.create_stream("ts", 1)
        sid = a.catalogue.get("default", "ts").stream_id
        await a.store.append([AppendBatch(sid, 0, 1_000, [(None, b"old")])])
        await b.get_records(await b.get_cursor("ts", 0, "TRIM_HORIZON"))    # b's head cached: next 1, ts 1000
        now = b._now()
        await a.store.append([AppendBatch(sid, 0, now + 5_000, [(None, b"new")])])
        cursor = await b.get_cursor("ts", 0, "AT_TIMESTAMP", timestamp_ms=now + 1_000)
        assert [r.data for r in (await b.get_records(cursor)).records] == [b"new"]


async def test_a_connection_closed_for_good_is_replaced_with_the_watch_on_it(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """nats-py closing the connection for good (a protocol error) makes the store open a new one:
    the watch's subscriptions move to it, and what was announced meanwhile is re-read."""
    a, b = await opener(), await opener()
    events = Events()
    await b.watch(events)
    config = await a.create_stream(StreamConfig("reopened", 1))
    await eventually(lambda: events.changed == [config])
    old = b._nc
    await old.close()                                  # not b.close(): as if the server had refused it
    await eventually(lambda: b._nc is not old and b._nc.is_connected and b.resyncs == 1)
    await a.append([AppendBatch(config.stream_id, 0, 5, [(None, b"after")])])
    await eventually(lambda: b.remote_appends == 1)     # notified on the new connection
    assert (await b.bounds(config.stream_id, 0)).next_seq == 1


async def test_a_late_ack_of_its_own_append_never_moves_the_head_back(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """Store a's publish is stored first, b's second; b's notification reaches a before a's own ack.
    The ack must not lower a's head below b's message (a's bounds and reads would hide it)."""
    a = await opener()
    sid = (await a.create_stream(StreamConfig("s", 1))).stream_id
    b = await opener()
    await a.watch(Events())
    real = a._request_publish
    gate = asyncio.Event()

    async def late_ack(subject, body, headers, *_):  # type: ignore[no-untyped-def]
        out = await real(subject, body, headers, *_)   # stored at JetStream
        await gate.wait()                          # its ack reaches the caller late
        return out
    a._request_publish = late_ack   # type: ignore[method-assign]
    first = asyncio.create_task(a.append([AppendBatch(sid, 0, 1000, [(None, b"a0")])]))
    await asyncio.sleep(0.3)
    await b.append([AppendBatch(sid, 0, 1001, [(None, b"b1")])])   # numbered after a's message
    await eventually(lambda: a.remote_appends >= 1)
    gate.set()
    await first
    assert (await a.bounds(sid, 0)).next_seq == 2
    assert [r.data for r in await a.read(sid, 0, 0, BIG, BIG)] == [b"a0", b"b1"]
    a._request_publish = real   # type: ignore[method-assign]
    await a.append([AppendBatch(sid, 0, 1002, [(None, b"a2")])])   # numbered after b's
    assert (await b.fresh_bounds(sid, 0)).next_seq == 3
    assert [r.data for r in await b.read(sid, 0, 0, BIG, BIG)] == [b"a0", b"b1", b"a2"]


async def test_a_stream_deleted_through_two_brokers_at_once_is_gone_from_both(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletes; a client's retry deletes through B before A's event reaches B (STREAM_NOT_FOUND).
    B must not bring the stream back into its catalogue (a ghost: listed, never deletable)."""
    from broker.core.broker import Broker
    from broker.errors import BrokerError, ErrorCode

    store_b = await opener()
    held: list[object] = []
    real = store_b._on_catalogue

    async def hold(msg: object) -> None:
        held.append(msg)
    monkeypatch.setattr(store_b, "_on_catalogue", hold)
    a, b = Broker(await opener(), cursor_secret=b"k"), Broker(store_b, cursor_secret=b"k")
    await a.start()
    await b.start()
    try:
        await a.create_stream("s", 1)
        await b.describe_stream("s")   # B knows it
        await a.delete_stream("s")
        with pytest.raises(BrokerError) as raised:
            await b.delete_stream("s")
        assert raised.value.code is ErrorCode.STREAM_NOT_FOUND
        assert b.catalogue.all() == []
        await eventually(lambda: len(held) >= 2)   # A's create and delete events, late
        for msg in held:
            await real(msg)   # type: ignore[arg-type]
        assert b.catalogue.all() == []
        await b.create_stream("s", 1)
        await b.delete_stream("s")
        assert b.catalogue.all() == [] and a.catalogue.all() == []
    finally:
        await a.close()
        await b.close()


async def test_a_resync_drops_what_the_broker_knows_and_the_store_lacks(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """B misses A's delete and its store forgot the id already (a verb found it gone): a resync
    still tells B's broker, which knew it; a stream B creates meanwhile is kept."""

    async with two_brokers(opener, monkeypatch, "_on_catalogue") as (a, b, store_b):
        await a.create_stream("gone", 1)
        sid = (await b.describe_stream("gone")).config.stream_id
        await a.delete_stream("gone")
        store_b._forget(sid)
        await b.create_stream("kept", 1)
        await store_b._resync()
        assert [c.stream_name for c in b.catalogue.all()] == ["kept"]


async def test_a_delete_while_a_broker_starts_is_not_undone_by_its_older_listing(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """B subscribes, then lists the catalogue; A's delete (and its event, handled by B) lands
    while B's listing, taken before it, is on its way: B must not load the deleted stream."""
    from broker.core.broker import Broker

    store_b = await opener()
    real_list = store_b.list_streams
    listed, go_on = asyncio.Event(), asyncio.Event()

    async def slow_list() -> list[StreamConfig]:
        listing = await real_list()
        listed.set()
        await go_on.wait()
        return listing
    a, b = Broker(await opener(), cursor_secret=b"k"), Broker(store_b, cursor_secret=b"k")
    await a.start()
    try:
        await a.create_stream("s", 1)
        monkeypatch.setattr(store_b, "list_streams", slow_list)
        starting = asyncio.create_task(b.start())
        await listed.wait()
        await a.delete_stream("s")
        await eventually(lambda: store_b.remote_stream_changes >= 1)
        go_on.set()
        await starting
        assert b.catalogue.all() == []
    finally:
        await a.close()
        await b.close()


async def test_a_scale_events_boundaries_include_another_brokers_acknowledged_appends(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A's head of partition 0 is cached, B's append notification has not reached A: the scale
    event A records still puts B's acknowledged record before partition 0's boundary."""
    from broker.core.broker import Broker

    store_a = await opener()

    deafen(monkeypatch, store_a, "_on_append")
    a = Broker(store_a, cursor_secret=b"k")
    await a.start()
    try:
        sid = (await a.create_stream("s", 1)).stream_id
        assert (await store_a.bounds(sid, 0)).next_seq == 0   # cached
        b = await opener()
        await b.find_stream("default", "s")
        await b.append([AppendBatch(sid, 0, 1000, [(None, b"acked-by-b")])])
        _, after = await a.update_partition_count("s", 2)
        assert after.scale_events[-1].boundaries[0] == 1
    finally:
        await a.close()


async def test_a_notification_the_writer_failed_to_send_is_made_up_by_a_resync_hint(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    a = await opener()
    sid = (await a.create_stream(StreamConfig("s", 1))).stream_id
    b = await opener()
    events = Events()
    await b.watch(events)
    assert (await b.bounds(sid, 0)).next_seq == 0   # cached
    real = a._nc.publish

    async def failing(subject, payload=b"", **kw):  # type: ignore[no-untyped-def]
        if ".w." in subject:   # a's connection drops just after JetStream's ack
            raise ConnectionError("simulated: reconnecting, no pending buffer")
        return await real(subject, payload, **kw)
    a._nc.publish = failing   # type: ignore[method-assign]
    await a.append([AppendBatch(sid, 0, 1000, [(None, b"x")])])
    a._nc.publish = real   # type: ignore[method-assign]
    await eventually(lambda: b.resyncs >= 1 and any((sid, 0) in c for c in events.calls))
    assert (await b.bounds(sid, 0)).next_seq == 1


async def test_a_long_poll_that_times_out_asks_the_store_itself(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """B hears of no append (no notification, no hint): its long poll still returns A's record
    when its wait runs out (one fresh_bounds per timed-out wait)."""

    async with two_brokers(opener, monkeypatch, "_on_append", "_on_catalogue") as (a, b, _):
        sid = (await a.create_stream("s", 1)).stream_id
        cursor = await b.get_cursor("s", 0, "LATEST")   # b's head cached: next 0
        await a.store.append([AppendBatch(sid, 0, 1_000, [(None, b"unannounced")])])
        got = await b.get_records(cursor, wait_ms=300)
        assert [r.data for r in got.records] == [b"unannounced"]


async def test_a_store_closed_while_it_reopens_its_connection_leaves_no_socket_open(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """The store closing while it makes a new connection (to a server that accepted it and has not
    said INFO yet) closes that connection too: no socket outlives the store and its event loop."""
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()
    theirs: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        theirs.append(writer)
        await accepted.put(reader)
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        b = await opener()
        b._options["servers"] = [f"nats://127.0.0.1:{port}"]
        await b._nc.close()                     # closed for good: the store opens a new one, here
        reader = await asyncio.wait_for(accepted.get(), 10)
        await b.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""   # EOF: the store's end is closed
    finally:
        for w in theirs:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_change_through_a_broker_behind_keeps_what_another_broker_stored(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """b has not heard of a's changes yet. A PATCH through b wrote b's whole view: a's scale was
    undone (partition 1's records unreachable through a) and a's retention set back; a scale
    through b set a's PATCHed retention back too (the review). Each change now writes its own
    fields onto what is stored."""
    schema = StreamSchema((ColumnDef("v", "int64"),))
    async with two_brokers(opener, monkeypatch, "_on_catalogue") as (a, b, store_b):
        await a.create_stream("s", 1, schema=schema)
        await b.describe_stream("s")                         # b's view: 1 partition, 24 hours
        await a.update_partition_count("s", 2)
        assert (await a.put_records("s", [PutEntry(b'{"v": 1}', partition_id="1")])).failed_record_count == 0
        await b.update_stream("s", retention_hours=48)       # PATCH through b
        stored = await store_b.find_stream("default", "s")
        assert stored is not None and (stored.partition_count, stored.retention_hours) == (2, 48)
        await a.update_stream("s", retention_hours=72)
        await b.update_stream("s", description="hello")      # b's view still says 48 hours
        stored = await store_b.find_stream("default", "s")
        assert stored is not None and stored.schema is not None
        assert (stored.retention_hours, stored.schema.description, stored.partition_count) == (72, "hello", 2)
        await b.update_partition_count("s", 3)               # b asks the store for the layout first
        stored = await store_b.find_stream("default", "s")
        assert stored is not None and (stored.partition_count, stored.retention_hours) == (3, 72)
        cursor = await a.get_cursor("s", 1, "TRIM_HORIZON")
        assert [r.data for r in (await a.get_records(cursor)).records] == [b'{"v": 1}']
