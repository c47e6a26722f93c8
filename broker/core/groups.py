"""Consumer groups: the members of one app share a stream's partitions through leases
(the rules are in core/leases.py; where the table lives is behind the `Leases` interface)."""
from __future__ import annotations

from typing import Callable, Sequence

from broker.core.catalogue import StreamCatalogue
from broker.core.consumers import Consumers
from broker.core.leases import Leases
from broker.core.limits import Limits
from broker.errors import ErrorCode, client_error


class ConsumerGroups:
    def __init__(self, catalogue: StreamCatalogue, consumers: Consumers, leases: Leases, limits: Limits,
                 clock_ms: Callable[[], int]) -> None:
        self._catalogue = catalogue
        self._consumers = consumers
        self.leases = leases
        self._limits = limits
        self._now = clock_ms

    async def heartbeat(self, project: str, app_name: object, stream_name: object, member_id: object,
                        held: Sequence[int] = (), lease_ms: int | None = None) -> tuple[list[int], int]:
        """A member's heartbeat. Returns (partitions it may work on now, lease_ms).
        Raises APP_NOT_FOUND, STREAM_NOT_FOUND, INVALID_REQUEST."""
        lim = self._limits
        name, app_id = await self._consumers.incarnation(project, app_name)
        config = self._catalogue.get(project, stream_name)
        member = _member(member_id)
        lease = lease_ms or lim.default_lease_ms
        if not lim.min_lease_ms <= lease <= lim.max_lease_ms:
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"lease_ms must be within [{lim.min_lease_ms}, {lim.max_lease_ms}]")
        readable = config.readable_partition_count
        expired = frozenset(p for p in range(config.partition_count, readable)
                            if self._catalogue.partition_status(config, p) == "EXPIRED")
        mine = await self.leases.heartbeat(_group(project, name, app_id), config.stream_id, readable, member,
                                           set(held), lease, self._now(), config.partition_count, expired)
        return mine, lease

    async def leave(self, project: str, app_name: object, stream_name: object, member_id: object) -> None:
        """Release every lease of a member at once (a clean shutdown, no lease timeout to wait)."""
        name, app_id = await self._consumers.incarnation(project, app_name)
        config = self._catalogue.get(project, stream_name)
        await self.leases.leave(_group(project, name, app_id), config.stream_id, _member(member_id))

    async def forget_app(self, project: str, name: str, app_id: str) -> None:
        """Drop a deleted app's leases: members of an app made again under its name start afresh,
        not behind leases the deleted one's members held (up to max_lease_ms). (A heartbeat through
        another broker that found the app before it went may write its group after this: that group
        is the deleted app's - its id is in the group's name - and no member of a new app meets it.)"""
        await self.leases.forget_app(_group(project, name, app_id))
        await self.leases.forget_app(f"{project}/{name}")   # its table from before groups had app ids


def _member(member_id: object) -> str:
    """A member id as heartbeat and leave take it. Raises INVALID_REQUEST."""
    if not isinstance(member_id, str) or not 1 <= len(member_id) <= 200:
        raise client_error(ErrorCode.INVALID_REQUEST, detail="member_id must be 1-200 characters")
    return member_id


def _group(project: str, app_name: str, app_id: str) -> str:
    """The leases' name of an app's groups: project-qualified, so two projects' groups never meet,
    and with the app's id, so an app deleted and made again under its name (another id) starts with
    none of the deleted one's leases, on a shared store too."""
    return f"{project}/{app_name}/{app_id}"
