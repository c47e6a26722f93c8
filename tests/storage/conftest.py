"""Storage fixtures: one single-node `nats-server -js` for the session (a port and a store dir of its
own, max_payload 8 MB as the README asks of a JetStream store's servers), started only when a test
uses the JetStream store; each store gets a prefix of its own, whose JetStream streams and KV bucket
are deleted afterwards."""
from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import nats
import pytest

from broker.storage.jetstream import JetStreamStore
from tests.sources.conftest import NatsServer

__all__ = ["NatsServer", "delete_prefix", "delete_prefix_sync", "fresh_prefix", "jetstream_server"]

_prefixes = itertools.count(1)


def nats_config(dir_: Path) -> Path:
    conf = dir_ / "nats.conf"
    conf.write_text("max_payload: 8MB\n")
    return conf


@pytest.fixture(scope="session")
def jetstream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    base = tmp_path_factory.mktemp("jetstream")
    server = NatsServer(base / "store", extra=("-c", str(nats_config(base)))).start()
    yield server
    server.stop()


def fresh_prefix() -> str:
    return f"t{os.getpid()}x{next(_prefixes)}"


async def delete_prefix(url: str, prefix: str) -> None:
    """Every JetStream stream of a store prefix (partitions and the KV bucket's)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith(prefix + "_") or name == f"KV_{prefix}_meta":
                await js.delete_stream(name)
    finally:
        await nc.close()


def delete_prefix_sync(url: str, prefix: str) -> None:
    asyncio.run(delete_prefix(url, prefix))


@pytest.fixture
async def opener(jetstream_server: NatsServer) -> AsyncIterator[Callable[[], Awaitable[JetStreamStore]]]:
    """Opens JetStream stores on one fresh prefix (several brokers of one deployment); all closed
    afterwards and the prefix's streams and bucket deleted."""
    prefix = fresh_prefix()
    opened: list[JetStreamStore] = []

    async def open_() -> JetStreamStore:
        s = await JetStreamStore.open([jetstream_server.url], prefix=prefix, replicas=1)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()
    await delete_prefix(jetstream_server.url, prefix)
