"""Consumer-group leases (broker/core/leases.py) with a fake clock: the table is pure, so time is
an integer the test moves and every heartbeat says when it happens.

First hand-written scenarios, then a hypothesis state machine in which members join, heartbeat
(still holding revoked partitions for a while, or releasing them), leave and die, while the clock
moves. After every step no partition is worked on by two members whose leases are current; from
time to time the group is settled (the dead expire, everybody heartbeats with what it was given)
and must then be balanced and cover every partition.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.core.leases import LeaseTable

APP, SID = "app", 7
LEASE = 1000


def hb(table: LeaseTable, member: str, held: set[int] | list[int] = (), now: int = 0,  # type: ignore[assignment]
       partitions: int = 4, lease: int = LEASE, app: str = APP, sid: int = SID) -> list[int]:
    return table.heartbeat(app, sid, partitions, member, set(held), lease, now)


# -- scenarios -------------------------------------------------------------------------------------


def test_a_lone_member_gets_every_partition_sorted() -> None:
    table = LeaseTable()
    assert hb(table, "a", now=0, partitions=5) == [0, 1, 2, 3, 4]
    assert table.owners(APP, SID) == dict.fromkeys(range(5), "a")
    assert hb(table, "a", [0, 1, 2, 3, 4], now=300, partitions=5) == [0, 1, 2, 3, 4]


def test_a_second_member_waits_for_the_first_to_release_then_the_split_is_balanced() -> None:
    table = LeaseTable()
    assert hb(table, "a", now=0) == [0, 1, 2, 3]
    assert hb(table, "b", now=10) == []                    # a still owns everything: nothing granted yet
    mine = hb(table, "a", [0, 1, 2, 3], now=20)            # a is told to keep two (sticky: its lowest)
    assert mine == [0, 1]
    assert hb(table, "b", now=30) == []                    # a has not released 2 and 3 yet
    assert table.owners(APP, SID) == {0: "a", 1: "a", 2: "a", 3: "a"}
    assert hb(table, "a", mine, now=40) == [0, 1]          # released: it heartbeats without them
    assert hb(table, "b", now=50) == [2, 3]
    assert table.owners(APP, SID) == {0: "a", 1: "a", 2: "b", 3: "b"}
    # stable from here on
    assert hb(table, "a", [0, 1], now=60) == [0, 1] and hb(table, "b", [2, 3], now=70) == [2, 3]


def test_uneven_counts_differ_by_at_most_one() -> None:
    table = LeaseTable()
    members = ["a", "b", "c"]
    answers: dict[str, list[int]] = {m: [] for m in members}
    for now in range(0, 2000, 100):                        # a few rounds: everyone holds what it was given
        for m in members:
            answers[m] = hb(table, m, answers[m], now=now, partitions=7)
    counts = sorted(len(a) for a in answers.values())
    assert counts == [2, 2, 3]
    assert sorted(p for a in answers.values() for p in a) == list(range(7))


def test_a_member_still_finishing_a_revoked_partition_keeps_it_while_it_heartbeats() -> None:
    """Hand-over waits for the release for as long as the old owner is alive and still holds the
    partition - even when that takes longer than a lease. (A revoked partition's lease used not to be
    renewed by the holder's heartbeats, so it lapsed one lease after its last grant and was granted
    to the newcomer while the old owner was still working on it.)"""
    table = LeaseTable()
    assert hb(table, "a", now=0, partitions=2) == [0, 1]
    assert hb(table, "b", now=100, partitions=2) == []
    now = 100
    for _ in range(20):                                    # 6 leases long, a heartbeating every 300 ms
        now += 300
        assert hb(table, "a", {0, 1}, now=now, partitions=2) == [0]   # 1 is revoked, a still works on it
        assert hb(table, "b", now=now + 150, partitions=2) == [], now
        assert table.owners(APP, SID)[1] == "a"
    assert hb(table, "a", {0}, now=now + 200, partitions=2) == [0]    # released at last
    assert hb(table, "b", now=now + 250, partitions=2) == [1]


def test_a_dead_members_partitions_are_free_once_its_lease_has_passed() -> None:
    table = LeaseTable()
    answers = {m: hb(table, m, now=0) for m in ("a", "b")}
    answers = {m: hb(table, m, answers[m], now=10) for m in ("a", "b")}
    answers = {m: hb(table, m, answers[m], now=20) for m in ("a", "b")}
    assert answers == {"a": [0, 1], "b": [2, 3]}
    last_b = 20                                             # b dies: no heartbeat after this one
    assert hb(table, "a", [0, 1], now=last_b + LEASE) == [0, 1]        # at the expiry instant b still holds
    assert table.owners(APP, SID) == {0: "a", 1: "a", 2: "b", 3: "b"}
    assert hb(table, "a", [0, 1], now=last_b + LEASE + 1) == [0, 1, 2, 3]
    assert table.owners(APP, SID) == dict.fromkeys(range(4), "a")


def test_leave_frees_partitions_at_once() -> None:
    table = LeaseTable()
    a = hb(table, "a", now=0)
    hb(table, "b", now=1)
    a = hb(table, "a", a, now=2)
    hb(table, "a", a, now=3)
    assert hb(table, "b", now=4) == [2, 3]
    table.leave(APP, SID, "b")
    assert table.owners(APP, SID) == {0: "a", 1: "a"}
    assert hb(table, "a", [0, 1], now=5) == [0, 1, 2, 3]
    table.leave(APP, SID, "nobody")                          # unknown member / group: a no-op
    table.leave("other-app", SID, "a")
    assert table.owners(APP, SID) == dict.fromkeys(range(4), "a")


def test_held_claims_re_establish_leases_that_lapsed_or_were_lost() -> None:
    """`held` is a claim: a member whose lease lapsed (or that finds an empty table) keeps what it
    still holds, as long as nobody else was granted it meanwhile."""
    table = LeaseTable()
    long = 10 * LEASE
    a = hb(table, "a", now=0, lease=long)
    hb(table, "b", now=0)
    for now in (10, 20):
        a = hb(table, "a", a, now=now, lease=long)
        b = hb(table, "b", now=now)
    assert (a, b) == ([0, 1], [2, 3])
    # b's lease lapses with nobody heartbeating in between: its claim brings it all back
    assert hb(table, "b", {2, 3}, now=20 + 3 * LEASE) == [2, 3]
    assert table.owners(APP, SID) == {0: "a", 1: "a", 2: "b", 3: "b"}
    assert hb(table, "a", {0, 1}, now=20 + 3 * LEASE + 1, lease=long) == [0, 1]
    # an empty table (no restart grace): a claim is granted even where the
    # balance would not put it, and a newcomer gets nothing that is claimed
    table = LeaseTable()
    assert hb(table, "b", {2, 3}, now=0, partitions=6) == [0, 1, 2, 3, 4, 5]   # alone: claims + the free rest
    b = hb(table, "b", {0, 1, 2, 3, 4, 5}, now=1, partitions=6)
    assert hb(table, "c", now=2, partitions=6) == []        # everything is b's until it releases
    assert b == [0, 1, 2, 3, 4, 5]
    # claims outside the stream are ignored
    assert hb(LeaseTable(), "x", {-1, 0, 9}, now=0, partitions=2) == [0, 1]


def test_groups_are_separate_per_app_and_stream_and_forget_stream_drops_them() -> None:
    table = LeaseTable()
    assert hb(table, "a", now=0, app="app1", sid=1) == [0, 1, 2, 3]
    assert hb(table, "b", now=0, app="app2", sid=1) == [0, 1, 2, 3]    # another app: its own group
    assert hb(table, "c", now=0, app="app1", sid=2) == [0, 1, 2, 3]    # another stream: its own group
    table.forget_stream(1)
    assert table.owners("app1", 1) == {} and table.owners("app2", 1) == {}
    assert table.owners("app1", 2) == dict.fromkeys(range(4), "c")


def test_fewer_partitions_than_members_and_a_shrinking_partition_count() -> None:
    table = LeaseTable()
    got: dict[str, list[int]] = {m: [] for m in "abc"}
    for now in (0, 10, 20, 30):   # join; a is revoked 1; a releases it; b is granted it
        got = {m: hb(table, m, got[m], now=now + i, partitions=2) for i, m in enumerate("abc")}
    assert got == {"a": [0], "b": [1], "c": []}   # shares by member name: the first P members get one
    # partitions beyond the count are not granted nor renewed, and lapse with their lease
    table = LeaseTable()
    assert hb(table, "a", now=0, partitions=4) == [0, 1, 2, 3]
    assert hb(table, "a", {0, 1, 2, 3}, now=1, partitions=2) == [0, 1]
    assert hb(table, "a", {0, 1}, now=LEASE + 1, partitions=2) == [0, 1]
    assert table.owners(APP, SID) == {0: "a", 1: "a"}


def test_a_heartbeat_through_a_broker_behind_a_scale_up_frees_nothing() -> None:
    """Brokers on one store: a scale-up 2 -> 4 seen by one broker, not yet by another. A heartbeat
    through the second one (count 2) dropped the first member's leases on 2 and 3, so the next
    member through the first broker was granted 3 while its owner still worked on it."""
    table = LeaseTable()
    assert hb(table, "m1", now=0, partitions=2) == [0, 1]
    assert hb(table, "m1", {0, 1}, now=100, partitions=4) == [0, 1, 2, 3]
    assert hb(table, "m2", now=200, partitions=2) == []           # the broker behind
    assert hb(table, "m3", now=300, partitions=4) == []           # nothing free: m1 has revocations to finish
    assert table.owners(APP, SID) == {0: "m1", 1: "m1", 2: "m1", 3: "m1"}


def test_after_a_scale_down_the_written_partitions_are_shared_not_left_to_one_member() -> None:
    """Scale-down 4 -> 2: partitions 2 and 3 are closed (readable until retention, never written
    again). They were balanced as work like the rest, so the member that owned them kept them and
    nothing more - idle once it drained them - while the other got both written ones. Written and
    closed partitions are now shared out each on their own."""
    table = LeaseTable()
    got: dict[str, list[int]] = {"a": [], "b": []}
    for now in (0, 10, 20, 30):
        got = {m: hb(table, m, got[m], now=now + i) for i, m in enumerate("ab")}
    assert got == {"a": [0, 1], "b": [2, 3]}

    def step(now: int) -> dict[str, list[int]]:
        return {m: table.heartbeat(APP, SID, 4, m, set(got[m]), LEASE, now + i, active=2)
                for i, m in enumerate("ab")}
    for now in (100, 110, 120, 130):   # a is revoked 1, releases it; b is revoked 3, releases it; grants
        got = step(now)
    assert got == {"a": [0, 3], "b": [1, 2]}   # one written, one closed each; each kept what it could
    # 3 written, 1 closed: the closed one goes to the member given fewer written ones
    table, got = LeaseTable(), {"a": [], "b": []}
    for now in (0, 10, 20, 30):
        got = {m: table.heartbeat(APP, SID, 4, m, set(got[m]), LEASE, now + i, active=3) for i, m in enumerate("ab")}
    assert got == {"a": [0, 1], "b": [2, 3]}


# -- the state machine -----------------------------------------------------------------------------

MEMBER_NAMES = tuple(f"m{i}" for i in range(8))
LEASES = (600, 1000)


@dataclass
class Member:
    lease: int
    last_hb: int = 0
    answer: set[int] = field(default_factory=set)
    pending: set[int] = field(default_factory=set)   # revoked, still being finished (still in `held`)
    alive: bool = True                               # False: crashed, never heartbeats again
    history: list[tuple[int, set[int], list[int]]] = field(default_factory=list)  # (now, held, answer)

    def current(self, now: int) -> bool:
        """Its lease still runs: it may be working (on answer | pending) right now."""
        return now <= self.last_hb + self.lease

    def working(self, now: int) -> set[int]:
        return self.answer | self.pending if self.current(now) else set()


class LeaseGroup(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable()
        self.now = 0
        self.partitions = 1
        self.members: dict[str, Member] = {}

    @initialize(partitions=st.integers(1, 7))
    def setup(self, partitions: int) -> None:
        self.partitions = partitions

    # -- helpers -----------------------------------------------------------------------------------

    def _live(self) -> list[str]:
        return sorted(n for n, m in self.members.items() if m.alive)

    def _heartbeat(self, name: str, release: set[int] | None = None) -> None:
        """One heartbeat: `held` is what it was last given plus the revoked partitions it is still
        finishing, minus `release` (None = release them all). A member whose lease lapsed has
        stopped working: it holds (claims) only what it was last given."""
        m = self.members[name]
        lapsed = not m.current(self.now)
        if lapsed:
            m.pending = set()
        m.pending -= m.pending if release is None else release
        held = m.answer | m.pending
        answer = self.table.heartbeat(APP, SID, self.partitions, name, set(held), m.lease, self.now)
        assert answer == sorted(set(answer)) and all(0 <= p < self.partitions for p in answer)
        # the others' work, as it stands at this instant (before this member's answer counts)
        others = {p: o for o, om in self.members.items() if o != name for p in om.working(self.now)}
        clash = {p: others[p] for p in answer if p in others}
        assert not clash, (f"t={self.now}: {name} was granted {clash} - partitions another member with a "
                           f"current lease still works on; history {self._histories()}")
        m.history.append((self.now, held, answer))
        del m.history[:-6]
        # still finishing: what it held and was not given again (a lapsed member had stopped)
        m.pending = set() if lapsed else held - set(answer)
        m.answer = set(answer)
        m.last_hb = self.now
        # lapsed leases are gone from the table the moment anyone heartbeats after them
        for owner in set(self.table.owners(APP, SID).values()):
            om = self.members.get(owner)
            assert om is not None and om.current(self.now), f"t={self.now}: {owner} owns partitions past its lease"

    def _histories(self) -> dict[str, object]:
        return {n: (m.alive, m.last_hb, m.lease, m.history) for n, m in self.members.items()}

    # -- rules -------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.members) < len(MEMBER_NAMES))
    @rule(lease=st.sampled_from(LEASES))
    def join(self, lease: int) -> None:
        name = MEMBER_NAMES[len(self.members)]   # never reused: a restarted consumer gets a new id
        self.members[name] = Member(lease=lease, last_hb=self.now)
        self._heartbeat(name)

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data(), release_all=st.booleans())
    def heartbeat(self, data: st.DataObject, release_all: bool) -> None:
        name = data.draw(st.sampled_from(self._live()), label="member")
        pending = sorted(self.members[name].pending)
        release = None if release_all or not pending else set(data.draw(
            st.lists(st.sampled_from(pending), unique=True), label="release"))
        self._heartbeat(name, release)

    @rule(ms=st.integers(0, 700))
    def tick(self, ms: int) -> None:
        self.now += ms

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._live()), label="member")
        self.members[name].alive = False

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._live()), label="member")
        self.table.leave(APP, SID, name)
        m = self.members[name]
        m.alive = False
        m.answer, m.pending = set(), set()   # a clean exit: it stopped before it said goodbye
        assert name not in self.table.owners(APP, SID).values()

    @precondition(lambda self: bool(self._live()))
    @rule()
    def settle(self) -> None:
        """Every live member heartbeats each lease/3 with held = what it was last given, until the
        dead have expired and the answers stop changing. Then: balanced, every partition covered,
        and each dead member's partitions went to live members within one round of its expiry."""
        step = min(self.members[n].lease for n in self._live()) // 3
        # dead members whose lease still runs: the table cannot tell them from slow live ones yet
        dead_expiry = {n: m.last_hb + m.lease for n, m in self.members.items() if not m.alive and m.current(self.now)}
        dead_parts = {n: self.members[n].answer | self.members[n].pending for n in dead_expiry}
        horizon = max(dead_expiry.values(), default=self.now) + 1
        rounds = quiet = 0
        # At most: the dead expire (their lease / step rounds), then 1 round to revoke, 1 to release,
        # 1 to grant, 2 that confirm nothing changes.
        limit = max(LEASES) // step + 2 + 5
        due: dict[str, int] = {}   # dead member -> rounds left until its partitions must be re-granted
        while True:
            before = {n: set(self.members[n].answer) for n in self._live()}
            # A dead member's partitions are free at the first heartbeat after its lease. They are
            # granted in that same round, unless another dead member's lease still runs (it keeps
            # a share of the split until it expires) or a live member is still releasing revoked
            # partitions (this round releases them, the next grants): then one round later.
            others_dead = {n for n, e in dead_expiry.items() if self.now <= e}
            churn = any(self.members[n].pending for n in self._live())
            for n, expiry in dead_expiry.items():
                if n not in due and self.now > expiry and not others_dead:
                    due[n] = 2 if churn else 1
            for name in self._live():
                self._heartbeat(name)
            rounds += 1
            changed = any(self.members[n].answer != before[n] for n in self._live())
            granted = set().union(*(self.members[x].answer for x in self._live()))
            for n in list(due):
                assert n not in self.table.owners(APP, SID).values()
                due[n] -= 1
                if due[n] == 0:
                    assert dead_parts[n] <= granted, (
                        f"t={self.now}: {n} (lease ended {dead_expiry[n]}) held {sorted(dead_parts[n])}, "
                        f"not all re-granted: {sorted(granted)}; {self._histories()}")
                    del due[n], dead_expiry[n]
            quiet = 0 if changed or self.now < horizon else quiet + 1
            if quiet >= 2:
                break
            assert rounds < limit, f"no stable assignment after {rounds} rounds: {self._histories()}"
            self.now += step
        answers = {n: self.members[n].answer for n in self._live()}
        counts = [len(a) for a in answers.values()]
        assert max(counts) - min(counts) <= 1, answers
        assert sorted(p for a in answers.values() for p in a) == list(range(self.partitions)), answers
        assert set(self.table.owners(APP, SID)) == set(range(self.partitions))
        assert all(not self.members[n].pending for n in answers)

    # -- invariant ---------------------------------------------------------------------------------

    @invariant()
    def nobody_works_on_a_partition_twice(self) -> None:
        seen: dict[int, str] = {}
        for name, m in self.members.items():
            for p in m.working(self.now):
                assert p not in seen, (f"t={self.now}: partition {p} worked on by {seen[p]} and {name}; "
                                       f"{self._histories()}")
                seen[p] = name


LeaseGroup.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None, derandomize=True)
TestLeaseGroup = LeaseGroup.TestCase


@pytest.mark.parametrize("seed_partitions", [1, 3, 7])
def test_settle_from_scratch_with_many_members(seed_partitions: int) -> None:
    """Eight members join at once on an empty table; within a few rounds the split is balanced."""
    table = LeaseTable()
    answers: dict[str, list[int]] = {m: [] for m in MEMBER_NAMES}
    for now in range(0, 3000, 300):
        for m in MEMBER_NAMES:
            answers[m] = hb(table, m, answers[m], now=now, partitions=seed_partitions)
    counts = [len(a) for a in answers.values()]
    assert max(counts) - min(counts) <= 1
    assert sorted(p for a in answers.values() for p in a) == list(range(seed_partitions))
