"""The stream catalogue: which streams exist, in which project, with which configuration.

Kept in memory (loaded from the store at start, changed through here), so resolving a name on the
write and read paths costs a dict lookup. Creates and deletes are ordered by one lock; the store
call itself runs outside the event loop's way (it is awaited). With a shared store other brokers
change it too: the Broker feeds their changes in (`learn`, `unlearn`, from the store's events) and
looks a name it does not know up in the store before answering STREAM_NOT_FOUND.
"""
from __future__ import annotations

import asyncio
import bisect
import functools
from collections import OrderedDict
from dataclasses import replace
from typing import Awaitable, Callable, NamedTuple

from broker.core import routing
from broker.core.limits import Limits, check_project, check_stream_name, check_tags, clip_page
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import (
    PartitionBounds,
    PartitionInfo,
    ScaleEvent,
    StreamConfig,
    StreamDescription,
    StreamPage,
    StreamSchema,
)
from broker.storage.base import Store

DATA_TYPES = ("BLOB", "JSON", "CSV")
SUMMARY_TTL_S = 1.0          # how long summaries() keeps an answer for later callers
SUMMARY_YIELD_EVERY = 2048   # partitions added up between yields to the event loop (~4 ms of work)
SUMMARY_PARTITIONS = 4       # partitions whose bounds a summary keeps (the rest are summed only)


class StreamSummary(NamedTuple):
    """One stream as a list of every stream shows it (StreamCatalogue.summaries)."""
    config: StreamConfig
    records: int                   # records held: sum of next_seq - first_seq over readable partitions
    last_ts: int                   # the newest write's timestamp, 0 if none
    first: list[PartitionBounds]   # bounds of partitions 0.. up to SUMMARY_PARTITIONS
STREAM_TYPES = ("COMMON", "ADVANCED")


GONE_NAMES = 1024   # names of deleted streams remembered for errors (a cursor lives 5 minutes)


class StreamCatalogue:
    def __init__(self, store: Store, limits: Limits, clock_ms: Callable[[], int]) -> None:
        self._store = store
        self._limits = limits
        self._now = clock_ms
        self._streams: dict[tuple[str, str], StreamConfig] = {}
        self._by_id: dict[int, StreamConfig] = {}
        self._lock = asyncio.Lock()   # orders creates, deletes and scale events
        # stream id -> set when its scale event is done: writes to it wait (see update_partition_count)
        self._scaling: dict[int, asyncio.Event] = {}
        # project -> (when computed, the computation): summaries() shared by concurrent callers
        self._summaries: dict[str, tuple[float, asyncio.Task[list[StreamSummary]]]] = {}
        # while load() runs: the ids another broker deleted meanwhile (the listing may be older)
        self._unlearnt_while_loading: set[int] | None = None
        # stream id -> name of the streams deleted lately, for errors about their cursors (which
        # hold the id only): the last GONE_NAMES, not kept across a restart
        self._gone: OrderedDict[int, str] = OrderedDict()

    async def load(self) -> None:
        """At start. A stream another broker changed meanwhile (learnt from its event) is kept as
        learnt, not replaced by the listing, which may be older; nor is a stream another broker
        deleted meanwhile (its event handled while the listing was on its way) brought back."""
        unlearnt: set[int] = set()
        self._unlearnt_while_loading = unlearnt
        try:
            listing = await self._store.list_streams()
        finally:
            self._unlearnt_while_loading = None
        for config in listing:
            if config.stream_id not in self._by_id and config.key not in self._streams \
                    and config.stream_id not in unlearnt:
                self._remember(config)

    def _remember(self, config: StreamConfig) -> None:
        self._streams[config.key] = self._by_id[config.stream_id] = config

    def lookup(self, project: str, stream_name: str) -> StreamConfig | None:
        """The config this broker knows under that name, or None (no check, no raise)."""
        return self._streams.get((project, stream_name))

    def learn(self, config: StreamConfig) -> StreamConfig | None:
        """Another broker created the stream or changed its layout: use `config` from now on;
        returns the config it replaces (None: a new stream). The caller has unlearnt a different
        stream holding the same name first."""
        before = self._by_id.get(config.stream_id)
        self._remember(config)
        return before

    def unlearn(self, stream_id: int) -> StreamConfig | None:
        """Another broker deleted the stream: forget it (nothing in the store); returns what it was."""
        if self._unlearnt_while_loading is not None:
            self._unlearnt_while_loading.add(stream_id)
        config = self._by_id.pop(stream_id, None)
        if config is not None and self._streams.get(config.key) is config:
            del self._streams[config.key]
        if config is not None:
            self._note_gone(config)
        return config

    def _note_gone(self, config: StreamConfig) -> None:
        self._gone[config.stream_id] = config.stream_name
        while len(self._gone) > GONE_NAMES:
            self._gone.popitem(last=False)

    def gone(self, stream_id: int) -> str:
        """How errors name a stream that is no longer here (a cursor of it): its name and id when
        it was deleted lately - the name may be a new stream's by now - else the id alone."""
        name = self._gone.get(stream_id)
        return f"(deleted stream {stream_id})" if name is None else f"{name} (deleted stream {stream_id})"

    def get(self, project: str, stream_name: object) -> StreamConfig:
        """The stream's config. Raises INVALID_REQUEST (bad project), STREAM_NOT_FOUND."""
        config = self._streams.get((project, stream_name)) if isinstance(stream_name, str) else None
        if config is None:
            check_project(project)
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=stream_name)
        return config

    def by_id(self, stream_id: int) -> StreamConfig | None:
        return self._by_id.get(stream_id)

    def all(self) -> list[StreamConfig]:
        return list(self._by_id.values())

    async def create(self, project: str, stream_name: object, partition_count: object,
                     retention_hours: object = None, data_type: object = None,
                     stream_type: object = None, schema: StreamSchema | None = None, tags: object = None,
                     sys_tags: object = None) -> StreamConfig:
        """`schema` makes a typed stream (validated by its door: broker/rows/schema.py); its
        records are JSON objects, so its data_type is JSON. `tags`, `sys_tags`: see
        limits.check_tags. Raises INVALID_REQUEST, TOO_MANY_TAGS, QUOTA_EXCEEDED, STREAM_EXISTS."""
        lim = self._limits
        project = check_project(project)
        stream_name = check_stream_name(stream_name)
        if not isinstance(partition_count, int) or isinstance(partition_count, bool) or partition_count < 1:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"partition_count must be a positive integer, "
                                                                 f"got {partition_count!r:.40}")
        if partition_count > lim.max_partitions:
            raise client_error(ErrorCode.QUOTA_EXCEEDED,
                               detail=f"partition_count {partition_count} exceeds the quota of {lim.max_partitions}")
        retention = self._retention(lim.default_retention_hours if retention_hours is None else retention_hours)
        data_type = data_type or ("JSON" if schema is not None else "BLOB")
        stream_type = stream_type or "COMMON"
        if data_type not in DATA_TYPES:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"data_type must be one of {DATA_TYPES}")
        if stream_type not in STREAM_TYPES:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"stream_type must be one of {STREAM_TYPES}")
        config = StreamConfig(stream_name, partition_count, retention, str(data_type), str(stream_type),
                              self._now(), project=project, schema=schema, tags=check_tags(tags),
                              sys_tags=check_tags(sys_tags, "sys_tags"))
        # shielded: a caller that goes away (gRPC deadline) must not leave the store holding a
        # stream the catalogue does not know
        return await asyncio.shield(self._create(config))

    def _retention(self, hours: object) -> int:
        lim = self._limits
        if not isinstance(hours, int) or isinstance(hours, bool) or \
                not lim.min_retention_hours <= hours <= lim.max_retention_hours:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"the retention (data_duration) must be within "
                               f"[{lim.min_retention_hours}, {lim.max_retention_hours}] hours, got {hours!r:.40}")
        return hours

    async def update_settings(self, project: str, stream_name: object, retention_hours: object = None,
                              **schema_fields: object) -> StreamConfig:
        """Change a stream's retention (None: as it is) and, of a typed stream, the StreamSchema
        fields given (description, ttl_expression, logstore_retention_bytes, logstore_retention_ms:
        what Timeplus lets a PATCH change; the caller checked their types). Durable before it
        returns (store.update_stream). Raises STREAM_NOT_FOUND, INVALID_REQUEST (a schema field of
        a stream without a schema), UNAVAILABLE, STORAGE_FULL."""
        retention = None if retention_hours is None else self._retention(retention_hours)
        async with self._lock:
            config = self.get(project, stream_name)
            schema = config.schema
            if schema_fields:
                if schema is None:
                    raise client_error(ErrorCode.INVALID_REQUEST, detail=f"stream [{config.stream_name}] has no "
                                       f"schema (made by another door): only its retention can change")
                schema = replace(schema, **schema_fields)  # type: ignore[arg-type]
            changed = replace(config, retention_hours=config.retention_hours if retention is None else retention,
                              schema=schema)
            # written even when this broker's view has it already (a shared store's may not), and
            # only what is asked for: what another broker stored meanwhile (a layout, another
            # setting) stays
            fields = ("retention_hours",) * (retention is not None) + ("schema",) * bool(schema_fields)
            if not fields:
                return config
            stored = await self._store.update_stream(changed, fields)
            self._remember(stored)
            self._summaries.pop(project, None)
            return stored

    async def _create(self, config: StreamConfig) -> StreamConfig:
        async with self._lock:
            if config.key in self._streams:
                raise client_error(ErrorCode.STREAM_EXISTS, stream=config.stream_name)
            self._check_project_partitions(config.project, config.partition_count)
            stored = await self._store.create_stream(config)
            self._remember(stored)
            self._summaries.pop(config.project, None)
        return stored

    async def delete(self, project: str, stream_name: object) -> StreamConfig:
        """Forget the stream and drop it from the store; returns what it was. The name is free
        again at once. Raises STREAM_NOT_FOUND."""
        return await asyncio.shield(self._delete(project, stream_name))  # all of it, even if the caller goes

    async def _delete(self, project: str, stream_name: object) -> StreamConfig:
        async with self._lock:
            config = self.get(project, stream_name)
            # Forget it first so no new put reaches the committer. A put already queued is either
            # written before the drop (and dropped with it) or finds the stream id gone and is
            # answered STREAM_NOT_FOUND - never acknowledged and then lost.
            del self._streams[config.key]
            del self._by_id[config.stream_id]
            self._summaries.pop(config.project, None)
            self._note_gone(config)
            try:
                await self._store.drop_stream(config.stream_id)
            except BrokerError as exc:
                # STREAM_NOT_FOUND: another broker deleted it meanwhile (its event still on the way):
                # gone either way, never known again
                if exc.code is not ErrorCode.STREAM_NOT_FOUND:
                    self._remember(config)
                raise
        return config

    def page(self, project: str, limit: int | None = None, start_after: str | None = None) -> StreamPage:
        """One page of the project's streams in name order, after `start_after` (exclusive)."""
        project = check_project(project)
        limit = clip_page(limit, self._limits.default_list_limit, self._limits.max_list_limit, "limit")
        names = sorted(name for p, name in self._streams if p == project)
        start = bisect.bisect_right(names, start_after) if start_after else 0
        page = names[start:start + limit]
        return StreamPage(len(names), [self._streams[(project, n)] for n in page], start + limit < len(names))

    async def summaries(self, project: str) -> list[StreamSummary]:
        """Every stream of the project in name order with its records held (summed over its
        readable partitions), newest write and the bounds of its first SUMMARY_PARTITIONS
        partitions: what a list of all of them shows (the console's streams page). A stream
        deleted while its bounds are read is left out. Raises INVALID_REQUEST.

        The answer is computed once for every caller asking at the same time, and kept for
        SUMMARY_TTL_S (a create or delete in the project drops it): a page polled by many tabs
        costs one computation a second. That one reads every partition's bounds in ONE store
        call (storage/base.py bounds_many: one thread hop for RocksDB) and yields to the event
        loop every SUMMARY_YIELD_EVERY partitions while it adds them up."""
        project = check_project(project)
        loop = asyncio.get_running_loop()
        cached = self._summaries.get(project)
        if cached is None or (cached[1].done() and loop.time() - cached[0] > SUMMARY_TTL_S):
            task = loop.create_task(self._summarise(project))
            cached = self._summaries[project] = (loop.time(), task)
            task.add_done_callback(functools.partial(self._summarised, project))
        return await asyncio.shield(cached[1])   # one caller going away does not cancel it for the rest

    def _summarised(self, project: str, task: asyncio.Task[list[StreamSummary]]) -> None:
        """Kept from when it is done (not from when it began); a failure is not kept at all."""
        held = self._summaries.get(project)
        if held is None or held[1] is not task:
            return
        if task.cancelled() or task.exception() is not None:
            del self._summaries[project]
        else:
            loop = asyncio.get_running_loop()
            self._summaries[project] = (loop.time(), task)
            # dropped once stale (the next caller computes it again anyway): a project name is
            # anything a request names, so entries kept for good would grow without bound
            loop.call_later(SUMMARY_TTL_S, self._expire, project, task)

    def _expire(self, project: str, task: asyncio.Task[list[StreamSummary]]) -> None:
        held = self._summaries.get(project)
        if held is not None and held[1] is task:
            del self._summaries[project]

    async def _summarise(self, project: str) -> list[StreamSummary]:
        configs = [self._streams[(project, name)] for name in sorted(name for p, name in self._streams if p == project)]
        pairs = [(c.stream_id, p) for c in configs for p in range(c.readable_partition_count)]
        bounds = await self._store.bounds_many(pairs)
        out = []
        at = since = 0
        for config in configs:
            if since >= SUMMARY_YIELD_EVERY:   # counted in partitions: 32 streams of 256 held the loop ~20 ms
                since = 0
                await asyncio.sleep(0)
            n = config.readable_partition_count
            since += n
            mine = bounds[at:at + n]
            at += n
            if n and any(b is None for b in mine):   # dropped meanwhile
                continue
            held = [b for b in mine if b is not None]
            out.append(StreamSummary(config, sum(b.next_seq - b.first_seq for b in held),
                                     max((b.last_ts for b in held), default=0), held[:SUMMARY_PARTITIONS]))
        return out

    async def describe(self, project: str, stream_name: object, start_after_partition: object = None,
                       limit: int | None = None) -> StreamDescription:
        """Config plus a page of partitions (ACTIVE, then the DELETED ones a scale-down left) with
        hash ranges, sequence bounds, status and the parents of their newest segment.
        Raises STREAM_NOT_FOUND, INVALID_PARTITION_ID, INVALID_REQUEST."""
        config = self.get(project, stream_name)
        limit = clip_page(limit, self._limits.default_partition_page, self._limits.max_partition_page,
                          "the partition page size (limit_partitions)")
        start = self.page_start(config, start_after_partition)
        readable = config.readable_partition_count
        chosen = range(start, min(start + limit, readable))
        ranges = routing.hash_ranges(config.partition_count)
        now = self._now()
        partitions = []
        for p in chosen:
            bounds = await self._store.bounds(config.stream_id, p)
            segments = tuple(routing.segments(config, p))
            if config.is_active(p):
                partitions.append(PartitionInfo(p, *ranges[p], bounds, "ACTIVE", segments))
                continue
            # a DELETED partition keeps the range it last had
            closed = _closing_event(config, p)
            lo, hi = routing.hash_ranges(closed.src_partition_count)[p]
            partitions.append(PartitionInfo(p, lo, hi, bounds, self.partition_status(config, p, now), segments))
        return StreamDescription(config, partitions, chosen.stop < readable)

    def partition_status(self, config: StreamConfig, p: int, now_ms: int | None = None) -> str:
        """ACTIVE (writable), DELETED (closed by a scale-down, readable) or EXPIRED (closed longer
        than the retention ago: nothing of it is left)."""
        if config.is_active(p):
            return "ACTIVE"
        now = self._now() if now_ms is None else now_ms
        return "EXPIRED" if now - _closing_event(config, p).timestamp_ms >= config.retention_ms else "DELETED"

    @staticmethod
    def page_start(config: StreamConfig, start_after_partition: object) -> int:
        """The first partition of a page that starts after `start_after_partition` (exclusive; none
        given: 0). A well-formed id past the last partition gives an empty page, as DIS's paging
        does. Raises INVALID_PARTITION_ID."""
        if start_after_partition in (None, ""):
            return 0
        after = routing.parse_partition_id(start_after_partition, config.partition_count)
        if after is None:
            raise client_error(ErrorCode.INVALID_PARTITION_ID, partition_id=start_after_partition)
        return after + 1

    def partition_of(self, config: StreamConfig, partition_id: object) -> int:
        """A partition id as a door hands it over (int, "2", "shardId-0000000002") -> its index:
        an ACTIVE partition or a DELETED one (readable until retention).
        Raises INVALID_PARTITION_ID, PARTITION_NOT_FOUND."""
        p = routing.parse_partition_id(partition_id, config.partition_count)
        if p is None:
            raise client_error(ErrorCode.INVALID_PARTITION_ID, partition_id=partition_id)
        if p >= config.readable_partition_count:
            raise client_error(ErrorCode.PARTITION_NOT_FOUND, partition_id=partition_id)
        return p

    # -- scaling -----------------------------------------------------------------------------------

    @property
    def scaling(self) -> bool:
        """Whether some stream's layout is changing right now (writes check this first: a bool)."""
        return bool(self._scaling)

    async def settled(self, config: StreamConfig) -> StreamConfig:
        """The stream's config once any scale event of it in progress is done; the write path
        routes with that. Raises STREAM_NOT_FOUND (deleted meanwhile)."""
        while (done := self._scaling.get(config.stream_id)) is not None:
            await done.wait()
        current = self._by_id.get(config.stream_id)
        if current is None:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=config.stream_name)
        return current

    async def update_partition_count(self, project: str, stream_name: object, target: object,
                                     drain: Callable[[], Awaitable[None]]) -> tuple[StreamConfig, StreamConfig]:
        """Scale the stream to `target` ACTIVE partitions, 0..target-1, the hash space divided
        evenly again (shared/spec/dis-api.md 2.5). Scale-up adds the next ids (or makes DELETED
        ones ACTIVE again, their numbering continuing); scale-down turns the highest ids DELETED:
        readable until retention, never written. Returns (before, after); the same target as now
        changes nothing (before is after).

        The event is exact: writes to the stream wait while it happens, `drain()` returns once
        every write routed by the old layout is committed, and then each partition's next_seq is
        recorded as its boundary (ScaleEvent) - so no record routed by one layout sits on the
        wrong side of it. The new layout is durable (store.update_stream) before any write uses it.
        Sluice relaxes DIS's rate rule (5 a stream per hour, none for an hour after a success):
        it takes up to `Limits.max_scale_events` within the retention window. History older than
        the window is dropped with the next event (the partitions it closed hold no records any
        more).
        Raises STREAM_NOT_FOUND, INVALID_REQUEST, QUOTA_EXCEEDED; UNAVAILABLE/STORAGE_FULL when
        the store cannot persist the layout (nothing changed then)."""
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"target_partition_count must be a positive "
                                                                 f"integer, got {target!r:.40}")
        self.get(project, stream_name)   # a missing stream is not found, even for a target over the quota
        if target > self._limits.max_partitions:
            raise client_error(ErrorCode.QUOTA_EXCEEDED, detail=f"target_partition_count {target} exceeds the "
                                                                f"quota of {self._limits.max_partitions}")
        return await asyncio.shield(self._scale(project, stream_name, target, drain))

    async def _next_seq(self, sid: int, partition: int) -> int:
        """A partition's next_seq; 0 for one that never existed. (One past the readable ones may
        have existed, if the event that closed it has aged out of the history: its numbering goes on.)
        fresh_bounds: a shared store's cached head may lag another broker's acknowledged append,
        which would then lie after the boundary."""
        try:
            return (await self._store.fresh_bounds(sid, partition)).next_seq
        except BrokerError as exc:
            if exc.code is not ErrorCode.PARTITION_NOT_FOUND:
                raise
            return 0

    async def _scale(self, project: str, stream_name: object, target: int,
                     drain: Callable[[], Awaitable[None]]) -> tuple[StreamConfig, StreamConfig]:
        async with self._lock:
            config = self.get(project, stream_name)
            if target == config.partition_count:
                return config, config
            self._check_project_partitions(project, target - config.held_partition_count(self._now()))
            sid = config.stream_id
            done = self._scaling[sid] = asyncio.Event()
            try:
                await drain()
                boundaries = [await self._next_seq(sid, p) for p in range(max(config.readable_partition_count, target))]
                now = self._now()
                kept = tuple(e for e in config.scale_events if now - e.timestamp_ms < config.retention_ms)
                if len(kept) >= self._limits.max_scale_events:
                    raise client_error(ErrorCode.QUOTA_EXCEEDED, detail=f"stream [{config.stream_name}] was scaled "
                                       f"{len(kept)} times within its retention period, the most it keeps; try "
                                       f"again when the oldest of them is {config.retention_hours} hours old")
                event = ScaleEvent(now, config.partition_count, target, tuple(boundaries))
                scaled = await self._store.update_stream(replace(config, partition_count=target,
                                                                 scale_events=(*kept, event)),
                                                         ("partition_count", "scale_events"))
                self._remember(scaled)
            finally:
                del self._scaling[sid]
                done.set()
        return config, scaled


    def _check_project_partitions(self, project: str, more: int) -> None:
        """QUOTA_EXCEEDED when `more` readable partitions would take the project past its quota."""
        if more <= 0:
            return
        now = self._now()
        held = sum(c.held_partition_count(now) for c in self._by_id.values() if c.project == project)
        quota = self._limits.max_project_partitions
        if held + more > quota:
            raise client_error(ErrorCode.QUOTA_EXCEEDED, detail=f"project [{project}] holds {held} partitions; "
                               f"{more} more would pass its quota of {quota}")


def _closing_event(config: StreamConfig, p: int) -> ScaleEvent:
    """The scale-down that last closed partition `p` (not ACTIVE, below readable_partition_count)."""
    return [e for e in config.scale_events if e.target_partition_count <= p < e.src_partition_count][-1]
