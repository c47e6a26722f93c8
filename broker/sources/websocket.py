"""`websocket`: a client of a WebSocket server; every message it receives becomes a row
(shared/spec/sources.md section 3). Library: `websockets` (its asyncio client).

One job run is one connection: connect (opening handshake bounded by `OPEN_TIMEOUT_S`), show
`running`, send `open_message` once, then read and write until the connection ends. When it
ends (the server closed it, went away, stopped answering pings) the run raises, the manager shows
`failed` with the reason and runs a new job after its capped, jittered backoff, which connects
again and sends `open_message` again: once per connection, never twice on one. A connection that
stayed up for a while resets the backoff (manager.HEALTHY_S); one the server drops at once is
retried ever more slowly instead of being hammered.

Reading and writing overlap: a reader task moves messages into an `_Inbox` (bounded in bytes, so
a fast server is slowed by TCP, not buffered without end) while the job appends what has arrived
in batches (at most `BATCH_MESSAGES` messages / `BATCH_BYTES`): whatever is waiting is taken at
once, a lone message is written at once (no linger). Messages received before the connection
ended are still written before the run raises.

Every message is taken as bytes (text and binary frames alike, not decoded by the library): with
`data_type: json` it must be one JSON object, with `text` it must be UTF-8; the sink counts and
skips the ones that are not (an invalid text frame does not cost the connection). A message over
`MAX_MESSAGE_FACTOR` x the broker's record limit makes the library close the connection (1009);
a smaller one whose row is over the limit is counted and skipped by the sink.

Properties [spec section 3, ours where noted]: `url` (ws:// or wss://; wss uses the default SSL
context), `data_type` (json | text), `open_message` (a string; with `open_message_type: json` also
an object or array, sent as its JSON text; an empty string means none [ours]),
`open_message_type` (text | binary | json, default text; binary sends the string's UTF-8 bytes as
a binary frame, json a text frame, a string given for json must be valid JSON [ours]; an object or
array is nested at most `MAX_OPEN_MESSAGE_DEPTH` levels [ours]).
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, cast

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidURI, WebSocketException
from websockets.uri import parse_uri

from broker.sources.base import JobContext, SourceType
from broker.sources.props import MAX_TEXT, Props, bad, shown_url
from broker.sources.sink import DATA_TYPES

OPEN_MESSAGE_TYPES = ("text", "binary", "json")
OPEN_TIMEOUT_S = 10.0      # the opening handshake, TCP and TLS included
PING_INTERVAL_S = 20.0     # a dead server (no pong within PING_TIMEOUT_S) ends the connection
PING_TIMEOUT_S = 20.0
CLOSE_TIMEOUT_S = 2.0      # the closing handshake on stop: bounded well inside the manager's wait
MAX_MESSAGE_FACTOR = 2     # messages up to 2 x the record limit are received (and skipped if too big)
BATCH_MESSAGES = 1000      # one append at most
BATCH_BYTES = 1024 * 1024
INBOX_BYTES = 4 * 1024 * 1024   # received and not yet written; beyond it the reader waits
# an open_message object's nesting, at most [ours]: the definition is shown inside more levels (GET
# /sources: a list of sources, each with its properties), and orjson writes no more than 255 in all
MAX_OPEN_MESSAGE_DEPTH = 100


@dataclass(frozen=True)
class WebSocketConfig:
    url: str
    data_type: str
    open_message: str | bytes | None   # bytes: sent as a binary frame


def configure(props: Props) -> WebSocketConfig:
    url = props.url("url", ("ws", "wss"))
    try:
        parse_uri(url)   # what the library itself will refuse (a fragment, credentials it cannot send)
    except InvalidURI as e:   # its text holds the URL: as every role may read it, passwords masked
        raise bad("url", str(e).replace(url, shown_url(url))) from None
    data_type = props.choice("data_type", DATA_TYPES, required=True)
    message_type = props.choice("open_message_type", OPEN_MESSAGE_TYPES, default="text")
    open_message = _open_message(props.raw("open_message"), message_type)
    props.finish()
    return WebSocketConfig(url, data_type, open_message)


def _open_message(value: Any, message_type: str) -> str | bytes | None:
    if value is None or value == "":
        return None
    if message_type == "json":
        if _depth(value) > MAX_OPEN_MESSAGE_DEPTH:   # before orjson: it refuses past 255 levels alone
            raise bad("open_message", f"is nested more than {MAX_OPEN_MESSAGE_DEPTH} levels deep")
        if isinstance(value, str):
            try:
                orjson.loads(value)
            except orjson.JSONDecodeError as e:
                raise bad("open_message", f"is not valid JSON ({e}); with open_message_type json give an "
                                          "object, an array or a JSON text") from None
            text = value
        else:
            try:
                text = orjson.dumps(value).decode()
            except orjson.JSONEncodeError as e:   # nested deeper than orjson writes (it reads deeper)
                raise bad("open_message", f"cannot be written as JSON ({e})") from None
    elif isinstance(value, str):
        text = value
    else:
        raise bad("open_message", f"must be a string with open_message_type {message_type}; to send an "
                                  "object or array as JSON, set open_message_type to json")
    if len(text) > MAX_TEXT:
        raise bad("open_message", f"is longer than {MAX_TEXT} characters")
    return text.encode() if message_type == "binary" else text


def _depth(value: Any) -> int:
    """How many arrays and objects deep a JSON value is nested (a scalar: 0), without recursion."""
    deepest, level = 0, [(value, 1)]
    while level:
        v, d = level.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is not None:
            deepest = max(deepest, d)
            level.extend((c, d + 1) for c in children)
    return deepest


class _Inbox:
    """Messages received and not yet written, between the reader task and the writing job.
    Bounded in bytes (one message always fits); `end(error)` marks the connection over: what is
    inside is still taken, then `take` raises the error."""

    def __init__(self, cap_bytes: int) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._cap = cap_bytes
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._end: BaseException | None = None

    async def put(self, message: bytes) -> None:
        while self._bytes >= self._cap:
            self._writable.clear()
            await self._writable.wait()
        self._items.append(message)
        self._bytes += len(message)
        self._readable.set()

    def end(self, error: BaseException) -> None:
        self._end = error
        self._readable.set()

    async def take(self, max_messages: int, max_bytes: int) -> list[bytes]:
        """What is waiting (at least one message, waiting for it), up to the limits."""
        while not self._items:
            if self._end is not None:
                raise self._end
            self._readable.clear()
            await self._readable.wait()
        items = self._items
        first = items.popleft()
        batch, size = [first], len(first)
        while items and len(batch) < max_messages and size + len(items[0]) <= max_bytes:
            message = items.popleft()
            batch.append(message)
            size += len(message)
        self._bytes -= size
        if self._bytes < self._cap:
            self._writable.set()
        return batch


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


class WebSocketJob:
    def __init__(self, config: WebSocketConfig) -> None:
        self.config = config

    async def run(self, ctx: JobContext) -> None:
        url = shown_url(self.config.url)
        max_size = MAX_MESSAGE_FACTOR * ctx.sink.broker.limits.max_record_bytes
        try:
            ws = await connect(self.config.url, open_timeout=OPEN_TIMEOUT_S, ping_interval=PING_INTERVAL_S,
                               ping_timeout=PING_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S, max_size=max_size)
        except (OSError, WebSocketException) as e:   # refused, unreachable, timed out, not a WebSocket
            raise ConnectionError(f"cannot connect to {url}: {_why(e)}") from e
        reader: asyncio.Task[None] | None = None
        try:
            ctx.connected()
            if self.config.open_message is not None:
                await ws.send(self.config.open_message)
            inbox = _Inbox(INBOX_BYTES)
            reader = asyncio.create_task(self._read(ws, inbox), name=f"sluice-websocket-reader-{url}")
            while True:
                batch = await inbox.take(BATCH_MESSAGES, BATCH_BYTES)
                await ctx.sink.write(batch)
        except ConnectionClosed as e:
            raise ConnectionError(_lost(url, e)) from e
        finally:
            try:
                if reader is not None:
                    reader.cancel()
                    await asyncio.wait([reader])   # its end, not its outcome (it only feeds the inbox)
                await ws.close()   # bounded by CLOSE_TIMEOUT_S; at once when the connection is gone
            finally:
                # cut short (cancelled again: a shutdown right after a stop), the library leaves its
                # socket open for as long as the server does not answer the close frame
                if not ws.transport.is_closing():
                    ws.transport.abort()

    @staticmethod
    async def _read(ws: ClientConnection, inbox: _Inbox) -> None:
        try:
            while True:
                await inbox.put(cast(bytes, await ws.recv(decode=False)))
        except Exception as e:   # the connection ended (ConnectionClosed) or failed
            inbox.end(e)


def _lost(url: str, e: ConnectionClosed) -> str:
    if isinstance(e, ConnectionClosedOK):
        return f"the server at {url} closed the connection: {_why(e)}"
    return f"the connection to {url} was lost: {_why(e)}"


TYPE = SourceType("websocket", configure, WebSocketJob, lambda config: config.data_type)
