"""A stream deleted while a write was queued: STREAM_NOT_FOUND only when nothing of it was written.
On a store that appends partitions apart (JetStream), some partitions may be written to the
deleted stream before the others find it gone; the broker retried such a request against the
stream made again under the name (Broker.put_records, Timeplus ingest) and stored those records
twice (the review of the cross-broker fixes). Now that is UNAVAILABLE: the client sends it again."""
from __future__ import annotations

from typing import Sequence

import pytest

from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode
from broker.model import AppendBatch, PutEntry
from broker.storage.base import AppendOutcome
from broker.storage.memory import MemoryStore


class GoneUnder(MemoryStore):
    """Appends the batches of the partitions in `written`; the others find the stream gone."""
    written: set[int] | None = None

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        if self.written is None:
            return await super().append(batches)
        kept = [b for b in batches if b.partition in self.written]
        firsts = iter(await super().append(kept))
        return [next(firsts) if b.partition in self.written else None for b in batches]


@pytest.mark.parametrize(("written", "code"), [(set(), ErrorCode.STREAM_NOT_FOUND), ({0}, ErrorCode.UNAVAILABLE)])
async def test_a_write_the_store_found_the_stream_gone_for(written: set[int], code: ErrorCode) -> None:
    store = GoneUnder()
    broker = Broker(store, cursor_secret=b"g" * 32)
    await broker.start()
    try:
        await broker.create_stream("s", 2)
        store.written = written
        entries = [PutEntry(b"a", partition_id="0"), PutEntry(b"b", partition_id="1")]
        for write in (lambda: broker.put_records("s", entries),
                      lambda: broker.append_rows("s", [b"{}"] * 64),
                      lambda: broker.append_partitioned("s", {0: ([b"x"], 0), 1: ([b"y"], 0)})):
            with pytest.raises(BrokerError) as err:
                await write()
            assert err.value.code is code, err.value
    finally:
        await broker.close()
