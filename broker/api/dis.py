"""The DIS v2 REST door: paths, parameter names, status codes and bodies exactly as
shared/spec/dis-api.md gives them (section 2). Decoding and rendering only; rules live in the core.

Note the mixed parameter naming is DIS's own: cursors use hyphens (`stream-name`,
`partition-cursor`), other calls underscores, DescribeStream the camel-case `start_partitionId`.
"""
from __future__ import annotations

import asyncio
import binascii
import re
from typing import Any, Mapping

import orjson
from aiohttp import web

from broker.core.broker import Broker
from broker.core.routing import format_partition_id
from broker.errors import ErrorCode, client_error
from broker.core.apps import AppInfo
from broker.model import GetRecordsResult, PutEntry, StreamConfig

BROKER = web.AppKey("broker", Broker)
BODY_TIMEOUT = web.AppKey("body_timeout", float)

_EMPTY = b""
_DECIMAL = re.compile(r"-?[0-9]+")
_JSON = "application/json"


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=_JSON)


# -- decoding helpers --------------------------------------------------------------------------

async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object. Raises REQUEST_TOO_LARGE, REQUEST_TIMEOUT, BAD_BODY."""
    limit = request.app[BROKER].limits.max_http_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise client_error(ErrorCode.REQUEST_TOO_LARGE, detail=f"body exceeds {limit} bytes")
    try:
        body = await asyncio.wait_for(request.read(), request.app[BODY_TIMEOUT])
    except asyncio.TimeoutError:
        raise client_error(ErrorCode.REQUEST_TIMEOUT) from None
    except web.HTTPRequestEntityTooLarge:
        raise client_error(ErrorCode.REQUEST_TOO_LARGE, detail=f"body exceeds {limit} bytes") from None
    if not body:
        raise client_error(ErrorCode.BAD_BODY, detail="request body is empty")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise client_error(ErrorCode.BAD_BODY, detail=f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise client_error(ErrorCode.BAD_BODY, detail="request body must be a JSON object")
    return obj


def _typed(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], required: bool = False) -> Any:
    value = obj.get(name)
    if value is None:
        if required:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} is required")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be of type {expected}")
    return value


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        if not _DECIMAL.fullmatch(raw):  # int() alone also takes " 5", "1_0" and non-ASCII digits
            raise ValueError(raw)
        return int(raw)
    except ValueError:
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be an integer, got {raw!r:.40}") from None


def _required_query(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"query parameter {name} is required")
    return value


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
        return PutEntry(_EMPTY, rejected=client_error(ErrorCode.INVALID_REQUEST, detail="partition_key must be a string"))
    # Numbers are accepted for the two numeric-string fields: some clients send them unquoted.
    for name, value in (("explicit_hash_key", hash_key), ("partition_id", pid)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            return PutEntry(_EMPTY, rejected=client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be a string"))
    return PutEntry(payload, key, None if hash_key is None else str(hash_key), None if pid is None else str(pid))


def _stream_info(c: StreamConfig) -> dict[str, Any]:
    return {"stream_name": c.stream_name, "stream_id": str(c.stream_id), "create_time": c.created_ms,
            "retention_period": c.retention_hours, "status": "RUNNING", "stream_type": c.stream_type,
            "data_type": c.data_type, "partition_count": c.partition_count, "auto_scale_enabled": False,
            "tags": [], "sys_tags": []}


# -- routes ------------------------------------------------------------------------------------

async def create_stream(request: web.Request) -> web.Response:
    body = await read_json(request)
    await request.app[BROKER].create_stream(
        _typed(body, "stream_name", str, required=True), _typed(body, "partition_count", int, required=True),
        _typed(body, "data_duration", int), _typed(body, "data_type", str), _typed(body, "stream_type", str))
    return web.Response(status=201)


async def list_streams(request: web.Request) -> web.Response:
    page = await request.app[BROKER].list_streams(_query_int(request, "limit"), request.query.get("start_stream_name"))
    return _json({"total_number": page.total, "stream_names": [c.stream_name for c in page.streams],
                  "has_more_streams": page.has_more, "stream_info_list": [_stream_info(c) for c in page.streams]})


async def describe_stream(request: web.Request) -> web.Response:
    desc = await request.app[BROKER].describe_stream(
        request.match_info["stream_name"], request.query.get("start_partitionId"),
        _query_int(request, "limit_partitions"))
    c = desc.config
    partitions = [{"partition_id": format_partition_id(p.partition), "status": "ACTIVE",
                   "hash_range": f"[{p.hash_lo} : {p.hash_hi}]",
                   "sequence_number_range": f"[{p.bounds.first_seq} : {p.bounds.last_seq}]",
                   "parent_partitions": ""}
                  for p in desc.partitions]
    return _json({**_stream_info(c), "last_modified_time": c.created_ms, "partitions": partitions,
                  "has_more_partitions": desc.has_more_partitions,
                  "writable_partition_count": c.partition_count, "readable_partition_count": c.partition_count,
                  "update_partition_counts": []})


async def delete_stream(request: web.Request) -> web.Response:
    await request.app[BROKER].delete_stream(request.match_info["stream_name"])
    return web.Response(status=204)


async def put_records(request: web.Request) -> web.Response:
    body = await read_json(request)
    stream_name = _typed(body, "stream_name", str, required=True)
    records = _typed(body, "records", list, required=True)
    result = await request.app[BROKER].put_records(stream_name, [_decode_entry(r) for r in records])
    out: list[dict[str, Any]] = [{"partition_id": format_partition_id(p), "sequence_number": str(s)}
                                 for p, s in zip(result.partitions, result.seqs)]
    for i, error in result.failures:
        out[i] = {"error_code": error.code.dis_code, "error_message": error.message}
    return _json({"failed_record_count": result.failed_record_count, "records": out})


async def get_cursor(request: web.Request) -> web.Response:
    q = request.query
    cursor = await request.app[BROKER].get_cursor(
        _required_query(request, "stream-name"), _required_query(request, "partition-id"),
        q.get("cursor-type"), q.get("starting-sequence-number"), _query_int(request, "timestamp"))
    return _json({"partition_cursor": cursor})


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
    # `wait_ms` is ours (long poll); DIS clients never send it and get an immediate answer.
    result = await request.app[BROKER].get_records(
        _required_query(request, "partition-cursor"), _query_int(request, "limit"),
        _query_int(request, "max_fetch_bytes"), _query_int(request, "wait_ms"))
    return _json(records_body(result))


# -- apps, checkpoints, consumer state (spec section 2.9, 2.10) -------------------------------------

def _app_body(info: AppInfo) -> dict[str, Any]:
    return {"app_name": info.name, "app_id": info.app_id, "create_time": info.created_ms,
            "commit_checkpoint_stream_names": list(info.stream_names)}


async def create_app(request: web.Request) -> web.Response:
    body = await read_json(request)
    await request.app[BROKER].create_app(_typed(body, "app_name", str, required=True))
    return web.Response(status=201)


async def list_apps(request: web.Request) -> web.Response:
    total, page, more = await request.app[BROKER].list_apps(
        _query_int(request, "limit"), request.query.get("start_app_name"), request.query.get("stream_name"))
    return _json({"has_more_app": more, "apps": [_app_body(a) for a in page], "total_number": total})


async def describe_app(request: web.Request) -> web.Response:
    return _json(_app_body(await request.app[BROKER].describe_app(request.match_info["app_name"])))


async def delete_app(request: web.Request) -> web.Response:
    await request.app[BROKER].delete_app(request.match_info["app_name"])
    return web.Response(status=204)


async def consumer_state(request: web.Request) -> web.Response:
    kind = _required_query(request, "checkpoint_type")
    app, stream = request.match_info["app_name"], request.match_info["stream_name"]
    states, more = await request.app[BROKER].consumer_state(
        app, stream, kind, request.query.get("start_partition_id"), _query_int(request, "limit"))
    rows = []
    for st in states:
        row: dict[str, Any] = {"partition_id": format_partition_id(st.partition), "latest_offset": st.latest,
                               "earliest_offset": st.earliest, "checkpoint_type": kind, "status": "ACTIVE"}
        if st.checkpoint is not None:
            row["sequence_number"] = str(st.checkpoint.seq)
        rows.append(row)
    return _json({"has_more": more, "stream_name": stream, "app_name": app, "partition_consuming_states": rows})


async def commit_checkpoint(request: web.Request) -> web.Response:
    body = await read_json(request)
    pid = _typed(body, "partition_id", (str, int), required=True)
    seq = _typed(body, "sequence_number", (str, int), required=True)
    await request.app[BROKER].commit_checkpoint(
        _typed(body, "app_name", str, required=True), _typed(body, "stream_name", str, required=True),
        str(pid), str(seq), _typed(body, "metadata", str), _typed(body, "checkpoint_type", str, required=True))
    return web.Response(status=201)


def _checkpoint_query(request: web.Request) -> tuple[str, str, str]:
    return (_required_query(request, "app_name"), _required_query(request, "stream_name"),
            _required_query(request, "checkpoint_type"))


async def get_checkpoint(request: web.Request) -> web.Response:
    app, stream, kind = _checkpoint_query(request)
    mark = await request.app[BROKER].get_checkpoint(app, stream, _required_query(request, "partition_id"), kind)
    # No checkpoint yet: 200 without sequence_number (DIS leaves this undocumented; the SDK gives None).
    return _json({} if mark is None else {"sequence_number": str(mark.seq), "metadata": mark.metadata})


async def delete_checkpoint(request: web.Request) -> web.Response:
    app, stream, kind = _checkpoint_query(request)
    await request.app[BROKER].delete_checkpoint(app, stream, request.query.get("partition_id") or None, kind)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    """Every path with and without a trailing slash: older DIS clients append one."""
    routes = [
        ("POST", "/v2/{project_id}/streams", create_stream),
        ("GET", "/v2/{project_id}/streams", list_streams),
        ("GET", "/v2/{project_id}/streams/{stream_name}", describe_stream),
        ("DELETE", "/v2/{project_id}/streams/{stream_name}", delete_stream),
        ("POST", "/v2/{project_id}/records", put_records),
        ("GET", "/v2/{project_id}/records", get_records),
        ("GET", "/v2/{project_id}/cursors", get_cursor),
        ("POST", "/v2/{project_id}/apps", create_app),
        ("GET", "/v2/{project_id}/apps", list_apps),
        ("GET", "/v2/{project_id}/apps/{app_name}", describe_app),
        ("DELETE", "/v2/{project_id}/apps/{app_name}", delete_app),
        ("GET", "/v2/{project_id}/apps/{app_name}/streams/{stream_name}", consumer_state),
        ("POST", "/v2/{project_id}/checkpoints", commit_checkpoint),
        ("GET", "/v2/{project_id}/checkpoints", get_checkpoint),
        ("DELETE", "/v2/{project_id}/checkpoints", delete_checkpoint),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, path + "/", handler)
