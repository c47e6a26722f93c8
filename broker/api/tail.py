"""Server-sent-events tail over HTTP: push consumption for clients without gRPC. [ours, not DIS]

    GET /sluice/v1/tail?partition-cursor=...                       (a cursor from GetCursor), or
    GET /sluice/v1/tail?stream-name=S&partition-id=0&cursor-type=LATEST[&starting-sequence-number=N]
        [&max_records=100][&max_wait_ms=0][&project=P]

`project` (default `default`; with an auth file, the API key's project) is the namespace of the
stream, the `{project_id}` of the DIS paths; a cursor is valid only in the project of its stream.
With an auth file the request carries an API key (`X-Api-Key`, `Authorization: ApiKey K` or
`Bearer K`) whose role may read (broker/auth).

Each batch is one event: `id:` the next sequence number, `event: records`, `data:` the DIS
GetRecords JSON body. Silence is broken by a `: heartbeat` comment every 15 s. An error after the
stream has begun (say, the stream was deleted) is sent as `event: error` with the DIS error body as
`data:`, and ends the stream; a broker shutdown ends it without one. A consumer that stops
reading is disconnected after the stall timeout instead of making the broker buffer: each write
waits for the socket to drain, and a write that cannot drain in time ends the stream.
"""
from __future__ import annotations

import contextlib
import functools

import orjson
from aiohttp import web

from broker.api.dis import records_body
from broker.api.http import (
    BROKER,
    HttpConfig,
    api_key_guard,
    door_app,
    principal,
    query_int,
    request_id,
    required_query,
    write_or_drop,
)
from broker.api.limits import subscriber
from broker.api.render import DIS
from broker.auth import Action, Auth, Principal
from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, server_error
from broker.model import DEFAULT_PROJECT

PREFIX = "/sluice"


@subscriber   # one of the client's subscriptions while it streams (api/limits.py)
async def tail(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    q = request.query
    who = principal(request)
    project = q.get("project") or (who.project if who is not None else DEFAULT_PROJECT)
    cursor = q.get("partition-cursor") or await broker.get_cursor(
        required_query(request, "stream-name"), required_query(request, "partition-id"),
        q.get("cursor-type") or "LATEST", q.get("starting-sequence-number"), query_int(request, "timestamp"),
        project=project)
    batches = broker.subscribe(cursor, query_int(request, "max_records"), query_int(request, "max_wait_ms"),
                               project=project)
    # The headers go out before the error middleware sees the response, so the request id is set here.
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": request_id(request)})
    # subscribe() is an async generator typed as AsyncIterator: closing it ends the subscription now
    async with contextlib.aclosing(batches):
        # the first batch before the headers, so a bad cursor still gets a DIS error response
        batch = await anext(batches, None)
        if batch is None:
            raise server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")
        try:
            await response.prepare(request)
        except ConnectionResetError:   # the consumer left while it waited for its first batch
            return response
        while batch is not None:
            if batch.records:
                event = b"id: %d\nevent: records\ndata: " % (batch.records[-1].seq + 1)
                event += orjson.dumps(records_body(batch)) + b"\n\n"
            else:
                event = b": heartbeat\n\n"
            if not await write_or_drop(request, response, event):
                return response  # a stalled or vanished consumer: dropped, and with it what is queued
            try:
                batch = await anext(batches, None)
            except BrokerError as exc:  # e.g. the stream was deleted: too late for a status, say it in-band
                if not await write_or_drop(request, response,
                                           b"event: error\ndata: " + orjson.dumps(DIS.body(exc)) + b"\n\n"):
                    return response
                break
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


def _project(request: web.Request, who: Principal) -> str:
    return request.query.get("project") or who.project


def build_app(broker: Broker, config: HttpConfig, auth: Auth | None = None) -> web.Application:
    """The tail door, mounted at `PREFIX`; its errors are DIS bodies like its payloads."""
    app = door_app(broker, config, DIS)
    guard = api_key_guard(auth, _project) if auth is not None and auth.enabled else None
    app.router.add_get("/v1/tail", tail if guard is None else functools.update_wrapper(guard(tail, Action.READ), tail))
    return app
