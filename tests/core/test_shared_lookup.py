"""Verbs on a store several brokers share, of a stream created through another broker a moment
ago (its event still on the way): each looks the name up in the store (Broker._known) as every
other stream verb does, instead of answering STREAM_NOT_FOUND from its own catalogue. Two Brokers
over one MemoryStore marked shared, which delivers no events: the second never hears of the stream
but by looking it up."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.api.http_app import build_http_app
from broker.core.broker import Broker
from broker.model import ColumnDef, PutEntry, StreamConfig, StreamSchema
from broker.storage.base import Durability, StoreCapabilities
from broker.storage.memory import MemoryStore

P = "p"


class SharedMemoryStore(MemoryStore):
    capabilities = StoreCapabilities(Durability.NONE, shared=True)

    async def find_stream(self, project: str, stream_name: str) -> StreamConfig | None:
        return next((c for c in await self.list_streams() if (c.project, c.stream_name) == (project, stream_name)),
                    None)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Broker, Broker]]:
    store = SharedMemoryStore()
    a, b = Broker(store, cursor_secret=b"k" * 32), Broker(store, cursor_secret=b"k" * 32)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


async def _made_through_a(a: Broker, b: Broker) -> None:
    await a.create_stream("s", 2, project=P, schema=StreamSchema((ColumnDef("n", "int64"),)))
    await a.create_app("app", project=P)
    await a.put_records("s", [PutEntry(b'{"n":1}', partition_id="0")], project=P)
    await a.commit_checkpoint("app", "s", "0", "0", project=P)
    assert b.catalogue.lookup(P, "s") is None   # B has not heard of it


async def test_get_checkpoint(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    await _made_through_a(a, b)
    checkpoint = await b.get_checkpoint("app", "s", "0", project=P)
    assert checkpoint is not None and checkpoint.seq == 0


async def test_delete_checkpoint(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    await _made_through_a(a, b)
    await b.delete_checkpoint("app", "s", "0", project=P)
    assert await a.get_checkpoint("app", "s", "0", project=P) is None


async def test_stream_metrics(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    await _made_through_a(a, b)
    now_s = int(time.time())
    series = await b.stream_metrics("s", "total_put_records_per_stream", None, str(now_s - 60), str(now_s + 60),
                                    project=P)
    assert "total_put_records_per_stream" in series


async def test_timeplus_sql_analyze(pair: tuple[Broker, Broker]) -> None:
    """The timeplus SDK's dbapi analyzes a query before it runs it: the run looked the stream up
    (Queries.start), the analysis did not."""
    a, b = pair
    await _made_through_a(a, b)
    async with TestClient(TestServer(build_http_app(b, body_timeout_s=5))) as client:
        reply = await client.post(f"/{P}/api/v1beta2/sqlanalyze", json={"sql": "select n from table(s)"})
        assert reply.status == 200, await reply.text()


async def test_a_source_created_through_b_runs_and_writes(pair: tuple[Broker, Broker]) -> None:
    """4ae6821's fix, without the race of tests/e2e/test_jetstream_brokers.py (there A's event may
    reach B before B is asked, and the test passes without the fix): B's check of the stream and
    B's sink both look it up."""
    from broker.sources.generator import TEMPLATE_COLUMNS
    from broker.sources.manager import Sources

    a, b = pair
    await a.create_stream("t", 1, project=P,
                          schema=StreamSchema(tuple(ColumnDef(n, c) for n, c in TEMPLATE_COLUMNS["iot"])))
    sources = Sources(b)
    await sources.start()
    try:
        await sources.create(P, {"name": "g", "type": "stream_generator", "stream": "t",
                                 "properties": {"template": "iot", "interval": "10ms"}})
        stream_id = a.catalogue.get(P, "t").stream_id
        for _ in range(500):
            if (await a.store.bounds(stream_id, 0)).next_seq >= 3:
                break
            await asyncio.sleep(0.01)
        assert (await a.store.bounds(stream_id, 0)).next_seq >= 3, sources.get(P, "g").state
    finally:
        await sources.close()


async def test_an_opentsdb_query_through_b_of_points_put_through_a(pair: tuple[Broker, Broker]) -> None:
    """A's first put creates the tsdb stream; B's query found no stream in its own catalogue and
    answered [] (its series registry catches up with other brokers' series, its stream lookup did not)."""
    from broker.tsdb.series import TsdbStream

    a, b = pair
    point = {"metric": "m", "timestamp": 1_700_000_000, "value": 1, "tags": {"h": "a"}}
    apps = [build_http_app(x, body_timeout_s=5, tsdb_stream=TsdbStream(x, "default", "tsdb")) for x in (a, b)]
    async with TestClient(TestServer(apps[0])) as ca, TestClient(TestServer(apps[1])) as cb:
        assert (await ca.post("/api/put", json=[point])).status == 204
        assert b.catalogue.lookup("default", "tsdb") is None   # B has not heard of it
        reply = await cb.get("/api/query?start=1699999000&end=1700001000&m=sum:m")
        assert reply.status == 200, await reply.text()
        assert [s["dps"] for s in await reply.json()] == [{"1700000000": 1}]
        reply = await cb.get("/api/suggest?type=metrics&q=")
        assert await reply.json() == ["m"]
