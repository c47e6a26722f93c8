"""Consumer group under a crash: three member processes (tests/e2e/group_worker.py) share a
6-partition stream while a producer writes continuously; one member is SIGKILLed mid-stream.

Checked: its partitions are taken over within the lease (+2 s); no two members ever hold a
partition at the same moment (by the times the members report); every record is handled at least
once; each member handles a partition in order, without gaps within one assignment; and the only
records handled twice are ones the killed member handled after its last committed checkpoint."""
from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from conftest import eventually

from broker.launcher import BrokerProcess
from client import Client, Producer

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("group_worker.py")
PARTITIONS = 6
LEASE_MS = 3000


class Member:
    """One worker process; its stdout events are collected with their arrival time."""

    def __init__(self, name: str, target: str, app: str, stream: str, *extra: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--target", target, "--app", app, "--stream", stream, "--member", name,
             "--lease-ms", str(LEASE_MS), "--checkpoint-every", "50", "--checkpoint-interval", "0.5", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.partial: list[str] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._drain_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:   # only a line cut short by SIGKILL may be incomplete
                self.partial.append(line)
                continue
            with self._lock:
                self.events.append((time.monotonic(), event))

    def _drain_stderr(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.stderr.append(line)

    def snapshot(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return list(self.events)

    def held(self) -> set[int]:
        owned: set[int] = set()
        for _, e in self.snapshot():
            if "assign" in e:
                owned.add(e["assign"])
            elif "release" in e:
                owned.discard(e["release"])
        return owned

    def commits(self) -> dict[int, int]:
        return {e["commit"]: e["seq"] for _, e in self.snapshot() if "commit" in e}

    def records(self) -> list[dict[str, Any]]:
        return [e for _, e in self.snapshot() if "seq" in e and "partition" in e]

    def finish(self, timeout: float = 5) -> None:
        for t in self._readers:
            t.join(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def members() -> Iterator[list[Member]]:
    started: list[Member] = []
    yield started
    for m in started:
        if m.proc.poll() is None:
            m.kill()
        m.finish()
        for pipe in (m.proc.stdout, m.proc.stderr):
            if pipe:
                pipe.close()


class Writer:
    """Writes keyed records (payload = a unique id) at a moderate rate until stopped."""

    def __init__(self, client: Client, stream: str) -> None:
        self.producer = Producer(client, stream, linger_ms=5)
        self.futures: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_id = 0
        while not self.stop.is_set():
            for _ in range(20):
                self.futures.append(self.producer.send(str(next_id).encode(), partition_key=f"key-{next_id}"))
                next_id += 1
            self.stop.wait(0.05)     # ~400 records/s over 6 partitions

    def finish(self) -> dict[tuple[int, int], int]:
        """Stop, flush, and return {(partition, seq): id} of everything written."""
        self.stop.set()
        self.thread.join(10)
        self.producer.close(30)
        written = {}
        for i, f in enumerate(self.futures):
            r = f.result(1)
            assert r.ok, r
            written[(r.partition_id, r.seq)] = i
        return written


@pytest.mark.slow
def test_group_survives_a_member_crash(broker: BrokerProcess, stream_name: str, members: list[Member]) -> None:
    crash_scenario(broker.grpc_target, stream_name, members, [(), (), ()])


def crash_scenario(target: str, stream_name: str, members: list[Member], extras: list[tuple[str, ...]],
                   create: bool = True, member_targets: Sequence[str] | None = None) -> None:
    """Three members (m1 the victim; `extras`: each one's extra group_worker.py arguments) on a
    stream written through `target` (created here unless `create` is False), checked by
    verify_after_crash. `member_targets`: the broker each member uses for everything (reads,
    checkpoints, heartbeats); `target` for all three if None."""
    app = f"app-{stream_name}"
    client = Client(target, timeout=10)
    writer = Writer(client, stream_name)
    try:
        if create:
            client.create_stream(stream_name, PARTITIONS)
        writer.thread.start()
        for name, extra, member_target in zip(("m0", "m1", "m2"), extras, member_targets or [target] * 3):
            members.append(Member(name, member_target, app, stream_name, *extra))

        # 1. the group settles: two partitions each, all six covered
        def balanced() -> bool:
            held = [m.held() for m in members]
            return all(len(h) == 2 for h in held) and set().union(*held) == set(range(PARTITIONS))
        eventually(balanced, timeout=20)
        victim, survivors = members[1], [members[0], members[2]]
        doomed = victim.held()
        # it has handled and committed on both its partitions, so the crash cuts into real work
        eventually(lambda: doomed <= set(victim.commits()), timeout=10)

        # 2. SIGKILL mid-stream
        victim.kill()
        killed_at = time.monotonic()
        desc = client.describe_stream(stream_name)
        after_kill = {p: desc.partitions[p].next_seq for p in doomed}   # written after the kill

        def taken_over() -> bool:
            return all(any(r["partition"] == p and r["seq"] >= after_kill[p] for s in survivors for r in s.records())
                       for p in doomed)
        eventually(taken_over, timeout=LEASE_MS / 1000 + 2)
        takeover_s = time.monotonic() - killed_at
        # and they go on with what is written meanwhile
        eventually(lambda: all(any(r["partition"] == p and r["seq"] >= after_kill[p] + 100
                                   for s in survivors for r in s.records()) for p in doomed), timeout=10)
        assert all(any(p in s.held() for s in survivors) for p in doomed)

        # 3. the producer finishes, the survivors drain everything
        written = writer.finish()
        handled = lambda: {(r["partition"], r["seq"]) for m in members for r in m.records()}  # noqa: E731
        eventually(lambda: set(written) <= handled(), timeout=15)
        for s in survivors:
            s.proc.send_signal(signal.SIGTERM)
        for s in survivors:
            assert s.proc.wait(15) == 0, "".join(s.stderr[-20:])
        for m in members:
            m.finish()
    finally:
        writer.stop.set()
        writer.thread.join(10)
        writer.producer.close(5)
        client.close()

    print(f"takeover after {takeover_s:.2f}s; {len(written)} records written")
    verify_after_crash(members, victim, survivors, doomed, written, killed_at)


def check_exclusive(members: list[Member], victim: Member, killed_at: float) -> None:
    """Exclusive ownership at every moment: per partition, the members' holdings - from the time a
    member reports a grant (after the heartbeat answer) to the time it reports the release (before
    the partition leaves its heartbeats), or to the kill for the victim - never overlap. The times
    are the members' own time.monotonic() stamps, one clock for all processes on this host."""
    spans: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    end = time.monotonic()
    for m in members:
        since: dict[int, float] = {}
        for _, e in m.snapshot():
            if "assign" in e:
                assert e["assign"] not in since, f"{m.name} granted p{e['assign']} twice without a release"
                since[e["assign"]] = e["t"]
            elif "release" in e:
                p = e["release"]
                spans[p].append((since.pop(p), e["t"], m.name))
        for p, t in since.items():   # still held at the end (or at the kill)
            spans[p].append((t, killed_at if m is victim else end, m.name))
    for p, held in sorted(spans.items()):
        held.sort()
        for (_, until, before), (start, _, after) in itertools.pairwise(held):
            assert start >= until, f"p{p}: {after} got it at {start:.3f} while {before} held it until {until:.3f}"
    print("ownership: " + "; ".join(f"p{p}: " + " ".join(name for _, _, name in sorted(held))
                                    for p, held in sorted(spans.items())))


def verify_after_crash(members: list[Member], victim: Member, survivors: list[Member], doomed: set[int],
                       written: dict[tuple[int, int], int], killed_at: float) -> None:
    """No partition held by two members at once; every record handled with the payload written at
    its position; in order within each assignment; the only duplicates are the victim's records
    after its last checkpoint, once more by the one survivor that resumed its partition right after
    that checkpoint."""
    check_exclusive(members, victim, killed_at)
    # every record was handled, and carries the payload written at its position
    all_records = [(m.name, r) for m in members for r in m.records()]
    for _, r in all_records:
        assert written[(r["partition"], r["seq"])] == r["id"]
    per_partition: dict[int, set[int]] = defaultdict(set)
    for _, r in all_records:
        per_partition[r["partition"]].add(r["seq"])
    for p in range(PARTITIONS):
        n = sum(1 for (q, _) in written if q == p)
        assert n > 0 and per_partition[p] == set(range(n)), f"partition {p}: handled set is not 0..{n - 1}"

    # order: within each assignment a member handles consecutive seqs; across its assignments, increasing
    for m in members:
        runs: dict[int, list[int]] = {}
        last: dict[int, int] = {}
        for _, e in m.snapshot():
            if "assign" in e:
                runs[e["assign"]] = []
            elif "seq" in e and "partition" in e:
                p, seq = e["partition"], e["seq"]
                run = runs[p]      # a record is only ever handled inside an assignment
                assert not run or seq == run[-1] + 1, f"{m.name} p{p}: gap or reorder {run[-1]} -> {seq}"
                assert seq > last.get(p, -1), f"{m.name} p{p}: went back from {last[p]} to {seq}"
                run.append(seq)
                last[p] = seq

    # duplicates: only records the victim handled after its last committed checkpoint, once more by a survivor
    victim_commits = victim.commits()
    victim_handled = Counter((r["partition"], r["seq"]) for r in victim.records())
    counts = Counter((r["partition"], r["seq"]) for _, r in all_records)
    dups = {pos: c for pos, c in counts.items() if c > 1}
    for (p, seq), c in dups.items():
        assert c == 2 and victim_handled[(p, seq)] == 1, f"p{p} seq {seq} handled {c} times"
        assert p in doomed and seq > victim_commits[p], f"p{p} seq {seq} duplicated at/below checkpoint"
    for p in doomed:
        # exactly one survivor took p over after the kill, and resumed right after a checkpoint the
        # victim committed: no earlier than the last one it reported, no later than the last
        # record it handled (so no gap)
        resumed = []
        for s in survivors:
            taking = False
            for t, e in s.snapshot():
                if e.get("assign") == p and t > killed_at:
                    taking = True
                elif taking and e.get("partition") == p and "seq" in e:
                    resumed.append(e["seq"])
                    break
        assert len(resumed) == 1, resumed
        victim_last = max(seq for (q, seq) in victim_handled if q == p)
        assert victim_commits[p] + 1 <= resumed[0] <= victim_last + 1, (p, victim_commits[p], resumed, victim_last)
    print(f"duplicates: {len(dups)} (victim's uncommitted tail); partial lines: {len(victim.partial)}")
