"""/healthz and /readyz in-process: ready only while the doors listen, the store takes writes and
the broker is not shutting down; /healthz answers throughout. The collector's families in-process:
verbs of the Timeplus and OpenTSDB doors, open subscriptions, sources' counters and status."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.api import metrics
from broker.api.http_app import build_http_app
from broker.core.broker import Broker
from broker.model import PutEntry
from broker.sources.manager import Sources
from broker.storage.base import StorageState
from broker.storage.memory import MemoryStore


class SwitchableStore(MemoryStore):
    """A memory store whose storage state the test sets (a full disk without filling one)."""

    state = StorageState.OK

    @property
    def storage_state(self) -> StorageState:
        return self.state


@pytest.fixture
async def store() -> AsyncIterator[SwitchableStore]:
    s = SwitchableStore()
    yield s
    await s.close()


@pytest.fixture
async def broker(store: SwitchableStore) -> AsyncIterator[Broker]:
    b = Broker(store, cursor_secret=b"health-test")
    await b.start()
    yield b
    await b.close()


async def test_readiness_follows_the_store_and_shutdown(broker: Broker, store: SwitchableStore) -> None:
    health = metrics.Health(broker)
    exporter = metrics.Exporter(metrics.BrokerCollector(broker), health)
    async with TestClient(TestServer(build_http_app(broker, body_timeout_s=5, exporter=exporter))) as client:
        async def status(path: str) -> tuple[int, str]:
            reply = await client.get(path)
            return reply.status, (await reply.json())["status"]

        assert await status("/readyz") == (503, "starting")   # doors not listening yet
        health.listening = True
        assert await status("/readyz") == (200, "ready")
        store.state = StorageState.FULL
        assert await status("/readyz") == (503, "storage full")
        assert await status("/healthz") == (200, "ok")
        store.state = StorageState.OK
        assert await status("/readyz") == (200, "ready")
        health.stopping = True   # app.py's first step at a stop (it said "starting" until the broker's)
        assert await status("/readyz") == (503, "shutting down")
        health.stopping = False
        broker.begin_shutdown()
        assert await status("/readyz") == (503, "shutting down")
        assert await status("/healthz") == (200, "ok")


def families(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_doors_subscriptions_and_sources(broker: Broker) -> None:
    sources = Sources(broker)
    await sources.start()
    app = build_http_app(broker, body_timeout_s=5, sources=sources)
    async with TestClient(TestServer(app)) as client:
        await broker.create_stream("typed", 1)
        reply = await client.post("/api/put", json=[{"metric": "m", "timestamp": 1_700_000_000, "value": 1,
                                                     "tags": {"h": "a"}}])
        assert reply.status == 204, await reply.text()
        reply = await client.get("/api/v1beta2/streams")
        assert reply.status == 200, await reply.text()
        source = await sources.create("default", {"name": "gen", "type": "stream_generator", "stream": "typed",
                                                  "properties": {"template": "iot", "interval": "1s"}})
        cursor = await broker.get_cursor("typed", "0", "LATEST")
        subscription = broker.subscribe(cursor, max_wait_ms=0)
        pending = asyncio.ensure_future(subscription.__anext__())
        await asyncio.sleep(0)
        text = await (await client.get("/metrics")).text()
        m = families(text)
        assert m[("sluice_subscriptions_open", frozenset())] == 1
        assert m[("sluice_request_duration_seconds_count", frozenset({("door", "tsdb"), ("verb", "put")}))] == 1
        assert m[("sluice_request_duration_seconds_count",
                  frozenset({("door", "timeplus"), ("verb", "list_streams")}))] == 1
        names = {("project", "default"), ("source", "gen"), ("type", "stream_generator"), ("stream", "typed")}
        assert ("sluice_source_rows_written_total", frozenset(names)) in m
        assert sum(v for (n, labels), v in m.items() if n == "sluice_source_status" and ("source", "gen") in labels) \
            == 1
        pending.cancel()
        await subscription.aclose()
        m = families(await (await client.get("/metrics")).text())
        assert m[("sluice_subscriptions_open", frozenset())] == 0
        await sources.delete("default", source.definition.id)
    await sources.close()


async def test_partition_series_follow_scaling(broker: Broker) -> None:
    """A scale-down keeps the DELETED partition's series (readable until retention); a scale-up
    adds the new partition's; the DIS series answers for both."""
    async with TestClient(TestServer(build_http_app(broker, body_timeout_s=5))) as client:
        await broker.create_stream("sc", 3)
        await broker.put_records("sc", [PutEntry(b"abc", partition_id="2")])
        await broker.update_partition_count("sc", 2)
        m = families(await (await client.get("/metrics")).text())
        labels = {("project", "default"), ("stream", "sc")}
        assert m[("sluice_stream_partitions", frozenset(labels))] == 2
        assert m[("sluice_records_in_total", frozenset(labels | {("partition", "2")}))] == 1
        await broker.update_partition_count("sc", 4)
        await broker.put_records("sc", [PutEntry(b"abcd", partition_id="3")])
        m = families(await (await client.get("/metrics")).text())
        assert m[("sluice_stream_partitions", frozenset(labels))] == 4
        assert m[("sluice_bytes_in_total", frozenset(labels | {("partition", "3")}))] == 4
        now_s = int(__import__("time").time())
        got = await broker.stream_metrics("sc", "total_put_bytes_per_partition", None, now_s - 60, now_s, "3")
        assert sum(v for _, v in got["total_put_bytes_per_partition"]) == 4


async def test_a_scrape_of_many_partitions_does_not_stall_the_event_loop() -> None:
    """/metrics of 20,480 partitions (81,920 series, a few hundred ms of formatting) is made off the
    event loop: a ticker on the loop keeps ticking while it runs. (It held the loop for the whole
    scrape: /healthz on the same port waited 0.5 s at 20,000 partitions, 2 s at 100,000.)"""
    b = Broker(MemoryStore(), cursor_secret=b"scrape-test")
    await b.start()
    try:
        for i in range(80):
            await b.create_stream(f"s{i}", 256)
        exporter = metrics.Exporter(metrics.BrokerCollector(b), metrics.Health(b))
        async with TestClient(TestServer(build_http_app(b, body_timeout_s=5, exporter=exporter))) as client:
            gaps: list[float] = []
            done = asyncio.Event()

            async def tick() -> None:
                loop = asyncio.get_running_loop()
                last = loop.time()
                while not done.is_set():
                    await asyncio.sleep(0.001)
                    now = loop.time()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.ensure_future(tick())
            loop = asyncio.get_running_loop()
            began = loop.time()
            reply = await client.get("/metrics")
            text = await reply.text()
            took = loop.time() - began
            done.set()
            await ticker
        assert reply.status == 200 and text.count('sluice_records_in_total{') == 80 * 256
        # stalled, the longest gap would be the whole scrape; off the loop, a few switch intervals
        assert max(gaps) < took / 2, (max(gaps), took)
    finally:
        await b.close()


async def test_an_admin_key_s_lag_series_are_its_project_s_whatever_other_projects_hold(
        broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lag series are capped per scrape: the cap (and the count left out) is over the scraping
    key's project, so other projects' checkpoints neither crowd its series out nor show in the count."""
    from broker.auth import Auth

    monkeypatch.setattr(metrics, "MAX_LAG_SERIES", 2)
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text('[[api_keys]]\nkey = "key-of-p2"\nworkspace = "p2"\nrole = "admin"\n')
    for project, partitions in (("a", 3), ("p2", 1)):   # "a" sorts first in the store
        await broker.create_stream("s", partitions, project=project)
        await broker.create_app("app", project=project)
        for p in range(partitions):
            await broker.put_records("s", [PutEntry(b"x", partition_id=str(p))] * 2, project=project)
            await broker.commit_checkpoint("app", "s", str(p), "0", project=project)
    async with TestClient(TestServer(build_http_app(broker, body_timeout_s=5, auth=Auth(str(auth_file))))) as client:
        reply = await client.get("/metrics", headers={"X-Api-Key": "key-of-p2"})
        assert reply.status == 200, await reply.text()
        m = families(await reply.text())
    lag = {labels: v for (n, labels), v in m.items() if n == "sluice_consumer_lag_records"}
    assert lag == {frozenset({("project", "p2"), ("app", "app"), ("stream", "s"), ("partition", "0")}): 1}
    assert m[("sluice_consumer_lag_series_left_out", frozenset())] == 0
