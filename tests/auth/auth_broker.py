"""Helpers of the HTTP auth tests: an auth file of fresh random secrets (an admin, a producer and a
consumer of project `p1`, an admin of project `p2`, for both the DIS door's access keys and the API
keys of the other doors), raw requests on a fresh connection, and the official DIS SDK's client."""
from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("admin", "producer", "consumer")


@dataclass(frozen=True)
class Keys:
    """`aks[name] = (ak, sk, project)`, `api[name] = (key, project)`; names are the roles of p1
    and `other` (the admin of p2)."""

    aks: dict[str, tuple[str, str, str]]
    api: dict[str, tuple[str, str]]

    @classmethod
    def fresh(cls) -> Keys:
        aks = {role: (f"AK{role.upper()}{secrets.token_hex(4)}", secrets.token_urlsafe(24), "p1") for role in ROLES}
        aks["other"] = (f"AKOTHER{secrets.token_hex(4)}", secrets.token_urlsafe(24), "p2")
        # the timeplus SDK takes only 60-character keys
        api = {role: (secrets.token_hex(30), "p1") for role in ROLES}
        api["other"] = (secrets.token_hex(30), "p2")
        return cls(aks, api)

    def secrets(self) -> list[str]:
        return [sk for _, sk, _ in self.aks.values()] + [key for key, _ in self.api.values()]

    def toml(self, extra_api: tuple[tuple[str, str, str], ...] = ()) -> str:
        out = []
        for name, (ak, sk, project) in self.aks.items():
            role = "admin" if name == "other" else name
            out.append(f'[[access_keys]]\nak = "{ak}"\nsk = "{sk}"\nproject_id = "{project}"\nrole = "{role}"\n')
        for name, (key, project) in self.api.items():
            role = "admin" if name == "other" else name
            out.append(f'[[api_keys]]\nkey = "{key}"\nworkspace = "{project}"\nrole = "{role}"\n')
        for key, project, role in extra_api:
            out.append(f'[[api_keys]]\nkey = "{key}"\nworkspace = "{project}"\nrole = "{role}"\n')
        return "\n".join(out)


def write_auth_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def raw(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
        timeout: float = 30) -> Reply:
    """One request on a fresh connection, headers exactly as given (Host included when given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        given = {k.lower() for k in (headers or {})}
        conn.putrequest(method, path, skip_host="host" in given, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body or method in ("POST", "PUT"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def dis_client(http_url: str, ak: str, sk: str, project: str):  # type: ignore[no-untyped-def]
    """The unmodified official SDK with these credentials (spec section 8)."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkdis.v2 import DisClient

    config = HttpConfig.get_default_config()
    config.retry_times = 0
    config.timeout = (5, 30)
    return (DisClient.new_builder().with_http_config(config)
            .with_credentials(BasicCredentials(ak, sk, project)).with_endpoints([http_url]).build())
