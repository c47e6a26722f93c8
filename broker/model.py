"""Plain values shared by the core and storage. No behaviour beyond tiny derived properties.

What a user declares (`StreamConfig`) is kept apart from what the log derives
(`PartitionBounds`). Records are NamedTuples: they are created by the thousand on the read path
and a tuple is the cheapest Python object that still has names.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from operator import itemgetter
from typing import Iterator, NamedTuple, Sequence, overload

from broker.errors import BrokerError

# The project a request belongs to when its door names none (gRPC without `sluice-project`,
# Timeplus paths without a workspace). Projects are namespaces: streams, apps and checkpoints
# belong to one, and the same stream name in two projects is two streams.
DEFAULT_PROJECT = "default"


class CursorType(enum.Enum):
    AT_SEQUENCE_NUMBER = "AT_SEQUENCE_NUMBER"
    AFTER_SEQUENCE_NUMBER = "AFTER_SEQUENCE_NUMBER"
    TRIM_HORIZON = "TRIM_HORIZON"
    LATEST = "LATEST"
    AT_TIMESTAMP = "AT_TIMESTAMP"


@dataclass(frozen=True, slots=True)
class ColumnDef:
    name: str
    type: str          # canonical type text (broker/rows/types.py), e.g. "int32", "nullable(string)"
    default: str = ""  # the default as declared ("" none); kept and reported, not evaluated


@dataclass(frozen=True, slots=True)
class StreamSchema:
    """What makes a stream typed (a Timeplus stream): its columns and what Timeplus reports back.

    A typed stream's records are UTF-8 JSON objects mapping column names to values, so every door
    and consumer reads them; a stream without a schema is a plain log of bytes, which the typed
    doors see as one `raw` string column. The implicit `_tp_time` column is not listed here.
    """
    columns: tuple[ColumnDef, ...]
    description: str = ""
    mode: str = "append"
    event_time_column: str = ""
    ttl_expression: str = ""
    logstore_retention_bytes: int = -1
    logstore_retention_ms: int = -1

    @staticmethod
    def from_dict(raw: dict) -> StreamSchema:
        return StreamSchema(**{**raw, "columns": tuple(ColumnDef(**c) for c in raw["columns"])})


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """One UpdatePartitionCount: the layout changed from `src_partition_count` ACTIVE partitions
    to `target_partition_count` at `timestamp_ms`. `boundaries[p]` is partition p's next_seq at the
    event, for every partition that existed then or was created by it (0 for a new one): records
    below it were routed by the old layout, records from it on by the new one. That is where a
    parent ends and where a child's new segment starts (see core/routing.segments)."""
    timestamp_ms: int
    src_partition_count: int
    target_partition_count: int
    boundaries: tuple[int, ...]
    auto_scale: bool = False

    @staticmethod
    def from_dict(raw: dict) -> ScaleEvent:
        return ScaleEvent(**{**raw, "boundaries": tuple(raw["boundaries"])})


@dataclass(frozen=True, slots=True)
class Segment:
    """The records of one partition written under one layout: from `start_seq` on (up to the next
    segment's start), after a scale event. `parents` are the partitions (other than this one) of
    the previous layout whose hash ranges overlap this partition's new range, each with the seq
    where it ended (its next_seq at the event), and those inherited through a parent's segment
    that holds no record (core/routing.segments). A key's records keep their order for a reader
    that reads every parent up to its end before reading this segment."""
    start_seq: int
    parents: tuple[tuple[int, int], ...]   # (partition, end seq, exclusive)
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class StreamConfig:
    stream_name: str
    partition_count: int   # ACTIVE (writable) partitions: always 0..partition_count-1
    retention_hours: int = 24
    data_type: str = "BLOB"
    stream_type: str = "COMMON"
    created_ms: int = 0
    stream_id: int = 0  # assigned by the store; never reused, so a recreated name is a new log
    project: str = DEFAULT_PROJECT
    schema: StreamSchema | None = None  # None: a plain log of bytes
    scale_events: tuple[ScaleEvent, ...] = ()   # UpdatePartitionCount history, oldest first
    # (key, value) labels given at creation, kept and reported (DIS's tags and sys_tags); a config
    # stored before they existed has none
    tags: tuple[tuple[str, str], ...] = ()
    sys_tags: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def from_dict(raw: dict) -> StreamConfig:
        """The inverse of dataclasses.asdict, as stores keep configs (JSON)."""
        schema = raw.get("schema")
        events = tuple(ScaleEvent.from_dict(e) for e in raw.get("scale_events", ()))
        return StreamConfig(**{**raw, "schema": StreamSchema.from_dict(schema) if schema else None,
                               "scale_events": events,
                               "tags": tuple((k, v) for k, v in raw.get("tags", ())),
                               "sys_tags": tuple((k, v) for k, v in raw.get("sys_tags", ()))})

    @property
    def readable_partition_count(self) -> int:
        """Partitions that exist: ACTIVE ones plus those a scale-down turned DELETED (readable
        until retention, never written again unless a later scale-up makes them ACTIVE again)."""
        return max([self.partition_count, *(e.src_partition_count for e in self.scale_events)])

    def held_partition_count(self, now_ms: int) -> int:
        """What the stream holds against its project's partition quota: the ACTIVE partitions and
        those closed within the retention window (EXPIRED ones hold nothing; they stay readable as
        empty until the next scale event forgets them)."""
        recent = (e.src_partition_count for e in self.scale_events if now_ms - e.timestamp_ms < self.retention_ms)
        return max(self.partition_count, *recent, 0)

    def is_active(self, partition: int) -> bool:
        return 0 <= partition < self.partition_count

    @property
    def key(self) -> tuple[str, str]:
        """(project, stream_name): what names a stream uniquely."""
        return self.project, self.stream_name

    @property
    def retention_ms(self) -> int:
        return self.retention_hours * 3_600_000


class Record(NamedTuple):
    seq: int
    timestamp_ms: int
    partition_key: str | None
    data: bytes


class RecordBlock(NamedTuple):
    """Consecutive records of one partition as columns: what a scan evaluates whole (a query),
    with no Python object per record. `data[i]` is the payload of record `first_seq + i`; a stored
    batch has one timestamp, so times come as runs of (record count, timestamp_ms)."""
    first_seq: int
    data: list[bytes]
    times: list[tuple[int, int]]
    size: int = -1   # the payloads' bytes, when the store had them at hand (-1: not given)

    @property
    def next_seq(self) -> int:
        return self.first_seq + len(self.data)


class PartitionBounds(NamedTuple):
    first_seq: int   # oldest retained record; == next_seq when the partition is empty
    next_seq: int    # the number the next appended record gets (the high-water mark)
    last_ts: int     # write time of the newest record, 0 if none was ever written

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1


BATCH_HEADER_BYTES = 13   # storage/keys.py's batch value header (">IqB"), which Packed's offsets count from


class Packed(Sequence[tuple[None, bytes]]):
    """Records without partition keys, packed the way the RocksDB and JetStream stores hold a
    batch (storage/keys.py, key mode 0): `offsets`, (n + 1) big-endian u32 positions of each
    payload in the batch value, and `blob`, the payloads back to back. A store appends it with
    one concatenation, and it crosses a process boundary (tsdb workers) as two bytes objects, not
    a Python object per record. As a sequence it is (None, data) items, made on demand."""

    __slots__ = ("n", "offsets", "blob", "biggest")

    def __init__(self, n: int, offsets: bytes, blob: bytes, biggest: int) -> None:
        self.n, self.offsets, self.blob, self.biggest = n, offsets, blob, biggest

    @classmethod
    def of(cls, datas: list[bytes]) -> Packed:
        n = len(datas)
        lengths = list(map(len, datas))   # one pass for both (a tsdb worker packs every point: -25 %)
        return cls(n, struct.pack(f">{n + 1}I", *accumulate(lengths, initial=BATCH_HEADER_BYTES + 4 * (n + 1))),
                   b"".join(datas), max(lengths, default=0))

    def datas(self) -> list[bytes]:
        ends = struct.unpack(f">{self.n + 1}I", self.offsets)
        base, blob = ends[0], self.blob
        return [blob[a - base:b - base] for a, b in pairwise(ends)]

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> tuple[None, bytes]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[None, bytes]]: ...

    def __getitem__(self, i: int | slice) -> tuple[None, bytes] | list[tuple[None, bytes]]:
        items = [(None, d) for d in self.datas()]
        return items[i]

    def __iter__(self) -> Iterator[tuple[None, bytes]]:
        return ((None, d) for d in self.datas())


_data = itemgetter(1)


def records_bytes(records: Sequence[bytes] | Packed) -> int:
    """The payload bytes of records without keys (a list of datas, or Packed)."""
    return len(records.blob) if type(records) is Packed else sum(map(len, records))


def payload_bytes(items: Sequence[tuple[str | None, bytes]]) -> int:
    """The payload bytes of an AppendBatch's items."""
    if type(items) is Packed:
        return len(items.blob)
    return sum(map(len, map(_data, items)))


class AppendBatch(NamedTuple):
    """Records for one partition, appended atomically with consecutive sequence numbers."""
    stream_id: int
    partition: int
    timestamp_ms: int                                    # the store raises it to keep time monotonic
    items: Sequence[tuple[str | None, bytes]]            # (partition_key, data); a Packed for keyless ones


@dataclass(slots=True)
class PutEntry:
    """One record of a PutRecords request, as decoded by a front door.

    `rejected` is set by the door when the record could not even be decoded (bad base64); the
    core then reports it as that record's failure without looking further.
    """
    data: bytes
    partition_key: str | None = None
    explicit_hash_key: str | None = None
    partition_id: str | None = None
    rejected: BrokerError | None = None


@dataclass(slots=True)
class PutColumns:
    """A PutRecords batch as parallel arrays (the gRPC door's columnar form), so the core can route
    a batch without a Python object per record. Each routing list is None (no record uses it) or
    one entry per record, "" meaning not set. Lengths are checked by the core."""
    data: Sequence[bytes]
    partition_keys: Sequence[str] | None = None
    explicit_hash_keys: Sequence[str] | None = None
    partition_ids: Sequence[str] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def entries(self) -> list[PutEntry]:
        """The record-at-a-time form, for batches the fast path does not take."""
        n = len(self.data)
        keys, hashes, pids = (col or [""] * n for col in
                              (self.partition_keys, self.explicit_hash_keys, self.partition_ids))
        return [PutEntry(d, k or None, h or None, p or None)
                for d, k, h, p in zip(self.data, keys, hashes, pids)]


@dataclass(slots=True)
class PutRecordsResult:
    """Per-record outcome, in request order; failures are values, not exceptions."""
    partitions: list[int]                     # -1 for a failed record
    seqs: list[int]                           # -1 for a failed record
    failures: list[tuple[int, BrokerError]] = field(default_factory=list)  # (index, error), ascending

    @property
    def failed_record_count(self) -> int:
        return len(self.failures)


@dataclass(frozen=True, slots=True)
class GetRecordsResult:
    records: list[Record]
    next_cursor: str
    millis_behind_latest: int
    # the time of the stream's latest scale event as of after the read (0: none): a reader that
    # knows the segments of that layout knows every segment boundary among these records
    layout_ms: int = 0


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    hash_lo: int
    hash_hi: int
    bounds: PartitionBounds
    status: str = "ACTIVE"                # ACTIVE, DELETED (by a scale-down; readable), EXPIRED
    segments: tuple[Segment, ...] = ()    # its records after each scale event (routing.segments)

    @property
    def parent_partitions(self) -> tuple[int, ...]:
        """The parents of its newest segment."""
        return tuple(q for q, _ in self.segments[-1].parents) if self.segments else ()


@dataclass(frozen=True, slots=True)
class StreamPage:
    total: int
    streams: list[StreamConfig]
    has_more: bool


@dataclass(frozen=True, slots=True)
class StreamDescription:
    config: StreamConfig
    partitions: list[PartitionInfo]
    has_more_partitions: bool
