"""What a source is: its definition (durable, in the store) and its live state (this broker's).

Metadata key layout (beside apps.py's A/C/K keys; the store's metadata namespace):

    b"S" + project + b"\\0" + source id      JSON SourceDef.to_json()

The definition holds the user's properties exactly as given (what GET shows back) and the wanted
state (`running` or `stopped`): a broker restarted starts again every source whose wanted state is
`running`, `failed` ones included (failing is something a running source does, not a wish). The
counters, the status message and the error log are live state, not persisted: they describe this
broker's run of the job, and start from zero after a restart.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

SOURCE_PREFIX = b"S"
ERROR_LOG = 20          # last errors kept for stats
THROUGHPUT_WINDOW = 60  # seconds of rows-per-second kept for stats

RUNNING, STOPPED, FAILED = "running", "stopped", "failed"


def source_prefix(project: str | None = None) -> bytes:
    return SOURCE_PREFIX if project is None else SOURCE_PREFIX + project.encode() + b"\0"


def source_key(project: str, source_id: str) -> bytes:
    return source_prefix(project) + source_id.encode()


@dataclass(frozen=True, slots=True)
class SourceDef:
    project: str
    id: str
    name: str
    type: str
    stream: str
    description: str
    properties: dict[str, Any]
    wanted: str          # RUNNING or STOPPED
    created_ms: int
    updated_ms: int
    started_ms: int      # the last start (start_time); 0 if never started

    def to_json(self) -> bytes:
        return orjson.dumps({"project": self.project, "id": self.id, "name": self.name, "type": self.type,
                             "stream": self.stream, "description": self.description,
                             "properties": self.properties, "wanted": self.wanted,
                             "created_ms": self.created_ms, "updated_ms": self.updated_ms,
                             "started_ms": self.started_ms})

    @classmethod
    def from_json(cls, raw: bytes) -> SourceDef:
        d = orjson.loads(raw)
        return cls(d["project"], d["id"], d["name"], d["type"], d["stream"], d.get("description", ""),
                   d.get("properties", {}), d.get("wanted", STOPPED), d.get("created_ms", 0),
                   d.get("updated_ms", 0), d.get("started_ms", 0))

    def with_(self, **changes: Any) -> SourceDef:
        return replace(self, **changes)


@dataclass(slots=True)
class SourceState:
    """A job's live status and counters, updated by the job and its sink (one event loop: no lock)."""
    status: str = STOPPED
    message: str = ""
    messages_in: int = 0      # messages (or generated events) received
    rows_written: int = 0     # rows durably appended
    errors: int = 0           # messages skipped (not mappable) and failed attempts
    last_error: str = ""
    last_error_ms: int = 0
    last_event_ms: int = 0    # when the last row was appended
    lag: int | None = None    # messages known to wait at the origin (JetStream's pending), None: unknown
    error_log: collections.deque[tuple[int, str]] = field(
        default_factory=lambda: collections.deque(maxlen=ERROR_LOG))
    rates: collections.deque[list[int]] = field(
        default_factory=lambda: collections.deque(maxlen=THROUGHPUT_WINDOW))   # [second, rows]

    def error(self, message: str) -> None:
        """A message skipped or an attempt failed: counted, kept in the log; the source goes on."""
        now = time.time_ns() // 1_000_000
        self.errors += 1
        self.last_error, self.last_error_ms = message, now
        self.error_log.append((now, message))

    def failed(self, message: str) -> None:
        """The job cannot run now (its server is unreachable, its stream gone); it retries."""
        self.status, self.message = FAILED, message
        self.error(message)

    def running(self, message: str = "") -> None:
        self.status, self.message = RUNNING, message

    def throughput(self) -> list[tuple[int, int]]:
        """(second, rows) of the last THROUGHPUT_WINDOW seconds that had writes. The deque keeps
        that many entries, one per second with writes: a slow source's oldest could be minutes
        old (the sources probe: 96 s in a "last 60 s" at a 3 s interval)."""
        since = time.time_ns() // 1_000_000_000 - THROUGHPUT_WINDOW
        return [(second, rows) for second, rows in self.rates if second > since]

    def wrote(self, rows: int) -> None:
        now = time.time_ns() // 1_000_000
        self.rows_written += rows
        self.last_event_ms = now
        second = now // 1000
        if self.rates and self.rates[-1][0] == second:
            self.rates[-1][1] += rows
        else:
            self.rates.append([second, rows])
