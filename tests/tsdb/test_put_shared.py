"""The tsdb series-type registry on a shared store: two brokers (two Broker objects, each on its
own JetStreamStore over one single-node nats-server and one prefix) racing to admit two types for
the same new series. A type is claimed with meta_cas (create if absent): one claim wins on both
brokers, the other broker refuses its point as a type conflict, and no series holds two types."""
from __future__ import annotations

import asyncio
import io
import json
from typing import Any, AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.api.http_app import build_http_app
from broker.core.broker import Broker
from broker.storage.jetstream import JetStreamStore
from broker.tsdb.series import TsdbStream, series_key
from tests.storage.conftest import NatsServer, delete_prefix, fresh_prefix, jetstream_server  # noqa: F401

NOW_S = 1_700_000_000
SERIES = 24


@pytest.fixture
async def two_brokers(jetstream_server: NatsServer) -> AsyncIterator[list[tuple[Broker, TestClient]]]:
    prefix = fresh_prefix()
    out: list[tuple[Broker, TestClient]] = []
    try:
        for i in range(2):
            store = await JetStreamStore.open([jetstream_server.url], prefix=prefix, replicas=1)
            broker = Broker(store)
            await broker.start()
            if i == 0:   # the tsdb stream exists before the second broker loads its catalogue
                await broker.create_stream("tsdb", 4, data_type="JSON", project="default")
            app = build_http_app(broker, body_timeout_s=10, tsdb_stream=TsdbStream(broker, "default", "tsdb"))
            client = TestClient(TestServer(app))
            await client.start_server()
            out.append((broker, client))
        yield out
    finally:
        for broker, client in out:
            await client.close()
            await broker.close()
            await broker.store.close()
        await delete_prefix(jetstream_server.url, prefix)


async def put(client: TestClient, points: list[dict[str, Any]]) -> dict[str, Any]:
    resp = await client.post("/api/put?details", data=io.BytesIO(json.dumps(points).encode()))
    return dict(await resp.json())


async def test_two_brokers_racing_two_types_for_one_series_one_wins_everywhere(
        two_brokers: list[tuple[Broker, TestClient]]) -> None:
    (a, ca), (b, cb) = two_brokers
    numeric = [{"metric": "race", "timestamp": NOW_S, "value": 1, "tags": {"s": str(i)}} for i in range(SERIES)]
    text = [{"metric": "race", "timestamp": NOW_S + 1, "value": "up", "tags": {"s": str(i)}} for i in range(SERIES)]
    # one request per series and broker, all at once: every series raced by both brokers
    # (in alternating order: the first request of a pair is sent first)
    calls = [(put(ca, [numeric[i]]), put(cb, [text[i]]))[::1 if i % 2 else -1] for i in range(SERIES)]
    answers = await asyncio.gather(*(c for pair in calls for c in pair))
    pairs = [answers[2 * i:2 * i + 2][::1 if i % 2 else -1] for i in range(SERIES)]
    on_a, on_b = [p[0] for p in pairs], [p[1] for p in pairs]
    wins = {"numeric": 0, "string": 0}
    for i in range(SERIES):
        ok_a, ok_b = on_a[i]["success"] == 1, on_b[i]["success"] == 1
        assert ok_a != ok_b, (i, on_a[i], on_b[i])                 # exactly one of the two types went in
        loser = on_b[i] if ok_a else on_a[i]
        assert loser["failed"] == 1 and loser["errors"][0]["error"] in (   # the single broker's type conflicts
            "Unable to parse value to a number", "Value type mismatch: series holds string values"), loser
        wins["numeric" if ok_a else "string"] += 1
        key = series_key("race", {"s": str(i)})
        _, reg_a = await TsdbStream(a, "default", "tsdb").ensure()
        _, reg_b = await TsdbStream(b, "default", "tsdb").ensure()
        assert reg_a.type_of(key) == reg_b.type_of(key) == ("numeric" if ok_a else "string")
    print(f"wins: {wins}")
    # and afterwards both brokers refuse the losing type and take the winning one
    for i in range(SERIES):
        for _, client in two_brokers:
            again = await put(client, [numeric[i] | {"timestamp": NOW_S + 2}, text[i] | {"timestamp": NOW_S + 3}])
            assert again["success"] == 1 and again["failed"] == 1, again
