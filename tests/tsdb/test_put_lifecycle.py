"""`/api/put` across broker lifetimes and under concurrency, against real broker processes: a
series' value type survives a graceful restart and a crash; the tsdb stream is created by the
first put even when many race to make it, and recreated (with no series) after it was deleted;
concurrent requests cannot fix two types for one new series. Plus a hypothesis fuzz of the
route: no 5xx, no hang, counts that add up."""
from __future__ import annotations

import json
import string
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.launcher import BrokerProcess
from tests.tsdb.put_http import JSON_UTF8, check_json, details, points_of, put, request, stream_records

NOW_S = 1_700_000_000
Start = Callable[..., BrokerProcess]


def point(metric: str, value: Any, ts: int = NOW_S, **tags: str) -> dict[str, Any]:
    return {"metric": metric, "timestamp": ts, "value": value, "tags": tags or {"host": "a"}}


CONFLICTS = [  # (series, first value, a value of another type, the error it gets)
    ("life.long", 1, "x", "Unable to parse value to a number"),
    ("life.double", 1.5, True, "Value type mismatch: series holds double values"),
    ("life.bool", True, 2, "Value type mismatch: series holds boolean values"),
    ("life.string", "up", 3, "Value type mismatch: series holds string values"),
]


def check_types_held(proc: BrokerProcess, ts: int) -> None:
    for metric, first, other, error in CONFLICTS:
        assert details(put(proc, [point(metric, other, ts)], "?details")) == [error], metric
        assert put(proc, [point(metric, first, ts)]).status == 204, metric


def test_a_series_keeps_its_type_across_a_restart_and_a_crash(start_broker: Start, tmp_path: Path) -> None:
    data = tmp_path / "d"
    first = start_broker("--retention-interval", "3600", data_dir=data)
    assert put(first, [point(m, v) for m, v, _, _ in CONFLICTS]).status == 204
    assert first.stop() == 0
    again = start_broker("--retention-interval", "3600", data_dir=data)
    check_types_held(again, NOW_S + 1)
    # a series first seen just before a crash keeps its type too (fixed before its point went in)
    assert put(again, [point("life.late", "text")]).status == 204
    again.kill()
    third = start_broker("--retention-interval", "3600", data_dir=data)
    check_types_held(third, NOW_S + 2)
    assert details(put(third, [point("life.late", 5, NOW_S + 2)], "?details")) == [
        "Value type mismatch: series holds string values"]
    assert [p["value"] for p in points_of(third, "life.long")] == [1, 1, 1]


def test_a_deleted_stream_is_recreated_by_the_next_put_with_no_series(start_broker: Start, tmp_path: Path) -> None:
    proc = start_broker("--retention-interval", "3600", "--tsdb-port", "0", data_dir=tmp_path / "d")
    assert put(proc, [point("del.m", 1)]).status == 204
    assert request(proc, "DELETE", "/v2/default/streams/tsdb").status == 204
    # the stream is new: the series has no type yet, a string goes in (via the other port, too)
    assert put(proc, [point("del.m", "x")], port=proc.tsdb_port).status == 204
    assert [p["value"] for p in points_of(proc, "del.m")] == ["x"]
    assert details(put(proc, [point("del.m", 2)], "?details")) == ["Value type mismatch: series holds string values"]
    # and after a restart the new incarnation's types are the ones kept
    assert proc.stop() == 0
    proc = start_broker("--retention-interval", "3600", data_dir=tmp_path / "d")
    assert details(put(proc, [point("del.m", 2)], "?details")) == ["Value type mismatch: series holds string values"]


def test_concurrent_first_puts_make_one_stream_and_lose_nothing(start_broker: Start, tmp_path: Path) -> None:
    proc = start_broker("--retention-interval", "3600", data_dir=tmp_path / "d")
    producers, per = 12, 40
    barrier = threading.Barrier(producers)
    statuses: list[int] = []

    def produce(k: int) -> None:
        barrier.wait()
        reply = put(proc, [point("race.m", i, NOW_S + i, host=f"p{k}") for i in range(per)])
        statuses.append(reply.status)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [204] * producers
    streams = request(proc, "GET", "/v2/default/streams").json["stream_names"]
    assert streams == ["tsdb"]
    assert len(points_of(proc, "race.m")) == producers * per


def test_racing_requests_cannot_fix_two_types_for_one_new_series(start_broker: Start, tmp_path: Path) -> None:
    proc = start_broker("--retention-interval", "3600", data_dir=tmp_path / "d")
    assert put(proc, [point("warm.up", 1)]).status == 204   # the stream exists: the race is on the types
    values: list[Any] = [1, "s", True, 2.5, "t", False] * 3
    barrier = threading.Barrier(len(values))
    results: dict[int, int] = {}

    def produce(k: int) -> None:
        barrier.wait()
        results[k] = put(proc, [point("race.types", values[k], NOW_S + k)]).status

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(len(values))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stored = points_of(proc, "race.types")
    kinds = {type(p["value"]) if not isinstance(p["value"], (int, float)) or isinstance(p["value"], bool)
             else float for p in stored}
    assert len(kinds) == 1, stored   # one type (long and double are one)
    assert sum(s == 204 for s in results.values()) == len(stored)
    assert set(results.values()) <= {204, 400}


# -- fuzz -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path_factory.mktemp("tsdb-fuzz") / "data", "--retention-interval", "3600").start()
    yield proc
    proc.stop(30)


NAMES = st.text(alphabet=string.ascii_letters + string.digits + "-_./():,[]=' +*温度カé\u3000\x00\"\\", max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**64, max_value=2**64),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                    st.sampled_from(["NaN", "1.5", "+5", "1_000", "", "5", "-0", "1e400", "Infinity"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)
TIMESTAMPS = st.one_of(st.sampled_from([4284767, 4284768, 9999999999, 10000000000, 9999999999999, 10000000000000,
                                        0, -1, NOW_S, NOW_S * 1000]),
                       st.integers(min_value=-2**64, max_value=2**64), JSON_VALUES)
TAGS = st.one_of(st.dictionaries(NAMES, st.one_of(NAMES, SCALARS), max_size=18), JSON_VALUES)
# mostly good points on a few series (with values of every type: conflicts), and wild ones
GOOD_POINTS = st.fixed_dictionaries({
    "metric": st.sampled_from(["fz.a", "fz.b", "fz.c"]), "timestamp": st.sampled_from([NOW_S, NOW_S * 1000 + 1]),
    "value": st.one_of(st.integers(-5, 5), st.floats(-1, 1), st.booleans(), st.sampled_from(["up", "1.5", "NaN"])),
    "tags": st.sampled_from([{"h": "a"}, {"h": "b"}, {"h": 1}, {"h": "1"}])})
WILD_POINTS = st.fixed_dictionaries({}, optional={
    "metric": st.one_of(st.sampled_from(["fz.a", "fz.b", "fz.c"]), NAMES, JSON_VALUES),
    "timestamp": TIMESTAMPS,
    "value": st.one_of(SCALARS, JSON_VALUES, st.builds(lambda n, c: c * (n // len(c.encode())),
                                                       st.integers(20470, 20490), st.sampled_from(["x", "温", "é"]))),
    "tags": st.one_of(st.sampled_from([{"h": "a"}, {"h": "b"}, {"h": 1}]), TAGS)})
POINTS = st.one_of(GOOD_POINTS, WILD_POINTS)
BODIES = st.one_of(st.lists(POINTS, max_size=12).map(lambda ps: json.dumps(ps).encode()),
                   POINTS.map(lambda p: json.dumps(p).encode()),
                   JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                   st.binary(max_size=40),
                   st.sampled_from([b"[NaN]", b'[{"value":Infinity}]', b"[", b"", b"[]"]))
QUERIES = st.sampled_from(["", "?summary", "?details", "?summary&details", "?details=false", "?sync",
                           "?sync_timeout=100000&details", "?sync_timeout=x", "?sync_timeout=-5&summary",
                           "?ignoreErrors&summary", "?%ZZ&details", "?&&=&details", "?summary=%E6%B8%A9"])


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, query=QUERIES, path=st.sampled_from(["/api/put", "/api/put/"]))
def test_fuzz_put_never_5xx_never_hangs(fuzz_broker: BrokerProcess, body: bytes, query: str, path: str) -> None:
    reply = put(fuzz_broker, None, query, raw=body, path=path)   # 60 s socket timeout: a hang fails
    assert reply.status in (200, 204, 400), (reply.status, reply.raw[:300])
    if reply.status == 204:
        assert reply.raw == b""
        return
    assert reply.headers["Content-Type"] == JSON_UTF8
    answer = json.loads(reply.raw)
    if "success" in answer:
        parsed = json.loads(body)
        n = len(parsed) if isinstance(parsed, list) else 1
        assert answer["success"] + answer["failed"] == n
        if "errors" in answer:
            assert len(answer["errors"]) == answer["failed"]
    else:
        assert reply.status == 400 and answer["error"]["code"] == 400 and answer["error"]["message"]


def test_the_fuzzed_broker_still_answers_and_kept_one_type_per_series(fuzz_broker: BrokerProcess) -> None:
    assert check_json(put(fuzz_broker, [point("fz.after", 1)], "?summary"), 200) == {"success": 1, "failed": 0}
    kinds: dict[str, set[str]] = {}
    for _, rec, _ in stream_records(fuzz_broker):
        v = rec["value"]
        kind = "boolean" if isinstance(v, bool) else "numeric" if isinstance(v, (int, float)) else "string"
        kinds.setdefault(json.dumps([rec["metric"], sorted(rec["tags"].items())]), set()).add(kind)
    assert all(len(k) == 1 for k in kinds.values()), {s: k for s, k in kinds.items() if len(k) > 1}
    assert sum(1 for s in kinds if s.startswith('["fz.')) >= 4, kinds   # the fuzz did store points
