"""class Broker: the one facade the front doors call. Every verb takes the project it acts in.

The rules live in parts, one per path, composed here (not inherited):

    catalogue.py   StreamCatalogue   which streams exist per project; create/list/describe/delete/scale
    writes.py      WritePath         PutRecords: validation, routing, append via the Committer
    reads.py       ReadPath          cursors, GetRecords with long poll, push subscriptions
    consumers.py   Consumers         apps, checkpoints, consumer state (lag)
    groups.py      ConsumerGroups    consumer-group heartbeats over the Leases interface
    retention.py                     trimming expired records
    queries.py     Queries           streaming SQL queries: one task each over the read path

A verb that spans parts (deleting a stream) is orchestrated here. Every method documents what it
returns and which `ErrorCode`s it raises; none blocks the event loop (the store is async).

Several brokers on one shared store (`store.capabilities.shared`): the store reports the others'
changes (storage/base.py StoreEvents, `_OtherBrokers` below): their appends wake this broker's long
polls and subscriptions through the WriteNotifier, as a local write does; their creates, scales and
deletes go into the catalogue (a delete ends this broker's readers of the stream as a local one
does). A stream name this broker does not know is looked up in the store before a verb answers
STREAM_NOT_FOUND (created through another broker a moment ago). So is a stream the broker knows
when a verb would refuse it for a partition it lacks (PARTITION_NOT_FOUND, _NOT_WRITABLE: scaled
through another broker), a create for a name it holds (deleted through another), a write the
store refuses STREAM_NOT_FOUND for the stream the broker holds under the name (deleted and maybe
made again through another; a Timeplus ingest's rows are checked again against the new schema, see
`stream_again`), and a cursor's stream it does not know: each is tried once more if the store's
config differs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

from broker.core.apps import AppInfo, Checkpoint, PartitionConsumerState
from broker.core.catalogue import StreamCatalogue, StreamSummary
from broker.core.consumers import Consumers
from broker.core.groups import ConsumerGroups
from broker.core.leases import Leases, LocalLeases, StoreLeases
from broker.core.limits import DEFAULT_LIMITS, PROJECT_NAME, STREAM_NAME, Limits
from broker.core.metric_series import PARTITION_LABELS, STREAM_LABELS, MetricSeries, parse_labels, parse_period
from broker.core.notify import WriteNotifier
from broker.core.queries import Queries
from broker.core.reads import ReadPath
from broker.core.retention import enforce_retention
from broker.core.stats import BrokerStats
from broker.core.writer import Committer
from broker.core.writes import WritePath
from broker.errors import BrokerError, ErrorCode
from broker.model import (
    DEFAULT_PROJECT,
    GetRecordsResult,
    Packed,
    PutColumns,
    PutEntry,
    PutRecordsResult,
    StreamConfig,
    StreamDescription,
    StreamPage,
    StreamSchema,
)
from broker.storage.base import StorageState, Store, StoreEvents

log = logging.getLogger(__name__)

T = TypeVar("T")
# Refusals a shared store's broker may give from a view of the stream that another broker's
# change has overtaken (its event still on the way): worth one look at the store.
_STALE_PARTITION = frozenset({ErrorCode.PARTITION_NOT_FOUND, ErrorCode.PARTITION_NOT_WRITABLE})
_STALE = _STALE_PARTITION | {ErrorCode.STREAM_NOT_FOUND}
_GONE_IDS = 10_000   # deleted stream ids remembered (their cursors): a bound, not a cache policy


def _possible(project: str, stream_name: str) -> bool:
    """Whether the names could be a stream's (others are not looked up in a shared store: the
    verb answers them as it always does, never with a store key error)."""
    return bool(STREAM_NAME.fullmatch(stream_name) and PROJECT_NAME.fullmatch(project))


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Broker:
    def __init__(self, store: Store, *, cursor_secret: bytes | None = None, limits: Limits = DEFAULT_LIMITS,
                 clock_ms: Callable[[], int] = wall_clock_ms, leases: Leases | None = None) -> None:
        """`cursor_secret` None: the key kept in the store (created on first start)."""
        self.store = store
        self.limits = limits
        self._now = clock_ms
        self._cursor_secret = cursor_secret
        self.notifier = WriteNotifier()
        self.stats = BrokerStats()   # plain counters for metrics (core/stats.py)
        self.committer = Committer(store, self.stats)
        self.catalogue = StreamCatalogue(store, limits, clock_ms)
        self.writes = WritePath(self.catalogue, self.committer, self.notifier, limits, clock_ms, self.stats)
        self.reads = ReadPath(self.catalogue, store, self.notifier, limits, clock_ms, self.stats)
        self.metric_series = MetricSeries(self.catalogue, store, self.stats, clock_ms)
        self.consumers = Consumers(self.catalogue, store, limits, clock_ms)
        self.queries = Queries(self.catalogue, self.reads, store, clock_ms, known=self._known)
        # leases: the brokers of a shared store keep one table in it, in wall-clock time. A table in
        # this broker's memory runs on its monotonic clock - a step of the wall clock (NTP, a VM
        # resumed) ended or stretched every lease at once - with the horizons of its restart grace
        # in the store in wall-clock time (see leases.py). An injected clock (tests) drives both.
        local = (leases is None and not store.capabilities.shared) or isinstance(leases, LocalLeases)
        lease_clock = monotonic_ms if local and clock_ms is wall_clock_ms else clock_ms
        if leases is None:
            leases = StoreLeases(store) if store.capabilities.shared \
                else LocalLeases(store, wall_ms=clock_ms, grace_cap_ms=clock_ms() + 2 * limits.max_lease_ms,
                                 started_ms=lease_clock())
        self.groups = ConsumerGroups(self.catalogue, self.consumers, leases, limits, lease_clock)
        self._shared = store.capabilities.shared
        self._gone: set[int] = set()   # stream ids of cursors the store does not have (deleted)
        self._chores: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        # other brokers' changes first, then the catalogue: nothing between the two is missed
        await self.store.watch(_OtherBrokers(self))
        await self.catalogue.load()
        if self._cursor_secret is None:
            await self.reads.load_secret()
        else:
            self.reads.secret = self._cursor_secret
        self.committer.start()

    def begin_shutdown(self) -> None:
        """Wake every long poll and end every subscription (and with them every streaming
        query); writes still go on until close()."""
        self.notifier.close()
        self.queries.shutdown()

    @property
    def shutting_down(self) -> bool:
        return self.notifier.closed

    async def close(self) -> None:
        """Refuse new appends, commit those already accepted. The store is closed by its owner."""
        self.begin_shutdown()
        await self.queries.close()
        await self.committer.close()
        try:   # the minute so far, so a restart loses none of the monitoring series
            await self.metric_series.flush()
        except Exception:
            log.warning("could not store the last minute of the monitoring series", exc_info=True)

    @property
    def commits(self) -> int:
        return self.committer.commits

    @property
    def storage_state(self) -> StorageState:
        """OK, or FULL / FAILED while the store refuses writes (it recovers by itself): for
        health and metrics."""
        return self.store.storage_state

    # -- streams -------------------------------------------------------------------------------

    async def create_stream(self, stream_name: object, partition_count: object, retention_hours: object = None,
                            data_type: object = None, stream_type: object = None, *,
                            project: str = DEFAULT_PROJECT, schema: StreamSchema | None = None,
                            tags: object = None, sys_tags: object = None) -> StreamConfig:
        """`schema`: a typed stream (see StreamSchema); `tags`, `sys_tags`: DIS's, see
        limits.check_tags. Raises INVALID_REQUEST, TOO_MANY_TAGS, QUOTA_EXCEEDED, STREAM_EXISTS
        (a shared store: the catalogue knows the existing stream afterwards, even if another
        broker created it a moment ago)."""
        def create() -> Awaitable[StreamConfig]:
            return self.catalogue.create(project, stream_name, partition_count, retention_hours, data_type,
                                         stream_type, schema, tags, sys_tags)
        seen = self._seen(project, stream_name)
        try:
            return await create()
        except BrokerError as exc:
            if exc.code is not ErrorCode.STREAM_EXISTS:
                raise
            # a shared store: known here but deleted through another broker a moment ago (created
            # again: the catalogue learns that one, and the answer stays STREAM_EXISTS)
            if not await self._stale(project, stream_name, seen) or (
                    isinstance(stream_name, str) and self.catalogue.lookup(project, stream_name)):
                raise
        return await create()

    async def stream_config(self, stream_name: object, *, project: str = DEFAULT_PROJECT) -> StreamConfig:
        """The stream's config (a door that works with it directly). Raises INVALID_REQUEST,
        STREAM_NOT_FOUND."""
        await self._known(project, stream_name)
        return self.catalogue.get(project, stream_name)

    async def delete_stream(self, stream_name: object, *, project: str = DEFAULT_PROJECT) -> None:
        """Delete a stream, its records and its checkpoints. Raises STREAM_NOT_FOUND."""
        # all of it, even if the caller goes away (a gRPC deadline): a half-done delete would leave
        # checkpoints behind and long polls asleep
        await asyncio.shield(self._delete_stream(project, stream_name))

    async def _delete_stream(self, project: str, stream_name: object) -> None:
        await self._known(project, stream_name)
        known = self.catalogue.lookup(project, stream_name) if isinstance(stream_name, str) else None
        try:
            config = await self.catalogue.delete(project, stream_name)
        except BrokerError as exc:
            if exc.code is ErrorCode.STREAM_NOT_FOUND and known is not None \
                    and self.catalogue.by_id(known.stream_id) is None:
                self._forget_dropped(known)   # another broker deleted it first: as its event would
            raise
        self.writes.forget(config.stream_id)
        self.stats.forget(config.stream_id)
        await self.groups.leases.forget_stream(config.stream_id)
        # wake long polls and subscriptions waiting on it: they answer STREAM_NOT_FOUND now,
        # not when their wait runs out
        self.notifier.notify((config.stream_id, p) for p in range(config.readable_partition_count))
        await self.consumers.forget_stream(config)
        await self.metric_series.forget(config.stream_id)

    async def update_stream(self, stream_name: object, *, project: str = DEFAULT_PROJECT,
                            retention_hours: object = None, **schema_fields: object) -> StreamConfig:
        """Change a stream's retention and (typed streams) its schema's settings: see
        StreamCatalogue.update_settings. Raises STREAM_NOT_FOUND, INVALID_REQUEST, UNAVAILABLE,
        STORAGE_FULL."""
        await self._known(project, stream_name)
        return await asyncio.shield(self.catalogue.update_settings(project, stream_name, retention_hours,
                                                                   **schema_fields))

    async def update_partition_count(self, stream_name: object, target_partition_count: object, *,
                                     project: str = DEFAULT_PROJECT) -> tuple[StreamConfig, StreamConfig]:
        """Scale the stream's ACTIVE partitions to `target_partition_count` (see
        StreamCatalogue.update_partition_count); returns (before, after). Raises STREAM_NOT_FOUND,
        INVALID_REQUEST, QUOTA_EXCEEDED, UNAVAILABLE, STORAGE_FULL."""
        await self._known(project, stream_name)
        before, after = await self.catalogue.update_partition_count(project, stream_name, target_partition_count,
                                                                    self._drain_writes)
        if after is not before:
            self.writes.forget_layout(after.stream_id)
        return before, after

    async def _drain_writes(self) -> None:
        """Return once every append queued so far is committed: an empty append queued behind
        them completes with (or after) the last of them, as the committer commits in order."""
        await self.committer.append([])

    async def list_streams(self, limit: int | None = None, start_after: str | None = None, *,
                           project: str = DEFAULT_PROJECT) -> StreamPage:
        """One page of the project's streams in name order. Raises INVALID_REQUEST."""
        return self.catalogue.page(project, limit, start_after)

    async def stream_summaries(self, *, project: str = DEFAULT_PROJECT) -> list[StreamSummary]:
        """Every stream of the project with its records held, newest write and first partitions'
        sequence bounds (see StreamCatalogue.summaries: shared and kept ~1 s). Raises INVALID_REQUEST."""
        return await self.catalogue.summaries(project)

    async def describe_stream(self, stream_name: object, start_after_partition: object = None,
                              limit: int | None = None, *, project: str = DEFAULT_PROJECT) -> StreamDescription:
        """Raises STREAM_NOT_FOUND, INVALID_PARTITION_ID, INVALID_REQUEST."""
        await self._known(project, stream_name)
        return await self.catalogue.describe(project, stream_name, start_after_partition, limit)

    # -- records -------------------------------------------------------------------------------

    async def put_records(self, stream_name: object, entries: Sequence[PutEntry] | PutColumns, *,
                          project: str = DEFAULT_PROJECT,
                          handed: asyncio.Future[None] | None = None) -> PutRecordsResult:
        """See WritePath.put_records."""
        await self._known(project, stream_name)
        seen = self._seen(project, stream_name)
        try:
            result = await self.writes.put_records(project, stream_name, entries, handed)
        except BrokerError as exc:
            # The store no longer has the stream this broker holds under the name: deleted through
            # another broker, maybe made again, its event still on the way. Once more against what
            # the store holds now (nothing of the request was written: see writes._deleted_under).
            # Not within a produce stream, as below.
            if exc.code is not ErrorCode.STREAM_NOT_FOUND or seen is None or handed is not None \
                    or not await self._stale(project, stream_name, seen):
                raise
            return await self.writes.put_records(project, stream_name, entries)
        if not self._shared or not result.failures:
            return result
        redo = [i for i, error in result.failures if error.code in _STALE_PARTITION]
        # Records sent to a partition this broker does not know yet (another broker scaled the
        # stream a moment ago): once more if the stream was. Not within a produce stream (`handed`):
        # its next batch may be handed over already, and a retry would land after it.
        if not redo or handed is not None or not await self._stale(project, stream_name, seen):
            return result
        listed = entries.entries() if isinstance(entries, PutColumns) else entries
        again = await self.writes.put_records(project, stream_name, [listed[i] for i in redo])
        for j, i in enumerate(redo):
            result.partitions[i], result.seqs[i] = again.partitions[j], again.seqs[j]
        retried = set(redo)
        result.failures = sorted([f for f in result.failures if f[0] not in retried]
                                 + [(redo[j], error) for j, error in again.failures])
        return result

    async def stream_again(self, config: StreamConfig) -> StreamConfig | None:
        """A shared store, after a refusal that an old view of the stream may explain (rows checked
        against `config`'s schema, or a write refused STREAM_NOT_FOUND because the store no longer
        has `config`'s stream): the stream the name holds now if that is not `config` - deleted
        through another broker and maybe made again, its event still on the way - else None (the
        refusal stands; always None on a store only this broker serves). Raises STREAM_NOT_FOUND
        when the name holds no stream any more."""
        if not await self._stale(config.project, config.stream_name, config):
            return None
        return self.catalogue.get(config.project, config.stream_name)

    async def name_or_id(self, stream_name: object, stream_id: object, *, project: str = DEFAULT_PROJECT) -> object:
        """`stream_name`, unless the project has no stream of that name and `stream_id` (a decimal
        text or an int) is the id of one of its streams: then that stream's name. DIS's PutRecords
        falls back to its `stream_id` this way (shared/spec/dis-api.md 2.6); ids of other
        projects' streams are not followed."""
        if stream_id is None:   # the common case: no lookup here (check_put looks the name up)
            return stream_name
        await self._known(project, stream_name)
        if not isinstance(stream_name, str) or self.catalogue.lookup(project, stream_name) is not None:
            return stream_name
        text = str(stream_id) if isinstance(stream_id, int) and not isinstance(stream_id, bool) else stream_id
        if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 19:
            return stream_name
        config = self.catalogue.by_id(int(text))
        return config.stream_name if config is not None and config.project == project else stream_name

    async def check_put(self, stream_name: object, count: int, *, project: str = DEFAULT_PROJECT) -> None:
        """Whether put_records would take a batch of `count` records by its stream and count alone
        (see WritePath.check_count): for a door to ask before it decodes the records."""
        await self._known(project, stream_name)
        self.writes.check_count(project, stream_name, count)

    async def append_rows(self, stream_name: object, rows: Sequence[bytes], *, project: str = DEFAULT_PROJECT,
                          stream_id: int | None = None) -> int:
        """See WritePath.append_rows: unkeyed rows spread over the partitions, one batch each."""
        return await self.writes.append_rows(project, stream_name, rows, stream_id)

    async def append_keyed(self, stream_name: object, items: Sequence[tuple[int, bytes]],
                           timestamps_ms: Sequence[int] | None = None, *, project: str = DEFAULT_PROJECT,
                           stream_id: int | None = None) -> list[int | BrokerError]:
        """See WritePath.append_keyed: (hash, data) items routed by their hash, one batch per
        partition, per-item outcomes (seq or the error that refused it)."""
        return await self.writes.append_keyed(project, stream_name, items, timestamps_ms, stream_id)

    async def append_partitioned(self, stream_name: object,
                                 batches: Mapping[int, tuple[Sequence[bytes] | Packed, int]], *,
                                 project: str = DEFAULT_PROJECT, stream_id: int | None = None,
                                 partition_count: int | None = None,
                                 admitted: bool = False) -> dict[int, int | BrokerError]:
        """See WritePath.append_partitioned: records the caller routed, partition -> (records, their
        latest time in ms), one batch per partition; per partition its first seq or the error that
        refused it. `partition_count`: the ACTIVE count the caller routed by. `admitted`: the
        write limit said yes already (`admit`)."""
        return await self.writes.append_partitioned(project, stream_name, batches, stream_id, partition_count,
                                                    admitted)

    def admit(self, config: StreamConfig, sizes: Mapping[int, tuple[int, int]]) -> dict[int, BrokerError]:
        """See WritePath.admit: partition -> (records, bytes); those the write limit refuses now."""
        return self.writes.admit(config, sizes)

    def refund(self, config: StreamConfig, sizes: Mapping[int, tuple[int, int]]) -> None:
        """See WritePath.refund: give back what `admit` took for records not appended after all."""
        self.writes.refund(config, sizes)

    async def get_cursor(self, stream_name: object, partition_id: object, cursor_type: object = None,
                         starting_seq: object = None, timestamp_ms: object = None, *,
                         project: str = DEFAULT_PROJECT) -> str:
        """See ReadPath.get_cursor."""
        await self._known(project, stream_name)
        return await self._again(project, stream_name, lambda: self.reads.get_cursor(
            project, stream_name, partition_id, cursor_type, starting_seq, timestamp_ms))

    async def cursor_at(self, cursor: object, seq: object, *, project: str = DEFAULT_PROJECT) -> str:
        """See ReadPath.cursor_at."""
        # a shared store: made through another broker a moment ago (the cursor may have expired)
        await self._learn_cursor_stream(cursor, expiring=False)
        return await self.reads.cursor_at(project, cursor, seq)

    async def get_records(self, cursor: object, limit: int | None = None, max_fetch_bytes: int | None = None,
                          wait_ms: int | None = None, *, project: str = DEFAULT_PROJECT,
                          counted: bool = True) -> GetRecordsResult:
        """See ReadPath.get_records."""
        try:
            return await self.reads.get_records(project, cursor, limit, max_fetch_bytes, wait_ms, counted)
        except BrokerError as exc:
            if exc.code is not ErrorCode.STREAM_NOT_FOUND or not await self._learn_cursor_stream(cursor):
                raise
        return await self.reads.get_records(project, cursor, limit, max_fetch_bytes, wait_ms, counted)

    def subscribe(self, cursor: object, max_records: int | None = None, max_wait_ms: int | None = None, *,
                  project: str = DEFAULT_PROJECT) -> AsyncGenerator[GetRecordsResult, None]:
        """See ReadPath.subscribe; an empty batch is a heartbeat."""
        if not self._shared:
            return self.reads.subscribe(project, cursor, max_records, max_wait_ms)
        return self._subscribe_shared(project, cursor, max_records, max_wait_ms)

    async def _subscribe_shared(self, project: str, cursor: object, max_records: int | None,
                                max_wait_ms: int | None) -> AsyncGenerator[GetRecordsResult, None]:
        await self._learn_cursor_stream(cursor)
        async with contextlib.aclosing(self.reads.subscribe(project, cursor, max_records, max_wait_ms)) as batches:
            async for batch in batches:
                yield batch

    # -- apps, checkpoints, consumer state -----------------------------------------------------

    async def create_app(self, app_name: object, *, project: str = DEFAULT_PROJECT) -> AppInfo:
        return await self.consumers.create_app(project, app_name)

    async def describe_app(self, app_name: object, *, project: str = DEFAULT_PROJECT) -> AppInfo:
        return await self.consumers.describe_app(project, app_name)

    async def list_apps(self, limit: int | None = None, start_after: str | None = None,
                        stream_name: str | None = None, *,
                        project: str = DEFAULT_PROJECT) -> tuple[int, list[AppInfo], bool]:
        return await self.consumers.list_apps(project, limit, start_after, stream_name)

    async def delete_app(self, app_name: object, *, project: str = DEFAULT_PROJECT) -> None:
        name, app_id = await self.consumers.delete_app(project, app_name)
        await self.groups.forget_app(project, name, app_id)

    async def commit_checkpoint(self, app_name: object, stream_name: object, partition_id: object, seq: object,
                                metadata: object = None, checkpoint_type: object = "LAST_READ", *,
                                project: str = DEFAULT_PROJECT) -> None:
        await self._known(project, stream_name)
        await self._again(project, stream_name, lambda: self.consumers.commit_checkpoint(
            project, app_name, stream_name, partition_id, seq, metadata, checkpoint_type))

    async def get_checkpoint(self, app_name: object, stream_name: object, partition_id: object,
                             checkpoint_type: object = "LAST_READ", *,
                             project: str = DEFAULT_PROJECT) -> Checkpoint | None:
        await self._known(project, stream_name)
        return await self.consumers.get_checkpoint(project, app_name, stream_name, partition_id, checkpoint_type)

    async def delete_checkpoint(self, app_name: object, stream_name: object, partition_id: object = None,
                                checkpoint_type: object = "LAST_READ", *, project: str = DEFAULT_PROJECT) -> None:
        await self._known(project, stream_name)
        await self.consumers.delete_checkpoint(project, app_name, stream_name, partition_id, checkpoint_type)

    async def consumer_state(self, app_name: object, stream_name: object, checkpoint_type: object = "LAST_READ",
                             start_after_partition: object = None, limit: int | None = None, *,
                             project: str = DEFAULT_PROJECT) -> tuple[list[PartitionConsumerState], bool]:
        await self._known(project, stream_name)
        return await self.consumers.consumer_state(project, app_name, stream_name, checkpoint_type,
                                                   start_after_partition, limit)

    # -- consumer groups -----------------------------------------------------------------------

    async def heartbeat(self, app_name: object, stream_name: object, member_id: object, held: Sequence[int] = (),
                        lease_ms: int | None = None, *, project: str = DEFAULT_PROJECT) -> tuple[list[int], int]:
        await self._known(project, stream_name)
        return await self.groups.heartbeat(project, app_name, stream_name, member_id, held, lease_ms)

    async def leave_group(self, app_name: object, stream_name: object, member_id: object, *,
                          project: str = DEFAULT_PROJECT) -> None:
        await self.groups.leave(project, app_name, stream_name, member_id)

    # -- monitoring (DIS show_stream_metrics / show_partition_metrics) ---------------------------

    async def stream_metrics(self, stream_name: object, label: object, label_list: object, start_time: object,
                             end_time: object, partition_id: object = None, *,
                             project: str = DEFAULT_PROJECT) -> dict[str, list[tuple[int, int]]]:
        """Per label asked (`label_list`, comma-separated, wins over `label`), one (minute start
        in Unix seconds, value) per minute of the period: the stream's, or with `partition_id` one
        partition's (see core/metric_series.py). Raises STREAM_NOT_FOUND, INVALID_PARTITION_ID,
        PARTITION_NOT_FOUND, INVALID_METRICS_LABEL, INVALID_METRICS_PERIOD, METRICS_PERIOD_TOO_LONG."""
        await self._known(project, stream_name)
        config = self.catalogue.get(project, stream_name)
        partition = None if partition_id is None else self.catalogue.partition_of(config, partition_id)
        labels = parse_labels(label, label_list, STREAM_LABELS if partition is None else PARTITION_LABELS)
        start_s, end_s = parse_period(start_time, end_time, self._now())
        return await self.metric_series.query(config, partition, labels, start_s, end_s)

    # -- retention -----------------------------------------------------------------------------

    async def enforce_retention(self) -> int:
        """Trim records older than each stream's retention. Returns how many partitions moved."""
        return await enforce_retention(self.store, self.catalogue.all(), self._now())

    # -- other brokers (a shared store) ------------------------------------------------------------

    async def _known(self, project: str, stream_name: object) -> None:
        """A shared store: a name this broker does not know may have been created through another
        broker a moment ago (its event still on the way): look it up in the store once. Costs one
        flag test and one dict lookup otherwise. Names that cannot exist are not looked up: the verb
        answers them as it always does."""
        if self._shared and isinstance(stream_name, str) and self.catalogue.lookup(project, stream_name) is None \
                and _possible(project, stream_name):
            await self._refresh(project, stream_name)

    async def _refresh(self, project: str, stream_name: str) -> StreamConfig | None:
        """The stream as the shared store has it now, this broker's view brought in line with it
        (learnt, changed or dropped) as the other broker's event would."""
        config = await self.store.find_stream(project, stream_name)
        known = self.catalogue.lookup(project, stream_name)   # an event may have come meanwhile
        if config is None:
            if known is not None:
                self._stream_dropped(known.stream_id)
        elif known != config:
            self._stream_changed(config)
        return config

    def _seen(self, project: str, stream_name: object) -> StreamConfig | None:
        """This broker's view of the stream as a call starts (for `_stale` after a refusal)."""
        if not self._shared or not isinstance(stream_name, str):
            return None
        return self.catalogue.lookup(project, stream_name)

    async def _stale(self, project: str, stream_name: object, seen: StreamConfig | None) -> bool:
        """A shared store, after a refusal that this broker's view of the stream (`seen` as the
        call started) may explain - another broker created, scaled or deleted it a moment ago, its
        event still on the way: True when that view has changed since, by the event meanwhile or
        by reading the stream again from the store now. The call is then worth making once more."""
        if not (self._shared and isinstance(stream_name, str) and _possible(project, stream_name)):
            return False
        if self.catalogue.lookup(project, stream_name) != seen:
            return True
        return await self._refresh(project, stream_name) != seen

    async def _again(self, project: str, stream_name: object, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, and once more if it was refused for a stream or partition this broker's view
        lacked and `_stale` found it out of date."""
        seen = self._seen(project, stream_name)
        try:
            return await call()
        except BrokerError as exc:
            if exc.code not in _STALE or not await self._stale(project, stream_name, seen):
                raise
        return await call()

    async def _learn_cursor_stream(self, cursor: object, expiring: bool = True) -> bool:
        """A shared store: a valid cursor of a stream this broker does not know (created through
        another broker a moment ago) - learn it from the store. True when it did. A stream id the
        store does not have either was deleted: remembered, so its cursors cost no second look.
        `expiring` False: an expired cursor is valid here (see cursor_at)."""
        if not self._shared:
            return False
        stream_id = self.reads.cursor_stream_id(cursor, expiring)
        if stream_id is None or self.catalogue.by_id(stream_id) is not None or stream_id in self._gone:
            return False
        named = next((c for c in await self.store.list_streams() if c.stream_id == stream_id), None)
        # then by its name, which the store remembers as it would a change it was told of
        config = None if named is None else await self.store.find_stream(named.project, named.stream_name)
        if config is not None and config.stream_id == stream_id:
            self._stream_changed(config)
            return True
        if len(self._gone) >= _GONE_IDS:
            self._gone.clear()
        self._gone.add(stream_id)
        return False

    def _stream_changed(self, config: StreamConfig) -> None:
        clash = self.catalogue.lookup(config.project, config.stream_name)
        if clash is not None and clash.stream_id != config.stream_id:   # its delete is still on the way
            self._stream_dropped(clash.stream_id)
        before = self.catalogue.learn(config)
        if before is not None and before != config:
            self.writes.forget_layout(config.stream_id)
        self.stats.remote_stream_changes += 1

    def _stream_dropped(self, stream_id: int) -> None:
        """As a local delete does in this broker's memory (the store is done already): writes and
        stats forget it, its groups go (kept in memory; in the store the deleting broker dropped
        them), and its long polls and subscriptions wake to STREAM_NOT_FOUND."""
        config = self.catalogue.unlearn(stream_id)
        if config is None:
            return
        self.stats.remote_stream_changes += 1
        self._forget_dropped(config)

    def _forget_dropped(self, config: StreamConfig) -> None:
        stream_id = config.stream_id
        self.writes.forget(stream_id)
        self.stats.forget(stream_id)
        if isinstance(self.groups.leases, LocalLeases):   # StoreLeases: the deleting broker dropped them
            task = asyncio.get_running_loop().create_task(self.groups.leases.forget_stream(stream_id))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)
        self.notifier.notify((stream_id, p) for p in range(config.readable_partition_count))


class _OtherBrokers(StoreEvents):
    """The store's reports of other brokers' changes, applied to one Broker (see the module doc)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def appended(self, partitions: Iterable[tuple[int, int]]) -> None:
        broker = self._broker
        refs = list(partitions)
        broker.stats.remote_appends += len(refs)
        broker.notifier.notify(refs)

    def stream_changed(self, config: StreamConfig) -> None:
        self._broker._stream_changed(config)

    def stream_dropped(self, stream_id: int) -> None:
        self._broker._stream_dropped(stream_id)

    def known_streams(self) -> Iterable[StreamConfig]:
        return self._broker.catalogue.all()
