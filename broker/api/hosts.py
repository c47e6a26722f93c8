"""Which `Host` names the HTTP ports answer to (`--allowed-hosts`): the guard against DNS rebinding.

A web page can make its own name resolve to 127.0.0.1 (DNS rebinding): to the visitor's browser,
`http://evil.example:8080` is then the page's own origin, so its scripts read the answers of a
broker on that port (every door of an open one; `/metrics` on `--metrics-port`, `/healthz` and
`/readyz` of any) and pass the cross-site check of writes (http.refuse_cross_site: the request is
same-origin). What gives it away is the `Host` header, which names the page's host.

So a port refuses (403 HOST_NOT_ALLOWED, in the door's error body) a request whose `Host` is a
name not allowed. Always allowed: IP addresses as browsers write them (a rebinding page cannot
have one as its origin's host and still rebind it) and `localhost` with its subdomains (RFC 6761:
browsers resolve them to loopback themselves). A request without `Host` (HTTP/1.0: not a
browser) passes.

`--allowed-hosts` (comma-separated) adds names; `.example.com` allows example.com and its
subdomains; `*` turns the check off. Left empty, the check is on where a name is never needed: a
broker bound to a loopback address (nothing but this machine reaches it, by `localhost` or an
address), auth file or not - /metrics and the health routes answer without a key. A broker on
another address is reached by names its operator chooses, which we cannot guess: there the check
is on once names are listed (the broker warns when it is open and lists none).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from broker.api.http import Handler
from broker.errors import ErrorCode, client_error


@dataclass(frozen=True, slots=True)
class AllowedHosts:
    """Names allowed besides IP addresses: exact ones (localhost among them), and suffixes
    (`.localhost`, `.example.com`)."""

    names: frozenset[str]
    suffixes: tuple[str, ...]

    @classmethod
    def of(cls, setting: str, *, bind: str) -> AllowedHosts | None:
        """The policy of `--allowed-hosts` for a broker bound to `bind`; None when any host is
        answered (no check at all)."""
        listed = [name.strip().lower().rstrip(".") for name in setting.split(",") if name.strip()]
        if "*" in listed:
            return None
        if not listed and not is_loopback(bind):
            return None
        suffixes = (".localhost", *(n for n in listed if n.startswith(".")))
        return cls(frozenset(n.lstrip(".") for n in listed) | {"localhost"}, suffixes)

    def allows(self, host: str | None) -> bool:
        """Whether a request with this `Host` header is answered."""
        if host is None:
            return True
        name = _host_name(host)
        if name in self.names or name.endswith(self.suffixes):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def middlewares(hosts: AllowedHosts | None) -> list[Middleware]:
    """What a port's application adds for `hosts`: nothing when any host is answered."""
    return [] if hosts is None else [middleware(hosts)]


def middleware(hosts: AllowedHosts) -> Middleware:
    @web.middleware
    async def allowed_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not hosts.allows(host):
            raise client_error(ErrorCode.HOST_NOT_ALLOWED,
                               detail=f"{_host_name(host or '')!r:.120} is not a name this broker answers to: "
                                      "add it to --allowed-hosts")
        return await handler(request)

    return allowed_host


def _host_name(host: str) -> str:
    """The name or address of a Host header, without its port, lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):   # an IPv6 address: [::1]:8080
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def is_loopback(bind: str) -> bool:
    """Whether every address `bind` (an address or a name, as --host takes it) stands for is a
    loopback one: nothing but this machine can connect."""
    host = bind.strip().strip("[]")
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(str(info[4][0]).partition("%")[0])
                         for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        except (OSError, UnicodeError, ValueError):
            return False
    return bool(addresses) and all(a.is_loopback or (isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None
                                                     and a.ipv4_mapped.is_loopback) for a in addresses)
