"""The Timeplus v1beta2 REST door: what the unmodified `timeplus` SDK (1.4.1) sends and reads, as
shared/spec/timeplus-api.md gives it. Decoding and rendering only: typed rows are checked and
encoded by broker/rows, queries compiled and run by the core (core/queries.py over broker/query).

Paths: `/{workspace}/api/v1beta2/...` and `/api/v1beta2/...` (workspace `default`). The workspace
is the project namespace: a Timeplus stream `s` in workspace `ws1` is the DIS stream `s` of
project `ws1`. A stream made by another door (no schema) is listed with one `raw string` column.
Workspaces named `v2` or `sluice` are shadowed by the DIS and tail doors' prefixes.

The SDK sends `Content-Type: application/json` on every request (GET and raw ingest too) and
the 4-byte body `null` on DELETE and cancel: neither is checked where it means nothing.
Errors are Timeplus ErrorResponse bodies `{"code", "message", "system"}` (render.py `TIMEPLUS`).

With an auth file every request carries an API key (`X-Api-Key`, as the SDK sends it, or
`Authorization: ApiKey K` / `Bearer K`): its workspace must be the path's, and a path without a
workspace means the key's own (not `default`); its role must permit the route's Action.
"""
from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import HttpVersion11, web

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
    key_revoked,
    mount_by_rule,
    principal,
    read_body,
    read_json,
    request_id,
    revoked_message,
    write_or_drop,
)
from broker.api.limits import subscriber
from broker.api.render import TIMEPLUS
from broker.auth import Action, Auth, Principal, permits
from broker.core.broker import Broker
from broker.core.limits import check_project, check_text
from broker.core.queries import QueryRun
from broker.errors import BrokerError, ErrorCode, client_error
from broker.model import DEFAULT_PROJECT, StreamConfig
from broker.rows.encode import RowEncoder
from broker.rows.ingest import choose_format, decode
from broker.rows.schema import build_schema, columns_of
from broker.sources.manager import Source, Sources
from broker.sources.props import redacted

# The paths this door owns, for the error middleware and the sub-application's matching rule.
PATHS = re.compile(r"/(?:[^/]*/)?api/v1beta[12](?:/|$)")
STREAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # Timeplus' rule for new streams [docs]
DEFAULT_SHARDS = 1
# Batching policy defaults and bounds [ours]: the spec's defaults, a cap that keeps one SSE event
# reasonable, and a floor of 1 ms for time_ms (0 would flush on every row anyway).
DEFAULT_BATCH = (1000, 100)
MAX_BATCH_COUNT = 100_000
METRICS_EVERY_S = 1.0


def _door(request: web.Request) -> tuple[Broker, str]:
    """The broker and the workspace, checked as a project name on every route: the query and source
    routes reach nothing that checks it (`select 1` ran in workspace `é`, lists answered [])."""
    workspace = request.match_info.get("workspace")
    if workspace is None:   # `/api/...`: the key's workspace when keys are checked, else `default`
        who = principal(request)
        workspace = who.project if who is not None else DEFAULT_PROJECT
    return request.app[BROKER], check_project(workspace)


def _workspace(request: web.Request, who: Principal) -> str:
    return request.match_info.get("workspace") or who.project


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- streams --------------------------------------------------------------------------------------

def _stream_body(c: StreamConfig) -> dict[str, Any]:
    """Stream JSON with every field the SDK's model requires (spec section 3)."""
    s = c.schema
    columns = [{"name": col.name, "type": col.type, "nullable": col.type.startswith("nullable("),
                "default": col.default, "codec": ""} for col in columns_of(s)]
    return {"name": c.stream_name, "columns": columns, "description": s.description if s else "",
            "engine": "Stream", "logstore_retention_bytes": s.logstore_retention_bytes if s else -1,
            "logstore_retention_ms": c.retention_ms, "mode": s.mode if s else "append", "ttl": "",
            "ttl_expression": s.ttl_expression if s else "", "primary_key": "", "is_external": False,
            "created_at": _iso(c.created_ms), "last_updated_at": _iso(c.created_ms), "shards": c.partition_count}


async def create_stream(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    body = await read_json(request)
    name = field(body, "name", str, required=True)
    if not STREAM_NAME.fullmatch(name):
        raise client_error(ErrorCode.INVALID_REQUEST, detail="name must be 1-64 letters, digits or _, starting "
                                                             "with a letter")
    shards = field(body, "shards", int)
    if shards is not None and shards < 1:   # named as the client wrote it, not the core's partition_count
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"shards must be a positive integer, got {shards}")
    retention_ms = field(body, "logstore_retention_ms", int)
    hours = _hours(retention_ms) if retention_ms is not None and retention_ms > 0 else None
    schema = build_schema(body)
    config = await broker.create_stream(name, DEFAULT_SHARDS if shards is None else shards, hours,
                                        project=workspace, schema=schema)
    return json_response(_stream_body(config), status=201)


def _hours(retention_ms: int) -> int:
    if retention_ms % 3_600_000:
        raise client_error(ErrorCode.INVALID_REQUEST, detail="logstore_retention_ms must be whole hours")
    return retention_ms // 3_600_000


async def update_stream(request: web.Request) -> web.Response:
    """PATCH (spec section 3; the SDK's UpdateStreamRequest): the retention-related settings and
    the description; each field given changes, one left out or null stays. logstore_retention_ms
    sets the retention (whole hours within the broker's bounds; 0 or below: the broker's default,
    as at creation); a stream made by another door (no schema) takes only that. 204."""
    broker, workspace = _door(request)
    body = await read_json(request)
    changes: dict[str, object] = {}
    for name in ("description", "ttl_expression"):
        if (text := field(body, name, str)) is not None:
            changes[name] = check_text(name, text)
    if (retention_bytes := field(body, "logstore_retention_bytes", int)) is not None:
        changes["logstore_retention_bytes"] = retention_bytes
    retention_ms = field(body, "logstore_retention_ms", int)   # the stream's own retention, not the schema's
    hours = None if retention_ms is None else \
        _hours(retention_ms) if retention_ms > 0 else broker.limits.default_retention_hours
    await broker.update_stream(request.match_info["name"], project=workspace, retention_hours=hours, **changes)
    return web.Response(status=204)


async def list_streams(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    out: list[dict[str, Any]] = []
    start_after = None
    while True:
        page = await broker.list_streams(broker.limits.max_list_limit, start_after, project=workspace)
        out += (_stream_body(c) for c in page.streams)
        if not page.has_more or not page.streams:
            return json_response(out)
        start_after = page.streams[-1].stream_name


async def get_stream(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    described = await broker.describe_stream(request.match_info["name"], limit=1, project=workspace)
    return json_response(_stream_body(described.config))


async def delete_stream(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    await broker.delete_stream(request.match_info["name"], project=workspace)
    return web.Response(status=204)


async def stream_stats(request: web.Request) -> web.Response:
    """StreamStats: rows retained; event times are the append times of the oldest and newest
    records."""
    broker, workspace = _door(request)
    name = request.match_info["name"]
    rows, first_ts, last_ts = 0, 0, 0
    start_after: int | None = None
    while True:
        page = await broker.describe_stream(name, start_after, broker.limits.max_partition_page, project=workspace)
        for p in page.partitions:
            held = p.bounds.next_seq - p.bounds.first_seq
            if held:
                rows += held
                last_ts = max(last_ts, p.bounds.last_ts)
                cursor = await broker.get_cursor(name, p.partition, "TRIM_HORIZON", project=workspace)
                # a look, not a consumer's read: neither records_out nor a GetRecords in the metrics
                oldest = (await broker.get_records(cursor, 1, project=workspace, counted=False)).records
                if oldest:
                    first_ts = min(first_ts or oldest[0].timestamp_ms, oldest[0].timestamp_ms)
        if not page.has_more_partitions:
            break
        start_after = page.partitions[-1].partition
    return json_response({"row_count": rows, "historical_data_bytes": 0, "streaming_data_bytes": 0,
                          "earliest_event": _iso(first_ts) if rows else "",
                          "latest_event": _iso(last_ts) if rows else ""})


# -- ingest ---------------------------------------------------------------------------------------

# Bodies above this are decoded off the event loop: a 12 MiB `lines` body is a million rows,
# about a second of encoding that other requests must not wait behind. The cost is per row
# (~0.7 us), so the bound is set by the smallest rows: 256 KiB of one-letter lines held the loop
# ~90 ms, 64 KiB holds it ~25 ms; a 500-row body of ordinary rows (~25-40 KiB) stays inline.
_INLINE_DECODE_BYTES = 64 * 1024


class _Encoders:
    """One RowEncoder per stream (it caches parsed datetime texts), keyed by stream id, so a stream
    recreated under the same name gets a new one; entries of deleted streams are dropped."""

    def __init__(self) -> None:
        self._by_id: dict[int, RowEncoder] = {}

    def of(self, broker: Broker, config: StreamConfig) -> RowEncoder:
        encoder = self._by_id.get(config.stream_id)
        if encoder is None:
            live = {c.stream_id for c in broker.catalogue.all()}
            self._by_id = {sid: e for sid, e in self._by_id.items() if sid in live}
            encoder = self._by_id[config.stream_id] = RowEncoder(config.schema)
        return encoder


ENCODERS = web.AppKey("row_encoders", _Encoders)


async def ingest(request: web.Request) -> web.Response:
    """Rows in one of the four formats, checked against the schema, appended as one batch per
    partition. The rows go to the stream they were checked against: if it was deleted (and
    maybe recreated) meanwhile, the answer is STREAM_NOT_FOUND and nothing is written. On a store
    several brokers share, a refusal (rows that do not fit the schema, a stream the store no longer
    has) may come from this broker's view of a stream deleted and made again through another broker
    a moment ago, its event still on the way: the rows are then checked against the stream the name
    holds now (Broker.stream_again) and go to it."""
    broker, workspace = _door(request)
    name = request.match_info["name"]
    config = await broker.stream_config(name, project=workspace)
    fmt = choose_format(request.query.get("format"), request.headers.get("Content-Type"))
    body = await read_body(request)
    try:
        await _ingest_into(request, broker, config, fmt, body)
    except BrokerError as exc:
        if exc.code not in (ErrorCode.INVALID_REQUEST, ErrorCode.BAD_ROW, ErrorCode.STREAM_NOT_FOUND):
            raise
        again = await broker.stream_again(config)
        if again is None:
            raise
        await _ingest_into(request, broker, again, fmt, body)
    return web.Response(status=200)


async def _ingest_into(request: web.Request, broker: Broker, config: StreamConfig, fmt: str, body: bytes) -> None:
    """The body's rows checked against `config`'s schema and appended to that stream (see ingest)."""
    encoder = request.app[ENCODERS].of(broker, config)
    now_ms = time.time_ns() // 1_000_000
    if len(body) > _INLINE_DECODE_BYTES:
        rows = await asyncio.to_thread(decode, fmt, body, encoder, now_ms)
    else:
        rows = decode(fmt, body, encoder, now_ms)
    if rows:
        await broker.append_rows(config.stream_name, rows, project=config.project, stream_id=config.stream_id)


# -- queries --------------------------------------------------------------------------------------

def _query_body(run: QueryRun) -> dict[str, Any]:
    """Query JSON (spec section 5): every field the SDK's model requires."""
    plan = run.plan
    end_ms = run.end_ms or 0
    now_ms = end_ms or int(time.time() * 1000)
    return {"id": run.id, "name": run.name, "description": run.description, "sql": run.sql, "tags": run.tags,
            "status": run.status, "message": run.message, "start_time": run.start_ms // 1000,
            "end_time": end_ms // 1000, "duration": (now_ms - run.start_ms) // 1000,
            "response_time": now_ms - run.start_ms,
            "result": {"header": [{"name": n, "type": t} for n, t in plan.header]},
            "timeColumns": plan.time_columns, "analysis": plan.analysis,
            "created_at": _iso(run.start_ms), "created_by": {"id": "", "name": ""}}


def _batching(body: dict[str, Any]) -> tuple[int, float]:
    policy = body.get("batching_policy")
    if policy is None:
        count, time_ms = DEFAULT_BATCH
    elif not isinstance(policy, dict):
        raise client_error(ErrorCode.INVALID_REQUEST, detail="batching_policy must be an object")
    else:
        count = field(policy, "count", int) or DEFAULT_BATCH[0]
        time_ms = field(policy, "time_ms", int) or DEFAULT_BATCH[1]
        if not 1 <= count <= MAX_BATCH_COUNT or time_ms < 1:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"batching_policy.count must be within "
                               f"[1, {MAX_BATCH_COUNT}] and time_ms at least 1")
    return count, time_ms / 1000


def _event(name: str | None, payload: Any) -> bytes:
    head = b"event: %s\n" % name.encode() if name else b""
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


@subscriber   # one of the client's subscriptions while it streams (api/limits.py)
async def create_query(request: web.Request) -> web.StreamResponse:
    """Start a query and stream it as server-sent events: the query object, then row batches
    honouring the batching policy, `metrics` every second, and once the query has ended (a
    bounded query done; a streaming one failed - its stream deleted -, canceled, or stopped by a
    shutdown) the final query object, whose status and message say why. Errors before any SSE
    byte are ErrorResponse bodies."""
    broker, workspace = _door(request)
    body = await read_json(request)
    sql = field(body, "sql", str, required=True)
    count, linger = _batching(body)
    run = await broker.queries.start(workspace, sql, body.get("name"), body.get("description"), body.get("tags"),
                                     client=request.remote or "")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": request_id(request)})
    if request.version >= HttpVersion11:   # HTTP/1.0 has no chunks (aiohttp refused: a 500); its body ends
        response.enable_chunked_encoding()  # at the close, and urllib3 hands nothing over from such a body
    try:
        try:
            await response.prepare(request)
        except ConnectionResetError:   # the consumer left at once: not the broker's error
            return response
        if not await write_or_drop(request, response, _event("query", _query_body(run))):
            return response
        if await _stream_results(request, response, run, count, linger):
            await write_or_drop(request, response, _event("query", _query_body(run)))
        await end_or_drop(request, response)
    finally:
        if run.running:   # the consumer went away (or we are being cancelled): stop the query
            await broker.queries.cancel(workspace, run.id)
        run.release()
    return response


async def _stream_results(request: web.Request, response: web.StreamResponse, run: QueryRun, count: int,
                          linger: float) -> bool:
    """Rows as they come, in events of at most `count` rows; no row waits more than `linger`
    after it arrived (a partial event goes out when the oldest pending row's time is up), and
    `metrics` every second. False if the consumer was dropped."""
    loop = asyncio.get_running_loop()
    pending: list[list[Any]] = []
    due = 0.0   # when the oldest pending row must be sent
    next_metrics = loop.time() + METRICS_EVERY_S
    ended = False
    while True:
        if not ended and key_revoked(request):   # asked at least every second (the metrics tick)
            run.end("failed", revoked_message())
            broker, workspace = _door(request)
            await broker.queries.cancel(workspace, run.id)
            return True   # the final query event says why
        while len(pending) >= count or (pending and (ended or loop.time() >= due)):
            chunk, pending = pending[:count], pending[count:]
            if not await write_or_drop(request, response, _event(None, chunk)):
                return False
        if ended:
            return True
        if loop.time() >= next_metrics:
            if not await write_or_drop(request, response, _event("metrics", run.metrics())):
                return False
            next_metrics = loop.time() + METRICS_EVERY_S
        wait = min(next_metrics, due) if pending else next_metrics
        try:
            async with asyncio.timeout(max(wait - loop.time(), 0)):   # not wait_for: see core/reads._fetch
                item = await run.results.get()
        except TimeoutError:
            continue
        if item is None:   # END
            ended = True
            continue
        if not pending:
            due = loop.time() + linger
        pending += item


async def list_queries(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    tag = request.query.get("tag")
    return json_response([_query_body(r) for r in broker.queries.runs(workspace) if not tag or tag in r.tags])


async def get_query(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    return json_response(_query_body(broker.queries.get(workspace, request.match_info["id"])))


async def cancel_query(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    await broker.queries.cancel(workspace, request.match_info["id"])
    return web.Response(status=204)


async def delete_query(request: web.Request) -> web.Response:
    broker, workspace = _door(request)
    await broker.queries.cancel(workspace, request.match_info["id"], forget=True)
    return web.Response(status=204)


async def analyze(request: web.Request) -> web.Response:
    """SQLAnalyzeResult: what the dbapi reads (is_streaming, query_type) and the rest."""
    broker, workspace = _door(request)
    body = await read_json(request)
    plan = await broker.queries.compile_known(workspace, field(body, "sql", str, required=True))
    return json_response(plan.analysis)


# -- sources ---------------------------------------------------------------------------------------

SOURCES = web.AppKey("sources", Sources)


def _source_body(source: Source, secrets: bool = True) -> dict[str, Any]:
    """Source JSON (spec section 6): the fields the SDK's model requires, and our counters.
    `secrets` False: the properties as a role that may not manage sources sees them (redacted)."""
    d, st = source.definition, source.state
    return {"id": d.id, "name": d.name, "description": d.description, "type": d.type, "stream": d.stream,
            "properties": d.properties if secrets else redacted(d.properties), "status": st.status,
            "message": st.message,
            "start_time": d.started_ms // 1000, "created_at": _iso(d.created_ms),
            "last_updated_at": _iso(d.updated_ms), "created_by": {"id": "", "name": ""},
            "last_updated_by": {"id": "", "name": ""}, "stats": _counters(source)}


def _counters(source: Source) -> dict[str, Any]:
    st = source.state
    return {"messages_in": st.messages_in, "rows_written": st.rows_written, "error_count": st.errors,
            "last_error": st.last_error, "last_error_time": _iso(st.last_error_ms) if st.last_error_ms else "",
            "last_event_time": _iso(st.last_event_ms) if st.last_event_ms else "", "lag": st.lag}


async def create_source(request: web.Request) -> web.Response:
    _, workspace = _door(request)
    source = await request.app[SOURCES].create(workspace, await read_json(request))
    return json_response(_source_body(source), status=201)


async def list_sources(request: web.Request) -> web.Response:
    _, workspace = _door(request)
    secrets = _may_manage(request)
    return json_response([_source_body(s, secrets) for s in await request.app[SOURCES].find_all(workspace)])


async def get_source(request: web.Request) -> web.Response:
    _, workspace = _door(request)
    return json_response(_source_body(await request.app[SOURCES].find(workspace, request.match_info["id"]),
                                      _may_manage(request)))


def _may_manage(request: web.Request) -> bool:
    """Whether the caller's role may manage (on an open broker: anyone)."""
    who = principal(request)
    return who is None or permits(who.role, Action.MANAGE)


async def update_source(request: web.Request) -> web.Response:
    _, workspace = _door(request)
    source = await request.app[SOURCES].update(workspace, request.match_info["id"], await read_json(request))
    return json_response(_source_body(source))


async def delete_source(request: web.Request) -> web.Response:
    _, workspace = _door(request)
    await request.app[SOURCES].delete(workspace, request.match_info["id"])
    return web.Response(status=204)


async def start_source(request: web.Request) -> web.Response:
    _, workspace = _door(request)
    await request.app[SOURCES].start_source(workspace, request.match_info["id"])
    return web.Response(status=204)


async def stop_source(request: web.Request) -> web.Response:
    _, workspace = _door(request)
    await request.app[SOURCES].stop_source(workspace, request.match_info["id"])
    return web.Response(status=204)


async def source_stats(request: web.Request) -> web.Response:
    """Stats (the SDK's model: errors, failure_count, success_count, throughput) from this
    broker's run of the source, plus our counters. The time-range parameters are accepted; the
    log and the throughput cover what is kept (the last 20 errors, the last 60 seconds)."""
    _, workspace = _door(request)
    source = await request.app[SOURCES].find(workspace, request.match_info["id"])
    st = source.state
    return json_response({"errors": [{"message": m, "time": _iso(ms)} for ms, m in st.error_log],
                          "failure_count": st.errors, "success_count": st.rows_written,
                          "throughput": [{"time": _iso(sec * 1000), "value": rows} for sec, rows in st.throughput()],
                          "status": st.status, "message": st.message, **_counters(source)})


# -- the sub-application --------------------------------------------------------------------------

# Every verb of the door and its Action (broker/auth/roles.py).
ROUTES: list[tuple[str, str, Handler, Action]] = [
    ("POST", "/v1beta2/streams", create_stream, Action.MANAGE),
    ("GET", "/v1beta2/streams", list_streams, Action.DESCRIBE),
    ("GET", "/v1beta2/streams/{name}", get_stream, Action.DESCRIBE),
    ("DELETE", "/v1beta2/streams/{name}", delete_stream, Action.MANAGE),
    ("PATCH", "/v1beta2/streams/{name}", update_stream, Action.MANAGE),
    ("GET", "/v1beta2/streams/{name}/stats", stream_stats, Action.DESCRIBE),
    ("POST", "/v1beta2/streams/{name}/ingest", ingest, Action.WRITE),
    ("POST", "/v1beta1/streams/{name}/ingest", ingest, Action.WRITE),   # the older docs' path
    ("POST", "/v1beta2/queries", create_query, Action.READ),
    ("GET", "/v1beta2/queries", list_queries, Action.DESCRIBE),
    ("GET", "/v1beta2/queries/{id}", get_query, Action.DESCRIBE),
    ("DELETE", "/v1beta2/queries/{id}", delete_query, Action.READ),       # the reader's own work
    ("POST", "/v1beta2/queries/{id}/cancel", cancel_query, Action.READ),
    ("POST", "/v1beta2/sqlanalyze", analyze, Action.DESCRIBE),
    ("POST", "/v1beta2/sources", create_source, Action.MANAGE),
    ("GET", "/v1beta2/sources", list_sources, Action.DESCRIBE),
    ("GET", "/v1beta2/sources/{id}", get_source, Action.DESCRIBE),
    ("PUT", "/v1beta2/sources/{id}", update_source, Action.MANAGE),
    ("DELETE", "/v1beta2/sources/{id}", delete_source, Action.MANAGE),
    ("POST", "/v1beta2/sources/{id}/start", start_source, Action.MANAGE),
    ("POST", "/v1beta2/sources/{id}/stop", stop_source, Action.MANAGE),
    ("GET", "/v1beta2/sources/{id}/stats", source_stats, Action.DESCRIBE),
]


def build_app(broker: Broker, config: HttpConfig, sources: Sources, auth: Auth | None = None) -> web.Application:
    """The Timeplus door; mount it with `mount` (its paths have a variable first segment). With
    `auth` (enabled), every verb needs an API key of the workspace whose role permits it."""
    app = door_app(broker, config, TIMEPLUS)
    app[ENCODERS] = _Encoders()
    app[SOURCES] = sources
    guard = api_key_guard(auth, _workspace) if auth is not None and auth.enabled else None
    # `//api`: the SDK's dbapi with its default path "" (the default workspace)
    add_routes(app, ROUTES, guard, prefixes=("/api", "//api", "/{workspace}/api"))
    return app


def mount(root: web.Application, door: web.Application) -> None:
    """Mount the door on the root app under its paths (an aiohttp prefix cannot be variable, so
    it is a rule-matched sub-application, like aiohttp's own add_domain)."""
    mount_by_rule(root, PATHS, door)
