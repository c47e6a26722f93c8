"""Server-sent-events tail over HTTP: push consumption for clients without gRPC. [ours, not DIS]

    GET /sluice/v1/tail?partition-cursor=...                       (a cursor from GetCursor), or
    GET /sluice/v1/tail?stream-name=S&partition-id=0&cursor-type=LATEST[&starting-sequence-number=N]
        [&max_records=100][&max_wait_ms=0][&project=P]

`project` (default `default`; with an auth file, the API key's project) is the namespace of the
stream, the `{project_id}` of the DIS paths; a cursor is valid only in the project of its stream.
With an auth file the request carries an API key (`X-Api-Key`, `Authorization: ApiKey K` or
`Bearer K`) whose role may read (broker/auth).

The headers go out at once (with a `: connected` comment when no record is there yet), after the
cursor is checked: a bad one is still an error response. Each batch is one event: `id:` the next
sequence number, `event: records`, `data:` the DIS GetRecords JSON body. A request with a
`Last-Event-ID` header (an EventSource reconnecting) starts at that sequence number of the same
partition, whatever start the URL names. Silence is broken by a
`: heartbeat` comment every `--subscribe-heartbeat` seconds (15 by default); a client that closes
the connection during the silence is noticed within a second (its subscription slot freed). An
error after the stream has begun (say, the stream was deleted) is sent as `event: error` with the
DIS error body as `data:`, and ends the stream; a broker shutdown ends it without one. A consumer
that stops reading is disconnected after the stall timeout instead of making the broker buffer:
each write waits for the socket to drain, and a write that cannot drain in time ends the stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools

import orjson
from aiohttp import web

from broker.api.dis import records_body
from broker.api.http import (
    BROKER,
    HttpConfig,
    api_key_guard,
    client_gone,
    door_app,
    end_or_drop,
    key_project,
    key_revoked,
    query_int,
    query_project,
    request_id,
    required_query,
    revoked_error,
    write_or_drop,
)
from broker.api.limits import subscriber
from broker.api.render import DIS_SHAPED
from broker.auth import Action, Auth
from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, client_error, server_error

PREFIX = "/sluice"
FIRST_BATCH_S = 0.05   # the headers wait at most this long for the first batch (or a bad cursor's error)
WATCH_S = 1.0          # while the partition is quiet, how often the tail checks that its client is there


@subscriber   # one of the client's subscriptions while it streams (api/limits.py)
async def tail(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    q = request.query
    project = query_project(request)
    # An EventSource reconnecting sends the `id:` of the last event it had (the next sequence
    # number): it goes on from there, not from the URL's start again (records lost or read twice).
    resume = request.headers.get("Last-Event-ID") or None   # empty: no last id (SSE's reset), as absent
    if resume is not None and not (resume.isascii() and resume.isdigit()):
        raise client_error(ErrorCode.INVALID_REQUEST, detail="Last-Event-ID must be the id of a tail event "
                           f"(a sequence number), got {resume!r:.40}")
    cursor = q.get("partition-cursor")
    if cursor and resume is not None:
        cursor = await broker.cursor_at(cursor, resume, project=project)
    elif not cursor:
        cursor = await broker.get_cursor(
            required_query(request, "stream-name"), required_query(request, "partition-id"),
            "AT_SEQUENCE_NUMBER" if resume is not None else q.get("cursor-type") or "LATEST",
            resume if resume is not None else q.get("starting-sequence-number"), query_int(request, "timestamp"),
            project=project)
    batches = broker.subscribe(cursor, query_int(request, "max_records"), query_int(request, "max_wait_ms"),
                               project=project)
    # The headers go out before the error middleware sees the response, so the request id is set here.
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": request_id(request)})
    # subscribe() is an async generator typed as AsyncIterator: closing it ends the subscription now.
    # Each batch is awaited as a task, so that while the partition is quiet the handler can look
    # every WATCH_S whether its client is still there (aiohttp does not cancel a handler whose
    # client left): a client leaving a quiet tail frees its subscription slot within a second,
    # not at the next heartbeat.
    async with contextlib.aclosing(batches):
        pending = asyncio.ensure_future(anext(batches, None))
        try:
            # A bad cursor fails at the generator's first step: give it that (and a batch that is
            # there at once) before the headers, so it is still an error response with a status.
            await asyncio.wait({pending}, timeout=FIRST_BATCH_S)
            if pending.done() and pending.result() is None:
                raise server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")
            try:
                await response.prepare(request)
            except ConnectionResetError:   # the consumer left at once
                return response
            if not pending.done() and not await write_or_drop(request, response, b": connected\n\n"):
                return response
            while True:
                while not pending.done():
                    await asyncio.wait({pending}, timeout=WATCH_S)
                    if not pending.done() and (client_gone(request) or key_revoked(request)):
                        break
                try:
                    if key_revoked(request):   # its key removed or changed by a SIGHUP reload
                        raise revoked_error()
                    if not pending.done():   # its client left
                        return response
                    batch = pending.result()
                except BrokerError as exc:  # e.g. the stream was deleted: too late for a status, say it in-band
                    if not await write_or_drop(request, response,
                                               b"event: error\ndata: " + orjson.dumps(DIS_SHAPED.body(exc)) + b"\n\n"):
                        return response
                    break
                if batch is None:
                    break
                if batch.records:
                    event = b"id: %d\nevent: records\ndata: " % (batch.records[-1].seq + 1)
                    event += orjson.dumps(records_body(batch)) + b"\n\n"
                else:
                    event = b": heartbeat\n\n"
                if not await write_or_drop(request, response, event):
                    return response  # a stalled or vanished consumer: dropped, and with it what is queued
                pending = asyncio.ensure_future(anext(batches, None))
        finally:
            if not pending.done():   # stop the generator's wait before aclosing closes it
                pending.cancel()
                await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()   # retrieved (it was raised, or is not wanted)
    await end_or_drop(request, response)
    return response


def build_app(broker: Broker, config: HttpConfig, auth: Auth | None = None) -> web.Application:
    """The tail door, mounted at `PREFIX`; its errors are DIS bodies like its payloads."""
    app = door_app(broker, config, DIS_SHAPED)
    guard = api_key_guard(auth, key_project) if auth is not None and auth.enabled else None
    # GET only: aiohttp would serve a HEAD with this handler, whose events then follow the headers
    # on a keep-alive connection, read by the client (or a proxy's pooled connection) as its next answer
    app.router.add_get("/v1/tail", tail if guard is None else functools.update_wrapper(guard(tail, Action.READ), tail),
                       allow_head=False)
    return app
