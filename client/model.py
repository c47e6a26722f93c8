"""The values the client library returns: its own frozen dataclasses, never protobuf messages, so
callers do not depend on the generated stubs (client/_pb is private and regenerated at will).

Names follow the wire contract (protos/sluice/v1/sluice.proto): `stream_name`, `partition_id`
(an int), `seq` (an int; -1 where a value must say "none"), `timestamp_ms`, `cursor`.
Enumerations are their value names without the enum prefix: data_type "BLOB" | "JSON" | "CSV",
stream_type "COMMON" | "ADVANCED", cursor types "TRIM_HORIZON", "LATEST", source status
"RUNNING" | "STOPPED" | "FAILED".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PutResult:
    """Outcome of one record: where it was stored (`partition_id`, `seq`), or why not: `reason`
    (the broker's catalogue name, e.g. PARTITION_NOT_FOUND; the gRPC status name or "CLOSED"
    when the request itself failed), `message` and the DIS code."""
    partition_id: int
    seq: int
    reason: str = ""
    message: str = ""
    dis_code: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    timestamp_ms: int
    data: bytes
    partition_key: str | None


@dataclass(frozen=True, slots=True)
class RecordsPage:
    """One GetRecords answer, or one Subscribe message: an empty page from Subscribe is a heartbeat."""
    records: list[Record]
    next_cursor: str
    millis_behind_latest: int
    layout_ms: int = 0   # the stream's latest scale event (0: none); newer than known: describe again

    @property
    def heartbeat(self) -> bool:
        return not self.records


@dataclass(frozen=True, slots=True)
class StreamInfo:
    stream_name: str
    partition_count: int
    retention_hours: int
    data_type: str
    stream_type: str
    created_ms: int
    status: str
    stream_id: int
    readable_partition_count: int = 0    # ACTIVE + DELETED partitions; partition_count is ACTIVE only
    scale_events: tuple[ScaleEvent, ...] = ()   # UpdatePartitionCount history, oldest first


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    timestamp_ms: int
    src_partition_count: int
    target_partition_count: int


@dataclass(frozen=True, slots=True)
class Segment:
    """A partition's records from `start_seq` on, after a scale event. The reading rule that keeps
    each key's records in order: read every parent (partition_id, end_seq) up to end_seq
    (exclusive) before reading this segment."""
    start_seq: int
    parents: tuple[tuple[int, int], ...]
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class StreamPage:
    total: int
    streams: list[StreamInfo]
    has_more: bool

    @property
    def stream_names(self) -> list[str]:
        return [s.stream_name for s in self.streams]


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition_id: int
    status: str
    hash_range_start: int
    hash_range_end: int
    first_seq: int      # oldest retained record (== next_seq when empty)
    next_seq: int       # the number the next record will get
    segments: tuple[Segment, ...] = ()   # after each scale event, oldest first (see Segment)


@dataclass(frozen=True, slots=True)
class StreamDescription:
    stream: StreamInfo
    partitions: list[PartitionInfo]
    has_more: bool      # more partitions after this page


@dataclass(frozen=True, slots=True)
class AppInfo:
    app_name: str
    app_id: str
    created_ms: int
    checkpoint_stream_names: list[str]


@dataclass(frozen=True, slots=True)
class AppPage:
    total: int
    apps: list[AppInfo]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    metadata: str


@dataclass(frozen=True, slots=True)
class PartitionConsumerState:
    partition_id: int
    checkpoint_seq: int | None   # None without a committed checkpoint
    first_seq: int               # first retained record
    last_seq: int                # newest record, -1 if none
    lag: int                     # records after the checkpoint


@dataclass(frozen=True, slots=True)
class Assignment:
    """A consumer-group heartbeat's answer: work on exactly these partitions until the next one."""
    partition_ids: list[int]
    lease_ms: int


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """A source of the broker: a background job appending rows to `stream_name`. `properties` is
    the type's properties object as given at create/update; the counters describe the broker's
    current run of the source (they restart from zero with the broker)."""
    source_id: str
    source_name: str
    description: str
    source_type: str         # "stream_generator", "websocket", "nats", "nats_jetstream"
    stream_name: str
    properties: dict[str, Any]
    status: str              # "RUNNING" | "STOPPED" | "FAILED" (then `message` says why; it retries)
    message: str
    started_ms: int          # the last start, ms since epoch; 0 = never
    created_ms: int
    updated_ms: int
    messages_in: int         # messages (or generated events) received
    rows_written: int        # rows durably appended
    error_count: int         # messages skipped and failed attempts
    last_error: str
    last_error_ms: int       # 0 = none
    last_event_ms: int       # when the last row was appended; 0 = none
    lag: int | None          # messages waiting at the origin where the protocol knows (JetStream), else None


@dataclass(frozen=True, slots=True)
class SourceError:
    time_ms: int
    message: str


@dataclass(frozen=True, slots=True)
class SourceThroughput:
    time_ms: int             # the start of a second
    rows: int                # rows written in that second


@dataclass(frozen=True, slots=True)
class SourceStats:
    source: SourceInfo                      # with its counters
    recent_errors: list[SourceError]        # the last 20, oldest first
    throughput: list[SourceThroughput]      # the last 60 seconds that wrote rows, oldest first
