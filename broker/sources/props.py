"""Reading a source's `properties` object: every check that refuses a bad definition before anything
starts (shared/spec/sources.md section 1).

A `Props` is read once per definition by the type's `configure` (which builds its frozen config)
and then `finish()`ed, which refuses keys nobody read: a misspelt optional property (`intreval`)
would otherwise be ignored in silence and the source run with a default the user did not ask for.
Every refusal is BAD_SOURCE naming the property.

Spellings accepted [ours, the spec's section 1]: TLS keys flat (`"tls.disable": true`) or nested
(`{"tls": {"disable": true}}`); durations as Go strings (`200ms`, `1m30s`) or a bare JSON integer
of milliseconds; booleans as JSON booleans or the strings "true"/"false".
"""
from __future__ import annotations

import re
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

from broker.errors import ClientError, ErrorCode, client_error

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION = re.compile(f"(?:{_DURATION_PART.pattern})+")
_UNIT_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "μs": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DIGITS = re.compile(r"[0-9]+")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
MAX_DURATION_MS = 7 * 24 * 3_600_000   # a week: beyond it a duration is a typo, not a plan
MAX_TEXT = 64 * 1024                   # any one string property
# servers of one url property (a NATS cluster's seeds): 300,000 were taken, their checks holding the
# event loop ~5 s and the definition 7.8 MB
MAX_URLS = 100


def bad(prop: str, detail: str) -> ClientError:
    return client_error(ErrorCode.BAD_SOURCE, property=prop, detail=detail)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def parse_duration_ms(value: Any, prop: str) -> int:
    """A Go duration string or an integer of milliseconds -> whole milliseconds (> 0)."""
    if isinstance(value, bool) or value is None:
        raise bad(prop, f"must be a duration such as \"200ms\" or \"1m30s\", not {_kind(value)}")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        ms = float(value)   # a float: a JSON integer past 64 bits reads as one (orjson), so a range error below
    elif isinstance(value, str) and _GO_DURATION.fullmatch(value.strip()):
        ms = sum(float(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(value.strip()))
    else:
        raise bad(prop, f"[{str(value)[:64]}] is not a duration; use a number and a unit such as \"200ms\", "
                        "\"5s\" or \"1m30s\" (units ns, us, ms, s, m, h), or whole milliseconds")
    if ms < 1:
        raise bad(prop, "must be at least 1ms")
    if ms > MAX_DURATION_MS:
        raise bad(prop, "must be at most a week (168h)")
    return int(ms)


def _flatten(properties: dict[str, Any]) -> dict[str, Any]:
    """`{"tls": {"disable": true}}` -> `{"tls.disable": true}`; a key given both ways is refused."""
    flat: dict[str, Any] = {}
    for key, value in properties.items():
        if key == "tls" and isinstance(value, dict):
            for sub, v in value.items():
                name = f"tls.{sub}"
                if name in properties:
                    raise bad(name, "is given both flat and nested under tls")
                flat[name] = v
        else:
            flat[key] = value
    return flat


class Props:
    """Typed reads of one properties object; `finish()` refuses what was not read."""

    def __init__(self, properties: Any) -> None:
        if not isinstance(properties, dict):
            raise bad("properties", f"must be an object, not {_kind(properties)}")
        self._values = _flatten(properties)
        self._read: set[str] = set()

    def _get(self, key: str, required: bool) -> Any:
        self._read.add(key)
        value = self._values.get(key)
        if value is None and required:
            raise bad(key, "is required")
        return value

    def text(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise bad(key, f"must be a string, not {_kind(value)}")
        if required and not value.strip():
            raise bad(key, "must not be empty")
        if len(value) > MAX_TEXT:
            raise bad(key, f"is longer than {MAX_TEXT} characters")
        return value

    def choice(self, key: str, options: Sequence[str], *, required: bool = False,
               default: str | None = None) -> str:
        value = self.text(key, required=required, default=default)
        if value is None or value not in options:
            raise bad(key, f"[{str(value)[:64]}] is not one of: {', '.join(options)}")
        return value

    def duration_ms(self, key: str, default: int | None = None) -> int | None:
        value = self._get(key, False)
        return default if value is None else parse_duration_ms(value, key)

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise bad(key, f"must be true or false, not {_kind(value)}")

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self._get(key, False)
        if value is None:
            return default
        if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
            digits = value.strip().lstrip("0") or "0"   # past 18 digits: out of range, not "a string"
            value = int(digits) if len(digits) <= 18 else hi + 1
        if isinstance(value, float) and value.is_integer():
            # a JSON integer past 64 bits reads as a float (orjson): a range error, not a type error
            value = int(value) if abs(value) < 2**63 else (hi + 1 if value > 0 else lo - 1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, f"must be a whole number, not {'a fraction' if isinstance(value, float) else _kind(value)}")
        if not lo <= value <= hi:
            raise bad(key, f"must be within [{lo}, {hi}]")
        return value

    def raw(self, key: str) -> Any:
        """The value as given (the type checks it), None when absent."""
        return self._get(key, False)

    def url(self, key: str, schemes: Sequence[str], *, value: Any = None) -> str:
        """One URL with one of `schemes` and a host."""
        text = value if value is not None else self.text(key, required=True)
        if not isinstance(text, str):
            raise bad(key, f"must be a URL string, not {_kind(text)}")
        if len(text) > MAX_TEXT:   # one of a list: not read by text()
            raise bad(key, f"holds a URL longer than {MAX_TEXT} characters")
        text = text.strip()
        shown = shown_url(text)[:200]   # an error becomes a status message every role reads
        if _CONTROL_OR_SPACE.search(text):
            raise bad(key, f"[{shown!r}] holds a space or a control character; a URL cannot")
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise bad(key, f"[{shown}] is not a valid URL: {e}") from None
        if parts.scheme.lower() not in schemes:
            raise bad(key, f"[{shown}] must start with {' or '.join(s + '://' for s in schemes)}")
        if not parts.hostname:
            raise bad(key, f"[{shown}] has no host")
        if parts.port == 0:
            raise bad(key, f"[{shown}] names port 0: nothing can be reached there")
        try:   # what the connection will do with the name (a label past 63 characters fails there)
            parts.hostname.encode("idna")
        except UnicodeError as e:
            raise bad(key, f"[{shown}] has a host name that is not valid: {e}") from None
        return text

    def urls(self, key: str, schemes: Sequence[str]) -> list[str]:
        """A list of URLs, one URL, or URLs separated by commas (spec section 4)."""
        value = self._get(key, True)
        if isinstance(value, str):   # only a comma before a scheme separates URLs: a password may hold one
            items: list[Any] = [u for u in (u.strip().rstrip(",").strip() for u in _NEXT_URL.split(value)) if u]
        elif isinstance(value, list):
            items = value
        else:
            raise bad(key, f"must be a URL or a list of URLs, not {_kind(value)}")
        if not items:
            raise bad(key, "must name at least one server")
        if len(items) > MAX_URLS:
            raise bad(key, f"names {len(items)} servers; at most {MAX_URLS}")
        return [self.url(key, schemes, value=u) for u in items]

    def finish(self) -> None:
        unknown = sorted(k for k in self._values if k not in self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise bad(unknown[0], f"is not a property of this source type; it takes: {known}")


def shown_url(url: str) -> str:
    """The URL for status messages and logs: a password in it (basic auth), a user without a
    password (NATS's token form `nats://TOKEN@host`: nats-py sends it as the auth_token) and the
    value of each query parameter (`?token=...`: feeds take credentials there too) replaced by ***;
    in a comma-separated list (a NATS `url`), in each of its URLs."""
    if "," in url:   # only a comma before a scheme separates URLs: a password may hold one too
        urls = _NEXT_URL.split(url)
        if len(urls) > 1:
            return ",".join(map(shown_url, urls))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:   # not a URL urlsplit takes (a bad port, a stray bracket): mask by pattern
        masked = _USERINFO_TOKEN.sub(r"\1***@", _USERINFO_PASSWORD.sub(r"\1***@", url))
        return _QUERY_VALUE.sub(r"\1***", masked)
    if "@" not in parts.netloc and not parts.query:
        return url
    if password is not None:
        parts = parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}")
    elif "@" in parts.netloc:   # a user alone: NATS's token
        parts = parts._replace(netloc=f"***@{parts.netloc.rpartition('@')[2]}")
    if parts.query:
        parts = parts._replace(query="&".join(f"{name}=***" if sep else "***" for name, sep, _ in
                                              (piece.partition("=") for piece in parts.query.split("&"))))
    return urlunsplit(parts)


_USERINFO_PASSWORD = re.compile(r"(//[^/?#@:]*:)[^/?#]*@")
_USERINFO_TOKEN = re.compile(r"(//)[^/?#@:]+@")
_QUERY_VALUE = re.compile(r"([?&][^=&#]*=)[^&#]*")
_NEXT_URL = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


SECRET_TEXTS = ("open_message",)   # properties whose whole text may be a credential (a token)


def redacted(properties: dict[str, Any]) -> dict[str, Any]:
    """A source's properties as a role that may not manage sources sees them: URL passwords and
    the texts of SECRET_TEXTS as ***. (The roles that may manage see them as given: they could
    set them anyway, and an update round-trips what they read.)"""
    out: dict[str, Any] = {}
    for key, value in properties.items():
        if key in SECRET_TEXTS and value:
            out[key] = "***"
        elif isinstance(value, str):
            out[key] = shown_url(value) if "://" in value else value   # a subject `a.b?c=d` is no URL
        elif isinstance(value, list):
            out[key] = [shown_url(v) if isinstance(v, str) and "://" in v else v for v in value]
        else:
            out[key] = value
    return out
