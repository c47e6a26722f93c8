"""glibc's allocator, the two knobs the broker turns: fewer arenas, and freed memory returned.

Both are no-ops where the C library is not glibc (musl, macOS): there, `mallopt`/`malloc_trim`
do not exist and the allocator has no per-thread arenas to cap.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

_M_ARENA_MAX = -8   # glibc malloc.h


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def limit_arenas(arenas: int) -> None:
    """Cap glibc's per-thread malloc arenas before gRPC and RocksDB start their threads.

    With the default (8 per core) every worker thread that touches a multi-MiB request gets an arena
    of its own, and freed memory stays fragmented across them: a stalled-subscriber test grew RSS by
    ~140 MB with the default against ~70 MB with two arenas, at the same throughput.
    """
    libc = _libc()
    if arenas > 0 and libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, arenas)


def trim() -> bool:
    """Give the pages of freed memory back to the OS (glibc keeps them in its heaps). A query
    decoding big batches frees tens of MiB at a time, which glibc would otherwise hold: with a
    query over 100,000 keys RSS kept rising ~1.5 MiB/min faster than the same ingest alone, with
    the live heap flat. Returns whether it could."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
