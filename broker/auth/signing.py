"""The DIS request-signature verifier (`SDK-HMAC-SHA256`), exactly as shared/spec/dis-api.md
section 7 gives it and the official SDK (`huaweicloudsdkcore.signer.Signer`) signs.

No HTTP here: the door hands over the method, the raw path and raw query string as received, a
case-insensitive header lookup, the body bytes before any parsing, and the time. The answer is the
caller's `Principal`, or a catalogue row (401, DIS.4100-4107) that never says more than its code:
an unknown AK and a wrong signature are told apart only as the spec's codes tell them apart.

One choice beyond the spec: `X-Sdk-Content-Sha256` (the SDK's unsigned-payload marker) counts only
as `UNSIGNED-PAYLOAD` and only when it is itself a signed header; any other value stands for the
body's own hash, which is then computed. Taken literally, the header would let whoever captured a
request replace its body and name the old body's hash beside it.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Callable
from urllib.parse import quote, unquote

from broker.auth.credentials import AccessKey, Credentials, Principal
from broker.errors import ErrorCode, client_error

ALGORITHM = "SDK-HMAC-SHA256"
EMPTY_HASH = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
MAX_SKEW_S = 15 * 60
_AUTHORIZATION = re.compile(
    r"SDK-HMAC-SHA256 Access=([^\s,]{1,1024}), SignedHeaders=([a-z0-9!#$%&'*+.^_`|~-]+(?:;[a-z0-9!#$%&'*+.^_`|~-]+)*), "
    r"Signature=([0-9a-fA-F]{64})", re.ASCII)
_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z", re.ASCII)
_MAX_SIGNED_HEADERS = 64

HeaderLookup = Callable[[str], str | None]


def _encode(text: str) -> str:
    """Percent-encode all but A-Z a-z 0-9 - _ . ~ (uppercase hex), as the SDK's `quote(s, safe='~')`."""
    return quote(text, safe="~")


def canonical_uri(raw_path: str) -> str:
    """Decoded, split on `/`, each segment re-encoded, and always ending in `/`."""
    uri = "/".join(_encode(segment) for segment in unquote(raw_path).split("/"))
    return uri if uri.endswith("/") else uri + "/"


def canonical_query(raw_query: str) -> str:
    """The raw query's pairs decoded (`+` stays `+`), sorted, re-encoded, joined with `&`."""
    pairs = []
    for item in raw_query.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return "&".join(f"{_encode(n)}={_encode(v)}" for n, v in sorted(pairs))


def check_query_pinned(raw_query: str) -> None:
    """A signed query must mean one thing to the signature and to the handler: the canonical
    query sorts pairs and keeps `+`, the handler takes the first of a name and reads `+` as a
    space, and undecodable escapes all decode alike. So one whose pairs could be reordered or
    respelled without changing the signature - a name twice, a raw `+`, an escape that is not
    UTF-8 - is refused (the SDK never sends one: it encodes with RFC 3986 rules, one value a name).
    Raises INVALID_REQUEST."""
    names: set[str] = set()
    for item in raw_query.split("&"):
        if not item:
            continue
        if "+" in item:
            raise client_error(ErrorCode.INVALID_REQUEST, detail="a signed query spells a space %20 and a plus %2B")
        name, _, value = item.partition("=")
        try:
            name, _ = unquote(name, errors="strict"), unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise client_error(ErrorCode.INVALID_REQUEST, detail="a signed query's escapes must be UTF-8") from None
        if name in names:
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"a signed query names each parameter once: {name[:40]!r} is twice")
        names.add(name)


def canonical_request(method: str, raw_path: str, raw_query: str, signed: list[str], header: HeaderLookup,
                      payload_hash: str) -> str:
    lines = []
    for name in signed:
        value = header(name)
        if value is None:
            raise client_error(ErrorCode.AUTH_MALFORMED, detail=f"signed header {name} is not in the request")
        lines.append(f"{name}:{value.strip()}\n")
    return "\n".join((method.upper(), canonical_uri(raw_path), canonical_query(raw_query), "".join(lines),
                      ";".join(signed), payload_hash))


def _utf8(text: str) -> bytes:
    """Header values arrive decoded as UTF-8 with undecodable bytes kept as lone surrogates
    (aiohttp): those go back to the bytes the client signed."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:   # a surrogate no wire byte makes: it cannot match any signature
        return text.encode("utf-8", "surrogatepass")


def string_to_sign(date: str, request: str) -> str:
    return f"{ALGORITHM}\n{date}\n{hashlib.sha256(_utf8(request)).hexdigest()}"


def signature(sk: str, to_sign: str) -> str:
    return hmac.new(sk.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _payload_hash(signed: list[str], header: HeaderLookup, body: bytes) -> str:
    if not body:
        return EMPTY_HASH          # the SDK's rule, whatever X-Sdk-Content-Sha256 says
    declared = header("X-Sdk-Content-Sha256")
    if declared is not None and declared.strip() == UNSIGNED and "x-sdk-content-sha256" in signed:
        return UNSIGNED
    return hashlib.sha256(body).hexdigest()


def _date(header: HeaderLookup, now: float) -> str:
    value = header("X-Sdk-Date")
    if value is None or not value.strip():
        raise client_error(ErrorCode.AUTH_DATE_MISSING)
    value = value.strip()
    if not _DATE.fullmatch(value):
        raise client_error(ErrorCode.AUTH_DATE_MALFORMED)
    try:
        when = datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:   # month 13, second 61 ...
        raise client_error(ErrorCode.AUTH_DATE_MALFORMED) from None
    if abs(when - now) > MAX_SKEW_S:
        raise client_error(ErrorCode.AUTH_DATE_SKEW)
    return value


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request's Authorization and X-Sdk-Date say, checked: all that can be known before
    its body is read (a door refuses an unsigned request without reading a byte of its body)."""

    key: AccessKey = field(repr=False)
    signed: list[str]
    given: str = field(repr=False)
    date: str


def claim(credentials: Credentials, header: HeaderLookup, now: float) -> Claim:
    """Steps 1 and 2 of the spec: the Authorization header parsed, its AK known, the date fresh.
    Raises AUTH_MISSING, AUTH_MALFORMED, AUTH_UNKNOWN_KEY, AUTH_DATE_MISSING/MALFORMED/SKEW."""
    authorization = header("Authorization")
    if authorization is None or not authorization.strip():
        raise client_error(ErrorCode.AUTH_MISSING, detail=f"sign the request ({ALGORITHM})")
    match = _AUTHORIZATION.fullmatch(authorization.strip())
    if match is None:
        raise client_error(ErrorCode.AUTH_MALFORMED,
                           detail=f"expected `{ALGORITHM} Access=..., SignedHeaders=..., Signature=...`")
    ak, signed_text, given = match.groups()
    signed = signed_text.split(";")
    if len(signed) > _MAX_SIGNED_HEADERS:
        raise client_error(ErrorCode.AUTH_MALFORMED, detail=f"more than {_MAX_SIGNED_HEADERS} signed headers")
    if "host" not in signed or "x-sdk-date" not in signed:
        raise client_error(ErrorCode.AUTH_MALFORMED, detail="host and x-sdk-date must be signed headers")
    key = credentials.access_key(ak)
    if key is None:
        raise client_error(ErrorCode.AUTH_UNKNOWN_KEY)
    return Claim(key, signed, given.lower(), _date(header, now))


def check(found: Claim, method: str, raw_path: str, raw_query: str, header: HeaderLookup, body: bytes) -> Principal:
    """Steps 3 to 5: the signature recomputed over the request and compared in constant time.
    Raises INVALID_REQUEST (check_query_pinned), AUTH_MALFORMED (a signed header is absent) or
    AUTH_BAD_SIGNATURE."""
    check_query_pinned(raw_query)
    payload = _payload_hash(found.signed, header, body)
    request = canonical_request(method, raw_path, raw_query, found.signed, header, payload)
    expected = signature(found.key.sk, string_to_sign(found.date, request))
    if not hmac.compare_digest(expected.encode(), found.given.encode()):
        raise client_error(ErrorCode.AUTH_BAD_SIGNATURE)
    return found.key.principal


def verify(credentials: Credentials, method: str, raw_path: str, raw_query: str, header: HeaderLookup,
           body: bytes, now: float) -> Principal:
    """The principal of a signed DIS request (`claim`, then `check`). `raw_path` and `raw_query`
    as received (still percent-encoded), `header` case-insensitive, `body` the bytes received,
    `now` Unix seconds. Raises the 401 rows above, in the spec's order."""
    return check(claim(credentials, header, now), method, raw_path, raw_query, header, body)
