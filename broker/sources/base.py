"""What every source type provides, and what its job gets to work with.

A source type is a `SourceType`: `configure(props)` reads and checks the properties (raising
BAD_SOURCE naming the property; nothing starts when it does) into a frozen config, and
`job(config)` makes a `Job` from it. The manager (manager.py) runs `job.run(ctx)` in a supervising
task: when run raises, the source shows `failed` with the reason and the job is run again after
a capped, jittered exponential backoff (`Backoff`); a job that ran well for a while starts its
backoff from the bottom again. Stopping cancels the task: a job must let CancelledError through
and hold nothing that outlives the cancellation (close its connection in a `finally`).

A job reports through `ctx`: `ctx.connected()` once it is receiving (status `running`; the backoff
restarts from the bottom once a run has lasted a while), `ctx.state` for counters and lag,
`ctx.sink.write(...)` to append a batch durably.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from broker.sources.model import SourceState
from broker.sources.props import Props
from broker.sources.sink import Sink


class Backoff:
    """Capped exponential backoff with full jitter: delays drawn from [base, min(cap, base*2^n)]."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 30.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base_s, cap_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return self._rng.uniform(self.base, max(ceiling, self.base))

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class JobContext:
    sink: Sink
    state: SourceState
    backoff: Backoff
    since: float | None = None   # monotonic time of the last connected(), None: not connected in this run
    # the servers holding the broker's own data (Store.own_servers): a source must not connect to them
    own_servers: Callable[[], frozenset[str]] = frozenset
    task: asyncio.Task[None] | None = None   # the task running the job (the manager's)

    @property
    def ending(self) -> bool:
        """The job is being stopped (its task cancelled: stop, delete, shutdown): the status is the
        manager's now, and what its library reports while the job winds down (a connection lost
        or made again) must not set it again."""
        return self.task is not None and (self.task.cancelling() > 0 or self.task.done())

    def connected(self, message: str = "") -> None:
        """The job reached its origin and is receiving: status running. The backoff starts from the
        bottom again only if this run then lasts HEALTHY_S (manager.py): a server that accepts and
        drops every connection at once is retried ever more slowly, not in a tight loop. Nothing
        once the job is `ending`."""
        if self.ending:
            return
        self.state.running(message)
        if self.since is None:
            self.since = time.monotonic()

    def healthy_for(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


class Job(Protocol):
    async def run(self, ctx: JobContext) -> None:
        """Receive and write until cancelled; raise to report a failure (the manager retries)."""


@dataclass(frozen=True)
class SourceType:
    name: str
    configure: Callable[[Props], Any]      # -> the type's frozen config; raises BAD_SOURCE
    job: Callable[[Any], Job]
    data_type: Callable[[Any], str]        # the config's data_type ("json" for the generator)
