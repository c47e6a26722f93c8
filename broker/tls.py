"""TLS for the doors (`--tls-cert`, `--tls-key`): the HTTP doors over HTTPS, gRPC with server TLS.

The files are read and checked once, before anything starts: a missing or unreadable file, a file
that is no PEM certificate or key, or a key that does not belong to the certificate is a
StartupError naming the flag (one line, exit 1). Both doors then serve the same certificate chain.

A client that opens a connection and never finishes the handshake is dropped after
`HANDSHAKE_TIMEOUT_S` on every door (asyncio's default is 60 s; grpc core's 120 s); after the
handshake the doors' usual idle and body timeouts apply.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

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


class Site(web.TCPSite):
    """`web.TCPSite` that, with TLS, also bounds the handshake (TCPSite has no parameter for it).
    No __slots__ here: the instance keeps a __dict__, so setting `_bound_port` works on aiohttp
    releases whose TCPSite has no such slot."""

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)   # registers the site with its runner (what TCPSite.start does first)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
