"""Builds the HTTP application: one root app, each door mounted as its own sub-application
(DIS under `/v2`, the SSE tail under `/sluice`, Timeplus under `[/{workspace}]/api/v1beta2`,
OpenTSDB on `/api/put|query|suggest`, the web console under `/console`), and the one error
middleware of http.py rendering with the renderer of the door that owns the path (every other
`/api/...` path is OpenTSDB's). With `--tsdb-port`, `build_tsdb_http_app` is a second root
serving the OpenTSDB door alone, sharing the first one's tsdb stream (and so its series registry).

Every response carries `X-Request-Id`, including the answers to requests aiohttp's HTTP parser
rejects before any handler or middleware runs (duplicate Content-Length, too many or too long
headers, a broken chunked framing...; bodies in a Content-Encoding are http.read_body's).
aiohttp answers those from `RequestHandler.handle_error` as text/plain and offers no hook for
them (aio-libs/aiohttp#3287), so `HttpRunner` serves connections with a `RequestHandler`
subclass whose `handle_error` renders a catalogue row instead. aiohttp hands it no path (the
parser failed), so the handler reads the request line itself when a read begins with one (a
client writes its line first; the reads that continue its headers keep that path) and answers
with the body of the door that owns the path (an OpenTSDB client on the HTTP port gets OpenTSDB's
error object); with none seen since the last answer (a request pipelined behind another in one
read, a request line over the parser's limit), the fallback door's: DIS, the broker's first.
This leans on aiohttp internals (`AppRunner._make_server`, `Server._loop/_kwargs`, the
`handle_error` signature, stable through 3.x); tests/api/test_http_envelope.py sends the raw
bytes, so an aiohttp upgrade that changes them fails there, not in front of a client.

The same handler counts the port's connections per client (api/limits.py) and drops a client
that does not read its answer for the idle timeout (`finish_response`); tests/limits/ covers both.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import Any, Callable

from aiohttp import hdrs, web
from aiohttp.http_parser import RawRequestMessage
from multidict import CIMultiDict, CIMultiDictProxy

from broker.api import console, dis, limits, metrics, tail, timeplus, tsdb
from broker.api.hosts import AllowedHosts
from broker.api.hosts import middlewares as host_checks
from broker.api.http import (
    PARSER_REJECTED,
    RENDERER,
    HttpConfig,
    Renderer,
    brief,
    client_request_id,
    door_renderer,
    error_middleware,
    error_response,
    reset,
)
from broker.api.render import FALLBACK, TSDB
from broker.auth import Auth
from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.model import DEFAULT_PROJECT
from broker.sources.manager import Sources
from broker.tsdb.series import TsdbStream

log = logging.getLogger(__name__)



def _config(broker: Broker, body_timeout_s: float, stall_timeout_s: float) -> HttpConfig:
    return HttpConfig(max_body_bytes=broker.limits.max_http_body_bytes, body_timeout_s=body_timeout_s,
                      stall_timeout_s=stall_timeout_s)


def build_http_app(broker: Broker, *, body_timeout_s: float, stall_timeout_s: float = 60.0,
                   sources: Sources | None = None, tsdb_stream: TsdbStream | None = None,
                   auth: Auth | None = None, client_limits: limits.ClientLimits | None = None,
                   exporter: metrics.Exporter | None = None, allowed_hosts: AllowedHosts | None = None
                   ) -> web.Application:
    """`sources`: the broker's managed sources (app.py owns their lifecycle); without it the app
    makes its own, started and closed with the app. `exporter`: /metrics, /healthz and /readyz
    (api/metrics.py; app.py makes one per broker; without it the app makes its own).
    `tsdb_stream`: where the OpenTSDB door writes (default: stream `tsdb` of the default project).
    `auth`: the credentials every door checks (None or not enabled: an open broker, no check at all).
    `client_limits`: this port's per-client limits (api/limits.py); None: none. `allowed_hosts`: the
    Host names answered (api/hosts.py); None: any."""
    config = _config(broker, body_timeout_s, stall_timeout_s)
    doors = {dis.PREFIX: dis.build_app(broker, config, auth), tail.PREFIX: tail.build_app(broker, config, auth)}
    owned = sources is None
    sources = sources or Sources(broker)
    tp = timeplus.build_app(broker, config, sources, auth)
    ts = tsdb.build_app(broker, config, tsdb_stream or TsdbStream(broker, DEFAULT_PROJECT, "tsdb"), auth)
    # Timeplus' paths first: they start with /api too
    owners: list[tuple[str | re.Pattern[str], Renderer]] = [(timeplus.PATHS, tp[RENDERER]), (tsdb.OWNED, TSDB)]
    doors[console.PREFIX] = console.build_app(broker, config, sources, auth)
    owners += [(prefix + "/", door[RENDERER]) for prefix, door in doors.items()]
    owners.append((re.compile(re.escape(console.PREFIX) + "$"), doors[console.PREFIX][RENDERER]))   # its root
    # the body cap is the root's: aiohttp builds every request with the root app's client_max_size
    root = web.Application(middlewares=[error_middleware(owners, FALLBACK), metrics.request_timer(broker),
                                        *host_checks(allowed_hosts), *_limited(client_limits)],
                           client_max_size=config.max_body_bytes)
    root[RENDERER] = FALLBACK  # for what no door owns: unknown paths, parser rejections of no known path
    metrics.count_rejections(root, broker)
    path_renderer: Callable[[str], Renderer] = functools.partial(door_renderer, owners, FALLBACK)
    root[PATH_RENDERER] = path_renderer
    if client_limits is not None:
        root[limits.CLIENT_LIMITS] = client_limits
    for prefix, door in doors.items():
        root.add_subapp(prefix, door)
    timeplus.mount(root, tp)   # its paths start with a workspace: matched by rule, not prefix
    tsdb.mount(root, ts)       # beside Timeplus under /api: matched by rule too
    if exporter is None:
        exporter = metrics.Exporter(metrics.BrokerCollector(broker, sources), metrics.Health(broker), auth)
        exporter.health.listening = True   # an app built alone (tests): ready once it serves
    metrics.add_routes(root, exporter)
    if owned:
        async def start_sources(_: web.Application) -> None:
            await sources.start()

        async def close_sources(_: web.Application) -> None:
            await sources.close()

        root.on_startup.append(start_sources)
        root.on_cleanup.append(close_sources)
    return root


def build_tsdb_http_app(broker: Broker, tsdb_stream: TsdbStream, *, body_timeout_s: float,
                        stall_timeout_s: float = 60.0, auth: Auth | None = None,
                        client_limits: limits.ClientLimits | None = None,
                        exporter: metrics.Exporter | None = None,
                        allowed_hosts: AllowedHosts | None = None) -> web.Application:
    """The OpenTSDB door alone (the HiTSDB port convention, `--tsdb-port`); every error on this
    port, unknown paths and parser rejections included, is an OpenTSDB error object. With
    `exporter`: /healthz and /readyz too (not /metrics: that is the HTTP port's or --metrics-port's)."""
    config = _config(broker, body_timeout_s, stall_timeout_s)
    root = web.Application(middlewares=[error_middleware([], TSDB), metrics.request_timer(broker),
                                        *host_checks(allowed_hosts), *_limited(client_limits)],
                           client_max_size=config.max_body_bytes)
    root[RENDERER] = TSDB
    metrics.count_rejections(root, broker)
    if client_limits is not None:
        root[limits.CLIENT_LIMITS] = client_limits
    tsdb.mount(root, tsdb.build_app(broker, config, tsdb_stream, auth))
    if exporter is not None:
        metrics.add_routes(root, exporter, metrics=False)
    return root


def _limited(client_limits: limits.ClientLimits | None) -> list[Any]:
    return [] if client_limits is None else [limits.middleware(client_limits)]


# -- errors of aiohttp's own HTTP parser -----------------------------------------------------------

def _parser_error(status: int, exc: BaseException | None, message: str | None, rid: str) -> BrokerError:
    """A catalogue row for what aiohttp's parser (or its last-resort handler) rejected."""
    if status >= 500:
        return server_error(ErrorCode.INTERNAL, request_id=rid)
    detail = brief(message or exc or "malformed HTTP request")
    return client_error(ErrorCode.INVALID_REQUEST, detail=f"malformed HTTP request: {detail}")


# The root app's path -> the renderer of the door that owns it (parser errors of a known path).
PATH_RENDERER: web.AppKey[Callable[[str], Renderer]] = web.AppKey("path_renderer")


class _RequestHandler(web.RequestHandler):
    """aiohttp's connection handler, with the error answer of the door that owns the path."""

    renderer: Renderer = FALLBACK
    renderer_for: Callable[[str], Renderer] | None = None   # path -> its door's renderer
    rejected: Callable[[BrokerError], None] | None = None   # told of each request the parser refuses
    _path: str | None = None   # of the request line that began the last read, if one did
    client_limits: limits.ClientLimits | None = None
    over_limit = False   # past the connection limit: its first request is answered 429 (api/limits.py)
    _connection: limits.ConnectionCount | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.client_limits is not None:
            self._connection = limits.ConnectionCount(self.client_limits, transport)
            self.over_limit, flood = self._connection.made()
            if flood:
                self.force_close()

    def data_received(self, data: bytes) -> None:
        # a request line that begins this read (after the empty lines RFC 9112 lets a client send
        # first) names the door of a parser error's answer; a read that continues a request's
        # headers or body keeps the path found before. One byte test for most reads.
        if self.renderer_for is not None and (b"A" <= data[:1] <= b"Z" or data[:1] == b"\r"):
            path = _request_path(data.lstrip(b"\r\n") if data[:1] == b"\r" else data)
            if path is not None:
                self._path = path
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._connection is not None:
            self._connection.lost()
        super().connection_lost(exc)

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        self._path = None   # answered: the next request names its own door
        return await self._finish_response(request, resp, start_time)

    async def _finish_response(self, request: Any, resp: web.StreamResponse,
                               start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """Writing the answer: a client that reads none of it for the idle timeout is dropped, so
        a 10 MiB GetRecords it never reads does not hold its buffer and connection for ever. A
        slow reader is not: the check is whether the transport's write buffer shrank meanwhile.
        (Streaming answers bound each write themselves: http.write_or_drop.)

        The watchdog is a timer on the loop, not a task: most answers are written at once and
        the timer is cancelled unfired (one TimerHandle per request, no task, no asyncio.wait).
        Dropping the client resets the connection, which ends aiohttp's write with a
        ConnectionError: it then reports the connection closed."""
        timeout = self._keepalive_timeout
        if not timeout:
            return await super().finish_response(request, resp, start_time)
        loop = asyncio.get_running_loop()
        left: int | None = None   # bytes waiting in the transport at the last check
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal left, timer
            transport = self.transport
            now_left = transport.get_write_buffer_size() if transport is not None else 0
            if transport is None or (left is not None and now_left >= left):
                log.debug("dropped a client that read none of its answer for %ss", timeout)
                reset(transport)
                return
            left = now_left
            timer = loop.call_later(timeout, check)

        timer = loop.call_later(timeout, check)
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            timer.cancel()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # too late for any answer: aiohttp raises and closes
            return super().handle_error(request, status, exc, message)
        if status >= 500:
            super().handle_error(request, status, exc, message)  # for its log line with the traceback
        else:
            # brief: aiohttp's message ends in the offending line's bytes, which may hold a key
            log.debug("rejected a malformed HTTP request from %s: %s", request.remote, brief(message or exc or ""))
        rid = client_request_id(request.headers)
        renderer = self.renderer if self._path is None or self.renderer_for is None else self.renderer_for(self._path)
        error = _parser_error(status, exc, message, rid)
        if self.rejected is not None:
            self.rejected(error)
        response = error_response(renderer, error, rid)
        response.force_close()  # the parser's state is unknown: this connection ends here
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A body whose framing is broken (chunked) was answered 400 already; aiohttp meets its
        # error again when it drains the body after the answer, and would log it at ERROR with a
        # traceback: one per such request, any client's to send.
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):
            log.debug("dropped a connection whose request body did not decode: %s", brief(exc))
            return
        super().log_exception(*args, **kw)


def _request_path(data: bytes) -> str | None:
    """The path of the request line `data` starts with (`METHOD SP target SP HTTP/1.x CRLF`, found
    within aiohttp's line limit), its query left out; None when it does not start with one."""
    end = data.find(b"\r\n", 0, _MAX_LINE)
    if end < 0:   # a line past the limit (aiohttp refuses it): its door is its path's, as far as it goes
        method, space, target = data[:_MAX_LINE].partition(b" ")
        if not (space and method.isalpha() and method.isupper() and target.startswith(b"/")):
            return None
        return target.split(b"?", 1)[0].split(b" ", 1)[0].decode("latin-1")
    parts = data[:end].split(b" ") if end > 0 else ()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    return parts[1].split(b"?", 1)[0].decode("latin-1")


_MAX_LINE = 8190 + 2   # aiohttp's max_line_size, and its CRLF


class _Server(web.Server):
    """aiohttp's low-level server, building `_RequestHandler` connections."""

    renderer: Renderer = FALLBACK
    renderer_for: Callable[[str], Renderer] | None = None
    rejected: Callable[[BrokerError], None] | None = None
    client_limits: limits.ClientLimits | None = None

    def __call__(self) -> web.RequestHandler:
        # bodies are inflated by read_body (api/coding.py), which checks that they are whole
        handler = _RequestHandler(self, loop=self._loop, **{**self._kwargs, "auto_decompress": False})
        handler.renderer = self.renderer
        handler.renderer_for = self.renderer_for
        handler.rejected = self.rejected
        handler.client_limits = self.client_limits
        return handler


def _unknown_expectations_ignored(make_request: Any) -> Any:
    """aiohttp answers an `Expect` other than `100-continue` with a text/plain 417 of its own,
    before any middleware runs: no door's error body, no X-Request-Id. RFC 9110 (10.1.1) lets a
    server ignore such an expectation instead, and then the request gets its door's own answer.
    The header is taken out of the parsed message before the request is made of it (not with
    `request.clone`, which re-encodes every header and fails on one that is not UTF-8)."""

    def factory(message: RawRequestMessage, *args: Any, **kwargs: Any) -> web.BaseRequest:
        expect = message.headers.get(hdrs.EXPECT)
        if expect is not None and expect.strip().lower() != "100-continue":
            headers = CIMultiDict(message.headers)
            headers.popall(hdrs.EXPECT)
            message = message._replace(headers=CIMultiDictProxy(headers), raw_headers=tuple(
                (k, v) for k, v in message.raw_headers if k.lower() != b"expect"))
        return make_request(message, *args, **kwargs)  # type: ignore[no-any-return]

    return factory


class HttpRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer parser errors with the body of the door that owns
    the request's path (`app[PATH_RENDERER]`), else the root app's fallback door (`app[RENDERER]`;
    both set by build_http_app)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        ours = _Server(server.request_handler, request_factory=_unknown_expectations_ignored(server.request_factory),
                       handler_cancellation=server.handler_cancellation, loop=server._loop, **server._kwargs)
        ours.renderer = self.app.get(RENDERER, FALLBACK)
        ours.renderer_for = self.app.get(PATH_RENDERER)
        ours.rejected = self.app.get(PARSER_REJECTED)
        ours.client_limits = self.app.get(limits.CLIENT_LIMITS)
        return ours
