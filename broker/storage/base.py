"""The Store interface: what the core needs from a log store, and nothing more.

Written so a network store (a replicated NATS JetStream cluster, where every call is network I/O)
can implement it honestly:
* Every method is a coroutine. An embedded store moves its blocking calls to threads behind it
  (storage/rocks.py); the core never sees a thread.
* The store assigns sequence numbers: per partition they start at 0, increase by one per record,
  and are never reused - not after a trim, a restart or a crash.
* `append` is atomic **per partition**: each batch is written whole or not at all, and the batches
  of one partition keep their order. Batches for different partitions in one call may succeed and
  fail independently (a store may do better - RocksDB commits a call in one WriteBatch - but the
  core relies on no more). A batch's outcome is its first sequence number, `None` when its
  stream no longer exists, or the `BrokerError` that refused it - certainly not written, unless
  it is an `OutcomeUnknown` (a network store that could not learn whether it was written).
* Record timestamps never decrease within a partition (the store raises a batch's timestamp to
  the partition's last one), so `seq_at_time` can binary-search.
* Durability is described by `capabilities`, not by engine flags: what an acknowledged append
  survives.
* Errors: I/O failures raise `BrokerError` (`STORAGE_FULL` / `UNAVAILABLE`), never a backend
  exception; unknown stream ids raise STREAM_NOT_FOUND (reads) or yield None (appends).
* `meta_cas` is the one coordination primitive: brokers of a shared store (`capabilities.shared`)
  agree through it (the cursor key, consumer-group leases, source leases, tsdb series types).
* `storage_state` says whether writes are being refused (a full disk) - the store recovers by
  itself once it can, and health reports this state. A store that cannot fill up keeps the default.
* A shared store (`capabilities.shared`: several brokers serve it) tells the broker what the others
  changed through `watch(StoreEvents)`: their appends (so long polls and subscriptions wake without
  polling) and their creates, scales and deletes of streams (so the catalogue stays current);
  `find_stream` answers a name the catalogue does not know yet, `fresh_bounds` bounds that include
  every append acknowledged anywhere. A store only one broker writes keeps the defaults (nothing
  to report; its catalogue and bounds are always current).

tests/storage/test_contract.py and test_stateful.py run over every registered store.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Iterable, Protocol, Sequence, runtime_checkable

from broker.errors import BrokerError, ErrorCode, ServerError
from broker.model import AppendBatch, PartitionBounds, Record, RecordBlock, StreamConfig

AppendOutcome = int | None | BrokerError


class IncompatibleStore(Exception):
    """The store holds data this broker must not touch (say, another on-disk format). Raised when
    a store opens; the message says what was found and what to do."""


class OutcomeUnknown(ServerError):
    """An append outcome (UNAVAILABLE, retriable) for a batch the store could not settle: it may
    or may not have been written. The core fails the whole request with it (a retry may store the
    batch twice, like any retry of a timed-out request) instead of reporting its records as
    failed, which would say they were certainly not written."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, detail=detail)


class Durability(enum.Enum):
    """What an acknowledged append survives."""
    NONE = "none"                    # nothing: the store lives in memory
    PROCESS_CRASH = "process_crash"  # a crash of the broker process (SIGKILL): a write-ahead log
    POWER_LOSS = "power_loss"        # the machine losing power: fsynced before the acknowledgement
    REPLICATED = "replicated"        # the loss of a minority of the replicas of a cluster


class StorageState(enum.Enum):
    """Whether the store takes writes (health and metrics report it)."""
    OK = "ok"
    FULL = "full"       # writes refused with STORAGE_FULL until space is freed; reads still work
    FAILED = "failed"   # writes refused with UNAVAILABLE (an I/O error other than a full disk)


@dataclass(frozen=True, slots=True)
class StoreCapabilities:
    durability: Durability
    shared: bool = False   # several brokers may serve the same store at once


class StoreEvents(Protocol):
    """What a shared store reports of other brokers' changes (the Broker implements it). Called on
    the event loop, never per record: a burst of appends to one partition is one `appended`."""

    def appended(self, partitions: Iterable[tuple[int, int]]) -> None:
        """Another broker appended to these (stream_id, partition)s; bounds() shows it already."""

    def stream_changed(self, config: StreamConfig) -> None:
        """Another broker created this stream or changed its layout (a scale event)."""

    def stream_dropped(self, stream_id: int) -> None:
        """Another broker deleted this stream (may come more than once, or for a stream the
        broker no longer knows: a no-op then)."""

    def known_streams(self) -> Iterable[StreamConfig]:
        """The streams the broker knows now: after missed notifications the store reports those
        it no longer has as dropped."""
        return ()


@runtime_checkable
class Store(Protocol):
    capabilities: StoreCapabilities

    @property
    def storage_state(self) -> StorageState:
        """OK, or why writes are refused right now; the store leaves FULL/FAILED by itself when
        writes work again. This default: a store that never refuses them."""
        return StorageState.OK

    def own_servers(self) -> frozenset[str]:
        """Who the servers holding this store's data are (a NATS server id, a NATS cluster name),
        so a source cannot be pointed at them: it would read every project's records and metadata.
        This default: a store on local disk, none."""
        return frozenset()

    async def create_stream(self, config: StreamConfig) -> StreamConfig:
        """Persist a new stream, assigning a fresh `stream_id`. Raises STREAM_EXISTS when the
        project already has a stream of that name."""

    async def update_stream(self, config: StreamConfig, fields: Sequence[str] | None = None) -> StreamConfig:
        """Persist a change of an existing stream (same stream_id, project and name), durably,
        before returning the config now stored: a layout (UpdatePartitionCount's partition_count
        and scale_events) or settings (retention_hours, schema). `fields`: the fields of `config`
        the change sets; the others are kept as stored, so on a shared store a change computed
        from a view behind another broker's does not undo that one (None: every field).
        Partitions up to `readable_partition_count` exist afterwards - new ones empty, numbered
        from 0 - and every record already written is kept. Raises STREAM_NOT_FOUND."""

    async def drop_stream(self, stream_id: int) -> None:
        """Delete the stream and all its records. Raises STREAM_NOT_FOUND."""

    async def list_streams(self) -> list[StreamConfig]:
        """All streams of every project, sorted by (project, stream_name)."""

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        """Write the batches (atomic per partition, see above); one outcome per batch."""

    async def read(self, stream_id: int, partition: int, start_seq: int, limit: int,
                   max_bytes: int) -> list[Record]:
        """Records with seq >= start_seq in order: at most `limit`, and stopping before the
        total payload would exceed `max_bytes` - but always at least one record if any exists."""

    async def read_block(self, stream_id: int, partition: int, start_seq: int, limit: int,
                         max_bytes: int) -> RecordBlock:
        """What read() returns, as columns (for scans that evaluate whole batches). This default
        builds it from read(); a store that can skip the per-record objects overrides it."""
        records = await self.read(stream_id, partition, start_seq, limit, max_bytes)
        return RecordBlock(records[0].seq if records else start_seq, [r.data for r in records],
                           [(1, r.timestamp_ms) for r in records])

    async def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        """First retained, next to assign, and the newest record's timestamp."""

    async def bounds_many(self, partitions: Sequence[tuple[int, int]]) -> list[PartitionBounds | None]:
        """bounds() of many (stream_id, partition) pairs at once, in order: None for a pair whose
        stream the store no longer has (dropped meanwhile); other errors raise as bounds() does.
        For a listing of every stream, so a store should answer it in one round trip (one thread
        hop, one network call), not one per partition. This default asks bounds() for each."""
        out: list[PartitionBounds | None] = []
        for stream_id, partition in partitions:
            try:
                out.append(await self.bounds(stream_id, partition))
            except BrokerError as exc:
                if exc.code is not ErrorCode.STREAM_NOT_FOUND:
                    raise
                out.append(None)
        return out

    async def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        """The first retained seq whose timestamp is >= timestamp_ms, else next_seq."""

    async def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        """Drop records with seq < before_seq (clamped to next_seq). Numbering is unaffected."""

    async def watch(self, events: StoreEvents) -> None:
        """Report other brokers' changes to `events` from now on (a shared store). This default: a
        store nobody else writes has none."""
        return None

    async def find_stream(self, project: str, stream_name: str) -> StreamConfig | None:
        """The stream of that name as stored now (a shared store: another broker may have created
        it a moment ago), or None. This default: None, the catalogue already knows every stream."""
        return None

    async def fresh_bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        """bounds() including every append acknowledged so far by any broker (a shared store asks
        the cluster; bounds() may lag another broker's append by its notification). This default:
        bounds()."""
        return await self.bounds(stream_id, partition)

    async def meta_get(self, key: bytes) -> bytes | None:
        """A small metadata value (apps, checkpoints, the cursor key: the core owns their
        layout), or None."""

    async def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every metadata (key, value) whose key starts with `prefix`, in key order."""

    async def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        """Apply puts (bytes) and deletes (None) atomically."""

    async def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        """Compare-and-set one metadata key: if its value is `expected` (None: the key is absent),
        set it to `new` (None: delete it) and return True; else change nothing and return False.
        Atomic against every other meta_cas and meta_write of the key - on a shared store, those of
        every broker - so it is how brokers agree: create-if-absent (expected None), a lease
        renewed only by its holder, a read-modify-write retried on False. Linearizable: a False
        means the value differed from `expected` at some moment during the call."""

    async def close(self) -> None:
        """Flush and release. Idempotent."""


def changed_fields(stored: StreamConfig, config: StreamConfig, fields: Sequence[str] | None) -> StreamConfig:
    """`stored` with the `fields` of `config` (all of `config` when None): Store.update_stream's rule."""
    return config if fields is None else replace(stored, **{f: getattr(config, f) for f in fields})
