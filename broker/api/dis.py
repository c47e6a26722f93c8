"""The DIS v2 REST door: paths, parameter names, status codes and bodies exactly as
shared/spec/dis-api.md gives them (section 2). Decoding and rendering only; rules live in the core.
Mounted by http_app.py as its own sub-application under `/v2`; shared plumbing (bodies, typed
parameters, request ids, timeouts) comes from http.py, error bodies from render.py's `DIS`.

Note the mixed parameter naming is DIS's own: cursors use hyphens (`stream-name`,
`partition-cursor`), other calls underscores, DescribeStream the camel-case `start_partitionId`.
"""
from __future__ import annotations

import binascii
import re
import time
from typing import Any

from aiohttp import web

from broker.api.http import (
    BROKER,
    Guard,
    Handler,
    HttpConfig,
    add_routes,
    door_app,
    field,
    json_response,
    key_revoked,
    query_int,
    read_json,
    read_raw_body,
    remember_principal,
    required_query,
    revoked_error,
    unless_gone,
)
from broker.api.render import DIS
from broker.auth import Action, Auth, signing
from broker.core.apps import AppInfo
from broker.core.broker import Broker
from broker.core.routing import format_partition_id
from broker.errors import ErrorCode, client_error
from broker.model import GetRecordsResult, PutEntry, StreamConfig

PREFIX = "/v2"
_EMPTY = b""


def _decode_entry(raw: Any) -> PutEntry:
    """One request record. Problems become a per-record rejection, never a request failure."""
    if not isinstance(raw, dict):
        return PutEntry(_EMPTY, rejected=client_error(ErrorCode.INVALID_REQUEST, detail="record must be an object"))
    data = raw.get("data")
    if not isinstance(data, str):
        return PutEntry(_EMPTY, rejected=client_error(ErrorCode.INVALID_REQUEST,
                                                      detail="data is required and must be a base64 string"))
    try:
        payload = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return PutEntry(_EMPTY, rejected=client_error(ErrorCode.INVALID_REQUEST, detail="data is not valid base64"))
    key, hash_key, pid = raw.get("partition_key"), raw.get("explicit_hash_key"), raw.get("partition_id")
    if key is not None and not isinstance(key, str):
        return PutEntry(_EMPTY, rejected=client_error(ErrorCode.INVALID_REQUEST,
                                                      detail="partition_key must be a string"))
    # Numbers are accepted for the two numeric-string fields: some clients send them unquoted.
    for name, value in (("explicit_hash_key", hash_key), ("partition_id", pid)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            return PutEntry(_EMPTY, rejected=client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be a string"))
    return PutEntry(payload, key, None if hash_key is None else str(hash_key), None if pid is None else str(pid))


def _stream_info(c: StreamConfig) -> dict[str, Any]:
    return {"stream_name": c.stream_name, "stream_id": str(c.stream_id), "create_time": c.created_ms,
            "retention_period": c.retention_hours, "status": "RUNNING", "stream_type": c.stream_type,
            "data_type": c.data_type, "partition_count": c.partition_count, "auto_scale_enabled": False,
            "tags": [{"key": k, "value": v} for k, v in c.tags],
            "sys_tags": [{"key": k, "value": v} for k, v in c.sys_tags]}


# -- routes ------------------------------------------------------------------------------------

def _door(request: web.Request) -> tuple[Broker, str]:
    """The broker, and the project: the `{project_id}` path segment, a namespace of streams, apps
    and checkpoints (the same stream name in two projects is two streams). The core checks it."""
    return request.app[BROKER], request.match_info["project_id"]


async def create_stream(request: web.Request) -> web.Response:
    """CreateStream (spec 2.1). Sluice does not scale by itself: `auto_scale_enabled` true is
    refused rather than dropped (scale with UpdatePartitionCount); the min/max counts matter only
    with it, as in DIS, and are not kept."""
    broker, project = _door(request)
    body = await read_json(request)
    if field(body, "auto_scale_enabled", bool):
        raise client_error(ErrorCode.INVALID_REQUEST, detail="auto_scale_enabled: Sluice does not scale streams "
                                                             "by itself; scale with UpdatePartitionCount")
    await broker.create_stream(
        field(body, "stream_name", str, required=True), field(body, "partition_count", int, required=True),
        field(body, "data_duration", int), field(body, "data_type", str), field(body, "stream_type", str),
        project=project, tags=body.get("tags"), sys_tags=body.get("sys_tags"))
    return web.Response(status=201)


async def list_streams(request: web.Request) -> web.Response:
    broker, project = _door(request)
    page = await broker.list_streams(query_int(request, "limit"), request.query.get("start_stream_name"),
                                     project=project)
    return json_response({"total_number": page.total, "stream_names": [c.stream_name for c in page.streams],
                          "has_more_streams": page.has_more,
                          "stream_info_list": [_stream_info(c) for c in page.streams]})


async def describe_stream(request: web.Request) -> web.Response:
    broker, project = _door(request)
    desc = await broker.describe_stream(request.match_info["stream_name"], request.query.get("start_partitionId"),
                                        query_int(request, "limit_partitions"), project=project)
    c = desc.config
    # parent_partitions (undocumented by DIS): the partitions whose ranges before the newest scale
    # event overlap this partition's range after it, comma-separated ids ("" none) - Sluice's choice
    partitions = [{"partition_id": format_partition_id(p.partition), "status": p.status,
                   "hash_range": f"[{p.hash_lo} : {p.hash_hi}]",
                   "sequence_number_range": f"[{p.bounds.first_seq} : {p.bounds.last_seq}]",
                   "parent_partitions": ",".join(map(format_partition_id, p.parent_partitions))}
                  for p in desc.partitions]
    history = [{"create_timestamp": e.timestamp_ms, "src_partition_count": e.src_partition_count,
                "target_partition_count": e.target_partition_count, "result_code": 0, "result_msg": 0,
                "auto_scale": e.auto_scale} for e in c.scale_events]
    modified = c.scale_events[-1].timestamp_ms if c.scale_events else c.created_ms
    return json_response({**_stream_info(c), "last_modified_time": modified, "partitions": partitions,
                          "has_more_partitions": desc.has_more_partitions,
                          "writable_partition_count": c.partition_count,
                          "readable_partition_count": c.readable_partition_count,
                          "update_partition_counts": history})


async def update_partition_count(request: web.Request) -> web.Response:
    """UpdatePartitionCount (spec 2.5). The SDK's response model has no fields; other DIS SDKs
    print {stream_name, current_partition_count, target_partition_count}, so that is the body."""
    broker, project = _door(request)
    body = await read_json(request)
    stream_name = request.match_info["stream_name"]
    named = field(body, "stream_name", str, required=True)
    if named != stream_name:
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"stream_name [{named:.64}] in the body differs from "
                                                             f"[{stream_name:.64}] in the path")
    before, after = await broker.update_partition_count(
        stream_name, field(body, "target_partition_count", int, required=True), project=project)
    return json_response({"stream_name": after.stream_name, "current_partition_count": before.partition_count,
                          "target_partition_count": after.partition_count})


async def delete_stream(request: web.Request) -> web.Response:
    broker, project = _door(request)
    await broker.delete_stream(request.match_info["stream_name"], project=project)
    return web.Response(status=204)


async def put_records(request: web.Request) -> web.Response:
    broker, project = _door(request)
    body = await read_json(request)
    stream_name = await broker.name_or_id(field(body, "stream_name", str, required=True), body.get("stream_id"),
                                          project=project)
    records = field(body, "records", list, required=True)
    await broker.check_put(stream_name, len(records), project=project)
    result = await broker.put_records(stream_name, [_decode_entry(r) for r in records], project=project)
    out: list[dict[str, Any]] = [{"partition_id": format_partition_id(p), "sequence_number": str(s)}
                                 for p, s in zip(result.partitions, result.seqs)]
    for i, error in result.failures:
        out[i] = DIS.record_failure(error)
    return json_response({"failed_record_count": result.failed_record_count, "records": out})


async def get_cursor(request: web.Request) -> web.Response:
    broker, project = _door(request)
    q = request.query
    cursor = await broker.get_cursor(
        required_query(request, "stream-name"), required_query(request, "partition-id"),
        q.get("cursor-type"), q.get("starting-sequence-number"), query_int(request, "timestamp"), project=project)
    return json_response({"partition_cursor": cursor})


def records_body(result: GetRecordsResult) -> dict[str, Any]:
    """A GetRecords result as DIS renders it (also the payload of an SSE tail event)."""
    b64 = binascii.b2a_base64
    records = []
    for r in result.records:
        item: dict[str, Any] = {"sequence_number": str(r.seq), "data": b64(r.data, newline=False).decode(),
                                "timestamp": r.timestamp_ms, "timestamp_type": "CreateTime"}
        if r.partition_key is not None:
            item["partition_key"] = r.partition_key
        records.append(item)
    return {"records": records, "next_partition_cursor": result.next_cursor,
            "millis_behind_latest": result.millis_behind_latest}


async def get_records(request: web.Request) -> web.Response:
    broker, project = _door(request)
    # `wait_ms` is ours (long poll); DIS clients never send it and get an immediate answer.
    wait_ms = query_int(request, "wait_ms")
    read = broker.get_records(required_query(request, "partition-cursor"), query_int(request, "limit"),
                              query_int(request, "max_fetch_bytes"), wait_ms, project=project)
    # a long poll whose client left ends then, not when its wait does: it holds a request slot
    result = await (unless_gone(request, read) if wait_ms is not None and wait_ms > 0 else read)
    if result is None:
        return web.Response(status=204)   # nobody is there to read it
    if key_revoked(request):   # removed or changed by a reload while the long poll waited
        raise revoked_error()
    return json_response(records_body(result))


# -- apps, checkpoints, consumer state (spec section 2.9, 2.10) -------------------------------------

def _app_body(info: AppInfo) -> dict[str, Any]:
    return {"app_name": info.name, "app_id": info.app_id, "create_time": info.created_ms,
            "commit_checkpoint_stream_names": list(info.stream_names)}


async def create_app(request: web.Request) -> web.Response:
    broker, project = _door(request)
    body = await read_json(request)
    await broker.create_app(field(body, "app_name", str, required=True), project=project)
    return web.Response(status=201)


async def list_apps(request: web.Request) -> web.Response:
    broker, project = _door(request)
    total, page, more = await broker.list_apps(query_int(request, "limit"), request.query.get("start_app_name"),
                                               request.query.get("stream_name"), project=project)
    return json_response({"has_more_app": more, "apps": [_app_body(a) for a in page], "total_number": total})


async def describe_app(request: web.Request) -> web.Response:
    broker, project = _door(request)
    return json_response(_app_body(await broker.describe_app(request.match_info["app_name"], project=project)))


async def delete_app(request: web.Request) -> web.Response:
    broker, project = _door(request)
    await broker.delete_app(request.match_info["app_name"], project=project)
    return web.Response(status=204)


async def consumer_state(request: web.Request) -> web.Response:
    broker, project = _door(request)
    kind = required_query(request, "checkpoint_type")
    app, stream = request.match_info["app_name"], request.match_info["stream_name"]
    states, more = await broker.consumer_state(app, stream, kind, request.query.get("start_partition_id"),
                                               query_int(request, "limit"), project=project)
    rows = []
    for st in states:
        row: dict[str, Any] = {"partition_id": format_partition_id(st.partition), "latest_offset": st.latest,
                               "earliest_offset": st.earliest, "checkpoint_type": kind, "status": st.status}
        if st.checkpoint is not None:
            row["sequence_number"] = str(st.checkpoint.seq)
        rows.append(row)
    return json_response({"has_more": more, "stream_name": stream, "app_name": app,
                          "partition_consuming_states": rows})


async def commit_checkpoint(request: web.Request) -> web.Response:
    broker, project = _door(request)
    body = await read_json(request)
    # numbers are taken for the two numeric strings, as in PutRecords; the core parses both
    pid = field(body, "partition_id", (str, int), required=True)
    seq = field(body, "sequence_number", (str, int), required=True)
    await broker.commit_checkpoint(
        field(body, "app_name", str, required=True), field(body, "stream_name", str, required=True),
        str(pid), str(seq), field(body, "metadata", str), field(body, "checkpoint_type", str, required=True),
        project=project)
    return web.Response(status=201)


def _checkpoint_query(request: web.Request) -> tuple[str, str, str]:
    return (required_query(request, "app_name"), required_query(request, "stream_name"),
            required_query(request, "checkpoint_type"))


async def get_checkpoint(request: web.Request) -> web.Response:
    broker, project = _door(request)
    app, stream, kind = _checkpoint_query(request)
    mark = await broker.get_checkpoint(app, stream, required_query(request, "partition_id"), kind, project=project)
    # No checkpoint yet: 200 without sequence_number (DIS leaves this undocumented; the SDK gives None).
    return json_response({} if mark is None else {"sequence_number": str(mark.seq), "metadata": mark.metadata})


async def delete_checkpoint(request: web.Request) -> web.Response:
    broker, project = _door(request)
    app, stream, kind = _checkpoint_query(request)
    # absent: every partition's; an empty value is a bad partition id, not "all" (a client bug
    # must not delete every checkpoint of the app)
    await broker.delete_checkpoint(app, stream, request.query.get("partition_id"), kind, project=project)
    return web.Response(status=204)


# -- monitoring (spec section 3: show_stream_metrics, show_partition_metrics) ----------------------

def _metrics(series: dict[str, list[tuple[int, int]]]) -> list[dict[str, Any]]:
    """DIS `Metrics` objects: note the camel-case `dataPoints` (the SDK's attribute_map)."""
    return [{"label": label, "dataPoints": [{"timestamp": t, "value": v} for t, v in points]}
            for label, points in series.items()]


async def show_stream_metrics(request: web.Request) -> web.Response:
    broker, project = _door(request)
    q = request.query
    series = await broker.stream_metrics(request.match_info["stream_name"], q.get("label"), q.get("label_list"),
                                         q.get("start_time"), q.get("end_time"), project=project)
    metrics = _metrics(series)
    return json_response({"metrics": metrics[0], "metrics_list": metrics})


async def show_partition_metrics(request: web.Request) -> web.Response:
    broker, project = _door(request)
    q = request.query
    series = await broker.stream_metrics(request.match_info["stream_name"], q.get("label"), q.get("label_list"),
                                         q.get("start_time"), q.get("end_time"),
                                         request.match_info["partition_id"], project=project)
    metrics = _metrics(series)
    # DIS's answer has `metrics` only; with a label_list the others follow in `metrics_list` [ours]
    return json_response({"metrics": metrics[0], "metrics_list": metrics})


# -- credentials (spec section 7) -------------------------------------------------------------------

def signature_guard(auth: Auth) -> Guard:
    """The DIS door's check: the Authorization header, its AK and date (before reading the body,
    so an unsigned request costs no body read), the signature over the body's bytes as received
    (shared/spec/dis-api.md 7, step 3.6: a compressed body is not inflated before it is known to
    be the signer's; aiohttp keeps the bytes, so the handler's read_json reads the same ones), then
    `X-Project-Id` against the path (401 DIS.4117), then the AK's project and role (403 DIS.4116).
    The AK is asked for again once the body is in: one a SIGHUP reload removed or changed while
    the body came is 401 DIS.4107, as for a request that came after the reload."""

    def guard(handler: Handler, action: Action) -> Handler:
        async def signed(request: web.Request) -> web.StreamResponse:
            credentials = auth.credentials
            assert credentials is not None
            found = signing.claim(credentials, request.headers.get, time.time())   # before any body byte
            body = await read_raw_body(request)
            url = request.rel_url
            who = signing.check(found, request.method, url.raw_path, url.raw_query_string, request.headers.get, body)
            if not auth.current(who):   # the AK was removed or changed by a reload while the body came
                raise revoked_error()
            project = request.match_info["project_id"]
            claimed = request.headers.get("X-Project-Id")
            if claimed is not None and claimed != project:
                raise client_error(ErrorCode.AUTH_PROJECT_MISMATCH,
                                   detail="X-Project-Id differs from the project of the path")
            Auth.check(who, project, action)
            remember_principal(request, who, auth)
            return await handler(request)
        return signed

    return guard


# Every verb of the door and its Action (broker/auth/roles.py).
ROUTES: list[tuple[str, str, Handler, Action]] = [
    ("POST", "/{project_id}/streams", create_stream, Action.MANAGE),
    ("GET", "/{project_id}/streams", list_streams, Action.DESCRIBE),
    ("GET", "/{project_id}/streams/{stream_name}", describe_stream, Action.DESCRIBE),
    ("DELETE", "/{project_id}/streams/{stream_name}", delete_stream, Action.MANAGE),
    ("PUT", "/{project_id}/streams/{stream_name}", update_partition_count, Action.MANAGE),
    ("POST", "/{project_id}/records", put_records, Action.WRITE),
    ("GET", "/{project_id}/records", get_records, Action.READ),
    ("GET", "/{project_id}/cursors", get_cursor, Action.READ),
    ("POST", "/{project_id}/apps", create_app, Action.MANAGE),
    ("GET", "/{project_id}/apps", list_apps, Action.DESCRIBE),
    ("GET", "/{project_id}/apps/{app_name}", describe_app, Action.DESCRIBE),
    ("DELETE", "/{project_id}/apps/{app_name}", delete_app, Action.MANAGE),
    ("GET", "/{project_id}/apps/{app_name}/streams/{stream_name}", consumer_state, Action.DESCRIBE),
    ("GET", "/{project_id}/streams/{stream_name}/metrics", show_stream_metrics, Action.DESCRIBE),
    ("GET", "/{project_id}/streams/{stream_name}/partitions/{partition_id}/metrics", show_partition_metrics,
     Action.DESCRIBE),
    ("POST", "/{project_id}/checkpoints", commit_checkpoint, Action.CHECKPOINT),
    ("GET", "/{project_id}/checkpoints", get_checkpoint, Action.READ),
    ("DELETE", "/{project_id}/checkpoints", delete_checkpoint, Action.CHECKPOINT),
]


def build_app(broker: Broker, config: HttpConfig, auth: Auth | None = None) -> web.Application:
    """The DIS door, to be mounted at `PREFIX`. Every path with and without a trailing slash:
    older DIS clients append one. With `auth` (enabled), every verb needs a signed request."""
    app = door_app(broker, config, DIS)
    guard = signature_guard(auth) if auth is not None and auth.enabled else None
    add_routes(app, [(m, _any_segment(p + tail), h, a) for m, p, h, a in ROUTES for tail in ("", "/")], guard)
    return app


_VARIABLE = re.compile(r"\{(\w+)\}")


def _any_segment(path: str) -> str:
    """`path` with each `{name}` matching any one segment. aiohttp's own pattern for a variable
    refuses `{` and `}`, so the official SDK built without a project id, which sends the literal
    `/v2/%7Bproject_id%7D/streams` (spec section 8), matched no route and was told
    "Unsupported operation"; now the core's check of the project (or stream, or app) says what
    is wrong with it."""
    return _VARIABLE.sub(r"{\1:[^/]+}", path)
