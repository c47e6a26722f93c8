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

Several brokers on one shared store (`store.capabilities.shared`, the JetStream store): a source
wanted running runs on exactly one of them, the holder of its lease - a metadata key
`b"L" + project + NUL + id` holding {"owner", "until" (wall-clock ms)}, taken and renewed only with
meta_cas. Every LEASE_S / 4 each broker (1) re-reads the definitions, so sources created, started,
stopped, updated or deleted through another broker are seen here, (2) renews the leases it holds,
(3) takes a lease nobody holds or whose holder let it run out (a broker that died: its sources move
after at most LEASE_S + LEASE_S / 4), and (4) ends the jobs of sources no longer wanted running
here. A holder that cannot renew (the store unreachable, or slow to answer) ends its jobs itself once
LEASE_S * 0.75 has passed since its last successful renewal began (a timer per lease, independent of
the rounds, which may themselves wait on the store), before anyone else may take them; a holder that finds its lease
taken ends its job at once. Brokers' clocks must agree to well within LEASE_S (NTP). stop and
delete through a broker that is not the holder return once the definition is stored; the holder
ends the job at its next tick. A source's live state (status, counters) is the holder's; on the
other brokers it shows `running` with the message "running on another broker".
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.sources.base import Backoff, JobContext
from broker.sources.model import FAILED, RUNNING, STOPPED, SourceDef, SourceState, source_key, source_prefix
from broker.sources.props import Props, bad
from broker.sources.registry import TYPES
from broker.sources.sink import Sink, check_target

log = logging.getLogger("sluice.sources")

SOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")   # Timeplus' rule [docs]
MAX_DESCRIPTION = 1024
MAX_SOURCES = 1000        # per broker [ours]: each is a task and maybe a connection
# a job's stop, at most: a JetStream job finishes its batch in hand (2 s), lets its open pull
# request be answered and drains its inbox (4.5 s), gives back what it holds and closes its
# connection (2 s): nats.py. Past this the broker's stop goes on without the job.
STOP_WAIT_S = 10.0
HEALTHY_S = 10.0   # a job that ran this long before failing retries from the shortest backoff
LEASE_S = 10.0     # a source's lease on a shared store (see the module's docstring)
LEASE_PREFIX = b"L"
CAS_TRIES = 5      # a verb's compare-and-set of a definition another broker keeps changing
ELSEWHERE = "running on another broker"


Tasks = list[asyncio.Task[None]]   # (a module alias: the class's own `list` verb shadows the builtin)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Source:
    """A source as the doors show it: its definition and this broker's live state."""
    definition: SourceDef
    state: SourceState


def lease_key(project: str, source_id: str) -> bytes:
    return LEASE_PREFIX + project.encode() + b"\0" + source_id.encode()


class Sources:
    def __init__(self, broker: Broker, clock_ms: Callable[[], int] = _now_ms, lease_s: float = LEASE_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self._now = clock_ms
        # a shared store: sources are leased to one broker (module docstring)
        self._shared = broker.store.capabilities.shared
        self._lease_s = lease_s
        self._monotonic = monotonic
        self.holder = uuid.uuid4().hex[:16]            # this broker, as a lease owner
        self._leases: dict[tuple[str, str], bytes] = {}  # the leases held: their stored value
        # monotonic time the last successful claim/renewal was sent (its `until` computed after)
        self._renewed: dict[tuple[str, str], float] = {}
        self._deadlines: dict[tuple[str, str], asyncio.TimerHandle] = {}  # per held lease: ends its job
        self._ticker: asyncio.Task[None] | None = None
        self._defs: dict[tuple[str, str], SourceDef] = {}
        self._forgotten = 0   # how many definitions were dropped from _defs: _learn must not bring one back
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
                    await self._run(d)
        if self._shared:
            self._ticker = asyncio.create_task(self._tick_forever(), name="sluice-source-leases")

    async def close(self) -> None:
        """Stop every job (bounded wait); definitions and wanted states stay as they are. On a
        shared store the leases held are given back, so another broker takes the sources at once."""
        self._closed = True
        for handle in self._deadlines.values():
            handle.cancel()
        self._deadlines.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(BaseException):
                await self._ticker
        tasks = [*self._tasks.values(), *(t for ending in self._ending.values() for t in ending)]
        self._tasks.clear()
        await _cancel(tasks)
        async with self._lock:   # a round still running (shielded) has finished: no lease is taken after this
            for key in list(self._leases):
                await self._release_quietly(key)

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
        await self._checked(project, type_name, stream, properties)
        now = self._now()
        d = SourceDef(project, str(uuid.uuid4()), name, type_name, stream, description, properties, RUNNING,
                      now, now, now)
        stored = _encoded(d)

        async def body_() -> tuple[Any, Tasks]:
            self._refuse_taken(project, name, None)
            await self._refuse_taken_elsewhere(project, name, None)
            if len(self._defs) >= MAX_SOURCES:
                raise client_error(ErrorCode.QUOTA_EXCEEDED, detail=f"at most {MAX_SOURCES} sources per broker")
            await self.broker.store.meta_write({source_key(project, d.id): stored})
            key = (project, d.id)
            self._defs[key], self._states[key] = d, SourceState()
            await self._run(d)
            return Source(d, self._states[key]), []
        return await self._mutation(body_)  # type: ignore[no-any-return]

    def list(self, project: str) -> list[Source]:
        return sorted((Source(d, self._states[k]) for k, d in self._defs.items() if k[0] == project),
                      key=lambda s: s.definition.name)

    def all(self) -> tuple[Source, ...]:
        """Every project's sources (for metrics)."""
        return tuple(Source(d, self._states[k]) for k, d in self._defs.items())

    def get(self, project: str, ref: object) -> Source:
        """By id, else by name, as this broker knows it. Raises SOURCE_NOT_FOUND."""
        key = self._key(project, ref)
        return Source(self._defs[key], self._states[key])

    async def find(self, project: str, ref: object) -> Source:
        """`get`, after looking in a shared store when this broker does not know the source: one
        created through another broker a moment ago (before this one's next round) is found, as
        a stream is. Raises SOURCE_NOT_FOUND."""
        await self._known(project, ref)
        return self.get(project, ref)

    async def find_all(self, project: str) -> tuple[Source, ...]:
        """`list`, with what a shared store holds for the project that this broker has not learnt."""
        if self._shared:
            await self._learn(project)
        return tuple(self.list(project))

    async def _known(self, project: str, ref: object) -> None:
        if self._shared and isinstance(ref, str) and self._lookup(project, ref) is None:
            await self._learn(project)

    async def _learn(self, project: str) -> None:
        """The project's definitions in the shared store that this broker does not know yet, as its
        next round would learn them (that round also forgets what was deleted elsewhere). Nothing
        is learnt when a definition was dropped while the store was read: the read may be from
        before a delete that has returned since, and would bring the source back."""
        forgotten = self._forgotten
        rows = await self.broker.store.meta_scan(source_prefix(project))
        if forgotten != self._forgotten or self._closed:
            return
        for _, raw in rows:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                d = SourceDef.from_json(raw)
                key = (d.project, d.id)
                if key not in self._defs:
                    state = self._states[key] = SourceState()
                    if d.wanted == RUNNING:   # where it runs is for the next round to see: not here
                        state.running(ELSEWHERE)
                    self._defs[key] = d

    async def update(self, project: str, ref: object, body: Any) -> Source:
        """Change name, description, stream or properties of a stopped source (the fields given;
        `type` may be given, unchanged). Raises SOURCE_NOT_FOUND, SOURCE_RUNNING, BAD_SOURCE, SOURCE_EXISTS."""
        if not isinstance(body, dict):
            raise client_error(ErrorCode.BAD_BODY, detail="an update must be a JSON object")

        async def body_() -> tuple[Any, Tasks]:
            for _ in range(CAS_TRIES):
                key, d, raw = await self._fresh(project, ref)
                if d.wanted == RUNNING:
                    raise client_error(ErrorCode.SOURCE_RUNNING, source=d.name)
                if body.get("type") not in (None, d.type):   # the same type (a whole object sent back) is fine
                    raise client_error(ErrorCode.BAD_SOURCE, property="type",
                                       detail=f"a source's type cannot change (it is {d.type}): create another")
                name = d.name if body.get("name") is None else self._name(body["name"])
                stream, description, properties = self._fields(project, body, d)
                await self._checked(project, d.type, stream, properties)
                self._refuse_taken(project, name, d.id)
                await self._refuse_taken_elsewhere(project, name, d.id)
                new = d.with_(name=name, stream=stream, description=description, properties=properties,
                              updated_ms=self._now())
                if await self._replace(key, raw, _encoded(new)):
                    self._defs[key] = new
                    return Source(new, self._states[key]), []
            raise _contended(d)
        return await self._mutation(body_)  # type: ignore[no-any-return]

    async def delete(self, project: str, ref: object) -> None:
        async def body_() -> tuple[Any, Tasks]:
            for _ in range(CAS_TRIES):
                key, d, raw = await self._fresh(project, ref)   # deleted elsewhere: forgotten, SOURCE_NOT_FOUND
                if await self._replace(key, raw, None):
                    break
            else:
                raise _contended(d)
            del self._defs[key]
            self._forgotten += 1
            state = self._states.pop(key)
            state.status = STOPPED
            ending = self._end(key)
            await self._release_quietly(key)
            return None, ending
        await self._mutation(body_)

    async def start_source(self, project: str, ref: object) -> Source:
        """Start a stopped source (a no-op on a running one). Raises SOURCE_NOT_FOUND, and
        BAD_SOURCE when its stored definition no longer passes the checks (its stream is gone)."""
        async def body_() -> tuple[Any, Tasks]:
            for _ in range(CAS_TRIES):
                key, d, raw = await self._fresh(project, ref)
                if d.wanted == RUNNING:   # maybe started through another broker: run here if its lease is free
                    if key not in self._tasks:
                        await self._run(d)
                    return Source(d, self._states[key]), []
                await self._checked(project, d.type, d.stream, d.properties)
                new = d.with_(wanted=RUNNING, started_ms=self._now())
                if await self._replace(key, raw, new.to_json()):
                    self._defs[key] = new
                    await self._run(new)
                    return Source(new, self._states[key]), []
            raise _contended(d)
        return await self._mutation(body_)  # type: ignore[no-any-return]

    async def stop_source(self, project: str, ref: object) -> Source:
        """Stop a running source (a no-op on a stopped one); returns once its job has ended (or
        after STOP_WAIT_S if the job will not let go)."""
        async def body_() -> tuple[Any, Tasks]:
            changed = False
            for _ in range(CAS_TRIES):
                key, d, raw = await self._fresh(project, ref)
                if d.wanted == STOPPED:   # maybe stopped through another broker: still ended here
                    break
                new = d.with_(wanted=STOPPED)
                if await self._replace(key, raw, new.to_json()):
                    d, changed = new, True
                    self._defs[key] = d
                    break
            else:
                raise _contended(d)
            ending: Tasks = []
            if changed or key in self._tasks or key in self._leases:
                ending = self._end(key)
                await self._release_quietly(key)
                state = self._states[key]
                state.status, state.message, state.lag = STOPPED, "", None
            return Source(d, self._states[key]), ending
        return await self._mutation(body_)  # type: ignore[no-any-return]

    # -- parts ---------------------------------------------------------------------------------------

    async def _fresh(self, project: str, ref: object) -> tuple[tuple[str, str], SourceDef, bytes | None]:
        """The source's key, definition and stored form for a verb to change. A shared store: read
        again from the store (another broker may have started, stopped, updated or deleted it since
        this one's last round; the verb's compare-and-set fails if it changes again meanwhile).
        Raises SOURCE_NOT_FOUND (also when deleted through another broker: forgotten here then)."""
        await self._known(project, ref)
        key = self._key(project, ref)
        if not self._shared:
            return key, self._defs[key], None
        raw = await self.broker.store.meta_get(source_key(*key))
        if raw is None:   # deleted through another broker: as the next round would
            d = self._defs.pop(key)
            self._forgotten += 1
            self._states.pop(key, None)
            self._end(key)
            await self._release_quietly(key)
            raise client_error(ErrorCode.SOURCE_NOT_FOUND, source=d.name)
        try:
            d = SourceDef.from_json(raw)
        except (ValueError, KeyError, TypeError):   # written by another version: the cached one
            d = self._defs[key]
        self._defs[key] = d
        return key, d, raw

    async def _replace(self, key: tuple[str, str], stored: bytes | None, new: bytes | None) -> bool:
        """Write the definition (None: delete it); on a shared store only if it is still `stored`."""
        if not self._shared:
            await self.broker.store.meta_write({source_key(*key): new})
            return True
        return await self.broker.store.meta_cas(source_key(*key), stored, new)

    def _key(self, project: str, ref: object) -> tuple[str, str]:
        key = self._lookup(project, ref)
        if key is None:
            raise client_error(ErrorCode.SOURCE_NOT_FOUND, source=str(ref)[:200])
        return key

    def _lookup(self, project: str, ref: object) -> tuple[str, str] | None:
        """The key of the project's source with id `ref`, else with name `ref`; None if none."""
        if isinstance(ref, str):
            if (project, ref) in self._defs:
                return project, ref
            for key, d in self._defs.items():
                if key[0] == project and d.name == ref:
                    return key
        return None

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
        if properties is None:
            raise bad("properties", "is required: an object of the source type's properties")
        if not isinstance(properties, dict):   # {} goes on: the type names the property it needs
            raise bad("properties", "must be an object of the source type's properties")
        return stream, description, properties

    async def _checked(self, project: str, type_name: str, stream: str, properties: dict[str, Any]) -> Any:
        """The type's config, after every check: properties, then the target stream (on a shared
        store, one created through another broker a moment ago too)."""
        stype = TYPES.get(type_name)
        if stype is None:   # stored by a broker that knew more types
            raise bad("type", f"[{type_name[:64]}] is not a source type here; use one of: {', '.join(TYPES)}")
        config = stype.configure(Props(properties))
        try:
            target = await self.broker.stream_config(stream, project=project)
        except BrokerError as exc:
            if exc.code not in (ErrorCode.STREAM_NOT_FOUND, ErrorCode.INVALID_REQUEST):
                raise   # the store unavailable: not a verdict on the stream
            raise bad("stream", f"stream [{stream[:200]}] does not exist in project [{project}]; create it "
                                "first") from None
        check_target(target, stype.data_type(config))
        return config

    def _refuse_taken(self, project: str, name: str, own_id: str | None) -> None:
        if any(k[0] == project and d.name == name and d.id != own_id for k, d in self._defs.items()):
            raise client_error(ErrorCode.SOURCE_EXISTS, source=name)

    async def _refuse_taken_elsewhere(self, project: str, name: str, own_id: str | None) -> None:
        """On a shared store: the name taken by a source created through another broker since
        this one last looked (a create racing another at the same moment may still both win)."""
        if not self._shared:
            return
        for _, raw in await self.broker.store.meta_scan(source_prefix(project)):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                d = SourceDef.from_json(raw)
                if d.name == name and d.id != own_id:
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

    # -- leases on a shared store (module docstring) -----------------------------------------------

    async def _run(self, d: SourceDef) -> None:
        """Run a source wanted running: at once on a store of this broker's own; on a shared store
        only if this broker gets its lease (else another broker runs it)."""
        if not self._shared:
            self._spawn(d)
            return
        key = (d.project, d.id)
        try:
            mine = await self._claim(key)
        except BrokerError as e:   # the store did not answer: the next tick tries again
            log.info("source %s/%s: lease not taken now (%s)", d.project, d.name, e.message)
            mine = False
        if mine:
            if key not in self._tasks:
                self._spawn(d)
        else:
            self._states[key].running(ELSEWHERE)

    def _lease_value(self) -> bytes:
        return json.dumps({"owner": self.holder, "until": self._now() + int(self._lease_s * 1000)}).encode()

    async def _claim(self, key: tuple[str, str]) -> bool:
        """Take or renew the source's lease. False: another broker holds it (and no longer
        ours, if it was). Raises what the store raises."""
        lkey = lease_key(*key)
        held = self._leases.get(key)
        start = self._monotonic()   # before `until` is computed: the deadline below is never later
        new = self._lease_value()
        if held is not None:
            ok = await self.broker.store.meta_cas(lkey, held, new)
        else:
            raw = await self.broker.store.meta_get(lkey)
            if raw is not None:
                try:
                    lease = json.loads(raw)
                    taken = lease["owner"] != self.holder and int(lease["until"]) >= self._now()
                except (ValueError, KeyError, TypeError):
                    taken = False   # unreadable: take it over
                if taken:
                    return False
            ok = await self.broker.store.meta_cas(lkey, raw, new)
        if ok:
            if start >= self._renewed.get(key, start):   # (a claim that began earlier but answered later: not it)
                self._leases[key], self._renewed[key] = new, start
                self._arm(key, start)
        else:
            self._leases.pop(key, None)
            self._renewed.pop(key, None)
            self._disarm(key)
        return ok

    def _arm(self, key: tuple[str, str], start: float) -> None:
        """The holder's own deadline: LEASE_S * 0.75 after the renewal began, the job ends unless a
        later renewal succeeded by then - whatever the rounds are doing (a store call that hangs)."""
        self._disarm(key)
        if self._closed:
            return
        delay = max(0.0, start + self._lease_s * 0.75 - self._monotonic())
        self._deadlines[key] = asyncio.get_running_loop().call_later(delay, self._deadline_passed, key, start)

    def _disarm(self, key: tuple[str, str]) -> None:
        handle = self._deadlines.pop(key, None)
        if handle is not None:
            handle.cancel()

    def _deadline_passed(self, key: tuple[str, str], start: float) -> None:
        if self._deadlines.get(key) is None or self._renewed.get(key) != start:
            return   # renewed or given back since
        if self._monotonic() < start + self._lease_s * 0.75:   # an injected clock behind the loop's
            self._arm(key, start)
            return
        del self._deadlines[key]
        self._leases.pop(key, None)
        self._renewed.pop(key, None)
        if key in self._tasks:
            d = self._defs.get(key)
            log.warning("source %s/%s: lease not renewed in time; stopping it here", key[0],
                        d.name if d is not None else key[1])
            self._end(key)
            state = self._states.get(key)
            if state is not None:
                state.failed("its lease could not be renewed in time (the store does not answer)")

    async def _release(self, key: tuple[str, str]) -> None:
        held = self._leases.pop(key, None)
        self._renewed.pop(key, None)
        self._disarm(key)
        if held is not None:
            await self.broker.store.meta_cas(lease_key(*key), held, None)

    async def _release_quietly(self, key: tuple[str, str]) -> None:
        """Give a lease back; if the store does not answer, it runs out by itself."""
        with contextlib.suppress(BrokerError):
            await self._release(key)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 4)
            try:
                await self.tick()
            except Exception:   # never let the lease keeper die: the next tick tries again
                log.warning("source leases: a round failed", exc_info=True)

    async def tick(self) -> None:
        """One round of the lease keeper (module docstring); the tests call it directly too."""
        async def body_() -> tuple[Any, Tasks]:
            ending: Tasks = []
            try:
                rows = await self.broker.store.meta_scan(source_prefix())
            except BrokerError:
                rows = None   # the store is unreachable: keep the definitions known, renew below (fails)
            if rows is not None:
                stored: dict[tuple[str, str], SourceDef] = {}
                for _, raw in rows:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        d = SourceDef.from_json(raw)
                        stored[(d.project, d.id)] = d
                for key in [k for k in self._defs if k not in stored]:   # deleted through another broker
                    del self._defs[key]
                    self._forgotten += 1
                    self._states.pop(key, None)
                    ending += self._end(key)
                    await self._release_quietly(key)
                for key, d in stored.items():
                    if key not in self._defs:
                        self._states[key] = SourceState()
                    self._defs[key] = d
            wanted: list[tuple[tuple[str, str], SourceDef]] = []
            for key, d in list(self._defs.items()):
                if d.wanted == RUNNING:
                    wanted.append((key, d))
                elif key in self._tasks or key in self._leases:   # stopped through another broker
                    ending += self._end(key)
                    await self._release_quietly(key)
                    state = self._states[key]
                    state.status, state.message, state.lag = STOPPED, "", None
                elif self._states[key].status == RUNNING:
                    self._states[key].status, self._states[key].message = STOPPED, ""
            # every lease at once: a slow store delays them all by one round trip, not one per source
            claims = await asyncio.gather(*(self._claim(key) for key, _ in wanted), return_exceptions=True)
            for (key, d), claim in zip(wanted, claims):
                if isinstance(claim, BaseException) and not isinstance(claim, BrokerError):
                    raise claim
                mine = claim if isinstance(claim, bool) else None   # None: the store did not answer
                if mine:
                    if key not in self._tasks:
                        log.info("source %s/%s: lease taken, running it here", d.project, d.name)
                        self._spawn(d)
                elif mine is False:
                    if key in self._tasks:
                        log.warning("source %s/%s: its lease was taken by another broker; stopping it here",
                                    d.project, d.name)
                        ending += self._end(key)
                    self._states[key].running(ELSEWHERE)
                elif key in self._tasks and self._monotonic() - self._renewed.get(key, 0.0) > self._lease_s * 0.75:
                    log.warning("source %s/%s: lease not renewed in time; stopping it here", d.project, d.name)
                    ending += self._end(key)
                    self._leases.pop(key, None)
                    self._renewed.pop(key, None)
                    self._disarm(key)
                    self._states[key].failed("its lease could not be renewed (the store does not answer)")
            return None, ending
        if not self._closed:
            await self._mutation(body_)

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
        ctx = JobContext(Sink(self.broker, d.project, d.stream, stype.data_type(config), state), state, backoff,
                         own_servers=self.broker.store.own_servers, task=asyncio.current_task())
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


def _contended(d: SourceDef) -> BrokerError:
    return server_error(ErrorCode.UNAVAILABLE, detail=f"source [{d.name}] kept changing through another broker; "
                                                      "try again")


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
