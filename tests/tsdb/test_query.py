"""The OpenTSDB query engine (broker/tsdb/query.py) in-process over a real RocksStore: points are
written as the put path writes them (series.record_data through Broker.append_keyed, routed by the
series key's hash) into a schemaless stream of 8 partitions, then queried.

Expected values are computed here from the points written (a small independent lerp/bucket
model), not read back from the engine. Reading is checked too: only the partitions of the matching
series are read, from the query's time position.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from broker.core.broker import Broker
from broker.core.routing import key_hash
from broker.errors import ClientError, ErrorCode
from broker.model import PutEntry, RecordBlock, StreamConfig
from broker.storage.rocks import RocksStore
from broker.tsdb import query
from broker.tsdb.series import (
    BOOLEAN,
    INDEX_CHUNK,
    NUMERIC,
    STRING,
    SeriesRegistry,
    record_data,
    series_key,
    series_partition,
)
from tests.loop_turns import loop_turns

STREAM = "tsdb"
BASE = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000   # ms, on an hour
S = BASE // 1000                                            # the same in seconds
NOW = BASE + 2 * 3_600_000
Point = tuple[str, int, Any, dict[str, str]]   # metric, timestamp ms, value, tags


@dataclass
class Env:
    broker: Broker
    store: RocksStore
    registry: SeriesRegistry
    config: StreamConfig
    clock: list[int]
    blocks: list[RecordBlock] = field(default_factory=list)    # every block the engine read
    partitions: list[int] = field(default_factory=list)        # every cursor it asked for

    async def put(self, points: list[Point], per_request: int = 500) -> None:
        """As the put path: types fixed first, then the records through Broker.append_keyed, at a
        clock set to the newest point's time (points written as they happen: a batch is stored at
        that time)."""
        new = {}
        for metric, _, value, tags in points:
            key = series_key(metric, tags)
            kind = BOOLEAN if isinstance(value, bool) else STRING if isinstance(value, str) else NUMERIC
            if self.registry.type_of(key) is None:
                new.setdefault(key, kind)
        await self.registry.fix(new)
        for lo in range(0, len(points), per_request):
            chunk = points[lo:lo + per_request]
            self.clock[0] = max(p[1] for p in chunk)
            outcomes = await self.broker.append_keyed(
                STREAM, [(key_hash(series_key(m, tags)), record_data(m, ts, v, tags)) for m, ts, v, tags in chunk],
                [p[1] for p in chunk])
            assert all(isinstance(o, int) for o in outcomes), outcomes

    async def put_raw(self, items: list[tuple[bytes, str]]) -> None:
        """Records as they are, routed like the series key given."""
        result = await self.broker.put_records(
            STREAM, [PutEntry(data, explicit_hash_key=str(key_hash(key))) for data, key in items])
        assert result.failed_record_count == 0

    async def query(self, body: Any, now: int = NOW) -> list[dict[str, Any]]:
        self.blocks.clear()
        self.partitions.clear()
        return await query.run_query(self.broker, self.registry, self.config, body, now)

    @property
    def records_read(self) -> int:
        return sum(len(b.data) for b in self.blocks)


async def make_env(path: Path) -> Env:
    store = RocksStore(str(path))
    clock = [BASE]
    broker = Broker(store, cursor_secret=b"tsdb-query-test", clock_ms=lambda: clock[0])
    await broker.start()
    config = await broker.create_stream(STREAM, 8)
    registry = SeriesRegistry(broker, "default", config.stream_id)
    await registry.load()
    env = Env(broker, store, registry, config, clock)
    read_block, get_cursor = broker.reads.read_block, broker.get_cursor

    async def counting_read(*args: Any, **kwargs: Any) -> tuple[RecordBlock, str]:
        block, cursor = await read_block(*args, **kwargs)
        env.blocks.append(block)
        return block, cursor

    async def noting_cursor(stream_name: object, partition_id: object, *args: Any, **kwargs: Any) -> str:
        env.partitions.append(int(partition_id))   # type: ignore[call-overload]
        return await get_cursor(stream_name, partition_id, *args, **kwargs)

    broker.reads.read_block = counting_read   # type: ignore[method-assign]
    broker.get_cursor = noting_cursor         # type: ignore[method-assign]
    return env


async def close_env(env: Env) -> None:
    await env.broker.close()
    await env.store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await make_env(tmp_path / "db")
    yield e
    await close_env(e)


def body(*subs: dict[str, Any], start: Any = S, **extra: Any) -> dict[str, Any]:
    return {"start": start, "queries": list(subs), **extra}


def sub(aggregator: str = "sum", metric: str = "cpu", **extra: Any) -> dict[str, Any]:
    return {"metric": metric, "aggregator": aggregator, **extra}


def secs(points: dict[int, Any]) -> dict[str, Any]:
    """{ms: value} -> dps keyed as the door answers by default (seconds)."""
    return {str(ts // 1000): v for ts, v in points.items()}


def same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    if list(got) != list(want):
        return False
    for k, w in want.items():
        g = got[k]
        if isinstance(w, float) and isinstance(g, int | float) and not isinstance(g, bool):
            if not math.isclose(g, w, rel_tol=1e-12, abs_tol=1e-12):
                return False
        elif g != w or type(g) is not type(w):
            return False
    return True


# -- an independent model of the aggregation -----------------------------------------------------

def value_at(points: list[tuple[int, float]], t: int) -> float | None:
    """A series' value at t: its point, else the lerp of its neighbours; None outside its span."""
    if not points or t < points[0][0] or t > points[-1][0]:
        return None
    for (t0, y0), (t1, y1) in itertools.pairwise(points):
        if t == t0:
            return y0
        if t0 < t < t1:
            return y0 + (t - t0) * (y1 - y0) / (t1 - t0)
    return points[-1][1]


AGG: dict[str, Callable[[list[float]], float]] = {
    "sum": sum, "avg": lambda xs: sum(xs) / len(xs), "min": min, "max": max, "count": len,
    "first": lambda xs: xs[0], "last": lambda xs: xs[-1]}


def across(series: list[list[tuple[int, float]]], agg: str, lerp: bool = True) -> dict[int, float]:
    times = sorted({t for s in series for t, _ in s})
    out = {}
    for t in times:
        if lerp:
            values = [v for s in series if (v := value_at(s, t)) is not None]
        else:
            values = [v for s in series for ts, v in s if ts == t]
        out[t] = AGG[agg](values)
    return out


def buckets(points: list[tuple[int, float]], interval: int, first: int, last: int, fn: str) -> dict[int, float]:
    out = {}
    for b in range(first, last + 1, interval):
        inside = [v for t, v in points if b <= t < b + interval]
        if inside:
            out[b] = float(AGG[fn](inside))
    return out


# -- aggregation ---------------------------------------------------------------------------------

A = [(BASE + i * 10_000, v) for i, v in enumerate([1, 2, 3, 4, 5, 6])]
B = [(BASE + i * 10_000, v) for i, v in enumerate([10, 20, 30, 40, 50, 60])]
C = [(BASE + i * 10_000, v) for i, v in enumerate([5.5, 1.5, 0.25, 8.0, 9.0, 10.0])]
TAGS_A = {"host": "a", "dc": "x", "env": "prod"}
TAGS_B = {"host": "b", "dc": "x", "env": "prod"}
TAGS_C = {"host": "c", "dc": "y", "env": "prod"}


async def put_abc(env: Env) -> None:
    await env.put([("cpu", t, v, tags) for pts, tags in ((A, TAGS_A), (B, TAGS_B), (C, TAGS_C)) for t, v in pts])


@pytest.mark.parametrize("agg", ["sum", "avg", "min", "max", "count"])
async def test_aggregators_over_series_sharing_timestamps(env: Env, agg: str) -> None:
    await put_abc(env)
    [out] = await env.query(body(sub(agg)))
    assert out["metric"] == "cpu"
    assert out["tags"] == {"env": "prod"} and out["aggregateTags"] == ["dc", "host"]
    want = {t: float(v) for t, v in across([A, B, C], agg).items()}
    if agg == "count":
        want = {t: int(v) for t, v in want.items()}
    assert same(out["dps"], secs(want)), out["dps"]


async def test_integer_series_aggregate_to_integers_and_avg_to_doubles(env: Env) -> None:
    await put_abc(env)
    # a filter without groupBy: a and b in one group
    outs = await env.query(body(sub("sum", filters=[{"type": "literal_or", "tagk": "host", "filter": "a|b"}])))
    assert len(outs) == 1 and outs[0]["tags"] == {"dc": "x", "env": "prod"} and outs[0]["aggregateTags"] == ["host"]
    assert same(outs[0]["dps"], secs({t: a + b for (t, a), (_, b) in zip(A, B)}))
    [avg] = await env.query(body(sub("avg", filters=[{"type": "literal_or", "tagk": "host", "filter": "a|b"}])))
    assert same(avg["dps"], secs({t: (a + b) / 2 for (t, a), (_, b) in zip(A, B)}))


LA = [(BASE, 0.0), (BASE + 20_000, 10.0), (BASE + 40_000, 50.0)]
LB = [(BASE + 10_000, 100.0), (BASE + 30_000, 300.0), (BASE + 50_000, 500.0)]


@pytest.mark.parametrize("agg", ["sum", "avg", "min", "max"])
async def test_series_without_a_shared_timestamp_are_interpolated(env: Env, agg: str) -> None:
    await env.put([("mem", t, v, {"host": "a"}) for t, v in LA] + [("mem", t, v, {"host": "b"}) for t, v in LB])
    [out] = await env.query(body(sub(agg, "mem")))
    assert same(out["dps"], secs(across([LA, LB], agg)))
    if agg == "sum":   # spelled out once: a lerps between its points, b is absent outside its span
        assert out["dps"] == {str(S): 0.0, str(S + 10): 105.0, str(S + 20): 210.0, str(S + 30): 330.0,
                              str(S + 40): 450.0, str(S + 50): 500.0}


@pytest.mark.parametrize("agg", ["zimsum", "mimmin", "mimmax", "count"])
async def test_zim_aggregators_and_count_use_actual_points_only(env: Env, agg: str) -> None:
    await env.put([("mem", t, v, {"host": "a"}) for t, v in LA] + [("mem", t, v, {"host": "b"}) for t, v in LB])
    [out] = await env.query(body(sub(agg, "mem")))
    model = {"zimsum": "sum", "mimmin": "min", "mimmax": "max", "count": "count"}[agg]
    want = across([LA, LB], model, lerp=False)
    assert same(out["dps"], secs({t: int(v) if agg == "count" else v for t, v in want.items()}))


# -- tags, grouping, filters ---------------------------------------------------------------------

SERIES = {"a": {"host": "a", "dc": "x"}, "b": {"host": "b", "dc": "x"}, "c": {"host": "c", "dc": "y"},
          "d": {"host": "d"}, "e": {"host": "Web01", "dc": "z"}}


async def put_series(env: Env) -> dict[str, list[tuple[int, float]]]:
    data = {name: [(BASE + i * 10_000, float(n * 10 + i)) for i in range(3)] for n, name in enumerate(SERIES)}
    await env.put([("net", t, v, SERIES[name]) for name, pts in data.items() for t, v in pts])
    return data


def outputs(outs: list[dict[str, Any]]) -> list[tuple[dict[str, str], list[str]]]:
    return [(o["tags"], o["aggregateTags"]) for o in outs]


async def test_star_groups_by_the_tag_one_output_per_value(env: Env) -> None:
    data = await put_series(env)
    outs = await env.query(body(sub("sum", "net", tags={"dc": "*"})))
    assert outputs(outs) == [({"dc": "x"}, ["host"]), ({"dc": "y", "host": "c"}, []),
                             ({"dc": "z", "host": "Web01"}, [])]
    assert same(outs[0]["dps"], secs(across([data["a"], data["b"]], "sum")))
    assert same(outs[1]["dps"], secs(dict(data["c"])))


async def test_alternatives_group_by_the_tag_and_filter(env: Env) -> None:
    data = await put_series(env)
    outs = await env.query(body(sub("max", "net", tags={"host": "a|c|nosuch"})))
    assert outputs(outs) == [({"dc": "x", "host": "a"}, []), ({"dc": "y", "host": "c"}, [])]
    assert same(outs[1]["dps"], secs(dict(data["c"])))


async def test_a_glob_in_tags_ignores_case_as_opentsdbs_does(env: Env) -> None:
    """OpenTSDB's TagVFilter.getFilter makes a `tags` glob an iwildcard: WEB* finds Web01."""
    data = await put_series(env)
    for glob in ("WEB*", "web*", "*EB01", "w*1"):
        [out] = await env.query(body(sub("sum", "net", tags={"host": glob})))
        assert out["tags"] == {"dc": "z", "host": "Web01"}, glob
        assert same(out["dps"], secs(dict(data["e"])))
    assert await env.query(body(sub("sum", "net", filters=[   # a wildcard filter still minds case
        {"type": "wildcard", "tagk": "host", "filter": "WEB*"}]))) == []


async def test_an_exact_value_filters(env: Env) -> None:
    data = await put_series(env)
    [out] = await env.query(body(sub("sum", "net", tags={"dc": "x"})))
    assert (out["tags"], out["aggregateTags"]) == ({"dc": "x"}, ["host"])
    assert same(out["dps"], secs(across([data["a"], data["b"]], "sum")))
    assert await env.query(body(sub("sum", "net", tags={"dc": "nosuch"}))) == []
    assert await env.query(body(sub("sum", "net", tags={"nosuchkey": "*"}))) == []


async def test_without_tags_every_series_is_one_group(env: Env) -> None:
    data = await put_series(env)
    [out] = await env.query(body(sub("sum", "net")))
    assert (out["tags"], out["aggregateTags"]) == ({}, ["dc", "host"])   # d lacks dc: not common
    assert same(out["dps"], secs(across(list(data.values()), "sum")))


@pytest.mark.parametrize(("flt", "hosts"), [
    ({"type": "wildcard", "tagk": "host", "filter": "*"}, "abcde"),
    ({"type": "wildcard", "tagk": "dc", "filter": "*"}, "abce"),          # d has no dc: never matches
    ({"type": "wildcard", "tagk": "host", "filter": "W*1"}, "e"),
    ({"type": "iwildcard", "tagk": "host", "filter": "w*"}, "e"),
    ({"type": "literal_or", "tagk": "host", "filter": "a|d"}, "ad"),
    ({"type": "iliteral_or", "tagk": "host", "filter": "WEB01|A"}, "ae"),
    ({"type": "not_literal_or", "tagk": "host", "filter": "a|b"}, "cde"),
    ({"type": "not_iliteral_or", "tagk": "host", "filter": "web01"}, "abcd"),
    ({"type": "not_literal_or", "tagk": "dc", "filter": "x"}, "ce"),       # d lacks dc
    ({"type": "regexp", "tagk": "host", "filter": "^[ac]$"}, "ac"),
    ({"type": "regexp", "tagk": "host", "filter": "eb"}, "e"),            # searched, not anchored
])
async def test_filters_choose_series(env: Env, flt: dict[str, str], hosts: str) -> None:
    data = await put_series(env)
    [out] = await env.query(body(sub("sum", "net", filters=[flt])))
    want = across([data[h] for h in hosts], "sum")
    assert same(out["dps"], secs(want)), (flt, out["dps"])


async def test_filters_with_group_by_and_tags_combine(env: Env) -> None:
    await put_series(env)
    outs = await env.query(body(sub("sum", "net", tags={"dc": "x|y"},
                                    filters=[{"type": "not_literal_or", "tagk": "host", "filter": "b",
                                              "groupBy": True}])))
    assert outputs(outs) == [({"dc": "x", "host": "a"}, []), ({"dc": "y", "host": "c"}, [])]
    # tags given as a filter function in a tags value
    outs = await env.query(body(sub("sum", "net", tags={"host": "regexp(^[ab]$)"})))
    assert outputs(outs) == [({"dc": "x", "host": "a"}, []), ({"dc": "x", "host": "b"}, [])]


async def test_explicit_tags_wants_exactly_the_filtered_keys(env: Env) -> None:
    data = await put_series(env)
    [out] = await env.query(body(sub("sum", "net", tags={"host": "*"}, explicitTags=True)))
    assert out["tags"] == {"host": "d"} and same(out["dps"], secs(dict(data["d"])))


# -- downsampling and fills -----------------------------------------------------------------------

# a point every 10 s from 30 s before BASE to 150 s after it
DS = [(BASE + i * 10_000, float(i * i % 17)) for i in range(-3, 16)]


@pytest.mark.parametrize("fn", ["sum", "avg", "min", "max", "count", "first", "last"])
async def test_downsample_buckets_are_aligned_and_whole(env: Env, fn: str) -> None:
    await env.put([("ds", t, v, {"host": "a"}) for t, v in DS])
    # start 15 s after a minute: the minute holding it is left out; end 5 s into the third
    # minute: that minute is whole (it counts points after end), as OpenTSDB scans whole intervals
    [out] = await env.query(body(sub("sum", "ds", downsample=f"1m-{fn}"), start=S + 15, end=S + 125))
    assert same(out["dps"], secs(buckets(DS, 60_000, BASE + 60_000, BASE + 120_000, fn))), out["dps"]
    assert list(out["dps"]) == [str(S + 60), str(S + 120)]


async def test_the_edges_are_computed_over_whole_hours_as_opentsdb_scans_them(env: Env) -> None:
    """OpenTSDB computes over its scan (TsdbQuery.getScanStart/EndTimeSeconds: whole hours around
    the range, aligned to the downsample interval) and writes only [start, end]: a series is lerped
    from a bucket before start or after end, and the first rate in range has the point before it.
    So the answer does not depend on where in its bucket the start falls. (Values worked out from
    OpenTSDB's source: AggregationIterator, HttpJsonSerializer.)"""
    t = S + 20   # 20 s past a minute
    await env.put([("edge", (t + dt) * 1000, v, {"host": "a"}) for dt, v in ((5, 1), (65, 2), (125, 3))]
                  + [("edge", (t + dt) * 1000, v, {"host": "b"}) for dt, v in ((5, 10), (125, 30))])
    for start, end in ((t, t + 180), (t - 19, t + 179), (t + 39, t + 100)):   # within the bucket before t+40
        [out] = await env.query(body(sub("sum", "edge", downsample="1m-avg"), start=start, end=end))
        assert out["dps"] == {str(t + 40): 22.0, str(t + 100): 33.0}, (start, out["dps"])
    [out] = await env.query(body(sub("sum", "edge", downsample="1m-avg"), start=t - 20, end=t + 60))
    assert out["dps"] == {str(t - 20): 11.0, str(t + 40): 22.0}   # b's 20 at t+40: from its bucket after end
    await env.put([("climb", (S + dt) * 1000, v, {"host": "a"}) for dt, v in ((0, 0), (10, 100), (20, 200))])
    [out] = await env.query(body(sub("sum", "climb", rate=True), start=S + 5, end=S + 30))
    assert out["dps"] == {str(S + 10): 10.0, str(S + 20): 10.0}   # S+10's rate has the point at S


async def test_downsample_over_several_series_then_aggregate(env: Env) -> None:
    other = [(t, v * 2 + 1) for t, v in DS]
    await env.put([("ds", t, v, {"host": "a"}) for t, v in DS] + [("ds", t, v, {"host": "b"}) for t, v in other])
    [out] = await env.query(body(sub("avg", "ds", downsample="30s-sum"), start=S - 30, end=S + 150))
    a = buckets(DS, 30_000, BASE - 30_000, BASE + 150_000, "sum")
    b = buckets(other, 30_000, BASE - 30_000, BASE + 150_000, "sum")
    assert same(out["dps"], secs({t: (a[t] + b[t]) / 2 for t in a}))


async def test_all_is_one_value_over_start_to_end_at_start(env: Env) -> None:
    await env.put([("ds", t, v, {"host": "a"}) for t, v in DS])
    [out] = await env.query(body(sub("sum", "ds", downsample="0all-sum"), start=S + 15, end=S + 120))
    assert out["dps"] == {str(S + 15): float(sum(v for t, v in DS if BASE + 15_000 <= t < BASE + 120_000))}
    [out] = await env.query(body(sub("sum", "ds", downsample="0all-count"), start=S - 30, end=S + 151))
    assert out["dps"] == {str(S - 30): float(len(DS))}


async def test_ms_buckets_and_odd_intervals_align_on_the_epoch(env: Env) -> None:
    pts = [(BASE + i * 700, float(i)) for i in range(40)]
    await env.put([("fine", t, v, {"host": "a"}) for t, v in pts])
    [out] = await env.query(body(sub("sum", "fine", downsample="7s-count"), start=S, end=S + 27,
                                 msResolution=True))
    first = -(-BASE // 7000) * 7000
    want = buckets(pts, 7000, first, (BASE + 27_000) - (BASE + 27_000) % 7000, "count")
    assert {int(k) for k in out["dps"]} == set(want) and all(int(k) % 7000 == 0 for k in out["dps"])
    assert same(out["dps"], {str(t): v for t, v in want.items()})


FA = [(BASE, 1.0), (BASE + 120_000, 3.0)]
FB = [(BASE, 10.0), (BASE + 60_000, 20.0), (BASE + 120_000, 30.0)]


@pytest.mark.parametrize(("fill", "missing"), [("nan", "NaN"), ("null", None), ("zero", 0.0)])
async def test_fill_policies_answer_every_bucket_from_start_to_end(env: Env, fill: str, missing: Any) -> None:
    await env.put([("fill", t, v, {"host": "a"}) for t, v in FA])
    [out] = await env.query(body(sub("sum", "fill", downsample=f"1m-sum-{fill}"), end=S + 240))
    assert same(out["dps"], secs({BASE: 1.0, BASE + 60_000: missing, BASE + 120_000: 3.0,
                                  BASE + 180_000: missing, BASE + 240_000: missing}))
    [out] = await env.query(body(sub("sum", "fill", downsample="1m-sum"), end=S + 240))   # none: absent
    assert same(out["dps"], secs({BASE: 1.0, BASE + 120_000: 3.0}))


async def test_a_fill_stops_interpolation_across_series(env: Env) -> None:
    await env.put([("fill", t, v, {"host": "a"}) for t, v in FA] + [("fill", t, v, {"host": "b"}) for t, v in FB])
    [out] = await env.query(body(sub("sum", "fill", downsample="1m-sum-nan"), end=S + 180))
    # NaN is skipped by the sum; a bucket no series has stays NaN
    assert same(out["dps"], secs({BASE: 11.0, BASE + 60_000: 20.0, BASE + 120_000: 33.0, BASE + 180_000: "NaN"}))
    [out] = await env.query(body(sub("sum", "fill", downsample="1m-sum"), end=S + 180))
    # without a fill, a's missing minute is interpolated (1 -> 3): 2 + 20
    assert same(out["dps"], secs({BASE: 11.0, BASE + 60_000: 22.0, BASE + 120_000: 33.0}))


# -- rate -----------------------------------------------------------------------------------------

COUNTER = [(BASE + i * 10_000, v) for i, v in enumerate([10, 20, 5, 15, 15])]


@pytest.mark.parametrize(("options", "want"), [
    (None, [1.0, -1.5, 1.0, 0.0]),
    ({"counter": True, "counterMax": 30}, [1.0, 1.5, 1.0, 0.0]),
    ({"counter": True, "counterMax": 30, "resetValue": 1.2}, [1.0, 0.0, 1.0, 0.0]),
    ({"counter": True, "dropResets": True}, [1.0, None, 1.0, 0.0]),
])
async def test_rate_per_second_with_counter_options(env: Env, options: dict[str, Any] | None,
                                                    want: list[float | None]) -> None:
    await env.put([("ctr", t, v, {"host": "a"}) for t, v in COUNTER])
    extra = {"rateOptions": options} if options else {}
    [out] = await env.query(body(sub("sum", "ctr", rate=True, **extra)))
    assert same(out["dps"], secs({t: w for (t, _), w in zip(COUNTER[1:], want) if w is not None}))


async def test_rate_after_downsample_and_across_series(env: Env) -> None:
    await env.put([("ctr", t, v, {"host": "a"}) for t, v in COUNTER]
                  + [("ctr", t, v * 3, {"host": "b"}) for t, v in COUNTER])
    [out] = await env.query(body(sub("sum", "ctr", rate=True, downsample="20s-max")))
    mx = buckets(COUNTER, 20_000, BASE, BASE + 40_000, "max")
    rates = {t1: (v1 - v0) / 20 for (t0, v0), (t1, v1) in zip(mx.items(), list(mx.items())[1:])}
    assert same(out["dps"], secs({t: r * 4 for t, r in rates.items()}))


# -- times and keys -------------------------------------------------------------------------------

async def test_relative_times_and_default_end(env: Env) -> None:
    pts = [(NOW - 2 * 3_600_000, 1), (NOW - 30 * 60_000, 2), (NOW - 5 * 60_000, 3), (NOW + 60_000, 4)]
    await env.put([("rel", t, v, {"host": "a"}) for t, v in pts])
    [out] = await env.query(body(sub("sum", "rel"), start="1h-ago"))
    assert out["dps"] == secs({NOW - 30 * 60_000: 2, NOW - 5 * 60_000: 3})   # end: now, not later
    [out] = await env.query(body(sub("sum", "rel"), start="3h-ago", end="10m-ago"))
    assert out["dps"] == secs({NOW - 2 * 3_600_000: 1, NOW - 30 * 60_000: 2})
    [out] = await env.query(body(sub("sum", "rel"), start="1h-ago", end=(NOW + 60_000) // 1000))
    assert list(out["dps"].values()) == [2, 3, 4]   # end is inclusive


@pytest.mark.parametrize(("text", "ms"), [
    ("1ms-ago", 1), ("1s-ago", 1000), ("2m-ago", 120_000), ("1h-ago", 3_600_000), ("1d-ago", 86_400_000),
    ("1w-ago", 7 * 86_400_000), ("1n-ago", 30 * 86_400_000), ("1y-ago", 365 * 86_400_000),
    ("3H-AGO", 3 * 3_600_000)])
def test_relative_units(text: str, ms: int) -> None:
    q = query.parse_body(body(sub(), start=text), NOW)
    assert q.start_ms == NOW - ms and q.end_ms == NOW


@pytest.mark.parametrize(("given", "ms"), [
    (4284768, 4284768000), (9999999999, 9999999999000), (10000000000, 10000000000), (S, BASE),
    (str(S), BASE), (str(BASE), BASE), (f"{S}.5", BASE + 500), (f"{S}.123", BASE + 123), (0, 0),
    ("now", NOW), ("2023/11/14-22:00:00", 1699999200000), ("2023/11/14 22:00", 1699999200000),
    ("2023/11/14", 1699920000000)])
def test_absolute_times_by_magnitude_and_dates(given: Any, ms: int) -> None:
    assert query.parse_body({"start": given, "end": 10 ** 13 - 1, "queries": [sub()]}, NOW).start_ms == ms


def test_dates_in_a_time_zone() -> None:
    q = query.parse_body(body(sub(), start="2023/11/14-23:00:00", timezone="Europe/Paris"), NOW)
    assert q.start_ms == 1699999200000


async def test_keys_in_seconds_show_the_last_point_of_a_second(env: Env) -> None:
    await env.put([("sub", BASE + 100, 1, {"host": "a"}), ("sub", BASE + 900, 2, {"host": "a"}),
                   ("sub", BASE + 1500, 3, {"host": "a"})])
    [out] = await env.query(body(sub("none", "sub")))
    assert out["dps"] == {str(S): 2, str(S + 1): 3}
    for flag in ("msResolution", "ms"):
        [out] = await env.query(body(sub("none", "sub"), **{flag: True}))
        assert out["dps"] == {str(BASE + 100): 1, str(BASE + 900): 2, str(BASE + 1500): 3}
    # a boolean as Jackson reads one: the strings "true"/"false" and integers too
    for flag_value, ms in (("true", True), ("TRUE", True), (1, True), ("false", False), (0, False), (None, False)):
        [out] = await env.query(body(sub("none", "sub"), msResolution=flag_value, delete="false", useCalendar=0))
        assert len(out["dps"]) == (3 if ms else 2), flag_value


async def test_a_timestamp_written_twice_keeps_the_last_value(env: Env) -> None:
    await env.put([("dup", BASE, 1, {"host": "a"}), ("dup", BASE + 1000, 5, {"host": "a"})])
    await env.put([("dup", BASE, 7, {"host": "a"})])
    [out] = await env.query(body(sub("sum", "dup", downsample="1m-sum")))
    assert out["dps"] == {str(S): 12.0}


# -- none, types ----------------------------------------------------------------------------------

async def test_none_answers_each_series_with_its_own_values(env: Env) -> None:
    await env.put([("mix", BASE, 1, {"host": "a"}), ("mix", BASE + 1000, 2.5, {"host": "a"}),
                   ("mix", BASE, 2 ** 62 + 1, {"host": "b"}),
                   ("mix", BASE, "down", {"host": "s"}), ("mix", BASE + 1000, "up \"x\"", {"host": "s"}),
                   ("mix", BASE, True, {"host": "t"}), ("mix", BASE + 1000, False, {"host": "t"})])
    outs = await env.query(body(sub("none", "mix")))
    assert [(o["tags"], o["aggregateTags"], o["dps"]) for o in outs] == [
        ({"host": "a"}, [], {str(S): 1, str(S + 1): 2.5}),
        ({"host": "b"}, [], {str(S): 2 ** 62 + 1}),          # exact, beyond 2^53
        ({"host": "s"}, [], {str(S): "down", str(S + 1): 'up "x"'}),
        ({"host": "t"}, [], {str(S): True, str(S + 1): False})]
    assert isinstance(outs[0]["dps"][str(S)], int)
    # aggregations, downsampling and rate see only the numeric series
    [out] = await env.query(body(sub("count", "mix")))
    assert out["dps"] == {str(S): 2, str(S + 1): 1} and out["aggregateTags"] == ["host"]
    outs = await env.query(body(sub("none", "mix", downsample="1m-count")))
    assert [o["tags"] for o in outs] == [{"host": "a"}, {"host": "b"}]


async def test_a_metric_of_strings_only_aggregates_to_nothing(env: Env) -> None:
    await env.put([("state", BASE, "on", {"host": "a"})])
    assert await env.query(body(sub("sum", "state"))) == []
    assert (await env.query(body(sub("none", "state"))))[0]["dps"] == {str(S): "on"}


async def test_cjk_names_and_tag_values(env: Env) -> None:
    tags = {"城市": "北京", "host": "a(b):c,[d]=e/f"}
    await env.put([("温度.cpu", BASE + i * 1000, i, tags) for i in range(5)])
    [out] = await env.query(body(sub("sum", "温度.cpu", tags={"城市": "北京"})))
    assert out["tags"] == dict(sorted(tags.items())) and out["dps"] == secs({BASE + i * 1000: i for i in range(5)})


# -- the unknown and the absent -------------------------------------------------------------------

async def test_an_unknown_metric_is_opentsdbs_400(env: Env) -> None:
    await put_abc(env)
    with pytest.raises(ClientError) as err:
        await env.query(body(sub("sum", "cpu"), sub("sum", "nosuch")))
    assert err.value.code is ErrorCode.UNKNOWN_METRIC
    assert err.value.message == "No such name for 'metrics': 'nosuch'"   # OpenTSDB's words, nothing before them


async def test_no_tsdb_stream_yet_answers_nothing(env: Env) -> None:
    assert await query.run_query(env.broker, None, None, body(sub("sum", "anything")), NOW) == []
    with pytest.raises(ClientError):   # but bad input is still bad
        await query.run_query(env.broker, None, None, {"queries": []}, NOW)


async def test_end_may_equal_start(env: Env) -> None:
    await put_abc(env)
    [out] = await env.query(body(sub("sum"), start=S + 10, end=S + 10))
    assert out["dps"] == {str(S + 10): 2 + 20 + 1.5}


async def test_no_points_in_the_hours_read_answers_nothing(env: Env) -> None:
    await put_abc(env)
    assert await env.query(body(sub("sum"), start=S + 3600)) == []   # the next hour holds none


async def test_series_the_scan_finds_answer_even_with_no_point_in_range(env: Env) -> None:
    """OpenTSDB reads whole hours and writes every group they hold, its dps cut to [start, end]:
    a 1h bucket that begins before start is computed and left out, the group stays, empty."""
    await put_abc(env)
    assert await env.query(body(sub("sum", downsample="1h-sum"), start=S + 1, end=S + 100)) == [
        {"metric": "cpu", "tags": {"env": "prod"}, "aggregateTags": ["dc", "host"], "dps": {}}]
    outs = await env.query(body(sub("none"), start=S + 51, end=S + 59))   # points at S+50 and before
    assert [(o["tags"]["host"], o["dps"]) for o in outs] == [("a", {}), ("b", {}), ("c", {})]


# -- what is read ---------------------------------------------------------------------------------

def hosts_by_partition(count: int) -> dict[int, str]:
    """One host name per partition of the tsdb stream (series `part{host=...}`)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < count:
        name = f"h{i}"
        found.setdefault(series_partition(series_key("part", {"host": name}), count), name)
        i += 1
    return found


async def test_a_query_reads_only_the_partitions_of_its_series(env: Env) -> None:
    hosts = hosts_by_partition(8)
    points = [(metric, BASE + i * 1000, i, {"host": h}) for metric in ("part", "other")
              for h in hosts.values() for i in range(50)]
    await env.put(points)
    held = [0] * 8   # records per partition
    for metric, _, _, tags in points:
        held[series_partition(series_key(metric, tags), 8)] += 1

    def partitions_of_records_read() -> set[int]:
        found = set()
        for block in env.blocks:
            for data in block.data:
                point = json.loads(data)
                found.add(series_partition(series_key(point["metric"], point["tags"]), 8))
        return found

    [out] = await env.query(body(sub("sum", "part", tags={"host": hosts[3]})))
    assert out["dps"] == secs({BASE + i * 1000: i for i in range(50)})
    assert set(env.partitions) == partitions_of_records_read() == {3}
    assert env.records_read == held[3] < len(points)
    outs = await env.query(body(sub("sum", "part", tags={"host": f"{hosts[3]}|{hosts[5]}"})))
    assert len(outs) == 2
    assert set(env.partitions) == partitions_of_records_read() == {3, 5}
    assert env.records_read == held[3] + held[5]
    await env.query(body(sub("sum", "part", tags={"host": "*"})))
    assert set(env.partitions) == set(range(8)) and env.records_read == len(points)


async def test_a_query_starts_reading_at_its_start_time(env: Env) -> None:
    hours = [BASE - 3 * 3_600_000, BASE - 2 * 3_600_000, BASE - 3_600_000]
    for h in hours:   # three writes an hour apart, each stored at its newest point's time
        await env.put([("pos", h + i * 1000, i, {"host": "a"}) for i in range(100)])
    [out] = await env.query(body(sub("sum", "pos", downsample="0all-count"), start=hours[2] // 1000))
    assert out["dps"] == {str(hours[2] // 1000): 100.0}
    assert env.records_read == 100                # the two older writes were not read
    [out] = await env.query(body(sub("sum", "pos", downsample="0all-count"), start=hours[1] // 1000 + 50))
    assert out["dps"][str(hours[1] // 1000 + 50)] == 150.0
    assert env.records_read == 200
    # a start before the stream's retention reads from the oldest record
    [out] = await env.query(body(sub("sum", "pos", downsample="0all-count"), start=S - 86_400 * 3))
    assert list(out["dps"].values()) == [300.0] and env.records_read == 300


async def test_points_written_after_the_query_began_are_not_read(env: Env) -> None:
    await env.put([("late", BASE + i * 1000, 1, {"host": "a"}) for i in range(10)])
    key = series_key("late", {"host": "a"})
    gate, release = asyncio.Event(), asyncio.Event()
    read_block = env.broker.reads.read_block

    async def slow_read(*args: Any, **kwargs: Any) -> tuple[RecordBlock, str]:
        gate.set()
        await release.wait()
        return await read_block(*args, **kwargs)

    env.broker.reads.read_block = slow_read   # type: ignore[method-assign]
    running = asyncio.ensure_future(env.query(body(sub("sum", "late", downsample="0all-count"))))
    await asyncio.wait_for(gate.wait(), 10)
    await env.put_raw([(record_data("late", BASE + 20_000, 1, {"host": "a"}), key)])
    release.set()
    [out] = await asyncio.wait_for(running, 10)
    assert out["dps"] == {str(S): 10.0}


async def test_records_of_the_stream_not_written_as_points_are_ignored(env: Env) -> None:
    await env.put([("raw", BASE, 1, {"host": "a"})])
    key = series_key("raw", {"host": "a"})
    await env.put_raw([(b'{"metric": "raw", "timestamp": 1700000000000, "value": 5, "tags": {"host": "a"}}', key),
                       (b'{"metric":"raw","timestamp":\xff\xfe,"value":1,"tags":{"host":"a"}}', key),
                       (b'{"metric":"raw","timestamp":x,"value":1,"tags":{"host":"a"}}', key),
                       (b"not json at all", key), (b"", key)])
    [out] = await env.query(body(sub("sum", "raw")))
    assert out["dps"] == {str(S): 1}


async def test_values_of_another_type_written_by_another_door_are_skipped(env: Env) -> None:
    """A string or boolean series skips a record whose value is not of its type, as a numeric series
    skips one that is not a number: a DIS write of `"value":nope` into a string series' partition
    made every `none` query of the metric a 500 (orjson.loads of the stored text)."""
    await env.put([("st", BASE, "up", {"k": "s"}), ("st", BASE, True, {"k": "b"}), ("st", BASE, 7, {"k": "n"})])
    later = BASE + 1000
    for k, values in (("s", [b"nope", b"5", b'{"a":1}', b'"unterminated', b"null", b'"a\\"']),
                      ("b", [b"nope", b"1", b'"true"', b"null"]), ("n", [b"nope", b'"7"', b"true"])):
        layout, tail = query._layout("st", {"k": k})
        await env.put_raw([(layout + str(later).encode() + b',"value":' + v + b',"tags":' + tail.encode() + b"}",
                            series_key("st", {"k": k})) for v in values])
    await env.put([("st", later + 1000, "down", {"k": "s"}), ("st", later + 1000, False, {"k": "b"})])
    outs = await env.query(body(sub("none", "st")))
    assert [(o["tags"], o["dps"]) for o in outs] == [
        ({"k": "b"}, {str(S): True, str(S + 2): False}),
        ({"k": "n"}, {str(S): 7}),
        ({"k": "s"}, {str(S): "up", str(S + 2): "down"})]


async def test_a_series_whose_records_in_range_are_all_of_another_type_drops_out(env: Env) -> None:
    """A series with no point of its type in the scan is not answered, whatever its type: a string
    or boolean series whose only records there were written by another door with a value of
    another type was answered with empty dps, where a numeric series dropped out."""
    early = BASE - 7_200_000   # two hours before: outside the scan of a query from S
    await env.put([("wt", early, "up", {"k": "s"}), ("wt", early, True, {"k": "b"}), ("wt", early, 7, {"k": "n"}),
                   ("wt", early, "up", {"k": "z"})])
    later = env.clock[0] = BASE + 1000   # the records are stored at their time
    for k, v in (("s", b"5"), ("b", b"nope"), ("n", b'"7"'), ("z", b'"a\\q"')):
        layout, tail = query._layout("wt", {"k": k})
        await env.put_raw([(layout + str(later).encode() + b',"value":' + v + b',"tags":' + tail.encode() + b"}",
                            series_key("wt", {"k": k}))])
    assert await env.query(body(sub("none", "wt"))) == []
    outs = await env.query(body(sub("none", "wt"), start=S - 7200))
    e = str(S - 7200)
    assert [(o["tags"], o["dps"]) for o in outs] == [
        ({"k": "b"}, {e: True}), ({"k": "n"}, {e: 7}), ({"k": "s"}, {e: "up"}), ({"k": "z"}, {e: "up"})]


def test_the_record_layout_is_what_the_decoder_expects() -> None:
    tags = {"b": "2", "a": "温"}
    prefix, tail = query._layout("m.x", tags)
    data = record_data("m.x", 1234, -1.5e-7, tags)
    assert data == prefix + b'1234,"value":-1.5e-7,"tags":' + tail.encode() + b"}"


# -- bounds ---------------------------------------------------------------------------------------

async def test_too_many_points_is_a_413(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await put_abc(env)
    monkeypatch.setattr(query, "MAX_POINTS", 10)
    with pytest.raises(ClientError) as err:
        await env.query(body(sub("sum")))
    assert err.value.code is ErrorCode.REQUEST_TOO_LARGE and "limit of 10 data points" in err.value.message
    monkeypatch.setattr(query, "MAX_POINTS", 18)
    await env.query(body(sub("sum")))


async def test_too_many_records_read_is_a_413(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await put_abc(env)
    monkeypatch.setattr(query, "MAX_SCANNED", 5)
    with pytest.raises(ClientError) as err:
        await env.query(body(sub("sum", tags={"host": "*"})))
    assert err.value.code is ErrorCode.REQUEST_TOO_LARGE


async def test_too_many_filled_or_interpolated_values_is_a_413(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await env.put([("mem", t, v, {"host": "a"}) for t, v in LA] + [("mem", t, v, {"host": "b"}) for t, v in LB])
    monkeypatch.setattr(query, "MAX_CELLS", 6)
    with pytest.raises(ClientError) as err:
        await env.query(body(sub("sum", "mem")))           # 8 interpolated values
    assert err.value.code is ErrorCode.REQUEST_TOO_LARGE
    with pytest.raises(ClientError) as err:
        await env.query(body(sub("sum", "mem", downsample="1ms-sum-zero")))
    assert err.value.code is ErrorCode.REQUEST_TOO_LARGE
    assert len((await env.query(body(sub("zimsum", "mem"))))[0]["dps"]) == 6


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "where"), [
    ([], "body"),
    ({"queries": [sub()]}, "start"),
    (body(sub(), start="yesterday"), "start"),
    (body(sub(), start=-1), "start"),
    (body(sub(), start=10 ** 13), "start"),
    (body(sub(), start=1.5e9), "start"),
    (body(sub(), start=True), "start"),
    (body(sub(), start="0h-ago"), "start"),
    (body(sub(), start="1x-ago"), "start"),
    (body(sub(), start="2023/02/30"), "start"),
    (body(sub(), start="1699999200.1234"), "start"),
    (body(sub(), end=S - 1), "end"),
    (body(sub(), end="soon"), "end"),
    (body(sub(), start="2023/11/14", timezone="Mars/Olympus"), "timezone"),
    (body(sub(), start="2023/11/14", timezone=5), "timezone"),
    ({"start": S}, "queries"),
    (body(), "queries"),
    ({"start": S, "queries": {"metric": "cpu"}}, "queries"),
    ({"start": S, "queries": [sub()] * 65}, "queries"),
    (body("cpu"), "queries[0]"),
    (body(sub(), {"aggregator": "sum"}), "queries[1].metric"),
    (body({"aggregator": "sum", "tsuids": ["000001"]}), "queries[0].tsuids"),
    (body(sub("dev")), "queries[0].aggregator"),
    (body(sub("p99")), "queries[0].aggregator"),
    (body({"metric": "cpu"}), "queries[0].aggregator"),
    (body(sub(downsample="1m")), "queries[0].downsample"),
    (body(sub(downsample="1m-none")), "queries[0].downsample"),
    (body(sub(downsample="1m-p99")), "queries[0].downsample"),
    (body(sub(downsample="0m-avg")), "queries[0].downsample"),
    (body(sub(downsample="1x-avg")), "queries[0].downsample"),
    (body(sub(downsample="1dc-avg")), "queries[0].downsample"),
    (body(sub(downsample="1m-avg-linear")), "queries[0].downsample"),
    (body(sub(downsample="99999999999999y-avg")), "queries[0].downsample"),
    (body(sub(downsample=60)), "queries[0].downsample"),
    (body(sub(rate="yes")), "queries[0].rate"),
    (body(sub(rate=True, rateOptions=[])), "queries[0].rateOptions"),
    (body(sub(rate=True, rateOptions={"counter": "yes"})), "queries[0].rateOptions.counter"),
    (body(sub(rate=True, rateOptions={"counterMax": -1})), "queries[0].rateOptions.counterMax"),
    (body(sub(rate=True, rateOptions={"resetValue": "0"})), "queries[0].rateOptions.resetValue"),
    (body(sub(tags=["host"])), "queries[0].tags"),
    (body(sub(tags={"host": 1})), "queries[0].tags.host"),
    (body(sub(tags={"host": ""})), "queries[0].tags.host"),
    (body(sub(filters={})), "queries[0].filters"),
    (body(sub(filters=["host=a"])), "queries[0].filters[0]"),
    (body(sub(filters=[{"type": "regex", "tagk": "host", "filter": "a"}])), "queries[0].filters[0].type"),
    (body(sub(filters=[{"type": "wildcard", "filter": "a"}])), "queries[0].filters[0].tagk"),
    (body(sub(filters=[{"type": "wildcard", "tagk": "host"}])), "queries[0].filters[0].filter"),
    (body(sub(filters=[{"type": "wildcard", "tagk": "host", "filter": "*", "groupBy": "no"}])),
     "queries[0].filters[0].groupBy"),
    (body(sub(explicitTags="yes")), "queries[0].explicitTags"),
    (body(sub(), msResolution="yes"), "msResolution"),
    (body(sub(), delete=True), "delete"),
    (body(sub(), useCalendar=True), "useCalendar"),
])
async def test_bad_input_is_a_400_naming_the_field(env: Env, given: Any, where: str) -> None:
    await put_abc(env)
    with pytest.raises(ClientError) as err:
        await env.query(given)
    assert err.value.code is ErrorCode.INVALID_REQUEST
    assert err.value.message.startswith(f"Invalid request. {where}: "), err.value.message


async def test_an_invalid_regexp_is_a_400(env: Env) -> None:
    await put_abc(env)
    with pytest.raises(ClientError) as err:
        await env.query(body(sub(filters=[{"type": "regexp", "tagk": "host", "filter": "(a"}])))
    assert "queries[0].filters" in err.value.message and "invalid regexp" in err.value.message


# -- GET /api/query -------------------------------------------------------------------------------

@pytest.mark.parametrize(("m", "want"), [
    ("sum:cpu", {"aggregator": "sum", "metric": "cpu", "filters": []}),
    ("avg:1m-avg-nan:cpu{host=*,dc=x|y}",
     {"aggregator": "avg", "downsample": "1m-avg-nan", "metric": "cpu", "filters": [
         {"type": "iwildcard", "tagk": "host", "filter": "*", "groupBy": True},
         {"type": "literal_or", "tagk": "dc", "filter": "x|y", "groupBy": True}]}),
    ("sum:rate{counter,100,5}:10s-sum:cpu{host=a}{dc=literal_or(x)}",
     {"aggregator": "sum", "rate": True, "rateOptions": {"counter": True, "dropResets": False, "counterMax": 100,
                                                         "resetValue": 5},
      "downsample": "10s-sum", "metric": "cpu", "filters": [
          {"type": "literal_or", "tagk": "host", "filter": "a", "groupBy": True},
          {"type": "literal_or", "tagk": "dc", "filter": "x", "groupBy": False}]}),
    ("max:rate:explicit_tags:a(b):c,[d]=e/f{k=v=w}",
     {"aggregator": "max", "rate": True, "explicitTags": True, "metric": "a(b):c,[d]=e/f",
      "filters": [{"type": "literal_or", "tagk": "k", "filter": "v=w", "groupBy": True}]}),
    ("sum:rate", {"aggregator": "sum", "metric": "rate", "filters": []}),
    ("sum:1m-avg", {"aggregator": "sum", "metric": "1m-avg", "filters": []}),
])
def test_get_m_parameters(m: str, want: dict[str, Any]) -> None:
    got = query.body_from_params({"start": "1h-ago", "m": m})
    assert got == {"start": "1h-ago", "queries": [want]}


def test_get_flags_times_and_repeated_m() -> None:
    params = MultiDict([("start", "1h-ago"), ("end", "5m-ago"), ("m", "sum:cpu"), ("m", "max:mem"), ("ms", ""),
                        ("tz", "Europe/Paris")])
    got = query.body_from_params(params)
    assert got["msResolution"] is True and got["end"] == "5m-ago" and got["timezone"] == "Europe/Paris"
    assert [q["metric"] for q in got["queries"]] == ["cpu", "mem"]
    assert "msResolution" not in query.body_from_params({"start": "1", "m": "sum:cpu"})


@pytest.mark.parametrize(("params", "where"), [
    ({"start": "1h-ago"}, "m"),
    ({"start": "1h-ago", "tsuid": "sum:0001"}, "tsuid"),
    ({"start": "1h-ago", "m": "cpu"}, "m[0]"),
    ({"start": "1h-ago", "m": ":cpu"}, "m[0]"),
    ({"start": "1h-ago", "m": "sum:cpu{host}"}, "m[0]"),
    ({"start": "1h-ago", "m": "sum:cpu{host=}"}, "m[0]"),
    ({"start": "1h-ago", "m": "sum:cpu{a=b}{c=d}{e=f}"}, "m[0]"),
    ({"start": "1h-ago", "m": "sum:rate{counter,x}:cpu"}, "m[0]"),
    ({"start": "1h-ago", "m": "sum:rate{counter,1,2,3}:cpu"}, "m[0]"),
])
def test_get_bad_m_is_a_400_naming_it(params: dict[str, str], where: str) -> None:
    with pytest.raises(ClientError) as err:
        query.body_from_params(params)
    assert err.value.message.startswith(f"Invalid request. {where}: ")


async def test_get_and_post_answer_alike(env: Env) -> None:
    await put_series(env)
    get = query.body_from_params(MultiDict([("start", str(S)), ("m", "sum:10s-sum:net{dc=*}{host=a|c}")]))
    post = body(sub("sum", "net", downsample="10s-sum", tags={"dc": "*"},
                    filters=[{"type": "literal_or", "tagk": "host", "filter": "a|c"}]))
    assert await env.query(get) == await env.query(post)
    assert len(await env.query(get)) == 2


async def test_show_query_gives_each_output_its_sub_query_and_index(env: Env) -> None:
    """OpenTSDB 2.x `showQuery` (GET: `show_query`): every output carries the sub-query it answers,
    with its `index` in the request - how a client of several sub-queries maps the outputs back to
    them (Grafana's OpenTSDB data source at version 2.3 asks for it and reads `query.index` of each
    output). It was ignored: no output had a `query`."""
    await put_abc(env)
    by_host, by_dc = sub("sum", tags={"host": "*"}), sub("max", tags={"dc": "x"})
    got = await env.query(body(by_host, by_dc, showQuery=True))
    assert [(o["query"]["index"], o["tags"].get("host", o["tags"]["dc"])) for o in got] == \
        [(0, "a"), (0, "b"), (0, "c"), (1, "x")]
    assert got[0]["query"] == {**by_host, "index": 0} and got[3]["query"] == {**by_dc, "index": 1}
    assert all("query" not in o for o in await env.query(body(by_host, by_dc)))
    get = query.body_from_params(MultiDict([("start", str(S)), ("m", "sum:cpu{host=*}"), ("m", "max:cpu{dc=x}"),
                                            ("show_query", "")]))
    assert [o["query"]["index"] for o in await env.query(get)] == [0, 0, 0, 1]


# -- suggest --------------------------------------------------------------------------------------

async def test_suggest(env: Env) -> None:
    await put_series(env)
    await put_abc(env)
    reg = env.registry
    assert query.suggest(reg, {"type": "metrics"}) == ["cpu", "net"]
    assert query.suggest(reg, {"type": "metrics", "q": "n"}) == ["net"]
    assert query.suggest(reg, {"type": "tagk"}) == ["dc", "env", "host"]
    assert query.suggest(reg, {"type": "tagv", "q": "W"}) == ["Web01"]
    assert query.suggest(reg, MultiDict([("type", "tagv"), ("max", "3")])) == ["Web01", "a", "b"]
    assert query.suggest(reg, {"type": "tagv", "max": 2}) == ["Web01", "a"]
    assert query.suggest(None, {"type": "metrics"}) == []
    for params, where in (({}, "type"), ({"type": "hosts"}, "type"), ({"type": "metrics", "max": "0"}, "max"),
                          ({"type": "metrics", "max": "-1"}, "max"), ({"type": "metrics", "max": "x"}, "max")):
        with pytest.raises(ClientError) as err:
            query.suggest(reg, params)
        assert err.value.message.startswith(f"Invalid request. {where}: ")
    # a POSTed value is named as JSON spells it, not as Python does
    for posted, shown in ((True, "'true'"), (False, "'false'"), ({"n": 1}, "'{\"n\":1}'"), (1.5, "'1.5'")):
        with pytest.raises(ClientError) as err:
            query.suggest(reg, {"type": "metrics", "max": posted})
        assert err.value.message.endswith(f"got {shown}"), err.value.message


def test_an_out_of_range_time_names_its_number() -> None:
    for start in ("99999999999999999999", 2**70, 10**13, "9" * 25):   # it said "timestamp 'a int'" past 64 bits
        with pytest.raises(ClientError) as err:
            query.parse_body(body(sub(), start=start), NOW)
        assert f"start: timestamp '{start}' out of range" in err.value.message, err.value.message
    assert query.parse_body(body(sub(), start="0" * 30 + str(S)), NOW).start_ms == BASE   # leading zeros


def test_suggest_sorts_and_caps_at_25_by_default() -> None:
    class Registry:
        def names(self, kind: str) -> list[str]:
            return sorted(f"m{i:03d}" for i in range(100))

    assert query.suggest(Registry(), {"type": "metrics"}) == [f"m{i:03d}" for i in range(25)]   # type: ignore[arg-type]


async def test_suggest_answers_from_names_the_registry_keeps_and_walks_no_series(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """suggest walked every series of every metric (then sorted what it found) on the event loop
    on every call: with 400,000 series a tagv call held every door ~0.5 s, even for a `q` nothing
    starts with. The registry now keeps the distinct names sorted as it indexes series; the answer
    is still, for any `q` and `max`, what a brute-force model over every series gives - after new
    series too, and after the index is rebuilt - and no call walks the series."""
    rnd = random.Random(11)
    reg = env.registry
    walks: list[str] = []
    series_of = reg.series_of

    def counting_series_of(metric: str) -> Any:
        walks.append(metric)
        return series_of(metric)

    monkeypatch.setattr(reg, "series_of", counting_series_of)

    def name() -> str:
        return "".join(rnd.choice("ab.Z_\u00e90") for _ in range(rnd.randint(1, 4)))

    def some_series(n: int) -> dict[str, str]:
        return {series_key(name(), {name(): name() for _ in range(rnd.randint(0, 3))}): NUMERIC for _ in range(n)}

    def check() -> None:
        model: dict[str, set[str]] = {"metrics": set(), "tagk": set(), "tagv": set()}
        for key in reg.learned:
            metric, pairs = json.loads(key)
            model["metrics"].add(metric)
            model["tagk"].update(k for k, _ in pairs)
            model["tagv"].update(v for _, v in pairs)
        for kind, found in model.items():
            names = sorted(found)
            prefixes = {"", "zz", "b\uffff", "\U0010ffff", *(n[:i] for n in names for i in (1, 2)),
                        *rnd.sample(names, min(len(names), 40))}
            for prefix in sorted(prefixes):
                for limit in (1, 3, 25, MAX):
                    want = [n for n in names if n.startswith(prefix)][:limit]
                    assert query.suggest(reg, {"type": kind, "q": prefix, "max": str(limit)}) == want, (kind, prefix)
            assert query.suggest(reg, {"type": kind}) == names[:25]

    MAX = query.MAX_SUGGEST
    await reg.fix(some_series(3000))
    check()
    await reg.fix(some_series(40))      # learned since: merged into the names kept
    assert query.suggest(reg, {"type": "tagv", "q": "zzz"}) == []
    check()
    await reg.fix(some_series(40))
    series_of("a")                      # a query indexes the new series before a suggest does
    check()
    key = reg.learned[0]                # the index made again (a series' kind changed): nothing twice
    reg._remember(key, "string")
    check()
    assert walks == []


async def test_a_sum_adds_its_values_one_after_another_in_series_order(env: Env) -> None:
    """The same query gives the same digits every time: a group's values at a time are added one
    after another in series order. Polars' sum adds in blocks whose split varied from run to run:
    the JetStream probe's query gave 2 answers in 20, differing in their last digit."""
    rnd = random.Random(4)
    hosts = [f"h{i:03d}" for i in range(64)]   # sorted: the series' order
    values = {h: [rnd.uniform(-1e6, 1e6) * 10 ** rnd.randint(-6, 6) for _ in range(3)] for h in hosts}
    await env.put([("adds", BASE + t * 1000, values[h][t], {"host": h}) for h in hosts for t in range(3)])
    for agg in ("sum", "avg", "zimsum"):
        [out] = await env.query(body(sub(agg, "adds")))
        for t in range(3):
            total = 0.0
            for h in hosts:
                total += values[h][t]
            assert out["dps"][str(S + t)] == (total / 64 if agg == "avg" else total), (agg, t)


# -- the engine against the model, on random series ------------------------------------------------

_series = st.lists(st.dictionaries(st.integers(0, 100), st.integers(-1000, 1000) | st.floats(-1e3, 1e3),
                                   min_size=1, max_size=8), min_size=1, max_size=4)


def test_random_series_aggregate_as_the_model_says(tmp_path: Path) -> None:
    """Random series (points at whole seconds of 100 s), every lerping and non-lerping aggregator,
    with and without a downsample whose buckets do not align on the start: the engine's dps equal
    the model's (values compared as numbers). As OpenTSDB, the bucket holding the start is computed
    (and lerped across) but not answered."""
    loop = asyncio.new_event_loop()
    e = loop.run_until_complete(make_env(tmp_path / "db"))
    count = iter(range(10 ** 6))
    try:
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_series, st.sampled_from(["sum", "avg", "min", "max", "zimsum", "mimmin", "mimmax", "count"]),
               st.sampled_from([None, "10s-sum", "7s-avg", "20s-max", "15s-min", "10s-count", "13s-first"]))
        def check(raw: list[dict[int, float]], agg: str, ds: str | None) -> None:
            metric = f"prop{next(count)}"
            series = [sorted((BASE + sec * 1000, float(v)) for sec, v in pts.items()) for pts in raw]
            loop.run_until_complete(e.put([(metric, t, v, {"host": f"s{i}"}) for i, pts in enumerate(raw)
                                           for t, v in sorted((BASE + sec * 1000, v) for sec, v in pts.items())]))
            outs = loop.run_until_complete(e.query(body(sub(agg, metric, downsample=ds), end=S + 100)))
            if ds is not None:
                interval = int(ds.split("s-")[0]) * 1000
                first, last = BASE - BASE % interval, (BASE + 100_000) // interval * interval
                series = [list(buckets(pts, interval, first, last, ds.split("-")[1]).items()) for pts in series]
                series = [pts for pts in series if pts]
            model = {"zimsum": "sum", "mimmin": "min", "mimmax": "max"}.get(agg, agg)
            full = across(series, model, lerp=agg in ("sum", "avg", "min", "max"))
            want = secs({t: v for t, v in full.items() if t >= BASE})
            if not want:   # every point in the bucket holding the start: the group answers, empty
                assert [o["dps"] for o in outs] == [{}]
                return
            [out] = outs
            assert list(out["dps"]) == list(want), (out["dps"], want)
            for k, w in want.items():
                assert math.isclose(out["dps"][k], w, rel_tol=1e-9, abs_tol=1e-9), (k, out["dps"], want)

        check()
    finally:
        loop.run_until_complete(close_env(e))
        loop.close()


# -- fuzz -----------------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3), max_leaves=6)


def sometimes(valid: st.SearchStrategy[Any], odd: st.SearchStrategy[Any] = _json) -> st.SearchStrategy[Any]:
    return st.one_of(valid, odd)


# plausible requests: every field drawn from what a client sends, so most examples reach the engine
_starts = st.sampled_from([S, S - 30, S + 15, BASE, str(S), "1h-ago", "3h-ago", "2h-ago", "10s-ago", f"{S}.5",
                           "2023/11/14-22:00", "1y-ago", 0])
_ends = st.sampled_from(["now", NOW // 1000, S + 60, S + 125, "30m-ago", NOW])
_downsamples = st.sampled_from(
    ["1m-avg", "10s-sum-nan", "0all-count", "1h-max-zero", "1ms-min-null", "7s-first", "1m-last-zero", "30s-mimmax",
     "1s-count-nan", "10s-avg-null", "20s-zimsum", "5x-avg", "1dc-sum", "1m-dev"])
_values = st.sampled_from(["*", "a|b", "a", "x", "Web*", "*0*", "regexp(^a)", "wildcard(*b)", "literal_or(a|c)",
                           "not_literal_or(a)", "f(x)", "regexp(("])
_filters = st.fixed_dictionaries(
    {"type": st.sampled_from(query.FILTER_TYPES), "tagk": st.sampled_from(["host", "dc", "none"]), "filter": _values},
    optional={"groupBy": st.booleans()})
_subs = st.fixed_dictionaries(
    {"metric": st.sampled_from(["net", "cpu", "mix", "cpu", "net", "nope"]),
     "aggregator": st.sampled_from(query.AGGREGATORS)},
    optional={"downsample": _downsamples, "rate": st.booleans(),
              "rateOptions": st.fixed_dictionaries({}, optional={
                  "counter": st.booleans(), "counterMax": st.integers(0, 2 ** 63 - 1),
                  "resetValue": st.integers(0, 100), "dropResets": st.booleans()}),
              "tags": st.dictionaries(st.sampled_from(["host", "dc", "x"]), _values, max_size=3),
              "filters": st.lists(_filters, max_size=3), "explicitTags": st.booleans()})
_plausible = st.fixed_dictionaries(
    {"start": _starts, "queries": st.lists(_subs, min_size=1, max_size=3)},
    optional={"end": _ends, "msResolution": st.booleans(), "timezone": st.sampled_from(["UTC", "Europe/Paris"])})
# anything: odd values anywhere
_odd = st.fixed_dictionaries(
    {"start": sometimes(_starts, st.one_of(st.integers(-10, 2 * 10 ** 13), st.text(max_size=12), _json, st.sampled_from(
        ["0all", "9" * 30, "99999999999999999999y-ago", "now"]))),
     "queries": sometimes(st.lists(sometimes(st.fixed_dictionaries(
         {"metric": sometimes(st.sampled_from(["net", "cpu", ""])), "aggregator": sometimes(st.sampled_from(
             query.AGGREGATORS))},
         optional={"downsample": sometimes(_downsamples, st.text(max_size=12) | _json),
                   "rate": sometimes(st.booleans()),
                   "rateOptions": _json, "tags": sometimes(st.dictionaries(st.text(max_size=4), _values | _json)),
                   "filters": sometimes(st.lists(sometimes(_filters))), "explicitTags": _json})), max_size=3))},
    optional={"end": sometimes(_ends), "msResolution": _json, "ms": _json, "delete": _json, "useCalendar": _json,
              "timezone": sometimes(st.sampled_from(["Nope/Zone", "../../etc/passwd", ""]))}) | _json
_m = st.sampled_from(
    ["sum:net", "avg:1m-avg:net{host=*}", "sum:rate{counter,10,1}:net{dc=x|y}{host=a}", "none:mix",
     "sum:0all-count:net", "max:explicit_tags:net{host=*}", "sum:rate:1m-sum-nan:cpu{host=regexp(a|b)}",
     "zimsum:10s-sum-zero:net", "count:cpu{host=a|b|c}", "min:30s-max:cpu{dc=*}{env=prod}"])
_odd_m = st.one_of(st.sampled_from(["sum:a:b:c{", "sum:{}", "x:y:z:w:v:u", "sum:net{host=a,,dc=x}"]),
                   st.text(alphabet=st.sampled_from("sum:avg1m-{}=,|*ahnetx()"), max_size=40), st.text(max_size=20))
_params = st.one_of(
    st.fixed_dictionaries({"start": _starts.map(str), "m": _m}, optional={"end": _ends.map(str)}),
    st.lists(st.tuples(st.sampled_from(["start", "end", "m", "m", "ms", "msResolution", "tz", "tsuid", "other"]),
                       st.one_of(_m, _odd_m, _starts.map(str))), max_size=6).map(MultiDict))


def test_fuzz_query_and_suggest_raise_only_client_errors(tmp_path: Path) -> None:
    """Any body or GET parameters: an answer or a ClientError (the door's 4xx), never another
    exception, never a hang. Each query has 60 s: the bounds let a query fill up to 10M cells
    (a year at 10 s buckets over a few series), seconds of work that a loaded CI machine can
    stretch well past 10 s; a hang is what this catches, not a slow answer."""
    loop = asyncio.new_event_loop()
    e = loop.run_until_complete(make_env(tmp_path / "db"))
    try:
        loop.run_until_complete(put_series(e))
        loop.run_until_complete(put_abc(e))
        loop.run_until_complete(e.put([("mix", BASE, "s", {"host": "s"}), ("mix", BASE, True, {"host": "t"}),
                                       ("mix", BASE, 3, {"host": "a"})]))

        def run(given: Any) -> None:
            try:
                out = loop.run_until_complete(asyncio.wait_for(
                    query.run_query(e.broker, e.registry, e.config, given, NOW), 60))
            except ClientError:
                return
            assert isinstance(out, list) and all(set(o) == {"metric", "tags", "aggregateTags", "dps"} for o in out)

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_plausible)
        def post(given: Any) -> None:
            run(given)

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_odd)
        def post_odd(given: Any) -> None:
            run(given)

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_params)
        def get(params: Any) -> None:
            try:
                given = query.body_from_params(params)
            except ClientError:
                return
            run(given)

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.dictionaries(st.sampled_from(["type", "q", "max"]),
                               st.sampled_from(["metrics", "tagk", "tagv", "25", "0", "n"]) | st.text(max_size=6)))
        def suggestions(params: dict[str, str]) -> None:
            try:
                query.suggest(e.registry, params)
            except ClientError:
                pass

        post()
        post_odd()
        get()
        suggestions()
    finally:
        loop.run_until_complete(close_env(e))
        loop.close()


async def test_a_series_is_read_across_a_scale_event(env: Env) -> None:
    """UpdatePartitionCount moves a series to another partition: the query reads its partition
    under every layout, so points from before and after the event come back together."""
    half = len(A) // 2
    await env.put([("cpu", t, v, TAGS_A) for t, v in A[:half]])
    await env.broker.update_partition_count(STREAM, 3)
    env.config = env.broker.catalogue.get("default", STREAM)
    await env.put([("cpu", t, v, TAGS_A) for t, v in A[half:]])
    [out] = await env.query(body(sub("sum")))
    assert same(out["dps"], secs({t: float(v) for t, v in A})), out["dps"]


@pytest.mark.parametrize("counts", [(3,), (2, 8, 3), (3, 5)])
async def test_a_timestamp_written_again_after_scale_events_keeps_the_last_write(env: Env,
                                                                               counts: tuple[int, ...]) -> None:
    """The last write of a timestamp wins, also across layouts: partitions were read in partition
    order and the last one read won, so after a scale-down (8 -> 3: partition 5, then 2) the older
    value came back. Sixteen series, so some move to a lower partition whatever the hash."""
    hosts = [{"host": f"h{i}"} for i in range(16)]
    await env.put([("dup", BASE, 0, tags) for tags in hosts])
    for value, n in enumerate(counts, 1):
        await env.broker.update_partition_count(STREAM, n)
        env.config = env.broker.catalogue.get("default", STREAM)
        await env.put([("dup", BASE, value, tags) for tags in hosts])
    out = await env.query(body(sub("none", metric="dup")))
    assert len(out) == 16 and all(o["dps"] == {str(S): len(counts)} for o in out), out


async def test_a_sum_past_the_double_range_is_infinity_not_null(env: Env) -> None:
    """orjson writes inf as null, which a fill's null cannot be told from; Jackson writes Infinity."""
    big = 1.7976931348623157e308
    await env.put([("huge", BASE, big, {"host": h}) for h in "ab"] + [("huge", BASE + 10_000, -big, {"host": h})
                                                                      for h in "ab"])
    [out] = await env.query(body(sub("sum", metric="huge")))
    assert out["dps"] == {str(S): "Infinity", str(S + 10): "-Infinity"}, out
    assert {str(S): big, str(S + 10): -big} in [o["dps"] for o in await env.query(body(sub("none", metric="huge")))]


async def test_the_registry_index_takes_in_series_learned_after_a_query(env: Env) -> None:
    """The by-metric index is made when a query asks, from the series learned since the last one."""
    reg = env.registry
    await reg.fix({series_key("idx.a", {"h": "1"}): NUMERIC})
    assert reg.metrics() == ["idx.a"]
    await reg.fix({series_key("idx.a", {"h": "2"}): STRING, series_key("idx.b", {"h": "1"}): BOOLEAN})
    assert reg.metrics() == ["idx.a", "idx.b"]
    assert sorted((s.tags["h"], s.type) for s in reg.series_of("idx.a")) == [("1", NUMERIC), ("2", STRING)]
    assert [(s.metric, s.key) for s in reg.series_of("idx.b")] == [("idx.b", series_key("idx.b", {"h": "1"}))]
    again = SeriesRegistry(env.broker, "default", env.config.stream_id)   # after a restart: from the store
    await again.load()
    assert again.metrics() == reg.metrics()
    assert sorted((s.key, s.type) for s in again.series_of("idx.a")) == \
        sorted((s.key, s.type) for s in reg.series_of("idx.a"))


async def test_indexing_many_new_series_leaves_the_loop_to_other_requests(env: Env) -> None:
    """The first query after a put of many new series indexes them in chunks, the event loop's
    other work running between (in one go, 400,000 series held the loop ~1 s)."""
    reg = env.registry
    n = 3 * INDEX_CHUNK + 5
    await reg.fix({series_key("many", {"h": str(i)}): NUMERIC for i in range(n)})
    turns = 0

    async def other_request() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_request())
    await asyncio.sleep(0)
    before = turns
    await reg.indexed()
    other.cancel()
    assert turns - before >= 3, turns - before   # one turn at least between the four chunks
    assert len(reg.series_of("many")) == n and reg.metrics() == ["many"]
    await env.put([("many", BASE, 1, {"h": "7"})])
    [out] = await env.query(body(sub("count", metric="many")))
    assert out["aggregateTags"] == [] and out["tags"] == {"h": "7"} and out["dps"] == {str(S): 1}, out


async def test_matching_many_filters_leaves_the_event_loop_turning(env: Env) -> None:
    """A query may hold 64 sub-queries of any number of tag filters: 64 x 100 regexp filters took
    ~0.8 s of matching, all of it on the event loop (a /healthz ping over HTTP waited 0.79 s).
    The matching of a sub-query with real work is done off the loop."""
    await env.put([("cpu", BASE + i, i, {"host": f"h{i}"}) for i in range(50)])
    # matching no series: nothing is read, so no sub-query awaited anything and the loop never turned
    filters = [{"type": "regexp", "tagk": "host", "filter": f"^x[0-9]*{i % 10}$|^y"} for i in range(100)]
    async with loop_turns() as turns:
        outs = await env.query(body(*[sub("sum", filters=filters)] * 64))
    assert outs == []
    # on the loop, the matching ran in one go and the ticker woke once, after it
    assert turns[0] >= 3, turns
