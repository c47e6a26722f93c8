"""GroupConsumer at its edges, against real brokers (found by the scaling probe): a group reading
from LATEST when a scale-up adds partitions, a member whose handled batch retention trims before
it commits, and a member that loses its lease while its handler runs."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from conftest import eventually

from broker.launcher import BrokerProcess
from client import Client, GroupConsumer, Record

CLOCK = Path(__file__).with_name("clock")   # its sitecustomize.py moves a broker's wall clock
TIMEOUT = 30.0


class Handled:
    """What a group's handler saw, thread-safe; `gate` (when given) holds the first batch."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.seen: list[tuple[int, int]] = []
        self.gate, self.held = gate, threading.Event()
        self._lock = threading.Lock()

    def __call__(self, partition: int, records: list[Record]) -> None:
        if self.gate is not None and not self.held.is_set():
            self.held.set()
            self.gate.wait(TIMEOUT)
        with self._lock:
            self.seen += [(partition, r.seq) for r in records]

    def count(self) -> int:
        with self._lock:
            return len(self.seen)


def test_a_group_at_latest_reads_the_partitions_a_scale_up_adds_from_their_start(broker: BrokerProcess,
                                                                                   stream_name: str) -> None:
    """Such a partition was started at LATEST when its worker began, after the records already
    written to it: 180 of 400 records written while the group ran were never handled."""
    handled = Handled()
    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream(stream_name, 2)
        with GroupConsumer(broker.grpc_target, "latest-app", stream_name, handled, lease_ms=3000,
                           start="LATEST") as group:
            eventually(lambda: group.assignment == {0, 1}, timeout=TIMEOUT)
            c.update_partition_count(stream_name, 4)
            written = {(r.partition_id, r.seq) for r in c.put_records(
                stream_name, [(b"r%d" % i, f"k{i}") for i in range(400)])}
            # the new partitions' records (those of 0 and 1 may come before those workers have
            # taken their LATEST position: LATEST is where a consumer first reads)
            added = {(p, seq) for p, seq in written if p >= 2}
            assert {p for p, _ in added} == {2, 3}
            eventually(lambda: added <= set(handled.seen), timeout=TIMEOUT)


def test_a_group_at_latest_skips_what_partitions_held_before_its_app(broker: BrokerProcess,
                                                                     stream_name: str) -> None:
    """The line of the rule above is the app's creation: a stream scaled and written to before the
    group (and its app) existed gives a group at LATEST none of those records (taking the app's
    creation as the line, an app made by hand first would replay them: at-least-once)."""
    handled = Handled()
    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream(stream_name, 2)
        c.update_partition_count(stream_name, 4)
        c.put_records(stream_name, [(b"old%d" % i, f"k{i}") for i in range(200)])
        with GroupConsumer(broker.grpc_target, f"late-{stream_name}", stream_name, handled, lease_ms=3000,
                           start="LATEST") as group:
            eventually(lambda: group.assignment == {0, 1, 2, 3}, timeout=TIMEOUT)
            eventually(lambda: all(c.get_checkpoint(f"late-{stream_name}", stream_name, p) is not None
                                   for p in range(4)), timeout=TIMEOUT)   # each worker has started where LATEST was
            new = {(r.partition_id, r.seq) for r in c.put_records(stream_name, [(b"new%d" % i, f"k{i}")
                                                                                for i in range(200)])}
            eventually(lambda: new <= set(handled.seen), timeout=TIMEOUT)
            assert set(handled.seen) == new, "nothing written before the group started"


def test_a_member_whose_handled_batch_expired_goes_on(start_broker: Callable[..., BrokerProcess],
                                                      tmp_path: Path) -> None:
    """Retention trimmed the batch the handler was working on; the broker then refused its
    checkpoint (SEQUENCE_OUT_OF_RANGE, as it must), and the member stopped as on a fatal error.
    The members that lag - those near the retention edge - were the ones killed."""
    clock = tmp_path / "clock"
    clock.write_text("0")
    broker = start_broker("--retention-interval", "0.5", env={
        "PYTHONPATH": os.pathsep.join([str(CLOCK), os.environ.get("PYTHONPATH", "")]),
        "SLUICE_TEST_CLOCK_FILE": str(clock)})
    assert broker.proc is not None

    def jump(hours: float) -> None:
        clock.write_text(str(hours))
        broker.proc.send_signal(signal.SIGUSR1)   # type: ignore[union-attr]

    gate = threading.Event()
    handled = Handled(gate)
    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream("edge", 1)   # retention 24 h
        c.put_records("edge", [b"old-%d" % i for i in range(100)], partition_id=0)
        jump(23)
        time.sleep(0.5)   # the signal is handled at the broker's next bytecode; checked just below
        c.put_records("edge", [b"new-%d" % i for i in range(100)], partition_id=0)
        first = c.get_cursor("edge", 0, "TRIM_HORIZON")
        old, new = c.get_records(first, limit=200).records[::100]
        assert new.timestamp_ms - old.timestamp_ms > 22 * 3_600_000, "the broker's clock moved between the puts"
        group = GroupConsumer(broker.grpc_target, "edge-app", "edge", handled, lease_ms=6000, batch=10,
                              checkpoint_every=1)
        with group:
            assert handled.held.wait(TIMEOUT), "the first batch reached the handler"
            jump(25)   # the old records are past the retention now: the next pass trims them
            eventually(lambda: c.describe_stream("edge").partitions[0].first_seq == 100, timeout=TIMEOUT)
            gate.set()
            eventually(lambda: handled.count() >= 110 and c.get_checkpoint("edge-app", "edge", 0) is not None
                       and c.get_checkpoint("edge-app", "edge", 0).seq == 199, timeout=TIMEOUT)  # type: ignore[union-attr]
            assert group.assignment == {0}, "the member goes on"
        assert [s for _, s in handled.seen][:10] == list(range(10))


def test_a_member_that_lost_its_lease_does_not_commit_what_its_handler_finished_after(
        broker: BrokerProcess, stream_name: str) -> None:
    """Its workers are stopped without committing (another member may own the partition by
    then), but the commit after a running handler returned came all the same, and moved the new
    owner's checkpoint back. The lease is lost here as the heartbeat loop loses it."""
    gate = threading.Event()
    handled = Handled(gate)
    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream(stream_name, 1)
        c.put_records(stream_name, [b"x"] * 20, partition_id=0)
        group = GroupConsumer(broker.grpc_target, "zombie-app", stream_name, handled, lease_ms=6000, batch=10,
                              checkpoint_every=1)
        with group:
            assert handled.held.wait(TIMEOUT)
            group._stopping.set()   # no heartbeat grants the partition again: the test is about this worker
            group._revoke(set(), commit=False)   # what _heartbeat_loop does when the lease runs out
            gate.set()
            eventually(lambda: group.assignment == set(), timeout=TIMEOUT)   # the worker ended
            assert handled.count() == 10
            assert c.get_checkpoint("zombie-app", stream_name, 0) is None


def test_after_a_scale_down_both_members_get_a_written_partition(broker: BrokerProcess, stream_name: str) -> None:
    """Scale-down 4 -> 2 with two members: the one that had partitions 2 and 3 kept just those -
    closed, never written again - and went idle once it drained them, while the other did all the
    work. Written and closed partitions are shared out each on their own (heartbeats counted in
    rounds, no clock: each round is every member's heartbeat with what it was given)."""
    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream(stream_name, 4)
        c.create_app(stream_name)
        assert c.heartbeat(stream_name, stream_name, "w").partition_ids   # a new group: no restart grace
        c.leave_group(stream_name, stream_name, "w")
        got: dict[str, list[int]] = {"a": [], "b": []}

        def rounds(n: int) -> None:
            for _ in range(n):
                for m in got:
                    got[m] = c.heartbeat(stream_name, stream_name, m, got[m]).partition_ids
        rounds(3)
        assert got == {"a": [0, 1], "b": [2, 3]}
        assert c.update_partition_count(stream_name, 2) == (4, 2)
        rounds(3)
    assert sorted(got["a"] + got["b"]) == [0, 1, 2, 3]
    assert [p for p in got["a"] if p < 2] and [p for p in got["b"] if p < 2], got


def test_a_step_of_the_brokers_wall_clock_moves_no_lease(start_broker: Callable[..., BrokerProcess],
                                                         tmp_path: Path) -> None:
    """A broker that serves its store alone keeps the group leases in its memory, and their expiries
    were its wall clock. Stepped forward (NTP setting a clock right, a VM resumed), every live
    member's lease looked run out: the next member to heartbeat was given the others' partitions
    while they still worked on them - two live members on one partition. Stepped back, a member that
    had stopped kept its partitions for as long as the step, not one lease."""
    clock = tmp_path / "clock"
    clock.write_text("0")
    broker = start_broker(env={"PYTHONPATH": os.pathsep.join([str(CLOCK), os.environ.get("PYTHONPATH", "")]),
                               "SLUICE_TEST_CLOCK_FILE": str(clock)})
    assert broker.proc is not None

    def jump(hours: float) -> None:
        clock.write_text(str(hours))
        broker.proc.send_signal(signal.SIGUSR1)   # type: ignore[union-attr]
        time.sleep(0.5)   # handled at the broker's next bytecode

    with Client(broker.grpc_target, timeout=TIMEOUT) as c:
        c.create_stream("steps", 2)
        c.create_app("steps")
        # a works on 0, b on 1: a alone gets both, and lets 1 go for b
        assert c.heartbeat("steps", "steps", "a", [], 30_000).partition_ids == [0, 1]
        assert c.heartbeat("steps", "steps", "b", [], 30_000).partition_ids == []
        assert c.heartbeat("steps", "steps", "a", [0, 1], 30_000).partition_ids == [0]   # 1 revoked
        assert c.heartbeat("steps", "steps", "a", [0], 30_000).partition_ids == [0]
        assert c.heartbeat("steps", "steps", "b", [], 30_000).partition_ids == [1]
        jump(1)
        assert c.heartbeat("steps", "steps", "a", [0], 30_000).partition_ids == [0], "b is alive: 1 is b's"
        assert c.heartbeat("steps", "steps", "b", [1], 1_000).partition_ids == [1]   # b's last heartbeat
        jump(0)
        time.sleep(1.0)   # b's lease has run out
        assert c.heartbeat("steps", "steps", "a", [0], 1_000).partition_ids == [0, 1], "b stopped a lease ago"
