"""What only the JetStream store must get right (the contract and stateful suites cover the rest):
two stores appending to one partition at once, a publish whose outcome is unknown, a server that
goes away, a batch larger than the server takes."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from broker.errors import BrokerError, ErrorCode
from broker.model import AppendBatch, StreamConfig
from broker.storage import jetstream
from broker.storage.base import StorageState
from broker.storage.jetstream import JetStreamStore, _Unknown, meta_key_of, meta_kv_key
from tests.storage.conftest import NatsServer, delete_prefix, fresh_prefix, nats_config

BIG = 1 << 30


@pytest.fixture
async def opener(jetstream_server: NatsServer) -> AsyncIterator[Callable[[], Awaitable[JetStreamStore]]]:
    """Opens stores on one fresh prefix (several brokers of one deployment); all closed afterwards."""
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


def test_meta_keys_encode_to_kv_tokens_and_back() -> None:
    for key in (b"", b"a", b"\x00\xff", b"12345678", b"123456789", bytes(range(256))):
        encoded = meta_kv_key(key)
        assert meta_key_of(encoded) == key
        assert all(c.isalnum() or c == "." for c in encoded) and not encoded.endswith(".")
    assert meta_kv_key(b"ab") == "m.61.62"
    assert meta_kv_key(b"abcdefghij") == "m.61.62.63.64.65.66.67.68.696a"


async def test_two_stores_appending_to_one_partition_never_share_a_seq(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """Two brokers' stores, each with its own head cache, appending to the same partition at once:
    every batch gets consecutive seqs, no two batches overlap, nothing is lost or stored twice."""
    a = await opener()
    sid = (await a.create_stream(StreamConfig("shared", 1))).stream_id
    b = await opener()   # opened after the create: it knows the stream from the catalogue
    told: dict[bytes, int] = {}   # payload -> the seq its store reported

    async def producer(store: JetStreamStore, name: bytes, rounds: int) -> None:
        for i in range(rounds):
            items = [(None, name + b"-%d-%d" % (i, j)) for j in range(1 + i % 3)]
            (first,) = await store.append([AppendBatch(sid, 0, 1000 + i, items)])
            assert isinstance(first, int)
            for j, (_, data) in enumerate(items):
                told[data] = first + j

    await asyncio.gather(producer(a, b"a", 150), producer(b, b"b", 150))
    assert a.renumbered + b.renumbered > 0, "the two writers never raced: the test proved nothing"
    fresh = await opener()   # a third broker, nothing cached
    records = await fresh.read(sid, 0, 0, BIG, BIG)
    assert [r.seq for r in records] == list(range(len(told)))                  # gap-free from 0
    assert {r.data: r.seq for r in records} == told                            # each where its store said, once
    assert (await fresh.bounds(sid, 0)).next_seq == len(told)
    stamps = [r.timestamp_ms for r in records]
    assert stamps == sorted(stamps)                                            # time never goes back


async def test_an_unknown_outcome_that_was_stored_is_settled_by_its_duplicate(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The publish reached JetStream but its ack was lost: the store publishes the same message
    again, JetStream answers with a duplicate ack, and the append reports the original seqs."""
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    assert await store.append([AppendBatch(sid, 0, 1, [(None, b"before")])]) == [0]
    real = store._request_publish
    calls: list[dict[str, str]] = []

    async def ack_lost(subject: str, body: bytes, headers: dict[str, str]) -> int:
        calls.append(dict(headers))
        seq = await real(subject, body, headers)
        if len(calls) == 1:
            raise _Unknown(TimeoutError("ack lost"))
        return seq

    monkeypatch.setattr(store, "_request_publish", ack_lost)
    assert await store.append([AppendBatch(sid, 0, 2, [(None, b"x"), (None, b"y")])]) == [1]
    assert len(calls) == 2 and calls[0] == calls[1]                  # the very same message, msg id and all
    assert store.settled == 1
    monkeypatch.undo()
    assert [r.data for r in await store.read(sid, 0, 0, BIG, BIG)] == [b"before", b"x", b"y"]   # once
    assert await store.append([AppendBatch(sid, 0, 3, [(None, b"z")])]) == [3]


async def test_an_unknown_outcome_that_was_not_stored_is_published_once(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    real = store._request_publish
    calls = 0

    async def lost_on_the_way(subject: str, body: bytes, headers: dict[str, str]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise _Unknown(TimeoutError("never arrived"))
        return await real(subject, body, headers)

    monkeypatch.setattr(store, "_request_publish", lost_on_the_way)
    assert await store.append([AppendBatch(sid, 0, 2, [(None, b"x")])]) == [0]
    assert [r.data for r in await store.read(sid, 0, 0, BIG, BIG)] == [b"x"]


async def test_an_unknown_outcome_whose_slot_another_writer_took_is_renumbered(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours never arrived and another broker appended meanwhile: republishing fails the expected
    last sequence, the message after the expected one is not ours (msg id), so ours was not
    stored - it is renumbered after the other writer's, never reported failed, never doubled."""
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    other = await opener()
    real = store._request_publish
    calls = 0

    async def lost_while_another_writes(subject: str, body: bytes, headers: dict[str, str]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            assert await other.append([AppendBatch(sid, 0, 1, [(None, b"theirs")])]) == [0]
            raise _Unknown(TimeoutError("never arrived"))
        return await real(subject, body, headers)

    monkeypatch.setattr(store, "_request_publish", lost_while_another_writes)
    assert await store.append([AppendBatch(sid, 0, 2, [(None, b"ours1"), (None, b"ours2")])]) == [1]
    assert store.settled == 1 and store.renumbered == 1
    assert [r.data for r in await store.read(sid, 0, 0, BIG, BIG)] == [b"theirs", b"ours1", b"ours2"]


async def test_a_batch_over_the_servers_max_payload_fails_alone(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    huge = b"x" * (store._nc.max_payload + 1)
    outcomes = await store.append([AppendBatch(sid, 0, 1, [(None, b"a")]), AppendBatch(sid, 0, 1, [(None, huge)]),
                                   AppendBatch(sid, 0, 1, [(None, b"b")])])
    assert outcomes[0] == 0 and outcomes[2] == 1
    assert isinstance(outcomes[1], BrokerError) and outcomes[1].code is ErrorCode.REQUEST_TOO_LARGE
    # batches of 3 MB each, 9 MB in one call: split into messages under max_payload (8 MB here)
    big = [AppendBatch(sid, 0, 1, [(None, bytes([65 + i]) * (3 << 20))]) for i in range(3)]
    assert await store.append(big) == [2, 3, 4]
    assert [len(r.data) for r in await store.read(sid, 0, 2, BIG, BIG)] == [3 << 20] * 3


async def test_a_server_that_goes_away_gives_catalogued_errors_and_writes_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a raw nats exception: UNAVAILABLE (retriable) while the server is gone, and the
    storage state FAILED; the same store takes writes again once it is back."""
    monkeypatch.setattr(jetstream, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(jetstream, "SETTLE_S", 1.0)
    server = NatsServer(tmp_path / "store", extra=("-c", str(nats_config(tmp_path)))).start()
    store = await JetStreamStore.open([server.url], prefix="gone", replicas=1)
    try:
        sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
        assert await store.append([AppendBatch(sid, 0, 1, [(None, b"a")])]) == [0]
        server.stop()
        (outcome,) = await store.append([AppendBatch(sid, 0, 2, [(None, b"b")])])
        assert isinstance(outcome, BrokerError) and outcome.code is ErrorCode.UNAVAILABLE, outcome
        assert store.storage_state is StorageState.FAILED   # health and /readyz report it
        for call in (lambda: store.read(sid, 0, 0, 10, BIG), lambda: store.meta_get(b"k"),
                     lambda: store.create_stream(StreamConfig("t", 1))):
            with pytest.raises(BrokerError) as info:
                await call()
            assert info.value.code is ErrorCode.UNAVAILABLE
        server.start()
        for _ in range(100):   # the client reconnects by itself, and the store's probe sees JetStream again
            if store._nc.is_connected and store.storage_state is StorageState.OK:
                break
            await asyncio.sleep(0.1)
        assert store.storage_state is StorageState.OK
        (first,) = await store.append([AppendBatch(sid, 0, 3, [(None, b"c")])])
        records = await store.read(sid, 0, 0, 10, BIG)
        # "b" failed with a retriable error: it may or may not have been stored (the issue allows
        # failing the whole request that way); numbering stays gap-free either way
        assert [r.seq for r in records] == list(range(len(records))) and records[-1].data == b"c"
        assert first == records[-1].seq and records[0].data == b"a"
    finally:
        await store.close()
        server.stop()


async def test_no_server_at_startup_is_unavailable(tmp_path: Path) -> None:
    from tests.sources.conftest import free_port
    with pytest.raises(BrokerError) as info:
        await JetStreamStore.open([f"nats://127.0.0.1:{free_port()}"], prefix="none")
    assert info.value.code is ErrorCode.UNAVAILABLE and "cannot connect" in info.value.message


async def test_numbering_survives_jetstream_expiring_every_message(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """JetStream's max_age backstop may expire a partition's last message, which holds the head.
    After a trim the KV marker holds it: numbering goes on. Records appended after the last trim and
    then expired leave the head unknown: appends fail with UNAVAILABLE rather than reuse a seq."""
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 2))).stream_id
    await store.append([AppendBatch(sid, 0, 100, [(None, b"a"), (None, b"b")]),
                        AppendBatch(sid, 1, 100, [(None, b"x")])])
    await store.trim(sid, 0, 2)                                # everything: the marker holds next_seq 2
    await store._js.purge_stream(store._stream_name(sid, 0))   # as max_age would: every message gone
    await store._js.purge_stream(store._stream_name(sid, 1))   # partition 1 was never trimmed
    fresh = await opener()                                     # a restarted broker: nothing cached
    assert await fresh.bounds(sid, 0) == (2, 2, 100)
    assert await fresh.append([AppendBatch(sid, 0, 200, [(None, b"c")])]) == [2]
    assert [(r.seq, r.data) for r in await fresh.read(sid, 0, 0, 10, BIG)] == [(2, b"c")]
    (lost,) = await fresh.append([AppendBatch(sid, 1, 200, [(None, b"y")])])
    assert isinstance(lost, BrokerError) and lost.code is ErrorCode.UNAVAILABLE and "unknown" in lost.message


async def test_two_stores_racing_meta_cas_lose_no_update(opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """Two brokers' stores incrementing one counter with read -> meta_cas -> retry: the KV
    revision check makes every increment land once, though neither store's lock covers the other."""
    a, b = await opener(), await opener()
    conflicts = 0

    async def bump(store: JetStreamStore, rounds: int) -> None:
        nonlocal conflicts
        for _ in range(rounds):
            while True:
                old = await store.meta_get(b"counter")
                if await store.meta_cas(b"counter", old, str(int(old or b"0") + 1).encode()):
                    break
                conflicts += 1

    await asyncio.gather(*(bump(s, 20) for s in (a, b, a, b)))
    assert await a.meta_get(b"counter") == b"80" and await b.meta_get(b"counter") == b"80"
    print(f"conflicts retried: {conflicts}")


async def test_two_brokers_starting_at_once_agree_on_one_cursor_key(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """The cursor key is created if absent with meta_cas: brokers starting together on an empty
    store end with the same key, so each accepts the other's cursors."""
    from broker.core.broker import Broker

    stores = [await opener() for _ in range(4)]
    brokers = [Broker(s) for s in stores]
    await asyncio.gather(*(br.reads.load_secret() for br in brokers))
    secrets = {br.reads.secret for br in brokers}
    assert len(secrets) == 1 and len(secrets.pop()) == 32
    assert await stores[0].meta_get(b"K") == brokers[0].reads.secret
