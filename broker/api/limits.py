"""Per-client limits on every door, a client being a peer IP address: open connections, requests in
progress and open push subscriptions (`--max-connections-per-client`, `--max-requests-per-client`,
`--max-subscriptions-per-client`). Each door (the HTTP port, `--tsdb-port`, the gRPC port) counts
on its own `ClientLimits`. What is over a limit is refused with TOO_MANY_REQUESTS (HTTP 429 in
the body of the door that owns the path, a 400 on the DIS door, DIS.4303; gRPC RESOURCE_EXHAUSTED
with its ErrorInfo).

HTTP connections (http_app's connection handler): a connection past the limit is served one
answer, a 429 to its first request, and then closed - a client sees why, instead of a reset it
may retry at once. It is not served more: it holds no request slot, and if it sends nothing the
idle timeout closes it. Past twice the limit, a flood, a connection is closed at once, unanswered.

HTTP requests (`middleware`): a request past the limit gets 429. A push subscription (`subscriber`:
the SSE tail, a Timeplus streaming query) counts as a subscription instead of as a request for as
long as it streams, so long-lived streams do not use up a client's requests.

gRPC (`GrpcLimits`, a server interceptor): calls in progress per peer; a Subscribe call counts as a
subscription instead, for as long as it streams. A PutRecordsStream call (streaming produce) holds
nothing while it waits: each of its batches takes a request slot when the broker reads it and gives
it back once the batch's answer is written, so a producer's stream weighs what its PutRecords calls
would. A batch past the limit is answered, in its place, with a TOO_MANY_REQUESTS BatchError (the
producer retries it) and the stream goes on. Connections
are not counted: HTTP/2 carries every call of a client over one connection, and grpc core does not
tell the application about connections (the idle timeout closes those that carry no call).

Behind a proxy every client is the proxy's address: raise the limits there.
"""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web

from broker.api.grpc_render import status_code, trailers
from broker.errors import BrokerError, ErrorCode, client_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# not requests the limit counts (as gRPC's health service): cheap, and a probe that shares its
# address with a busy client must not be refused for that client's requests
HEALTH_PATHS = frozenset(("/healthz", "/readyz"))


class PeerCounter:
    """How many of one thing each peer holds, and the most it may."""

    __slots__ = ("limit", "what", "_held")

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._held: dict[str, int] = {}

    def enter(self, peer: str) -> int:
        """Count one more (whatever the limit); returns how many the peer holds now."""
        n = self._held.get(peer, 0) + 1
        self._held[peer] = n
        return n

    def leave(self, peer: str) -> None:
        n = self._held.get(peer, 0) - 1
        if n > 0:
            self._held[peer] = n
        else:
            self._held.pop(peer, None)

    def try_enter(self, peer: str) -> bool:
        """Count one more if the peer is below the limit."""
        if self._held.get(peer, 0) >= self.limit:
            return False
        self.enter(peer)
        return True

    def held(self, peer: str) -> int:
        return self._held.get(peer, 0)

    def refusal(self) -> BrokerError:
        return client_error(ErrorCode.TOO_MANY_REQUESTS,
                            detail=f"a client address may have at most {self.limit} {self.what}")


class Slot:
    """One thing held by a peer, released once however often `release` is called."""

    __slots__ = ("_counter", "_peer")

    def __init__(self, counter: PeerCounter, peer: str) -> None:
        self._counter: PeerCounter | None = counter
        self._peer = peer

    def release(self) -> None:
        if self._counter is not None:
            self._counter.leave(self._peer)
            self._counter = None


@dataclass(frozen=True)
class ClientLimits:
    connections: PeerCounter
    requests: PeerCounter
    subscriptions: PeerCounter

    @classmethod
    def of(cls, connections: int, requests: int, subscriptions: int) -> ClientLimits:
        return cls(PeerCounter(connections, "open connections"), PeerCounter(requests, "requests in progress"),
                   PeerCounter(subscriptions, "open subscriptions"))


CLIENT_LIMITS = web.AppKey("client_limits", ClientLimits)
_REQUEST_SLOT: Any = web.RequestKey("client_request_slot", Slot) if hasattr(web, "RequestKey") else "sluice.slot"


def peer_of(transport: Any) -> str:
    """A connection's peer IP address ("" when the transport does not say)."""
    peername = transport.get_extra_info("peername") if transport is not None else None
    return str(peername[0]) if isinstance(peername, tuple) and peername else ""


# -- HTTP -----------------------------------------------------------------------------------------

def middleware(limits: ClientLimits) -> Any:
    """Refuses the request of a connection over the connection limit (then closes it), and
    requests past the peer's limit of requests in progress. Sits inside the error middleware, which
    renders the refusal with the owning door's body."""

    @web.middleware
    async def client_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if getattr(request.protocol, "over_limit", False):
            request.protocol.close()   # after this answer
            raise limits.connections.refusal()
        if request.path in HEALTH_PATHS:   # a liveness probe beside a busy client still answers
            return await handler(request)
        peer = request.remote or ""
        if not limits.requests.try_enter(peer):
            raise limits.requests.refusal()
        slot = request[_REQUEST_SLOT] = Slot(limits.requests, peer)
        try:
            return await handler(request)
        finally:
            slot.release()

    return client_limits


def subscriber(handler: Handler) -> Handler:
    """For a handler that streams a push subscription for as long as it runs: it holds one of the
    peer's subscription slots (TOO_MANY_REQUESTS when none is left) and gives back its request slot."""

    @functools.wraps(handler)
    async def limited(request: web.Request) -> web.StreamResponse:
        limits = request.config_dict.get(CLIENT_LIMITS)
        if limits is None:
            return await handler(request)
        peer = request.remote or ""
        if not limits.subscriptions.try_enter(peer):
            raise limits.subscriptions.refusal()
        request_slot = request.get(_REQUEST_SLOT)
        if request_slot is not None:
            request_slot.release()
        try:
            return await handler(request)
        finally:
            limits.subscriptions.leave(peer)

    return limited


class ConnectionCount:
    """The connection limit of one HTTP connection handler (http_app._RequestHandler)."""

    __slots__ = ("_counter", "_peer")

    def __init__(self, limits: ClientLimits, transport: Any) -> None:
        self._counter: PeerCounter | None = limits.connections
        self._peer = peer_of(transport)

    def made(self) -> tuple[bool, bool]:
        """Count the connection: (over the limit: answer 429 once, a flood: close it now)."""
        assert self._counter is not None
        n = self._counter.enter(self._peer)
        return n > self._counter.limit, n > 2 * self._counter.limit

    def lost(self) -> None:
        if self._counter is not None:
            self._counter.leave(self._peer)
            self._counter = None


def tls_accept(limits: ClientLimits) -> Callable[[Any], Callable[[], None] | None]:
    """For a TLS port (broker/tls.Site): counts a connection from its accept until the handshake is
    done, when the HTTP handler counts it (ConnectionCount). Returns its release, or None for a
    flood (past twice the limit), to close at once, as a plain port does."""

    def accept(transport: Any) -> Callable[[], None] | None:
        count = ConnectionCount(limits, transport)
        _, flood = count.made()
        if flood:
            count.lost()
            return None
        return count.lost

    return accept


# -- gRPC -----------------------------------------------------------------------------------------

def grpc_peer(context: grpc.aio.ServicerContext) -> str:
    """"ipv4:127.0.0.1:5000" -> "127.0.0.1", "ipv6:[::1]:5000" -> "::1"."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


_LONG_LIVED = ("/Subscribe",)          # counted as subscriptions
_PER_BATCH = ("/PutRecordsStream",)    # a request slot per batch, not per call


class Refused:
    """A PutRecordsStream batch refused by the per-client limits: the handler answers it with
    `error` (a BatchError) in its place, without running it."""

    __slots__ = ("request", "error")

    def __init__(self, request: Any, error: BrokerError) -> None:
        self.request = request
        self.error = error


class GrpcLimits(grpc.aio.ServerInterceptor):
    """Calls in progress per peer on the methods of `service` (Subscribe streams: subscriptions;
    PutRecordsStream: a request per batch being worked on); health and reflection stay unlimited."""

    def __init__(self, limits: ClientLimits, service: str,
                 refused: Callable[[str, BrokerError], None] | None = None) -> None:
        """`refused(method name, error)`: told of each call refused (metrics count them, as the
        HTTP doors' refusals)."""
        self._limits = limits
        self._prefix = f"/{service}/"
        self._refused = refused
        self._wrapped: dict[str, tuple[Any, Any]] = {}   # method -> (its handler, the limited one)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self._prefix):
            return handler
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:   # built once per method, not per call
            known = self._wrapped[method] = (handler, self._limit(method, handler))
        return known[1]

    def _limit(self, method: str, handler: Any) -> Any:
        counter = self._limits.subscriptions if method.endswith(_LONG_LIVED) else self._limits.requests
        told = self._refused
        refused = None if told is None else functools.partial(told, method[len(self._prefix):])
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_limited(handler.unary_unary, counter, refused),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:   # Subscribe writes with context.write: a coroutine too
            return grpc.unary_stream_rpc_method_handler(_limited(handler.unary_stream, counter, refused),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:   # PutRecordsStream: a request slot per batch
            behavior = _limited_batches(handler.stream_stream, self._limits.requests) \
                if method.endswith(_PER_BATCH) else _limited(handler.stream_stream, counter, refused)
            return grpc.stream_stream_rpc_method_handler(behavior, handler.request_deserializer,
                                                         handler.response_serializer)
        return handler


def _limited(behavior: Callable[..., Awaitable[Any]], counter: PeerCounter,
             refused: Callable[[BrokerError], None] | None) -> Callable[..., Awaitable[Any]]:
    async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = grpc_peer(context)
        if not counter.try_enter(peer):
            error = counter.refusal()
            if refused is not None:
                refused(error)
            await context.abort(status_code(error), error.message, trailing_metadata=trailers(error))
        try:
            return await behavior(request, context)
        finally:
            counter.leave(peer)
    return limited


class _Batches:
    """A PutRecordsStream call's request iterator that takes a request slot per batch read (a
    `Refused` stands in for a batch past the limit); `slots` holds them in request order."""

    def __init__(self, requests: Any, counter: PeerCounter, peer: str, slots: deque[Slot | None]) -> None:
        self._requests = aiter(requests)
        self._counter = counter
        self._peer = peer
        self._slots = slots

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._requests)
        if self._counter.try_enter(self._peer):
            self._slots.append(Slot(self._counter, self._peer))
            return request
        self._slots.append(None)
        return Refused(request, self._counter.refusal())


class _Answers:
    """The call's context, whose `write` gives back the slot of the batch it answers (answers go
    out in request order, one per batch); everything else is the real context's."""

    def __init__(self, context: grpc.aio.ServicerContext, slots: deque[Slot | None]) -> None:
        self._context = context
        self._slots = slots

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        try:
            await self._context.write(message)
        finally:
            if self._slots:
                slot = self._slots.popleft()
                if slot is not None:
                    slot.release()


def _limited_batches(behavior: Callable[..., Awaitable[Any]], counter: PeerCounter) -> Callable[..., Awaitable[Any]]:
    async def limited(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        slots: deque[Slot | None] = deque()
        try:
            return await behavior(_Batches(requests, counter, grpc_peer(context), slots), _Answers(context, slots))
        finally:   # batches read and never answered (the call was cancelled or failed)
            for slot in slots:
                if slot is not None:
                    slot.release()
            slots.clear()
    return limited
