"""Apps, checkpoints and consumer groups through two brokers of one JetStream deployment (two
`Broker`s in-process, each on its own store of one prefix). One broker's lock orders only its own
calls, so the interleavings below - another broker's delete in the middle of a commit or a
heartbeat - are made deterministic by running that delete from inside the first broker's store
call, at the moment it would otherwise have to be lucky to hit."""
from __future__ import annotations

from typing import Awaitable, Callable

import pytest

from broker.core import apps
from broker.core.broker import Broker
from broker.core.leases import LEASE_PREFIX
from broker.errors import BrokerError, ErrorCode
from broker.model import PutEntry
from broker.storage.jetstream import JetStreamStore
from tests.storage.test_jetstream_watch import two_brokers

Opener = Callable[[], Awaitable[JetStreamStore]]


async def _records(broker: Broker, stream: str, n: int) -> None:
    put = await broker.put_records(stream, [PutEntry(b"r%d" % i, partition_id="0") for i in range(n)])
    assert put.failed_record_count == 0


async def _checkpoint_keys(store: JetStreamStore, app: str) -> list[bytes]:
    return [k for k, _ in await store.meta_scan(apps.checkpoint_prefix("default", app))]


@pytest.mark.parametrize("made_again_first", [False, True], ids=["deleted", "deleted and made again"])
async def test_a_commit_landing_after_another_brokers_delete_is_not_the_new_apps(
        opener: Opener, monkeypatch: pytest.MonkeyPatch, made_again_first: bool) -> None:
    """b's commit found the app, then a deleted it (and made it again) before b's write: the
    checkpoint stayed behind, and the app made again under the name resumed from it (the probe's
    t7: 12 of 40 rounds), skipping records it never read. Now the checkpoint is the deleted app's
    (its app_id), read by no other, taken away by b, and b's commit answers APP_NOT_FOUND."""
    async with two_brokers(opener, monkeypatch) as (a, b, store_b):
        await a.create_stream("s", 1)
        await _records(a, "s", 10)
        await a.create_app("app")
        await b.commit_checkpoint("app", "s", 0, 3)   # b knows the stream and the app

        real_write = store_b.meta_write
        fired = []

        async def delete_first(changes: dict[bytes, bytes | None]) -> None:
            if not fired and any(k.startswith(apps.CHECKPOINT_KIND) for k in changes):
                fired.append(True)
                await a.delete_app("app")        # through the other broker, between b's check and write
                if made_again_first:
                    await a.create_app("app")
            await real_write(changes)
        monkeypatch.setattr(store_b, "meta_write", delete_first)

        try:
            await b.commit_checkpoint("app", "s", 0, 7)
            refusal = None
        except BrokerError as exc:
            refusal = exc.code
        assert fired
        monkeypatch.setattr(store_b, "meta_write", real_write)
        if not made_again_first:
            await a.create_app("app")
        for broker in (a, b):
            assert await broker.get_checkpoint("app", "s", 0) is None
            assert (await broker.describe_app("app")).stream_names == ()
            assert (await broker.list_apps(stream_name="s"))[0] == 0
            with pytest.raises(BrokerError) as err:
                await broker.consumer_state("app", "s")
            assert err.value.code is ErrorCode.APP_NO_CHECKPOINT
        assert await _checkpoint_keys(store_b, "app") == []   # nothing lingers either
        assert refusal is ErrorCode.APP_NOT_FOUND
        # the new app's own commits are its own
        await b.commit_checkpoint("app", "s", 0, 2)
        checkpoint = await a.get_checkpoint("app", "s", 0)
        assert checkpoint is not None and checkpoint.seq == 2


async def test_a_commit_landing_between_another_brokers_scan_and_delete_does_not_linger(
        opener: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: a's delete scanned the app's checkpoints, b's whole commit ran (the app was
    still there), then a deleted the app key. b's checkpoint was not in a's scan and stayed, and
    the app made again under the name inherited it. Now a looks again after the delete."""
    async with two_brokers(opener, monkeypatch) as (a, b, store_b):
        store_a = a.store
        assert isinstance(store_a, JetStreamStore)
        await a.create_stream("s", 1)
        await _records(a, "s", 10)
        await a.create_app("app")
        await b.describe_stream("s")

        real_scan = store_a.meta_scan
        fired = []

        async def commit_meanwhile(prefix: bytes) -> list[tuple[bytes, bytes]]:
            rows = await real_scan(prefix)
            if not fired and prefix == apps.checkpoint_prefix("default", "app"):
                fired.append(True)
                await b.commit_checkpoint("app", "s", 0, 8)   # b: the app is still there
            return rows
        monkeypatch.setattr(store_a, "meta_scan", commit_meanwhile)
        await a.delete_app("app")
        assert fired
        monkeypatch.setattr(store_a, "meta_scan", real_scan)

        await a.create_app("app")
        for broker in (a, b):
            assert await broker.get_checkpoint("app", "s", 0) is None
        assert await _checkpoint_keys(store_b, "app") == []


async def test_a_checkpoint_the_deleted_app_left_is_not_read_by_the_new_one(
        opener: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever way one survives (a broker stopped between its write and its clean-up): a
    checkpoint stored for the deleted app is absent for every reader of the app made again - its
    checkpoint, its streams, its consumer state, the lag metrics - and the new app's own commit
    replaces it."""
    async with two_brokers(opener, monkeypatch) as (a, b, store_b):
        await a.create_stream("s", 1)
        await _records(a, "s", 10)
        await a.create_app("app")
        await a.commit_checkpoint("app", "s", 0, 6)
        key = (await _checkpoint_keys(store_b, "app"))[0]
        left = await store_b.meta_get(key)
        assert left is not None
        await a.delete_app("app")
        await store_b.meta_write({key: left})      # as if a late commit of the deleted app had landed
        await a.create_app("app")
        assert await b.get_checkpoint("app", "s", 0) is None
        assert (await b.describe_app("app")).stream_names == ()
        assert (await b.consumers.lag_snapshot(100)) == ([], 0)
        with pytest.raises(BrokerError) as err:
            await b.consumer_state("app", "s")
        assert err.value.code is ErrorCode.APP_NO_CHECKPOINT
        await b.commit_checkpoint("app", "s", 0, 1)
        assert [s.checkpoint.seq for s in (await a.consumer_state("app", "s"))[0] if s.checkpoint] == [1]
        assert (await a.consumers.lag_snapshot(100))[0] == [("default", "app", "s", 0, 8)]


async def test_a_heartbeat_landing_after_another_brokers_delete_holds_nothing_of_the_new_app(
        opener: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """m1's heartbeat through b found the app, then a deleted it (dropping its leases) and made it
    again before b wrote m1's leases: the new app's first member m2 was granted nothing until
    m1's leases ran out. Groups are the app's incarnation's now: m2 gets every partition."""
    async with two_brokers(opener, monkeypatch) as (a, b, store_b):
        await a.create_stream("s", 4)
        await a.create_app("app")
        assert (await b.heartbeat("app", "s", "m1"))[0] == [0, 1, 2, 3]

        real_cas = store_b.meta_cas
        fired = []

        async def delete_first(key: bytes, expected: bytes | None, new: bytes | None) -> bool:
            if not fired and key.startswith(LEASE_PREFIX):
                fired.append(True)
                await a.delete_app("app")
                await a.create_app("app")
            return await real_cas(key, expected, new)
        monkeypatch.setattr(store_b, "meta_cas", delete_first)
        # another lease: the state written differs even within the first heartbeat's millisecond
        # (an unchanged state is not written, and the delete would never have fired)
        await b.heartbeat("app", "s", "m1", held=[0, 1, 2, 3], lease_ms=20_000)
        assert fired
        monkeypatch.setattr(store_b, "meta_cas", real_cas)

        assert (await a.heartbeat("app", "s", "m2"))[0] == [0, 1, 2, 3]


async def test_a_commit_through_a_broker_not_yet_told_of_the_record_is_taken(
        opener: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """b has not heard of a's append yet (its notification on the way; here never): a checkpoint
    at the record a just acknowledged was refused SEQUENCE_OUT_OF_RANGE - final for a client - from
    b's cached partition head. b now asks the store before it refuses."""
    async with two_brokers(opener, monkeypatch, "_on_append") as (a, b, _):
        await a.create_stream("rw", 1)
        await a.create_app("app")
        await _records(a, "rw", 1)
        await b.commit_checkpoint("app", "rw", 0, 0)          # b's head of the partition: 1 record
        await _records(a, "rw", 1)
        await b.commit_checkpoint("app", "rw", 0, 1)
        checkpoint = await a.get_checkpoint("app", "rw", 0)
        assert checkpoint is not None and checkpoint.seq == 1
        with pytest.raises(BrokerError) as err:                 # past every broker's records: refused
            await b.commit_checkpoint("app", "rw", 0, 2)
        assert err.value.code is ErrorCode.SEQUENCE_OUT_OF_RANGE
