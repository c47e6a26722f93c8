"""Roles and the actions they permit (issue 11): `producer` writes and looks, `consumer` reads,
looks and commits checkpoints, `admin` does everything. Every verb of every door is exactly one
Action; the door's route table says which."""
from __future__ import annotations

from enum import Enum


class Role(Enum):
    ADMIN = "admin"
    PRODUCER = "producer"
    CONSUMER = "consumer"


class Action(Enum):
    MANAGE = "manage"          # create/delete/update streams, apps, sources; start/stop sources
    DESCRIBE = "describe"      # list and describe streams, apps, sources, queries, stats, cursors' metadata
    WRITE = "write"            # put records, ingest rows, /api/put points
    READ = "read"              # cursors, get records, subscribe, tail, queries, /api/query
    CHECKPOINT = "checkpoint"  # commit/delete checkpoints, consumer-group membership


_PERMITS: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.PRODUCER: frozenset({Action.WRITE, Action.DESCRIBE}),
    Role.CONSUMER: frozenset({Action.READ, Action.DESCRIBE, Action.CHECKPOINT}),
}


def permits(role: Role, action: Action) -> bool:
    return action in _PERMITS[role]
