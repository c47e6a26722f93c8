"""A DIS request signer written from shared/spec/dis-api.md section 7 alone (no broker code), for
tests that must send what the official SDK will not: a stale date, a body or query changed after
signing, a chosen set of signed headers. The spec's test vectors check it (test_signing.py)."""
from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, unquote


def _enc(text: str) -> str:
    return quote(text, safe="~")


def sdk_date(at: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if at is None else at))


def canonical(method: str, path: str, query: str, headers: dict[str, str], signed: list[str], body: bytes) -> str:
    uri = "/".join(_enc(s) for s in unquote(path).split("/"))
    uri += "" if uri.endswith("/") else "/"
    pairs = sorted((unquote(n), unquote(v)) for n, _, v in (item.partition("=") for item in query.split("&") if item))
    lower = {k.lower(): v for k, v in headers.items()}
    head = "".join(f"{name}:{lower[name].strip()}\n" for name in signed)
    return "\n".join([method.upper(), uri, "&".join(f"{_enc(n)}={_enc(v)}" for n, v in pairs), head,
                      ";".join(signed), hashlib.sha256(body).hexdigest()])


def sign(ak: str, sk: str, method: str, path: str, query: str, headers: dict[str, str], body: bytes = b"",
         signed: list[str] | None = None) -> dict[str, str]:
    """`headers` (must hold Host and X-Sdk-Date) plus the Authorization header. By default every
    given header is signed, lower-cased and sorted, as the SDK does."""
    names = signed if signed is not None else sorted(k.lower() for k in headers)
    request = canonical(method, path, query, headers, names, body)
    date = {k.lower(): v for k, v in headers.items()}["x-sdk-date"]
    to_sign = f"SDK-HMAC-SHA256\n{date}\n{hashlib.sha256(request.encode()).hexdigest()}"
    sig = hmac.new(sk.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    value = f"SDK-HMAC-SHA256 Access={ak}, SignedHeaders={';'.join(names)}, Signature={sig}"
    return {**headers, "Authorization": value}
