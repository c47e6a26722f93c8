"""A movable wall clock for a broker under test: with SLUICE_TEST_CLOCK_FILE set, time.time and
time.time_ns are shifted by the hours that file holds, re-read on SIGUSR1 (monotonic clocks are
not). Imported by Python's `site` at start-up when this directory is on PYTHONPATH
(tests/e2e/test_group_edges.py): the broker's retention is then reached in seconds, not a day."""
import os
import signal
import time

_FILE = os.environ.get("SLUICE_TEST_CLOCK_FILE")
if _FILE:
    _offset_ns = [0]
    _time_ns, _time = time.time_ns, time.time

    def _reload(*_: object) -> None:
        try:
            with open(_FILE) as f:
                _offset_ns[0] = int(float(f.read().strip() or 0) * 3600 * 1e9)
        except FileNotFoundError:
            _offset_ns[0] = 0

    _reload()
    time.time_ns = lambda: _time_ns() + _offset_ns[0]
    time.time = lambda: _time() + _offset_ns[0] / 1e9
    signal.signal(signal.SIGUSR1, _reload)
