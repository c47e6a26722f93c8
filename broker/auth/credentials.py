"""The auth file (`--auth-file`, TOML) and the lookups the doors make against it.

    [[access_keys]]          # DIS door: AK/SK request signing
    ak = "AK1"
    sk = "SK1"
    project_id = "p1"
    role = "admin"           # admin | producer | consumer
    [[api_keys]]             # Timeplus door (X-Api-Key), OpenTSDB and tail doors, gRPC (bearer)
    key = "..."
    workspace = "p1"         # the same namespace as a DIS project id
    role = "admin"

Secrets never appear in a message, a log line or a repr: a `Principal` names its key by a short
non-reversible fingerprint. API keys are looked up by their SHA-256 (so the dict probe's timing
says nothing about the key) and then compared in constant time; an SK is only used as an HMAC key
and the signature compared in constant time (signing.py).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.auth.roles import Action, Role, permits
from broker.errors import ErrorCode, client_error

log = logging.getLogger(__name__)

_PROJECT = re.compile(r"[A-Za-z0-9_-]{1,64}")   # core/limits.PROJECT_NAME (auth sits beside the core)
_MAX_SECRET = 1024
_AK_BREAKS = re.compile(r"[\s,]", re.ASCII)   # what signing._AUTHORIZATION ends an AK at


class CredentialsError(ValueError):
    """The auth file cannot be used; the message names the file and the entry, never a secret."""


def fingerprint(secret: str) -> str:
    """What logs and errors may say about a key: 8 hex digits of its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the project (DIS project id = Timeplus workspace) its key is bound to,
    its role, and a name safe to log (the AK, or `api-key:<fingerprint>`)."""

    project: str
    role: Role
    name: str


@dataclass(frozen=True, slots=True)
class AccessKey:
    sk: str = field(repr=False)
    principal: Principal


@dataclass(frozen=True)
class Credentials:
    access_keys: dict[str, AccessKey] = field(repr=False)                 # AK -> SK and principal
    api_keys: dict[bytes, tuple[str, Principal]] = field(repr=False)      # sha256(key) -> key, principal

    @functools.cached_property
    def principals(self) -> frozenset[Principal]:
        """Every key's principal (for `Auth.current`: one set lookup a check)."""
        return frozenset([a.principal for a in self.access_keys.values()] + [p for _, p in self.api_keys.values()])

    def access_key(self, ak: str) -> AccessKey | None:
        return self.access_keys.get(ak)

    def api_key(self, key: str) -> Principal | None:
        # aiohttp hands undecodable header bytes over as lone surrogates: such a key is unknown
        # (no configured key has them), never an encoding error
        try:
            given = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:   # a surrogate no byte escapes to: not any key's
            return None
        found = self.api_keys.get(hashlib.sha256(given).digest())
        if found is None or not hmac.compare_digest(found[0].encode(), given):
            return None
        return found[1]


def _text(entry: dict[str, Any], name: str, where: str, secret: bool = False) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CredentialsError(f"{where}: `{name}` must be a non-empty string")
    if len(value) > _MAX_SECRET or any(c in value for c in "\r\n\0"):
        what = "secret" if secret else "value"
        raise CredentialsError(f"{where}: `{name}` is not a usable {what} (at most {_MAX_SECRET} characters, "
                               "no line breaks)")
    return value


def _role(entry: dict[str, Any], where: str) -> Role:
    value = entry.get("role", "admin")
    try:
        return Role(value)
    except ValueError:
        raise CredentialsError(f"{where}: `role` must be admin, producer or consumer, not {value!r:.40}") from None


def _project(entry: dict[str, Any], name: str, where: str) -> str:
    value = _text(entry, name, where)
    if not _PROJECT.fullmatch(value):
        raise CredentialsError(f"{where}: `{name}` must be 1-64 characters of A-Z, a-z, 0-9, _ and -")
    return value


def parse_credentials(doc: dict[str, Any], source: str) -> Credentials:
    allowed = {"access_keys", "api_keys"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise CredentialsError(f"{source}: unknown table(s) {', '.join(unknown)}; expected [[access_keys]] "
                               "and [[api_keys]]")
    access: dict[str, AccessKey] = {}
    for i, entry in enumerate(doc.get("access_keys", [])):
        where = f"{source}: access_keys[{i}]"
        if not isinstance(entry, dict):
            raise CredentialsError(f"{where}: must be a table ([[access_keys]])")
        extra = sorted(set(entry) - {"ak", "sk", "project_id", "role"})
        if extra:
            raise CredentialsError(f"{where}: unknown key(s) {', '.join(extra)}")
        ak = _text(entry, "ak", where)
        if _AK_BREAKS.search(ak):   # no request could name it
            raise CredentialsError(f"{where}: `ak` holds a space or a comma, which the Authorization header "
                                   "cannot carry")
        if ak in access:
            raise CredentialsError(f"{where}: access key {ak} appears twice")
        access[ak] = AccessKey(_text(entry, "sk", where, secret=True),
                               Principal(_project(entry, "project_id", where), _role(entry, where), ak))
    api: dict[bytes, tuple[str, Principal]] = {}
    for i, entry in enumerate(doc.get("api_keys", [])):
        where = f"{source}: api_keys[{i}]"
        if not isinstance(entry, dict):
            raise CredentialsError(f"{where}: must be a table ([[api_keys]])")
        extra = sorted(set(entry) - {"key", "workspace", "role"})
        if extra:
            raise CredentialsError(f"{where}: unknown key(s) {', '.join(extra)}")
        key = _text(entry, "key", where, secret=True)
        if key != key.strip():   # every door strips a header's (and gRPC metadata's) surrounding whitespace
            raise CredentialsError(f"{where}: `key` begins or ends with whitespace, which no request can send")
        digest = hashlib.sha256(key.encode()).digest()
        if digest in api:
            raise CredentialsError(f"{where}: the same API key appears twice")
        api[digest] = (key, Principal(_project(entry, "workspace", where), _role(entry, where),
                                      f"api-key:{fingerprint(key)}"))
    if not access and not api:
        raise CredentialsError(f"{source}: no [[access_keys]] and no [[api_keys]]: nobody could use the broker")
    return Credentials(access, api)


def load_credentials(path: str) -> Credentials:
    """Read and check the auth file. Raises CredentialsError (the file, the entry, what is wrong)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the auth file ({exc.strerror or exc})") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # tomllib's message names a line and column, never the text of a value
        raise CredentialsError(f"{path}: not valid TOML: {exc}") from None
    return parse_credentials(doc, path)


class Auth:
    """The broker's credentials, or none (an open broker). `reload` swaps them atomically; a bad
    file keeps the old ones (and says why). The doors hold one Auth and ask it per request."""

    def __init__(self, path: str | None, credentials: Credentials | None = None) -> None:
        self.path = path
        self._credentials = credentials if credentials is not None or path is None else load_credentials(path)

    @property
    def enabled(self) -> bool:
        return self._credentials is not None

    @property
    def credentials(self) -> Credentials | None:
        return self._credentials

    def reload(self) -> bool:
        """Re-read the auth file (SIGHUP). True when the new credentials are in force."""
        if self.path is None:
            return False
        try:
            self._credentials = load_credentials(self.path)
        except CredentialsError as exc:
            log.error("auth file not reloaded, the previous credentials stay in force: %s", exc)
            return False
        log.info("auth file reloaded: %d access keys, %d API keys", len(self._credentials.access_keys),
                 len(self._credentials.api_keys))
        return True

    def api_key(self, key: str | None) -> Principal:
        """The principal of an API key. Raises AUTH_MISSING / AUTH_UNKNOWN_KEY."""
        assert self._credentials is not None, "ask only when enabled"
        if not key:
            raise client_error(ErrorCode.AUTH_MISSING, detail="send an API key")
        principal = self._credentials.api_key(key)
        if principal is None:
            raise client_error(ErrorCode.AUTH_UNKNOWN_KEY)
        return principal

    def current(self, principal: Principal | None) -> bool:
        """Whether a principal checked earlier still holds: its key is in the credentials in force
        now, with the same project and role (a SIGHUP reload may have removed or changed it). For
        calls that outlive one check: subscriptions, tails, streaming queries. True when open."""
        return principal is None or self._credentials is None or principal in self._credentials.principals

    @staticmethod
    def check(principal: Principal, project: str, action: Action) -> None:
        """Raises PERMISSION_DENIED unless the principal's key is bound to `project` and its role
        permits `action`. The message names the role and the verb, not whether the project exists."""
        if principal.project != project:
            raise client_error(ErrorCode.PERMISSION_DENIED,
                               detail=f"this key is bound to another project than [{project[:64]}]")
        if not permits(principal.role, action):
            raise client_error(ErrorCode.PERMISSION_DENIED,
                               detail=f"role {principal.role.value} may not {action.value}")
