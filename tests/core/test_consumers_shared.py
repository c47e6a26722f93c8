"""Apps on a store several brokers share (the JetStream store): two `Consumers` on one store play
two brokers, and a store that suspends in its metadata calls makes their creations interleave."""
from __future__ import annotations

import asyncio
import time

import pytest

from broker.core.catalogue import StreamCatalogue
from broker.core.consumers import Consumers
from broker.core.limits import Limits
from broker.errors import ClientError, ErrorCode
from broker.storage.memory import MemoryStore


class YieldingStore(MemoryStore):
    """A scan suspends after reading, a compare-and-set before writing: a create's scan -> write
    window lets the other broker's create run."""

    async def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        rows = await super().meta_scan(prefix)
        await asyncio.sleep(0)
        return rows

    async def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        await asyncio.sleep(0)
        return await super().meta_cas(key, expected, new)


def _broker(store: MemoryStore) -> Consumers:
    limits = Limits()
    now = lambda: int(time.time() * 1000)   # noqa: E731
    return Consumers(StreamCatalogue(store, limits, now), store, limits, now)


async def test_the_same_app_created_on_two_brokers_at_once_is_created_once() -> None:
    """Both found the name absent and both wrote: two 'created' answers, the second app's id
    silently replacing the first's."""
    store = YieldingStore()
    a, b = _broker(store), _broker(store)
    outcomes = await asyncio.gather(a.create_app("p", "app"), b.create_app("p", "app"), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, ClientError)]
    created = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(created) == 1 and len(refused) == 1 and refused[0].code is ErrorCode.APP_EXISTS
    assert (await b.describe_app("p", "app")).app_id == created[0].app_id
    with pytest.raises(ClientError) as again:
        await a.create_app("p", "app")
    assert again.value.code is ErrorCode.APP_EXISTS
