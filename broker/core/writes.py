"""The write path: PutRecords - validate, route each record to a partition, append through the
committer, report per-record outcomes. Per-record problems are failures in the result, never an
exception for the whole request."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from operator import itemgetter
from typing import Callable, Iterable, Mapping, Sequence, Sized

from broker.core import routing
from broker.core.catalogue import StreamCatalogue
from broker.core.limits import HASH_KEY_MAX, Limits
from broker.core.notify import WriteNotifier
from broker.core.stats import BrokerStats
from broker.core.throttle import throttle_for
from broker.core.writer import Committer
from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.model import (
    AppendBatch,
    Packed,
    PutColumns,
    PutEntry,
    PutRecordsResult,
    StreamConfig,
    payload_bytes,
    records_bytes,
)
from broker.storage.base import OutcomeUnknown

# (partition per record or -1, per-record failures, partition -> (record indices, (key, data) items))
_Routed = tuple[list[int], list[tuple[int, BrokerError]],
                dict[int, tuple[list[int], list[tuple[str | None, bytes]]]]]
_data = itemgetter(1)


def _keyless(records: Sequence[bytes] | Packed) -> Sequence[tuple[str | None, bytes]]:
    """An AppendBatch's items for records without keys: a Packed as it is."""
    if isinstance(records, Packed):
        return records
    return [(None, data) for data in records]


def _deleted_under(config: StreamConfig, outcomes: Sequence[object]) -> BrokerError:
    """The error of an append the store found the stream gone for (None outcomes). Nothing of it
    written: STREAM_NOT_FOUND, which a broker whose view was behind may try again against the
    stream the name holds now (Broker.put_records). Some partitions written first (a store that
    appends partitions apart, JetStream: another broker deleted the stream in between): those went
    to the deleted stream, and a retry here would store them twice for a reader that saw them
    there - UNAVAILABLE, the client sends the request again."""
    if any(type(first) is int for first in outcomes):
        return server_error(ErrorCode.UNAVAILABLE, detail=f"stream [{config.stream_name}] was deleted while this "
                            "request was written, some of it into the deleted stream; send it again")
    return client_error(ErrorCode.STREAM_NOT_FOUND, stream=config.stream_name)


def _check_columns(columns: PutColumns) -> None:
    n = len(columns.data)
    for name in ("partition_keys", "explicit_hash_keys", "partition_ids"):
        column = getattr(columns, name)
        if column is not None and len(column) != n:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"columns.{name} has {len(column)} entries for "
                               f"{n} records: it must be empty or have one per record")


class WritePath:
    def __init__(self, catalogue: StreamCatalogue, committer: Committer, notifier: WriteNotifier,
                 limits: Limits, clock_ms: Callable[[], int], stats: BrokerStats | None = None) -> None:
        self._catalogue = catalogue
        self._stats = stats if stats is not None else BrokerStats()
        self._committer = committer
        self._notifier = notifier
        self._limits = limits
        self._now = clock_ms
        self._spread = itertools.count()    # rotates where unkeyed records start
        self._routers: dict[int, routing.KeyRouter] = {}   # stream id -> memoised key routing
        self._throttle = throttle_for(limits.partition_records_per_s, limits.partition_bytes_per_s)

    def forget_layout(self, stream_id: int) -> None:
        """The stream's partitions changed: route by the new layout from now on."""
        self._routers.pop(stream_id, None)

    def forget(self, stream_id: int) -> None:
        self._routers.pop(stream_id, None)
        if self._throttle is not None:
            self._throttle.forget(stream_id)

    def check_count(self, project: str, stream_name: object, n: int) -> StreamConfig:
        """The stream, if a batch of `n` records may go to it. Raises STREAM_NOT_FOUND,
        EMPTY_REQUEST, INVALID_REQUEST. A door asks before it decodes its records: a body of millions
        of empty records must be refused for its count, not decoded first."""
        config = self._catalogue.get(project, stream_name)
        if not n:
            raise client_error(ErrorCode.EMPTY_REQUEST, detail="records must not be empty")
        if n > self._limits.max_records_per_put:
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"at most {self._limits.max_records_per_put} records per request, got {n}")
        return config

    async def put_records(self, project: str, stream_name: object, entries: Sequence[PutEntry] | PutColumns,
                          handed: asyncio.Future[None] | None = None) -> PutRecordsResult:
        """Route and append a batch. Raises (whole request): STREAM_NOT_FOUND, EMPTY_REQUEST,
        INVALID_REQUEST, REQUEST_TOO_LARGE, UNAVAILABLE, STORAGE_FULL. Records over their
        partition's write limit fail THROTTLED in the result (see _throttle_put).
        `handed` is set when the batch goes to the committer's queue (with no await in between), so
        a caller that waits for it before the next batch keeps batches in order even when one waits
        out a scale event here. The caller sets it when this raises or returns first."""
        began = time.perf_counter()
        n = len(entries)
        config = self.check_count(project, stream_name, n)
        if self._catalogue.scaling:   # a layout change in progress: route by the new one
            config = await self._catalogue.settled(config)
        lim = self._limits
        if isinstance(entries, PutColumns):
            _check_columns(entries)
            payload = sum(map(len, entries.data))
        else:
            payload = sum(len(e.data) for e in entries)
        if payload > lim.max_put_payload_bytes:
            raise client_error(ErrorCode.REQUEST_TOO_LARGE,
                               detail=f"total record payload exceeds {lim.max_put_payload_bytes} bytes")
        router = self._routers.get(config.stream_id)
        if router is None or router.partition_count != config.partition_count:
            router = self._routers[config.stream_id] = routing.KeyRouter(config.partition_count)
        partitions, failures, by_partition = self._route_batch(config, entries, router)
        # metrics, per reason: the routing failures took a Python step each already; the others
        # are counted per partition below, never per record
        reasons = Counter(e.code.reason for _, e in failures) if failures else Counter()
        cut = self._throttle_put(config.stream_id, by_partition, partitions, failures) \
            if self._throttle is not None else 0
        if cut:
            reasons["THROTTLED"] += cut
        throttled = cut > 0
        seqs = [-1] * n
        if by_partition:
            order = list(by_partition.items())
            if handed is not None and not handed.done():   # the next batch runs after our append is queued
                handed.set_result(None)
            outcomes = await self._committer.append(
                [AppendBatch(config.stream_id, p, self._now(), items) for p, (_, items) in order])
            if any(first is None for first in outcomes):  # deleted while we were queued
                raise _deleted_under(config, outcomes)
            for first in outcomes:   # maybe written, maybe not: the request fails (retriable), no record
                if isinstance(first, OutcomeUnknown):   # is reported as certainly not written
                    raise first
            refused: BrokerError | None = None
            for (p, (indices, items)), first in zip(order, outcomes):
                if isinstance(first, BrokerError):  # the store refused this partition's batch only
                    refused = first
                    reasons[first.code.reason] += len(indices)
                    self._unspend(first, config, p, items, (len(data) for _, data in items))
                    failures.extend((i, first) for i in indices)
                    for i in indices:
                        partitions[i] = -1
                    continue
                for k, i in enumerate(indices):
                    seqs[i] = first + k  # type: ignore[operator]
            if refused is not None and len(failures) == n:   # nothing written: the request failed, say so
                raise refused
            self._notifier.notify((config.stream_id, p) for (p, _), first in zip(order, outcomes)
                                  if not isinstance(first, BrokerError))
            throttled = throttled or refused is not None
        if throttled:
            failures.sort(key=lambda f: f[0])
        self._stats.put_request(config.stream_id, time.perf_counter() - began, reasons)
        return PutRecordsResult(partitions, seqs, failures)

    def _throttle_put(self, stream_id: int, by_partition: dict[int, tuple[list[int], list[tuple[str | None, bytes]]]],
                      partitions: list[int], failures: list[tuple[int, BrokerError]]) -> int:
        """Cut each partition's records to what its write limit admits now: the records past that
        fail THROTTLED - a suffix of the partition's records, never one in the middle, so a
        producer that retries them keeps each key's order. Returns how many were refused."""
        assert self._throttle is not None
        throttle = self._throttle
        cut = 0
        for p, (indices, items) in list(by_partition.items()):
            sizes = list(map(len, map(_data, items)))
            k = throttle.admit(stream_id, p, sizes, sum(sizes))
            if k == len(items):
                continue
            cut += len(items) - k
            error = throttle.error(p)
            for i in indices[k:]:
                failures.append((i, error))
                partitions[i] = -1
            if k:
                by_partition[p] = (indices[:k], items[:k])
            else:
                del by_partition[p]
        return cut

    async def _target(self, project: str, stream_name: object, stream_id: int | None) -> StreamConfig:
        """The stream by name, its layout settled; with `stream_id`, only if the name still holds
        that stream (records made for a stream deleted and recreated under its name since are
        refused)."""
        config = self._catalogue.get(project, stream_name)
        if self._catalogue.scaling:
            config = await self._catalogue.settled(config)
        if stream_id is not None and config.stream_id != stream_id:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=config.stream_name)
        return config

    async def append_rows(self, project: str, stream_name: object, rows: Sequence[bytes],
                          stream_id: int | None = None) -> int:
        """Append unkeyed records (the rows of a typed-stream ingest) as one batch per partition:
        the rows are cut into contiguous runs, one per partition, starting at a rotating
        partition, so a stream's partitions fill evenly and a request's rows keep their order
        within each run. All or nothing per partition; returns how many rows were written.
        Raises STREAM_NOT_FOUND, EMPTY_REQUEST, INVALID_REQUEST (a row over the record size),
        THROTTLED (a run over its partition's write limit), UNAVAILABLE, STORAGE_FULL (nothing of
        the request is acknowledged then). `stream_id`: the
        stream the rows were made for (checked against its schema); a stream recreated under the
        name since then is another stream: STREAM_NOT_FOUND."""
        began = time.perf_counter()
        config = await self._target(project, stream_name, stream_id)
        n = len(rows)
        if not n:
            raise client_error(ErrorCode.EMPTY_REQUEST, detail="no rows")
        biggest = max(map(len, rows))
        if biggest > self._limits.max_record_bytes:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"a row encodes to {biggest} bytes, over the "
                                                                 f"record limit of {self._limits.max_record_bytes}")
        parts = min(config.partition_count, n)
        start = next(self._spread) % config.partition_count
        step, extra = divmod(n, parts)
        now = self._now()
        batches, lo = [], 0
        for k in range(parts):
            hi = lo + step + (k < extra)
            batches.append(AppendBatch(config.stream_id, (start + k) % config.partition_count, now,
                                       [(None, data) for data in rows[lo:hi]]))
            lo = hi
        # All or nothing, like the rest of a typed ingest: the request fails THROTTLED as a whole
        # (nothing written, nothing spent) when one of its runs is over its partition's limit.
        # A partial write would leave the client unable to tell which rows to send again.
        if self._throttle is not None and not self._throttle.admit_all(
                config.stream_id, [(b.partition, len(b.items), payload_bytes(b.items)) for b in batches]):
            self._stats.throttled_request(config.stream_id, n)
            raise client_error(ErrorCode.THROTTLED, detail=f"stream [{config.stream_name}] is over its partitions' "
                               f"write limit; send the rows again later")
        outcomes = await self._committer.append(batches)
        if any(first is None for first in outcomes):  # deleted while we were queued
            raise _deleted_under(config, outcomes)
        written = [b.partition for b, first in zip(batches, outcomes) if not isinstance(first, BrokerError)]
        self._notifier.notify((config.stream_id, p) for p in written)
        for b, first in zip(batches, outcomes):
            if isinstance(first, BrokerError):
                self._unspend(first, config, b.partition, b.items, (len(data) for _, data in b.items))
        for first in outcomes:
            if isinstance(first, BrokerError):
                raise first
        self._stats.put_request(config.stream_id, time.perf_counter() - began)
        return n

    async def append_keyed(self, project: str, stream_name: object, items: Sequence[tuple[int, bytes]],
                           timestamps_ms: Sequence[int] | None = None,
                           stream_id: int | None = None) -> list[int | BrokerError]:
        """Append records routed by a hash the caller computed (`items`: (hash, data), the hash
        within [0, 2^63-1], e.g. routing.key_hash of a key longer than the partition-key limit),
        one AppendBatch per partition, each partition's items in their given order. The records
        carry no partition key. Per item: its seq, or the error that refused it (INVALID_REQUEST
        for a record over the size limit; THROTTLED when its partition's batch is over the write
        limit; the store's STORAGE_FULL/UNAVAILABLE for its partition's batch) - the other items
        are written regardless.

        `timestamps_ms`: one per item (the items' own times, e.g. a point's timestamp). A batch is
        timed now, or later if one of its items is timed later (the largest item time), and the
        store raises that to the partition's last time; so a record stored with a time before T
        holds only items timed before T, and `seq_at_time(T)` is a safe lower bound for "every item
        timed T or later". Items timed in the past are stored at the append time: retention counts
        from when they were written (a backfill is not trimmed at the next pass). Items timed in the
        future are not clamped, since clamping would break that bound: they hold the partition's
        clock, and so its retention, up to their time. None: every batch is timed now.

        Raises (whole call, nothing written): STREAM_NOT_FOUND (also when `stream_id` is given
        and the name now holds another stream, or the stream was deleted while queued),
        INVALID_REQUEST (bad project, a hash out of range, timestamps not one per item),
        EMPTY_REQUEST, UNAVAILABLE (shutting down, or the store append failed as a whole)."""
        began = time.perf_counter()
        config = await self._target(project, stream_name, stream_id)
        n = len(items)
        if not n:
            raise client_error(ErrorCode.EMPTY_REQUEST, detail="no records")
        if timestamps_ms is not None and len(timestamps_ms) != n:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{len(timestamps_ms)} timestamps for {n} records")
        outcomes: list[int | BrokerError] = [0] * n
        reasons: Counter[str] = Counter()   # metrics: per item only where an item took a step of its own
        count, max_record = config.partition_count, self._limits.max_record_bytes
        # partition -> (item indices, records, [the latest item time])
        groups: dict[int, tuple[list[int], list[bytes], list[int]]] = {}
        for i, (h, data) in enumerate(items):
            if not 0 <= h <= HASH_KEY_MAX:
                raise client_error(ErrorCode.INVALID_REQUEST, detail=f"item {i}: hash {h} out of [0, {HASH_KEY_MAX}]")
            if len(data) > max_record:
                outcomes[i] = client_error(ErrorCode.INVALID_REQUEST,
                                           detail=f"record size {len(data)} exceeds {max_record} bytes")
                reasons["INVALID_REQUEST"] += 1
                continue
            p = routing.partition_for_hash(h, count)
            group = groups.get(p)
            if group is None:
                group = groups[p] = ([], [], [0])
            group[0].append(i)
            group[1].append(data)
            if timestamps_ms is not None and timestamps_ms[i] > group[2][0]:
                group[2][0] = timestamps_ms[i]
        if not groups:
            return outcomes
        firsts = await self._append_to(config, {p: (records, ts[0]) for p, (_, records, ts) in groups.items()})
        for p, (indices, _, _) in groups.items():
            first = firsts[p]
            if isinstance(first, BrokerError):   # the store refused this partition's batch only
                reasons[first.code.reason] += len(indices)
                for i in indices:
                    outcomes[i] = first
                continue
            for k, i in enumerate(indices):
                outcomes[i] = first + k
        self._stats.put_request(config.stream_id, time.perf_counter() - began, reasons)
        return outcomes

    def admit(self, config: StreamConfig, sizes: Mapping[int, tuple[int, int]]) -> dict[int, BrokerError]:
        """The write limit's verdict now on records about to be appended with `admitted=True`, per
        partition (their count, their bytes): the partitions over their limit, each with its
        THROTTLED error (the others' records are counted against it as written). For a caller
        with something to do only for what will be written: the OpenTSDB door fixes a new series'
        type only when its points are let in."""
        throttle = self._throttle
        if throttle is None:
            return {}
        return {p: throttle.error(p) for p, (n, size) in sorted(sizes.items())
                if n and not throttle.admit_whole(config.stream_id, p, n, size)}

    def _unspend(self, error: BrokerError, config: StreamConfig, p: int, records: Sized,
                 sizes: Iterable[int]) -> None:
        """A partition's batch the store refused (`error`; nothing of it written: STORAGE_FULL, ...)
        gives back what it took of the write limit; one whose outcome is unknown (maybe written)
        keeps it."""
        if self._throttle is not None and not isinstance(error, OutcomeUnknown):
            self._throttle.refund(config.stream_id, p, len(records), sum(sizes))

    def refund(self, config: StreamConfig, sizes: Mapping[int, tuple[int, int]]) -> None:
        """Give back what `admit` took for records that will not be appended after all (a caller
        that drops some of them), per partition (their count, their bytes)."""
        throttle = self._throttle
        if throttle is None:
            return
        for p, (n, size) in sorted(sizes.items()):
            if n:
                throttle.refund(config.stream_id, p, n, size)

    async def append_partitioned(self, project: str, stream_name: object,
                                 batches: Mapping[int, tuple[Sequence[bytes] | Packed, int]],
                                 stream_id: int | None = None, partition_count: int | None = None,
                                 admitted: bool = False) -> dict[int, int | BrokerError]:
        """Append records the caller routed already (e.g. by routing.partition_for_hash of a key's
        hash, as append_keyed does): `batches` maps a partition to (its records in order, the
        latest of their own times in ms, 0 for none), one AppendBatch each, timed as append_keyed
        says. The records carry no partition key. Per partition: the first seq of its records, or
        the error that refused its batch (THROTTLED: over its write limit; the store's
        STORAGE_FULL/UNAVAILABLE) - the others are written regardless.

        `admitted`: the write limit was asked already (`admit`), not again; refused for a changed
        layout, what that took is given back (the caller routes the records again and is asked anew).

        `partition_count`: the stream's ACTIVE partition count the caller routed by; if a scale
        event changed it since (UpdatePartitionCount), nothing is written: UNAVAILABLE, route again.
        Records routed by the old layout must not land after the event's boundaries.

        Raises (whole call, nothing written): STREAM_NOT_FOUND (as append_keyed), INVALID_REQUEST
        (bad project, a partition out of range, a record over the size limit), EMPTY_REQUEST (no
        records), UNAVAILABLE (shutting down, the store append failed as a whole, the layout
        changed)."""
        began = time.perf_counter()
        config = await self._target(project, stream_name, stream_id)
        if partition_count is not None and partition_count != config.partition_count:
            if admitted:   # routed again, they are admitted again: once is what they cost
                self.refund(config, {p: (len(records), records_bytes(records)) for p, (records, _) in batches.items()})
            raise server_error(ErrorCode.UNAVAILABLE, detail=f"the stream now has {config.partition_count} "
                               f"writable partitions, not {partition_count}: route the records again")
        batches = {p: b for p, b in batches.items() if b[0]}
        if not batches:
            raise client_error(ErrorCode.EMPTY_REQUEST, detail="no records")
        max_record = self._limits.max_record_bytes
        for p, (records, _) in batches.items():
            if not (type(p) is int and 0 <= p < config.partition_count):
                raise client_error(ErrorCode.INVALID_REQUEST,
                                   detail=f"partition {p!r:.40} out of [0, {config.partition_count - 1}]")
            biggest = records.biggest if type(records) is Packed else max(map(len, records))
            if biggest > max_record:
                raise client_error(ErrorCode.INVALID_REQUEST,
                                   detail=f"record size {biggest} exceeds {max_record} bytes")
        out = await self._append_to(config, batches, admitted)
        reasons: Counter[str] = Counter()
        for p, first in out.items():
            if isinstance(first, BrokerError):
                reasons[first.code.reason] += len(batches[p][0])
        self._stats.put_request(config.stream_id, time.perf_counter() - began, reasons)
        return out

    async def _append_to(self, config: StreamConfig, batches: Mapping[int, tuple[Sequence[bytes] | Packed, int]],
                         admitted: bool = False) -> dict[int, int | BrokerError]:
        """One AppendBatch per partition (in partition order) timed now or its records' latest
        time, one committer append, the readers of the written partitions woken."""
        now = self._now()
        order = sorted(batches)
        out: dict[int, int | BrokerError] = {}
        if self._throttle is not None and not admitted:
            # per partition, all or nothing: a partition over its limit fails as a whole (its
            # items each get THROTTLED, e.g. an OpenTSDB point's "Storage exception"), the others go in
            throttle = self._throttle
            for p in order:
                records = batches[p][0]
                if not throttle.admit_whole(config.stream_id, p, len(records), records_bytes(records)):
                    out[p] = throttle.error(p)
            if out:
                order = [p for p in order if p not in out]
                if not order:
                    return out
        firsts = await self._committer.append([
            AppendBatch(config.stream_id, p, max(now, batches[p][1]), _keyless(batches[p][0]))
            for p in order])
        if any(first is None for first in firsts):  # deleted while we were queued
            raise _deleted_under(config, firsts)
        for p, first in zip(order, firsts):
            assert first is not None
            out[p] = first
            if isinstance(first, BrokerError):
                records = batches[p][0]
                self._unspend(first, config, p, records, (records_bytes(records),))
        self._notifier.notify((config.stream_id, p) for p, first in out.items() if not isinstance(first, BrokerError))
        return out

    def _route_batch(self, config: StreamConfig, entries: Sequence[PutEntry] | PutColumns,
                     router: routing.KeyRouter) -> _Routed:
        """Columns take the keyed fast path when they can, else record by record."""
        if isinstance(entries, PutColumns):
            fast = self._route_keyed_columns(entries, router)
            if fast is not None:
                return fast
            entries = entries.entries()
        return self._route_entries(config, entries, router)

    def _route_entries(self, config: StreamConfig, entries: Sequence[PutEntry],
                       router: routing.KeyRouter) -> _Routed:
        lim = self._limits
        n = len(entries)
        partitions = [-1] * n
        failures: list[tuple[int, BrokerError]] = []
        by_partition: dict[int, tuple[list[int], list[tuple[str | None, bytes]]]] = {}
        count = config.partition_count
        spread = next(self._spread) * 7919  # a prime step, so consecutive requests start apart
        max_record, max_key = lim.max_record_bytes, lim.max_partition_key_chars
        for i, entry in enumerate(entries):
            key = entry.partition_key
            # the common case inline (a short key and nothing else): one dict hit per record
            if key and entry.partition_id is None and entry.explicit_hash_key is None \
                    and entry.rejected is None and len(entry.data) <= max_record and len(key) <= max_key:
                p = router(key)
            else:
                error = entry.rejected
                p = -1
                if error is None:
                    p, error = self._route(entry, count, spread + i, router, config.readable_partition_count)
                if error is not None:
                    failures.append((i, error))
                    continue
            partitions[i] = p
            slot = by_partition.get(p)
            if slot is None:
                slot = by_partition[p] = ([], [])
            slot[0].append(i)
            slot[1].append((key or None, entry.data))
        return partitions, failures, by_partition

    def _route_keyed_columns(self, columns: PutColumns, router: routing.KeyRouter) -> _Routed | None:
        """The fast path for the common batch: every record has a partition key and nothing else,
        and all are within limits. Whole-list operations instead of a loop per record: the key
        routes map through the router, a stable sort groups indices by partition. None when the
        batch needs the record-at-a-time path (other routing, or a record that will fail)."""
        lim = self._limits
        keys, data = columns.partition_keys, columns.data
        if keys is None or columns.explicit_hash_keys is not None or columns.partition_ids is not None \
                or not all(keys) or max(map(len, keys)) > lim.max_partition_key_chars \
                or max(map(len, data)) > lim.max_record_bytes:
            return None
        partitions = router.route_all(keys)
        order = sorted(range(len(partitions)), key=partitions.__getitem__)  # stable: ascending per partition
        by_partition: dict[int, tuple[list[int], list[tuple[str | None, bytes]]]] = {}
        at = 0
        for p, size in sorted(Counter(partitions).items()):
            indices = order[at:at + size]
            at += size
            by_partition[p] = (indices, list(zip(map(keys.__getitem__, indices), map(data.__getitem__, indices))))
        return partitions, [], by_partition

    def _route(self, entry: PutEntry, count: int, spread: int, router: routing.KeyRouter,
               readable: int) -> tuple[int, BrokerError | None]:
        lim = self._limits
        if len(entry.data) > lim.max_record_bytes:
            return -1, client_error(ErrorCode.INVALID_REQUEST,
                                    detail=f"record size {len(entry.data)} exceeds {lim.max_record_bytes} bytes")
        key = entry.partition_key
        if key is not None and len(key) > lim.max_partition_key_chars:
            return -1, client_error(ErrorCode.INVALID_REQUEST,
                                    detail=f"partition_key longer than {lim.max_partition_key_chars} characters")
        if entry.partition_id is not None:
            p = routing.parse_partition_id(entry.partition_id, count)
            if p is None:
                return -1, client_error(ErrorCode.INVALID_PARTITION_ID, partition_id=entry.partition_id)
            if p >= count:
                code = ErrorCode.PARTITION_NOT_WRITABLE if p < readable else ErrorCode.PARTITION_NOT_FOUND
                return -1, client_error(code, partition_id=entry.partition_id)
            return p, None
        if entry.explicit_hash_key is not None:
            h = routing.parse_hash_key(entry.explicit_hash_key)
            if h is None:
                return -1, client_error(ErrorCode.INVALID_REQUEST, detail=f"explicit_hash_key must be a decimal "
                                        f"within [0, 9223372036854775807], got {entry.explicit_hash_key!r:.40}")
            return routing.partition_for_hash(h, count), None
        if key:
            return router(key), None
        return spread % count, None
