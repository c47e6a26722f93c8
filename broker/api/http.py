"""The HTTP plumbing every door shares; the doors themselves live in dis.py, tail.py (and next
timeplus.py, tsdb.py), each an aiohttp sub-application built by http_app.py.

What lives here: the keys a door reads from its app (the broker, the limits and timeouts),
request ids, reading a JSON body (size cap, body timeout, Content-Encoding, payload errors),
typed body fields and query parameters, the one error middleware, and the stall-bounded write
of a streaming response. What must not: any door's wire format. Paths, parameter names and
bodies belong to the door; how an error looks on the wire belongs to the door's `Renderer`.
The catalogue row (broker/errors.py) decides what an error means; the renderer only spells it.

Numbers from the wire are parsed here or in the core, never with a bare `int()` on client text:
Python refuses to parse more than 4,300 digits (ValueError: a 500 if nobody catches it). Query
integers are checked against their pattern and parsed with that error caught; JSON numbers are
bounded by orjson itself (an integer beyond 64 bits decodes as a float, which no integer field
accepts). Ranges are the core's to check.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
import struct
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_urldispatcher import AbstractRuleMatching, MatchedSubAppResource

from broker.api import coding
from broker.auth import Action, Auth, Principal
from broker.core.broker import Broker
from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.model import DEFAULT_PROJECT

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUEST_ID = "X-Request-Id"
# A client's request id is echoed only when it is a plain token: other bytes (a lone 0x80 went back
# as an empty header) or kilobytes of text get a fresh id instead.
_CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_DECIMAL = re.compile(r"-?[0-9]+")
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
# The Content-Encodings a body may have (api/coding.py inflates them); any other would hand the
# handler bytes that are not what the client meant.
_IDENTITY = frozenset({"", "identity"})
_FRAMINGS = frozenset({(), ("chunked",)})   # a body's Transfer-Encoding: none, or chunked alone
# aiohttp >= 3.13 wants typed request keys (and warns on strings); older ones have none.
_REQUEST_ID_SLOT: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "sluice.request_id"
_PRINCIPAL_SLOT: Any = web.RequestKey("principal", Principal) if hasattr(web, "RequestKey") else "sluice.principal"
_AUTH_SLOT: Any = web.RequestKey("auth", Auth) if hasattr(web, "RequestKey") else "sluice.auth"
_BODY_SLOT: Any = web.RequestKey("body", bytes) if hasattr(web, "RequestKey") else "sluice.body"
_KEY_SCHEMES = ("apikey ", "bearer ")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Wraps a route's handler with the credential check of its door, for the route's Action.
Guard = Callable[[Handler, Action], Handler]


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Limits and timeouts of every door (from Settings and the core's limits)."""

    max_body_bytes: int
    body_timeout_s: float  # a client has this long to send its whole body: then 408
    stall_timeout_s: float  # a streaming write that cannot drain this long drops the client


class Renderer(Protocol):
    """How one door spells a catalogue error on the wire (DIS today: render.py).

    `status` and `body` make the response to a failed request; `record_failure` is one failed
    item of a batch (a PutRecords record, a Timeplus row, a tsdb point) inside a 2xx answer.
    Every one of them carries the row's `reason`, so rows that share a protocol code (DIS.5250
    for both STORAGE_FULL and UNAVAILABLE) stay distinguishable.
    """

    content_type: str

    def status(self, error: BrokerError) -> int: ...

    def body(self, error: BrokerError) -> dict[str, Any]: ...

    def record_failure(self, error: BrokerError) -> dict[str, Any]: ...


BROKER = web.AppKey("broker", Broker)
CONFIG = web.AppKey("http_config", HttpConfig)
RENDERER = web.AppKey("renderer", Renderer)  # type: ignore[type-abstract]
# Told of each request aiohttp's parser refuses, before any middleware (metrics count them).
PARSER_REJECTED: web.AppKey[Callable[[BrokerError], None]] = web.AppKey("parser_rejected")


def door_app(broker: Broker, config: HttpConfig, renderer: Renderer) -> web.Application:
    """An empty door: a sub-application that knows the broker, the limits and its renderer."""
    app = web.Application()
    app[BROKER] = broker
    app[CONFIG] = config
    app[RENDERER] = renderer
    return app


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


# -- request ids and error responses --------------------------------------------------------------

def client_request_id(headers: Mapping[str, str]) -> str:
    """The client's `X-Request-Id` if it is 1-128 visible ASCII characters, else a fresh one."""
    rid = headers.get(REQUEST_ID)
    return rid if rid is not None and _CLIENT_REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex


def request_id(request: web.Request) -> str:
    """The request's id (client_request_id), the same for the whole request."""
    rid: str | None = request.get(_REQUEST_ID_SLOT)
    if rid is None:
        rid = request[_REQUEST_ID_SLOT] = client_request_id(request.headers)
    return rid


def error_response(renderer: Renderer, error: BrokerError, rid: str) -> web.Response:
    return web.Response(body=orjson.dumps(renderer.body(error)), status=renderer.status(error),
                        headers={"Content-Type": renderer.content_type, REQUEST_ID: rid})


def routing_error(request: web.Request, exc: web.HTTPException) -> BrokerError:
    """aiohttp's own routing and body-size exceptions as catalogue rows."""
    if exc.status == 404:
        return client_error(ErrorCode.UNKNOWN_ROUTE, method=request.method, path=request.path)
    if exc.status == 405:
        return client_error(ErrorCode.METHOD_NOT_ALLOWED, method=request.method, path=request.path)
    if exc.status == 413:
        return client_error(ErrorCode.REQUEST_TOO_LARGE, detail="body too large")
    return client_error(ErrorCode.INVALID_REQUEST, detail=exc.reason)


def door_renderer(doors: Sequence[tuple[str | re.Pattern[str], Renderer]], fallback: Renderer,
                  path: str) -> Renderer:
    """The renderer of the door that owns `path` (path prefix or pattern -> renderer), else `fallback`."""
    for prefix, renderer in doors:
        if path.startswith(prefix) if isinstance(prefix, str) else prefix.match(path):
            return renderer
    return fallback


def error_middleware(doors: Sequence[tuple[str | re.Pattern[str], Renderer]], fallback: Renderer) -> Middleware:
    """The one error handler of the HTTP app: every response gets `X-Request-Id`; a BrokerError or
    an aiohttp routing error is rendered by the door that owns the path (`doors`: path prefix or
    pattern -> renderer, `fallback` for paths no door owns); anything unexpected is logged with its
    traceback and answered INTERNAL with the request id - internals never reach the client."""

    def renderer_for(path: str) -> Renderer:
        return door_renderer(doors, fallback, path)

    @web.middleware
    async def errors_and_request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request)
        try:
            response = await handler(request)
        except BrokerError as exc:
            return error_response(renderer_for(request.path), exc, rid)
        except web.HTTPException as exc:
            return error_response(renderer_for(request.path), routing_error(request, exc), rid)
        except Exception:
            log.exception("unhandled error, request id %s", rid)
            return error_response(renderer_for(request.path), server_error(ErrorCode.INTERNAL, request_id=rid), rid)
        response.headers[REQUEST_ID] = rid
        return response

    return errors_and_request_id


# -- browsers ---------------------------------------------------------------------------------------

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def refuse_cross_site(request: web.Request) -> None:
    """A write a browser sends for a page of another origin is PERMISSION_DENIED, on every door.
    On an open broker a page anywhere on the web could otherwise create streams, put records and
    start sources through a visitor's browser: a text/plain fetch or form post is a "simple"
    request, sent without the CORS preflight this broker never grants. Reads are let through: the
    page cannot read the answer. (The console's write routes also want `Content-Type:
    application/json`: console.py.)

    As Go's CrossOriginProtection decides: `Sec-Fetch-Site` when the browser sends it (same-origin
    and none pass; same-site does not: another port of localhost is another site's page here);
    else, for browsers that send it only to https and localhost (a broker reached over plain HTTP
    by address or name), `Origin` against `Host`. SDKs and scripts send neither."""
    if request.method in _SAFE_METHODS:
        return
    headers = request.headers
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        if site.strip().lower() in ("same-origin", "none"):
            return
    else:
        origin = headers.get("Origin")
        if origin is None or origin.partition("://")[2].rstrip("/").lower() == headers.get("Host", "").lower():
            return
    raise client_error(ErrorCode.PERMISSION_DENIED, detail="a write sent by a page of another site is refused")


# -- credentials (issue 11) -----------------------------------------------------------------------

def add_routes(app: web.Application, routes: Sequence[tuple[str, str, Handler, Action]], guard: Guard | None,
               prefixes: Sequence[str] = ("",)) -> None:
    """A door's route table: method, path, handler and the Action it is (broker/auth/roles.py).
    With a guard (auth on) each handler is wrapped in its door's check for that Action; without
    one the handler is registered as it is, so an open broker pays nothing per request."""
    for method, path, handler, action in routes:
        # wrapped keeps the handler's name and module: metrics label requests by them (api/metrics.py)
        route = handler if guard is None else functools.update_wrapper(guard(handler, action), handler)
        for prefix in prefixes:
            app.router.add_route(method, prefix + path, route)


def presented_api_key(request: web.Request) -> str | None:
    """The API key of a request: `X-Api-Key: K`, `Authorization: ApiKey K` or `Authorization: Bearer K`."""
    key = request.headers.get("X-Api-Key")
    if key:
        return key.strip()
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() in _KEY_SCHEMES:   # both scheme names are 6 letters
        return authorization[7:].strip()
    return None


def api_key_guard(auth: Auth, project: Callable[[web.Request, Principal], str]) -> Guard:
    """The check of the doors that take an API key (Timeplus, OpenTSDB, the tail): the key's
    principal (401 when missing or unknown), bound to the request's project (`project`: from the
    path, the query or the door's settings; the key's own when the request names none) with a role
    that permits the route's Action (403). The principal is kept on the request (`principal`)."""

    def guard(handler: Handler, action: Action) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            who = auth.api_key(presented_api_key(request))
            Auth.check(who, project(request, who), action)
            remember_principal(request, who, auth)
            return await handler(request)
        return guarded

    return guard


def remember_principal(request: web.Request, who: Principal, auth: Auth) -> None:
    request[_PRINCIPAL_SLOT] = who
    request[_AUTH_SLOT] = auth


def key_revoked(request: web.Request) -> bool:
    """Whether the key this request was let in with has been removed or changed since (a SIGHUP
    reload): a stream that outlives its first check asks this per event and ends when it is."""
    auth: Auth | None = request.get(_AUTH_SLOT)
    return auth is not None and not auth.current(principal(request))


def revoked_error() -> BrokerError:
    return client_error(ErrorCode.AUTH_UNKNOWN_KEY)


def revoked_message() -> str:
    """How a stream that can still say something (a query's final status) tells why it ended."""
    return f"{revoked_error().message}: it was removed or changed while this stream ran"


def principal(request: web.Request) -> Principal | None:
    """Who made the request, when the broker checks credentials (None on an open broker)."""
    found: Principal | None = request.get(_PRINCIPAL_SLOT)
    return found


def key_project(request: web.Request, who: Principal) -> str:
    """The project a request names in `?project=P`, else its API key's own (the console's and the
    tail's rule; what `api_key_guard` checks the key against)."""
    return request.query.get("project") or who.project


def query_project(request: web.Request) -> str:
    """The project a request acts in: `?project=P`, else the key's own, else `default` on an open
    broker (the console and the tail)."""
    who = principal(request)
    return key_project(request, who) if who is not None else request.query.get("project") or DEFAULT_PROJECT


# -- request bodies -------------------------------------------------------------------------------

async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object. Raises what read_body raises, and BAD_BODY (empty, not JSON,
    not an object)."""
    body = await read_body(request)
    if not body:
        raise client_error(ErrorCode.BAD_BODY, detail="request body is empty")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise client_error(ErrorCode.BAD_BODY, detail=f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise client_error(ErrorCode.BAD_BODY, detail="request body must be a JSON object")
    return obj


def content_coding(request: web.Request) -> str:
    """The request's Content-Encoding as aiohttp's parser matches it ("" when none)."""
    return request.headers.get("Content-Encoding", "").lower()


def _transfer_codings(request: web.Request) -> tuple[str, ...]:
    """The request's Transfer-Encoding codings, in order (every header line of it)."""
    lines = request.headers.getall("Transfer-Encoding", ())
    return tuple(c for c in (part.strip().lower() for line in lines for part in line.split(",")) if c)


async def read_body(request: web.Request) -> bytes:
    """The body's bytes (maybe empty), inflated when its Content-Encoding says so. Raises what
    read_raw_body raises, REQUEST_TOO_LARGE (over the cap once inflated) and BAD_BODY (not what
    its Content-Encoding says: api/coding.py)."""
    inflated: bytes | None = request.get(_BODY_SLOT)
    if inflated is not None:   # read before
        return inflated
    raw = await read_raw_body(request)
    how = content_coding(request)
    if how in _IDENTITY:
        return raw
    limit = request.app[CONFIG].max_body_bytes
    inflation = coding.Inflation(how, raw, limit)
    del raw
    try:   # the first MiB here, the rest of a big body off the event loop
        body = inflation.body() if inflation.step() else await asyncio.to_thread(inflation.rest)
    except coding.TooLarge:
        raise client_error(ErrorCode.REQUEST_TOO_LARGE, detail=f"body exceeds {limit} bytes once inflated") from None
    except coding.BadCoding as exc:
        raise client_error(ErrorCode.BAD_BODY, detail=f"body could not be read: {exc}") from None
    request[_BODY_SLOT] = body
    return body


async def read_raw_body(request: web.Request) -> bytes:
    """The body's bytes as received (still compressed), what a signature covers (aiohttp keeps
    them: a second read returns the same). Raises REQUEST_TOO_LARGE (declared or actual size over
    the cap), REQUEST_TIMEOUT (not received within the body timeout), BAD_BODY (an unsupported
    Content-Encoding or Transfer-Encoding, a broken framing), AUTH_UNKNOWN_KEY (the request's API
    key was removed or changed by a reload while its body came)."""
    config = request.app[CONFIG]
    limit = config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise client_error(ErrorCode.REQUEST_TOO_LARGE, detail=f"body exceeds {limit} bytes")
    how = content_coding(request)
    if how not in coding.CODINGS and how not in _IDENTITY:
        raise client_error(ErrorCode.BAD_BODY,
                           detail=f"unsupported Content-Encoding {request.headers['Content-Encoding']!r:.40}")
    framing = _transfer_codings(request)
    if framing not in _FRAMINGS:
        # aiohttp frames `gzip, chunked` as chunked and hands over the gzip bytes as they are
        # (RFC 9112 6.1: a coding the server does not know is refused)
        raise client_error(ErrorCode.BAD_BODY,
                           detail=f"unsupported Transfer-Encoding {', '.join(framing)!r:.40}; only chunked is")
    try:
        async with asyncio.timeout(config.body_timeout_s):   # not wait_for: see core/reads._fetch
            body = await request.read()
    except TimeoutError:
        code, detail = ErrorCode.REQUEST_TIMEOUT, None
    except web.HTTPRequestEntityTooLarge:
        code, detail = ErrorCode.REQUEST_TOO_LARGE, f"body exceeds {limit} bytes"
    except web.RequestPayloadError as exc:  # e.g. a broken chunked framing
        code, detail = ErrorCode.BAD_BODY, f"body could not be read: {brief(exc.__cause__ or exc)}"
    except ConnectionResetError:   # the client closed the connection (or its sending side) mid-body:
        # nobody will read the answer, but it is the client's doing, not an error of the broker's
        code, detail = ErrorCode.BAD_BODY, "the connection closed before the body was complete"
    else:
        # the key was checked when the head arrived; a SIGHUP reload may have removed it while the
        # body came (up to the body timeout): such a request must not act in the key's name
        if key_revoked(request):
            raise revoked_error()
        return body
    # raised here, not in the except clauses, and kept in no local: as its context, aiohttp's error
    # would keep its frames and with them the body read so far (up to the cap) alive, and a local
    # would hold the error in a reference cycle with its own traceback - both until the next full
    # garbage collection, rare in the broker (malloc.settle_gc)
    raise client_error(code, detail=detail)


def client_gone(request: web.Request) -> bool:
    """Whether the client closed the connection (aiohttp drops the protocol's transport then)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def unless_gone(request: web.Request, work: Awaitable[T], every_s: float = 1.0) -> T | None:
    """`work`'s result; None, `work` cancelled, once the client has closed its connection (looked
    at every `every_s` seconds). aiohttp does not cancel a handler whose client left, so a long
    wait (a long poll) would otherwise hold the client's request slot (api/limits.py) to its end."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=every_s)
            if not task.done() and client_gone(request):
                task.cancel()
                await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()   # retrieved: it ended meanwhile, and nobody is there to be told
                return None
        return task.result()
    finally:
        if not task.done():   # this request itself was cancelled
            task.cancel()


def brief(exc: BaseException | str) -> str:
    """The first words of an aiohttp error message, for a client: aiohttp's messages start with
    the status ("400, message:") and end in a repr of the offending bytes (up to 8 KiB)."""
    text = str(getattr(exc, "message", exc) or "").strip() or type(exc).__name__
    line = text.split("\n", 1)[0]
    for cut in (" b'", ' b"', " bytearray("):
        line = line.split(cut, 1)[0]
    return line.rstrip(": ")[:100]


def field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], required: bool = False) -> Any:
    """`obj[name]` if it is of `kind` (None when absent and not required). JSON `true` is never
    an integer, and a JSON number too big for 64 bits arrives as a float, so never one either."""
    value = obj.get(name)
    if value is None:
        if required:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} is required")
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = "/".join(k.__name__ for k in kinds)
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be of type {expected}")
    return value


# -- query parameters -----------------------------------------------------------------------------

def query_int(request: web.Request, name: str) -> int | None:
    """An optional decimal integer query parameter (absent or empty: None). Only ASCII `-?digits`:
    `int()` alone also takes " 5", "+5", "1_0" and non-ASCII digits. Its range is the core's to
    check (some parameters are clipped, not refused: shared/spec/dis-api.md 2.8); a value past 64
    bits is taken as the nearest 64-bit one, which every such check treats alike, and which an
    answer that echoes it can write (orjson writes no wider integer)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not _DECIMAL.fullmatch(raw):
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be an integer, got {raw!r:.40}")
    if len(raw.lstrip("-").lstrip("0")) > 19:   # never hand int() thousands of digits
        return _INT64_MIN if raw.startswith("-") else _INT64_MAX
    return min(max(int(raw), _INT64_MIN), _INT64_MAX)


def query_str(request: web.Request, name: str, required: bool = False) -> str | None:
    """A query parameter as sent; an empty value counts as absent."""
    value = request.query.get(name)
    if not value:
        if required:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"query parameter {name} is required")
        return None
    return value


def required_query(request: web.Request, name: str) -> str:
    value = query_str(request, name, required=True)
    assert value is not None
    return value


# -- streaming responses --------------------------------------------------------------------------

def reset(transport: asyncio.BaseTransport | None) -> None:
    """Drop a client that does not read: a reset, not a close. A close would leave the kernel
    trying to deliver what it holds to a client that does not read (an orphan socket with full
    buffers, for minutes)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()   # type: ignore[attr-defined]


# Once the broker stops, how long a streaming write may wait for its client: a consumer that does
# not read held a stop for its stall timeout (60 s), past the grace, twice over (aiohttp waits the
# grace for the handler, cancels the request - not our write - and waits the grace again).
SHUTDOWN_WRITE_S = 1.0
# per broker (several may run in one process), the clients its streaming writes wait on now
_WAITING: weakref.WeakKeyDictionary[Broker, set[asyncio.BaseTransport]] = weakref.WeakKeyDictionary()


async def write_or_drop(request: web.Request, response: web.StreamResponse, data: bytes) -> bool:
    """Write one piece of a streaming response. A client that does not read for the stall
    timeout (or is gone) is disconnected instead of making the broker buffer for it; returns
    False then, and the handler should return."""
    return await _bounded(request, response.write(data))


async def end_or_drop(request: web.Request, response: web.StreamResponse) -> None:
    """End a streaming response, bounded as write_or_drop: write_eof waits for the client to
    read what is buffered, and a client that never reads held the handler for ever."""
    await _bounded(request, response.write_eof())


async def _bounded(request: web.Request, write: Awaitable[None]) -> bool:
    transport = request.transport
    broker = request.app.get(BROKER)
    limit = SHUTDOWN_WRITE_S if broker is not None and broker.shutting_down else request.app[CONFIG].stall_timeout_s
    waiting = _WAITING.setdefault(broker, set()) if broker is not None and transport is not None else None
    if waiting is not None:
        waiting.add(transport)   # type: ignore[arg-type]
    try:
        async with asyncio.timeout(limit):
            await write
    except (TimeoutError, ConnectionError):   # aiohttp's "Connection lost" is a bare ConnectionError
        reset(transport)
        return False
    finally:
        if waiting is not None:
            waiting.discard(transport)   # type: ignore[arg-type]
    return True


def drop_waiting_writes(broker: Broker) -> int:
    """The broker's stop begins: the streaming writes that wait for their clients now get
    SHUTDOWN_WRITE_S more, as writes begun from now on do, and then their clients are dropped (a
    reader only briefly behind still gets its stream's end). Returns how many are waiting."""
    waiting = _WAITING.get(broker, set())
    loop = asyncio.get_running_loop()
    for transport in list(waiting):
        loop.call_later(SHUTDOWN_WRITE_S, _drop_if_waiting, waiting, transport)
    return len(waiting)


def _drop_if_waiting(waiting: set[asyncio.BaseTransport], transport: asyncio.BaseTransport) -> None:
    if transport in waiting:
        reset(transport)


# -- doors whose paths an aiohttp prefix cannot express -------------------------------------------

class PathRule(AbstractRuleMatching):
    """Matches requests whose path the door's regex matches from the start."""

    def __init__(self, paths: re.Pattern[str]) -> None:
        self.paths = paths

    async def match(self, request: web.Request) -> bool:
        return self.paths.match(request.path) is not None

    def get_info(self) -> Any:
        return {"pattern": self.paths.pattern}

    @property
    def canonical(self) -> str:
        return self.paths.pattern


def mount_by_rule(root: web.Application, paths: re.Pattern[str], door: web.Application) -> None:
    """Mount `door` on `root` for the paths `paths` matches: a rule-matched sub-application, like
    aiohttp's own add_domain, for doors with a variable first segment (Timeplus' workspace) or
    paths under a prefix another door owns (OpenTSDB's /api/put beside Timeplus' /api/v1beta2)."""
    root._add_subapp(lambda: MatchedSubAppResource(PathRule(paths), door), door)
