"""`stream_generator`: random test events from one of three templates, one per `interval`
(shared/spec/sources.md section 2).

Events are scheduled on absolute deadlines (start + k * interval, on the monotonic clock), never
`sleep(interval)` after the work, so the rate does not drift with the time the appends take. Every
event due when the job wakes is made and appended in one batch (so a 1 ms interval is 1,000 events a second in a few
appends, not 1,000 appends); each event's `time` is its own deadline. A job that fell more than
`MAX_CATCH_UP` events behind (the machine stalled) skips ahead rather than bursting.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from broker.sources.base import JobContext, SourceType
from broker.sources.props import Props

DEFAULT_INTERVAL_MS = 200
MAX_CATCH_UP = 10_000     # events made in one wake at most; further behind, the schedule skips ahead


def _iot(rng: random.Random, ms: int) -> dict[str, Any]:
    return {"device": f"device_{rng.randrange(3)}", "number": rng.uniform(0, 100), "time": ms}


def _user_logins(rng: random.Random, ms: int) -> dict[str, Any]:
    return {"username": rng.choice(("user1", "user2")), "city": rng.choice(("Shanghai", "Beijing")), "time": ms}


def _devops(rng: random.Random, ms: int) -> dict[str, Any]:
    return {"hostname": f"host_{rng.randrange(3)}", "region": rng.choice(("eu-central-1", "us-west-1", "sa-east-1")),
            "rack": str(rng.randrange(1, 4)), "usage_user": rng.uniform(0, 100), "usage_system": rng.uniform(0, 100),
            "time": ms}


TEMPLATES: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "iot": _iot, "user_logins": _user_logins, "devops": _devops,
}
# The columns each template fills and their types [ours]: what a target stream should declare.
TEMPLATE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "iot": [("device", "string"), ("number", "float64"), ("time", "datetime64(3)")],
    "user_logins": [("username", "string"), ("city", "string"), ("time", "datetime64(3)")],
    "devops": [("hostname", "string"), ("region", "string"), ("rack", "string"), ("usage_user", "float64"),
               ("usage_system", "float64"), ("time", "datetime64(3)")],
}


@dataclass(frozen=True)
class GeneratorConfig:
    template: str
    interval_ms: int


def configure(props: Props) -> GeneratorConfig:
    template = props.choice("template", ("iot_data", *TEMPLATES), required=True)
    interval = props.duration_ms("interval", DEFAULT_INTERVAL_MS)
    assert interval is not None
    props.finish()
    return GeneratorConfig("iot" if template == "iot_data" else template, interval)   # iot_data: older docs' name


class GeneratorJob:
    def __init__(self, config: GeneratorConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._make = TEMPLATES[config.template]
        self._rng = rng or random.Random()

    async def run(self, ctx: JobContext) -> None:
        # The schedule runs on the monotonic clock (a wall-clock step neither stalls nor bursts it);
        # each event's `time` is the wall clock at the start plus its place in the schedule.
        interval = self.config.interval_ms
        start_mono = time.monotonic_ns() // 1_000_000
        start_wall = time.time_ns() // 1_000_000
        made = 0                      # events scheduled so far; the next one is due at start + made * interval
        while True:
            now = time.monotonic_ns() // 1_000_000 - start_mono
            next_ms = made * interval
            if now < next_ms:
                await asyncio.sleep((next_ms - now) / 1000)
                continue
            due = (now - next_ms) // interval + 1
            if due > MAX_CATCH_UP:   # stalled: keep the newest events, skip the rest
                made += due - MAX_CATCH_UP
                due = MAX_CATCH_UP
            events = [self._make(self._rng, start_wall + (made + k) * interval) for k in range(due)]
            made += due
            await ctx.sink.write_objects(events)
            ctx.connected()   # after a write that worked: a target that refuses every append backs off


TYPE = SourceType("stream_generator", configure, GeneratorJob, lambda config: "json")
