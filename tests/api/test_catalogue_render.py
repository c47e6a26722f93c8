"""Every catalogue row, rendered by every HTTP door: status, body and reason, table-driven.

The rows are raised inside a real door sub-application behind the real error middleware and
fetched over real HTTP (aiohttp's test server on loopback): nothing is mocked, and a row a
renderer cannot spell fails here rather than in front of a client. Per-record failures go
through the same renderer (`record_failure`) and are checked the same way.

Doors today: DIS (`/v2`) and the SSE tail (`/sluice`), both DIS-bodied, Timeplus (`/api`,
ErrorResponse bodies) and OpenTSDB (`{"error": {...}}` bodies; mounted at `/tsdb` here).
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.api.http import RENDERER, REQUEST_ID, Renderer, error_middleware
from broker.api.render import DIS, DIS_SHAPED, FALLBACK, TIMEPLUS, TSDB
from broker.errors import BrokerError, ErrorCode

# Every placeholder any template uses, so no message keeps a "{...}".
FIELDS: dict[str, object] = {"detail": "d", "stream": "s", "partition_id": "p", "cursor_type": "c", "value": "v",
                             "given": 1, "earliest": 0, "latest": 2, "seq": 0, "method": "GET", "path": "/x",
                             "request_id": "r", "app": "a", "row": 3, "column": "c", "function": "f",
                             "query_id": "q", "property": "p", "source": "src", "metric": "m"}


def dis_body(error: BrokerError) -> dict[str, Any]:
    row = error.code
    return {"error_code": row.dis_code, "error_msg": error.message, "errorCode": row.dis_code,
            "message": error.message, "reason": row.name}


def dis_record_failure(error: BrokerError) -> dict[str, Any]:
    return {"error_code": error.code.dis_code, "error_message": error.message, "reason": error.code.name}


def timeplus_body(error: BrokerError) -> dict[str, Any]:
    return {"code": error.code.timeplus_code, "message": error.message, "system": "proton", "reason": error.code.name}


def tsdb_body(error: BrokerError) -> dict[str, Any]:
    return {"error": {"code": error.code.http_status, "message": error.message}, "reason": error.code.name}


def tsdb_record_failure(error: BrokerError) -> dict[str, Any]:
    return {"error": f"Storage exception: {error.message}", "reason": error.code.name}


# door prefix -> (its renderer, expected error body, expected per-record failure, content type)
DOORS: dict[str, tuple[Renderer, Callable[[BrokerError], dict[str, Any]], Callable[[BrokerError], dict[str, Any]],
                       str]] = {
    "/v2": (DIS, dis_body, dis_record_failure, "application/json"),
    "/sluice": (DIS_SHAPED, dis_body, dis_record_failure, "application/json"),
    "/api": (TIMEPLUS, timeplus_body, timeplus_body, "application/json"),
    "/tsdb": (TSDB, tsdb_body, tsdb_record_failure, "application/json; charset=UTF-8"),
}


def test_every_row_has_a_unique_reason_equal_to_its_name() -> None:
    reasons = [code.reason for code in ErrorCode]
    assert reasons == [code.name for code in ErrorCode]
    assert len(set(reasons)) == len(reasons)
    # the pair the issue names: same DIS code, told apart by the reason
    assert ErrorCode.STORAGE_FULL.dis_code == ErrorCode.UNAVAILABLE.dis_code
    full, unavailable = BrokerError(ErrorCode.STORAGE_FULL), BrokerError(ErrorCode.UNAVAILABLE, detail="x")
    for renderer, _, _, _ in DOORS.values():
        assert renderer.body(full)["reason"] != renderer.body(unavailable)["reason"]
        assert renderer.record_failure(full)["reason"] != renderer.record_failure(unavailable)["reason"]


def test_every_protocol_code_is_well_formed() -> None:
    for code in ErrorCode:
        assert code.dis_code.startswith("DIS.") and code.dis_code[4:].isdigit() and len(code.dis_code) == 8
        assert 400 <= code.http_status <= 599


async def _raise_row(request: web.Request) -> web.Response:
    raise BrokerError(ErrorCode[request.match_info["row"]], **FIELDS)


async def _fail_records(request: web.Request) -> web.Response:
    """A 200 whose items are failures, the way PutRecords renders `result.failures`."""
    renderer = request.app[RENDERER]
    return web.json_response({"records": [renderer.record_failure(BrokerError(code, **FIELDS))
                                          for code in ErrorCode]})


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    """A root app shaped like http_app.build_http_app's: one sub-app per door, the one middleware."""
    doors = {}
    for prefix, (renderer, _, _, _) in DOORS.items():
        door = web.Application()
        door[RENDERER] = renderer
        door.router.add_get("/raise/{row}", _raise_row)
        door.router.add_get("/records", _fail_records)
        doors[prefix] = door
    root = web.Application(middlewares=[error_middleware([(p + "/", d[RENDERER]) for p, d in doors.items()],
                                                         FALLBACK)])
    for prefix, door in doors.items():
        root.add_subapp(prefix, door)
    async with TestClient(TestServer(root)) as test_client:
        yield test_client


@pytest.mark.parametrize("prefix", list(DOORS))
@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
async def test_every_row_is_rendered_by_every_door(client: TestClient, prefix: str, code: ErrorCode) -> None:
    renderer, expected_body, _, content_type = DOORS[prefix]
    rid = uuid.uuid4().hex
    resp = await client.get(f"{prefix}/raise/{code.name}", headers={REQUEST_ID: rid})
    error = BrokerError(code, **FIELDS)
    assert "{" not in error.message, "a template placeholder was left unfilled"
    assert resp.status == renderer.status(error)
    timeplus = {"NOT_FOUND": 404, "THROTTLED": 429}   # its own statuses (render.TimeplusRenderer)
    if renderer is TIMEPLUS:
        assert resp.status == timeplus.get(code.grpc_status, timeplus.get(code.name, code.http_status))
    elif renderer is DIS:   # the SDK never reads a 429's body: the DIS door says 400 (render.DisRenderer)
        assert resp.status == (400 if code.http_status == 429 else code.http_status)
    else:
        assert resp.status == code.http_status
    assert resp.headers["Content-Type"].startswith(content_type)
    assert resp.headers[REQUEST_ID] == rid
    body = await resp.json()
    assert body == expected_body(error)
    assert body["reason"] == code.reason


@pytest.mark.parametrize("prefix", list(DOORS))
async def test_per_record_failures_go_through_the_door_renderer(client: TestClient, prefix: str) -> None:
    _, _, expected_failure, _ = DOORS[prefix]
    resp = await client.get(f"{prefix}/records")
    assert resp.status == 200
    records = (await resp.json())["records"]
    assert records == [expected_failure(BrokerError(code, **FIELDS)) for code in ErrorCode]
    assert [r["reason"] for r in records] == [code.name for code in ErrorCode]


@pytest.mark.parametrize("path, code", [("/v2/no/such/route", ErrorCode.UNKNOWN_ROUTE),
                                        ("/nowhere", ErrorCode.UNKNOWN_ROUTE),
                                        ("/sluice/nope", ErrorCode.UNKNOWN_ROUTE)])
async def test_routing_errors_are_rendered_by_the_door_owning_the_path(client: TestClient, path: str,
                                                                       code: ErrorCode) -> None:
    resp = await client.get(path)
    assert resp.status == code.http_status
    body = await resp.json()
    assert body["reason"] == code.reason and resp.headers[REQUEST_ID]


async def test_unexpected_exception_is_internal_with_the_request_id(client: TestClient) -> None:
    resp = await client.get("/v2/raise/NOT_A_ROW", headers={REQUEST_ID: "rid-123"})  # KeyError in the handler
    assert resp.status == 500
    body = await resp.json()
    assert body["reason"] == "INTERNAL" and "rid-123" in body["error_msg"]
