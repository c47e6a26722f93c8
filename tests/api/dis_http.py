"""Raw-HTTP helpers for the DIS door tests: one request per fresh connection, and the one error
shape every DIS error must have (shared/spec/dis-api.md section 1, plus the catalogue reason)."""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from broker.errors import ErrorCode

PID = "proj1"


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def addr(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def call(broker, method: str, path: str, body: bytes | str | dict | list | None = None,  # type: ignore[no-untyped-def]
         query: dict[str, Any] | None = None, headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    """One request on a fresh connection. dict/list bodies are sent as JSON, str/bytes as is."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    if query is not None:
        path += "?" + urlencode(query, quote_via=quote)
    conn = http.client.HTTPConnection(*addr(broker.http_url), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def assert_dis_error(reply: Reply, status: int = 400, code: str | None = None,
                     reason: ErrorCode | None = None) -> dict[str, str]:
    """The one shape every error must have: the four DIS keys and the catalogue row's reason,
    consistent with the status and the DIS code. Returns the body."""
    assert 400 <= reply.status < 500, (reply.status, reply.raw[:300])
    assert reply.status == status, (reply.status, reply.raw[:300])
    assert reply.headers.get_content_type() == "application/json"
    body = reply.json
    assert isinstance(body, dict) and set(body) == {"error_code", "error_msg", "errorCode", "message", "reason"}, body
    assert body["error_code"] == body["errorCode"] and body["error_msg"] == body["message"]
    assert body["error_code"].startswith("DIS.") and body["error_msg"], body
    assert ErrorCode[body["reason"]].dis_code == body["error_code"], body
    assert ErrorCode[body["reason"]].http_status == reply.status, body
    if code is not None:
        assert body["error_code"] == code, body
    if reason is not None:
        assert body["reason"] == reason.reason, body
    assert reply.headers.get("X-Request-Id"), dict(reply.headers)
    return body
