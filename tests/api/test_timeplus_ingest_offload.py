"""A Timeplus ingest body's rows are decoded off the event loop once the body is past a small
bound: the cost is per row, and 250 KB of one-letter `lines` (125,000 rows) held the loop ~90 ms
(174 ms on a busy machine) while every other request waited. In-process (aiohttp's test server),
with the decoder wrapped to see which thread ran it; no wall-clock assertion."""
from __future__ import annotations

import threading
from typing import Any, AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.api import timeplus
from broker.api.http_app import build_http_app
from broker.core.broker import Broker
from broker.storage.memory import MemoryStore


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    store = MemoryStore()
    broker = Broker(store, cursor_secret=b"offload-test")
    await broker.start()
    async with TestClient(TestServer(build_http_app(broker, body_timeout_s=5))) as c:
        yield c
    await broker.close()
    await store.close()


@pytest.fixture
def decoded_on(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per decode: whether it ran on the event loop's thread."""
    seen: list[bool] = []
    real = timeplus.decode

    def spy(*args: Any) -> list[bytes]:
        seen.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(timeplus, "decode", spy)
    return seen


async def _rows(client: TestClient, name: str) -> int:
    resp = await client.get(f"/api/v1beta2/streams/{name}/stats")
    assert resp.status == 200, await resp.text()
    return int((await resp.json())["row_count"])


@pytest.mark.parametrize(("rows", "inline"), [(1_000, True), (50_000, False)])
async def test_a_body_of_many_small_rows_is_decoded_off_the_loop(client, decoded_on, rows, inline):
    name = f"lines{rows}"
    columns = [{"name": "raw", "type": "string"}]
    resp = await client.post("/api/v1beta2/streams", json={"name": name, "columns": columns})
    assert resp.status == 201, await resp.text()
    body = b"a\n" * rows   # 2 KB inline; 100 KB (50,000 rows) was decoded on the loop before
    resp = await client.post(f"/api/v1beta2/streams/{name}/ingest?format=lines", data=body,
                             headers={"Content-Type": "text/plain"})
    assert resp.status == 200, await resp.text()
    assert decoded_on == [inline]
    assert await _rows(client, name) == rows
