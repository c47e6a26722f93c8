"""BrokerStats: the counters of a deleted stream go with it, and stay gone."""
from __future__ import annotations

from broker.core.stats import FORGOTTEN_REMEMBERED, BrokerStats


def test_a_request_in_flight_when_its_stream_went_leaves_no_counters_behind() -> None:
    stats = BrokerStats()
    stats.appended(7, 0, 3, 30)
    stats.forget(7)
    # a read and a put that were under way when the delete came finish after it
    stats.read(7, 1, 5, 50)
    stats.get_request(7, 0.01)
    stats.put_request(7, 0.01)
    assert 7 not in stats.streams
    stats.read(8, 0, 1, 10)                         # another stream counts as ever
    assert stats.streams[8].get_records == [1]


def test_only_the_latest_forgotten_ids_are_kept() -> None:
    stats = BrokerStats()
    for sid in range(FORGOTTEN_REMEMBERED + 10):
        stats.forget(sid)
    assert len(stats._forgotten) == FORGOTTEN_REMEMBERED
    stats.read(0, 0, 1, 1)                           # long forgotten: counted (no request lives that long)
    assert 0 in stats.streams and FORGOTTEN_REMEMBERED + 9 not in stats.streams
