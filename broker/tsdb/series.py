"""Series: the key a point's metric and tags make, where its points live, and the one value type
each series holds - kept durably (shared/spec/tsdb-put.md sections 2 and 6).

A series key is `metric` plus the sorted tag pairs, encoded as compact JSON
(`["sys.cpu",[["dc","lga"],["host","web01"]]]`): tag keys and values may hold `,` and `=`, so a
joined text would be ambiguous; JSON is not. It may be longer than the DIS partition-key limit,
so points are routed by the key's hash (routing.key_hash, the same MD5 the DIS door uses for
partition keys) through `Broker.append_keyed`, never by a truncated key.

Value types: "numeric" (long and double together), "string", "boolean". A series' type is fixed
by the first point accepted for it and stored in the store's metadata before that point is
appended, so no restart can let a second type in. (A crash between the two leaves a type with no
point: a retry of the same type goes in, another type is refused; the point itself was never
acknowledged.)

Metadata key layout (beside apps.py's and sources' keys):

    b"T" + project + b"\\0" + stream_id u64 + series key (UTF-8)      value: the type, one byte

Keyed by the stream's id: a tsdb stream deleted and recreated starts with no series.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

from broker.core.broker import Broker
from broker.core.routing import key_hash, partition_for_hash

SERIES_PREFIX = b"T"
NUMERIC, STRING, BOOLEAN = "numeric", "string", "boolean"
_CODE = {NUMERIC: b"n", STRING: b"s", BOOLEAN: b"b"}
_TYPE = {v: k for k, v in _CODE.items()}
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


def _prefix(project: str, stream_id: int) -> bytes:
    return SERIES_PREFIX + project.encode() + b"\0" + _SID.pack(stream_id)


@dataclass(frozen=True, slots=True)
class Series:
    key: str
    metric: str
    tags: dict[str, str]
    type: str


class SeriesRegistry:
    """Every known series of one tsdb stream, in memory, backed by the store's metadata."""

    def __init__(self, broker: Broker, project: str, stream_id: int) -> None:
        self.broker, self.project, self.stream_id = broker, project, stream_id
        self._types: dict[str, str] = {}
        self._by_metric: dict[str, dict[str, Series]] = {}

    async def load(self) -> None:
        prefix = _prefix(self.project, self.stream_id)
        for key, value in await self.broker.store.meta_scan(prefix):
            self._remember(key[len(prefix):].decode(), _TYPE.get(value, NUMERIC))

    def _remember(self, key: str, type_: str) -> None:
        self._types[key] = type_
        metric, pairs = orjson.loads(key)
        self._by_metric.setdefault(metric, {})[key] = Series(key, metric, dict(pairs), type_)

    def type_of(self, key: str) -> str | None:
        return self._types.get(key)

    async def fix(self, new: dict[str, str]) -> None:
        """Store the types of series seen for the first time (one metadata write), then know them.
        Raises what the store raises (STORAGE_FULL, UNAVAILABLE): nothing is known then."""
        if not new:
            return
        prefix = _prefix(self.project, self.stream_id)
        await self.broker.store.meta_write({prefix + k.encode(): _CODE[t] for k, t in new.items()})
        for k, t in new.items():
            self._remember(k, t)

    def metrics(self) -> list[str]:
        return sorted(self._by_metric)

    def series_of(self, metric: str) -> list[Series]:
        return list(self._by_metric.get(metric, {}).values())

    def __len__(self) -> int:
        return len(self._types)
