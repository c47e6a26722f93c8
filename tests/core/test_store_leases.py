"""StoreLeases (broker/core/leases.py): the LeaseTable rules over one metadata key per group,
changed with meta_cas, so several brokers of one shared store keep one table. Two StoreLeases on
one store play two brokers; a store that yields between its calls makes their heartbeats race."""
from __future__ import annotations

import asyncio
import random

from broker.core.leases import LeaseTable, StoreLeases, lease_key
from broker.storage.jetstream import JetStreamStore
from broker.storage.memory import MemoryStore
from tests.storage.conftest import NatsServer, delete_prefix, fresh_prefix, jetstream_server  # noqa: F401

APP, SID, LEASE = "default/app", 7, 1000


class YieldingStore(MemoryStore):
    """MemoryStore whose metadata calls suspend first: read -> cas windows other tasks run in."""

    async def meta_get(self, key: bytes) -> bytes | None:
        await asyncio.sleep(0)
        return await super().meta_get(key)

    async def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        await asyncio.sleep(0)
        return await super().meta_cas(key, expected, new)


async def test_the_rules_hold_across_two_brokers_as_in_one_table() -> None:
    store = MemoryStore()
    a, b = StoreLeases(store), StoreLeases(store)
    assert await a.heartbeat(APP, SID, 4, "m1", set(), LEASE, 0) == [0, 1, 2, 3]
    assert await b.heartbeat(APP, SID, 4, "m2", set(), LEASE, 10) == []          # m1 still owns all
    assert await a.heartbeat(APP, SID, 4, "m1", {0, 1, 2, 3}, LEASE, 20) == [0, 1]  # told to keep two
    assert await b.heartbeat(APP, SID, 4, "m2", set(), LEASE, 30) == []          # not released yet
    assert await a.heartbeat(APP, SID, 4, "m1", {0, 1}, LEASE, 40) == [0, 1]
    assert await b.heartbeat(APP, SID, 4, "m2", set(), LEASE, 50) == [2, 3]
    assert await a.owners(APP, SID) == {0: "m1", 1: "m1", 2: "m2", 3: "m2"}
    # m1 dies (no more heartbeats): after its lease, its partitions go to m2 through the other broker
    assert await b.heartbeat(APP, SID, 4, "m2", {2, 3}, LEASE, 1100) == [0, 1, 2, 3]
    await a.leave(APP, SID, "m2")
    assert await b.owners(APP, SID) == {}


async def test_leave_and_forget_stream_clear_the_stored_state() -> None:
    store = MemoryStore()
    leases = StoreLeases(store)
    await leases.heartbeat(APP, SID, 2, "m1", set(), LEASE, 0)
    await leases.heartbeat("default/other", SID, 2, "m1", set(), LEASE, 0)
    await leases.heartbeat(APP, SID + 1, 2, "m1", set(), LEASE, 0)
    await leases.leave(APP, SID, "m1")
    assert await store.meta_get(lease_key(APP, SID)) is None                     # an empty group: no key
    await leases.forget_stream(SID)
    assert [k for k, _ in await store.meta_scan(b"G")] == [lease_key(APP, SID + 1)]


async def test_racing_heartbeats_on_two_brokers_never_grant_a_partition_twice() -> None:
    """Members on two brokers heartbeat concurrently for rounds, some dying; after every round no
    partition is granted to two members with current leases, and a settled group covers all."""
    store = YieldingStore()
    await race([StoreLeases(store), StoreLeases(store)])


async def test_the_same_race_on_two_jetstream_stores(jetstream_server: NatsServer) -> None:
    """As above with each broker's own JetStreamStore on one server: meta_cas on KV revisions."""
    prefix = fresh_prefix()
    stores = [await JetStreamStore.open([jetstream_server.url], prefix=prefix, replicas=1) for _ in range(2)]
    try:
        await race([StoreLeases(s) for s in stores])
    finally:
        for s in stores:
            await s.close()
        await delete_prefix(jetstream_server.url, prefix)


async def race(brokers: list[StoreLeases]) -> None:
    rng = random.Random(13)
    members = {f"m{i}": brokers[i % 2] for i in range(5)}
    held: dict[str, set[int]] = {m: set() for m in members}
    alive = set(members)
    partitions = 8
    now = 0
    for round_ in range(40):
        now += 100
        if round_ == 15:
            alive.discard("m0")                                    # dies: stops heartbeating
        if round_ == 25:
            alive.discard("m3")

        async def beat(m: str, t: int) -> tuple[str, list[int]]:
            return m, await members[m].heartbeat(APP, SID, partitions, m, held[m], LEASE, t)

        answers = await asyncio.gather(*(beat(m, now + rng.randrange(50)) for m in sorted(alive)))
        granted: dict[int, str] = {}
        for m, mine in answers:
            for p in mine:
                assert p not in granted, (round_, p, m, granted[p])
                granted[p] = m
            held[m] = set(mine)                                        # it works on what it was given
        # members still holding something from before must not collide with the new grants either
        for m in alive:
            assert not any(granted.get(p, m) != m for p in held[m])
    assert sum(b.conflicts for b in brokers) > 0                       # the races really happened
    assert sorted(granted) == list(range(partitions))                  # settled: every partition worked on
    counts = sorted(len(held[m]) for m in alive)
    assert counts[-1] - counts[0] <= 1


def test_dump_and_load_round_trip_a_group() -> None:
    t = LeaseTable()
    t.heartbeat(APP, SID, 3, "a", set(), LEASE, 0)
    t.heartbeat(APP, SID, 3, "b", set(), LEASE, 5)
    state = t.dump(APP, SID)
    u = LeaseTable()
    assert state is not None
    u.load(APP, SID, state)
    assert u.owners(APP, SID) == t.owners(APP, SID) and u.dump(APP, SID) == state
    assert LeaseTable().dump(APP, SID) is None


async def test_a_group_named_by_app_id_starts_from_its_table_from_before() -> None:
    """Group names gained the app's id (an app made again never meets the old one's leases); on a
    shared store, whose table has no restart grace, the renamed group started empty across the
    upgrade and granted a live member's partitions to another (the second review: m1 got all four
    while m2 still worked on 2 and 3). The first change of a renamed group starts from the old table."""
    store = MemoryStore()
    old, new = StoreLeases(store), StoreLeases(store)
    assert await old.heartbeat("default/app", SID, 4, "m1", set(), LEASE, 0) == [0, 1, 2, 3]
    assert await old.heartbeat("default/app", SID, 4, "m2", set(), LEASE, 10) == []
    assert await old.heartbeat("default/app", SID, 4, "m1", {0, 1, 2, 3}, LEASE, 20) == [0, 1]
    assert await old.heartbeat("default/app", SID, 4, "m1", {0, 1}, LEASE, 30) == [0, 1]
    assert await old.heartbeat("default/app", SID, 4, "m2", set(), LEASE, 40) == [2, 3]
    # the brokers upgraded: the same app's group is now default/app/<id>
    renamed = "default/app/a1b2"
    assert await new.heartbeat(renamed, SID, 4, "m1", {0, 1}, LEASE, 100) == [0, 1]   # not m2's
    assert await new.heartbeat(renamed, SID, 4, "m2", {2, 3}, LEASE, 110) == [2, 3]
    assert await new.owners(renamed, SID) == {0: "m1", 1: "m1", 2: "m2", 3: "m2"}
    # past the old leases, a renamed group of another id (the app made again) inherits nobody
    assert await new.heartbeat("default/app/c3d4", SID, 4, "m9", set(), LEASE, 5000) == [0, 1, 2, 3]
    await new.forget_app("default/app")   # the delete of the app drops the old table too
    assert await store.meta_get(lease_key("default/app", SID)) is None
