"""What a broker process sets for itself (`__main__`): its open-files limit, and how its event
loop reports connections it cannot accept.

Every connection, RocksDB file and NATS connection is a file descriptor. Under a soft limit of
1,024 (systemd's usual default) a few hundred clients used them up, and then RocksDB could not open
its next log file and writes failed (the durability probe). The soft limit is raised to the hard
one, as servers such as nats-server do; a limit still low is said at startup.

Out of descriptors, asyncio reports each accept it cannot make with a traceback: tens of
thousands of lines in seconds, a flood that can fill a disk by itself. They are logged once per
ACCEPT_ERROR_EVERY_S here, with how many were left out.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

log = logging.getLogger("sluice")

WANTED_OPEN_FILES = 1 << 20   # more than any broker needs; the hard limit may be lower
LOW_OPEN_FILES = 4096         # below this, a warning at startup
ACCEPT_ERROR_EVERY_S = 10.0
_ACCEPT_ERROR = "socket.accept() out of system resource"


def raise_open_files_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit (at most WANTED_OPEN_FILES); returns the
    soft limit now, after a warning if it is still low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            try:   # an unlimited hard limit still stops at the kernel's fs.nr_open
                with open("/proc/sys/fs/nr_open") as f:
                    wanted = min(wanted, int(f.read()))
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                log.warning("could not raise the open-files limit from %d to %d: %s", soft, wanted, exc)
    if soft != resource.RLIM_INFINITY and soft < LOW_OPEN_FILES:
        log.warning("the open-files limit is %d: every connection and store file takes one, and a few hundred "
                    "clients can use them up; raise it (ulimit -n, LimitNOFILE= in a systemd unit)", soft)
    return soft


class LoopErrors:
    """The event loop's exception handler: accept failures (no descriptor left) at most once per
    ACCEPT_ERROR_EVERY_S, without a traceback; everything else as asyncio reports it."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._last = float("-inf")
        self.left_out = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith(_ACCEPT_ERROR):
            loop.default_exception_handler(context)
            return
        now = self._clock()
        if now - self._last < ACCEPT_ERROR_EVERY_S:
            self.left_out += 1
            return
        log.error("cannot accept connections: %s (%d more such failures since the last line; each listener "
                  "tries again every second)", context.get("exception"), self.left_out)
        self._last, self.left_out = now, 0
