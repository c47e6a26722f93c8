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
from typing import Any, Awaitable, Callable

from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, client_error
from broker.sources.base import Backoff, JobContext
from broker.sources.model import FAILED, RUNNING, STOPPED, SourceDef, SourceState, source_key, source_prefix
from broker.sources.props import Props, bad
from broker.sources.registry import TYPES
from broker.sources.sink import Sink, check_target

log = logging.getLogger("sluice.sources")

SOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")   # Timeplus' rule [docs]
MAX_DESCRIPTION = 1024
MAX_SOURCES = 1000        # per broker [ours]: each is a task and maybe a connection
STOP_WAIT_S = 5.0
HEALTHY_S = 10.0   # a job that ran this long before failing retries from the shortest backoff


Tasks = list[asyncio.Task[None]]   # (a module alias: the class's own `list` verb shadows the builtin)


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
        # jobs cancelled but not yet ended (a library slow to let go): a new run of the same source
        # waits for its predecessor, so one source never has two jobs
        self._ending: dict[tuple[str, str], set[asyncio.Task[None]]] = {}
        self._lock = asyncio.Lock()   # one mutation at a time: name uniqueness, store-then-memory
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every definition; run again the ones wanted running. Call it before the doors
        listen. A record this broker cannot read (written by another version) is logged and shown
        as a failed source where possible; it never stops the broker from starting."""
        async with self._lock:
            for key_bytes, raw in await self.broker.store.meta_scan(source_prefix()):
                try:
                    d = SourceDef.from_json(raw)
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("skipping unreadable source definition %r: %s", key_bytes[:200], e)
                    continue
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
        tasks = [*self._tasks.values(), *(t for ending in self._ending.values() for t in ending)]
        self._tasks.clear()
        await _cancel(tasks)

    async def _mutation(self, body: Callable[[], Awaitable[tuple[Any, Tasks]]]) -> Any:
        """Run a verb's body under the lock, to its end even if the caller goes away (a gRPC
        deadline): the store write and the memory change after it happen both or neither. Jobs
        the body cancelled are waited for (bounded) after the lock is released, so a stop returns
        once its job's last append has landed, and a stuck job holds no other verb."""
        async def run() -> Any:
            async with self._lock:
                result, ending = await body()
            await _cancel(ending)
            return result
        return await asyncio.shield(asyncio.ensure_future(run()))

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
        now = self._now()
        d = SourceDef(project, str(uuid.uuid4()), name, type_name, stream, description, properties, RUNNING,
                      now, now, now)
        stored = _encoded(d)

        async def body_() -> tuple[Any, Tasks]:
            self._refuse_taken(project, name, None)
            if len(self._defs) >= MAX_SOURCES:
                raise client_error(ErrorCode.QUOTA_EXCEEDED, detail=f"at most {MAX_SOURCES} sources per broker")
            await self.broker.store.meta_write({source_key(project, d.id): stored})
            key = (project, d.id)
            self._defs[key], self._states[key] = d, SourceState()
            self._spawn(d)
            return Source(d, self._states[key]), []
        return await self._mutation(body_)  # type: ignore[no-any-return]

    def list(self, project: str) -> list[Source]:
        return sorted((Source(d, self._states[k]) for k, d in self._defs.items() if k[0] == project),
                      key=lambda s: s.definition.name)

    def all(self) -> tuple[Source, ...]:
        """Every project's sources (for metrics)."""
        return tuple(Source(d, self._states[k]) for k, d in self._defs.items())

    def get(self, project: str, ref: object) -> Source:
        """By id, else by name. Raises SOURCE_NOT_FOUND."""
        key = self._key(project, ref)
        return Source(self._defs[key], self._states[key])

    async def update(self, project: str, ref: object, body: Any) -> Source:
        """Change name, description, stream or properties of a stopped source (the fields given).
        Raises SOURCE_NOT_FOUND, SOURCE_RUNNING, BAD_SOURCE, SOURCE_EXISTS."""
        if not isinstance(body, dict):
            raise client_error(ErrorCode.BAD_BODY, detail="an update must be a JSON object")

        async def body_() -> tuple[Any, Tasks]:
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
            await self.broker.store.meta_write({source_key(project, d.id): _encoded(new)})
            self._defs[key] = new
            return Source(new, self._states[key]), []
        return await self._mutation(body_)  # type: ignore[no-any-return]

    async def delete(self, project: str, ref: object) -> None:
        async def body_() -> tuple[Any, Tasks]:
            key = self._key(project, ref)
            await self.broker.store.meta_write({source_key(project, key[1]): None})
            del self._defs[key]
            state = self._states.pop(key)
            state.status = STOPPED
            return None, self._end(key)
        await self._mutation(body_)

    async def start_source(self, project: str, ref: object) -> Source:
        """Start a stopped source (a no-op on a running one). Raises SOURCE_NOT_FOUND, and
        BAD_SOURCE when its stored definition no longer passes the checks (its stream is gone)."""
        async def body_() -> tuple[Any, Tasks]:
            key = self._key(project, ref)
            d = self._defs[key]
            if d.wanted != RUNNING:
                self._checked(project, d.type, d.stream, d.properties)
                d = d.with_(wanted=RUNNING, started_ms=self._now())
                await self.broker.store.meta_write({source_key(project, d.id): d.to_json()})
                self._defs[key] = d
                self._spawn(d)
            return Source(d, self._states[key]), []
        return await self._mutation(body_)  # type: ignore[no-any-return]

    async def stop_source(self, project: str, ref: object) -> Source:
        """Stop a running source (a no-op on a stopped one); returns once its job has ended (or
        after STOP_WAIT_S if the job will not let go)."""
        async def body_() -> tuple[Any, Tasks]:
            key = self._key(project, ref)
            d = self._defs[key]
            ending: Tasks = []
            if d.wanted != STOPPED:
                d = d.with_(wanted=STOPPED)
                await self.broker.store.meta_write({source_key(project, d.id): d.to_json()})
                self._defs[key] = d
                ending = self._end(key)
                state = self._states[key]
                state.status, state.message, state.lag = STOPPED, "", None
            return Source(d, self._states[key]), ending
        return await self._mutation(body_)  # type: ignore[no-any-return]

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
        stype = TYPES.get(type_name)
        if stype is None:   # stored by a broker that knew more types
            raise bad("type", f"[{type_name[:64]}] is not a source type here; use one of: {', '.join(TYPES)}")
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

    def _end(self, key: tuple[str, str]) -> Tasks:
        """Cancel the source's job; it is remembered until it has ended (see _ending)."""
        task = self._tasks.pop(key, None)
        if task is None:
            return []
        task.cancel()
        ending = self._ending.setdefault(key, set())
        ending.add(task)

        def ended(t: asyncio.Task[None]) -> None:
            ending.discard(t)
            if not ending and self._ending.get(key) is ending:
                del self._ending[key]
        task.add_done_callback(ended)
        return [task]

    def _spawn(self, d: SourceDef) -> None:
        if self._closed:
            return
        key = (d.project, d.id)
        state = self._states[key]
        state.running()
        self._tasks[key] = asyncio.create_task(self._supervise(d, state, set(self._ending.get(key, ()))),
                                               name=f"sluice-source-{d.name}")

    async def _supervise(self, d: SourceDef, state: SourceState, predecessors: set[asyncio.Task[None]]) -> None:
        """Run the job; on failure show it and run it again after a backoff, until cancelled."""
        if predecessors:   # earlier runs of this source have not let go yet
            await asyncio.wait(predecessors)
        stype = TYPES.get(d.type)
        try:
            if stype is None:
                raise bad("type", f"[{d.type[:64]}] is not a source type of this broker")
            config = stype.configure(Props(d.properties))
        except BrokerError as e:   # stored by another version with other rules
            state.failed(f"the stored definition is not valid here: {e.message}")
            return
        backoff = Backoff()
        ctx = JobContext(Sink(self.broker, d.project, d.stream, stype.data_type(config), state), state, backoff)
        while True:
            ctx.since = None
            try:
                await stype.job(config).run(ctx)
                message = "the job ended"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                message = "the job was cancelled by its library"   # not by us: a failure like any other
            except BrokerError as e:
                message = e.message
            except (OSError, TimeoutError) as e:
                message = f"{type(e).__name__}: {e}"
            except Exception as e:   # a library's own error types (websockets, nats)
                message = f"{type(e).__name__}: {e}"
                log.debug("source %s/%s failed", d.project, d.name, exc_info=True)
            state.failed(message)
            if ctx.healthy_for() >= HEALTHY_S:   # it worked for a while: retry from the shortest delay
                backoff.reset()
            delay = backoff.next()
            if backoff.attempt <= 3 or backoff.attempt % 20 == 0:   # not a log line per retry forever
                log.info("source %s/%s failed (%s); retrying in %.1fs", d.project, d.name, message, delay)
            await asyncio.sleep(delay)


def _encoded(d: SourceDef) -> bytes:
    """The stored form, or BAD_SOURCE if the properties cannot be stored (nested too deeply)."""
    try:
        return d.to_json()
    except TypeError as e:
        raise bad("properties", f"cannot be stored: {e}") from None


async def _cancel(tasks: Tasks) -> None:
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
