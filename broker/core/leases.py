"""Consumer-group leases: the members of one app share a stream's partitions, no coordinator needed.

Each member heartbeats every lease/3 with the partitions it is still working on (`held`). The table
answers with the partitions it may work on now, leased until now + lease_ms. Rules:

* A member that misses its lease is dead: its partitions become free.
* The target is a sticky balance: every live member gets floor or ceil of P/n partitions, and a
  partition stays with its current owner while that owner is within its share. Written (ACTIVE)
  partitions and those a scale-down closed are balanced each on their own.
* Hand-over is clean: a partition moving away from a live member is first *revoked* (left out of
  that member's answer) and stays owned until the member heartbeats without it in `held` - it has
  stopped and committed its checkpoint - or its lease runs out. Only then is it granted to the new
  owner, so two live members never work on one partition at once (at-least-once, order kept).
* After a broker restart the table is empty; a member's `held` claims re-establish its leases.
  Members still working on what they held before the restart re-claim it with their first
  heartbeat, which comes within their lease; so until every lease granted before the restart has
  run out (the group's `grace`) a partition nobody claimed is not granted - else the first member
  to heartbeat would be given partitions another live member is still working on. That moment is
  the latest expiry the table granted, which the members' leases decide (1 s to 5 min, each its
  own), so LocalLeases keeps it in the store ahead of every grant (`horizon`, below). A group that
  had members before (a horizon stored) also waits one lease of the calling member after the
  start, even when every lease ran out while the broker was down: its members come back within it
  and re-claim what they hold, so they get the balance they had, not whatever the first to return
  was given alone. A group with no horizon stored never had a member and waits for nothing.

Where the table lives is behind the `Leases` interface below:
* LocalLeases: in one broker's memory, for a store only this broker serves - leases are only
  meaningful while a broker is serving, and expire in seconds.
* StoreLeases: in the shared store (`capabilities.shared`, the JetStream store), so members
  connected to different brokers share one table. Each group's state is one metadata key,
  read -> LeaseTable rules -> written back with `meta_cas`, retried on a conflict: every heartbeat
  is applied to the state the previous one left, whichever broker took it, so the rules above hold
  across brokers exactly as in one. No restart grace: the table outlives any broker. Expiries are
  each broker's wall clock: brokers' clocks must agree to well within a lease (NTP).
"""
from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from broker.errors import ErrorCode, server_error
from broker.storage.base import Store


@dataclass
class _Group:
    members: dict[str, int] = field(default_factory=dict)          # member -> lease expiry (ms)
    owners: dict[int, tuple[str, int]] = field(default_factory=dict)  # partition -> (member, expiry ms)


class LeaseTable:
    def __init__(self) -> None:
        self._groups: dict[tuple[str, int], _Group] = {}
        # group -> (ms until which a partition nobody claimed is not granted, the start of the table
        # or None): the restart grace, on the heartbeats' clock
        self._grace: dict[tuple[str, int], tuple[int, int | None]] = {}

    def set_grace(self, app: str, stream_id: int, until_ms: int, started_ms: int | None = None) -> None:
        """No partition nobody claims is granted before `until_ms`, nor, with `started_ms`, before one
        of the calling member's leases after it: the group's members had time to come back and
        re-claim what they hold, so the balance they get is the one they had."""
        self._grace[(app, stream_id)] = (until_ms, started_ms)

    def heartbeat(self, app: str, stream_id: int, partition_count: int, member: str, held: set[int],
                  lease_ms: int, now: int, active: int | None = None,
                  expired: frozenset[int] = frozenset()) -> list[int]:
        """Record a heartbeat; return the partitions `member` may work on, sorted. `active`: the
        partitions below it are written (ACTIVE), the rest up to `partition_count` closed by a
        scale-down (None: all written). `expired`: closed ones past the retention, nothing of them
        left, given to nobody (a reader of each would idle until the stream's next scale event)."""
        group = self._groups.setdefault((app, stream_id), _Group())
        group.members[member] = now + lease_ms
        for m in [m for m, expiry in group.members.items() if expiry < now]:
            del group.members[m]
        # A partition at or past `partition_count` is left alone, not dropped: the count is the
        # calling broker's, and a broker that has not seen a scale-up yet (several brokers on one
        # store) would free partitions another member was granted through a broker that has. Such
        # an entry is never renewed (below) and lapses with its lease once the partition is gone.
        for p, (owner, expiry) in list(group.owners.items()):
            if expiry < now or owner not in group.members or (owner == member and p not in held):
                del group.owners[p]
        # Claims after a broker restart, or from a member whose lease just lapsed; and renewal of
        # what the member still owns and holds - a revoked partition it is still finishing must
        # stay its for as long as it heartbeats, not lapse one lease after it was last granted.
        for p in held:
            if 0 <= p < partition_count and group.owners.get(p, (member,))[0] == member:
                group.owners[p] = (member, now + lease_ms)
        target = self._target(group, partition_count, partition_count if active is None else active, expired)
        until, started = self._grace.get((app, stream_id), (0, None))
        recovering = now < until or (started is not None and now < started + lease_ms)
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
    def _target(group: _Group, partition_count: int, active: int, expired: frozenset[int]) -> dict[int, str]:
        """Written partitions and closed ones (a scale-down's, readable until retention) balanced
        each on their own: counted as one, the member that had the closed ones kept just those,
        idle once it drained them, while another was given every written one."""
        live = sorted(group.members)
        written = min(active, partition_count)
        target = LeaseTable._balance(group, live, range(written))
        given = dict.fromkeys(live, 0)
        for m in target.values():
            given[m] += 1
        # the closed ones' remainder goes first to the members given fewer written ones
        closed = [p for p in range(written, partition_count) if p not in expired]
        target.update(LeaseTable._balance(group, sorted(live, key=lambda m: (given[m], m)), closed))
        return target

    @staticmethod
    def _balance(group: _Group, order: list[str], partitions: Sequence[int]) -> dict[int, str]:
        """A sticky balance of `partitions` over the live members in `order`: each gets floor or
        ceil of the share (the first ones the ceil), and a partition stays with its owner while
        the owner is within its share."""
        n = len(order)
        share = {m: len(partitions) // n + (1 if i < len(partitions) % n else 0) for i, m in enumerate(order)}
        target: dict[int, str] = {}
        count = dict.fromkeys(order, 0)
        for p in partitions:
            owner = group.owners.get(p)
            if owner and count[owner[0]] < share[owner[0]]:
                target[p] = owner[0]
                count[owner[0]] += 1
        hungry = [m for m in order for _ in range(share[m] - count[m])]
        free = [p for p in partitions if p not in target]
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
        for key in [k for k in self._grace if k[1] == stream_id]:
            del self._grace[key]

    def forget_app(self, app: str) -> None:
        for key in [k for k in self._groups if k[0] == app]:
            del self._groups[key]
        for key in [k for k in self._grace if k[0] == app]:
            del self._grace[key]

    # -- one group's state as plain data (StoreLeases keeps it in the store) ---------------------

    def load(self, app: str, stream_id: int, state: dict[str, Any]) -> None:
        """Replace one group's state with `state` (as `dump` gave it)."""
        members = {str(m): int(e) for m, e in state.get("members", {}).items()}
        owners = {int(p): (str(o[0]), int(o[1])) for p, o in state.get("owners", {}).items()}
        self._groups[(app, stream_id)] = _Group(members, owners)

    def dump(self, app: str, stream_id: int) -> dict[str, Any] | None:
        """One group's state as JSON-able data; None when the group is empty."""
        group = self._groups.get((app, stream_id))
        if group is None or not (group.members or group.owners):
            return None
        return {"members": dict(group.members), "owners": {str(p): [o, e] for p, (o, e) in group.owners.items()}}


class Leases(Protocol):
    """Where consumer-group leases live. Today in one broker's memory (LocalLeases); a broker of
    a shared, replicated store will keep them in that store, so every broker sees one table."""

    async def heartbeat(self, app: str, stream_id: int, partition_count: int, member: str, held: set[int],
                        lease_ms: int, now: int, active: int | None = None,
                        expired: frozenset[int] = frozenset()) -> list[int]:
        """Record a heartbeat; return the partitions `member` may work on, sorted (see
        LeaseTable.heartbeat)."""

    async def leave(self, app: str, stream_id: int, member: str) -> None:
        """Release every lease of the member at once."""

    async def forget_stream(self, stream_id: int) -> None:
        """Drop every group of a deleted stream."""

    async def forget_app(self, app: str) -> None:
        """Drop every group of a deleted app: an app made again under its name starts with none."""


class LocalLeases(Leases):
    """The in-memory LeaseTable behind the Leases interface. `app` is project-qualified by the
    caller, so groups of two projects never meet.

    The heartbeats' `now` is the caller's lease clock (the broker's monotonic clock: see Broker).
    With a `store`, each group's horizon - a wall-clock ms (`wall_ms`) no lease granted so far
    outlasts - is kept in it (b"H" keys, 8 bytes), written before the answer that would pass it,
    two leases ahead so it is written about once a lease, not at every heartbeat. A broker
    restarted on the store reads it at a group's first heartbeat as that group's restart grace."""

    def __init__(self, store: Store | None = None, wall_ms: Callable[[], int] | None = None,
                 grace_cap_ms: int | None = None, started_ms: int | None = None) -> None:
        self.table = LeaseTable()
        self._store = store
        self._wall = wall_ms
        # no grace past this wall-clock ms (the start + two of the longest leases: a horizon written
        # two leases ahead ends by then), whatever was stored: a clock set back at the restart
        # would stretch it
        self._cap = grace_cap_ms
        self._horizons: dict[tuple[str, int], int] = {}   # loaded groups: the horizon stored
        self._started = started_ms   # the broker's start on the lease clock (None: its first heartbeat)
        self._writing = asyncio.Lock()   # horizon writes in order: a later one never stored under an earlier

    async def heartbeat(self, app: str, stream_id: int, partition_count: int, member: str, held: set[int],
                        lease_ms: int, now: int, active: int | None = None,
                        expired: frozenset[int] = frozenset()) -> list[int]:
        if self._store is None:
            return self.table.heartbeat(app, stream_id, partition_count, member, held, lease_ms, now, active, expired)
        group = (app, stream_id)
        if self._started is None:
            self._started = now
        if group not in self._horizons:
            raw = await self._store.meta_get(horizon_key(app, stream_id))
            if group not in self._horizons:   # not loaded by a heartbeat that ran during the read
                stored = _MS.unpack(raw)[0] if raw is not None and len(raw) == _MS.size else 0
                self._horizons[group] = stored
                until = stored if self._cap is None else min(stored, self._cap)
                wall = self._wall() if self._wall else now
                # a group that had members before: they get a lease to come back, as well
                self.table.set_grace(app, stream_id, now + until - wall, self._started if stored else None)
        mine = self.table.heartbeat(app, stream_id, partition_count, member, held, lease_ms, now, active, expired)
        wall = self._wall() if self._wall else now
        if wall + lease_ms > self._horizons[group]:
            await self._advance(group, wall + 2 * lease_ms)
        return mine

    async def _advance(self, group: tuple[str, int], until: int) -> None:
        assert self._store is not None
        async with self._writing:
            if until <= self._horizons.get(group, until):   # passed by another heartbeat's write
                return
            await self._store.meta_write({horizon_key(*group): _MS.pack(until)})
            if group in self._horizons:   # not forgotten (a deleted stream or app) during the write
                self._horizons[group] = until

    async def leave(self, app: str, stream_id: int, member: str) -> None:
        self.table.leave(app, stream_id, member)

    async def forget_stream(self, stream_id: int) -> None:
        self.table.forget_stream(stream_id)
        for group in [g for g in self._horizons if g[1] == stream_id]:
            del self._horizons[group]
        if self._store is not None:
            async with self._writing:
                rows = await self._store.meta_scan(HORIZON_PREFIX + _SID.pack(stream_id))
                if rows:
                    await self._store.meta_write({k: None for k, _ in rows})

    async def forget_app(self, app: str) -> None:
        self.table.forget_app(app)
        for group in [g for g in self._horizons if g[0] == app]:
            del self._horizons[group]
        if self._store is not None:
            name = app.encode()
            async with self._writing:
                doomed: dict[bytes, bytes | None] = {
                    k: None for k, _ in await self._store.meta_scan(HORIZON_PREFIX) if k[1 + _SID.size:] == name}
                if doomed:
                    await self._store.meta_write(doomed)


_SID = struct.Struct(">Q")
_MS = struct.Struct(">Q")
LEASE_PREFIX = b"G"   # metadata kind of StoreLeases (core/apps.py lists the kinds)
HORIZON_PREFIX = b"H"   # metadata kind of LocalLeases' horizons


def horizon_key(app: str, stream_id: int) -> bytes:
    """b"H" + stream_id u64 + app, as lease_key."""
    return HORIZON_PREFIX + _SID.pack(stream_id) + app.encode()
MAX_CONFLICTS = 1000  # meta_cas conflicts one call retries before giving up (never in practice)


def lease_key(app: str, stream_id: int) -> bytes:
    """b"G" + stream_id u64 + app: a deleted stream's groups are one prefix scan."""
    return LEASE_PREFIX + _SID.pack(stream_id) + app.encode()


class StoreLeases(Leases):
    """The LeaseTable rules over state kept in a shared store, one metadata key per group, changed
    with meta_cas (see the module's docstring)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.conflicts = 0   # observability and tests: heartbeats re-applied after another broker's

    async def _change(self, app: str, stream_id: int, step: Callable[[LeaseTable], list[int]]) -> list[int]:
        key = lease_key(app, stream_id)
        for _ in range(MAX_CONFLICTS):
            raw = await self._store.meta_get(key)
            table = LeaseTable()
            if raw is not None:
                table.load(app, stream_id, json.loads(raw))
            elif (before := await self._legacy(app, stream_id)) is not None:
                table.load(app, stream_id, before)
            result = step(table)
            state = table.dump(app, stream_id)
            new = None if state is None else json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
            if new == raw or await self._store.meta_cas(key, raw, new):
                return result
            self.conflicts += 1
        raise server_error(ErrorCode.UNAVAILABLE, detail="consumer-group lease: too many concurrent changes")

    async def _legacy(self, app: str, stream_id: int) -> dict[str, Any] | None:
        """A group named `project/app/app_id` with no table yet starts from the table its app's
        members kept before groups were named by app id (`project/app`): members live across that
        upgrade keep their leases (no restart grace here: a fresh table would grant another member
        a partition a live one still works on). Expired leases in it are nobody's."""
        if app.count("/") != 2:
            return None
        raw = await self._store.meta_get(lease_key(app.rsplit("/", 1)[0], stream_id))
        return None if raw is None else dict(json.loads(raw))

    async def heartbeat(self, app: str, stream_id: int, partition_count: int, member: str, held: set[int],
                        lease_ms: int, now: int, active: int | None = None,
                        expired: frozenset[int] = frozenset()) -> list[int]:
        return await self._change(app, stream_id, lambda t: t.heartbeat(app, stream_id, partition_count, member,
                                                                         held, lease_ms, now, active, expired))

    async def leave(self, app: str, stream_id: int, member: str) -> None:
        def leave(table: LeaseTable) -> list[int]:
            table.leave(app, stream_id, member)
            return []
        await self._change(app, stream_id, leave)

    async def forget_stream(self, stream_id: int) -> None:
        rows = await self._store.meta_scan(LEASE_PREFIX + _SID.pack(stream_id))
        if rows:
            await self._store.meta_write({k: None for k, _ in rows})

    async def forget_app(self, app: str) -> None:
        """Every group's key is scanned (they are keyed by stream first): an app's delete is rare."""
        name = app.encode()
        doomed: dict[bytes, bytes | None] = {
            k: None for k, _ in await self._store.meta_scan(LEASE_PREFIX) if k[1 + _SID.size:] == name}
        if doomed:
            await self._store.meta_write(doomed)

    async def owners(self, app: str, stream_id: int) -> dict[int, str]:
        raw = await self._store.meta_get(lease_key(app, stream_id))
        table = LeaseTable()
        if raw is not None:
            table.load(app, stream_id, json.loads(raw))
        return table.owners(app, stream_id)
