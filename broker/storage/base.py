"""The Store interface: what the core needs from a log store, and nothing more.

Contract shared by every implementation (tests/storage/test_contract.py runs it over all):
* The store assigns sequence numbers: per partition they start at 0, increase by one per record,
  and are never reused - not after a trim, a restart or a crash.
* `append` is atomic over all its batches: after a crash either all of them are there or none.
  It is called by one writer at a time (the core's group committer); reads may run concurrently.
* Record timestamps never decrease within a partition (the store raises a batch's timestamp to
  the partition's last one), so `seq_at_time` can binary-search.
* Errors: unknown stream ids yield `None` from `append`; I/O failures raise `BrokerError`
  (`STORAGE_FULL` / `UNAVAILABLE`), never a backend exception.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from broker.model import AppendBatch, PartitionBounds, Record, StreamConfig


class Store(Protocol):
    # True when every append is fsynced (milliseconds): the core then never commits on its event loop
    fsync: bool

    def create_stream(self, config: StreamConfig) -> StreamConfig:
        """Persist a new stream, assigning a fresh `stream_id`. Raises STREAM_EXISTS."""

    def drop_stream(self, name: str) -> None:
        """Delete the stream and all its records. Raises STREAM_NOT_FOUND."""

    def list_streams(self) -> list[StreamConfig]:
        """All streams, sorted by name."""

    def append(self, batches: Sequence[AppendBatch]) -> list[int | None]:
        """Write every batch in one atomic commit; return each batch's first sequence number,
        or None for a batch whose stream no longer exists (nothing of it is written)."""

    def read(self, stream_id: int, partition: int, start_seq: int, limit: int, max_bytes: int) -> list[Record]:
        """Records with seq >= start_seq in order: at most `limit`, and stopping before the
        total payload would exceed `max_bytes` - but always at least one record if any exists."""

    def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        """First retained, next to assign, and the newest record's timestamp."""

    def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        """The first retained seq whose timestamp is >= timestamp_ms, else next_seq."""

    def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        """Drop records with seq < before_seq (clamped to next_seq). Numbering is unaffected."""

    def meta_get(self, key: bytes) -> bytes | None:
        """A small metadata value (apps, checkpoints: the core owns their layout), or None."""

    def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every metadata (key, value) whose key starts with `prefix`, in key order."""

    def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        """Apply puts (bytes) and deletes (None) atomically."""

    def close(self) -> None:
        """Flush and release. Idempotent."""
