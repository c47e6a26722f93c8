"""`Sources`: the broker's managed ingest jobs - definitions kept in the store, one supervised task
per running source. The doors (Timeplus REST, gRPC) call this; it calls the core like any producer.

Lifecycle (shared/spec/sources.md section 1): create checks everything (type, properties, target
stream) before anything is stored or started, then stores the definition and starts the job at
once (`running`, `start_time` now). stop/start flip the wanted state in the store first and the
task second, so what a restart brings back is what was last asked for; start on a running source
and stop on a stopped one change nothing. update takes only stopped sources. delete stops the job
first. A failing job (server unreachable, stream deleted) shows `failed` with the reason and is
retried with backoff (base.py) for as long as it is wanted running; it never stops the others.

Sources are found by id or, failing that, by name (names are unique within a project), so the CLI
and gRPC can say `sources stop gen`.

Shutdown (`close`) cancels every job and waits at most `STOP_WAIT_S` for them: a job stuck in a
library call must not hold the broker's stop. Wanted states are left as they are, so every source
running now runs again after the restart.

Several brokers on one shared store (issue 13) would each run every source; leasing a source to
one broker belongs with the replicated store and is not done here.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, client_error
from broker.sources.base import Backoff, JobContext, SourceType
from broker.sources.model import FAILED, RUNNING, STOPPED, SourceDef, SourceState, source_key, source_prefix
from broker.sources.props import Props, bad
from broker.sources.registry import TYPES
from broker.sources.sink import Sink, check_target

log = logging.getLogger("sluice.sources")

SOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")   # Timeplus' rule [docs]
MAX_DESCRIPTION = 1024
MAX_SOURCES = 1000        # per broker [ours]: each is a task and maybe a connection
STOP_WAIT_S = 5.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Source:
    """A source as the doors show it: its definition and this broker's live state."""
    definition: SourceDef
    state: SourceState


class Sources:
    def __init__(self, broker: Broker, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.broker = broker
        self._now = clock_ms
        self._defs: dict[tuple[str, str], SourceDef] = {}
        self._states: dict[tuple[str, str], SourceState] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()   # one mutation at a time: name uniqueness, store-then-memory
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every definition; run again the ones wanted running. (A source created through a
        door that listened before this ran is already here: it is not started twice.)"""
        async with self._lock:
            for _, raw in await self.broker.store.meta_scan(source_prefix()):
                d = SourceDef.from_json(raw)
                key = (d.project, d.id)
                if key in self._defs:
                    continue
                self._defs[key] = d
                self._states[key] = SourceState()
                if d.wanted == RUNNING:
                    self._spawn(d)

    async def close(self) -> None:
        """Stop every job (bounded wait); definitions and wanted states stay as they are."""
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await _cancel(tasks)

    # -- verbs -------------------------------------------------------------------------------------

    async def create(self, project: str, body: Any) -> Source:
        """Check the definition, store it, start it. Raises BAD_SOURCE, SOURCE_EXISTS, BAD_BODY."""
        if not isinstance(body, dict):
            raise client_error(ErrorCode.BAD_BODY, detail="a source definition must be a JSON object")
        name = self._name(body.get("name"))
        type_name = body.get("type")
        if not isinstance(type_name, str) or type_name not in TYPES:
            raise bad("type", f"[{str(type_name)[:64]}] is not a source type here; use one of: {', '.join(TYPES)}")
        stream, description, properties = self._fields(project, body, None)
        self._checked(project, type_name, stream, properties)
        async with self._lock:
            self._refuse_taken(project, name, None)
            if len(self._defs) >= MAX_SOURCES:
                raise client_error(ErrorCode.QUOTA_EXCEEDED, detail=f"at most {MAX_SOURCES} sources per broker")
            now = self._now()
            d = SourceDef(project, str(uuid.uuid4()), name, type_name, stream, description, properties, RUNNING,
                          now, now, now)
            await self.broker.store.meta_write({source_key(project, d.id): d.to_json()})
            key = (project, d.id)
            self._defs[key], self._states[key] = d, SourceState()
            self._spawn(d)
        return self.get(project, d.id)

    def list(self, project: str) -> list[Source]:
        return sorted((Source(d, self._states[k]) for k, d in self._defs.items() if k[0] == project),
                      key=lambda s: s.definition.name)

    def get(self, project: str, ref: object) -> Source:
        """By id, else by name. Raises SOURCE_NOT_FOUND."""
        key = self._key(project, ref)
        return Source(self._defs[key], self._states[key])

    async def update(self, project: str, ref: object, body: Any) -> Source:
        """Change name, description, stream or properties of a stopped source (the fields given).
        Raises SOURCE_NOT_FOUND, SOURCE_RUNNING, BAD_SOURCE, SOURCE_EXISTS."""
        if not isinstance(body, dict):
            raise client_error(ErrorCode.BAD_BODY, detail="an update must be a JSON object")
        async with self._lock:
            key = self._key(project, ref)
            d = self._defs[key]
            if d.wanted == RUNNING:
                raise client_error(ErrorCode.SOURCE_RUNNING, source=d.name)
            name = d.name if body.get("name") is None else self._name(body["name"])
            stream, description, properties = self._fields(project, body, d)
            self._checked(project, d.type, stream, properties)
            self._refuse_taken(project, name, d.id)
            new = d.with_(name=name, stream=stream, description=description, properties=properties,
                          updated_ms=self._now())
            await self.broker.store.meta_write({source_key(project, d.id): new.to_json()})
            self._defs[key] = new
            return Source(new, self._states[key])

    async def delete(self, project: str, ref: object) -> None:
        async with self._lock:
            key = self._key(project, ref)
            await self.broker.store.meta_write({source_key(project, key[1]): None})
            del self._defs[key]
            state = self._states.pop(key)
            await _cancel([t] if (t := self._tasks.pop(key, None)) else [])
            state.status = STOPPED

    async def start_source(self, project: str, ref: object) -> Source:
        """Start a stopped source (a no-op on a running one). Raises SOURCE_NOT_FOUND, and
        BAD_SOURCE when its stored definition no longer passes the checks (its stream is gone)."""
        async with self._lock:
            key = self._key(project, ref)
            d = self._defs[key]
            if d.wanted != RUNNING:
                self._checked(project, d.type, d.stream, d.properties)
                d = d.with_(wanted=RUNNING, started_ms=self._now())
                await self.broker.store.meta_write({source_key(project, d.id): d.to_json()})
                self._defs[key] = d
                self._spawn(d)
            return Source(d, self._states[key])

    async def stop_source(self, project: str, ref: object) -> Source:
        async with self._lock:
            key = self._key(project, ref)
            d = self._defs[key]
            if d.wanted != STOPPED:
                d = d.with_(wanted=STOPPED)
                await self.broker.store.meta_write({source_key(project, d.id): d.to_json()})
                self._defs[key] = d
                await _cancel([t] if (t := self._tasks.pop(key, None)) else [])
                state = self._states[key]
                state.status, state.message, state.lag = STOPPED, "", None
            return Source(d, self._states[key])

    # -- parts ---------------------------------------------------------------------------------------

    def _key(self, project: str, ref: object) -> tuple[str, str]:
        if isinstance(ref, str):
            if (project, ref) in self._defs:
                return project, ref
            for key, d in self._defs.items():
                if key[0] == project and d.name == ref:
                    return key
        raise client_error(ErrorCode.SOURCE_NOT_FOUND, source=str(ref)[:200])

    @staticmethod
    def _name(value: object) -> str:
        if not isinstance(value, str) or not SOURCE_NAME.fullmatch(value):
            raise bad("name", "must be 1-64 letters, digits or _, starting with a letter")
        return value

    def _fields(self, project: str, body: dict, old: SourceDef | None) -> tuple[str, str, dict[str, Any]]:
        stream = body.get("stream", old.stream if old else None)
        if old and stream is None:
            stream = old.stream
        if not isinstance(stream, str) or not stream:
            raise bad("stream", "is required: the name of an existing stream to write to")
        description = body.get("description")
        if description is None:
            description = old.description if old else ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise bad("description", f"must be a string of at most {MAX_DESCRIPTION} characters")
        properties = body.get("properties")
        if properties is None and old:
            properties = old.properties
        if not isinstance(properties, dict) or not properties:
            raise bad("properties", "is required: an object of the source type's properties")
        return stream, description, properties

    def _checked(self, project: str, type_name: str, stream: str, properties: dict[str, Any]) -> Any:
        """The type's config, after every check: properties, then the target stream."""
        stype = TYPES[type_name]
        config = stype.configure(Props(properties))
        try:
            target = self.broker.catalogue.get(project, stream)
        except BrokerError:
            raise bad("stream", f"stream [{stream[:200]}] does not exist in project [{project}]; create it "
                                "first") from None
        check_target(target, stype.data_type(config))
        return config

    def _refuse_taken(self, project: str, name: str, own_id: str | None) -> None:
        if any(k[0] == project and d.name == name and d.id != own_id for k, d in self._defs.items()):
            raise client_error(ErrorCode.SOURCE_EXISTS, source=name)

    def _spawn(self, d: SourceDef) -> None:
        if self._closed:
            return
        key = (d.project, d.id)
        state = self._states[key]
        state.running()
        self._tasks[key] = asyncio.create_task(self._supervise(d, state), name=f"sluice-source-{d.name}")

    async def _supervise(self, d: SourceDef, state: SourceState) -> None:
        """Run the job; on failure show it and run it again after a backoff, until cancelled."""
        stype: SourceType = TYPES[d.type]
        backoff = Backoff()
        try:
            config = stype.configure(Props(d.properties))
        except BrokerError as e:   # stored by an older broker with other rules
            state.failed(f"the stored definition is no longer valid: {e.message}")
            return
        ctx = JobContext(Sink(self.broker, d.project, d.stream, stype.data_type(config), state), state, backoff)
        while True:
            try:
                await stype.job(config).run(ctx)
                message = "the job ended"
            except BrokerError as e:
                message = e.message
            except (OSError, TimeoutError) as e:
                message = f"{type(e).__name__}: {e}"
            except Exception as e:   # a library's own error types (websockets, nats)
                message = f"{type(e).__name__}: {e}"
                log.debug("source %s/%s failed", d.project, d.name, exc_info=True)
            state.failed(message)
            delay = backoff.next()
            log.info("source %s/%s failed (%s); retrying in %.1fs", d.project, d.name, message, delay)
            await asyncio.sleep(delay)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        for t in pending:
            log.warning("source task %s did not stop within %.0fs; left to finish", t.get_name(), STOP_WAIT_S)
    for t in tasks:
        if t.done() and not t.cancelled():
            with contextlib.suppress(BaseException):
                t.result()


__all__ = ["FAILED", "RUNNING", "STOPPED", "Source", "Sources"]
