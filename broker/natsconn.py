"""Opening and closing nats-py connections without leaving a socket behind, for the two owners of
one (the JetStream store and the NATS sources)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Coroutine

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


async def connect_or_give_up(connect: Coroutine[Any, Any, None], give_up: asyncio.Event | None,
                             timeout_s: float | None, wait_s: float) -> bool:
    """Run nats-py's `connect` until it ends, `give_up` is set (a TLS handshake refused: nats-py
    would retry it for ever, and no retry will pass it) or `timeout_s` passes. True once connected;
    its exception if it failed; False when given up or out of time.

    Whatever happens, nats-py is not left connecting in the background: a socket it opened after
    its owner gave up would outlive it. Python 3.11's wait_for, which nats-py uses, can swallow one
    cancellation when its connection was just made, so it is cancelled until it ends (at most
    `wait_s`: nats-py can hang in its own clean-up after a failed TLS handshake). A cancellation of
    the caller meanwhile is raised once that is over, never swallowed."""
    connecting = asyncio.ensure_future(connect)
    fatal = asyncio.ensure_future(give_up.wait()) if give_up is not None else None
    try:
        either: set[asyncio.Future[Any]] = {connecting} if fatal is None else {connecting, fatal}
        done, _ = await asyncio.wait(either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if connecting in done:
            connecting.result()
            return True
        return False
    finally:
        if fatal is not None:
            fatal.cancel()
        cancelled = False
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_s
        while not connecting.done() and loop.time() < until:
            connecting.cancel()
            try:
                await asyncio.wait({connecting}, timeout=0.1)
            except asyncio.CancelledError:
                cancelled = True
        if connecting.done() and not connecting.cancelled():
            connecting.exception()   # retrieved: its failure is the caller's to tell (last_error)
        if cancelled:
            raise asyncio.CancelledError


def nats_identity(info: dict[str, Any]) -> frozenset[str]:
    """A NATS server's identity from its INFO: its id, and its cluster's name (any node of the
    cluster reaches the same streams)."""
    out = {f"server {info['server_id']}"} if info.get("server_id") else set()
    if info.get("cluster"):
        out.add(f"cluster {info['cluster']}")
    return frozenset(out)
