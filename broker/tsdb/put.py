"""Writing checked points (shared/spec/tsdb-put.md sections 2, 3 rules 8-9, and 6): the series'
value types checked in array order, the types of new series stored durably, then every accepted
point appended in one `Broker.append_partitioned`, each in the partition its series key's hash
routes to (series.SeriesForm.partition: routing.partition_for_hash of routing.key_hash).

Record times (core/writes.py append_keyed): a partition's batch is stored at the write time, or at
its latest point's time when that is later, so `seq_at_time(start)` is a safe lower bound for
every point timed `start` or later (what the query reads from). Consequences, by decision: the
stream's retention counts from when points were written (a backfill of old points is kept like any
record); a point timed in the future (the spec admits up to year 2286) is not clamped, as clamping
would hide it from time-bounded queries: it holds its partition's clock, and so that partition's
retention, up to its time.

A `PutWrite` holds every point's outcome as the write goes: an error string, stored, or still
pending (which is what a `sync_timeout` that runs out counts as `timeouts`). `run()` is meant to
run to its end even when the request that started it is gone (the door shields it): the types a
registry learns and what the store holds must not part ways.

Speed: points.check_batch hands over each valid point already made into its record, with its
series' form (key, route); a write costs per point one dict lookup for its series' type and one
list append into its partition's batch.
"""
from __future__ import annotations

from operator import itemgetter

import orjson

from broker.errors import BrokerError, ErrorCode
from broker.tsdb.points import Checked, Point, type_conflict
from broker.tsdb.series import TYPE_OF, TsdbStream

_record = itemgetter(4)


def encode(point: Point) -> tuple[int, bytes]:
    """(the series key's hash, the record: series.record_data's bytes) of a point."""
    form = point.form
    assert form is not None, "a Point made by check_point carries its series' form"
    return form.hash, form.record(point.timestamp_ms, orjson.dumps(point.value))


def storage_exception(error: BrokerError | str) -> str:
    """Rule 9's string."""
    return f"Storage exception: {error.message if isinstance(error, BrokerError) else error}"


class PutWrite:
    """The outcome of each point of one put: `errors[i]` its error string (None: none so far) and
    `stored[i]` whether it is durably appended. A point with neither is still pending.

    Made from points.check_batch's answer: `errors` (taken over, not copied) and the valid points."""

    def __init__(self, errors: list[str | None], checked: list[Checked]) -> None:
        self.errors = errors
        self.checked = checked
        self.stored = [False] * len(errors)
        self.done = False
        self._writable: list[Checked] = checked   # those within the record size limit

    @property
    def success(self) -> int:
        return sum(self.stored)

    @property
    def pending(self) -> int:
        # a point is stored, failed or pending, never two of them
        return self.errors.count(None) - self.success

    async def run(self, target: TsdbStream) -> None:
        """Check types, fix new ones, append. A stream deleted under us is recreated once (its
        registry starts empty, so the checks run again); the store's failures (UNAVAILABLE,
        STORAGE_FULL) are every accepted point's storage exception; a client error of the whole
        call (the name holds a typed stream) is raised."""
        limit = target.broker.limits.max_record_bytes
        checked = self.checked
        if checked and max(map(len, map(_record, checked))) > limit:   # huge tags: refused before its type is fixed
            self._writable = []
            for c in checked:
                if len(c[4]) > limit:
                    self.errors[c[0]] = storage_exception(f"the point's record is {len(c[4])} bytes, over the "
                                                          f"record limit of {limit}")
                else:
                    self._writable.append(c)
        try:
            for attempt in (1, 2):
                try:
                    await self._attempt(target)
                    return
                except BrokerError as exc:
                    if not exc.is_server_fault and exc.code is not ErrorCode.STREAM_NOT_FOUND:
                        raise   # the request's or the configuration's fault (a typed stream): its error
                    if exc.code is not ErrorCode.STREAM_NOT_FOUND or attempt == 2:
                        self._fail_pending(exc)
                        return
                    for c in self._writable:   # nothing went in: a fresh registry checks them again
                        self.errors[c[0]] = None
        finally:
            self.done = True

    def _fail_pending(self, error: BrokerError) -> None:
        text = storage_exception(error)
        errors, stored = self.errors, self.stored
        for c in self._writable:
            i = c[0]
            if errors[i] is None and not stored[i]:
                errors[i] = text

    async def _attempt(self, target: TsdbStream) -> None:
        config, registry = await target.ensure()
        errors = self.errors
        # one batch per partition: its records in array order, their indices, the latest point time
        count = config.partition_count
        records: list[list[bytes]] = [[] for _ in range(count)]
        indices: list[list[int]] = [[] for _ in range(count)]
        latest = [0] * count
        async with registry.lock:
            kind_of = registry.kinds().get
            new: dict[str, str] = {}
            for i, form, kind, ts, record in self._writable:
                have = kind_of(form.key)
                if have is None:
                    have = new.get(form.key)
                    if have is None:
                        have = new[form.key] = kind
                # long and double mix: the same type is enough
                if have != kind and TYPE_OF[have] != TYPE_OF[kind]:
                    errors[i] = type_conflict(have, kind)
                    continue
                p = form.partition(count)
                records[p].append(record)
                indices[p].append(i)
                if ts > latest[p]:
                    latest[p] = ts
            text = ""
            try:
                lost = await registry.fix(new)
            except BrokerError as exc:   # points of new series cannot go in without their type
                if exc.code is ErrorCode.STREAM_NOT_FOUND:
                    raise
                text, lost = storage_exception(exc), {}
            if text or lost:   # batch again: without the new series' points, or checked against the winners
                records, indices, latest = [[] for _ in range(count)], [[] for _ in range(count)], [0] * count
                for i, form, kind, ts, record in self._writable:
                    if errors[i] is not None:   # its type refused
                        continue
                    if text and form.key in new:
                        errors[i] = text
                        continue
                    won = lost.get(form.key)   # another broker fixed this new series' type first
                    if won is not None and won != kind and TYPE_OF[won] != TYPE_OF[kind]:
                        errors[i] = type_conflict(won, kind)
                        continue
                    p = form.partition(count)
                    records[p].append(record)
                    indices[p].append(i)
                    latest[p] = max(latest[p], ts)
        batches = {p: (records[p], latest[p]) for p in range(count) if records[p]}
        if not batches:
            return
        firsts = await target.broker.append_partitioned(config.stream_name, batches, project=config.project,
                                                        stream_id=config.stream_id, partition_count=count)
        stored = self.stored
        for p, first in firsts.items():
            if isinstance(first, BrokerError):
                text = storage_exception(first)
                for i in indices[p]:
                    errors[i] = text
            else:
                for i in indices[p]:
                    stored[i] = True
