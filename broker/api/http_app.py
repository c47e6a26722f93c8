"""Builds the HTTP application: mounts the DIS routes and installs the one error handler.

Every response carries `X-Request-Id`. A BrokerError is rendered as DIS JSON with its catalogue
status; an unknown route or method gets a DIS-style 404/405; anything unexpected is logged with its
traceback and answered 500 DIS.5000 with the request id - internals never reach the client.
"""
from __future__ import annotations

import logging
import uuid
from typing import Awaitable, Callable

import orjson
from aiohttp import web

from broker.api import dis, tail
from broker.api.render import dis_error_body, http_status
from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, client_error, server_error

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(error: BrokerError, request_id: str) -> web.Response:
    return web.Response(body=orjson.dumps(dis_error_body(error)), status=http_status(error),
                        content_type="application/json", headers={"X-Request-Id": request_id})


@web.middleware
async def errors_and_request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    try:
        response = await handler(request)
    except BrokerError as exc:
        return _error_response(exc, request_id)
    except web.HTTPException as exc:  # routing errors raised by aiohttp itself
        if exc.status == 405:
            error: BrokerError = client_error(ErrorCode.METHOD_NOT_ALLOWED, method=request.method, path=request.path)
        elif exc.status == 413:
            error = client_error(ErrorCode.REQUEST_TOO_LARGE, detail="body too large")
        elif exc.status == 404:
            error = client_error(ErrorCode.UNKNOWN_ROUTE, method=request.method, path=request.path)
        else:
            error = client_error(ErrorCode.INVALID_REQUEST, detail=exc.reason)
        return _error_response(error, request_id)
    except Exception:
        log.exception("unhandled error, request id %s", request_id)
        return _error_response(server_error(ErrorCode.INTERNAL, request_id=request_id), request_id)
    response.headers["X-Request-Id"] = request_id
    return response


def build_http_app(broker: Broker, *, body_timeout_s: float, stall_timeout_s: float = 60.0) -> web.Application:
    app = web.Application(middlewares=[errors_and_request_id],
                          client_max_size=broker.limits.max_http_body_bytes)
    app[dis.BROKER] = broker
    app[dis.BODY_TIMEOUT] = body_timeout_s
    app[tail.STALL_TIMEOUT] = stall_timeout_s
    dis.add_routes(app)
    tail.add_routes(app)
    return app
