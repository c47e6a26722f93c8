"""The `websocket` source (broker/sources/websocket.py) against real `websockets` servers on
loopback: in-process (a Broker over a RocksStore, the Sources manager) for the behaviour, and
through a broker process's Timeplus REST routes and DIS door for the wire.

No assertion depends on how fast anything happens: every wait is a poll with a generous deadline,
and "nothing more arrives" is checked against a connection known to be closed.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import re
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from broker.core.broker import Broker
from broker.core.limits import DEFAULT_LIMITS, Limits
from broker.launcher import BrokerProcess, free_port
from broker.model import ColumnDef, StreamSchema
from broker.rows.encode import RowEncoder
from broker.sources import websocket
from broker.sources.base import Backoff, JobContext
from broker.sources.manager import Sources
from broker.sources.model import SourceState
from broker.sources.props import Props
from broker.sources.sink import Sink
from broker.sources.websocket import _Inbox
from broker.storage.rocks import RocksStore

DEADLINE = 30.0
KV = StreamSchema((ColumnDef("k", "string"), ColumnDef("v", "int64")))
RAW = StreamSchema((ColumnDef("raw", "string"),))
PROJECT = "default"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455's, for an upgrade accepted by hand


async def until(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


# -- a WebSocket server on loopback ------------------------------------------------------------------

@dataclass
class Peer:
    """One connection the server accepted: what it received, whether it has ended."""
    ws: ServerConnection
    received: list[str | bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class WsServer:
    """Records every connection and what the client sent on it; can be stopped and started again
    on the same port. `ticker`: each connection is also sent a JSON row every 10 ms."""

    def __init__(self, ticker: bool = False) -> None:
        self.peers: list[Peer] = []
        self.port = 0
        self.ticker = ticker
        self._server: Server | None = None

    async def start(self, port: int | None = None, **kwargs: Any) -> WsServer:
        self._server = await serve(self._handle, "127.0.0.1", self.port if port is None else port, **kwargs)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()          # closes every connection (1001 going away)
        await self._server.wait_closed()
        self._server = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/feed"

    async def peer(self, n: int) -> Peer:
        """The n-th connection (1-based), once it is there."""
        await until(lambda: len(self.peers) >= n, f"connection {n} to the server")
        return self.peers[n - 1]

    async def _handle(self, ws: ServerConnection) -> None:
        peer = Peer(ws)
        self.peers.append(peer)
        ticker = asyncio.create_task(self._tick(ws)) if self.ticker else None
        try:
            async for message in ws:
                peer.received.append(message)
        except ConnectionClosed:
            pass
        finally:
            peer.closed.set()
            if ticker:
                ticker.cancel()

    @staticmethod
    async def _tick(ws: ServerConnection) -> None:
        n = 0
        try:
            while True:
                await ws.send(json.dumps({"k": "tick", "v": n}))
                n += 1
                await asyncio.sleep(0.01)
        except ConnectionClosed:
            pass


@pytest.fixture
async def server() -> AsyncIterator[WsServer]:
    srv = await WsServer().start()
    yield srv
    if srv._server is not None:
        await srv.stop()


# -- the broker in-process ------------------------------------------------------------------------------

@dataclass
class Env:
    broker: Broker
    sources: Sources

    async def create(self, name: str, stream: str, **properties: Any) -> SourceState:
        source = await self.sources.create(PROJECT, {"name": name, "type": "websocket", "stream": stream,
                                                     "properties": properties})
        assert source.definition.type == "websocket"
        return source.state

    async def records(self, stream: str) -> list[bytes]:
        out: list[bytes] = []
        cursor = await self.broker.get_cursor(stream, 0, "TRIM_HORIZON", project=PROJECT)
        while True:
            got = await self.broker.get_records(cursor, project=PROJECT)
            if not got.records:
                return out
            out += [r.data for r in got.records]
            cursor = got.next_cursor

    async def query(self, sql: str) -> list[list[Any]]:
        run = await self.broker.queries.start(PROJECT, sql)
        rows: list[list[Any]] = []
        while (item := await asyncio.wait_for(run.results.get(), DEADLINE)) is not None:
            rows += item
        assert run.status == "finished", run.message
        return rows


@contextlib.asynccontextmanager
async def running_broker(path: Path, limits: Limits = DEFAULT_LIMITS) -> AsyncIterator[Env]:
    store = RocksStore(str(path))
    broker = Broker(store, cursor_secret=b"websocket-test", limits=limits)
    await broker.start()
    sources = Sources(broker)
    await sources.start()
    try:
        yield Env(broker, sources)
    finally:
        await sources.close()
        await broker.close()
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_broker(tmp_path / "db") as e:
        yield e


def fields(records: list[bytes], *names: str) -> list[tuple[Any, ...]]:
    return [tuple(json.loads(r)[n] for n in names) for r in records]


# -- rows ------------------------------------------------------------------------------------------------

async def test_json_messages_become_rows_and_bad_ones_are_counted_and_skipped(env: Env, server: WsServer) -> None:
    await env.broker.create_stream("events", 1, schema=KV)
    state = await env.create("feed", "events", url=server.url, data_type="json")
    peer = await server.peer(1)
    await until(lambda: state.status == "running", "running")
    assert peer.received == []                                 # no open_message given: nothing sent
    for message in ['{"k":"a","v":1}',
                    b'{"k":"b","v":2}',                        # a binary frame: JSON all the same
                    "[1, 2]",                                  # not an object
                    '{"k":"c","v":"three"}',                   # a value of the wrong type
                    "not json at all",
                    '{"k":"d","v":4,"unknown":true}',          # unknown keys are ignored
                    '{"k":"e"}']:                              # missing columns take their defaults
        await peer.ws.send(message)
    await until(lambda: state.messages_in == 7 and state.rows_written == 4, "7 messages in, 4 rows")
    assert state.errors == 3 and state.status == "running"
    logged = " | ".join(m for _, m in state.error_log)
    assert "not a JSON object" in logged and "not JSON" in logged and '"three"' in logged
    assert fields(await env.records("events"), "k", "v") == [("a", 1), ("b", 2), ("d", 4), ("e", 0)]
    assert all("_tp_time" in json.loads(r) for r in await env.records("events"))
    # later messages still arrive: the errors stopped nothing
    await peer.ws.send('{"k":"f","v":6}')
    await until(lambda: state.rows_written == 5, "a row after the errors")
    assert await env.query("select k, v from table(events) where v > 1") == [["b", 2], ["d", 4], ["f", 6]]
    assert len(server.peers) == 1 and not peer.closed.is_set()


async def test_text_messages_fill_the_raw_column(env: Env, server: WsServer) -> None:
    await env.broker.create_stream("lines", 1, schema=RAW)
    state = await env.create("text_feed", "lines", url=server.url, data_type="text")
    peer = await server.peer(1)
    for message in ["hello", "caf\u00e9 \U0001f600", b"binary caf\xc3\xa9", b"\xff\xfe not utf-8",
                    '{"k": "stays text"}', ""]:
        await peer.ws.send(message)
    await until(lambda: state.messages_in == 6 and state.rows_written == 5, "6 messages in, 5 rows")
    assert state.errors == 1 and "UTF-8" in state.last_error
    expected = ["hello", "caf\u00e9 \U0001f600", "binary caf\u00e9", '{"k": "stays text"}', ""]
    assert [raw for (raw,) in fields(await env.records("lines"), "raw")] == expected
    assert [r[0] for r in await env.query("select raw from table(lines)")] == expected
    assert len(server.peers) == 1   # an invalid UTF-8 message did not cost the connection


async def test_a_burst_is_written_in_batches_and_in_order(env: Env, server: WsServer) -> None:
    await env.broker.create_stream("burst", 1, schema=KV)
    state = await env.create("burst_feed", "burst", url=server.url, data_type="json")
    peer = await server.peer(1)
    n = 5000
    for i in range(n):
        await peer.ws.send(json.dumps({"k": "x", "v": i}))
    await until(lambda: state.rows_written == n, f"{n} rows")
    assert [v for (v,) in fields(await env.records("burst"), "v")] == list(range(n))
    assert env.broker.commits < n // 10      # batched appends, not one per message
    assert state.errors == 0


async def test_messages_over_the_record_limit_are_skipped_far_over_it_cost_the_connection(tmp_path: Path,
                                                                                      server: WsServer) -> None:
    async with running_broker(tmp_path / "db", dataclasses.replace(DEFAULT_LIMITS, max_record_bytes=1000)) as e:
        await e.broker.create_stream("big", 1, schema=RAW)
        state = await e.create("big_feed", "big", url=server.url, data_type="text", open_message="hi")
        first = await server.peer(1)
        await first.ws.send("x" * 1500)      # received (under 2 x the limit), its row too big: skipped
        await first.ws.send("small")
        await until(lambda: state.messages_in == 2 and state.rows_written == 1, "one skipped, one row")
        assert state.errors == 1 and "record limit" in state.last_error and len(server.peers) == 1
        await first.ws.send("y" * 3000)      # over what the client takes: it closes the connection (1009)
        second = await server.peer(2)
        await until(lambda: second.received == ["hi"], "reconnected")
        assert "1009" in state.error_log[-1][1] or "too big" in state.error_log[-1][1], state.error_log
        await second.ws.send("after")
        await until(lambda: state.rows_written == 2, "a row after the reconnect")
        assert [r for (r,) in fields(await e.records("big"), "raw")] == ["small", "after"]


async def test_a_server_that_stops_answering_pings_is_left_and_reconnected(env: Env, server: WsServer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket, "PING_INTERVAL_S", 0.2)
    monkeypatch.setattr(websocket, "PING_TIMEOUT_S", 0.5)
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT_S", 0.5)   # the hung server will not answer the close either
    await env.broker.create_stream("hang", 1, schema=RAW)
    state = await env.create("hang_feed", "hang", url=server.url, data_type="text", open_message="hi")
    first = await server.peer(1)
    await until(lambda: first.received == ["hi"], "the open message")
    first.ws.transport.pause_reading()   # the server hangs: it reads nothing, answers no ping
    second = await server.peer(2)
    await until(lambda: second.received == ["hi"], "reconnected")
    assert any("ping" in m for _, m in state.error_log), list(state.error_log)
    await second.ws.send("alive")
    await until(lambda: state.rows_written == 1, "a row on the new connection")
    first.ws.transport.resume_reading()


async def test_the_inbox_takes_what_waits_up_to_the_limits_and_bounds_the_reader() -> None:
    inbox = _Inbox(cap_bytes=10)
    await inbox.put(b"a")
    assert await asyncio.wait_for(inbox.take(100, 100), 1) == [b"a"]    # a lone message at once
    for m in (b"1234", b"5678", b"9"):
        await inbox.put(m)
    assert await inbox.take(2, 100) == [b"1234", b"5678"]               # at most 2 messages
    await inbox.put(b"0123456789")                                       # 11 bytes: full now
    blocked = asyncio.create_task(inbox.put(b"next"))
    await asyncio.sleep(0.05)
    assert not blocked.done()                                            # the reader waits
    assert await inbox.take(100, 5) == [b"9"]                            # the next one would pass 5 bytes
    assert await inbox.take(100, 5) == [b"0123456789"]                   # one message always goes
    await asyncio.wait_for(blocked, 1)
    inbox.end(ConnectionError("gone"))
    assert await inbox.take(100, 100) == [b"next"]                       # what came before the end
    with pytest.raises(ConnectionError, match="gone"):
        await inbox.take(100, 100)


# -- open_message and reconnection -----------------------------------------------------------------

@pytest.mark.parametrize(("kind", "value", "sent"), [
    ("text", "subscribe", "subscribe"),
    ("binary", "subscribe", b"subscribe"),
    ("json", {"op": "subscribe", "args": ["a", 1]}, '{"op":"subscribe","args":["a",1]}'),
    ("json", ["a", "b"], '["a","b"]'),
    ("json", '{"op": "sub"}', '{"op": "sub"}'),     # a JSON text: sent as it is
    (None, "plain", "plain"),                        # open_message_type defaults to text
])
async def test_open_message_is_sent_once_as_its_type_says(env: Env, server: WsServer, kind: str | None,
                                                          value: Any, sent: str | bytes) -> None:
    await env.broker.create_stream("om", 1, schema=KV)
    props: dict[str, Any] = {"url": server.url, "data_type": "json", "open_message": value}
    if kind is not None:
        props["open_message_type"] = kind
    state = await env.create("om_feed", "om", **props)
    peer = await server.peer(1)
    await until(lambda: peer.received == [sent], "the open message")
    await peer.ws.send('{"k":"a","v":1}')
    await until(lambda: state.rows_written == 1, "a row")
    assert peer.received == [sent] and type(peer.received[0]) is type(sent)


async def test_a_server_restart_is_survived_and_the_open_message_sent_once_per_connection(
        env: Env, server: WsServer) -> None:
    await env.broker.create_stream("rs", 1, schema=KV)
    open_message = {"op": "subscribe", "channel": "prices"}
    sent = json.dumps(open_message, separators=(",", ":"))
    state = await env.create("rs_feed", "rs", url=server.url, data_type="json", open_message=open_message,
                             open_message_type="json")
    first = await server.peer(1)
    await until(lambda: first.received == [sent], "the open message on the first connection")
    await first.ws.send('{"k":"before","v":1}')
    await until(lambda: state.rows_written == 1, "a row before the restart")

    port = server.port
    await server.stop()
    await until(lambda: state.status == "failed", "failed while the server is down")
    assert f"127.0.0.1:{port}" in state.message
    errors = state.errors
    await until(lambda: state.errors >= errors + 2, "retries while the server is down")
    assert state.status == "failed" and "cannot connect" in state.message

    await server.start(port)
    second = await server.peer(2)
    await until(lambda: second.received == [sent], "the open message on the new connection")
    await until(lambda: state.status == "running", "running again")
    assert state.message == ""
    await second.ws.send('{"k":"after","v":2}')
    await until(lambda: state.rows_written == 2, "a row after the restart")
    assert fields(await env.records("rs"), "k", "v") == [("before", 1), ("after", 2)]
    # once per connection: never again on the first, once on the second, no third connection
    assert first.received == [sent] and second.received == [sent] and len(server.peers) == 2


async def test_a_connection_dropped_without_a_close_is_reconnected(env: Env, server: WsServer) -> None:
    await env.broker.create_stream("drop", 1, schema=RAW)
    state = await env.create("drop_feed", "drop", url=server.url, data_type="text", open_message="hi")
    first = await server.peer(1)
    await until(lambda: first.received == ["hi"], "the open message")
    first.ws.transport.abort()        # the TCP connection reset: no closing handshake
    second = await server.peer(2)
    await until(lambda: second.received == ["hi"], "the open message again")
    await until(lambda: state.status == "running", "running again")
    await second.ws.send("after")
    await until(lambda: state.rows_written == 1, "a row on the new connection")
    assert "was lost" in state.last_error or "closed the connection" in state.last_error
    assert first.received == ["hi"]


async def test_the_server_closing_the_connection_is_a_failure_and_retried(env: Env, server: WsServer) -> None:
    await env.broker.create_stream("bye", 1, schema=RAW)
    state = await env.create("bye_feed", "bye", url=server.url, data_type="text", open_message="hi")
    first = await server.peer(1)
    await until(lambda: first.received == ["hi"], "the open message")
    await first.ws.send("one")
    await first.ws.close(1000, "maintenance")
    second = await server.peer(2)
    await until(lambda: second.received == ["hi"], "the open message again")
    await until(lambda: state.rows_written == 1, "the row sent before the close")
    assert any("closed the connection" in m and "maintenance" in m for _, m in state.error_log)


# -- stop, start, delete, shutdown -----------------------------------------------------------------

async def test_stop_closes_the_connection_and_start_brings_rows_again(env: Env) -> None:
    ticker = await WsServer(ticker=True).start()
    try:
        await env.broker.create_stream("ticks", 1, schema=KV)
        state = await env.create("tick_feed", "ticks", url=ticker.url, data_type="json", open_message="go")
        first = await ticker.peer(1)
        await until(lambda: state.rows_written >= 5, "ticks arriving")

        await env.sources.stop_source(PROJECT, "tick_feed")
        assert state.status == "stopped"
        await asyncio.wait_for(first.closed.wait(), DEADLINE)   # the stop closed the connection
        # an append the job had queued before it was cancelled still lands (the committer finishes it;
        # the cancelled job never counts it): appends commit in order, so one made now fences it
        await env.broker.create_stream("fence", 1, schema=RAW)
        await env.broker.append_rows("fence", RowEncoder(RAW).texts(["fence"], 0))
        stored, counted = len(await env.records("ticks")), state.rows_written
        assert stored - 1 <= counted <= stored
        await asyncio.sleep(0.3)             # the server would tick ~30 times here, to no one
        assert len(await env.records("ticks")) == stored and state.rows_written == counted
        assert len(ticker.peers) == 1

        await env.sources.start_source(PROJECT, "tick_feed")
        second = await ticker.peer(2)
        await until(lambda: state.rows_written >= counted + 5, "ticks again after the start")
        assert state.status == "running"
        assert first.received == ["go"] and second.received == ["go"]
    finally:
        await ticker.stop()


async def test_a_broker_restart_runs_the_source_again(tmp_path: Path, server: WsServer) -> None:
    async with running_broker(tmp_path / "db") as first_run:
        await first_run.broker.create_stream("rb", 1, schema=RAW)
        await first_run.create("rb_feed", "rb", url=server.url, data_type="text", open_message="hi")
        first = await server.peer(1)
        await first.ws.send("before")
        await until(lambda: first_run.sources.get(PROJECT, "rb_feed").state.rows_written == 1, "a row")
    await asyncio.wait_for(first.closed.wait(), DEADLINE)   # the shutdown closed it
    async with running_broker(tmp_path / "db") as second_run:
        state = second_run.sources.get(PROJECT, "rb_feed").state
        second = await server.peer(2)
        await until(lambda: second.received == ["hi"] and state.status == "running", "connected again")
        await second.ws.send("after")
        await until(lambda: state.rows_written == 1, "a row after the restart")
        assert [r for (r,) in fields(await second_run.records("rb"), "raw")] == ["before", "after"]
        assert first.received == ["hi"]


async def test_delete_and_shutdown_close_their_connections(env: Env, server: WsServer) -> None:
    await env.broker.create_stream("dl", 1, schema=RAW)
    await env.create("dl_one", "dl", url=server.url, data_type="text")
    await env.create("dl_two", "dl", url=server.url, data_type="text")
    one, two = await server.peer(1), await server.peer(2)
    await env.sources.delete(PROJECT, "dl_one")
    await asyncio.wait_for(one.closed.wait(), DEADLINE)
    assert not two.closed.is_set()
    await env.sources.close()            # what the broker's shutdown does first
    await asyncio.wait_for(two.closed.wait(), DEADLINE)
    assert len(server.peers) == 2


async def test_an_unreachable_server_fails_and_retries_without_blocking_another_source(
        env: Env, server: WsServer) -> None:
    await env.broker.create_stream("ur", 1, schema=RAW)
    dead_port = free_port()
    dead = await env.create("dead_feed", "ur", url=f"ws://reader:s3cret@127.0.0.1:{dead_port}/x",
                            data_type="text", open_message="hello")
    live = await env.create("live_feed", "ur", url=server.url, data_type="text")
    await until(lambda: dead.status == "failed" and dead.errors >= 3, "failed and retried")
    assert "cannot connect" in dead.message and f"reader:***@127.0.0.1:{dead_port}" in dead.message
    assert "s3cret" not in dead.message   # a password in the URL is not shown
    peer = await server.peer(1)
    for i in range(3):
        await peer.ws.send(f"live {i}")
    await until(lambda: live.rows_written == 3, "the other source's rows")
    assert live.status == "running" and dead.status == "failed"
    # still retrying: a server appearing on that port is reached, and gets the open message
    late = await WsServer().start(dead_port)
    try:
        late_peer = await late.peer(1)
        await until(lambda: late_peer.received == ["hello"] and dead.status == "running", "connected at last")
        await late_peer.ws.send("late")
        await until(lambda: dead.rows_written == 1, "the late server's row")
    finally:
        await late.stop()


@contextlib.asynccontextmanager
async def raw_server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> AsyncIterator[int]:
    """A plain TCP server on loopback running `handle` per connection: its port."""
    tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield tcp.sockets[0].getsockname()[1]
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_a_handshake_that_never_ends_times_out_and_a_stop_during_it_is_prompt(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket, "OPEN_TIMEOUT_S", 0.5)
    accepted: list[asyncio.Event] = []      # one per TCP connection: set when the client hung up

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = asyncio.Event()
        accepted.append(gone)
        await reader.read()                 # never answers the upgrade request; waits for EOF
        gone.set()
        writer.close()

    async with raw_server(silent) as port:
        await env.broker.create_stream("hs", 1, schema=RAW)
        state = await env.create("hs_feed", "hs", url=f"ws://127.0.0.1:{port}/", data_type="text")
        await until(lambda: state.status == "failed", "the handshake timed out")
        assert "cannot connect" in state.message and "timed out" in state.message
        await asyncio.wait_for(accepted[0].wait(), DEADLINE)   # that attempt's connection was closed
        n = len(accepted)
        await until(lambda: len(accepted) > n, "another attempt")
        await env.sources.stop_source(PROJECT, "hs_feed")   # in the middle of a handshake (or a backoff)
        assert state.status == "stopped"
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in accepted)), DEADLINE)   # all closed


async def test_a_close_cut_short_still_closes_the_socket(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job stopped (its close sends a close frame and waits for the answer, up to CLOSE_TIMEOUT_S)
    and cancelled again meanwhile (a shutdown right after a stop): the library leaves its socket
    open then, for as long as the server does not answer. The job closes it all the same."""
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT_S", 60.0)   # the library's own bound stays out of it
    heard, gone = asyncio.Event(), asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Accepts the upgrade by hand, then never answers anything (the close frame included)."""
        request = await reader.readuntil(b"\r\n\r\n")
        found = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request)
        assert found is not None
        accept = base64.b64encode(hashlib.sha1(found.group(1) + WS_GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        try:
            while await reader.read(1 << 16):   # whatever the client sends (its close frame), until EOF
                heard.set()
        finally:   # EOF, or a reset: the connection is gone either way
            gone.set()
            writer.close()

    async with raw_server(mute) as port:
        await env.broker.create_stream("cut", 1, schema=RAW)
        state = SourceState()
        ctx = JobContext(Sink(env.broker, PROJECT, "cut", "text", state), state, Backoff())
        config = websocket.configure(Props({"url": f"ws://127.0.0.1:{port}/", "data_type": "text"}))
        job = asyncio.ensure_future(websocket.WebSocketJob(config).run(ctx))
        await until(lambda: state.status == "running", "connected")
        job.cancel()                    # the stop: the job's close sends its close frame and waits
        await asyncio.wait_for(heard.wait(), DEADLINE)
        assert not job.done()
        job.cancel()                    # cut short
        with pytest.raises(asyncio.CancelledError):
            await job
        # closed at once; before, the socket stayed open as long as the server kept quiet (its
        # keepalive gave up after ~20 s)
        await asyncio.wait_for(gone.wait(), 5)


async def test_a_server_that_refuses_the_upgrade_is_a_failure(env: Env) -> None:
    refusing = await WsServer().start(process_request=lambda conn, request: conn.respond(404, "no feed here\n"))
    try:
        await env.broker.create_stream("rf", 1, schema=RAW)
        state = await env.create("rf_feed", "rf", url=refusing.url, data_type="text")
        await until(lambda: state.status == "failed", "failed")
        assert "cannot connect" in state.message and "404" in state.message
        assert refusing.peers == []
    finally:
        await refusing.stop()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), trusted by nobody yet."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


async def test_wss_uses_the_default_ssl_context(env: Env, self_signed: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed
    server_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ssl.load_cert_chain(cert, key)
    secure = await WsServer().start(ssl=server_ssl)
    try:
        await env.broker.create_stream("tls", 1, schema=RAW)
        # not trusted yet: the default context verifies the certificate
        untrusted = await env.create("tls_untrusted", "tls", url=f"wss://127.0.0.1:{secure.port}/",
                                     data_type="text")
        await until(lambda: untrusted.status == "failed", "refused: an untrusted certificate")
        assert "certificate" in untrusted.message.lower()
        await env.sources.delete(PROJECT, "tls_untrusted")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))   # read by the default context when it is made
        state = await env.create("tls_feed", "tls", url=f"wss://127.0.0.1:{secure.port}/", data_type="text",
                                 open_message="over tls")
        peer = await secure.peer(1)
        await until(lambda: peer.received == ["over tls"], "the open message over TLS")
        await peer.ws.send("secret")
        await until(lambda: state.rows_written == 1, "a row over TLS")
        assert [r for (r,) in fields(await env.records("tls"), "raw")] == ["secret"]
    finally:
        await secure.stop()


# -- through a broker process: the Timeplus REST routes and the DIS door ---------------------------

API = "/api/v1beta2"


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return json.loads(await resp.read()) if resp.content_length != 0 else None


async def test_through_the_rest_routes_rows_reach_the_dis_door(broker: BrokerProcess, server: WsServer) -> None:
    stream, name = _name("s"), _name("ws")
    async with aiohttp.ClientSession(broker.http_url) as http:
        async with http.post(f"{API}/streams", json={"name": stream, "columns": [
                {"name": "k", "type": "string"}, {"name": "v", "type": "int64"}]}) as resp:
            assert resp.status in (200, 201), await resp.text()
        props = {"url": server.url, "data_type": "json", "open_message": {"subscribe": "all"},
                 "open_message_type": "json"}
        async with http.post(f"{API}/sources", json={"name": name, "type": "websocket", "stream": stream,
                                                     "properties": props}) as resp:
            assert resp.status == 201, await resp.text()
            body = await _json(resp)
        assert (body["type"], body["stream"], body["status"], body["properties"]) == ("websocket", stream,
                                                                                     "running", props)
        sid = body["id"]

        async def source() -> dict[str, Any]:
            async with http.get(f"{API}/sources/{sid}") as r:
                assert r.status == 200
                return await _json(r)  # type: ignore[no-any-return]

        async def until_source(check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
            deadline = time.monotonic() + DEADLINE
            while not check(got := await source()):
                assert time.monotonic() < deadline, f"{what}: not within {DEADLINE}s; last {got}"
                await asyncio.sleep(0.05)
            return got

        peer = await server.peer(1)
        await until(lambda: peer.received == ['{"subscribe":"all"}'], "the open message")
        for message in ['{"k":"a","v":1}', '"just a string"', '{"k":"b","v":2}']:
            await peer.ws.send(message)
        got = await until_source(lambda s: s["stats"]["rows_written"] == 2, "2 rows")
        assert got["status"] == "running" and got["stats"]["messages_in"] == 3
        assert got["stats"]["error_count"] == 1 and "not a JSON object" in got["stats"]["last_error"]

        # the DIS door reads the rows as JSON records
        async with http.get("/v2/default/cursors", params={"stream-name": stream, "partition-id": "0",
                                                            "cursor-type": "TRIM_HORIZON"}) as resp:
            assert resp.status == 200, await resp.text()
            cursor = (await _json(resp))["partition_cursor"]
        async with http.get("/v2/default/records", params={"partition-cursor": cursor}) as resp:
            assert resp.status == 200, await resp.text()
            records = [json.loads(base64.b64decode(r["data"])) for r in (await _json(resp))["records"]]
        assert [(r["k"], r["v"]) for r in records] == [("a", 1), ("b", 2)]

        # stop closes the connection; start connects again and sends the open message again
        async with http.post(f"{API}/sources/{sid}/stop") as resp:
            assert resp.status == 204
        await asyncio.wait_for(peer.closed.wait(), DEADLINE)
        assert (await source())["status"] == "stopped"
        async with http.post(f"{API}/sources/{name}/start") as resp:   # by name, too
            assert resp.status == 204
        second = await server.peer(2)
        await until(lambda: second.received == ['{"subscribe":"all"}'], "the open message again")
        await second.ws.send('{"k":"c","v":3}')
        await until_source(lambda s: s["stats"]["rows_written"] == 3 and s["status"] == "running", "a third row")

        async with http.delete(f"{API}/sources/{sid}") as resp:
            assert resp.status == 204
        await asyncio.wait_for(second.closed.wait(), DEADLINE)
        async with http.get(f"{API}/sources/{sid}") as resp:
            assert resp.status == 404


GOOD = {"url": "ws://127.0.0.1:9/feed", "data_type": "json"}


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("properties", "prop"), [
    ({"data_type": "json"}, "url"),                                            # missing url
    ({**GOOD, "url": "http://127.0.0.1:9/feed"}, "url"),                       # not ws:// or wss://
    ({**GOOD, "url": "ws://"}, "url"),                                         # no host
    ({**GOOD, "url": 9}, "url"),                                               # not a string
    ({**GOOD, "url": "ws://127.0.0.1:9/feed#part"}, "url"),                    # the library refuses it
    ({**GOOD, "url": "ws://127.0.0.1:99999/"}, "url"),                         # a bad port
    ({**GOOD, "url": "ws://127.0.0.1:0/"}, "url"),                             # port 0: nothing there
    ({**GOOD, "url": f"ws://{'a' * 300}.example/"}, "url"),                    # a host label past 63
    ({"url": GOOD["url"]}, "data_type"),                                       # missing data_type
    ({**GOOD, "data_type": "xml"}, "data_type"),                               # unknown data_type
    ({**GOOD, "data_type": 1}, "data_type"),
    ({**GOOD, "open_message": "x", "open_message_type": "yaml"}, "open_message_type"),
    ({**GOOD, "open_message": {"a": 1}}, "open_message"),                      # an object as text
    ({**GOOD, "open_message": ["a"], "open_message_type": "binary"}, "open_message"),
    ({**GOOD, "open_message": "{not json", "open_message_type": "json"}, "open_message"),
    ({**GOOD, "open_message": 5}, "open_message"),
    # deeper than orjson writes (255 levels; it reads 1,024): a 500 INTERNAL with a traceback
    ({**GOOD, "open_message": _nested(300), "open_message_type": "json"}, "open_message"),
    # orjson writes it alone, and the stored definition, but not GET /sources' list around it: that
    # answered 500 INTERNAL for every source of the workspace from then on
    ({**GOOD, "open_message": _nested(251), "open_message_type": "json"}, "open_message"),
    ({**GOOD, "intreval": "1s"}, "intreval"),                                  # an unknown key
    ({**GOOD, "tls": {"disable": True}}, "tls.disable"),
])
async def test_a_bad_definition_is_400_bad_source_naming_the_property(broker: BrokerProcess,
                                                                      properties: dict[str, Any], prop: str) -> None:
    stream, name = _name("s"), _name("bad")
    async with aiohttp.ClientSession(broker.http_url) as http:
        async with http.post(f"{API}/streams", json={"name": stream, "columns": [
                {"name": "raw", "type": "string"}]}) as resp:
            assert resp.status in (200, 201)
        async with http.post(f"{API}/sources", json={"name": name, "type": "websocket", "stream": stream,
                                                     "properties": properties}) as resp:
            body = await _json(resp)
            assert resp.status == 400, body
        assert body["reason"] == "BAD_SOURCE"
        assert f"property [{prop}]" in body["message"], body
        async with http.get(f"{API}/sources") as resp:
            assert name not in [s["name"] for s in await _json(resp)]   # nothing was created


async def test_a_text_source_needs_a_raw_column(broker: BrokerProcess) -> None:
    stream = _name("s")
    async with aiohttp.ClientSession(broker.http_url) as http:
        async with http.post(f"{API}/streams", json={"name": stream, "columns": [
                {"name": "k", "type": "string"}]}) as resp:
            assert resp.status in (200, 201)
        async with http.post(f"{API}/sources", json={"name": _name("t"), "type": "websocket", "stream": stream,
                                                     "properties": {**GOOD, "data_type": "text"}}) as resp:
            body = await _json(resp)
            assert resp.status == 400 and body["reason"] == "BAD_SOURCE"
            assert "property [data_type]" in body["message"]
