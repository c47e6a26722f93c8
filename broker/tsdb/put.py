"""Writing checked points (shared/spec/tsdb-put.md sections 2, 3 rules 8-9, and 6): the series'
value types checked in array order, the types of new series stored durably, then every accepted
point appended in one `Broker.append_partitioned`, each in the partition its series key's hash
routes to (series.SeriesForm.partition: routing.partition_for_hash of routing.key_hash).

Record times (core/writes.py append_partitioned): a partition's batch is stored at the write time, or at
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
series' form (key, route); `group` then sorts them into their partitions' batches, checking each
against the types the registry already knows (a known type never changes, so this needs no lock),
and leaves only the points of series not known yet for the write, which decides them under the
registry's lock. So the write's own cost is per partition, not per point, and `group` - the
per-point work - can run in a tsdb worker process (broker/tsdb/workers.py, `--tsdb-workers`)
while the broker process keeps the registry, the append and the acknowledgement.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Awaitable, Callable, Mapping, Sequence, cast

import msgspec
import orjson

from broker.errors import BrokerError, ClientError, ErrorCode, client_error
from broker.model import Packed, StreamConfig, records_bytes
from broker.tsdb.points import (
    NAME_CACHE,
    RAW_TAGS_REMEMBERED,
    WIRE,
    WIRE_ERRORS,
    Checked,
    Point,
    Wire,
    check_batch,
    plain_value,
    raw_series_form,
    type_conflict,
)
from broker.tsdb.series import DOUBLE, NUMERIC, TYPE_OF, SeriesForm, TsdbStream


class BadBody(Exception):
    """A body that holds no points to check (section 1), nothing stored: its catalogue row and what
    did not parse. A value (a worker sends it back as such), made the door's error by `error()`."""

    def __init__(self, code: ErrorCode, details: str | None = None) -> None:
        super().__init__(code.template)
        self.code, self.details = code, details

    def error(self) -> ClientError:
        return client_error(self.code) if self.details is None else client_error(self.code, details=self.details)


def parse(body: bytes) -> tuple[list[Any], list[str | None], list[Checked]]:
    """(the points as received, per point its error or None, the valid ones made into records:
    points.check_batch). Raises BadBody."""
    raw = points_of(body)
    written: list[list[bytes]] = []   # the points' texts, found only if a name is a float (rare)

    def texts(i: int) -> bytes:
        if not written:
            written.append(raw_points(body))
        return written[0][i]
    return raw, *check_batch(raw, texts)


def points_of(body: bytes) -> list[Any]:
    """The points of a body as received (one object: a list of it). Raises BadBody."""
    if not body.strip():
        raise BadBody(ErrorCode.PUT_NO_CONTENT)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:   # strict JSON: bare NaN/Infinity are refused here
        raise BadBody(ErrorCode.PUT_BAD_JSON, str(exc)) from None
    if isinstance(parsed, dict):
        raw = [parsed]
    elif isinstance(parsed, list):
        raw = parsed
    else:
        raise BadBody(ErrorCode.PUT_BAD_JSON, "expected an array of data points or one data point object")
    if not raw:
        raise BadBody(ErrorCode.PUT_NO_POINTS)
    return raw


def raw_points(body: bytes) -> list[bytes]:
    """Each point's JSON text exactly as received (a failed point is echoed so: numbers as they were
    written, however deep it nests), for a body points_of took. msgspec finds the elements; past
    its nesting limit (~1000 levels, below orjson's) a scan of the body does."""
    return [bytes(text) for text in point_texts(body)]


def point_texts(body: bytes) -> list[bytes | msgspec.Raw]:
    """raw_points without a copy of each text: where msgspec finds the elements, its Raw views
    into the body (bytes-like: b"".join takes them). A body of millions of small points makes
    millions of objects either way; this makes one per point, not two."""
    text = body.strip()
    if not text.startswith(b"["):
        return [text]
    try:
        return cast(list[bytes | msgspec.Raw], _RAW_POINTS.decode(text))
    except (msgspec.DecodeError, RecursionError):
        return cast(list[bytes | msgspec.Raw], _scanned_elements(text))


_RAW_POINTS = msgspec.json.Decoder(list[msgspec.Raw])
# A string (escapes included) or one structural byte: what _scanned_elements steps over.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)


def _scanned_elements(array: bytes) -> list[bytes]:
    """The top-level elements of a JSON array orjson has accepted, found by its structure."""
    out: list[bytes] = []
    depth, start = 0, 1
    for m in _JSON_TOKEN.finditer(array):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
        elif token in (b"]", b"}"):
            depth -= 1
            if depth == 0:   # the array's own end
                out.append(array[start:m.start()].strip())
        elif token == b"," and depth == 1:
            out.append(array[start:m.start()].strip())
            start = m.end()
    return out


def encode(point: Point) -> tuple[int, bytes]:
    """(the series key's hash, the record: series.record_data's bytes) of a point."""
    form = point.form
    assert form is not None, "a Point made by check_point carries its series' form"
    return form.hash, form.record(point.timestamp_ms, orjson.dumps(point.value))


def storage_exception(error: BrokerError | str) -> str:
    """Rule 9's string."""
    return f"Storage exception: {error.message if isinstance(error, BrokerError) else error}"


# A point whose series' type the grouping did not know: (its index in the request, its series key,
# its kind, its time in ms, its partition, its record). The write decides it under the registry's lock.
Pending = tuple[int, str, str, int, int, bytes]


@dataclass(slots=True)
class Part:
    """One partition's points of a put, in array order: their records, their indices in the
    request, the latest point time."""
    records: list[bytes]
    indices: list[int]
    latest: int


@dataclass(slots=True)
class PackedPart:
    """A Part as a tsdb worker sends it: its records packed, its indices an array."""
    records: Packed
    indices: Sequence[int]
    latest: int


@dataclass(slots=True)
class Grouped:
    """A put's points checked and sorted for one layout of the tsdb stream (`stream_id`,
    `partition_count`): per point its error string or None; the parts of the points of series
    of a known type (type-checked: a conflict is an error already); the points of series not
    known yet (`pending`), in array order."""
    stream_id: int
    partition_count: int
    errors: list[str | None]
    parts: Mapping[int, Part | PackedPart]
    pending: list[Pending]


def group(errors: list[str | None], checked: list[Checked], stream_id: int, partition_count: int,
          known: Mapping[str, str], max_record_bytes: int) -> Grouped:
    """points.check_batch's answer sorted into partitions (see Grouped). `known`: series key ->
    kind, as far as the registry of stream `stream_id` knows (a snapshot or the live map: entries
    are only ever added). Rules 8-9 in the write's order: a record over `max_record_bytes` is a
    storage exception before its type is looked at (a defence: points.py's limits keep a valid
    point's record under ~30 KB); a point of a known series of another type is a type conflict."""
    parts: dict[int, Part] = {}
    pending: list[Pending] = []
    kind_of = known.get
    for i, form, kind, ts, record in checked:
        if len(record) > max_record_bytes:
            errors[i] = storage_exception(f"the point's record is {len(record)} bytes, over the record limit of "
                                          f"{max_record_bytes}")
            continue
        p = form.partition(partition_count)
        have = kind_of(form.key)
        if have is None:
            pending.append((i, form.key, kind, ts, p, record))
            continue
        if have != kind and TYPE_OF[have] != TYPE_OF[kind]:   # long and double mix
            errors[i] = type_conflict(have, kind)
            continue
        _add(parts, p, i, ts, record)
    return Grouped(stream_id, partition_count, errors, parts, pending)


def fast_group(body: bytes, stream_id: int, partition_count: int, known: Mapping[str, str],
               max_record_bytes: int) -> Grouped | None:
    """parse + group in one pass for a body of plain points (what a collector sends); None as soon
    as anything is not plain, and the caller takes the long way (`sort`).

    Why the two agree: msgspec decodes the body against points.Wire, so every point has exactly the
    four fields with these types, after the same JSON rules as orjson (strict numbers, UTF-8,
    surrogates; a duplicated key: the last one, and every value of a typed field is checked). The
    tags are taken raw, so a body whose "tags" keys are not one a point is declined: msgspec would
    not check the value a second "tags" replaces. Each point is then taken only when the long way
    would find no error in it: its series valid (raw_series_form), its timestamp in range, its
    value plain (points.plain_value), its record within the limit and, when its series' type is
    known, of that type; so its record, partition and order are the ones group makes. Anything
    else - an empty array, a string too long, a type conflict - is the long way's to word.

    Speed: the per-point work is a few list comprehensions and C calls over the body's columns
    (series entry, time, value), not a Python loop: a body of numbers of known series (what a
    collector sends, the common case) has its values written by one orjson call and its records
    made by one `%` each; anything else (strings, booleans, series not known yet) takes a loop."""
    try:
        wire = WIRE.decode(body)
    except WIRE_ERRORS:
        return None
    points: list[Wire] = wire if isinstance(wire, list) else [wire]
    # a "tags" key given twice: msgspec skips the first value unchecked (a 1e400 or bad UTF-8 in
    # it that orjson refuses); an escape could spell the key without these bytes (a backslash is
    # found with memchr, ~100 times faster than the two bytes of a \u)
    if not points or b"\\" in body or body.count(b'"tags"') != len(points):
        return None
    layout = _layout_for(known, stream_id, partition_count)
    get = layout.entries.get
    looked_up = [get(p.metric, _NO_SERIES).get(bytes(p.tags)) for p in points]
    found = cast("list[_Entry]", looked_up)
    types = {None} if None in looked_up else set(map(_TYPE, found))
    if None in types:   # a series not seen in this layout, or its type not known yet
        if not layout.complete(looked_up, points):
            return None
        types = set(map(_TYPE, found))
    tss = [p.timestamp for p in points]
    # the seconds' and the milliseconds' ranges meet: 9,999,999,999 s, 10,000,000,000 ms
    lo, hi = min(tss), max(tss)
    if lo < 4_284_768 or hi > 9_999_999_999_999:
        return None
    seconds = hi <= 9_999_999_999   # all in seconds (a collector's usual): records say them in ms with "000"
    if not seconds and lo <= 9_999_999_999:
        tss = [t * 1000 if t <= 9_999_999_999 else t for t in tss]
    values = [p.value for p in points]
    n = len(points)
    value_types = set(map(type, values))
    if value_types <= _NUMBERS and types == _NUMERIC_ONLY:
        if int in value_types:   # within 64 bits (orjson writes up to 2**64 - 1; plain_value refuses past 2**63 - 1)
            ints = [v for v in values if v.__class__ is int]
            if min(ints) < _LONG_MIN or max(ints) > _LONG_MAX:
                return None
        # the JSON of each number as orjson.dumps writes it alone (no number's JSON holds a comma)
        value_jsons = orjson.dumps(values)[1:-1].split(b",")
        records = list(map((_RECORD_S if seconds else _RECORD).__mod__,
                           zip(map(_HEAD, found), tss, value_jsons, map(_TAIL, found))))
        if max(map(len, records)) > max_record_bytes:
            return None
        return Grouped(stream_id, partition_count, [None] * n,
                       _partitioned(list(map(_PARTITION, found)), records, tss, 1000 if seconds else 1), [])
    if seconds:
        tss = [t * 1000 for t in tss]
    # strings, booleans, series of a type not known yet: point by point
    parts: dict[int, Part] = {}
    pending: list[Pending] = []
    dumps = orjson.dumps
    for i, entry in enumerate(found):
        value = values[i]
        typed = (DOUBLE, dumps(value)) if value.__class__ is float else plain_value(value)
        if typed is None:
            return None
        kind, value_json = typed
        ts = tss[i]
        record = _RECORD % (entry[0], ts, value_json, entry[1])
        if len(record) > max_record_bytes:
            return None
        have = entry[3]
        if have is None:
            pending.append((i, entry[4].key, kind, ts, entry[2], record))
        elif have != TYPE_OF[kind]:   # long and double mix
            return None
        else:
            _add(parts, entry[2], i, ts, record)
    return Grouped(stream_id, partition_count, [None] * n, parts, pending)


# fast_group's series, for the layout it last sorted for (_Layout): metric -> the tags object's
# JSON text as received -> (record head, record tail, partition, type or None, SeriesForm); two
# levels, as a tuple key per point costs more to make and hash. The type is the one `known` gave
# (None: not known yet, asked again each time until it is): a known type never changes, so an
# entry holds while the layout does - the same `known` mapping (kept, so its id cannot be
# reused), stream and partition count. Replaced whole, so puts sorted on other threads each keep
# the one they began with.
_Entry = tuple[bytes, bytes, int, "str | None", SeriesForm]
_HEAD, _TAIL, _PARTITION, _TYPE = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)
_NO_SERIES: dict[bytes, _Entry] = {}
_RECORD = b'%s%d,"value":%s%s'   # SeriesForm.record
_RECORD_S = b'%s%d000,"value":%s%s'   # the same with the time given in seconds
_NUMBERS = frozenset((float, int))
_NUMERIC_ONLY = {NUMERIC}
_LONG_MIN, _LONG_MAX = -2**63, 2**63 - 1


class _Layout:
    __slots__ = ("known", "stream_id", "partition_count", "entries", "size")

    def __init__(self, known: Mapping[str, str], stream_id: int, partition_count: int) -> None:
        self.known, self.stream_id, self.partition_count = known, stream_id, partition_count
        self.entries: dict[str, dict[bytes, _Entry]] = {}
        self.size = 0   # entries held, bounded by NAME_CACHE

    def complete(self, found: list[_Entry | None], points: list[Wire]) -> bool:
        """Fills in `found` the entries of series not seen in this layout and the types learned
        since; False when a series is not valid (raw_series_form: the long way words its error)."""
        kind_of = self.known.get
        for i, entry in enumerate(found):
            if entry is not None and entry[3] is not None:
                continue
            p = points[i]
            metric, tags = p.metric, bytes(p.tags)
            form = entry[4] if entry is not None else raw_series_form(metric, tags)
            if form is None:
                return False
            kind = kind_of(form.key)
            if entry is None or kind is not None:
                found[i] = entry = (form.head, form.tail, form.partition(self.partition_count),
                                    None if kind is None else TYPE_OF[kind], form)
                if len(tags) <= RAW_TAGS_REMEMBERED:
                    of_metric = self.entries.setdefault(metric, {})
                    self.size += tags not in of_metric
                    of_metric[tags] = entry
        return True


_layout: _Layout | None = None


def _layout_for(known: Mapping[str, str], stream_id: int, partition_count: int) -> _Layout:
    global _layout
    layout = _layout
    if layout is None or layout.known is not known or layout.stream_id != stream_id \
            or layout.partition_count != partition_count or layout.size >= NAME_CACHE:
        layout = _layout = _Layout(known, stream_id, partition_count)
    return layout


def _partitioned(partitions: list[int], records: list[bytes], tss: list[int], scale: int) -> dict[int, Part]:
    """The points sorted into their partitions' parts, in array order within each, the parts in
    the order of their first point; `tss` the points' times, in ms once times `scale`."""
    n = len(partitions)
    first = partitions[0]
    if partitions.count(first) == n:
        return {first: Part(records, list(range(n)), max(tss) * scale)}
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(partitions):
        indices = groups.get(p)
        if indices is None:
            groups[p] = [i]
        else:
            indices.append(i)
    return {p: Part(list(map(records.__getitem__, indices)), indices, max(map(tss.__getitem__, indices)) * scale)
            for p, indices in groups.items()}


def sort(body: bytes, stream_id: int, partition_count: int, known: Mapping[str, str],
         max_record_bytes: int) -> Grouped:
    """A put's body checked and sorted for a layout: fast_group, else parse + group. Raises BadBody."""
    grouped = fast_group(body, stream_id, partition_count, known, max_record_bytes)
    if grouped is None:
        _, errors, checked = parse(body)
        grouped = group(errors, checked, stream_id, partition_count, known, max_record_bytes)
    return grouped


# Sort a put's points again for a layout: (stream id, partition count, known kinds) -> Grouped (the
# door's sorts a big body off the event loop, as it did the first time).
Regroup = Callable[[int, int, Mapping[str, str]], Awaitable[Grouped]]
# How many times a put tries its append: a stream deleted under it is made again, and a scale event
# that moved the layout the points were routed by has them routed again; nothing went in either way.
ATTEMPTS = 3


class PutWrite:
    """The outcome of each point of one put: `errors[i]` its error string (None: none so far) and
    `stored[i]` whether it is durably appended. A point with neither is still pending.

    Made from a Grouped for the layout the door saw, and `regroup`, which sorts the same points
    for another (the stream was created, scaled, or deleted and created again meanwhile)."""

    def __init__(self, grouped: Grouped, regroup: Regroup) -> None:
        self.grouped = grouped
        self.errors = grouped.errors
        self._regroup = regroup
        self._appended: list[Sequence[int]] = []   # the indices of each part appended
        self.success = 0
        self.done = False

    @property
    def stored(self) -> list[bool]:
        out = [False] * len(self.errors)
        for indices in self._appended:
            for i in indices:
                out[i] = True
        return out

    async def run(self, target: TsdbStream) -> None:
        """Check the pending types, fix new ones, append. A whole append refused because the stream
        was deleted under us (it is made again, with an empty registry: the points are sorted and
        checked again) or because a scale event changed the partition count the points were routed
        by (they are routed again) is tried again, up to ATTEMPTS in all: nothing of it went in.
        Otherwise the store's failures (UNAVAILABLE, STORAGE_FULL) are every accepted point's
        storage exception; a client error of the whole call (the name holds a typed stream) is raised."""
        try:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await self._attempt(target)
                    return
                except BrokerError as exc:
                    if not exc.is_server_fault and exc.code is not ErrorCode.STREAM_NOT_FOUND:
                        raise   # the request's or the configuration's fault (a typed stream): its error
                    gone = exc.code is ErrorCode.STREAM_NOT_FOUND
                    # refused for the layout it was routed by (core: UNAVAILABLE, route again)
                    moved = not _sorted_for(self.grouped, target.config())
                    if not (gone or moved) or attempt == ATTEMPTS:
                        self._fail_pending(exc)
                        return
                    if gone:
                        self.grouped.stream_id = -1   # sorted again for the new stream
        finally:
            self.done = True

    def _fail_pending(self, error: BrokerError) -> None:
        text = storage_exception(error)
        errors = self.errors
        stored = self.stored
        for i, e in enumerate(errors):
            if e is None and not stored[i]:
                errors[i] = text

    async def _attempt(self, target: TsdbStream) -> None:
        config, registry = await target.ensure()
        g = self.grouped
        # sorted for another layout (the stream made, scaled, or deleted and made again since):
        # sorted again, until the layout it was sorted for is still the stream's after the sort
        while not _sorted_for(g, config):
            g = self.grouped = await self._regroup(config.stream_id, config.partition_count, registry.kinds())
            self.errors = g.errors
            config, registry = await target.ensure()
        errors = g.errors
        # the points of series unknown when grouped, in array order: one part each per partition
        extra: dict[int, Part] = {}
        parts: dict[int, Part | PackedPart] = dict(g.parts)
        admitted = False
        if g.pending:
            async with registry.lock:
                kind_of = registry.kinds().get
                new: dict[str, str] = {}
                partition_of: dict[str, int] = {}
                for i, key, kind, ts, p, record in g.pending:
                    have = kind_of(key)
                    if have is None:
                        have = new.get(key)
                        if have is None:
                            have = new[key] = kind
                            partition_of[key] = p
                    if have != kind and TYPE_OF[have] != TYPE_OF[kind]:   # long and double mix
                        errors[i] = type_conflict(have, kind)
                        continue
                    _add(extra, p, i, ts, record)
                # a type is fixed by the first point accepted (spec section 2): the write limit is
                # asked first, and a new series whose partition it refuses gets no type (a series'
                # points are all in one partition)
                refused = target.broker.admit(config, {p: _size(parts.get(p), extra.get(p)) for p in
                                                       parts.keys() | extra.keys()})
                admitted = True
                if refused:
                    texts = {p: storage_exception(error) for p, error in refused.items()}
                    for p, text in texts.items():
                        for part in (parts.pop(p, None), extra.pop(p, None)):
                            for i in part.indices if part is not None else ():
                                errors[i] = text
                    # a point refused for a type that a refused point of this request gave its new
                    # series: that series holds no type, the partition's refusal is its error
                    for i, key, _, _, p, _ in g.pending:
                        if p in texts and key in new:
                            errors[i] = texts[p]
                    new = {k: t for k, t in new.items() if partition_of[k] not in refused}
                text = ""
                try:
                    lost = await registry.fix(new)
                except BrokerError as exc:   # points of new series cannot go in without their type
                    if exc.code is ErrorCode.STREAM_NOT_FOUND:
                        raise
                    text, lost = storage_exception(exc), {}
                if text or lost:   # again: without the new series' points, or checked against the winners
                    taken = {p: _size(part) for p, part in extra.items()}   # what the write limit let in
                    extra = {}
                    for i, key, kind, ts, p, record in g.pending:
                        if errors[i] is not None:   # its type refused
                            continue
                        if text and key in new:
                            errors[i] = text
                            continue
                        won = lost.get(key)   # another broker fixed this new series' type first
                        if won is not None and won != kind and TYPE_OF[won] != TYPE_OF[kind]:
                            errors[i] = type_conflict(won, kind)
                            continue
                        _add(extra, p, i, ts, record)
                    # the points dropped give back what they took (a failed type write: sent again,
                    # they would meet their own charge)
                    target.broker.refund(config, {p: (n - _size(extra.get(p))[0], size - _size(extra.get(p))[1])
                                                  for p, (n, size) in taken.items()})
        for p, more in extra.items():
            part = parts.get(p)
            parts[p] = more if part is None else _merged(part, more)
        if not parts:
            return
        firsts = await target.broker.append_partitioned(
            config.stream_name, {p: (part.records, part.latest) for p, part in parts.items()},
            project=config.project, stream_id=config.stream_id, partition_count=g.partition_count,
            admitted=admitted)
        for p, first in firsts.items():
            indices = parts[p].indices
            if isinstance(first, BrokerError):
                text = storage_exception(first)
                for i in indices:
                    errors[i] = text
            else:
                self._appended.append(indices)
                self.success += len(indices)


def _sorted_for(grouped: Grouped, config: StreamConfig | None) -> bool:
    """Whether `grouped` was sorted for the stream's layout as `config` gives it (None: no stream)."""
    return config is not None and (grouped.stream_id, grouped.partition_count) == (config.stream_id,
                                                                                   config.partition_count)


def _size(*parts: Part | PackedPart | None) -> tuple[int, int]:
    """How many records a partition's parts hold, and their bytes: what the write limit counts."""
    n = size = 0
    for part in parts:
        if part is not None:
            n += len(part.indices)
            size += records_bytes(part.records)
    return n, size


def _merged(part: Part | PackedPart, more: Part) -> Part:
    """Two parts of one partition as one, in array order (a partition's records are stored in the
    order the request gave them, whichever series was known when the points were sorted)."""
    datas = part.records.datas() if isinstance(part.records, Packed) else part.records
    rows = sorted(chain(zip(part.indices, datas), zip(more.indices, more.records)), key=itemgetter(0))
    return Part([r for _, r in rows], [i for i, _ in rows], max(part.latest, more.latest))


def _add(parts: dict[int, Part], p: int, i: int, ts: int, record: bytes) -> None:
    part = parts.get(p)
    if part is None:
        parts[p] = Part([record], [i], ts)
    else:
        part.records.append(record)
        part.indices.append(i)
        if ts > part.latest:
            part.latest = ts
