"""`--tsdb-workers` (broker/tsdb/workers.py): /api/put bodies parsed, checked and sorted into
partitions in worker processes must give exactly the answers and the stored records of the
in-process path. Differential: every request goes to a broker with two workers and to one
without, in the same order, and the replies (status, body) and what each stored must be equal.
Then the guarantees: the workers do the work (their CPU time grows); acknowledged points survive a
SIGKILL of the broker with their series' types; a worker that dies is replaced and costs that put
nothing but the hop; the workers go away with the broker, SIGKILL included."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.launcher import BrokerProcess
from broker.tsdb.workers import OFFLOAD_BYTES
from tests.tsdb.put_http import Reply, details, points_of, put, request, stream_records

NOW_S = 1_700_000_000
Start = Callable[..., BrokerProcess]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def workers_of(proc: BrokerProcess) -> list[int]:
    assert proc.proc is not None
    out = subprocess.run(["pgrep", "-P", str(proc.proc.pid), "-f", "broker.tsdb.workers"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, BrokerProcess]]:
    """(inline, pooled): the same broker without and with two tsdb workers."""
    inline = BrokerProcess(tmp_path_factory.mktemp("inline") / "data", "--retention-interval", "3600").start()
    pooled = BrokerProcess(tmp_path_factory.mktemp("pooled") / "data", "--retention-interval", "3600",
                           "--tsdb-workers", "2").start()
    yield inline, pooled
    inline.stop(30)
    pooled.stop(30)


def both(pair: tuple[BrokerProcess, BrokerProcess], send: Callable[[BrokerProcess], Reply]) -> Reply:
    a, b = send(pair[0]), send(pair[1])
    assert (a.status, a.raw) == (b.status, b.raw), (a.status, a.raw[:400], b.status, b.raw[:400])
    return b


def point(metric: str, value: Any, ts: int = NOW_S, **tags: Any) -> dict[str, Any]:
    return {"metric": metric, "timestamp": ts, "value": value, "tags": tags or {"host": "a"}}


def big(points: list[dict[str, Any]], metric: str, n: int = 400) -> list[dict[str, Any]]:
    """`points` followed by valid filler points of `metric` (n series), so the body is over OFFLOAD_BYTES."""
    out = points + [point(metric, i, host=f"h{i}", dc="dc1") for i in range(n)]
    assert len(json.dumps(out)) >= OFFLOAD_BYTES
    return out


# -- /api/put ---------------------------------------------------------------------------------------

def test_valid_points_answer_and_store_the_same(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    body = big([], "pool.valid")
    for query in ("", "?summary", "?details"):
        both(pair, lambda b, q=query: put(b, body, q))
    # a second round of the same series (known types) and a float round
    both(pair, lambda b: put(b, [dict(p, value=p["value"] + 0.5, timestamp=NOW_S + 1) for p in body], "?details"))
    assert points_of(pair[0], "pool.valid") == points_of(pair[1], "pool.valid")
    assert len(points_of(pair[1], "pool.valid")) == 4 * 400


def test_point_errors_and_type_conflicts_answer_the_same(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    seed = [point("pool.long", 1), point("pool.double", 1.5), point("pool.bool", True), point("pool.str", "up")]
    both(pair, lambda b: put(b, big(seed, "pool.conf"), "?details"))
    bad = [
        point("pool.long", "x"),               # Unable to parse value to a number
        point("pool.double", True),            # type mismatch
        point("pool.bool", 2),
        point("pool.str", 3),
        {"metric": "pool.bad", "timestamp": NOW_S, "value": 1, "tags": {}},      # Missing tags
        {"metric": "pool bad", "timestamp": NOW_S, "value": 1, "tags": {"a": "b"}},
        {"metric": "pool.bad", "timestamp": 12, "value": 1, "tags": {"a": "b"}},
        point("pool.bad", None),
        point("pool.bad", {"x": 1}),
        "not a point",
        point("pool.long", 7),                 # fine: long series
        point("pool.double", 7),               # fine: long and double mix
    ]
    for query in ("", "?summary", "?details"):
        reply = both(pair, lambda b, q=query: put(b, big(bad, "pool.conf"), q))
        assert reply.status == 400
    assert details(reply)[:4] == [
        "Unable to parse value to a number", "Value type mismatch: series holds double values",
        "Value type mismatch: series holds boolean values", "Value type mismatch: series holds string values"]
    for metric in ("pool.long", "pool.double", "pool.bool", "pool.str", "pool.conf"):
        assert points_of(pair[0], metric) == points_of(pair[1], metric), metric


def test_a_new_series_with_two_types_in_one_body_answers_the_same(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    mixed = [point("pool.mixed", 1, host="m"), point("pool.mixed", "text", host="m"),
             point("pool.mixed", 2.5, host="m"), point("pool.mixed2", True, host="m"),
             point("pool.mixed2", False, host="m"), point("pool.mixed2", "no", host="m")]
    reply = both(pair, lambda b: put(b, big(mixed, "pool.mix"), "?details"))
    assert [e["error"] for e in reply.json["errors"]] == ["Unable to parse value to a number",
                                                          "Value type mismatch: series holds boolean values"]
    assert points_of(pair[0], "pool.mixed") == points_of(pair[1], "pool.mixed")


def test_body_level_errors_answer_the_same(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    pad = b" " * OFFLOAD_BYTES
    for raw in (pad, b"[" + pad + b"]", b"{" + pad, b"42" + pad, b'"text"' + pad,
                json.dumps(point("pool.one", 1)).encode() + pad,   # one object: a point
                json.dumps(big([], "pool.nan"))[:-1].encode() + b', {"value": NaN}]'):
        reply = both(pair, lambda b, r=raw: put(b, None, "?details", raw=r))
        assert reply.status in (204, 400, 200), reply.raw[:200]


def test_gzipped_bodies_answer_the_same(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    body = big([point("pool.gz", "x", host="z"), point("pool.gz", 1, host="z")], "pool.gzip")
    both(pair, lambda b: put(b, body, "?details", gzipped=True))


def test_oversized_tags_and_a_scaled_stream_answer_the_same(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    """A point with a tag value over its limit is refused before its type is fixed; after the
    tsdb stream is scaled the points are sorted for the new layout (the worker's grouping for the
    old one is done again in the broker)."""
    huge = point("pool.huge", 1, host="h" * 1_100_000)   # tags longer than a record may be (1 MiB)
    reply = both(pair, lambda b: put(b, big([huge, point("pool.huge", "s", host="ok")], "pool.hg"), "?details"))
    assert details(reply)[0] == "Tag value too long"
    for proc in pair:
        scaled = request(proc, "PUT", "/v2/default/streams/tsdb", json.dumps(
            {"stream_name": "tsdb", "target_partition_count": 12}).encode())
        assert scaled.status < 300, scaled.raw
    for r in range(3):
        both(pair, lambda b, r=r: put(b, [dict(p, timestamp=NOW_S + 100 + r) for p in big([], "pool.scaled")]))
    assert points_of(pair[0], "pool.scaled") == points_of(pair[1], "pool.scaled")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])   # utime + stime


def test_the_workers_do_the_work(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    """Puts of known series are checked and sorted in the workers: their CPU time grows by a good
    part of what the same puts cost the broker without workers."""
    workers = workers_of(pair[1])
    assert len(workers) == 2
    body = big([], "pool.cpu", n=2000)
    put(pair[1], body)   # series known from here on
    before = sum(map(cpu_ticks, workers))
    for r in range(40):
        assert put(pair[1], [dict(p, timestamp=NOW_S + 200 + r) for p in body]).status == 204
    assert sum(map(cpu_ticks, workers)) - before >= 10, "the workers took no part (10 ms of CPU for 80,000 points)"


# -- the guarantees ---------------------------------------------------------------------------------

def test_acknowledged_points_and_types_survive_a_crash(start_broker: Start, tmp_path: Path) -> None:
    data = tmp_path / "d"
    first = start_broker("--tsdb-workers", "2", "--retention-interval", "3600", data_dir=data)
    acked = 0
    for r in range(5):
        body = big([point("crash.str", "text", NOW_S + r, host="s")], "crash.fill")
        body = [dict(p, timestamp=NOW_S + r) for p in body]
        assert put(first, body).status == 204
        acked += len(body)
    workers = workers_of(first)
    assert len(workers) == 2
    first.kill()
    deadline = time.monotonic() + 10   # the workers see EOF and exit: no orphans
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if alive(w)], "orphan tsdb workers"
    again = start_broker("--tsdb-workers", "2", "--retention-interval", "3600", data_dir=data)
    assert len(stream_records(again)) == acked
    put(again, big([], "crash.fill"))   # the registry is loaded: the next put goes to a worker
    # the types fixed through the worker path held across the crash
    reply = put(again, big([point("crash.str", 5, NOW_S + 9, host="s")], "crash.fill"), "?details")
    assert details(reply) == ["Value type mismatch: series holds string values"]


def test_a_dead_worker_is_replaced_and_costs_only_the_hop(start_broker: Start) -> None:
    proc = start_broker("--tsdb-workers", "1", "--retention-interval", "3600")
    put(proc, big([point("dead.str", "x", host="d")], "dead.fill"))
    (worker,) = workers_of(proc)
    os.kill(worker, signal.SIGKILL)
    time.sleep(0.2)
    for r in range(3):   # the first in the broker, then a new worker: the same answers
        body = [dict(p, timestamp=NOW_S + r) for p in big([point("dead.str", "x", host="d")], "dead.fill")]
        assert put(proc, body).status == 204
        reply = put(proc, big([point("dead.str", 1, NOW_S + r, host="d")], "dead.fill"), "?details")
        assert details(reply) == ["Value type mismatch: series holds string values"]
    assert len(points_of(proc, "dead.fill")) == 3 * 400 * 2 + 400
    (replacement,) = workers_of(proc)
    assert replacement != worker and alive(replacement)
    assert proc.stop(15) == 0


def test_a_graceful_stop_takes_the_workers_along(start_broker: Start) -> None:
    proc = start_broker("--tsdb-workers", "3")
    workers = workers_of(proc)
    assert len(workers) == 3
    assert proc.stop(15) == 0
    assert not [w for w in workers if alive(w)]


def test_a_partition_holds_the_points_in_array_order(pair: tuple[BrokerProcess, BrokerProcess]) -> None:
    """Points of series known when the body was sorted and of new ones, interleaved in one body:
    every partition stores them in the body's order, with workers and without (found in review:
    the known series' points went first)."""
    known = [point("order.known", i, NOW_S, host=f"k{i}") for i in range(300)]
    both(pair, lambda b: put(b, known))
    mixed: list[dict[str, Any]] = []
    for i in range(300):
        mixed += [point("order.new", i, NOW_S + 1, host=f"n{i}"), point("order.known", i, NOW_S + 1, host=f"k{i}")]
    both(pair, lambda b: put(b, mixed))
    order = [(p["metric"], p["tags"]["host"]) for p in mixed]
    for proc in pair:
        stored: dict[int, list[tuple[str, str]]] = {}
        partitions = request(proc, "GET", "/v2/default/streams/tsdb").json["readable_partition_count"]
        for partition, rec, _ in stream_records(proc, partitions=partitions):
            if rec["metric"].startswith("order.") and rec["timestamp"] == (NOW_S + 1) * 1000:
                stored.setdefault(partition, []).append((rec["metric"], rec["tags"]["host"]))
        assert sum(map(len, stored.values())) == 600
        assert sum(1 for rows in stored.values() if {m for m, _ in rows} == {"order.new", "order.known"}) >= 2
        for rows in stored.values():
            assert rows == sorted(rows, key=order.index)


_SCALAR = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
           | st.sampled_from(["NaN", "1e400", "-0", "", "5", "+5", "温度", "x" * 30_000]))
_FUZZ_POINT = st.fixed_dictionaries(
    {"metric": st.sampled_from(["fz.a", "fz.b", "fz c", "温度"]) | _SCALAR,
     "timestamp": st.sampled_from([NOW_S, NOW_S * 1000, 4_284_767, 10**13, 1.5, "1"]) | _SCALAR,
     "value": _SCALAR,
     "tags": st.sampled_from([{"h": "x"}, {"h": "y", "dc": "1"}, {}, {"h": 1}, {"h": ""}]) | st.dictionaries(
         st.text(max_size=4), _SCALAR, max_size=3)})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points=st.lists(_FUZZ_POINT | _SCALAR, min_size=1, max_size=6),
       query=st.sampled_from(["", "?summary", "?details"]))
def test_fuzzed_points_answer_and_store_the_same(pair: tuple[BrokerProcess, BrokerProcess], points: list[Any],
                                                 query: str) -> None:
    """Whatever the points (wild metrics, times, values, tags; the two brokers' series types move
    together), padded past OFFLOAD_BYTES so the pooled broker's worker takes them."""
    before = [ranges(proc) for proc in pair]
    reply = both(pair, lambda b: put(b, big(points, "fz.fill"), query))
    assert reply.status < 500
    # as many records added to each partition (reading them all back each time would take long:
    # the stream holds every earlier test's points; the other tests compare what is stored)
    added = [[b - a for a, b in zip_longest(old, ranges(proc), fillvalue=-1)] for old, proc in zip(before, pair)]
    assert added[0] == added[1]


def ranges(proc: BrokerProcess) -> list[int]:
    """The last sequence number of each partition of the tsdb stream ([] before it exists)."""
    reply = request(proc, "GET", "/v2/default/streams/tsdb")
    if reply.status != 200:   # not created yet
        assert reply.json["error_code"] == "DIS.4301", reply.raw
        return []
    return [int(p["sequence_number_range"].strip("[]").split(":")[1]) for p in reply.json["partitions"]]
