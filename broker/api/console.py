"""The web console (issue 12): a single page served at `/console` on the HTTP port, and the small
JSON API it calls under `/console/api/...`. The page's files are in broker/api/console/ (plain
HTML, CSS and ES modules: no build step, nothing fetched from elsewhere); they hold no data and
are served without a key. Every API handler is thin: one or a few Broker (or Sources) calls.

    GET    /console/api/projects                      projects with streams (with auth: the key's own)
    GET    /console/api/streams                       a page of the project's streams (?offset=&limit=
                                                      &filter=), ONE call: partitions, records held,
                                                      the first partitions' ranges, record counters
    POST   /console/api/streams                       {"name", "partitions", "retention_hours"}
    GET    /console/api/streams/{name}                partitions (ranges, status, hash ranges) + counters
    DELETE /console/api/streams/{name}
    GET    /console/api/streams/{name}/records        a page of records: partition + cursor_type
                                                      (+ seq / timestamp), or cursor (the next page)
    POST   /console/api/streams/{name}/records        {"data" (text), "partition_key" | "partition_id"}
    GET    /console/api/apps                          apps; POST {"name"} creates, DELETE /apps/{name}
    GET    /console/api/apps/{name}/lag               checkpoints and lag per partition, per stream
    GET    /console/api/sources                       status and counters; POST .../{id}/start|stop
    POST   /console/api/queries                       {"sql"}: NDJSON lines as the query runs
    POST   /console/api/queries/{id}/cancel

Write routes (POST, DELETE) take `Content-Type: application/json` (400 BAD_BODY otherwise, even
without a body) and refuse `Sec-Fetch-Site: cross-site` (403 PERMISSION_DENIED): a page of another
site cannot send either without a CORS preflight, which this door never grants.

The project is the `project` query parameter (default `default`). With an auth file every API
route takes an API key (`X-Api-Key` or `Authorization: Bearer K`) of that project whose role
permits the route's Action, like the Timeplus door. Errors are Timeplus-style bodies
`{"code", "message", "system", "reason"}` (render.py TIMEPLUS). Live tail: the page reads the SSE tail
(/sluice/v1/tail) with fetch(), which can send the key where EventSource cannot.

The query stream is NDJSON, one object a line: `{"query": {"id", "header"}}` first, then
`{"rows": [...]}` (at most QUERY_LINE_ROWS a line) as results come, `{"metrics": {...}}` every
second, `{"end": {"status", "message"}}` last. A client that goes away cancels its query.
"""
from __future__ import annotations

import asyncio
import binascii
import functools
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from broker.api.http import (
    BROKER,
    Handler,
    HttpConfig,
    add_routes,
    api_key_guard,
    door_app,
    end_or_drop,
    field,
    json_response,
    key_project,
    key_revoked,
    principal,
    query_int,
    query_project,
    query_str,
    read_json,
    request_id,
    revoked_message,
    write_or_drop,
)
from broker.api.limits import subscriber
from broker.api.render import TIMEPLUS
from broker.auth import Action, Auth
from broker.core.broker import Broker
from broker.core.catalogue import StreamSummary
from broker.core.limits import check_project
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import DEFAULT_PROJECT, PutEntry
from broker.sources.manager import Source, Sources

PREFIX = "/console"
ASSETS = Path(__file__).with_name("console")   # the page's files (package data)
_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png",
          ".svg": "image/svg+xml"}
STREAMS_PAGE = 100           # default streams per page of the list
MAX_STREAMS_PAGE = 1000
RECORDS_PAGE = 100           # default records per browser page
MAX_RECORDS_PAGE = 1000
QUERY_LINE_ROWS = 1000       # rows a query line holds at most (the page parses a line at a time)
METRICS_EVERY_S = 1.0        # the query stream's metrics line (and the check that its reader is there)
SOURCES = web.AppKey("console_sources", Sources)
# The page loads nothing from elsewhere and has no inline script or style; it is not to be
# framed, takes no <base> and submits forms nowhere else.
_PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"}


def _door(request: web.Request) -> tuple[Broker, str]:
    """The broker and the project, checked as a project name on every route: the query routes
    reach nothing that checks it (a query ran `select 1` in project `bad p`)."""
    return request.app[BROKER], check_project(query_project(request))


def _counts(values: list[int], n: int) -> list[int]:
    """A per-partition counter list (it grows as partitions are written) as exactly n values."""
    return (values + [0] * n)[:n]


# -- writes only from the console's own pages ------------------------------------------------------

def _not_cross_site(handler: Handler) -> Handler:
    """A write route takes only what a page of another site cannot send without the browser's
    CORS preflight (which this door never answers yes to): `Content-Type: application/json`
    (BAD_BODY otherwise: a form or a text/plain fetch is a "simple" request, sent at once), and
    no `Sec-Fetch-Site: cross-site` (PERMISSION_DENIED). The console page sends both right; a
    script (curl) sends the content type. Only this door. A part of each write handler (not a
    per-request wrapper added with auth), so it runs on an open broker too."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
            raise client_error(ErrorCode.PERMISSION_DENIED, detail="a console write from another site is refused")
        if "Content-Type" not in request.headers or request.content_type != "application/json":
            raise client_error(ErrorCode.BAD_BODY, detail="the console's write routes take "
                                                          "Content-Type: application/json")
        return await handler(request)

    checked.refuses_cross_site = True   # type: ignore[attr-defined]  # (tests: every write route has it)
    return checked


# -- the page's files -------------------------------------------------------------------------------

def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file of the page, read once: name -> (bytes, content type). Only these are served."""
    return {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in sorted(ASSETS.iterdir())
            if p.is_file() and p.suffix in _TYPES}


ASSET_FILES = web.AppKey("console_assets", dict)


async def redirect(request: web.Request) -> web.Response:
    """`/console` -> `/console/` (a response, not aiohttp's HTTPFound: the error middleware would
    render that exception as an error)."""
    return web.Response(status=302, headers={"Location": PREFIX + "/"})


async def asset(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    found = request.app[ASSET_FILES].get(name)
    if found is None:
        raise client_error(ErrorCode.UNKNOWN_ROUTE, method=request.method, path=request.path)
    body, content_type = found
    return web.Response(body=body, content_type=content_type, headers=_PAGE_HEADERS)


# -- streams ---------------------------------------------------------------------------------------

async def list_projects(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    who = principal(request)
    if who is not None:   # a key sees its own project only
        return json_response({"projects": [who.project], "key_project": who.project})
    found = {c.project for c in broker.catalogue.all()} | {DEFAULT_PROJECT}
    return json_response({"projects": sorted(found), "key_project": None})


def _stream_row(broker: Broker, summary: StreamSummary) -> dict[str, Any]:
    """A row of the streams table. Sequence numbers and counts of records held are strings
    (JavaScript's numbers are exact only up to 2^53)."""
    config = summary.config
    stats = broker.stats.streams.get(config.stream_id)
    return {"name": config.stream_name, "partitions": config.partition_count,
            "readable_partitions": config.readable_partition_count, "retention_hours": config.retention_hours,
            "data_type": config.data_type, "typed": config.schema is not None, "created_ms": config.created_ms,
            "records": str(summary.records), "last_ts": summary.last_ts,
            "ranges": [[str(b.first_seq), str(b.next_seq)] for b in summary.first],
            "put_records": sum(stats.put_records) if stats else 0, "put_bytes": sum(stats.put_bytes) if stats else 0}


async def list_streams(request: web.Request) -> web.Response:
    """A page of the project's streams (name order; `filter` keeps names containing it, any
    case; `offset`, `limit` up to MAX_STREAMS_PAGE) with what the streams table shows: records
    held summed per stream and the ranges of its first partitions (the Stream page has them all).
    One answer for the page, not one request per stream; the summaries behind it are shared by
    concurrent callers and kept ~1 s (StreamCatalogue.summaries). The page computes rates from
    two samples."""
    broker, project = _door(request)
    offset, limit = query_int(request, "offset"), query_int(request, "limit")
    offset = 0 if offset is None else offset
    limit = STREAMS_PAGE if limit is None else limit
    if offset < 0 or not 1 <= limit <= MAX_STREAMS_PAGE:
        raise client_error(ErrorCode.INVALID_REQUEST,
                           detail=f"offset must be >= 0 and limit within [1, {MAX_STREAMS_PAGE}]")
    wanted = (query_str(request, "filter") or "").strip().lower()
    summaries = await broker.stream_summaries(project=project)
    matched = [s for s in summaries if wanted in s.config.stream_name.lower()] if wanted else summaries
    rows = [_stream_row(broker, s) for s in matched[offset:offset + limit]]
    return json_response({"project": project, "total": len(summaries), "matched": len(matched),
                          "offset": offset, "limit": limit, "streams": rows})


@_not_cross_site
async def create_stream(request: web.Request) -> web.Response:
    broker, project = _door(request)
    body = await read_json(request)
    config = await broker.create_stream(field(body, "name", str, required=True),
                                        field(body, "partitions", int, required=True),
                                        field(body, "retention_hours", int), project=project)
    return json_response({"name": config.stream_name, "partitions": config.partition_count}, status=201)


@_not_cross_site
async def delete_stream(request: web.Request) -> web.Response:
    broker, project = _door(request)
    await broker.delete_stream(request.match_info["name"], project=project)
    return web.Response(status=204)


async def describe_stream(request: web.Request) -> web.Response:
    """The stream's partitions (first page of up to Limits.max_partition_page) and per partition
    cumulative records/bytes in and out, sampled by the page for its rate charts. Sequence
    numbers are strings, as everywhere in this API (JavaScript's numbers are exact to 2^53 only)."""
    broker, project = _door(request)
    d = await broker.describe_stream(request.match_info["name"], limit=broker.limits.max_partition_page,
                                     project=project)
    c = d.config
    stats = broker.stats.streams.get(c.stream_id)
    n = c.readable_partition_count
    counters = {"put_records": _counts(stats.put_records, n) if stats else [0] * n,
                "put_bytes": _counts(stats.put_bytes, n) if stats else [0] * n,
                "get_records": _counts(stats.get_records, n) if stats else [0] * n,
                "get_bytes": _counts(stats.get_bytes, n) if stats else [0] * n}
    partitions = [{"partition": p.partition, "status": p.status, "hash_range": [str(p.hash_lo), str(p.hash_hi)],
                   "first_seq": str(p.bounds.first_seq), "next_seq": str(p.bounds.next_seq),
                   "last_ts": p.bounds.last_ts, "parents": list(p.parent_partitions)} for p in d.partitions]
    return json_response({"name": c.stream_name, "partitions": c.partition_count, "readable_partitions": n,
                          "retention_hours": c.retention_hours, "data_type": c.data_type,
                          "created_ms": c.created_ms, "scale_events": len(c.scale_events),
                          "columns": [[col.name, col.type] for col in c.schema.columns] if c.schema else None,
                          "partition_list": partitions, "has_more_partitions": d.has_more_partitions,
                          "counters": counters})


# -- records ---------------------------------------------------------------------------------------

async def get_records(request: web.Request) -> web.Response:
    """A page of records (data base64, decoded by the page) and the cursor of the next page. Either
    `cursor` (from the last page) or `partition` + `cursor_type` (+ `seq` for AT_/AFTER_SEQUENCE_NUMBER,
    `timestamp` in ms for AT_TIMESTAMP)."""
    broker, project = _door(request)
    limit = query_int(request, "limit")
    limit = RECORDS_PAGE if limit is None else limit
    if not 1 <= limit <= MAX_RECORDS_PAGE:
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"limit must be within [1, {MAX_RECORDS_PAGE}]")
    cursor = query_str(request, "cursor") or await broker.get_cursor(
        request.match_info["name"], query_str(request, "partition", required=True),
        query_str(request, "cursor_type") or "TRIM_HORIZON", query_str(request, "seq"),
        query_int(request, "timestamp"), project=project)
    result = await broker.get_records(cursor, limit, project=project)
    b64 = binascii.b2a_base64
    records = [{"seq": str(r.seq), "timestamp_ms": r.timestamp_ms, "partition_key": r.partition_key,
                "data": b64(r.data, newline=False).decode()} for r in result.records]
    return json_response({"records": records, "next_cursor": result.next_cursor,
                          "millis_behind_latest": result.millis_behind_latest})


@_not_cross_site
async def put_record(request: web.Request) -> web.Response:
    """One record from the form: its text as UTF-8, routed by partition key or partition id. A
    refused record is answered with its error (4xx), not a 200 with a failure inside."""
    broker, project = _door(request)
    body = await read_json(request)
    data = field(body, "data", str, required=True)
    key = field(body, "partition_key", str) or None
    pid = body.get("partition_id")
    pid = None if pid in (None, "") else str(field(body, "partition_id", (str, int)))
    if key is None and pid is None:
        raise client_error(ErrorCode.INVALID_REQUEST, detail="partition_key or partition_id is required")
    result = await broker.put_records(request.match_info["name"], [PutEntry(data.encode(), key, None, pid)],
                                      project=project)
    if result.failures:
        raise result.failures[0][1]
    return json_response({"partition": result.partitions[0], "seq": str(result.seqs[0])}, status=201)


# -- apps ------------------------------------------------------------------------------------------

async def list_apps(request: web.Request) -> web.Response:
    broker, project = _door(request)
    out: list[dict[str, Any]] = []
    start_after = None
    while True:
        _, page, more = await broker.list_apps(broker.limits.max_app_page, start_after, project=project)
        out += ({"name": a.name, "app_id": a.app_id, "created_ms": a.created_ms, "streams": list(a.stream_names)}
                for a in page)
        if not more or not page:
            return json_response({"apps": out})
        start_after = page[-1].name


@_not_cross_site
async def create_app(request: web.Request) -> web.Response:
    broker, project = _door(request)
    body = await read_json(request)
    app = await broker.create_app(field(body, "name", str, required=True), project=project)
    return json_response({"name": app.name, "app_id": app.app_id}, status=201)


@_not_cross_site
async def delete_app(request: web.Request) -> web.Response:
    broker, project = _door(request)
    await broker.delete_app(request.match_info["name"], project=project)
    return web.Response(status=204)


async def app_lag(request: web.Request) -> web.Response:
    """Per stream the app has checkpoints on: per partition its checkpoint, the retained range
    and the lag (records after the checkpoint), all as strings."""
    broker, project = _door(request)
    app = await broker.describe_app(request.match_info["name"], project=project)
    streams = []
    for name in app.stream_names:
        try:
            states, more = await broker.consumer_state(app.name, name, limit=broker.limits.max_partition_page,
                                                       project=project)
        except BrokerError as exc:   # deleted meanwhile, or its checkpoints were
            if exc.code in (ErrorCode.STREAM_NOT_FOUND, ErrorCode.APP_NO_CHECKPOINT):
                continue
            raise
        streams.append({"stream": name, "has_more_partitions": more, "partitions": [
            {"partition": s.partition, "checkpoint": None if s.checkpoint is None else str(s.checkpoint.seq),
             "earliest": str(s.earliest), "latest": str(s.latest), "lag": str(s.lag)} for s in states]})
    return json_response({"name": app.name, "streams": streams})


# -- sources ---------------------------------------------------------------------------------------

def _source_row(source: Source) -> dict[str, Any]:
    d, st = source.definition, source.state
    return {"id": d.id, "name": d.name, "type": d.type, "stream": d.stream, "status": st.status,
            "message": st.message, "messages_in": st.messages_in, "rows_written": st.rows_written,
            "errors": st.errors, "last_error": st.last_error, "last_event_ms": st.last_event_ms,
            "lag": None if st.lag is None else str(st.lag)}   # a count of messages at the origin: a string too


async def list_sources(request: web.Request) -> web.Response:
    project = check_project(query_project(request))   # like every other route: a bad name is a 400, not []
    return json_response({"sources": [_source_row(s) for s in await request.app[SOURCES].find_all(project)]})


@_not_cross_site
async def start_source(request: web.Request) -> web.Response:
    source = await request.app[SOURCES].start_source(check_project(query_project(request)), request.match_info["id"])
    return json_response(_source_row(source))


@_not_cross_site
async def stop_source(request: web.Request) -> web.Response:
    source = await request.app[SOURCES].stop_source(check_project(query_project(request)), request.match_info["id"])
    return json_response(_source_row(source))


# -- queries ---------------------------------------------------------------------------------------

def _line(payload: Any) -> bytes:
    return orjson.dumps(payload) + b"\n"


@_not_cross_site
@subscriber   # one of the client's subscriptions while it streams (api/limits.py)
async def run_query(request: web.Request) -> web.StreamResponse:
    """Start a streaming (or bounded) query and stream its results as NDJSON as they arrive. A
    query that does not compile is answered 4xx before any line."""
    broker, project = _door(request)
    body = await read_json(request)
    run = await broker.queries.start(project, field(body, "sql", str, required=True), "console",
                                     client=request.remote or "")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                                           "X-Request-Id": request_id(request)})
    try:
        try:
            await response.prepare(request)
        except ConnectionResetError:   # the tab went away at once: not the broker's error (finally ends it)
            return response
        head = {"id": run.id, "header": [{"name": n, "type": t} for n, t in run.plan.header]}
        if not await write_or_drop(request, response, _line({"query": head})):
            return response
        while True:
            if key_revoked(request):   # asked at least every METRICS_EVERY_S
                run.end("failed", revoked_message())
                await broker.queries.cancel(project, run.id)
                break
            try:
                async with asyncio.timeout(METRICS_EVERY_S):   # not wait_for: see core/reads._fetch
                    rows = await run.results.get()
            except TimeoutError:
                if not await write_or_drop(request, response, _line({"metrics": run.metrics()})):
                    return response
                continue
            if rows is None:   # END
                break
            for at in range(0, len(rows), QUERY_LINE_ROWS):   # a result batch may be 50,000 rows
                if not await write_or_drop(request, response, _line({"rows": rows[at:at + QUERY_LINE_ROWS]})):
                    return response
        await write_or_drop(request, response, _line({"end": {"status": run.status, "message": run.message}}))
        await end_or_drop(request, response)
    finally:
        if run.running:   # the reader went away (or we are being cancelled): stop the query
            await broker.queries.cancel(project, run.id)
        run.release()
    return response


@_not_cross_site
async def cancel_query(request: web.Request) -> web.Response:
    broker, project = _door(request)
    await broker.queries.cancel(project, request.match_info["id"])
    return web.Response(status=204)


# -- the sub-application ---------------------------------------------------------------------------

# Every API verb and its Action (broker/auth/roles.py).
ROUTES: list[tuple[str, str, Handler, Action]] = [
    ("GET", "/api/projects", list_projects, Action.DESCRIBE),
    ("GET", "/api/streams", list_streams, Action.DESCRIBE),
    ("POST", "/api/streams", create_stream, Action.MANAGE),
    ("GET", "/api/streams/{name}", describe_stream, Action.DESCRIBE),
    ("DELETE", "/api/streams/{name}", delete_stream, Action.MANAGE),
    ("GET", "/api/streams/{name}/records", get_records, Action.READ),
    ("POST", "/api/streams/{name}/records", put_record, Action.WRITE),
    ("GET", "/api/apps", list_apps, Action.DESCRIBE),
    ("POST", "/api/apps", create_app, Action.MANAGE),
    ("DELETE", "/api/apps/{name}", delete_app, Action.MANAGE),
    ("GET", "/api/apps/{name}/lag", app_lag, Action.DESCRIBE),
    ("GET", "/api/sources", list_sources, Action.DESCRIBE),
    ("POST", "/api/sources/{id}/start", start_source, Action.MANAGE),
    ("POST", "/api/sources/{id}/stop", stop_source, Action.MANAGE),
    ("POST", "/api/queries", run_query, Action.READ),
    ("POST", "/api/queries/{id}/cancel", cancel_query, Action.READ),
]


def build_app(broker: Broker, config: HttpConfig, sources: Sources, auth: Auth | None = None) -> web.Application:
    """The console, mounted at `PREFIX`: the page's files (no key) and its API (with `auth`
    enabled, an API key of the project whose role permits the route's Action)."""
    app = door_app(broker, config, TIMEPLUS)
    app[SOURCES] = sources
    app[ASSET_FILES] = _load_assets()
    guard = api_key_guard(auth, key_project) if auth is not None and auth.enabled else None
    add_routes(app, ROUTES, guard)
    app.router.add_get("", redirect)
    app.router.add_get("/", asset)
    app.router.add_get("/{name:[A-Za-z0-9_-]+\\.[a-z]+}", asset)
    return app
