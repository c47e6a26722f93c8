"""The query side of the OpenTSDB door: `/api/query` (a POST body, or GET `m=` sub-queries turned
into one by `body_from_params`) and `/api/suggest`, answered from the points stored as records
(series.py) by reading only what a query needs.

Reading. A sub-query's candidate series come from the SeriesRegistry (metric, then tag filters);
only the partitions holding them are read (`series_partition`), each from `AT_TIMESTAMP` at the
query's first needed time - the put path stores a batch at the time of its newest point or later
(Broker.append_partitioned), so every record before that position holds points older than the start -
up to the partition's end when the query began (`next_seq`), in blocks of columns (`read_block`,
no object per record). A block is decoded vectorised in Polars: records are picked by their
exact bytes, as `record_data` lays them out (`{"metric":M,"timestamp":T,"value":V,"tags":{sorted
tags}}`, compact JSON from orjson): the metric's prefix selects the metric's records, the tags
text names the series, and the timestamp and value texts are cast. A record of that stream
written another way (another key order, spacing) is not a point of any series (the door's put
path is the only writer of points). The next block is read while one is decoded. Points past
`end` are read too (a partition is ordered by write, not by point time), never points written
after the query began.

Times. `start` (required) and `end` (default: now) are absolute seconds or milliseconds by
magnitude - as /api/put: up to 9999999999 seconds, from 10000000000 to 9999999999999 milliseconds
(below put's lower bound 4284768 still seconds: a query range harms nothing), also as digit strings
and `<10 digits>.<1-3 digits>` (seconds with milliseconds) - or relative `<n><unit>-ago` (ms, s, m,
h, d, w, n = 30 d, y = 365 d; n > 0), `now`, or a date `yyyy/MM/dd[-HH:mm[:ss]]` (a space works
for the dash) in `timezone` (default UTC; OpenTSDB uses the server's zone). `end` may not be before
`start`. `delete` and `useCalendar` are refused rather than ignored; tsuids are not supported.

Semantics, as OpenTSDB 2.x has them unless said otherwise:
* Tags: `tags: {k: v}` with v exact, `*`, `a|b`, a glob `web*`, or `type(expr)` for a filter type
  below; every given tag groups by its key (2.2+: tags are literal_or/wildcard filters with
  groupBy), so `*` and `a|b` give one output per value. `filters: [{type, tagk, filter, groupBy}]`
  with types literal_or, iliteral_or, not_literal_or, not_iliteral_or, wildcard, iwildcard, regexp
  (Rust regex syntax, searched in the value; no backreferences); a series lacking the tag key never
  matches a filter on it; filters on one key are ANDed. `explicitTags`: the series' tag keys must be
  exactly the filtered keys. Unknown tag keys or values just match nothing (OpenTSDB: 400 `No such
  name for 'tagv'`). [ours] A glob's `*` in the middle anchors its ends (OpenTSDB's wildcard
  anchors only a pattern that starts or ends with `*`: its `web*01` takes `xweb-01x`); `tags` and
  `filters` together both apply (OpenTSDB keeps whichever its JSON gives last).
* Unknown metric (a tsdb stream exists but no series of that metric): 400 `No such name for
  'metrics': 'm'`, as OpenTSDB. No tsdb stream yet (config or registry None): [] for any metric.
* What is computed: OpenTSDB's scan, not only the range (`_scan`: whole hours around [start, end],
  the start first aligned down to the downsample interval, the end past its interval). Pipeline per
  series over the scan: downsample -> rate -> aggregation across the series of a group (OpenTSDB's
  order); the answer then keeps the times in [start, end] (its JSON writer's cut). So a series is
  lerped from a bucket just outside the range, and the first rate in range has the point before
  it, as there; every series the scan finds has its output, its dps maybe `{}`. Duplicate
  timestamps in a series: the last written wins.
* Downsample `<n><unit>-<fn>[-<fill>]`, fn sum, avg, min, max, count, first, last, zimsum, mimmin,
  mimmax; bucket = timestamp - timestamp % interval (ms, epoch-aligned), each over its whole
  interval: the bucket holding an unaligned `start` begins before it and is not answered, the one
  holding `end` is answered whole (it may count points after `end`). `0all-<fn>`: one value over
  [start, end), at `start`. Fill (none, nan, null, zero): missing buckets of the scan of a series
  that has data become NaN (the JSON string "NaN", as Jackson writes it), null, or 0; aggregations
  skip NaN/null. A value past the double range (a sum of huge values) is "Infinity" or
  "-Infinity", as Jackson writes it. Calendar intervals (`1dc`) -> 400. Downsampled values are
  doubles. A sum adds its values one after another in series order (the same digits every time).
* rate: per-second change between consecutive points (the first point has none); rateOptions
  counter, counterMax (default 2^63-1), resetValue (0: off), dropResets.
* Aggregators sum, avg, min, max, count, none (and OpenTSDB's zimsum, mimmin, mimmax); others 400.
  Across series, sum/avg/min/max interpolate linearly (lerp) a series that has no point at a
  timestamp another series of the group has - only between the series' own first and last point in
  the scan, and in doubles (OpenTSDB lerps longs with integer division, and its avg of longs
  divides so too: 1 and 2 average 1 there, 1.5 here); after `rate` the series' previous value is
  used instead. zimsum/mimmin/mimmax use no interpolation (actual points only). count is the number
  of series with an actual value at the timestamp (OpenTSDB counts every series between its first
  and last point). With a fill policy every series has every bucket, so nothing is interpolated.
* Output per group: `metric`, `tags` (pairs every series of the group has alike; OpenTSDB also
  keeps a pair some series lack), `aggregateTags` (the other keys of its series, sorted), with
  `showQuery` (GET `show_query`) `query` (the sub-query as given plus its `index`), `dps`
  (keys seconds, or milliseconds with `msResolution`/`ms`; in seconds a second holding several
  points shows the last). Groups come sorted by their tag values; `none`: one per series, sorted
  by series key. A group or series with no point in the scan is absent.
* Values: doubles, except integers where OpenTSDB writes longs: raw points stored as integers
  (aggregator none), sum/min/max/zim* of integer series without downsample, rate or interpolated
  fractions, and count. Integers beyond 2^53 lose precision except with `none`.
* String and boolean series: answered as they are by `none` without downsample or rate; skipped by
  every aggregation, downsample and rate (a metric may hold both kinds; they are not numbers).

Bounds: at most MAX_POINTS points of matching series in the scan, MAX_SCANNED records read and
MAX_CELLS interpolated or filled values per query; past one: 413 (OpenTSDB's own status and words).
Bad input: ClientError INVALID_REQUEST whose detail names the field (`queries[0].downsample: ...`).
"""
from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import functools
import re
import zoneinfo
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import orjson
import polars as pl

from broker.core.broker import Broker
from broker.errors import BrokerError, ClientError, ErrorCode, client_error
from broker.model import RecordBlock, StreamConfig
from broker.tsdb.series import BOOLEAN, NUMERIC, STRING, Series, SeriesRegistry, record_data, series_partition

MAX_SUBQUERIES = 64
MAX_POINTS = 5_000_000        # points of the matching series in the scan, held at once
MAX_SCANNED = 50_000_000      # records read from the partitions
MAX_CELLS = 10_000_000        # interpolated or filled values (series x timestamps)
MAX_SUGGEST = 100_000
DEFAULT_SUGGEST = 25
_BLOCK_RECORDS = 50_000       # a read_block: ~20 ms of decoding; two in flight stay a few tens of MiB
_BLOCK_BYTES = 16 * 1024 * 1024
_MAX_MS = 9_999_999_999_999   # the largest millisecond timestamp /api/put takes
_MAX_INTERVAL_MS = 10 ** 15   # ~31,700 years: keeps bucket arithmetic inside int64
_COUNTER_MAX = 2 ** 63 - 1

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000,
            "n": 30 * 86_400_000, "y": 365 * 86_400_000}
_DIGITS = re.compile(r"[0-9]+")
_DOTTED = re.compile(r"([0-9]{10})\.([0-9]{1,3})")
_AGO = re.compile(r"([0-9]+)(ms|s|m|h|d|w|n|y)-ago", re.IGNORECASE)
_DATE = re.compile(r"([0-9]{4})/([0-9]{2})/([0-9]{2})(?:[- ]([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?)?")
_DOWNSAMPLE = re.compile(r"([0-9]*)(ms|s|m|h|d|w|n|y|all)(c?)-([a-z0-9]+)(?:-([a-z]+))?", re.IGNORECASE)

AGGREGATORS = ("sum", "avg", "min", "max", "count", "none", "zimsum", "mimmin", "mimmax")
DOWNSAMPLERS = ("sum", "avg", "min", "max", "count", "first", "last", "zimsum", "mimmin", "mimmax")
FILLS = ("none", "nan", "null", "zero")
FILTER_TYPES = ("literal_or", "iliteral_or", "not_literal_or", "not_iliteral_or", "wildcard", "iwildcard",
                "regexp")
_INTERPOLATED = ("sum", "avg", "min", "max")
_INTEGRAL = ("sum", "min", "max", "zimsum", "mimmin", "mimmax")


def _bad(where: str, problem: str) -> ClientError:
    return client_error(ErrorCode.INVALID_REQUEST, detail=f"{where}: {problem}")


def _too_much(detail: str) -> ClientError:
    return client_error(ErrorCode.REQUEST_TOO_LARGE, detail=detail)


def _show(value: object) -> str:
    """A value quoted in an error message, cut short."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, int) and not isinstance(value, bool):   # past 64 bits too
        text = str(value) if value.bit_length() < 10_000 else f"an integer of {value.bit_length()} bits"
    else:
        try:
            text = orjson.dumps(value, default=repr).decode()
        except Exception:   # an integer beyond 64 bits, a nesting too deep: say what it was
            text = f"a {type(value).__name__}"
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


# -- the request --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TagFilter:
    tagk: str
    type: str          # one of FILTER_TYPES
    expr: str
    group_by: bool


@dataclass(frozen=True, slots=True)
class Downsample:
    interval_ms: int   # 0: `all`, one bucket over the range
    function: str
    fill: str          # one of FILLS


@dataclass(frozen=True, slots=True)
class RateOptions:
    counter: bool = False
    counter_max: float = float(_COUNTER_MAX)
    reset_value: float = 0.0
    drop_resets: bool = False


@dataclass(frozen=True, slots=True)
class SubQuery:
    index: int
    metric: str
    aggregator: str
    downsample: Downsample | None
    rate: RateOptions | None
    filters: tuple[TagFilter, ...]
    explicit_tags: bool


@dataclass(frozen=True, slots=True)
class Query:
    start_ms: int
    end_ms: int
    ms_resolution: bool
    subs: tuple[SubQuery, ...]
    show_query: bool = False   # each output carries its sub-query as given, with its index


def _time(value: object, where: str, now_ms: int, tz: Callable[[], dt.tzinfo]) -> int:
    """A start or end as milliseconds since the epoch."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _absolute(value, where)
    if not isinstance(value, str) or not value:
        raise _bad(where, f"expected a timestamp, a relative time like 1h-ago or a date, got {_show(value)}")
    if _DIGITS.fullmatch(value):
        digits = value.lstrip("0") or "0"
        return _absolute(int(digits) if len(digits) <= 20 else value, where)
    if m := _DOTTED.fullmatch(value):
        return int(m.group(1)) * 1000 + int(m.group(2).ljust(3, "0"))
    if value.lower() == "now":
        return now_ms
    if m := _AGO.fullmatch(value):
        n = int(m.group(1)) if len(m.group(1)) <= 20 else 10 ** 20
        if n <= 0:
            raise _bad(where, f"zero duration in {_show(value)}")
        return max(now_ms - n * _UNIT_MS[m.group(2).lower()], 0)
    if m := _DATE.fullmatch(value):
        y, mo, d, h, mi, sec = (int(p) if p else 0 for p in m.groups())
        try:
            when = dt.datetime(y, mo, d, h, mi, sec, tzinfo=tz())
        except ValueError:
            raise _bad(where, f"no such date {_show(value)}") from None
        return max(int(when.timestamp() * 1000), 0)
    raise _bad(where, f"expected a timestamp, a relative time like 1h-ago or a date yyyy/MM/dd-HH:mm:ss, "
                      f"got {_show(value)}")


def _absolute(n: int | str, where: str) -> int:
    """Seconds or milliseconds by magnitude -> ms; `n` a string: digits too many to be either."""
    if isinstance(n, str) or n < 0 or n > _MAX_MS:
        raise _bad(where, f"timestamp {_show(n)} out of range (0 to 9999999999 seconds or 10000000000 to "
                          f"9999999999999 milliseconds)")
    return n * 1000 if n <= 9_999_999_999 else n


def _timezone(body: Mapping[str, Any]) -> Callable[[], dt.tzinfo]:
    def resolve() -> dt.tzinfo:
        name = body.get("timezone")
        if name is None or name == "":
            return dt.UTC
        if not isinstance(name, str):
            raise _bad("timezone", f"expected a zone name like Europe/Paris, got {_show(name)}")
        try:
            return zoneinfo.ZoneInfo(name)
        except Exception:   # unknown names, paths, bad keys: all refused alike
            raise _bad("timezone", f"unknown time zone {_show(name)}") from None
    return resolve


_BOOLEAN_TEXTS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}


def _boolean(value: object, where: str) -> bool:
    """A boolean field as OpenTSDB's Jackson reads it: absent or null is false; besides true and
    false, the strings "true" and "false" (as Jackson spells them: lower, capitalised or upper
    case) and an integer (0 is false) are taken."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value in _BOOLEAN_TEXTS:
        return _BOOLEAN_TEXTS[value]
    if isinstance(value, int):
        return value != 0
    raise _bad(where, f"expected true or false, got {_show(value)}")


def _flag(body: Mapping[str, Any], key: str) -> bool:
    return _boolean(body.get(key), key)


def parse_downsample(text: object, where: str) -> Downsample | None:
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise _bad(where, f"expected a string like 1m-avg, got {_show(text)}")
    m = _DOWNSAMPLE.fullmatch(text)
    if not m:
        raise _bad(where, f"expected <interval>-<function>[-<fill>] like 1m-avg or 0all-sum, got {_show(text)}")
    number, unit, calendar, function, fill = m.groups()
    unit, function, fill = unit.lower(), function.lower(), (fill or "none").lower()
    if calendar:
        raise _bad(where, "calendar intervals (like 1dc) are not supported")
    if function not in DOWNSAMPLERS:
        raise _bad(where, f"unknown downsampling function {function!r}; one of {', '.join(DOWNSAMPLERS)}")
    if fill not in FILLS:
        raise _bad(where, f"unknown fill policy {fill!r}; one of {', '.join(FILLS)}")
    if unit == "all":
        return Downsample(0, function, fill)
    if not number or len(number) > 16 or int(number) <= 0:
        raise _bad(where, f"the interval must be a positive number of {unit}, got {_show(text)}")
    interval = int(number) * _UNIT_MS[unit]
    if interval > _MAX_INTERVAL_MS:
        raise _bad(where, f"interval too long in {_show(text)}")
    return Downsample(interval, function, fill)


def _rate_options(raw: object, where: str) -> RateOptions:
    if raw is None:
        return RateOptions()
    if not isinstance(raw, dict):
        raise _bad(where, f"expected an object, got {_show(raw)}")
    counter = _boolean(raw.get("counter"), f"{where}.counter")
    drop = _boolean(raw.get("dropResets"), f"{where}.dropResets")
    numbers = []
    for key, default in (("counterMax", _COUNTER_MAX), ("resetValue", 0)):
        value = raw.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _COUNTER_MAX:
            raise _bad(f"{where}.{key}", f"expected a number from 0 to {_COUNTER_MAX}, got {_show(value)}")
        numbers.append(float(value))
    return RateOptions(counter, numbers[0], numbers[1], drop)


def filter_of_value(tagk: str, value: str, group_by: bool) -> TagFilter:
    """A `tags` value (or a GET `{k=v}`) as OpenTSDB 2.2+ reads it: `type(expr)` for a known filter
    type, a glob when it holds `*` (case-insensitive: OpenTSDB's TagVFilter.getFilter makes it an
    iwildcard), else literal_or (`a|b`, or one exact value). [ours] `x(y)` of an unknown type x is
    a literal value, where OpenTSDB refuses it: our put takes parentheses in tag values."""
    if value.endswith(")") and "(" in value:
        kind = value[:value.index("(")].lower()
        if kind in FILTER_TYPES:
            return TagFilter(tagk, kind, value[value.index("(") + 1:-1], group_by)
    if "*" in value:
        return TagFilter(tagk, "iwildcard", value, group_by)
    return TagFilter(tagk, "literal_or", value, group_by)


def _filters(raw: Mapping[str, Any], where: str) -> list[TagFilter]:
    found: list[TagFilter] = []
    tags = raw.get("tags")
    if tags is not None:
        if not isinstance(tags, dict):
            raise _bad(f"{where}.tags", f"expected an object of tag key to value, got {_show(tags)}")
        for tagk, value in tags.items():
            if not isinstance(value, str) or not value or not tagk:
                raise _bad(f"{where}.tags.{tagk}", f"expected a non-empty string value, got {_show(value)}")
            found.append(filter_of_value(tagk, value, True))
    filters = raw.get("filters")
    if filters is not None:
        if not isinstance(filters, list):
            raise _bad(f"{where}.filters", f"expected a list, got {_show(filters)}")
        for i, f in enumerate(filters):
            at = f"{where}.filters[{i}]"
            if not isinstance(f, dict):
                raise _bad(at, f"expected an object, got {_show(f)}")
            kind, tagk, expr = f.get("type"), f.get("tagk"), f.get("filter")
            if not isinstance(kind, str) or kind.lower() not in FILTER_TYPES:
                raise _bad(f"{at}.type", f"expected one of {', '.join(FILTER_TYPES)}, got {_show(kind)}")
            if not isinstance(tagk, str) or not tagk:
                raise _bad(f"{at}.tagk", f"expected a tag key, got {_show(tagk)}")
            if not isinstance(expr, str):
                raise _bad(f"{at}.filter", f"expected a string, got {_show(expr)}")
            group_by = _boolean(f.get("groupBy"), f"{at}.groupBy")
            found.append(TagFilter(tagk, kind.lower(), expr, group_by))
    return found


def _sub_query(raw: object, index: int) -> SubQuery:
    where = f"queries[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, f"expected an object, got {_show(raw)}")
    metric = raw.get("metric")
    if not isinstance(metric, str) or not metric:
        if raw.get("tsuids"):
            raise _bad(f"{where}.tsuids", "queries by tsuid are not supported; give a metric")
        raise _bad(f"{where}.metric", f"expected a metric name, got {_show(metric)}")
    aggregator = raw.get("aggregator")
    if not isinstance(aggregator, str) or aggregator.lower() not in AGGREGATORS:
        raise _bad(f"{where}.aggregator", f"expected one of {', '.join(AGGREGATORS)}, got {_show(aggregator)}")
    downsample = parse_downsample(raw.get("downsample"), f"{where}.downsample")
    rate = _boolean(raw.get("rate"), f"{where}.rate")
    options = _rate_options(raw.get("rateOptions"), f"{where}.rateOptions") if rate else None
    explicit = _boolean(raw.get("explicitTags"), f"{where}.explicitTags")
    return SubQuery(index, metric, aggregator.lower(), downsample, options, tuple(_filters(raw, where)), explicit)


def parse_body(body: object, now_ms: int) -> Query:
    """A POST /api/query body -> Query. Raises ClientError naming the field."""
    if not isinstance(body, dict):
        raise _bad("body", f"expected a JSON object with start and queries, got {_show(body)}")
    if _boolean(body.get("delete"), "delete"):
        raise _bad("delete", "deleting data through a query is not supported")
    if _boolean(body.get("useCalendar"), "useCalendar"):
        raise _bad("useCalendar", "calendar downsampling is not supported")
    tz = _timezone(body)
    if body.get("start") is None:
        raise _bad("start", "missing: a start time is required")
    start = _time(body["start"], "start", now_ms, tz)
    end = now_ms if body.get("end") in (None, "") else _time(body["end"], "end", now_ms, tz)
    if end < start:
        raise _bad("end", f"the end time ({end} ms) is before the start time ({start} ms)")
    queries = body.get("queries")
    if not isinstance(queries, list) or not queries:
        raise _bad("queries", "missing: a non-empty list of sub-queries is required")
    if len(queries) > MAX_SUBQUERIES:
        raise _bad("queries", f"at most {MAX_SUBQUERIES} sub-queries, got {len(queries)}")
    subs = tuple(_sub_query(q, i) for i, q in enumerate(queries))
    ms = _flag(body, "msResolution") or _flag(body, "ms")
    return Query(start, end, ms, subs, _flag(body, "showQuery"))


# -- GET /api/query and /api/suggest ------------------------------------------------------------

def _all(params: Any, key: str) -> list[str]:
    getall = getattr(params, "getall", None)
    if getall is not None:
        return [str(v) for v in getall(key, [])]
    value = params.get(key) if isinstance(params, Mapping) else None
    if value is None:
        return []
    return [_text(v) for v in value] if isinstance(value, list | tuple) else [_text(value)]


def _text(value: object) -> str:
    """A POSTed parameter as a query string would carry it: a string as it is, another JSON value
    as its JSON (true, not Python's True)."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:   # an integer past 64 bits: no JSON parser of ours makes one
        return str(value)


def _one(params: Any, key: str) -> str | None:
    values = _all(params, key)
    return values[0] if values else None


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside braces."""
    parts, depth, begin = [], 0, 0
    for i, c in enumerate(text):
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(depth - 1, 0)
        elif c == sep and depth == 0:
            parts.append(text[begin:i])
            begin = i + 1
    parts.append(text[begin:])
    return parts


_INLINE_FILTERS = 8          # a sub-query with more tag filters is matched off the event loop,
_INLINE_MATCHES = 20_000     # as is one whose series x filters pass this
_METRIC_TAGS = re.compile(r"([^{}]*)(?:\{([^{}]*)\})?(?:\{([^{}]*)\})?")


def _parse_m(text: str, where: str) -> dict[str, Any]:
    """`agg:[interval-fn[-fill]:][rate[{counter[,max[,reset]]}]:][explicit_tags:]metric[{k=v,...}][{k=v,...}]`:
    the first braces group by their tags, the second filter only. A metric may hold `:` (our
    names allow it): leading parts are options only while they read as one."""
    parts = _split_top(text, ":")
    if len(parts) < 2 or not parts[0]:
        raise _bad(where, f"expected aggregator:[downsample:][rate:]metric{{tags}}, got {_show(text)}")
    query: dict[str, Any] = {"aggregator": parts[0]}
    rest = parts[1:]
    while len(rest) > 1:
        part, low = rest[0], rest[0].lower()
        if low == "rate" or (low.startswith("rate{") and low.endswith("}")):
            query["rate"] = True
            if low != "rate":
                query["rateOptions"] = _m_rate_options(part[5:-1], where)
        elif part[:1].isdigit() and _DOWNSAMPLE.fullmatch(part):
            query["downsample"] = part
        elif low == "explicit_tags":
            query["explicitTags"] = True
        else:
            break
        rest = rest[1:]
    m = _METRIC_TAGS.fullmatch(":".join(rest))
    if not m or not m.group(1):
        raise _bad(where, f"expected a metric with optional {{k=v,...}} tags, got {_show(':'.join(rest))}")
    query["metric"] = m.group(1)
    filters = []
    for body, group_by in ((m.group(2), True), (m.group(3), False)):
        for pair in (body or "").split(","):
            if not pair:
                continue
            tagk, eq, value = pair.partition("=")
            if not eq or not tagk or not value:
                raise _bad(where, f"expected tag=value in the braces, got {_show(pair)}")
            f = filter_of_value(tagk, value, group_by)
            filters.append({"type": f.type, "tagk": f.tagk, "filter": f.expr, "groupBy": f.group_by})
    query["filters"] = filters
    return query


def _m_rate_options(spec: str, where: str) -> dict[str, Any]:
    fields = spec.split(",")
    if len(fields) > 3:
        raise _bad(where, f"rate options are {{counter[,counterMax[,resetValue]]}}, got {_show(spec)}")
    options: dict[str, Any] = {"counter": fields[0] in ("counter", "dropcounter"),
                               "dropResets": fields[0] == "dropcounter"}
    for key, text in zip(("counterMax", "resetValue"), fields[1:]):
        if text:
            if not _DIGITS.fullmatch(text) or len(text) > 19:
                raise _bad(where, f"rate option {key} must be a whole number, got {_show(text)}")
            options[key] = int(text)
    return options


def body_from_params(params: Any) -> dict[str, Any]:
    """GET /api/query parameters -> the POST body run_query takes: `start`, `end`, `tz`, `m`
    (repeatable), and the valueless flags `ms`/`msResolution` and `show_query` (present means
    true). Raises ClientError naming `m` for a sub-query it cannot read; the rest is checked by
    run_query."""
    body: dict[str, Any] = {}
    for key, name in (("start", "start"), ("end", "end"), ("tz", "timezone"), ("timezone", "timezone")):
        value = _one(params, key)
        if value is not None:
            body[name] = value
    if _all(params, "ms") or _all(params, "msResolution"):
        body["msResolution"] = True
    if _all(params, "show_query") or _all(params, "showQuery"):
        body["showQuery"] = True
    ms = _all(params, "m")
    if not ms:
        if _all(params, "tsuid"):
            raise _bad("tsuid", "queries by tsuid are not supported; give m=aggregator:metric")
        raise _bad("m", "missing: at least one m=aggregator:[downsample:][rate:]metric{tags} is required")
    if len(ms) > MAX_SUBQUERIES:
        raise _bad("m", f"at most {MAX_SUBQUERIES} sub-queries, got {len(ms)}")
    body["queries"] = [_parse_m(text, f"m[{i}]") for i, text in enumerate(ms)]
    return body


def suggest(registry: SeriesRegistry | None, params: Any) -> list[str]:
    """GET (or POST) /api/suggest: `type` metrics, tagk or tagv; names starting with `q`, sorted,
    at most `max` (default 25)."""
    kind = _one(params, "type")
    if not kind:
        raise _bad("type", "missing: one of metrics, tagk, tagv")
    if kind not in ("metrics", "tagk", "tagv"):
        raise _bad("type", f"expected one of metrics, tagk, tagv, got {_show(kind)}")
    prefix = _one(params, "q") or ""
    raw_max = _one(params, "max")
    limit = DEFAULT_SUGGEST
    if raw_max is not None and raw_max != "":
        if not _DIGITS.fullmatch(raw_max) or len(raw_max) > 9 or not 1 <= int(raw_max) <= MAX_SUGGEST:
            raise _bad("max", f"expected a whole number from 1 to {MAX_SUGGEST}, got {_show(raw_max)}")
        limit = int(raw_max)
    if registry is None:
        return []
    # sorted: the names starting with `prefix` are the run from where it would be inserted
    names = registry.names(kind)
    out = []
    at = bisect.bisect_left(names, prefix)
    for name in names[at:at + limit]:
        if not name.startswith(prefix):
            break
        out.append(name)
    return out


# -- choosing series ----------------------------------------------------------------------------

def _glob(expr: str, value: str) -> bool:
    """OpenTSDB's wildcard: `*` any run, everything else literal. Linear, no regex."""
    pieces = expr.split("*")
    if len(pieces) == 1:
        return value == expr
    head, *middle, tail = pieces
    if not value.startswith(head) or len(value) < len(head) + len(tail) or not value.endswith(tail):
        return False
    at, stop = len(head), len(value) - len(tail)
    for piece in middle:
        found = value.find(piece, at, stop)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def _matching(series: Sequence[Series], filters: Sequence[TagFilter], explicit: bool, where: str) -> list[Series]:
    keep = [True] * len(series)
    for f in filters:
        values = [s.tags.get(f.tagk) for s in series]
        if f.type == "regexp":
            try:
                hits = pl.Series(values, dtype=pl.String).str.contains(f.expr).to_list()
            except Exception:   # Polars raises ComputeError for a pattern the regex crate refuses
                raise _bad(where, f"invalid regexp {_show(f.expr)} for tag {f.tagk!r}") from None
            ok = [bool(h) for h in hits]
        elif f.type in ("wildcard", "iwildcard") and not f.expr.strip("*"):   # `*`: any value (the usual)
            ok = [v is not None for v in values]
        elif f.type in ("wildcard", "iwildcard"):
            expr = f.expr.lower() if f.type == "iwildcard" else f.expr
            ok = [v is not None and _glob(expr, v.lower() if f.type == "iwildcard" else v) for v in values]
        else:
            fold = f.type in ("iliteral_or", "not_iliteral_or")
            wanted = {w.lower() if fold else w for w in f.expr.split("|")}
            negate = f.type.startswith("not_")
            ok = [v is not None and ((v.lower() if fold else v) in wanted) != negate for v in values]
        keep = [a and b for a, b in zip(keep, ok)]
    chosen = [s for s, k in zip(series, keep) if k]
    if explicit:
        keys = {f.tagk for f in filters}
        chosen = [s for s in chosen if set(s.tags) == keys]
    return chosen


# -- reading ------------------------------------------------------------------------------------

_TS_KEY, _VALUE_KEY, _TAGS_KEY = '"timestamp":', ',"value":', ',"tags":'


def _layout(metric: str, tags: dict[str, str]) -> tuple[bytes, str]:
    """(prefix, tags text) of the records of a series, taken from record_data itself: a record is
    prefix + timestamp + `,"value":` + value + `,"tags":` + tags text + `}`."""
    sample = record_data(metric, 0, 0, tags)
    head, sep, rest = sample.partition(f'{_TS_KEY}0{_VALUE_KEY}0{_TAGS_KEY}'.encode())
    if not sep or not rest.endswith(b"}") or not head.endswith(b","):
        raise RuntimeError(f"the point record layout changed: {sample!r}")   # series.record_data
    return head + _TS_KEY.encode(), rest[:-1].decode()


@dataclass
class _Budget:
    scanned: int = 0   # records read
    points: int = 0    # points of the matching series in the scan


@dataclass
class _Target:
    """What one sub-query reads: its series (index = position) and their bytes."""
    series: list[Series]
    prefix: bytes
    tails: dict[str, int]  # a record's text after `,"tags":` -> its series' index
    lo_ms: int
    hi_ms: int
    keep_text: bool        # non-numeric series are answered: keep the value text
    budget: _Budget = field(default_factory=_Budget)


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _decode(datas: list[bytes], t: _Target) -> pl.DataFrame:
    """The points of the target's series in [lo, hi] among a block's records."""
    try:
        return _decode_utf8(datas, t)
    except pl.exceptions.ComputeError:
        # a record with our prefix that is not UTF-8 (not written by the put path): leave it out
        return _decode_utf8([x for x in datas if x.startswith(t.prefix) and _utf8(x)], t)


def _decode_utf8(datas: list[bytes], t: _Target) -> pl.DataFrame:
    d = pl.col("d")
    frame = pl.DataFrame({"d": pl.Series(datas, dtype=pl.Binary)}).lazy().filter(d.bin.starts_with(t.prefix))
    # prefix + T `,"value":` V `,"tags":` tags `}`: the first `,"value":` ends the timestamp (a metric
    # holds no quote), the first `,"tags":` after it ends the value (a JSON string escapes its quotes)
    frame = frame.select(d.cast(pl.String).str.splitn(_VALUE_KEY, 2).alias("a")).unnest("a")
    frame = frame.select(ts=pl.col("field_0").str.slice(len(t.prefix.decode())).cast(pl.Int64, strict=False),
                         b=pl.col("field_1").str.splitn(_TAGS_KEY, 2)).unnest("b")
    frame = frame.select(sidx=pl.col("field_1").replace_strict(t.tails, default=None, return_dtype=pl.UInt32),
                         ts="ts", vt=pl.col("field_0"))
    frame = frame.filter(pl.col("sidx").is_not_null() & pl.col("ts").is_between(t.lo_ms, t.hi_ms))
    frame = frame.with_columns(v=pl.col("vt").cast(pl.Float64, strict=False),
                               vi=pl.col("vt").cast(pl.Int64, strict=False))
    return frame.select("sidx", "ts", "v", "vi", *(["vt"] if t.keep_text else [])).collect()


def _layout_runs(first_seq: int, n: int, cuts: list[int]) -> list[tuple[int, int, int]]:
    """A block's records (seqs first_seq ..) as runs written under one layout each: (from, to,
    layout number: how many scale events came before them, by the partition's `cuts`)."""
    runs, lo = [], 0
    layout = bisect.bisect_right(cuts, first_seq)
    for cut in cuts[layout:]:
        if cut >= first_seq + n:
            break
        if cut - first_seq > lo:
            runs.append((lo, cut - first_seq, layout))
            lo = cut - first_seq
        layout += 1
    runs.append((lo, n, layout))
    return runs


async def _read_partition(broker: Broker, config: StreamConfig, p: int, t: _Target) -> list[pl.DataFrame]:
    """The target's points in partition p, each frame with the number of the layout its records
    were written under (`layout`): a series written twice at one timestamp is decided by write
    order, and across layouts that is layout order, not the order partitions are read in."""
    project, name = config.project, config.stream_name
    # every append acknowledged anywhere before the query began (a shared store's cached end may
    # lag another broker's by its notification)
    end = (await broker.store.fresh_bounds(config.stream_id, p)).next_seq
    # where each scale event began a new layout in p (0: p was made by it or later)
    cuts = [e.boundaries[p] if p < len(e.boundaries) else 0 for e in config.scale_events]

    async def at_start() -> str:
        try:
            return await broker.get_cursor(name, p, "AT_TIMESTAMP", timestamp_ms=t.lo_ms, project=project)
        except BrokerError as exc:
            if exc.code is not ErrorCode.TIMESTAMP_EXPIRED:
                raise
            return await broker.get_cursor(name, p, "TRIM_HORIZON", project=project)

    def read(cursor: str) -> asyncio.Future[tuple[RecordBlock, str]]:
        return asyncio.ensure_future(broker.reads.read_block(project, cursor, _BLOCK_RECORDS, _BLOCK_BYTES, end))

    frames: list[pl.DataFrame] = []
    fetch = read(await at_start())
    try:
        while True:
            try:
                block, cursor = await fetch
            except BrokerError as exc:
                if exc.code is not ErrorCode.CURSOR_RECORD_EXPIRED:
                    raise
                # trimmed under the scan: what is gone is gone, go on from the oldest kept
                fetch = read(await broker.get_cursor(name, p, "TRIM_HORIZON", project=project))
                continue
            last = not block.data or block.next_seq >= end
            if not last:
                fetch = read(cursor)
            datas = block.data   # read_block stopped at end: nothing written after the query began
            if datas:
                b = t.budget
                b.scanned += len(datas)
                if b.scanned > MAX_SCANNED:
                    raise _too_much(f"Sorry, you have attempted to read more than our limit of {MAX_SCANNED} "
                                    f"records. Please try filtering using more tags or decrease your time range.")
                for lo, hi, layout in _layout_runs(block.first_seq, len(datas), cuts):
                    frame = await asyncio.to_thread(_decode, datas[lo:hi], t)
                    if frame.height:
                        b.points += frame.height
                        if b.points > MAX_POINTS:
                            raise _too_much(f"Sorry, you have attempted to fetch more than our limit of "
                                            f"{MAX_POINTS} data points. Please try filtering using more tags or "
                                            f"decrease your time range.")
                        frames.append(frame.with_columns(layout=pl.lit(layout, pl.UInt32)))
            if last:
                return frames
    finally:
        if not fetch.done():
            fetch.cancel()
        elif not fetch.cancelled():
            fetch.exception()   # retrieved: a read that failed after the scan stopped is not an error


# -- evaluating ---------------------------------------------------------------------------------

def _agg_expr(function: str) -> pl.Expr:
    v = pl.col("v")
    # sums added one after another in the group's order (a cumulative sum's last): Polars' sum
    # adds in blocks whose split varies from run to run, so the same query's answer varied in its
    # last digit
    if function in ("sum", "zimsum"):
        return pl.when(v.count() > 0).then(v.drop_nulls().cum_sum().last())
    if function == "avg":
        return v.drop_nulls().cum_sum().last() / v.count()
    if function in ("min", "mimmin"):
        return v.min()
    if function in ("max", "mimmax"):
        return v.max()
    if function == "count":
        return v.count().cast(pl.Float64)
    if function == "first":
        return v.first()
    return v.last()


_HOUR_S = 3600   # OpenTSDB's row span (Const.MAX_TIMESPAN): it reads whole hours


def _scan(q: Query, ds: Downsample | None) -> tuple[int, int]:
    """The point times [lo, hi] a sub-query reads and computes over, as OpenTSDB's scan bounds
    (TsdbQuery.getScanStartTimeSeconds / getScanEndTimeSeconds): from the start aligned down to
    its downsample interval, then to its hour, up to before the hour after the end (with a
    downsample: after the end's next interval boundary; an end in milliseconds first gains a
    second, as there). Every bucket, rate and interpolation is computed over that; the answer
    keeps the times in [start, end] (HttpJsonSerializer). `0all`: [start, end) only."""
    if ds is not None and ds.interval_ms == 0:
        return q.start_ms, q.end_ms - 1
    start_s = q.start_ms // 1000
    if ds is not None:
        start_s -= (1000 * start_s) % ds.interval_ms // 1000
    lo_s = max(start_s - start_s % _HOUR_S, 0)
    end_s = q.end_ms // 1000 + 1
    if ds is not None:
        end_s += (ds.interval_ms - (1000 * end_s) % ds.interval_ms) // 1000
        hi_s = end_s if end_s % _HOUR_S == 0 else end_s + _HOUR_S - end_s % _HOUR_S
    else:
        hi_s = end_s + _HOUR_S - end_s % _HOUR_S
    return lo_s * 1000, hi_s * 1000 - 1


def _downsample(df: pl.DataFrame, q: Query, ds: Downsample) -> pl.DataFrame:
    ts = pl.col("ts")
    bucket = pl.lit(q.start_ms, pl.Int64) if ds.interval_ms == 0 else ts - ts % ds.interval_ms
    out = (df.with_columns(ts=bucket).group_by("sidx", "ts", maintain_order=True)
           .agg(v=_agg_expr(ds.function).cast(pl.Float64)).with_columns(vi=pl.lit(None, pl.Int64)))
    if ds.fill == "none" or ds.interval_ms == 0 or out.is_empty():
        return out
    lo, hi = _scan(q, ds)
    first = lo - lo % ds.interval_ms
    buckets = range(first, hi + 1, ds.interval_ms)
    present = out.select("sidx").unique()
    if len(buckets) * present.height > MAX_CELLS:
        raise _too_much(f"Sorry, filling {len(buckets)} intervals for {present.height} series is more than our "
                        f"limit of {MAX_CELLS} values. Please use a longer interval or decrease your time range.")
    grid = present.join(pl.DataFrame({"ts": pl.int_range(first, hi + 1, ds.interval_ms, dtype=pl.Int64,
                                                         eager=True)}), how="cross")
    out = grid.join(out, on=["sidx", "ts"], how="left").sort("sidx", "ts")
    if ds.fill == "zero":
        out = out.with_columns(pl.col("v").fill_null(0.0))
    return out


def _rate(df: pl.DataFrame, options: RateOptions) -> pl.DataFrame:
    v, ts = pl.col("v"), pl.col("ts")
    prev_v, prev_ts = v.shift(1).over("sidx"), ts.shift(1).over("sidx")
    diff = v - prev_v
    df = df.with_columns(_pv=prev_v, _pt=prev_ts, _d=diff).filter(pl.col("_pt").is_not_null())
    secs = (ts - pl.col("_pt")).cast(pl.Float64) / 1000.0
    if options.counter:
        wrapped = pl.col("_d") < 0
        if options.drop_resets:
            df = df.filter(~wrapped.fill_null(False))
        else:
            wrap_rate = (options.counter_max - pl.col("_pv") + v) / secs
            if options.reset_value > 0:
                wrap_rate = pl.when(wrap_rate > options.reset_value).then(0.0).otherwise(wrap_rate)
            return df.with_columns(v=pl.when(wrapped).then(wrap_rate).otherwise(pl.col("_d") / secs),
                                   vi=pl.lit(None, pl.Int64)).drop("_pv", "_pt", "_d")
    return df.with_columns(v=pl.col("_d") / secs, vi=pl.lit(None, pl.Int64)).drop("_pv", "_pt", "_d")


def _interpolate(df: pl.DataFrame, step: bool) -> pl.DataFrame:
    """Every series of a group at every timestamp of the group between its own first and last
    point: its value there, else the lerp of its neighbours (`step`: the previous value)."""
    times = (df.select("g", "ts").unique().sort("g", "ts")
             .with_columns(r=pl.int_range(pl.len(), dtype=pl.Int64).over("g")))
    spans = (df.group_by("g", "sidx").agg(lo=pl.col("ts").min(), hi=pl.col("ts").max())
             .join(times.rename({"ts": "lo", "r": "rlo"}), on=["g", "lo"])
             .join(times.rename({"ts": "hi", "r": "rhi"}), on=["g", "hi"]))
    cells = int(spans.select((pl.col("rhi") - pl.col("rlo") + 1).sum()).item())
    if cells == df.height:
        return df   # every series has a point at every timestamp of its span
    if cells > MAX_CELLS:
        raise _too_much(f"Sorry, aligning these series takes {cells} interpolated values, more than our limit of "
                        f"{MAX_CELLS}. Please downsample or decrease your time range.")
    grid = (spans.select("g", "sidx", r=pl.int_ranges("rlo", pl.col("rhi") + 1)).explode("r")
            .join(times, on=["g", "r"]).select("g", "sidx", "ts").sort("ts", "sidx"))   # ties by series:
    # a group's values are then summed in one order every time (Polars' sort is not stable, and
    # a float sum in another order can differ in its last digit)
    points = df.select("g", "sidx", "ts", x0="ts", y0="v").sort("ts")
    out = grid.join_asof(points, on="ts", by=["g", "sidx"], strategy="backward",
                         check_sortedness=False)
    if step:
        return out.select("g", "sidx", "ts", v="y0")
    out = out.join_asof(points.rename({"x0": "x1", "y0": "y1"}), on="ts", by=["g", "sidx"], strategy="forward",
                        check_sortedness=False)   # both sorted on ts above
    x, x0, x1, y0, y1 = (pl.col(c) for c in ("ts", "x0", "x1", "y0", "y1"))
    lerp = y0 + (x - x0).cast(pl.Float64) * (y1 - y0) / (x1 - x0).cast(pl.Float64)
    return out.select("g", "sidx", "ts", v=pl.when(x == x0).then(y0).otherwise(lerp))


def _pick(floats: list[Any], ints: list[Any], integral: bool, mix: bool, fill: str) -> list[Any]:
    """The dps values of one output, as JSON wants them: its integers when `integral` (each point's
    own kind with `mix`: a series holding longs and doubles), else doubles, missing ones by `fill`."""
    if integral:
        if None not in ints:
            return ints
        if mix and any(i is not None for i in ints):
            return [i if i is not None else f for i, f in zip(ints, floats)]
    if fill == "nan" and None in floats:
        return ["NaN" if x is None else x for x in floats]
    return floats


# as Jackson writes them (OpenTSDB's JSON), not null: a sum past the double range is Infinity,
# which a fill's null must not be mistaken for
_NON_FINITE = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}


class _Rendered:
    """A frame sorted by an output id, as the Python lists every output's dps are sliced from:
    a list per column for the whole frame, not a frame per output (10,000 groups stay cheap)."""

    def __init__(self, frame: pl.DataFrame, by: str, ms: bool, text: bool) -> None:
        ts = pl.col("ts")
        self.keys = frame.select((ts if ms else ts // 1000).cast(pl.String)).to_series().to_list()
        v = frame.get_column("v")
        self.floats = v.to_list()
        if v.is_infinite().any() or v.is_nan().any():   # an aggregate past the double range (rare)
            self.floats = [_NON_FINITE.get(repr(x), x) if isinstance(x, float) else x for x in self.floats]
        self.ints = frame.get_column("vi").to_list()
        self.texts = frame.get_column("vt").to_list() if text else []
        self.spans: list[tuple[int, int, int]] = []
        at = 0
        for key, n in frame.group_by(by, maintain_order=True).len().iter_rows():
            self.spans.append((int(key), at, at + n))
            at += n

    def dps(self, a: int, b: int, values: list[Any]) -> dict[str, Any]:
        return dict(zip(self.keys[a:b], values))

    def text_dps(self, a: int, b: int, series: Series) -> dict[str, Any]:
        """A string or boolean series' points, each value as stored (every one of its type:
        _evaluate kept no other)."""
        return {k: _text_value(series.type, t) for k, t in zip(self.keys[a:b], self.texts[a:b])}


def _text_value(kind: str, text: str) -> str | bool | None:
    """The value a string or boolean series' record holds, None when it is not of that type: a
    record another door wrote into the stream (not JSON, a number in a string series) is not one
    of its points, as a numeric series skips a value that is not a number."""
    if kind == BOOLEAN:
        return text == "true" if text in ("true", "false") else None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if type(value) is str else None


def _evaluate(sub: SubQuery, q: Query, t: _Target, frames: list[pl.DataFrame]) -> list[dict[str, Any]]:
    """Points read -> the sub-query's outputs (a pure function of its inputs; runs off the loop)."""
    if not frames:
        return []
    df = pl.concat(frames, how="vertical_relaxed")
    if df.get_column("sidx").n_unique() > 1 or not df.get_column("ts").is_sorted() \
            or not df.get_column("layout").is_sorted():
        # one series written in time order under one layout needs none
        df = df.sort("sidx", "ts", "layout", maintain_order=True)
    # a timestamp written twice in a series: the last write wins (sorted by layout, then the read
    # order, which within a partition and a layout is the write order)
    same = (pl.col("sidx") == pl.col("sidx").shift(-1)) & (pl.col("ts") == pl.col("ts").shift(-1))
    df = df.filter(~same.fill_null(False))
    ds = sub.downsample
    fill = ds.fill if ds else "none"
    raw = ds is None and sub.rate is None
    if not t.keep_text:
        df = df.filter(pl.col("v").is_not_null())
    else:   # a point holds a value of its series' type: a text series' row is read one by one
        texts = [i for i, s in enumerate(t.series) if s.type != NUMERIC]
        is_text = pl.col("sidx").is_in(texts)
        df = df.with_row_index("_r")
        good = [r for r, i, vt in df.filter(is_text).select("_r", "sidx", "vt").iter_rows()
                if _text_value(t.series[i].type, vt) is not None]
        df = df.filter((pl.col("v").is_not_null() & ~is_text) | pl.col("_r").is_in(good)).drop("_r")
    # every series with a point in the scan has its output, its dps maybe empty (OpenTSDB writes
    # each group its scan found, whatever its range keeps)
    present = df.get_column("sidx").unique().sort().to_list()
    if not present:
        return []
    if ds is not None:
        df = _downsample(df, q, ds)
    if sub.rate is not None:
        df = _rate(df, sub.rate)
    in_range = pl.col("ts").is_between(q.start_ms, q.end_ms)
    series = t.series
    outputs: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    if sub.aggregator == "none":
        r = _Rendered(df.filter(in_range), "sidx", q.ms_resolution, t.keep_text)
        spans = {sidx: (a, b) for sidx, a, b in r.spans}
        for sidx in present:
            s = series[sidx]
            a, b = spans.get(sidx, (0, 0))
            if s.type == NUMERIC or not raw:
                dps = r.dps(a, b, _pick(r.floats[a:b], r.ints[a:b], raw, True, fill))
            else:
                dps = r.text_dps(a, b, s)
            outputs.append(((s.key,), {"metric": sub.metric, "tags": dict(sorted(s.tags.items())),
                                       "aggregateTags": [], "dps": dps}))
        return [o for _, o in sorted(outputs, key=lambda kv: kv[0])]
    keys = sorted({f.tagk for f in sub.filters if f.group_by})
    group_of: dict[tuple[str, ...], int] = {}
    gids = [group_of.setdefault(tuple(s.tags.get(k, "") for k in keys), len(group_of)) for s in series]
    df = df.with_columns(g=pl.col("sidx").replace_strict(list(range(len(series))), gids, return_dtype=pl.UInt32))
    members = df.select("g", "sidx").unique()
    single = members.height == members.select("g").n_unique()
    all_int = dict(df.group_by("g").agg(pl.col("vi").is_not_null().all()).iter_rows())
    agg, v = sub.aggregator, pl.col("v")
    if single:   # one series per group: nothing to align, its values are the group's
        out = df.select("g", "ts", v=v.is_not_null().cast(pl.Float64) if agg == "count" else v)
    elif agg == "count":
        out = df.group_by("g", "ts").agg(v=v.count().cast(pl.Float64))
    else:
        if agg in _INTERPOLATED:
            df = _interpolate(df, step=sub.rate is not None)
        out = df.group_by("g", "ts").agg(v=_agg_expr(agg))
    ints = agg == "count" or (raw and agg in _INTEGRAL)
    out = out.with_columns(vi=pl.when(v == v.floor()).then(v.cast(pl.Int64, strict=False)) if ints
                           else pl.lit(None, pl.Int64))
    group_keys = {gid: key for key, gid in group_of.items()}
    tags_of: dict[int, list[Series]] = {}
    for sidx in present:   # a group's tags: of every series its scan found (OpenTSDB's spans)
        tags_of.setdefault(gids[sidx], []).append(series[sidx])
    r = _Rendered(out.filter(in_range).sort("g", "ts"), "g", q.ms_resolution, False)
    spans = {gid: (a, b) for gid, a, b in r.spans}
    for gid in tags_of:
        a, b = spans.get(gid, (0, 0))
        group = tags_of[gid]
        common = dict(group[0].tags)
        for s in group[1:]:
            common = {k: v for k, v in common.items() if s.tags.get(k) == v}
        aggregated = sorted({k for s in group for k in s.tags} - set(common))
        integral = agg == "count" or (ints and all_int.get(gid, False))
        values = _pick(r.floats[a:b], r.ints[a:b], integral, False, fill)
        outputs.append((group_keys[gid], {"metric": sub.metric, "tags": dict(sorted(common.items())),
                                          "aggregateTags": aggregated, "dps": r.dps(a, b, values)}))
    return [o for _, o in sorted(outputs, key=lambda kv: kv[0])]


async def _run_sub(broker: Broker, registry: SeriesRegistry, config: StreamConfig, q: Query, sub: SubQuery,
                   budget: _Budget) -> list[dict[str, Any]]:
    where = f"queries[{sub.index}]"
    await registry.catch_up(sub.metric)   # a shared store: what other brokers' puts made
    await registry.indexed()
    known = registry.series_of(sub.metric)
    if not known:
        raise client_error(ErrorCode.UNKNOWN_METRIC, metric=sub.metric)
    keep_text = sub.aggregator == "none" and sub.downsample is None and sub.rate is None
    matching = functools.partial(_matching, known, sub.filters, sub.explicit_tags, f"{where}.filters")
    # many filters (a regexp is compiled per filter, ~0.1 ms) or many series: off the event loop; a
    # body of 64 sub-queries of 100 regexps matching nothing held it ~0.8 s with no await between
    heavy = len(sub.filters) > _INLINE_FILTERS or len(known) * max(len(sub.filters), 1) > _INLINE_MATCHES
    chosen = [s for s in (await asyncio.to_thread(matching) if heavy else matching())
              if keep_text or s.type == NUMERIC]
    if not chosen:
        return []
    window = _scan(q, sub.downsample)
    chosen.sort(key=lambda s: s.key)
    prefix = _layout(sub.metric, chosen[0].tags)[0]
    tails = {_layout(sub.metric, s.tags)[1] + "}": i for i, s in enumerate(chosen)}
    t = _Target(chosen, prefix, tails, window[0], window[1], keep_text and any(s.type in (STRING, BOOLEAN)
                                                                                 for s in chosen), budget)
    frames: list[pl.DataFrame] = []
    # a series' points sit in its partition under every layout the stream had (UpdatePartitionCount)
    counts = {config.partition_count, *(n for e in config.scale_events
                                        for n in (e.src_partition_count, e.target_partition_count))}
    for p in sorted({series_partition(s.key, n) for s in chosen for n in counts}):
        frames += await _read_partition(broker, config, p, t)
    return await asyncio.to_thread(_evaluate, sub, q, t, frames)


async def run_query(broker: Broker, registry: SeriesRegistry | None, config: StreamConfig | None,
                    body: Any, now_ms: int) -> list[dict[str, Any]]:
    """POST /api/query: the outputs of every sub-query, in order. Raises ClientError:
    INVALID_REQUEST (naming the field) for bad input or an unknown metric, REQUEST_TOO_LARGE past
    the bounds; what the read path raises (STREAM_NOT_FOUND when the stream goes away)."""
    q = parse_body(body, now_ms)
    if registry is None or config is None:
        return []
    budget = _Budget()
    out: list[dict[str, Any]] = []
    for sub in q.subs:
        outputs = await _run_sub(broker, registry, config, q, sub, budget)
        if q.show_query:   # OpenTSDB's showQuery: how a client maps outputs to its sub-queries
            shown = {**body["queries"][sub.index], "index": sub.index}
            for o in outputs:
                o["query"] = shown
        out += outputs
    return out
