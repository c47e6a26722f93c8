"""broker/malloc.py's collector setting (the allocator's knobs are exercised by tests/e2e)."""
from __future__ import annotations

import gc

from broker import malloc


def test_settle_gc_sets_startup_aside_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        malloc.settle_gc(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 10_000          # the interpreter and what it imported
        assert malloc.GC_YOUNG_THRESHOLD > 700         # CPython's default, which the put path outgrows
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
