"""Consumer-group leases: the members of one app share a stream's partitions, no coordinator needed.

Each member heartbeats every lease/3 with the partitions it is still working on (`held`). The table
answers with the partitions it may work on now, leased until now + lease_ms. Rules:

* A member that misses its lease is dead: its partitions become free.
* The target is a sticky balance: every live member gets floor or ceil of P/n partitions, and a
  partition stays with its current owner while that owner is within its share.
* Hand-over is clean: a partition moving away from a live member is first *revoked* (left out of
  that member's answer) and stays owned until the member heartbeats without it in `held` - it has
  stopped and committed its checkpoint - or its lease runs out. Only then is it granted to the new
  owner, so two live members never work on one partition at once (at-least-once, order kept).
* After a broker restart the table is empty; a member's `held` claims re-establish its leases.
  Members still working on what they held before the restart re-claim it with their first
  heartbeat, which comes within a lease; so for one lease after the broker started (`started_ms`)
  a partition nobody claimed is not granted - else the first member to heartbeat would be given
  partitions another live member is still working on.

In memory on purpose: leases are only meaningful while a broker is serving, and expire in seconds.
The core reaches the table through the `Leases` interface below, so a multi-broker mode can keep
it in the shared store instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class _Group:
    members: dict[str, int] = field(default_factory=dict)          # member -> lease expiry (ms)
    owners: dict[int, tuple[str, int]] = field(default_factory=dict)  # partition -> (member, expiry ms)


class LeaseTable:
    def __init__(self, started_ms: int | None = None) -> None:
        self._groups: dict[tuple[str, int], _Group] = {}
        self._started_ms = started_ms   # None: no restart grace (a table that starts empty for sure)

    def heartbeat(self, app: str, stream_id: int, partition_count: int, member: str, held: set[int],
                  lease_ms: int, now: int) -> list[int]:
        """Record a heartbeat; return the partitions `member` may work on, sorted."""
        group = self._groups.setdefault((app, stream_id), _Group())
        group.members[member] = now + lease_ms
        for m in [m for m, expiry in group.members.items() if expiry < now]:
            del group.members[m]
        for p, (owner, expiry) in list(group.owners.items()):
            if expiry < now or owner not in group.members or (owner == member and p not in held) \
                    or p >= partition_count:
                del group.owners[p]
        # Claims after a broker restart, or from a member whose lease just lapsed; and renewal of
        # what the member still owns and holds - a revoked partition it is still finishing must
        # stay its for as long as it heartbeats, not lapse one lease after it was last granted.
        for p in held:
            if 0 <= p < partition_count and group.owners.get(p, (member,))[0] == member:
                group.owners[p] = (member, now + lease_ms)
        target = self._target(group, partition_count)
        recovering = self._started_ms is not None and now < self._started_ms + lease_ms
        mine = []
        for p in range(partition_count):
            current = group.owners.get(p)
            if target.get(p) != member or (current is None and recovering):
                continue
            if current is None or current[0] == member:
                group.owners[p] = (member, now + lease_ms)
                mine.append(p)
        return mine

    @staticmethod
    def _target(group: _Group, partition_count: int) -> dict[int, str]:
        live = sorted(group.members)
        n = len(live)
        share = {m: partition_count // n + (1 if i < partition_count % n else 0) for i, m in enumerate(live)}
        target: dict[int, str] = {}
        count = dict.fromkeys(live, 0)
        for p in range(partition_count):
            owner = group.owners.get(p)
            if owner and count[owner[0]] < share[owner[0]]:
                target[p] = owner[0]
                count[owner[0]] += 1
        hungry = [m for m in live for _ in range(share[m] - count[m])]
        free = [p for p in range(partition_count) if p not in target]
        for p, m in zip(free, hungry):
            target[p] = m
        return target

    def leave(self, app: str, stream_id: int, member: str) -> None:
        group = self._groups.get((app, stream_id))
        if group:
            group.members.pop(member, None)
            for p in [p for p, (owner, _) in group.owners.items() if owner == member]:
                del group.owners[p]

    def owners(self, app: str, stream_id: int) -> dict[int, str]:
        group = self._groups.get((app, stream_id))
        return {p: owner for p, (owner, _) in group.owners.items()} if group else {}

    def forget_stream(self, stream_id: int) -> None:
        for key in [k for k in self._groups if k[1] == stream_id]:
            del self._groups[key]


class Leases(Protocol):
    """Where consumer-group leases live. Today in one broker's memory (LocalLeases); a broker of
    a shared, replicated store will keep them in that store, so every broker sees one table."""

    async def heartbeat(self, app: str, stream_id: int, partition_count: int, member: str, held: set[int],
                        lease_ms: int, now: int) -> list[int]:
        """Record a heartbeat; return the partitions `member` may work on, sorted."""

    async def leave(self, app: str, stream_id: int, member: str) -> None:
        """Release every lease of the member at once."""

    async def forget_stream(self, stream_id: int) -> None:
        """Drop every group of a deleted stream."""


class LocalLeases(Leases):
    """The in-memory LeaseTable behind the Leases interface. `app` is project-qualified by the
    caller, so groups of two projects never meet."""

    def __init__(self, started_ms: int | None = None) -> None:
        self.table = LeaseTable(started_ms)

    async def heartbeat(self, app: str, stream_id: int, partition_count: int, member: str, held: set[int],
                        lease_ms: int, now: int) -> list[int]:
        return self.table.heartbeat(app, stream_id, partition_count, member, held, lease_ms, now)

    async def leave(self, app: str, stream_id: int, member: str) -> None:
        self.table.leave(app, stream_id, member)

    async def forget_stream(self, stream_id: int) -> None:
        self.table.forget_stream(stream_id)
