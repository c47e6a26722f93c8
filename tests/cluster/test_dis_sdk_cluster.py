"""The official DIS SDK end-to-end suite (tests/e2e/test_dis_sdk.py, unchanged) through either broker
of a 3-node JetStream cluster (R=3): the `broker` fixture of tests/cluster/conftest.py runs each of
its tests through broker a, then broker b. Left out: the one test that starts a broker of its own
(`--store memory`)."""
from __future__ import annotations

from tests.e2e import test_dis_sdk as _suite

_LEFT_OUT = {"test_list_streams_pages_in_name_order"}

filled = _suite.filled   # the suite's fixture, collected here too
for _name in dir(_suite):
    if _name.startswith("test_") and _name not in _LEFT_OUT:
        globals()[_name] = getattr(_suite, _name)
