"""Series: the key a point's metric and tags make, where its points live, and the one value type
each series holds - kept durably (shared/spec/tsdb-put.md sections 2 and 6).

A series key is `metric` plus the sorted tag pairs, encoded as compact JSON
(`["sys.cpu",[["dc","lga"],["host","web01"]]]`): tag keys and values may hold `,` and `=`, so a
joined text would be ambiguous; JSON is not. It may be longer than the DIS partition-key limit,
so points are routed by the key's hash (routing.key_hash, the same MD5 the DIS door uses for
partition keys) through `Broker.append_partitioned` (put.py), never by a truncated key.

Value types: "numeric" (long and double together), "string", "boolean". A series' type is fixed
by the first point accepted for it and stored in the store's metadata before that point is
appended, so no restart can let a second type in. (A crash between the two leaves a type with no
point: a retry of the same type goes in, another type is refused; the point itself was never
acknowledged.) On a shared store (several brokers) a new type is claimed with meta_cas (create if
absent): of two brokers admitting two types for one new series at once, one claim wins everywhere
and the other broker refuses its points as a type conflict. A numeric series also remembers the
kind of its first value (long or double), for the put's error message (`series holds double
values`); long and double still mix freely.

`TsdbStream` is the one stream points go to (`--tsdb-stream` in `--tsdb-project`): created on
first use with TSDB_PARTITIONS partitions, recreated if it was deleted, and the registry of its
current incarnation, loaded once.

Metadata key layout (beside apps.py's and sources' keys):

    b"T" + project + b"\\0" + stream_id u64 + series key (UTF-8)      value: the kind, one byte
                                                                     (l long, d double, n numeric, s, b)

Keyed by the stream's id: a tsdb stream deleted and recreated starts with no series.
"""
from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import orjson

from broker.core.routing import key_hash, partition_for_hash
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import StreamConfig

if TYPE_CHECKING:   # not at run time: a tsdb worker imports this module, and needs none of the core
    from broker.core.broker import Broker
    from broker.tsdb.workers import TsdbWorkers

SERIES_PREFIX = b"T"
CATCH_UP_ALL_S = 1.0   # a shared store: how stale /api/suggest's view of other brokers' series may be
INDEX_CHUNK = 10_000   # series a query indexes between turns of the event loop (~25 ms of it)
NUMERIC, STRING, BOOLEAN = "numeric", "string", "boolean"
LONG, DOUBLE = "long", "double"   # the kinds of numeric values
TSDB_PARTITIONS = 8               # partitions of the tsdb stream when the door creates it
_CODE = {NUMERIC: b"n", LONG: b"l", DOUBLE: b"d", STRING: b"s", BOOLEAN: b"b"}
_KIND = {v: k for k, v in _CODE.items()}
_KIND[b"n"] = LONG                # a numeric series stored without its kind
TYPE_OF = {LONG: NUMERIC, DOUBLE: NUMERIC, NUMERIC: NUMERIC, STRING: STRING, BOOLEAN: BOOLEAN}
_SID = struct.Struct(">Q")


def series_key(metric: str, tags: dict[str, str]) -> str:
    """The canonical key of a series; `tags` values are strings already."""
    return orjson.dumps([metric, sorted(tags.items())]).decode()


def series_partition(key: str, partition_count: int) -> int:
    return partition_for_hash(key_hash(key), partition_count)


def record_data(metric: str, timestamp_ms: int, value: int | float | str | bool, tags: dict[str, str]) -> bytes:
    """A point as its record's data: `{"metric", "timestamp" (ms), "value", "tags"}`, tags sorted."""
    return orjson.dumps({"metric": metric, "timestamp": timestamp_ms, "value": value,
                         "tags": dict(sorted(tags.items()))})


def record_parts(metric: str, tags: dict[str, str]) -> tuple[bytes, bytes]:
    """record_data in two pieces that only depend on the series, for writers that make many
    records of one series: `head + b"%d" % timestamp_ms + b',"value":' + orjson.dumps(value) +
    tail` is byte for byte `record_data(metric, timestamp_ms, value, tags)`. `tags` sorted by key
    already (SeriesForm's are; sorting them again cost a new series ~0.3 µs)."""
    return (b'{"metric":' + orjson.dumps(metric) + b',"timestamp":',
            b',"tags":' + orjson.dumps(tags) + b"}")


class SeriesForm:
    """What every point of one series shares, worked out once per series (points.py remembers it
    per metric and tags as received): the metric and its tags as text, sorted; the series key; the
    two pieces of its records (record_parts); the key's hash (routing.key_hash) and, per partition
    count, the partition it routes to (remembered). Read only once made."""

    __slots__ = ("metric", "tags", "key", "head", "tail", "hash", "routed")

    def __init__(self, metric: str, tags: dict[str, str], key: str | None = None) -> None:
        """`tags` sorted by key, values text; `key` series_key(metric, tags) when the caller has it."""
        self.metric, self.tags = metric, tags
        self.key = series_key(metric, tags) if key is None else key
        self.head, self.tail = record_parts(metric, tags)
        self.hash = key_hash(self.key)
        # (partition count, the partition for it): the last count asked, one tuple so that puts
        # sorted on other threads (big bodies) never read one count's partition for another
        self.routed = (0, 0)

    def partition(self, partition_count: int) -> int:
        """series_partition(key, partition_count), remembered for the last count asked."""
        count, partition = self.routed
        if count != partition_count:
            partition = partition_for_hash(self.hash, partition_count)
            self.routed = (partition_count, partition)
        return partition

    def record(self, timestamp_ms: int, value_json: bytes) -> bytes:
        """record_data's bytes for a point of this series; `value_json` the value as orjson writes it."""
        return b'%s%d,"value":%s%s' % (self.head, timestamp_ms, value_json, self.tail)


def _prefix(project: str, stream_id: int) -> bytes:
    return SERIES_PREFIX + project.encode() + b"\0" + _SID.pack(stream_id)


@dataclass(frozen=True, slots=True)
class Series:
    key: str
    metric: str
    tags: dict[str, str]
    type: str


class _Names:
    """Distinct names, kept sorted for /api/suggest's prefix lookups (bisect: O(log n + max) a
    lookup). A name seen for the first time waits in `_new` until the next lookup merges every new
    one at once: `list.sort` of the sorted list with a sorted tail is one linear merge (Timsort
    finds the two runs), not a sort of everything on every call."""

    __slots__ = ("_seen", "_sorted", "_new")

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._sorted: list[str] = []
        self._new: list[str] = []

    def add(self, name: str) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self._new.append(name)

    def sorted(self) -> list[str]:
        if self._new:
            self._new.sort()
            self._sorted += self._new
            self._sorted.sort()
            self._new = []
        return self._sorted


class SeriesRegistry:
    """Every known series of one tsdb stream, in memory, backed by the store's metadata."""

    def __init__(self, broker: Broker, project: str, stream_id: int) -> None:
        self.broker, self.project, self.stream_id = broker, project, stream_id
        self._kinds: dict[str, str] = {}
        self.learned: list[str] = []   # every known series key, in the order learned (tsdb workers are told so)
        # the series by metric, for queries: `learned[:_indexed]` of them, the rest added when a
        # query asks (a put that brings thousands of new series does not pay for it)
        self._by_metric: dict[str, dict[str, Series]] = {}
        self._indexed = 0
        # the distinct metric names, tag keys and tag values of the indexed series, for suggest;
        # kept across a rebuild of the index (the same keys give the same names: none is added twice)
        self._names: dict[str, _Names] = {"metrics": _Names(), "tagk": _Names(), "tagv": _Names()}
        self._caught_up_all = -CATCH_UP_ALL_S   # monotonic time of the last catch_up over every metric
        # writers hold it from checking their points' types to the end of `fix`, so two requests
        # cannot both find a series new and fix two types for it
        self.lock = asyncio.Lock()

    async def load(self) -> None:
        await self._learn(b"")

    async def _learn(self, within: bytes) -> None:
        """The stored series whose key starts with `within` (all: b""), known from now on."""
        prefix = _prefix(self.project, self.stream_id)
        for key, value in await self.broker.store.meta_scan(prefix + within):
            self._remember(key[len(prefix):].decode(), _KIND.get(value, LONG))

    async def catch_up(self, metric: str | None = None) -> None:
        """On a shared store, the series other brokers made since this registry last looked (those
        of `metric` only when given: one prefix scan): a query or suggest through this broker then
        knows what another broker's put just acknowledged. A store this broker alone writes: nothing
        to learn. Suggests over every metric look at most every CATCH_UP_ALL_S."""
        if not self.broker.store.capabilities.shared:
            return
        if metric is not None:
            await self._learn(orjson.dumps([metric])[:-1] + b",")   # `["<metric>",`: its series' keys
            return
        now = time.monotonic()
        if now - self._caught_up_all >= CATCH_UP_ALL_S:
            self._caught_up_all = now
            await self._learn(b"")

    def _remember(self, key: str, kind: str) -> None:
        known = self._kinds.get(key)
        if known is None:
            self.learned.append(key)
        elif known != kind:   # (not seen to happen: a type is fixed once) the index is made again
            self._by_metric, self._indexed = {}, 0
        self._kinds[key] = kind

    async def indexed(self) -> None:
        """Index what was learned since the last query, INDEX_CHUNK series at a time with the event
        loop's other work between: the first query after a put of 400,000 new series held the
        loop ~1 s in one go, every other request of the broker waiting behind it."""
        while self._indexed < len(self.learned):
            self._index(INDEX_CHUNK)
            if self._indexed < len(self.learned):
                await asyncio.sleep(0)

    def _index(self, limit: int | None = None) -> dict[str, dict[str, Series]]:
        learned, by_metric, kinds = self.learned, self._by_metric, self._kinds
        add_metric, add_tagk, add_tagv = (self._names[k].add for k in ("metrics", "tagk", "tagv"))
        start = self._indexed
        chunk = learned[start:] if limit is None else learned[start:start + limit]
        for key in chunk:
            metric, pairs = orjson.loads(key)
            of_metric = by_metric.get(metric)
            if of_metric is None:
                of_metric = by_metric[metric] = {}
                add_metric(metric)
            of_metric[key] = Series(key, metric, dict(pairs), TYPE_OF[kinds[key]])
            for k, v in pairs:
                add_tagk(k)
                add_tagv(v)
        self._indexed = start + len(chunk)
        return by_metric

    def type_of(self, key: str) -> str | None:
        kind = self._kinds.get(key)
        return None if kind is None else TYPE_OF[kind]

    def kind_of(self, key: str) -> str | None:
        """long, double, string or boolean: the type, and for a numeric series its first value's kind."""
        return self._kinds.get(key)

    def kinds(self) -> Mapping[str, str]:
        """Every known series key -> its kind: kind_of for a writer checking many points. Read only;
        it changes under the reader only when `fix` runs (writers hold `lock`)."""
        return self._kinds

    async def fix(self, new: dict[str, str]) -> dict[str, str]:
        """Store the types (or kinds: LONG, DOUBLE) of series seen for the first time, then know
        them. Returns the series another broker of a shared store claimed first, with the kind it
        stored (known now too): their points must be checked again against it. Raises what the
        store raises (STORAGE_FULL, UNAVAILABLE): nothing is known then. Shielded: a caller that
        goes away cannot leave the store holding a type this registry does not know."""
        if not new:
            return {}
        return await asyncio.shield(self._fix(dict(new)))

    async def _fix(self, new: dict[str, str]) -> dict[str, str]:
        prefix = _prefix(self.project, self.stream_id)
        store = self.broker.store
        if not store.capabilities.shared:   # this broker alone writes the registry: one metadata write
            await store.meta_write({prefix + k.encode(): _CODE[t] for k, t in new.items()})
            for k, t in new.items():
                self._remember(k, _KIND[_CODE[t]])
            return {}
        # several brokers: each type is claimed with a create-if-absent, so the first claim of a
        # series wins on every broker and a loser adopts the winner's type
        lost: dict[str, str] = {}

        async def claim(key: str, kind: str) -> None:
            stored_key = prefix + key.encode()
            while not await store.meta_cas(stored_key, None, _CODE[kind]):
                current = await store.meta_get(stored_key)
                if current is not None:   # (None: deleted meanwhile - its stream was: claim again)
                    lost[key] = _KIND.get(current, LONG)
                    return
        await asyncio.gather(*(claim(k, t) for k, t in new.items()))
        for k, t in new.items():
            self._remember(k, lost.get(k) or _KIND[_CODE[t]])
        return lost

    def metrics(self) -> list[str]:
        return list(self.names("metrics"))

    def names(self, kind: str) -> Sequence[str]:
        """`kind` metrics, tagk or tagv: every distinct metric name, tag key or tag value of the
        known series, sorted - the registry's own list, read only, good until the next call. Costs
        what was learned since the last call (indexed, then merged in), never a walk over every
        series or a sort of every name."""
        self._index()
        return self._names[kind].sorted()

    def series_of(self, metric: str) -> list[Series]:
        return list(self._index().get(metric, {}).values())

    def __len__(self) -> int:
        return len(self._kinds)


class TsdbStream:
    """The stream points go to and the series registry of its current incarnation (by stream id:
    a stream deleted and recreated starts with no series)."""

    def __init__(self, broker: Broker, project: str, stream_name: str, partitions: int = TSDB_PARTITIONS,
                 workers: TsdbWorkers | None = None) -> None:
        """`workers`: the processes that check and sort big puts (`--tsdb-workers`; app.py owns them)."""
        self.broker, self.project, self.stream_name, self.partitions = broker, project, stream_name, partitions
        self.workers = workers
        self._registry: SeriesRegistry | None = None
        self._creating = asyncio.Lock()
        self._loads: dict[int, asyncio.Task[SeriesRegistry]] = {}   # by stream id: one load, shared

    def config(self) -> StreamConfig | None:
        """The stream as it is now, or None when it does not exist."""
        try:
            return self.broker.catalogue.get(self.project, self.stream_name)
        except BrokerError as exc:
            if exc.code is ErrorCode.STREAM_NOT_FOUND:
                return None
            raise

    async def ensure(self) -> tuple[StreamConfig, SeriesRegistry]:
        """The stream (created now if it does not exist) and its registry. Raises INVALID_REQUEST
        when the name holds a typed (Timeplus) stream, and what creating a stream raises."""
        config = self.config()
        if config is None:
            async with self._creating:
                config = self.config()
                if config is None:
                    try:
                        config = await self.broker.create_stream(self.stream_name, self.partitions,
                                                                 data_type="JSON", project=self.project)
                    except BrokerError as exc:   # created meanwhile by another door (or broker)
                        if exc.code is not ErrorCode.STREAM_EXISTS:
                            raise
                        config = self.broker.catalogue.get(self.project, self.stream_name)
        if config.schema is not None:
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"stream {self.stream_name} of project {self.project} is a typed stream; data "
                                      f"points go to a schemaless one (--tsdb-stream, --tsdb-project)")
        return config, await self.registry(config)

    def layout(self) -> tuple[StreamConfig, SeriesRegistry] | None:
        """The stream and its registry as a put is sorted for now, when both are at hand (None: not
        created or not loaded yet, or a typed stream: the write works it out)."""
        config = self.config()
        registry = self._registry
        if config is None or config.schema is not None or registry is None or registry.stream_id != config.stream_id:
            return None
        return config, registry

    async def layout_now(self) -> tuple[StreamConfig, SeriesRegistry] | None:
        """layout(), the registry loaded first if the stream exists (after a restart, the first puts
        find it unloaded); None when loading fails (the write raises that)."""
        config = self.config()
        if config is not None and config.schema is None and (self._registry is None
                                                              or self._registry.stream_id != config.stream_id):
            try:
                await self.registry(config)
            except BrokerError:
                return None
        return self.layout()

    async def lookup(self) -> tuple[StreamConfig | None, SeriesRegistry | None]:
        """The stream and its registry if the stream exists (for queries: nothing is created). On a
        shared store, a stream another broker's first put created a moment ago is found there."""
        try:
            config: StreamConfig | None = await self.broker.stream_config(self.stream_name, project=self.project)
        except BrokerError as exc:
            if exc.code is not ErrorCode.STREAM_NOT_FOUND:
                raise
            config = None
        if config is None or config.schema is not None:
            return None, None
        return config, await self.registry(config)

    async def registry(self, config: StreamConfig) -> SeriesRegistry:
        """The registry of this incarnation of the stream, loaded from the store once.

        The load (a scan of every series key: seconds on a big store) is one task that every caller
        waits for, shielded: a put given up by its sync_timeout must not cut it short, or puts that
        all give up sooner than it takes would start it again for ever."""
        registry = self._registry
        if registry is not None and registry.stream_id == config.stream_id:
            return registry
        load = self._loads.get(config.stream_id)
        if load is None:
            load = self._loads[config.stream_id] = asyncio.ensure_future(self._load(config))
            load.add_done_callback(lambda done: self._loaded(config.stream_id, done))
        return await asyncio.shield(load)

    async def _load(self, config: StreamConfig) -> SeriesRegistry:
        registry = SeriesRegistry(self.broker, config.project, config.stream_id)
        await registry.load()
        self._registry = registry
        return registry

    def _loaded(self, stream_id: int, done: asyncio.Task[SeriesRegistry]) -> None:
        self._loads.pop(stream_id, None)   # a failed load is tried again by the next caller
        if not done.cancelled():
            done.exception()   # retrieved: its callers raise it (all of them may have gone)
