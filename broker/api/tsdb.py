"""The OpenTSDB/HiTSDB door: `POST /api/put` as shared/spec/tsdb-put.md gives it, and thin
`/api/query` and `/api/suggest` handlers over broker/tsdb/query.py. Decoding and rendering only:
points are checked by broker/tsdb/points.py and written by broker/tsdb/put.py into the one tsdb
stream (broker/tsdb/series.py `TsdbStream`: `--tsdb-stream` in `--tsdb-project`, created on
first put).

Paths: `/api/put`, `/api/put/`, `/api/query` (GET and POST), `/api/query/`, `/api/suggest` (GET and POST),
`/api/suggest/`; other methods on them are 405, other `/api/...` paths (not Timeplus') 404, both
as this door's error object. The Timeplus door owns `[/{workspace}]/api/v1beta2`: this one is a
rule-matched sub-application too (`mount`), never an `/api` prefix that would shadow it.

Every JSON answer is `application/json; charset=UTF-8` (spec section 4); a put with every point
stored and no flag is a 204 without a body.

With an auth file every request carries an API key (`X-Api-Key`, `Authorization: ApiKey K` or
`Bearer K`) of the tsdb stream's project (`--tsdb-project`) whose role permits the verb: a put
writes, a query or suggest reads.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import operator
import re
import time
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import unquote_plus

import msgspec
import orjson
from aiohttp import web

from broker.api.http import (
    BROKER,
    Handler,
    HttpConfig,
    add_routes,
    api_key_guard,
    door_app,
    mount_by_rule,
    read_body,
    read_json,
)
from broker.api.render import TSDB
from broker.auth import Action, Auth, Principal
from broker.core.broker import Broker
from broker.errors import ErrorCode, client_error
from broker.tsdb import query as tsdb_query
from broker.tsdb.put import BadBody, Grouped, PutWrite, point_texts, points_of, sort
from broker.tsdb.series import TsdbStream
from broker.tsdb.workers import OFFLOAD_BYTES

log = logging.getLogger(__name__)

# The paths this door answers (the sub-application's rule), and those whose errors it renders.
PATHS = re.compile(r"/api/(?:put|query|suggest)(?:/|$)")
OWNED = re.compile(r"/api(?:/|$)")
CONTENT_TYPE = "application/json; charset=UTF-8"
TARGET = web.AppKey("tsdb_stream", TsdbStream)
# Bodies above this are parsed and checked off the event loop (a 12 MiB body is ~100,000 points).
_INLINE_BYTES = 256 * 1024
_POINT_ERRORS = {"code": 400, "message": "One or more data points had errors",
                 "details": "Please see the TSD logs or append \"details\" to the put request"}

def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers={"Content-Type": CONTENT_TYPE})


def _flags(request: web.Request) -> set[str]:
    """The names in the raw query string: flags are valueless (`?summary`, `?summary=false` are on)."""
    return {unquote_plus(part.split("=", 1)[0]) for part in request.rel_url.raw_query_string.split("&") if part}


def _sync_timeout(request: web.Request) -> float | None:
    """`sync_timeout` in ms as seconds; None (absent, empty or 0): wait as long as it takes."""
    raw = request.query.get("sync_timeout")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise client_error(ErrorCode.INVALID_REQUEST,
                           detail=f"sync_timeout must be a non-negative integer (milliseconds), got {raw!r:.40}")
    digits = raw.lstrip("0")
    if len(digits) > 15:   # an integer all the same: longer than any wait (~30,000 years)
        return None
    ms = int(digits or "0")
    return ms / 1000 if ms else None


async def put(request: web.Request) -> web.StreamResponse:
    flags = _flags(request)
    details, summary = "details" in flags, "summary" in flags
    timeout = _sync_timeout(request)   # `sync` and `ignoreErrors` are accepted: we always answer durably
    body = await read_body(request)
    loop = asyncio.get_running_loop()
    # sync_timeout bounds the whole write: the wait for a worker and the checks too, not only the append
    deadline = None if timeout is None else loop.time() + timeout
    target: TsdbStream = request.app[TARGET]
    limit = target.broker.limits.max_record_bytes

    async def sorted_() -> Grouped | BadBody:
        """The body checked and sorted: by a worker, else off the loop when big, else here."""
        layout = await target.layout_now()   # None (not created yet, or typed): the write sorts the points
        if layout is not None and target.workers is not None and len(body) >= OFFLOAD_BYTES:
            config, registry = layout
            grouped = await target.workers.group(body, registry, config.partition_count, limit,
                                                 cancellable=deadline is not None)
            if grouped is not None:
                return grouped
        # without a layout: checked for size now, sorted again once the stream is there
        how = (layout[0].stream_id, layout[0].partition_count, layout[1].kinds()) if layout is not None else (-1, 1, {})
        try:
            return await _sort(body, *how, limit)
        except BadBody as exc:
            return exc

    def regroup(stream_id: int, partition_count: int, known: Mapping[str, str]) -> Awaitable[Grouped]:
        # sorted again for the stream as it is now (made or scaled since; a first put before the
        # stream exists is sorted twice), as the first time
        return _sort(body, stream_id, partition_count, known, limit)

    made: asyncio.Future[PutWrite | BadBody] = loop.create_future()

    async def work() -> None:
        grouped = await sorted_()
        write = grouped if isinstance(grouped, BadBody) else PutWrite(grouped, regroup)
        made.set_result(write)
        if isinstance(write, PutWrite) and write.errors.count(None):
            await write.run(target)

    # once checked, runs to its end even if this request goes away: types and points must not part ways
    task = asyncio.ensure_future(work())
    try:
        if deadline is None:   # one wait: this is the hot path
            await asyncio.wait({task})
        else:
            either: set[asyncio.Future[Any]] = {made, task}
            await asyncio.wait(either, timeout=_left(deadline, loop), return_when=asyncio.FIRST_COMPLETED)
            if made.done() and not task.done():
                await asyncio.wait({task}, timeout=_left(deadline, loop))
    except asyncio.CancelledError:   # the client went away: the write goes on, its failure is logged
        task.add_done_callback(_log_failure)
        raise
    if task.done():
        task.result()   # a bug in the write is a 500 (the middleware logs it), not pending points
    else:
        task.add_done_callback(_log_failure)
    if not made.done():
        # still being checked (or waiting for a worker) when sync_timeout ran out: nothing is
        # decided yet, so the put ends here and its body is let go - piled-up puts would hold
        # their bodies and the workers; every point is a timeout and none is written
        task.cancel()
        return await _timed_out(body, details, summary, request)
    write = made.result()
    if isinstance(write, BadBody):
        raise write.error()
    return await _answer(request, body, details, summary, write.errors, lambda: write.stored, write.success)


async def _answer(request: web.Request, body: bytes, details: bool, summary: bool, errors: list[str | None],
                  stored: Callable[[], list[bool]], success: int) -> web.Response:
    """A put's answer (spec section 4) from each point's outcome: its error string, stored, or
    neither - pending, which is a timeout. A failed point is echoed as its text was received."""
    failed = len(errors) - success
    if not failed:
        if details:
            return _json({"success": success, "failed": 0, "errors": []})
        if summary:
            return _json({"success": success, "failed": 0})
        return web.Response(status=204)
    if not (details or summary):
        return _json({"error": _POINT_ERRORS}, 400)
    # one moment, taken before any await: after a sync_timeout the write goes on, and a part
    # appended while the body is parsed again must not leave the counts and the list disagreeing
    errors, kept = list(errors), stored() if details else []
    timeouts = errors.count(None) - success   # a point is stored, failed or pending, never two of them
    if details:
        how = (body, success, failed, errors, kept, _pending(request), timeouts)
        text = await asyncio.to_thread(_details, *how) if len(body) > _INLINE_BYTES else _details(*how)
        return web.Response(body=text, status=400, headers={"Content-Type": CONTENT_TYPE})
    answer: dict[str, Any] = {"success": success, "failed": failed}
    if timeouts:
        answer["timeouts"] = timeouts
    return _json(answer, 400)


_DATAPOINT = b'{"datapoint":'
_DETAILS_CHUNK = 4096   # points joined at once: a few hundred KiB of pieces, the GIL let go between
_NO_TEXTS: list[bytes | msgspec.Raw] = [b""] * _DETAILS_CHUNK


def _details(body: bytes, success: int, failed: int, errors: list[str | None], kept: list[bool], pending: str,
             timeouts: int) -> bytearray:
    """The `details` answer, byte for byte what orjson makes of `{"success", "failed", "errors":
    [{"datapoint": <the point's text as received>, "error": <its error, `pending` for None>} for
    each point not `kept`], "timeouts" (when any)}` - joined from pieces instead: the points'
    texts and each distinct error encoded once, no object per point (a 12 MB body of 6M bare
    numbers made 6M dicts, a 2 GB peak). Touches nothing of the loop's: runs in a thread for a
    big body."""
    texts = point_texts(body)
    ends: dict[str | None, bytes] = {}   # an error -> `,"error":"<it>"},`, what follows a point's text
    out = bytearray(b'{"success":%d,"failed":%d,"errors":[' % (success, failed))
    for lo in range(0, len(errors), _DETAILS_CHUNK):
        hi = lo + _DETAILS_CHUNK
        listed = list(map(operator.not_, kept[lo:hi]))
        failures = list(itertools.compress(errors[lo:hi], listed))
        if failures:
            for error in set(failures).difference(ends):
                ends[error] = b',"error":' + orjson.dumps(pending if error is None else error) + b"},"
            pieces: list[bytes | msgspec.Raw] = [_DATAPOINT] * (3 * len(failures))
            pieces[1::3] = itertools.compress(texts[lo:hi], listed)
            pieces[2::3] = map(ends.__getitem__, failures)
            out += b"".join(pieces)
            del pieces
        # the texts let go as the answer grows: the peak is about the larger of the two, not both
        texts[lo:hi] = _NO_TEXTS[:len(listed)]
    if out.endswith(b","):
        del out[-1]
    out += b"]"
    if timeouts:
        out += b',"timeouts":%d' % timeouts
    out += b"}"
    return out


async def _sort(body: bytes, stream_id: int, partition_count: int, known: Mapping[str, str],
                max_record_bytes: int) -> Grouped:
    """put.sort, in a thread for a big body: the event loop serves every other request meanwhile.
    Raises BadBody."""
    if len(body) > _INLINE_BYTES:
        return await asyncio.to_thread(sort, body, stream_id, partition_count, known, max_record_bytes)
    return sort(body, stream_id, partition_count, known, max_record_bytes)


def _left(deadline: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    return None if deadline is None else max(0.0, deadline - loop.time())


def _pending(request: web.Request) -> str:
    return f"Storage exception: not durable within sync_timeout ({request.query.get('sync_timeout')} ms)"


async def _points_of(body: bytes) -> list[Any]:
    """put.points_of, off the event loop for a big body (as its checks are)."""
    return await asyncio.to_thread(points_of, body) if len(body) > _INLINE_BYTES else points_of(body)


async def _timed_out(body: bytes, details: bool, summary: bool, request: web.Request) -> web.Response:
    """The answer when sync_timeout ran out before the points were even checked: each one a
    timeout, none written. A body that holds no points is said so, as the checks would have."""
    try:
        points = await _points_of(body)
    except BadBody as exc:
        raise exc.error() from None
    n = len(points)
    return await _answer(request, body, details, summary, [None] * n, lambda: [False] * n, 0)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a put that outlived its request failed", exc_info=task.exception())


# -- queries (broker/tsdb/query.py) ---------------------------------------------------------------

async def query(request: web.Request) -> web.Response:
    broker: Broker = request.app[BROKER]
    if request.method == "POST":
        body: Any = await read_json(request)
    else:
        body = tsdb_query.body_from_params(request.query)
    config, registry = await request.app[TARGET].lookup()
    return _json(await tsdb_query.run_query(broker, registry, config, body, time.time_ns() // 1_000_000))


async def suggest(request: web.Request) -> web.Response:
    """GET with query parameters, or POST with them as a JSON object (as OpenTSDB 2.x takes both)."""
    params: Any = request.query
    if request.method == "POST":
        params = await read_json(request)
        if not isinstance(params, dict):
            raise client_error(ErrorCode.INVALID_REQUEST, detail="the body must be a JSON object: type, q, max")
    _, registry = await request.app[TARGET].lookup()
    if registry is not None:
        await registry.catch_up()   # a shared store: other brokers' series too
        await registry.indexed()
    return _json(tsdb_query.suggest(registry, params))


# -- the sub-application --------------------------------------------------------------------------

# Every verb of the door and its Action (broker/auth/roles.py).
ROUTES: list[tuple[str, str, Handler, Action]] = [
    ("POST", "/api/put", put, Action.WRITE),
    ("GET", "/api/query", query, Action.READ),
    ("POST", "/api/query", query, Action.READ),
    ("GET", "/api/suggest", suggest, Action.READ),
    ("POST", "/api/suggest", suggest, Action.READ),
]


def build_app(broker: Broker, config: HttpConfig, target: TsdbStream, auth: Auth | None = None) -> web.Application:
    """The door; mount it with `mount`. `target`: the tsdb stream, shared by every app that serves
    this door (the HTTP port and `--tsdb-port`), so one registry decides every series' type. With
    `auth` (enabled), every verb needs an API key of the stream's project."""
    app = door_app(broker, config, TSDB)
    app[TARGET] = target

    def project(_: web.Request, __: Principal) -> str:
        return target.project

    guard = api_key_guard(auth, project) if auth is not None and auth.enabled else None
    add_routes(app, [(m, p + tail, h, a) for m, p, h, a in ROUTES for tail in ("", "/")], guard)
    return app


def mount(root: web.Application, door: web.Application) -> None:
    """Mount the door on the root app under its paths, by rule (see timeplus.mount)."""
    mount_by_rule(root, PATHS, door)
