"""BrokerError -> wire errors: the only place that reads the catalogue's protocol columns.

`DIS` is the DIS door's renderer (the shape broker/api/http.py's `Renderer` asks for); the other
doors have theirs here (Timeplus `{"code","message"}`, OpenTSDB `{"error":{...}}`). Every body
carries the row's stable `reason` (its name), the one field that tells rows apart when their
protocol codes coincide (STORAGE_FULL and UNAVAILABLE are both DIS.5250). Unknown keys are
ignored by every DIS client (shared/spec/dis-api.md sections 1 and 8.2), so adding it changes
nothing they see.
"""
from __future__ import annotations

from typing import Any

from broker.errors import BrokerError, ErrorCode


class DisRenderer:
    """DIS error bodies (shared/spec/dis-api.md section 1) and PutRecords failed entries (2.6).
    `sdk_door`: the DIS door itself, where a row whose status is 429 (a client over its share of
    the broker) is a 400: the official SDK never reads a 429's body (spec section 4), so its callers
    would see "429" and no code; DIS itself signals throttling as a 400 with its code. Elsewhere
    (paths no door owns, our SSE tail, the metrics port) plain HTTP's 429 stays."""

    content_type = "application/json"

    def __init__(self, sdk_door: bool) -> None:
        self.sdk_door = sdk_door

    def status(self, error: BrokerError) -> int:
        status = error.code.http_status
        return 400 if status == 429 and self.sdk_door else status

    def body(self, error: BrokerError) -> dict[str, Any]:
        """All four code/message keys: the v3 Python SDK reads error_code/error_msg, the Java SDK
        and real DIS use errorCode/message."""
        code, message = error.code.dis_code, error.message
        return {"error_code": code, "error_msg": message, "errorCode": code, "message": message,
                "reason": error.code.reason}

    def record_failure(self, error: BrokerError) -> dict[str, Any]:
        """A failed PutRecords entry: `error_message` there, not `error_msg` (spec 2.6)."""
        return {"error_code": error.code.dis_code, "error_message": error.message, "reason": error.code.reason}


DIS = DisRenderer(sdk_door=True)
DIS_SHAPED = DisRenderer(sdk_door=False)   # our own HTTP paths (the SSE tail) in DIS's shape
FALLBACK = DIS_SHAPED   # the renderer for paths no door owns, and for requests the parser rejected


class TimeplusRenderer:
    """Timeplus ErrorResponse `{"code", "message", "system"}` (shared/spec/timeplus-api.md section 7:
    Timeplus names the component that failed; ours is always the query engine's, "proton"); the
    SDK keeps the raw body of any non-2xx answer and raises ApiException, so extra keys are safe.
    Something that does not exist is a 404 here (the spec's GET stream), where DIS says 400. An
    ingest over its partitions' write limit (THROTTLED, all or nothing) is a 429: plain HTTP's
    "send it again later", which the Timeplus SDK reads like any error (DIS keeps 400 because its
    SDK never reads a 429's body)."""

    content_type = "application/json"

    def status(self, error: BrokerError) -> int:
        if error.code is ErrorCode.THROTTLED:
            return 429
        return 404 if error.code.grpc_status == "NOT_FOUND" else error.code.http_status

    def body(self, error: BrokerError) -> dict[str, Any]:
        return {"code": error.code.timeplus_code, "message": error.message, "system": "proton",
                "reason": error.code.reason}

    def record_failure(self, error: BrokerError) -> dict[str, Any]:
        return self.body(error)


TIMEPLUS = TimeplusRenderer()


class TsdbRenderer:
    """OpenTSDB error objects `{"error": {"code": <HTTP status>, "message"}}` plus the row's `reason`
    (shared/spec/tsdb-put.md section 4), as `application/json; charset=UTF-8`, and `details` when
    the error has them (a put's body that does not parse). The put's report of points with errors
    is built by the door with the spec's exact strings, as are its summary and details answers.
    A failed point of a put whose storage refused it: rule 9's `Storage exception: <reason>`."""

    content_type = "application/json; charset=UTF-8"

    def status(self, error: BrokerError) -> int:
        return error.code.http_status

    def body(self, error: BrokerError) -> dict[str, Any]:
        inner: dict[str, Any] = {"code": error.code.http_status, "message": error.message}
        details = error.fields.get("details")
        if details is not None:   # what OpenTSDB says beside its message (a put's body that did not parse)
            inner["details"] = details
        return {"error": inner, "reason": error.code.reason}

    def record_failure(self, error: BrokerError) -> dict[str, Any]:
        return {"error": f"Storage exception: {error.message}", "reason": error.code.reason}


TSDB = TsdbRenderer()


def dis_error_body(error: BrokerError) -> dict[str, Any]:
    return DIS.body(error)


def http_status(error: BrokerError) -> int:
    return DIS.status(error)
