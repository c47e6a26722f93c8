"""Source leases on a shared store (sources/manager.py): two brokers (two Broker + Sources over one
store marked shared; a fake wall clock) - a running source runs on exactly one of them, the other
shows it running elsewhere; it moves when its holder dies (stops renewing) once the lease ran out;
stop, start and delete through either broker reach the holder at its next tick."""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import pytest

from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, server_error
from broker.model import ColumnDef, StreamSchema
from broker.sources.generator import TEMPLATE_COLUMNS
from broker.sources.manager import ELSEWHERE, Sources, lease_key
from broker.sources.model import RUNNING, STOPPED
from broker.storage.base import Durability, StoreCapabilities
from broker.storage.memory import MemoryStore

from .conftest import P, eventually

LEASE_S = 1000.0   # the background ticker never runs in a test: the test ticks by hand


class SharedMemoryStore(MemoryStore):
    capabilities = StoreCapabilities(Durability.NONE, shared=True)


class Clock:
    """The wall clock (ms) of the leases; `mono` the brokers' monotonic clock (s), moved with it."""

    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms

    def mono(self) -> float:
        return self.ms / 1000


class Node:
    def __init__(self, store: SharedMemoryStore, clock: Clock) -> None:
        self.broker = Broker(store, cursor_secret=b"k" * 32)
        self.sources = Sources(self.broker, clock_ms=clock, lease_s=LEASE_S, monotonic=clock.mono)

    async def start(self) -> None:
        await self.broker.start()
        await self.sources.start()

    def running_here(self, name: str) -> bool:
        return any(d.name == name and k in self.sources._tasks for k, d in self.sources._defs.items())

    def crash(self) -> None:
        """Dies: its jobs end and nothing is renewed or released (no close)."""
        self.sources._closed = True
        for t in [self.sources._ticker, *self.sources._tasks.values()]:
            if t is not None:
                t.cancel()


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node, Clock, SharedMemoryStore]]:
    store, clock = SharedMemoryStore(), Clock()
    a = Node(store, clock)
    await a.start()
    await a.broker.create_stream("t", 1, project=P,
                                 schema=StreamSchema(tuple(ColumnDef(n, c) for n, c in TEMPLATE_COLUMNS["iot"])))
    b = Node(store, clock)
    await b.start()   # its catalogue has the stream
    yield a, b, clock, store
    for n in (a, b):
        await n.sources.close()
        await n.broker.close()


def gen(name: str) -> dict[str, object]:
    return {"name": name, "type": "stream_generator", "stream": "t",
            "properties": {"template": "iot", "interval": "20ms"}}


async def rows(node: Node) -> int:
    return (await node.broker.store.bounds(node.broker.catalogue.get(P, "t").stream_id, 0)).next_seq


async def test_a_source_runs_on_one_broker_and_moves_when_it_dies(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore]) -> None:
    a, b, clock, store = nodes
    created = await a.sources.create(P, gen("g"))
    assert a.running_here("g")
    await b.sources.tick()                       # b learns of the source and of a's lease
    assert not b.running_here("g")
    assert b.sources.get(P, "g").state.status == RUNNING and b.sources.get(P, "g").state.message == ELSEWHERE
    for _ in range(3):                           # renewals keep it where it is
        clock.ms += 1000
        await a.sources.tick()
        await b.sources.tick()
        assert a.running_here("g") and not b.running_here("g")
    await eventually(lambda: rows(a), what="rows from a")

    a.crash()
    clock.ms += int(LEASE_S * 1000) // 2
    await b.sources.tick()
    assert not b.running_here("g")               # the dead broker's lease has not run out yet
    clock.ms += int(LEASE_S * 1000)
    await b.sources.tick()
    assert b.running_here("g")                   # taken over
    before = await rows(b)

    async def more() -> bool:
        return await rows(b) > before + 5
    await eventually(more, what="rows from b after the takeover")
    lease = await store.meta_get(lease_key(P, created.definition.id))
    assert lease is not None and json.loads(lease)["owner"] == b.sources.holder


async def test_stop_start_and_delete_through_the_other_broker(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore]) -> None:
    a, b, _, store = nodes
    created = await a.sources.create(P, gen("g"))
    await b.sources.tick()
    await b.sources.stop_source(P, "g")          # b does not run it: the definition changes
    assert a.running_here("g")
    await a.sources.tick()                       # a's next round ends its job and gives the lease back
    assert not a.running_here("g") and a.sources.get(P, "g").state.status == STOPPED
    assert await store.meta_get(lease_key(P, created.definition.id)) is None
    await b.sources.start_source(P, "g")         # started through b: b takes the free lease
    assert b.running_here("g")
    await a.sources.tick()
    assert not a.running_here("g") and a.sources.get(P, "g").state.message == ELSEWHERE
    await a.sources.delete(P, "g")               # deleted through a: b's next round ends it
    await b.sources.tick()
    assert not b.running_here("g") and b.sources.list(P) == []
    await asyncio.sleep(0)


async def test_a_broker_closing_hands_its_sources_over_at_once(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore]) -> None:
    a, b, _, _ = nodes
    await a.sources.create(P, gen("g"))
    await a.sources.close()                      # a clean stop releases the lease
    await b.sources.tick()
    assert b.running_here("g")


async def test_a_holder_that_cannot_renew_stops_its_job_before_the_lease_runs_out(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, clock, _ = nodes
    await a.sources.create(P, gen("g"))
    calls = {"a": 0}

    async def unreachable(*args: object) -> bool:
        calls["a"] += 1
        raise server_error(ErrorCode.UNAVAILABLE, detail="JetStream: no answer in time")
    monkeypatch.setattr(a.sources, "_claim", lambda key: unreachable())
    clock.ms += int(LEASE_S * 1000 * 0.5)
    await a.sources.tick()
    assert a.running_here("g")                   # within 3/4 of the lease: goes on
    clock.ms += int(LEASE_S * 1000 * 0.3)
    await a.sources.tick()
    assert not a.running_here("g")               # stopped itself, before anyone else may take it
    assert a.sources.get(P, "g").state.status == "failed" and calls["a"] == 2
    await b.sources.tick()
    assert not b.running_here("g")               # the lease has not run out yet
    clock.ms += int(LEASE_S * 1000 * 0.3)
    await b.sources.tick()
    assert b.running_here("g")


async def test_a_name_taken_through_the_other_broker_is_refused_before_its_next_round(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore]) -> None:
    a, b, _, _ = nodes
    await a.sources.create(P, gen("g"))
    with pytest.raises(BrokerError) as e:
        await b.sources.create(P, gen("g"))      # b has not ticked: it learns of "g" from the store
    assert e.value.code is ErrorCode.SOURCE_EXISTS


async def test_a_source_created_through_the_other_broker_is_found_before_its_next_round(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore]) -> None:
    """Behind a load balancer the verb after a create may reach the other broker: it answered
    SOURCE_NOT_FOUND until its next round (~2.5 s; the sources probe, 10 of 10 tries)."""
    a, b, _, _ = nodes
    created = await a.sources.create(P, gen("g"))
    assert (await b.sources.find(P, "g")).definition == created.definition           # by name
    await a.sources.create(P, gen("h"))
    assert [s.definition.name for s in await b.sources.find_all(P)] == ["g", "h"]
    made = await a.sources.create(P, gen("k"))
    assert (await b.sources.find(P, made.definition.id)).definition.name == "k"      # by id
    await a.sources.create(P, gen("s"))
    stopped = await b.sources.stop_source(P, "s")   # a verb through b, before b's round
    assert stopped.definition.wanted == STOPPED
    with pytest.raises(BrokerError) as e:
        await b.sources.find(P, "nothing")
    assert e.value.code is ErrorCode.SOURCE_NOT_FOUND
    assert not b.running_here("g")   # learnt, not run: the lease is a's
    # what b shows of it before its round: running, elsewhere (a fresh state said "stopped")
    seen = await b.sources.find(P, "h")
    assert (seen.state.status, seen.state.message) == (RUNNING, ELSEWHERE)


async def test_a_list_racing_a_delete_does_not_bring_the_source_back(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore]) -> None:
    """A list's read of the store from before a delete, returning after it: the deleted source
    was learnt again and listed after its DELETE had returned (the review)."""
    a, b, _, store = nodes
    await a.sources.create(P, gen("g"))
    await b.sources.tick()                      # b knows g
    real_scan = store.meta_scan
    gate = asyncio.Event()

    async def slow_scan(prefix: bytes) -> list[tuple[bytes, bytes]]:
        rows = await real_scan(prefix)          # read before the delete lands...
        await gate.wait()                       # ...and handed back after it
        return rows
    store.meta_scan = slow_scan  # type: ignore[method-assign]
    lister = asyncio.ensure_future(b.sources.find_all(P))
    await asyncio.sleep(0)
    store.meta_scan = real_scan  # type: ignore[method-assign]
    await b.sources.delete(P, "g")
    gate.set()
    await lister
    assert await b.sources.find_all(P) == ()


async def test_a_holder_stuck_in_a_slow_round_stops_its_job_before_another_broker_takes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real clocks, a short lease: a's round waits on the store for longer than a lease (each
    JetStream request may take REQUEST_TIMEOUT_S); its own deadline (a timer, not the round)
    ends its job before b, which can reach the store, takes the lease."""
    lease_s = 0.6
    store = SharedMemoryStore()
    a_broker, b_broker = Broker(store, cursor_secret=b"k" * 32), Broker(store, cursor_secret=b"k" * 32)
    a, b = Sources(a_broker, lease_s=lease_s), Sources(b_broker, lease_s=lease_s)
    await a_broker.start()
    await a_broker.create_stream("t", 1, project=P,
                                 schema=StreamSchema(tuple(ColumnDef(n, c) for n, c in TEMPLATE_COLUMNS["iot"])))
    await b_broker.start()
    try:
        for s in (a, b):
            await s.start()
            assert s._ticker is not None
            s._ticker.cancel()   # rounds by hand
        await a.create(P, gen("g"))
        assert any(d.name == "g" for k, d in a._defs.items() if k in a._tasks)
        seen: dict[str, bool] = {}

        async def slow_unreachable(key: object) -> bool:
            await asyncio.sleep(lease_s * 1.1)   # past a's until: b may take the lease now
            await b.tick()
            seen["a"], seen["b"] = bool(a._tasks), bool(b._tasks)
            raise server_error(ErrorCode.UNAVAILABLE, detail="JetStream: no answer in time")
        monkeypatch.setattr(a, "_claim", slow_unreachable)
        await a.tick()
        assert seen == {"a": False, "b": True}, seen
        assert a.get(P, "g").state.status == "failed"
    finally:
        for s, br in ((a, a_broker), (b, b_broker)):
            await s.close()
            await br.close()


async def test_a_holder_renewing_in_time_keeps_its_job_past_the_first_deadline() -> None:
    """The per-lease timer moves with every renewal: a job renewed each round never stops."""
    lease_s = 0.4
    store = SharedMemoryStore()
    broker = Broker(store, cursor_secret=b"k" * 32)
    a = Sources(broker, lease_s=lease_s)
    await broker.start()
    await broker.create_stream("t", 1, project=P,
                               schema=StreamSchema(tuple(ColumnDef(n, c) for n, c in TEMPLATE_COLUMNS["iot"])))
    try:
        await a.start()
        await a.create(P, gen("g"))
        task = next(iter(a._tasks.values()))
        await asyncio.sleep(lease_s * 3)   # its own ticker renews every lease_s / 4
        assert not task.done() and a.get(P, "g").state.status == RUNNING
    finally:
        await a.close()
        await broker.close()


async def test_a_verb_through_a_broker_with_a_stale_view_decides_on_the_stored_definition(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore]) -> None:
    """b last saw g stopped; a started it since: an update through b is SOURCE_RUNNING (not a
    write of b's stale copy, which stopped the source), and a stop through b then a start through
    a leave the stored definition as last asked for."""
    a, b, _, _ = nodes
    await a.sources.create(P, gen("g"))
    await a.sources.stop_source(P, "g")
    await b.sources.tick()                       # b: g is stopped
    await a.sources.start_source(P, "g")
    assert a.running_here("g")
    with pytest.raises(BrokerError) as raised:
        await b.sources.update(P, "g", {"description": "new"})
    assert raised.value.code is ErrorCode.SOURCE_RUNNING
    await a.sources.tick()
    assert a.running_here("g") and a.sources.get(P, "g").definition.wanted == RUNNING
    await b.sources.stop_source(P, "g")          # b's view is fresh now: stored as stopped
    await a.sources.tick()
    assert not a.running_here("g") and a.sources.get(P, "g").definition.wanted == STOPPED
    await b.sources.update(P, "g", {"description": "new"})
    await a.sources.delete(P, "g")               # a's copy lacks b's update: still deleted
    with pytest.raises(BrokerError) as raised:
        await b.sources.start_source(P, "g")     # deleted through a: forgotten by b too
    assert raised.value.code is ErrorCode.SOURCE_NOT_FOUND
    assert b.sources.list(P) == []


async def test_a_definition_changed_between_read_and_write_is_read_again(
        nodes: tuple[Node, Node, Clock, SharedMemoryStore], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _, _ = nodes
    await a.sources.create(P, gen("g"))
    await a.sources.stop_source(P, "g")
    await b.sources.tick()
    real = b.sources._replace
    raced = {"n": 0}

    async def racing(key, stored, new):  # type: ignore[no-untyped-def]
        if not raced["n"]:   # a starts it between b's read and b's write
            raced["n"] += 1
            await a.sources.start_source(P, "g")
        return await real(key, stored, new)
    monkeypatch.setattr(b.sources, "_replace", racing)
    with pytest.raises(BrokerError) as raised:
        await b.sources.update(P, "g", {"description": "new"})
    assert raised.value.code is ErrorCode.SOURCE_RUNNING and raced["n"] == 1
    assert a.running_here("g") and a.sources.get(P, "g").definition.description != "new"
