"""Writing checked points (shared/spec/tsdb-put.md sections 2, 3 rules 8-9, and 6): the series'
value types checked in array order, the types of new series stored durably, then every accepted
point appended in one `Broker.append_keyed`, each routed by its series key's hash.

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
"""
from __future__ import annotations

from typing import Sequence

import orjson

from broker.core.routing import key_hash
from broker.errors import BrokerError, ErrorCode
from broker.tsdb.points import Point, type_conflict
from broker.tsdb.series import TsdbStream, record_parts

_SERIES_MEMO = 200_000   # bound of the series key -> (hash, record pieces) memo
# the MD5 is most of a point's routing, and the series' part of its record is the same every time
_memo: dict[str, tuple[int, bytes, bytes]] = {}


def _series_of(point: Point) -> tuple[int, bytes, bytes]:
    known = _memo.get(point.key)
    if known is None:
        if len(_memo) >= _SERIES_MEMO:
            _memo.clear()
        known = _memo[point.key] = (key_hash(point.key), *record_parts(point.metric, point.tags))
    return known


def encode(point: Point) -> tuple[int, bytes]:
    """(the series key's hash, the record: series.record_data's bytes) of a point."""
    h, head, tail = _series_of(point)
    return h, b'%s%d,"value":%s%s' % (head, point.timestamp_ms, orjson.dumps(point.value), tail)


def storage_exception(error: BrokerError | str) -> str:
    """Rule 9's string."""
    return f"Storage exception: {error.message if isinstance(error, BrokerError) else error}"


class PutWrite:
    """The outcome of each point of one put: `errors[i]` its error string (None: none so far) and
    `stored[i]` whether it is durably appended. A point with neither is still pending."""

    def __init__(self, checked: Sequence[Point | str]) -> None:
        self.checked = checked
        self.errors: list[str | None] = [c if isinstance(c, str) else None for c in checked]
        self.stored = [False] * len(checked)
        self.done = False
        self._records: dict[int, tuple[int, bytes]] = {}   # point index -> (hash, record), the writable ones

    @property
    def success(self) -> int:
        return sum(self.stored)

    @property
    def pending(self) -> int:
        return sum(1 for e, s in zip(self.errors, self.stored) if e is None and not s)

    async def run(self, target: TsdbStream) -> None:
        """Check types, fix new ones, append. A stream deleted under us is recreated once (its
        registry starts empty, so the checks run again); the store's failures (UNAVAILABLE,
        STORAGE_FULL) are every accepted point's storage exception; a client error of the whole
        call (the name holds a typed stream) is raised."""
        limit = target.broker.limits.max_record_bytes
        for i, point in enumerate(self.checked):
            if isinstance(point, Point):
                h, data = encode(point)
                if len(data) > limit:   # huge tags: refused before its type is fixed
                    self.errors[i] = storage_exception(f"the point's record is {len(data)} bytes, over the "
                                                       f"record limit of {limit}")
                else:
                    self._records[i] = (h, data)
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
                    for i in self._records:   # nothing went in: a fresh registry checks them again
                        self.errors[i] = None
        finally:
            self.done = True

    def _fail_pending(self, error: BrokerError) -> None:
        text = storage_exception(error)
        for i in self._records:
            if self.errors[i] is None and not self.stored[i]:
                self.errors[i] = text

    async def _attempt(self, target: TsdbStream) -> None:
        config, registry = await target.ensure()
        accepted: list[int] = []
        errors = self.errors
        known = registry.kind_of
        async with registry.lock:
            new: dict[str, str] = {}
            checked = self.checked
            for i in self._records:
                point: Point = checked[i]   # type: ignore[assignment]
                key = point.key
                kind = known(key) or new.get(key)
                if kind is None:
                    new[key] = point.kind
                elif kind != point.kind and (conflict := type_conflict(kind, point.kind)) is not None:
                    errors[i] = conflict
                    continue
                accepted.append(i)
            try:
                await registry.fix(new)
            except BrokerError as exc:   # points of new series cannot go in without their type
                if exc.code is ErrorCode.STREAM_NOT_FOUND:
                    raise
                text = storage_exception(exc)
                kept = []
                for i in accepted:
                    if self.checked[i].key in new:   # type: ignore[union-attr]
                        errors[i] = text
                    else:
                        kept.append(i)
                accepted = kept
        if not accepted:
            return
        records = self._records
        outcomes = await target.broker.append_keyed(
            config.stream_name, [records[i] for i in accepted],
            [checked[i].timestamp_ms for i in accepted],   # type: ignore[union-attr]
            project=config.project, stream_id=config.stream_id)
        for i, outcome in zip(accepted, outcomes):
            if isinstance(outcome, BrokerError):
                errors[i] = storage_exception(outcome)
            else:
                self.stored[i] = True
