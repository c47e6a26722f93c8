"""Closing a nats-py connection for good, for the two owners of one (the JetStream store and the
NATS sources)."""
from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client


async def close_for_good(nc: Client, wait_s: float) -> None:
    """nats-py's close(), waited for at most `wait_s`; then its socket closed whatever happened.
    nats-py marks itself closed and then yields before it closes its transport, so a close that
    runs out of time or is cancelled (a stop that gives up, a second cancel) would leave the socket
    open for good: it would outlive its owner and its event loop."""
    try:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(wait_s):
                await nc.close()
    finally:
        transport = getattr(nc, "_transport", None)   # nats-py's, private: only ever closed here
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
