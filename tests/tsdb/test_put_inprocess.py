"""`/api/put` in-process (the real HTTP app behind aiohttp's test server, a Broker over a
MemoryStore the test can stall or break): what a broker process cannot be made to do on cue -
a `sync_timeout` that runs out while the store is stalled, storage refusing a partition, the whole
append or the type write failing, the stream deleted in the middle of a put, two doors racing to
create the stream, a typed stream under the tsdb name. No wall-clock assertions: a stalled store
stays stalled until the test lets it go."""
from __future__ import annotations

import asyncio
import io
import json
import random
import threading
from typing import Any, AsyncIterator, Sequence

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.api.http_app import build_http_app
from broker.core.broker import Broker
from broker.core.throttle import PartitionThrottle
from broker.errors import ErrorCode, server_error
from broker.model import AppendBatch
from broker.rows.schema import build_schema
from broker.storage.base import AppendOutcome
from broker.storage.memory import MemoryStore
from broker.tsdb.put import raw_points
from broker.tsdb.series import TsdbStream, series_key, series_partition
from broker.tsdb.workers import OFFLOAD_BYTES

NOW_S = 1_700_000_000
POINT_ERRORS = {"error": {"code": 400, "message": "One or more data points had errors",
                          "details": "Please see the TSD logs or append \"details\" to the put request"}}


class ControlledStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None     # set: appends wait for it
        self.entered = asyncio.Event()
        self.refuse: set[int] = set()              # partitions answered STORAGE_FULL
        self.fail_appends = False                  # the whole append raises UNAVAILABLE
        self.fail_meta = False                     # metadata writes raise STORAGE_FULL
        self.types_gate: asyncio.Event | None = None   # set: the registry's type writes wait for it
        self.types_entered = asyncio.Event()
        self.slow_create = False
        self.scan_gate: asyncio.Event | None = None   # set: registry loads wait for it
        self.scans = 0

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_appends:
            raise server_error(ErrorCode.UNAVAILABLE, detail="disk unplugged")
        ok = iter(await super().append([b for b in batches if b.partition not in self.refuse]))
        return [server_error(ErrorCode.STORAGE_FULL) if b.partition in self.refuse else next(ok) for b in batches]

    async def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        if prefix.startswith(b"T"):   # the series registry's load
            self.scans += 1
            if self.scan_gate is not None:
                await self.scan_gate.wait()
        return await super().meta_scan(prefix)

    async def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        if any(k.startswith(b"T") for k in changes):   # the series registry fixing new types
            self.types_entered.set()
            if self.types_gate is not None:
                await self.types_gate.wait()
        if self.fail_meta:
            raise server_error(ErrorCode.STORAGE_FULL)
        await super().meta_write(changes)

    async def create_stream(self, config):  # type: ignore[no-untyped-def]
        if self.slow_create:
            await asyncio.sleep(0.05)
        return await super().create_stream(config)


@pytest.fixture
async def store() -> ControlledStore:
    return ControlledStore()


@pytest.fixture
async def broker(store: ControlledStore) -> AsyncIterator[Broker]:
    b = Broker(store, cursor_secret=b"k" * 32)
    await b.start()
    yield b
    if store.gate is not None:
        store.gate.set()
    await b.close()


@pytest.fixture
async def tsdb(broker: Broker) -> TsdbStream:
    return TsdbStream(broker, "default", "tsdb")


@pytest.fixture
async def client(broker: Broker, tsdb: TsdbStream) -> AsyncIterator[TestClient]:
    app = build_http_app(broker, body_timeout_s=10, tsdb_stream=tsdb)
    async with TestClient(TestServer(app)) as c:
        yield c


def point(metric: str, value: Any = 1, ts: int = NOW_S, **tags: str) -> dict[str, Any]:
    return {"metric": metric, "timestamp": ts, "value": value, "tags": tags or {"host": "a"}}


async def post(client: TestClient, points: Any, query: str = "") -> tuple[int, Any]:
    resp = await client.post("/api/put" + query, data=io.BytesIO(json.dumps(points).encode()))
    raw = await resp.read()
    if resp.status != 204:
        assert resp.headers["Content-Type"] == "application/json; charset=UTF-8"
    return resp.status, json.loads(raw) if raw else None


async def stored(broker: Broker, metric: str) -> list[dict[str, Any]]:
    out = []
    config = broker.catalogue.get("default", "tsdb")
    for p in range(config.partition_count):
        cursor = await broker.get_cursor("tsdb", str(p), "TRIM_HORIZON")
        out += [json.loads(r.data) for r in (await broker.get_records(cursor, 10_000)).records]
    return [r for r in out if r["metric"] == metric]


async def eventually(check: Any) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


# -- sync_timeout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    ("?details&sync_timeout=50", {"success": 0, "failed": 3, "timeouts": 2, "errors": [
        {"datapoint": point("st", 1, host="x"),
         "error": "Storage exception: not durable within sync_timeout (50 ms)"},
        {"datapoint": point("st", 2, 0), "error": "Invalid timestamp"},
        {"datapoint": point("st", 3, host="y"),
         "error": "Storage exception: not durable within sync_timeout (50 ms)"}]}),
    ("?summary&sync_timeout=50", {"success": 0, "failed": 3, "timeouts": 2}),
    ("?sync_timeout=50", POINT_ERRORS),
])
async def test_a_sync_timeout_that_runs_out_answers_400_with_timeouts(
        client: TestClient, broker: Broker, store: ControlledStore, query: str, expected: Any) -> None:
    # the stream and both series exist, so only the append is left to stall
    assert (await post(client, [point("st", 0, host="x"), point("st", 0, host="y")]))[0] == 204
    store.gate = asyncio.Event()
    status, body = await post(client, [point("st", 1, host="x"), point("st", 2, 0), point("st", 3, host="y")], query)
    assert (status, body) == (400, expected)
    # the write went on: once the store moves, the points are there (not acknowledged, but durable)
    store.gate.set()

    async def landed() -> bool:
        return sorted(p["value"] for p in await stored(broker, "st")) == [0, 0, 1, 3]
    await eventually(landed)


async def test_a_timed_out_answer_describes_one_moment_though_the_write_lands_meanwhile(
        client: TestClient, broker: Broker, store: ControlledStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """sync_timeout runs out with the append stalled; while the answer's details are being made
    (the body parsed again, an await) the append lands. The answer still adds up: every point it
    counts as failed is listed, as the timeout it was when the time ran out."""
    from broker.api import tsdb as door
    assert (await post(client, [point("mo", 0, host="x"), point("mo", 0, host="y")]))[0] == 204
    store.gate = asyncio.Event()
    real = door._points_of

    async def points_of_after_landing(body: bytes) -> list[Any]:
        gate = store.gate
        assert gate is not None
        gate.set()   # the write goes on now, while the answer is being made

        async def landed() -> bool:
            return sorted(p["value"] for p in await stored(broker, "mo")) == [0, 0, 1, 2]
        await eventually(landed)
        return await real(body)

    monkeypatch.setattr(door, "_points_of", points_of_after_landing)
    sent = [point("mo", 1, host="x"), point("mo", 2, host="y")]
    timeout = "Storage exception: not durable within sync_timeout (50 ms)"
    assert await post(client, sent, "?details&sync_timeout=50") == (400, {
        "success": 0, "failed": 2, "timeouts": 2,
        "errors": [{"datapoint": sent[0], "error": timeout}, {"datapoint": sent[1], "error": timeout}]})


async def test_a_sync_timeout_while_the_stream_is_being_made(client: TestClient, store: ControlledStore) -> None:
    store.gate = asyncio.Event()
    status, body = await post(client, [point("first", 1)], "?summary&sync_timeout=20")
    assert (status, body) == (400, {"success": 0, "failed": 1, "timeouts": 1})


async def test_a_sync_timeout_long_enough_is_a_normal_answer(client: TestClient) -> None:
    assert await post(client, [point("ok", 1)], "?summary&sync_timeout=600000") == (200, {"success": 1, "failed": 0})


class BusyWorkers:
    """Stands in for a tsdb worker pool whose workers are all busy until `free` is set; then it
    answers None (no worker), and the broker checks the body itself."""

    def __init__(self) -> None:
        self.free = asyncio.Event()
        self.waiting = 0
        self.given_up = 0    # waits cancelled by the put
        self.cancellable: list[bool] = []   # what each put said: whether it may be cancelled (shielded)

    async def group(self, *_: Any, cancellable: bool = True) -> None:
        self.cancellable.append(cancellable)
        self.waiting += 1
        try:
            await self.free.wait()
        except asyncio.CancelledError:
            self.given_up += 1
            raise


def big_body(metric: str, n: int) -> list[dict[str, Any]]:
    """n points of one series, over OFFLOAD_BYTES (so a worker is asked), the 3rd one invalid."""
    points = [point(metric, i, NOW_S + i, host="h" * 40) for i in range(n)]
    points[2]["timestamp"] = 0
    assert len(json.dumps(points)) >= OFFLOAD_BYTES
    return points


@pytest.mark.parametrize("query, expected", [
    ("?summary&sync_timeout=50", {"success": 0, "failed": 300, "timeouts": 300}),
    ("?details&sync_timeout=50", {"success": 0, "failed": 300, "timeouts": 300, "errors": [
        {"datapoint": p, "error": "Storage exception: not durable within sync_timeout (50 ms)"}
        for p in big_body("busy", 300)]}),
    ("?sync_timeout=50", POINT_ERRORS),
])
async def test_a_sync_timeout_bounds_the_wait_for_a_worker_too(
        client: TestClient, broker: Broker, tsdb: TsdbStream, query: str, expected: Any) -> None:
    # sync_timeout is how long the write may take: a put that waited for a busy worker pool was
    # answered only once a worker (and the append) was done with it, however long that took
    assert (await post(client, [point("busy", 0, host="h" * 40)]))[0] == 204   # the stream exists
    tsdb.workers = workers = BusyWorkers()    # type: ignore[assignment]
    assert await post(client, big_body("busy", 300), query) == (400, expected)
    # nothing was decided yet: the put let go of its body and its place in the queue, and wrote nothing

    async def gave_up() -> bool:
        return workers.given_up == 1
    await eventually(gave_up)
    assert workers.cancellable == [True]   # its job would have been shielded
    workers.free.set()
    assert (await post(client, [point("busy", 1, NOW_S + 1, host="h" * 40)]))[0] == 204
    assert sorted(p["value"] for p in await stored(broker, "busy")) == [0, 1]


async def test_a_registry_load_outlives_the_puts_that_gave_up_on_it(
        client: TestClient, store: ControlledStore, tsdb: TsdbStream) -> None:
    # after a restart the first puts load the series registry (a scan of every series key); a put
    # whose sync_timeout ran out cancelled that load, so puts that all gave up sooner than it took
    # started it again, for ever
    assert (await post(client, [point("reg", 0)]))[0] == 204
    tsdb._registry = None                      # as after a restart
    store.scan_gate, store.scans = asyncio.Event(), 0
    for _ in range(2):
        status, body = await post(client, [point("reg", 1)], "?summary&sync_timeout=30")
        assert (status, body) == (400, {"success": 0, "failed": 1, "timeouts": 1})
    assert store.scans == 1                    # one load, still going, shared
    store.scan_gate.set()
    assert (await post(client, [point("reg", 2)], "?summary"))[0] == 200
    assert store.scans == 1


async def test_a_put_without_a_sync_timeout_asks_for_no_shield(client: TestClient, tsdb: TsdbStream) -> None:
    """It is never cancelled while a worker has its body, so its job saves the shield's task."""
    assert (await post(client, [point("busy", 0, host="h" * 40)]))[0] == 204
    tsdb.workers = workers = BusyWorkers()    # type: ignore[assignment]
    workers.free.set()   # answers None: the broker checks the body itself
    status, _ = await post(client, big_body("busy", 300), "?summary")
    assert status == 400 and workers.cancellable == [False]


async def test_a_body_that_holds_no_points_says_so_even_when_the_wait_runs_out(client: TestClient,
                                                                              tsdb: TsdbStream) -> None:
    assert (await post(client, [point("busy", 0)]))[0] == 204
    tsdb.workers = BusyWorkers()    # type: ignore[assignment]
    padded = "[" + " " * OFFLOAD_BYTES + "]"
    resp = await client.post("/api/put?summary&sync_timeout=20", data=io.BytesIO(padded.encode()))
    assert (resp.status, await resp.json()) == \
        (400, {"error": {"code": 400, "message": "No datapoints found in content"}, "reason": "PUT_NO_POINTS"})


# -- the details answer -----------------------------------------------------------------------------

def details_as_a_dict_per_point(body: bytes, success: int, failed: int, errors: list[str | None],
                                kept: list[bool], pending: str, timeouts: int) -> bytes:
    """The details answer as the door made it before: a dict per failed point, one orjson.dumps."""
    raws = raw_points(body)
    answer: dict[str, Any] = {"success": success, "failed": failed}
    answer["errors"] = [{"datapoint": orjson.Fragment(raws[i]), "error": error if error is not None else pending}
                        for i, error in enumerate(errors) if not kept[i]]
    if timeouts:
        answer["timeouts"] = timeouts
    return orjson.dumps(answer)


def test_the_details_answer_is_byte_for_byte_what_a_dict_per_point_gave() -> None:
    """The details answer is joined from pieces (each point's text, each distinct error encoded
    once), byte for byte what a dict per failed point gave: spacing, escapes, nesting too deep
    for msgspec, one object for a body, points past a chunk, timeouts or not."""
    from broker.api import tsdb as door
    rnd = random.Random(5)
    texts = [b"1", b' {"metric" : "a" ,\n "value":  1.50e3, "tags": {}} ', b'"x\\u00e9\\"\xc3\xa9"', b"[ ]", b"null",
             b"true", b"-0.0", b'{"metric":"\xe6\xb8\xa9","value":"\\ud83d\\ude00"}']
    error_texts = [None, "Metric name was empty", 'Invalid tag value: "a\\b"\u2028\u00e9', "Invalid timestamp"]
    bodies: list[tuple[bytes, int]] = [
        (b"[" + b",".join(texts) + b"]", len(texts)),
        (b' \n{"metric": "one" } \t', 1),
        (b"[" + b"[" * 1500 + b"]" * 1500 + b", 2 ]", 2),   # past msgspec's nesting limit: scanned
    ]
    many = [rnd.choice(texts) for _ in range(3 * door._DETAILS_CHUNK + 17)]
    bodies.append((b"[" + b" , ".join(many) + b"]", len(many)))
    for body, n in bodies:
        for _ in range(6):
            kept = [rnd.random() < 0.3 for _ in range(n)]
            errors = [None if k else rnd.choice(error_texts) for k in kept]
            success = sum(kept)
            timeouts = errors.count(None) - success
            how = (body, success, n - success, errors, kept, "Storage exception: not durable within sync_timeout "
                   "(5 ms)", timeouts)
            assert bytes(door._details(*how)) == details_as_a_dict_per_point(*how)
        every = [True] * n   # (every point stored: not answered so, but well formed all the same)
        how = (body, n, 0, [None] * n, every, "p", 0)
        assert bytes(door._details(*how)) == details_as_a_dict_per_point(*how) == \
            b'{"success":%d,"failed":0,"errors":[]}' % n


async def test_a_big_bodys_details_answer_is_made_off_the_event_loop(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /api/put?details of a body of bare numbers: each point fails and is echoed. The door
    built a dict per failed point and encoded the answer on the event loop (a 12 MB body: a 2.2 GB
    peak and every door held ~4-6 s). Past _INLINE_BYTES the answer is made on a worker thread:
    nothing the loop's thread encodes is the answer, and the answer is what it was."""
    from broker.api import tsdb as door
    loop_thread = threading.get_ident()
    encoded: list[tuple[int, int]] = []   # (thread, bytes) of every orjson.dumps of the door
    built: list[int] = []                 # the threads the details answer was built on

    class RecordingOrjson:
        def __getattr__(self, name: str) -> Any:
            return getattr(orjson, name)

        def dumps(self, *args: Any, **kwargs: Any) -> bytes:
            out = orjson.dumps(*args, **kwargs)
            encoded.append((threading.get_ident(), len(out)))
            return out

    monkeypatch.setattr(door, "orjson", RecordingOrjson())
    real = getattr(door, "_details", None)
    if real is not None:
        def recording_details(*args: Any) -> bytearray:
            built.append(threading.get_ident())
            return real(*args)
        monkeypatch.setattr(door, "_details", recording_details)
    n = door._INLINE_BYTES // 2 + 1000
    body = b"[" + b",".join([b"1"] * n) + b"]"
    assert len(body) > door._INLINE_BYTES
    resp = await client.post("/api/put?details", data=io.BytesIO(body))
    answer = await resp.read()
    assert resp.status == 400 and resp.headers["Content-Type"] == "application/json; charset=UTF-8"
    assert answer == b'{"success":0,"failed":%d,"errors":[%s]}' % (
        n, b",".join([b'{"datapoint":1,"error":"Metric name was empty"}'] * n))
    assert [size for thread, size in encoded if thread == loop_thread and size > 1000] == []
    assert built and loop_thread not in built


# -- storage failures -----------------------------------------------------------------------------

async def test_a_refused_partition_fails_its_points_with_a_storage_exception(
        client: TestClient, broker: Broker, store: ControlledStore) -> None:
    hosts = [f"h{i}" for i in range(16)]
    keys = {h: series_key("sf", {"host": h}) for h in hosts}
    parts = {h: series_partition(keys[h], 8) for h in hosts}
    refused = parts[hosts[0]]
    store.refuse = {refused}
    sent = [point("sf", i, host=h) for i, h in enumerate(hosts)]
    status, body = await post(client, sent, "?details")
    bad = [p for p in sent if parts[p["tags"]["host"]] == refused]
    assert status == 400
    assert body["success"] == len(sent) - len(bad) and body["failed"] == len(bad)
    assert body["errors"] == [{"datapoint": p, "error": "Storage exception: Storage is full, retry later"}
                              for p in bad]
    assert len(await stored(broker, "sf")) == len(sent) - len(bad)
    # the refused points' series got their type all the same (fixed before the append): a retry
    # of the same type goes in, another type is refused
    store.refuse = set()
    assert (await post(client, bad))[0] == 204
    assert (await post(client, [point("sf", "x", host=hosts[0])], "?details"))[1]["errors"][0]["error"] == \
        "Unable to parse value to a number"


async def test_a_failed_append_fails_every_accepted_point(client: TestClient, store: ControlledStore) -> None:
    assert (await post(client, [point("fa", 1)]))[0] == 204
    store.fail_appends = True
    status, body = await post(client, [point("fa", 2), point("fa", 3, 0)], "?details")
    assert (status, body) == (400, {"success": 0, "failed": 2, "errors": [
        {"datapoint": point("fa", 2), "error": "Storage exception: Service unavailable, retry later. disk unplugged"},
        {"datapoint": point("fa", 3, 0), "error": "Invalid timestamp"}]})
    assert await post(client, [point("fa", 2)]) == (400, POINT_ERRORS)


async def test_a_failed_type_write_fails_the_new_series_only(client: TestClient, broker: Broker,
                                                              store: ControlledStore) -> None:
    assert (await post(client, [point("tw", 1, host="known")]))[0] == 204
    store.fail_meta = True
    sent = [point("tw", 2, host="known"), point("tw", 3, host="new"), point("tw", "x", host="new")]
    status, body = await post(client, sent, "?details")
    assert (status, body) == (400, {"success": 1, "failed": 2, "errors": [
        {"datapoint": sent[1], "error": "Storage exception: Storage is full, retry later"},
        {"datapoint": sent[2], "error": "Unable to parse value to a number"}]})
    assert sorted(p["value"] for p in await stored(broker, "tw")) == [1, 2]
    # nothing was learnt about the new series: once the store takes writes, any type may come first
    store.fail_meta = False
    assert (await post(client, [point("tw", "x", host="new")]))[0] == 204


# -- the stream ---------------------------------------------------------------------------------

async def test_a_stream_deleted_during_a_put_is_recreated_and_the_put_lands_there(
        client: TestClient, broker: Broker, store: ControlledStore) -> None:
    assert (await post(client, [point("dd", "old")]))[0] == 204
    old = broker.catalogue.get("default", "tsdb")
    store.gate = asyncio.Event()
    store.entered.clear()
    put = asyncio.ensure_future(post(client, [point("dd", "new", NOW_S + 1)], "?summary"))
    await asyncio.wait_for(store.entered.wait(), 30)   # the put's append is in the store
    await broker.delete_stream("tsdb")                 # the stream goes away under it
    store.gate.set()
    # the append found no stream; the put made the stream again and wrote there
    assert await put == (200, {"success": 1, "failed": 0})
    new = broker.catalogue.get("default", "tsdb")
    assert new.stream_id != old.stream_id
    assert [p["value"] for p in await stored(broker, "dd")] == ["new"]
    # the new incarnation learnt the series' type from that point
    status, body = await post(client, [point("dd", 5, NOW_S + 2)], "?details")
    assert status == 400 and body["errors"][0]["error"] == "Value type mismatch: series holds string values"


async def test_a_scale_event_during_a_put_routes_its_points_again(
        client: TestClient, broker: Broker, store: ControlledStore) -> None:
    """The stream is scaled after the put sorted its points for 8 partitions, while it fixes a new
    series' type: the core refuses the append as routed by the old count, nothing of it went in,
    and the put routes its points again for the new count instead of failing them."""
    assert (await post(client, [point("sc", 1, host="known")]))[0] == 204
    store.types_gate = asyncio.Event()
    store.types_entered.clear()
    sent = [point("sc", 2, NOW_S + 1, host="known")] + [point("sc", i, NOW_S + 1, host=f"n{i}") for i in range(20)]
    put = asyncio.ensure_future(post(client, sent, "?details"))
    await asyncio.wait_for(store.types_entered.wait(), 30)   # sorted for 8 partitions, fixing types
    await broker.update_partition_count("tsdb", 3)
    store.types_gate.set()
    assert await put == (200, {"success": 21, "failed": 0, "errors": []})
    config = broker.catalogue.get("default", "tsdb")
    assert config.partition_count == 3
    for p in range(3):   # each new point in the partition its series routes to at 3
        cursor = await broker.get_cursor("tsdb", str(p), "AT_SEQUENCE_NUMBER", "0")
        for r in (await broker.get_records(cursor, 10_000)).records:
            data = json.loads(r.data)
            if data["timestamp"] == (NOW_S + 1) * 1000:
                assert series_partition(series_key("sc", data["tags"]), 3) == p
    assert sorted(p["value"] for p in await stored(broker, "sc") if p["timestamp"] == (NOW_S + 1) * 1000) == \
        sorted([2, *range(20)])


async def test_a_put_routed_again_after_a_scale_event_is_charged_once(
        client: TestClient, broker: Broker, store: ControlledStore) -> None:
    """The write limit was asked when the put was sorted; a scale event refused the append (nothing
    went in) and the put, routed again, was asked for the same points once more: a partition's
    whole second's worth put once failed against its own refused first try ("Storage exception:
    ... write limit"), though nothing of it had been written. The refused try's tokens go back."""
    now = [0.0]
    throttle = broker.writes._throttle = PartitionThrottle(5, 0, lambda: now[0])
    assert (await post(client, [point("rc", 1, host="warm")]))[0] == 204   # the stream is made
    now[0] += 100   # every bucket full again
    key = series_key("rc", {"host": "new"})
    p = series_partition(key, 8)
    target = next(n for n in range(2, 257) if n != 8 and series_partition(key, n) == p)   # the same partition
    store.types_gate = asyncio.Event()
    store.types_entered.clear()
    sent = [point("rc", i, NOW_S + i, host="new") for i in range(5)]   # the partition's whole second's worth
    put = asyncio.ensure_future(post(client, sent, "?details"))
    await asyncio.wait_for(store.types_entered.wait(), 30)   # admitted and sorted for 8 partitions
    await broker.update_partition_count("tsdb", target)
    store.types_gate.set()
    assert await put == (200, {"success": 5, "failed": 0, "errors": []})
    assert sorted(r["value"] for r in await stored(broker, "rc") if r["tags"] == {"host": "new"}) == list(range(5))
    config = broker.catalogue.get("default", "tsdb")
    assert not throttle.admit_whole(config.stream_id, p, 1, 1)   # and the bucket holds what they took, once


async def test_points_whose_type_write_failed_give_back_their_write_limit(
        client: TestClient, broker: Broker, store: ControlledStore) -> None:
    """The write limit is asked for a put's new series before their types are written; when that
    write failed, their points were refused (Storage exception) but what they took stayed taken, so
    sending them again once the store took writes failed on the write limit, though none had been
    written. What they took goes back."""
    now = [0.0]
    broker.writes._throttle = PartitionThrottle(5, 0, lambda: now[0])
    assert (await post(client, [point("tf", 1, host="warm")]))[0] == 204   # the stream is made
    now[0] += 100   # every bucket full again
    sent = [point("tf", i, NOW_S + i, host="new") for i in range(5)]   # one partition's whole second's worth
    store.fail_meta = True
    status, body = await post(client, sent, "?details")
    assert status == 400 and body["success"] == 0
    assert {e["error"] for e in body["errors"]} == {"Storage exception: Storage is full, retry later"}
    store.fail_meta = False
    assert await post(client, sent, "?details") == (200, {"success": 5, "failed": 0, "errors": []})


async def test_points_the_store_refused_give_back_their_write_limit(
        client: TestClient, broker: Broker, store: ControlledStore) -> None:
    """Points of a partition whose append the store refused (STORAGE_FULL: nothing of it written)
    kept what they took of the write limit: sent again once the store took writes, they failed on
    the write limit. What they took goes back."""
    now = [0.0]
    broker.writes._throttle = PartitionThrottle(5, 0, lambda: now[0])
    assert (await post(client, [point("sf", 1, host="a")]))[0] == 204   # the stream made, the series typed
    now[0] += 100   # every bucket full again
    store.refuse.add(series_partition(series_key("sf", {"host": "a"}), 8))
    sent = [point("sf", i, NOW_S + i, host="a") for i in range(5)]   # the partition's whole second's worth
    status, body = await post(client, sent, "?details")
    assert status == 400 and body["success"] == 0
    assert {e["error"] for e in body["errors"]} == {"Storage exception: Storage is full, retry later"}
    store.refuse.clear()
    assert await post(client, sent, "?details") == (200, {"success": 5, "failed": 0, "errors": []})


async def test_a_big_first_put_is_sorted_twice_off_the_event_loop(
        client: TestClient, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the stream exists a put is sorted for no layout, then again once it is made: a big
    body both times in a thread, not on the event loop that serves every other request."""
    from broker.api import tsdb as door
    threads: list[bool] = []
    real = door.sort

    def sort(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(door, "sort", sort)
    sent = [point("big1", i, NOW_S, host=f"h{i}", pad="x" * 100) for i in range(3000)]
    body = json.dumps(sent).encode()
    assert len(body) > door._INLINE_BYTES
    assert (await post(client, sent))[0] == 204
    assert threads == [False, False]   # on the loop, each would be True
    assert len(await stored(broker, "big1")) == 3000


async def test_a_scale_event_during_the_second_sort_is_sorted_for_before_the_append(
        client: TestClient, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first put is sorted again once the stream is made; the stream is scaled while that sort
    runs (in its thread). The put sorts once more before it appends: the core is only ever asked
    to append by the layout the stream has, never refused for a stale one."""
    from broker.api import tsdb as door
    loop = asyncio.get_running_loop()
    real_sort, real_append = door.sort, broker.append_partitioned
    counts: list[int] = []

    def sort(body: bytes, stream_id: int, partition_count: int, *rest: Any) -> Any:
        if partition_count == 8:   # sorting for the stream just made: scale it meanwhile
            asyncio.run_coroutine_threadsafe(broker.update_partition_count("tsdb", 3), loop).result(30)
        return real_sort(body, stream_id, partition_count, *rest)

    async def append_partitioned(*args: Any, **kwargs: Any) -> Any:
        counts.append(kwargs["partition_count"])
        return await real_append(*args, **kwargs)

    monkeypatch.setattr(door, "sort", sort)
    monkeypatch.setattr(broker, "append_partitioned", append_partitioned)
    sent = [point("sc2", i, NOW_S, host=f"h{i}", pad="x" * 100) for i in range(3000)]
    assert len(json.dumps(sent)) > door._INLINE_BYTES
    assert await post(client, sent, "?summary") == (200, {"success": 3000, "failed": 0})
    assert counts == [3]
    assert len(await stored(broker, "sc2")) == 3000


async def test_two_doors_racing_to_create_the_stream_share_it(broker: Broker, store: ControlledStore) -> None:
    store.slow_create = True
    first, second = TsdbStream(broker, "p1", "tsdb"), TsdbStream(broker, "p1", "tsdb")
    (c1, r1), (c2, r2) = await asyncio.gather(first.ensure(), second.ensure())
    assert c1.stream_id == c2.stream_id and c1.partition_count == 8
    assert r1.stream_id == r2.stream_id == c1.stream_id
    assert [c.stream_name for c in (await broker.list_streams(project="p1")).streams] == ["tsdb"]


async def test_a_typed_stream_under_the_tsdb_name_is_refused(client: TestClient, broker: Broker) -> None:
    schema = build_schema({"columns": [{"name": "a", "type": "int"}]})
    await broker.create_stream("tsdb", 1, schema=schema)
    status, body = await post(client, [point("ty", 1)], "?details")
    assert status == 400 and body["reason"] == "INVALID_REQUEST"
    assert "typed stream" in body["error"]["message"] and "--tsdb-stream" in body["error"]["message"]


async def test_a_point_with_huge_tags_fails_alone_and_fixes_no_type(client: TestClient, broker: Broker) -> None:
    """Tags are limited like the metric (255 bytes each), so no valid point comes near the record
    limit (16 tags of 255 + 255 bytes, a 255-byte metric and a 20 KB string: ~29 KB)."""
    huge = {"a": "x" * 600_000, "b": "y" * 600_000}
    sent = [point("big", 1, **huge), point("big", 2)]
    status, body = await post(client, sent, "?details")
    assert status == 400 and body["success"] == 1
    assert body["errors"] == [{"datapoint": sent[0], "error": "Tag value too long"}]
    _, registry = await TsdbStream(broker, "default", "tsdb").lookup()
    assert registry is not None and registry.type_of(series_key("big", huge)) is None


# -- the write limit and new series' types ----------------------------------------------------------

async def test_a_point_the_write_limit_refuses_does_not_fix_its_series_type(broker: Broker, client: TestClient) -> None:
    """A type is fixed by the first point accepted (spec section 2). The types of new series were
    stored before the append, which the write limit could then refuse: the series held "string"
    with no point, and a number put later was a type mismatch (the tsdb probe). The limit is asked
    first now; a series whose partition it refuses gets no type."""
    now = [0.0]
    throttle = broker.writes._throttle = PartitionThrottle(5, 0, lambda: now[0])
    key = series_key("th", {"s": "0"})
    p = series_partition(key, 8)
    assert await post(client, [point("th", 1, host="warm")]) == (204, None)   # the stream is made
    config = broker.catalogue.get("default", "tsdb")
    # the bucket of series th{s=0}'s partition taken into debt: its points are refused
    assert throttle.admit_whole(config.stream_id, p, 100, 100)
    assert not throttle.admit_whole(config.stream_id, p, 1, 1)
    status, body = await post(client, [point("th", "down", s="0"), point("th", 5, s="0")], "?details")
    assert status == 400 and body["success"] == 0
    # both the partition's refusal: the number was not refused for a type the series never got
    assert [e["error"] for e in body["errors"]] == [body["errors"][0]["error"]] * 2
    assert body["errors"][0]["error"].startswith("Storage exception: ")
    now[0] += 100   # the buckets refill
    status, body = await post(client, [point("th", 42, s="0")], "?details")
    assert (status, body) == (200, {"success": 1, "failed": 0, "errors": []})
    assert [r["value"] for r in await stored(broker, "th") if r["tags"] == {"s": "0"}] == [42]
    status, body = await post(client, [point("th", "later", s="0")], "?details")
    assert body["errors"][0]["error"] == "Unable to parse value to a number", body   # the number's type holds
