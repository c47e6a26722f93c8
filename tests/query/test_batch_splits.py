"""How records are split into batches never changes a query's result (windows included), nor
when the executor merges the partial aggregates of its batches into its state."""
from __future__ import annotations

from itertools import pairwise
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.query import compile_query, exec
from tests.query.helpers import lookup, row

T0 = 1_704_067_200_000
QUERIES = [
    "select s, i, i / 2 from t where i % 3 != 0",
    "select window_start, s, count(*), sum(i), avg(f), min(i), max(s), count_distinct(i % 4) "
    "from tumble(t, 3s) group by window_start, s",
    "select window_start, window_end, count(*), sum(i) from hop(t, 1s, 3s) group by window_start",
    "select s, count(*), sum(i), count_distinct(i) from table(t) group by s",
]

events = st.lists(st.tuples(st.integers(0, 20_000), st.sampled_from("abc"), st.integers(-5, 50)),
                  max_size=60)
# (MERGE_FRACTION, MERGE_MIN_ROWS, MERGE_MAX_PENDING): the defaults, and merging at every batch
# or after a few, with compaction of the pending partials
merging = st.sampled_from([(8, 4096, 64), (1, 1, 64), (2, 3, 2), (4, 5, 3)])


@settings(max_examples=100, deadline=None)
@given(events=events, cuts=st.lists(st.integers(0, 60), max_size=8),
       query=st.sampled_from(QUERIES), merge=merging)
def test_random_batch_splits_give_the_same_results(events: list, cuts: list[int], query: str,
                                                   merge: tuple[int, int, int]) -> None:
    records = [row(n, T0 + ms, s=s, i=i, f=i / 4) for n, (ms, s, i) in enumerate(events)]

    def run(batches: list) -> tuple[list, int]:
        ex = compile_query(query, lookup).executor()
        out = [r for b in batches for r in ex.feed(b, False)] + ex.finish()
        return out, ex.late_rows

    bounds = sorted({0, len(records), *(c for c in cuts if c < len(records))})
    split = [records[a:b] for a, b in pairwise(bounds)]
    whole = run([records])
    with mock.patch.multiple(exec, MERGE_FRACTION=merge[0], MERGE_MIN_ROWS=merge[1],
                             MERGE_MAX_PENDING=merge[2]):
        assert run(split) == whole
