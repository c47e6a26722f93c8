"""RocksStore, and JetStreamStore, against MemoryStore, driven side by side by random operations.

Every rule does the same thing to both stores and compares the answers exactly; the store under
test is also closed and reopened at random (JetStream: a new store instance on the same prefix,
its caches empty, as a broker restarted on an empty data dir). After every step the bounds of every partition agree, a
full read agrees, and each partition's sequence numbers run first_seq .. next_seq-1 with no gaps
(and next_seq / first_seq never go backwards).
tests/cluster/test_store_contract_cluster.py runs the JetStream machine on a 3-node cluster (R=3).
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from typing import Any, Awaitable

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from broker.errors import BrokerError, ErrorCode
from broker.model import AppendBatch, StreamConfig
from broker.storage.base import Store
from broker.storage.jetstream import JetStreamStore
from broker.storage.memory import MemoryStore
from broker.storage.rocks import RocksStore
from tests.storage.conftest import NatsServer, delete_prefix_sync, fresh_prefix

# (project, stream name): the same name in two projects is two streams
NAMES = (("p1", "alpha"), ("p2", "alpha"), ("p1", "beta"))
BIG = 1 << 30

keys_ = st.none() | st.text(max_size=6)
items = st.lists(st.tuples(keys_, st.binary(max_size=24)), min_size=1, max_size=6)
timestamps = st.integers(0, 5_000)


class StoresAgree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="sluice-stateful-")
        self.loop = asyncio.new_event_loop()   # the stores are async; one loop for the whole run
        self.memory = MemoryStore()
        self.other = self.open_other()
        self.live: dict[tuple[str, str], tuple[int, int, int]] = {}  # name -> (memory id, rocks id, partitions)
        self.dead: list[tuple[int, int]] = []                 # (memory id, rocks id) of dropped streams
        self.seen: dict[tuple[int, int], tuple[int, int]] = {}  # (memory id, p) -> highest (first, next) seen
        self.expected_next: dict[tuple[int, int], int] = {}   # the model's own count of appended records

    def open_other(self) -> Store:
        return RocksStore(self.dir)

    def teardown(self) -> None:
        self.run(self.other.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, call: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(call)

    # -- helpers -----------------------------------------------------------------------------------

    def _pick(self, data: st.DataObject) -> tuple[tuple[str, str], int]:
        name = data.draw(st.sampled_from(sorted(self.live)), label="stream")
        partition = data.draw(st.integers(0, self.live[name][2] - 1), label="partition")
        return name, partition

    def _both(self, call):  # type: ignore[no-untyped-def]
        """Run `call(store, index)` on both stores (index 0: memory, 1: the other, to pick that store's
        stream id): the same result, or the same error code."""
        outcomes = []
        for store, index in ((self.memory, 0), (self.other, 1)):
            try:
                outcomes.append(("ok", self.run(call(store, index))))
            except BrokerError as exc:
                outcomes.append(("error", exc.code))
        assert outcomes[0] == outcomes[1]
        return outcomes[0]

    # -- rules -------------------------------------------------------------------------------------

    @initialize(name=st.sampled_from(NAMES), partitions=st.integers(1, 2))
    def first_stream(self, name: tuple[str, str], partitions: int) -> None:
        self.create(name, partitions)

    @rule(name=st.sampled_from(NAMES), partitions=st.integers(1, 2))
    def create(self, name: tuple[str, str], partitions: int) -> None:
        created = []
        project, stream_name = name
        for store in (self.memory, self.other):
            try:
                created.append(self.run(store.create_stream(StreamConfig(stream_name, partitions, project=project))))
            except BrokerError as exc:
                assert exc.code is ErrorCode.STREAM_EXISTS
                created.append(None)
        if name in self.live:
            assert created == [None, None]
            return
        mem, other = created
        assert mem is not None and other is not None
        assert (mem.key, mem.partition_count) == (other.key, other.partition_count) == (name, partitions)
        for i, given in enumerate((mem.stream_id, other.stream_id)):   # ids are never reused (per store)
            assert given not in {ids[i] for ids in self.live.values()} | {ids[i] for ids in self.dead}
        self.live[name] = (mem.stream_id, other.stream_id, partitions)
        for p in range(partitions):
            self.expected_next[(mem.stream_id, p)] = 0

    @rule(name=st.sampled_from(NAMES))
    def drop(self, name: tuple[str, str]) -> None:
        ids = self.live.get(name, (10**9, 10**9))
        outcome = self._both(lambda store, index: store.drop_stream(ids[index]))
        if name in self.live:
            assert outcome == ("ok", None)
            mem_id, other_id, _ = self.live.pop(name)
            self.dead.append((mem_id, other_id))
        else:
            assert outcome == ("error", ErrorCode.STREAM_NOT_FOUND)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n_batches=st.integers(1, 4), include_dead=st.booleans())
    def append(self, data: st.DataObject, n_batches: int, include_dead: bool) -> None:
        plan = []  # (memory id, rocks id, partition, ts, items); a dropped stream may be mixed in
        for _ in range(n_batches):
            name, p = self._pick(data)
            mem_id, other_id, _ = self.live[name]
            plan.append((mem_id, other_id, p, data.draw(timestamps, label="ts"), data.draw(items, label="items")))
        if include_dead and self.dead:
            mem_id, other_id = data.draw(st.sampled_from(self.dead), label="dead")
            at = data.draw(st.integers(0, len(plan)), label="dead at")
            plan.insert(at, (mem_id, other_id, 0, 1, [(None, b"lost")]))
        outcome = self._both(lambda store, index: store.append(
            [AppendBatch(ids[index], p, ts, its) for *ids, p, ts, its in plan]))
        firsts = outcome[1]
        assert outcome[0] == "ok" and len(firsts) == len(plan)
        dead_ids = {m for m, _ in self.dead}
        for (mem_id, _, p, _, its), first in zip(plan, firsts):
            if mem_id in dead_ids:
                assert first is None
                continue
            assert first == self.expected_next[(mem_id, p)]    # consecutive, no gaps, across batches
            self.expected_next[(mem_id, p)] += len(its)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), offset=st.integers(-3, 30), limit=st.integers(1, 12), max_bytes=st.integers(0, 80))
    def read(self, data: st.DataObject, offset: int, limit: int, max_bytes: int) -> None:
        name, p = self._pick(data)
        mem_id, other_id, _ = self.live[name]
        first, next_seq, _ = self.run(self.memory.bounds(mem_id, p))
        start = max(0, first + offset)
        outcome = self._both(lambda store, index: store.read((mem_id, other_id)[index], p, start, limit, max_bytes))
        records = outcome[1]
        assert outcome[0] == "ok"
        from_ = max(start, first)
        assert [r.seq for r in records] == list(range(from_, from_ + len(records)))
        assert len(records) <= limit
        if from_ < next_seq:
            assert records                                      # at least one when one exists
        if len(records) > 1:
            assert sum(len(r.data) for r in records) <= max_bytes

    @precondition(lambda self: self.live)
    @rule(data=st.data(), ts=st.integers(-1, 5_100), nudge=st.sampled_from([None, -1, 0, 1]))
    def seq_at_time(self, data: st.DataObject, ts: int, nudge: int | None) -> None:
        name, p = self._pick(data)
        mem_id, other_id, _ = self.live[name]
        stamps = sorted({r.timestamp_ms for r in self.run(self.memory.read(mem_id, p, 0, BIG, BIG))})
        if stamps and nudge is not None:  # exactly at, or just beside, a stored timestamp
            ts = data.draw(st.sampled_from(stamps), label="stored ts") + nudge
        outcome = self._both(lambda store, index: store.seq_at_time((mem_id, other_id)[index], p, ts))
        first, next_seq, _ = self.run(self.memory.bounds(mem_id, p))
        assert outcome[0] == "ok" and first <= outcome[1] <= next_seq

    def _non_empty(self) -> list[tuple[str, int]]:
        return [(name, p) for name, (mem_id, _, count) in sorted(self.live.items()) for p in range(count)
                if self.run(self.memory.bounds(mem_id, p)).first_seq < self.run(self.memory.bounds(mem_id, p)).next_seq]

    @precondition(lambda self: self._non_empty())
    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        """Cut at least one record, sometimes past next_seq (clamped)."""
        name, p = data.draw(st.sampled_from(self._non_empty()), label="partition")
        mem_id, other_id, _ = self.live[name]
        first, next_seq, _ = self.run(self.memory.bounds(mem_id, p))
        before = first + data.draw(st.integers(1, next_seq - first + 3), label="cut")
        assert self._both(lambda store, index: store.trim((mem_id, other_id)[index], p, before)) == ("ok", None)
        assert self.run(self.memory.bounds(mem_id, p)).first_seq == min(before, next_seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), back=st.integers(0, 3))
    def trim_behind(self, data: st.DataObject, back: int) -> None:
        """A cut at or before first_seq changes nothing."""
        name, p = self._pick(data)
        mem_id, other_id, _ = self.live[name]
        before = max(0, self.run(self.memory.bounds(mem_id, p)).first_seq - back)
        assert self._both(lambda store, index: store.trim((mem_id, other_id)[index], p, before)) == ("ok", None)

    @rule()
    def restart_other(self) -> None:
        self.run(self.other.close())
        self.other = self.open_other()

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def stores_agree(self) -> None:
        assert [c.key for c in self.run(self.memory.list_streams())] \
            == [c.key for c in self.run(self.other.list_streams())] == sorted(self.live)
        for mem_id, other_id, partitions in self.live.values():
            for p in range(partitions):
                bounds = self.run(self.memory.bounds(mem_id, p))
                assert self.run(self.other.bounds(other_id, p)) == bounds
                assert bounds.next_seq == self.expected_next[(mem_id, p)]
                seen_first, seen_next = self.seen.get((mem_id, p), (0, 0))
                assert bounds.first_seq >= seen_first and bounds.next_seq >= seen_next
                self.seen[(mem_id, p)] = (bounds.first_seq, bounds.next_seq)
                everything = self.run(self.memory.read(mem_id, p, 0, BIG, BIG))
                assert self.run(self.other.read(other_id, p, 0, BIG, BIG)) == everything
                assert [r.seq for r in everything] == list(range(bounds.first_seq, bounds.next_seq))
                stamps = [r.timestamp_ms for r in everything]
                assert stamps == sorted(stamps)
                assert not everything or stamps[-1] == bounds.last_ts


# derandomize: the same examples on every run (the suite must be deterministic). It also turns
# off the example database, so a failure seen once elsewhere cannot change what runs here.
StoresAgree.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None, derandomize=True)
TestStoresAgree = StoresAgree.TestCase


class JetStreamAgrees(StoresAgree):
    """The same machine over a JetStream store on the session's single-node nats-server (R=1)."""
    server: NatsServer | None = None   # set by the test below

    def open_other(self) -> Store:
        assert self.server is not None
        if not hasattr(self, "prefix"):
            self.prefix = fresh_prefix()
        return self.run(JetStreamStore.open([self.server.url], prefix=self.prefix, replicas=1))

    def teardown(self) -> None:
        super().teardown()
        assert self.server is not None
        delete_prefix_sync(self.server.url, self.prefix)


def test_jetstream_agrees_with_the_model(jetstream_server: NatsServer) -> None:
    JetStreamAgrees.server = jetstream_server
    run_state_machine_as_test(JetStreamAgrees, settings=settings(max_examples=50, stateful_step_count=30,
                                                                 deadline=None, derandomize=True))
