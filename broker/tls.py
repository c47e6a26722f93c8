"""TLS for the doors (`--tls-cert`, `--tls-key`): the HTTP doors over HTTPS, gRPC with server TLS.

The files are read and checked once, before anything starts: a missing or unreadable file, a file
that is no PEM certificate or key, or a key that does not belong to the certificate is a
StartupError naming the flag (one line, exit 1). Both doors then serve the same certificate chain.

A client that opens a connection and never finishes the handshake is dropped after
`HANDSHAKE_TIMEOUT_S` on every door (asyncio's default is 60 s; grpc core's 120 s); after the
handshake the doors' usual idle and body timeouts apply. On the HTTP doors a connection counts
against its client's connection limit from its accept, handshake included (`Site`'s `accept`).
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from aiohttp import web

from broker.settings import Settings, option_hint
from broker.startup import StartupError

HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Tls:
    """The checked certificate chain and key, as each door wants them."""

    context: ssl.SSLContext                                  # aiohttp sites
    chain: bytes = field(repr=False)
    key: bytes = field(repr=False)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.chain)])


def _read(path: str, setting: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise StartupError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}; check "
                           f"{option_hint(setting)}") from None


class _Encrypted(Exception):
    pass


def _no_password() -> bytes:
    raise _Encrypted


def load_tls(settings: Settings) -> Tls | None:
    """None without --tls-cert/--tls-key (settings.py allows both or neither). Raises StartupError."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    chain = _read(settings.tls_cert, "tls_cert", "certificate")
    key = _read(settings.tls_key, "tls_key", "private key")
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise StartupError(f"the TLS certificate {settings.tls_cert} holds no PEM certificate; check "
                           f"{option_hint('tls_cert')}")
    if b"PRIVATE KEY-----" not in key:
        raise StartupError(f"the TLS private key {settings.tls_key} holds no PEM private key; check "
                           f"{option_hint('tls_key')}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # a password-protected key: refused (no prompt on the terminal, which would hang a service)
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=_no_password)
    except ssl.SSLError as exc:
        # e.g. KEY_VALUES_MISMATCH; the reason names no secret
        raise StartupError(f"the TLS key {settings.tls_key} does not fit the certificate {settings.tls_cert} or "
                           f"cannot be used ({exc.reason or exc}); check {option_hint('tls_cert')} and "
                           f"{option_hint('tls_key')}") from None
    except _Encrypted:
        raise StartupError(f"the TLS private key {settings.tls_key} is encrypted; give an unencrypted key with "
                           f"{option_hint('tls_key')}") from None
    except OSError as exc:
        raise StartupError(f"cannot load the TLS certificate {settings.tls_cert} and key {settings.tls_key} "
                           f"({exc.strerror or exc}); check {option_hint('tls_cert')} and "
                           f"{option_hint('tls_key')}") from None
    return Tls(context, chain, key)


# Counts an accepted connection against its client's limit: the release, or None to close it at once.
Accept = Callable[[asyncio.BaseTransport], "Callable[[], None] | None"]


class _Handshake(asyncio.Protocol):
    """One TLS connection, from its accept: counted by `accept` until the HTTP handler (`factory`)
    has it, then passing everything on to that handler. asyncio's own TLS server hands a connection
    to its protocol only once the handshake is done, so connections that never finished one were
    counted by nothing (a client could hold any number of them, 10 s each). Bytes the TLS layer
    hands over before the handler has the connection (a request that came with the handshake's
    last flight) are kept for it."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext,
                 accept: Accept | None) -> None:
        self._factory, self._context, self._accept = factory, context, accept
        self._release: Callable[[], None] | None = None
        self._app: asyncio.Protocol | None = None
        self._early: list[bytes] = []
        self._eof = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._accept is not None:
            self._release = self._accept(transport)
            if self._release is None:   # a flood: closed at once, as on a plain port
                transport.abort()   # type: ignore[attr-defined]
                return
        transport.pause_reading()   # type: ignore[attr-defined]   # start_tls reads on from here
        self._task = asyncio.ensure_future(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.BaseTransport) -> None:
        try:
            secured = await asyncio.get_running_loop().start_tls(
                transport, self, self._context, server_side=True,   # type: ignore[arg-type]
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (OSError, ssl.SSLError, EOFError, asyncio.CancelledError, RuntimeError):
            transport.abort()   # type: ignore[attr-defined]
            return
        finally:
            self._released()
        if secured is None:
            transport.abort()   # type: ignore[attr-defined]
            return
        app = self._app = self._factory()   # counts the connection itself (http_app._RequestHandler)
        app.connection_made(secured)
        for data in self._early:
            app.data_received(data)
        self._early.clear()
        if self._eof:
            app.eof_received()

    def _released(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def data_received(self, data: bytes) -> None:
        if self._app is None:
            self._early.append(data)
        else:
            self._app.data_received(data)

    def eof_received(self) -> bool | None:
        if self._app is None:
            self._eof = True
            return None
        return self._app.eof_received()

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._released()
        if self._app is not None:
            self._app.connection_lost(exc)
        elif self._task is not None and not self._task.done():
            self._task.cancel()


class Site(web.TCPSite):
    """`web.TCPSite` that, with TLS, also bounds the handshake (TCPSite has no parameter for it)
    and, given `accept`, counts each connection from its accept (see _Handshake). No __slots__
    here: the instance keeps a __dict__, so setting `_bound_port` works on aiohttp releases whose
    TCPSite has no such slot."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None, *,
                 ssl_context: ssl.SSLContext | None = None,
                 accept: Accept | None = None, **kwargs: Any) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, **kwargs)
        self._accept = accept

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)   # registers the site with its runner (what TCPSite.start does first)
        server = self._runner.server
        assert server is not None
        context, accept = self._ssl_context, self._accept
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Handshake(server, context, accept), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
