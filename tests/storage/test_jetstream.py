"""What only the JetStream store must get right (the contract and stateful suites cover the rest):
two stores appending to one partition at once, a publish whose outcome is unknown, a server that
goes away, a batch larger than the server takes."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Awaitable, Callable, cast

import nats.js.errors
import pytest

from broker.errors import BrokerError, ErrorCode
from broker.model import AppendBatch, StreamConfig
from broker.storage import jetstream
from broker.storage.base import OutcomeUnknown, StorageState, Store
from broker.storage.jetstream import JetStreamStore, _Unknown, meta_key_of, meta_kv_key
from tests.storage import test_contract as _contract
from tests.storage.conftest import NatsServer, nats_config

BIG = 1 << 30


def test_meta_keys_encode_to_kv_tokens_and_back() -> None:
    for key in (b"", b"a", b"\x00\xff", b"12345678", b"123456789", bytes(range(256))):
        encoded = meta_kv_key(key)
        assert meta_key_of(encoded) == key
        assert all(c.isalnum() or c == "." for c in encoded) and not encoded.endswith(".")
    assert meta_kv_key(b"ab") == "m.61.62"
    assert meta_kv_key(b"abcdefghij") == "m.61.62.63.64.65.66.67.68.696a"
    assert meta_kv_key(b"abcdefghij\0k\0\0l") == "m.61.62.63.64.65.66.67.68.696a00.6b00.00.6c"
    for key in (b"abcdefgh\0", b"abcdefghi\0\0x\0", bytes(range(256)) + bytes(range(100))):
        assert meta_key_of(meta_kv_key(key)) == key


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

    async def ack_lost(subject: str, body: bytes, headers: dict[str, str], *_: float) -> int:
        calls.append(dict(headers))
        seq = await real(subject, body, headers, *_)
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

    async def lost_on_the_way(subject: str, body: bytes, headers: dict[str, str], *_: float) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise _Unknown(TimeoutError("never arrived"))
        return await real(subject, body, headers, *_)

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

    async def lost_while_another_writes(subject: str, body: bytes, headers: dict[str, str], *_: float) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            assert await other.append([AppendBatch(sid, 0, 1, [(None, b"theirs")])]) == [0]
            raise _Unknown(TimeoutError("never arrived"))
        return await real(subject, body, headers, *_)

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


# -- found in review (the repro scripts r*.py) -----------------------------------------------------

async def test_a_publish_given_up_on_is_fenced_so_it_can_never_land_later(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """r5: a publish whose outcome could not be settled fails the append with OutcomeUnknown (the
    core fails the request, retriable), and the next append first publishes a fence: the original,
    flushed late by the client (nats-py's pending buffer after a reconnect), is refused then."""
    monkeypatch.setattr(jetstream, "SETTLE_S", 0.2)
    store = await opener()
    assert store._nc._max_pending_size == 0   # a publish while disconnected fails at once, unsent
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    assert await store.append([AppendBatch(sid, 0, 1, [(None, b"a")])]) == [0]
    held: list[tuple[str, bytes, dict[str, str]]] = []

    async def never_answered(subject: str, body: bytes, headers: dict[str, str], *_: float) -> tuple[int, bool]:
        held.append((subject, body, dict(headers)))   # still in the client's buffer, say
        raise _Unknown(TimeoutError("no answer"))

    monkeypatch.setattr(store, "_request_publish", never_answered)
    (outcome,) = await store.append([AppendBatch(sid, 0, 2, [(None, b"lost?")])])
    assert isinstance(outcome, OutcomeUnknown) and outcome.code is ErrorCode.UNAVAILABLE
    monkeypatch.undo()
    assert await store.append([AppendBatch(sid, 0, 3, [(None, b"retried")])]) == [1]
    subject, body, headers = held[0]
    late = json.loads((await store._nc.request(subject, body, headers=headers, timeout=2)).data)
    assert late.get("error", {}).get("err_code") == 10071, late   # wrong last sequence: never stored
    fresh = await opener()
    assert [(r.seq, r.data) for r in await fresh.read(sid, 0, 0, BIG, BIG)] == [(0, b"a"), (1, b"retried")]
    assert (await fresh.bounds(sid, 0)).next_seq == 2
    assert await fresh.append([AppendBatch(sid, 0, 4, [(None, b"c")])]) == [2]
    assert [r.seq for r in await fresh.read(sid, 0, 1, BIG, BIG)] == [1, 2]   # the fence is skipped
    assert await fresh.seq_at_time(sid, 0, 2) == 1


async def test_settling_ends_with_its_deadline(opener: Callable[[], Awaitable[JetStreamStore]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish with no answer is settled for SETTLE_S, each try waiting at most what is left of
    it: with the publish's own timeout before, a request answers before a client's usual 30 s
    deadline (it took ~36 s: the last try began just before the deadline and waited 5 s more)."""
    assert jetstream.REQUEST_TIMEOUT_S + jetstream.SETTLE_S <= 25.0   # the broker's own bound, with room
    monkeypatch.setattr(jetstream, "SETTLE_S", 1.2)
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    waits: list[float] = []

    async def times_out(subject: str, body: bytes, headers: dict[str, str],
                        timeout: float = jetstream.REQUEST_TIMEOUT_S) -> tuple[int, bool]:
        waits.append(timeout)
        await asyncio.sleep(min(timeout, 0.4))   # time passes as it would (shortened)
        raise _Unknown(TimeoutError("no answer"))

    monkeypatch.setattr(store, "_request_publish", times_out)
    (outcome,) = await store.append([AppendBatch(sid, 0, 1, [(None, b"x")])])
    assert isinstance(outcome, OutcomeUnknown)
    assert waits[0] == jetstream.REQUEST_TIMEOUT_S and len(waits) >= 3
    assert all(w <= 1.2 for w in waits[1:]), waits   # never the whole 5 s past the settling deadline


async def test_a_stale_head_never_makes_a_new_append_a_duplicate_of_an_old_one(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """r12: a head re-read answered by a replica behind (simulated) rebuilt the msg id of a
    message already stored; JetStream took it as a duplicate and the append was acknowledged
    but lost. Msg ids carry a nonce per build now, and a duplicate outside settling renumbers."""
    a = await opener()
    sid = (await a.create_stream(StreamConfig("s", 1))).stream_id
    b = await opener()
    assert await a.append([AppendBatch(sid, 0, 1, [(None, b"M1")])]) == [0]
    assert await a.append([AppendBatch(sid, 0, 2, [(None, b"M2")])]) == [1]
    assert await b.append([AppendBatch(sid, 0, 3, [(None, b"M3")])]) == [2]
    real_last = a._last_msg
    calls: list[int] = []

    async def lagging_last(sid_: int, p: int) -> object:
        calls.append(1)
        return await a._get(sid_, p, 1) if len(calls) == 1 else await real_last(sid_, p)

    monkeypatch.setattr(a, "_last_msg", lagging_last)
    assert await a.append([AppendBatch(sid, 0, 4, [(None, b"NEW")])]) == [3]
    fresh = await opener()
    assert [r.data for r in await fresh.read(sid, 0, 0, BIG, BIG)] == [b"M1", b"M2", b"M3", b"NEW"]


async def test_a_direct_get_404_from_a_replica_behind_is_asked_of_the_leader(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """r7: direct gets may be answered by a replica behind the leader (simulated: 404s). A read
    skipped the record, a trim purged records it had to keep; now a 404 is asked of the leader."""
    s = await opener()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    for i in range(20):
        await s.append([AppendBatch(sid, 0, i, [(None, b"r%d" % i)])])
    real = s._direct_get
    missed: set[int] = set()

    async def mixed(sid_: int, p: int, payload: dict[str, object]) -> object:
        js = payload.get("seq")
        if js == 19 and js not in missed:   # the replica behind answers this one
            missed.add(js)
            return None
        return await real(sid_, p, payload)

    monkeypatch.setattr(s, "_direct_get", mixed)
    s._resume.clear()
    assert [r.seq for r in await s.read(sid, 0, 18, 10, BIG)] == [18, 19]
    t = await opener()
    sid2 = (await t.create_stream(StreamConfig("t", 1))).stream_id
    for i in range(3):
        await t.append([AppendBatch(sid2, 0, i, [(None, b"a%d" % i), (None, b"b%d" % i)])])
    real_t = t._direct_get

    async def behind(sid_: int, p: int, payload: dict[str, object]) -> object:
        return None if int(cast(int, payload.get("seq", 0))) >= 2 else await real_t(sid_, p, payload)

    monkeypatch.setattr(t, "_direct_get", behind)
    await t.trim(sid2, 0, 3)   # keep 3..: the message holding 2 and 3 stays
    fresh = await opener()
    assert [r.seq for r in await fresh.read(sid2, 0, 0, BIG, BIG)] == [3, 4, 5]


async def test_a_stream_dropped_by_another_broker_is_not_created_again(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """r3: broker B (the config cached) appending to a stream broker A dropped re-created its
    partition streams and reported success; now the catalogue is read first: gone (None)."""
    a = await opener()
    sid = (await a.create_stream(StreamConfig("s", 2))).stream_id
    b = await opener()
    assert await b.append([AppendBatch(sid, 0, 1, [(None, b"x")])]) == [0]
    await a.drop_stream(sid)
    assert await b.append([AppendBatch(sid, 0, 1, [(None, b"y")])]) == [None]
    assert await b.append([AppendBatch(sid, 1, 1, [(None, b"z")])]) == [None]
    with pytest.raises(BrokerError) as info:
        await b.read(sid, 1, 0, 10, BIG)
    assert info.value.code is ErrorCode.STREAM_NOT_FOUND
    for p in (0, 1):   # not orphaned: no JetStream stream left behind
        with pytest.raises(nats.js.errors.NotFoundError):
            await a._js.stream_info(a._stream_name(sid, p))


async def test_a_missing_partition_stream_is_found_and_created_again(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """r4: a live partition whose JetStream stream is missing (a crash before add_stream): reads,
    bounds, bounds_many and appends create it (empty) instead of stalling or raising."""
    a = await opener()
    sid = (await a.create_stream(StreamConfig("s", 2))).stream_id
    await a._js.delete_stream(a._stream_name(sid, 1))
    fresh = await opener()
    assert await fresh.read(sid, 1, 0, 10, BIG) == []
    await a._js.delete_stream(a._stream_name(sid, 1))
    fresh2 = await opener()
    assert [b and b.next_seq for b in await fresh2.bounds_many([(sid, 0), (sid, 1)])] == [0, 0]
    await a._js.delete_stream(a._stream_name(sid, 1))
    fresh3 = await opener()
    assert await fresh3.append([AppendBatch(sid, 1, 1, [(None, b"x")])]) == [0]
    assert await fresh3.append([AppendBatch(sid, 1, 1, [(None, b"y")])]) == [1]


async def test_a_direct_get_to_a_missing_stream_that_times_out_is_missing(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-server 2.9.10 answers no direct get to a missing stream: the timeout asks stream_info."""
    from broker.storage.jetstream import _Missing
    monkeypatch.setattr(jetstream, "REQUEST_TIMEOUT_S", 0.3)
    s = await opener()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    await s._js.delete_stream(s._stream_name(sid, 0))
    with pytest.raises(_Missing):
        await s._direct_get(sid, 0, {"seq": 1})


async def test_a_read_prefetches_no_more_than_its_byte_budget_needs(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """r13: a read with max_bytes 1 MiB over 512 KiB messages fetched READ_WINDOW (32) of them."""
    s = await opener()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    for i in range(40):
        await s.append([AppendBatch(sid, 0, i, [(None, bytes([65 + i % 26]) * (512 << 10))])])
    real = s._direct_get
    fetched: list[int] = []

    async def counting(sid_: int, p: int, payload: dict[str, object]) -> object:
        fetched.append(1)
        return await real(sid_, p, payload)

    monkeypatch.setattr(s, "_direct_get", counting)
    assert len(await s.read(sid, 0, 0, 1000, 1 << 20)) == 2
    assert len(fetched) <= 3
    fetched.clear()
    assert len(await s.read(sid, 0, 0, 1000, BIG)) == 40   # a large budget still prefetches
    assert len(fetched) <= 40


async def test_a_scan_whose_get_fails_is_unavailable_not_a_shorter_list(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A KV scan reads each key's last message (no consumer: see _scan): a key deleted meanwhile (not
    found) is left out, any other failure of a get fails the scan (UNAVAILABLE), never a short list."""
    s = await opener()
    await s.meta_write({b"k1": b"1", b"k2": b"2", b"k3": b"3"})
    real_get_msg = s._js.get_msg
    failure: list[Exception] = []

    async def get_msg(stream: str, subject: str | None = None, **kw: object) -> object:
        if subject is not None and subject.endswith(meta_kv_key(b"k2")) and failure:
            raise failure[0]
        return await real_get_msg(stream, subject=subject, **kw)

    monkeypatch.setattr(s._js, "get_msg", get_msg)
    failure.append(nats.js.errors.ServiceUnavailableError(code=503, description="leadership change"))
    with pytest.raises(BrokerError) as info:
        await s.meta_scan(b"k")
    assert info.value.code is ErrorCode.UNAVAILABLE
    failure[0] = nats.js.errors.NotFoundError(code=404, err_code=10037, description="no message found")
    assert await s.meta_scan(b"k") == [(b"k1", b"1"), (b"k3", b"3")]
    monkeypatch.undo()
    assert await s.meta_scan(b"k") == [(b"k1", b"1"), (b"k2", b"2"), (b"k3", b"3")]


async def test_a_meta_write_that_fails_midway_leaves_a_prefix(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    s = await opener()
    real_put = s._kv.put

    async def put(key: str, value: bytes) -> int:
        if value == b"2":
            raise TimeoutError("no answer")
        return await real_put(key, value)

    monkeypatch.setattr(s._kv, "put", put)
    with pytest.raises(BrokerError):
        await s.meta_write({b"a": b"1", b"b": b"2", b"c": b"3"})
    monkeypatch.undo()
    assert await s.meta_scan(b"") == [(b"a", b"1")]


async def test_long_metadata_keys_are_hashed_and_found_by_get_scan_and_cas(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """r14: a key over ~1,990 bytes became a subject past the server's max_control_line: the
    server closed the connection and every call failed until a restart. Such keys are stored
    under a hash now (their leading tokens kept for prefix scans), the full key in the value."""
    s = await opener()
    sid = (await s.create_stream(StreamConfig("s", 1))).stream_id
    long1, long2 = b"T\0series\0" + b"x" * 2100, b"T\0series\0" + b"y" * 5000
    short = b"T\0series\0z"
    assert len(meta_kv_key(long2)) <= jetstream.KV_KEY_MAX
    await s.meta_write({long1: b"1", long2: b"2", short: b"3"})
    assert await s.meta_get(long1) == b"1" and await s.meta_get(long2) == b"2"
    assert await s.meta_get(long1 + b"x") is None
    assert await s.meta_scan(b"T\0series\0") == [(long1, b"1"), (long2, b"2"), (short, b"3")]
    assert await s.meta_scan(b"T\0series\0x") == [(long1, b"1")]
    assert await s.meta_scan(long2) == [(long2, b"2")]
    assert await s.meta_cas(long1, b"1", b"11") and not await s.meta_cas(long1, b"1", b"12")
    assert await s.meta_cas(long2, b"2", None) and await s.meta_get(long2) is None
    assert await s.meta_cas(long2, None, b"new") and await s.meta_get(long2) == b"new"
    await s.meta_write({long1: None})
    assert await s.meta_scan(b"T") == [(long2, b"new"), (short, b"3")]
    assert s._nc.is_connected
    assert await s.append([AppendBatch(sid, 0, 1, [(None, b"x")])]) == [0]


async def test_a_connection_the_client_closed_for_good_is_opened_again(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    """r14b: after a protocol error the server closes the connection for (-ERR) nats-py does not
    reconnect; the store opens a new connection itself."""
    s = await opener()
    await s.meta_write({b"k": b"v"})
    first = s._nc
    try:
        await s._nc.publish("x" * 5000, b"")   # a control line over 4 KB: -ERR, closed
    except Exception:
        pass
    for _ in range(100):
        if s._nc is not first and s._nc.is_connected:
            break
        await asyncio.sleep(0.05)
    assert first.is_closed and s._nc is not first
    assert await s.meta_get(b"k") == b"v"


async def test_a_checkpoint_scan_reads_only_its_apps_keys(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefix scans filtered on the first 8 bytes only: one app's checkpoint scan read the keys of
    every app of the project. The tokens now follow the core's \\0 separators."""
    from broker.core import apps
    s = await opener()
    await s.meta_write({apps.checkpoint_key("project1", f"app{i}", 1, p): b"%d" % p
                        for i in range(5) for p in range(3)})
    real_scan = s._scan
    seen: list[int] = []

    async def counting(pattern: str) -> list[tuple[str, bytes]]:
        rows = await real_scan(pattern)
        seen.append(len(rows))
        return rows

    monkeypatch.setattr(s, "_scan", counting)
    rows = await s.meta_scan(apps.checkpoint_prefix("project1", "app3"))
    assert [v for _, v in rows] == [b"0", b"1", b"2"] and seen == [3]


async def test_metadata_keys_of_the_first_layout_are_rewritten_once(
        opener: Callable[[], Awaitable[JetStreamStore]]) -> None:
    from broker.core import apps
    s = await opener()
    key = apps.app_key("longproject", "app")   # a \0 past 8 bytes: another KV key now
    old = "m" + "".join("." + key[i:i + 1].hex() for i in range(8)) + "." + key[8:].hex()
    assert old != meta_kv_key(key)
    await s._kv.put(old, b"{}")
    await s._kv_erase("v")
    fresh = await opener()
    assert await fresh.meta_get(key) == b"{}"
    assert await fresh.meta_scan(apps.app_prefix("longproject")) == [(key, b"{}")]


async def test_partition_streams_have_no_max_age_and_other_replicas_are_told(
        opener: Callable[[], Awaitable[JetStreamStore]], jetstream_server: NatsServer,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """No JetStream expiry (it could expire every message written after the last trim, and with
    them the head: the partition dead everywhere); an existing KV bucket or partition stream with
    other replicas than --replicas (error 10058, simulated: one node refuses replicas > 1 first) is
    refused at startup (the bucket) or logged (a partition)."""
    from nats.js.client import JetStreamContext

    from broker.storage.base import IncompatibleStore
    s = await opener()
    c = await s.create_stream(StreamConfig("s", 1))
    info = await s._js.stream_info(s._stream_name(c.stream_id, 0))
    assert not info.config.max_age and info.config.num_replicas == 1

    async def in_use(*args: object, **kwargs: object) -> None:
        raise nats.js.errors.APIError(code=400, err_code=10058, description="stream name already in use")

    monkeypatch.setattr(JetStreamContext, "add_stream", in_use)
    monkeypatch.setattr(JetStreamContext, "create_key_value", in_use)
    s._replicas = 2   # as if this broker had been started with --replicas 2
    await s.update_stream(c)
    assert "has 1 replicas, not --replicas 2" in caplog.text
    with pytest.raises(IncompatibleStore) as raised:
        await JetStreamStore.open([jetstream_server.url], prefix=s._prefix, replicas=2)
    assert "--replicas 1" in str(raised.value)


async def test_settling_that_fails_unexpectedly_forgets_the_head(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception _settle did not list (here from reading the message after the expected one)
    still drops the head cache and fences: never a stale head, never a raw exception."""
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id
    other = await opener()
    real = store._request_publish
    calls = 0

    async def lost_while_another_writes(subject: str, body: bytes, headers: dict[str, str],
                                        *_: float) -> tuple[int, bool]:
        nonlocal calls
        calls += 1
        if calls == 1:
            assert await other.append([AppendBatch(sid, 0, 1, [(None, b"theirs")])]) == [0]
            raise _Unknown(TimeoutError("never arrived"))
        return await real(subject, body, headers, *_)

    async def broken(*args: object) -> None:
        raise ValueError("unexpected")

    monkeypatch.setattr(store, "_request_publish", lost_while_another_writes)
    monkeypatch.setattr(store, "_leader_get", broken)
    (outcome,) = await store.append([AppendBatch(sid, 0, 2, [(None, b"ours")])])
    assert isinstance(outcome, OutcomeUnknown)
    assert (sid, 0) not in store._heads and (sid, 0) in store._fences
    monkeypatch.undo()
    assert await store.append([AppendBatch(sid, 0, 3, [(None, b"next")])]) == [1]
    assert [r.data for r in await store.read(sid, 0, 0, BIG, BIG)] == [b"theirs", b"next"]


async def test_a_partition_stream_missing_again_while_created_is_an_outcome_not_a_raise(
        opener: Callable[[], Awaitable[JetStreamStore]], monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.storage.jetstream import _Missing
    store = await opener()
    sid = (await store.create_stream(StreamConfig("s", 1))).stream_id

    async def missing(*args: object) -> None:
        raise _Missing()

    monkeypatch.setattr(store, "_load_head", missing)
    store._heads.clear()
    (outcome,) = await store.append([AppendBatch(sid, 0, 1, [(None, b"x")])])
    assert isinstance(outcome, BrokerError) and outcome.code is ErrorCode.UNAVAILABLE


# the contract tests of every conditional write: the catalogue's (next id, name create, scale, drop,
# trim marker) and meta_cas
_CONDITIONAL = [getattr(_contract, name) for name in (
    "test_create_assigns_fresh_ids_and_list_is_sorted_by_name", "test_create_existing_name_is_stream_exists",
    "test_drop_removes_stream_and_its_partitions", "test_stream_ids_are_never_reused_and_a_recreated_name_starts_empty",
    "test_trim_is_idempotent_and_never_moves_backwards", "test_update_stream_adds_partitions_and_keeps_every_record",
    "test_meta_cas_sets_only_when_the_value_is_the_expected_one", "test_meta_cas_sees_meta_write_and_long_binary_keys",
    "test_meta_cas_read_modify_write_loses_no_update")]


@pytest.mark.parametrize("contract_test", _CONDITIONAL, ids=lambda t: t.__name__[5:])
async def test_conditional_writes_on_the_bucket_sequence_keep_the_contract(
        opener: Callable[[], Awaitable[JetStreamStore]], contract_test: Callable[[Store], Awaitable[None]]) -> None:
    """The cas_on_stream path (a cluster before nats-server 2.9.21; exact there, see
    tests/cluster/test_store_contract_cluster.py) forced on one node: the same answers as the
    revision checks give."""
    store = await opener()
    store.cas_on_stream = True
    await contract_test(store)
    stream = f"KV_{store._kv_bucket}"
    info = await store._js.stream_info(stream, subjects_filter=">")
    markers = [s for s in info.state.subjects or {}
               if "KV-Operation" in ((await store._js.get_msg(stream, subject=s)).headers or {})]
    assert markers == []   # a delete's marker is purged after it


async def test_a_disconnected_store_is_failed_before_any_write_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz said ready on a broker cut off from NATS until a record write had been refused (the
    JetStream probe: a load balancer kept sending it traffic). A disconnection is FAILED at once;
    OK again once JetStream answers."""
    monkeypatch.setattr(jetstream, "REQUEST_TIMEOUT_S", 0.5)
    server = NatsServer(tmp_path / "store", extra=("-c", str(nats_config(tmp_path)))).start()
    store = await JetStreamStore.open([server.url], prefix="idle", replicas=1)
    try:
        assert store.storage_state is StorageState.OK
        server.stop()
        for _ in range(100):   # no call to the store meanwhile
            if store.storage_state is StorageState.FAILED:
                break
            await asyncio.sleep(0.1)
        assert store.storage_state is StorageState.FAILED
        server.start()
        for _ in range(100):
            if store.storage_state is StorageState.OK:
                break
            await asyncio.sleep(0.1)
        assert store.storage_state is StorageState.OK
    finally:
        await store.close()
        server.stop()
