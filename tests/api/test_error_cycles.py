"""A refused request leaves no reference cycle behind. The broker's collector settings
(broker/malloc.settle_gc) make full collections rare, so garbage in a cycle lives on; an error
kept in a local of a frame its own traceback holds (a middleware counting it, a body read
refused as too large) kept the request, its body and its decompressed body alive: forty 20 KB
gzip bodies that inflate past the cap took a broker from 95 MB to 1.7 GB of memory for minutes.

Checked with the collector off: what reference counting does not free is still there to find."""
from __future__ import annotations

import gc
import gzip
import weakref
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.api.grpc_service import rpc
from broker.api.http_app import build_http_app
from broker.auth.roles import Action
from broker.core.broker import Broker
from broker.core.stats import BrokerStats
from broker.errors import BrokerError, ErrorCode, client_error
from broker.storage.memory import MemoryStore


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    store = MemoryStore()
    b = Broker(store, cursor_secret=b"cycles-test")
    await b.start()
    yield b
    await b.close()
    await store.close()


@pytest.fixture
async def client(broker: Broker) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_http_app(broker, body_timeout_s=5))) as c:
        yield c


def _errors_alive() -> list[str]:
    return [type(o).__name__ for o in gc.get_objects()
            if isinstance(o, (BrokerError, orjson.JSONDecodeError, web.HTTPRequestEntityTooLarge))]


@pytest.mark.parametrize("body, headers, status", [
    (b'{"stream_name": "' + b"x" * 1_000_000, {}, 400),                                   # malformed JSON
    (gzip.compress(b'{"stream_name": "' + b"A" * 20_000_000 + b'"}'), {"Content-Encoding": "gzip"}, 413),
    (orjson.dumps({"stream_name": "nope", "records": [{"data": "eA=="}]}), {}, 400),    # no such stream
], ids=["malformed JSON", "inflates past the cap", "refused by the core"])
async def test_a_refused_http_request_leaves_no_cycle(client: TestClient, no_collector: None, body: bytes,
                                                      headers: dict[str, str], status: int) -> None:
    for _ in range(3):
        reply = await client.post("/v2/p1/records", data=body, headers={"Content-Type": "application/json",
                                                                        **headers})
        assert reply.status == status, await reply.text()
        await reply.read()
    assert _errors_alive() == []


async def test_a_refused_grpc_call_leaves_no_cycle(no_collector: None) -> None:
    made: list[weakref.ref[BrokerError]] = []

    def tracked() -> BrokerError:
        error = client_error(ErrorCode.STREAM_NOT_FOUND, stream="nope")
        made.append(weakref.ref(error))
        return error

    async def describe_stream(self: Any, request: Any, context: Any, project: str) -> Any:
        raise tracked()   # held by no local of a frame in its traceback, as in the core

    class Aborted(Exception):
        pass

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        async def abort(self, code: Any, details: str, trailing_metadata: Any = None) -> None:
            raise Aborted(details)

    servicer = SimpleNamespace(_broker=SimpleNamespace(stats=BrokerStats()), _active=0, _draining=False,
                               _auth=None, _last_activity=0.0)
    wrapped = rpc(Action.DESCRIBE)(describe_stream)   # type: ignore[arg-type]
    try:
        await wrapped(servicer, object(), Context())
    except Aborted:
        pass
    assert made and made[0]() is None
