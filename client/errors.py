"""Client exceptions and the one error table of the client library.

A refused call carries the broker's rich status: a `google.rpc.ErrorInfo` whose `reason` is the
name of the broker's catalogue row (broker/errors.py), decoded here with grpcio-status. `ERRORS`
says, per reason, which exception class is raised and whether the same request may succeed
later; the Producer, the consumers and the CLI all decide from it (`is_retriable`,
`exception class`), never from DIS codes or status codes of their own.

A call that never reached the broker (connection refused, deadline) has no ErrorInfo: its reason
is the gRPC status name ("UNAVAILABLE", "DEADLINE_EXCEEDED", or "CANCELLED" when a stopping broker
dropped it) and it raises `BrokerUnavailable`.
"""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "sluice"


class SluiceError(Exception):
    """A request the broker refused, or could not be asked. `reason`: the catalogue name (e.g.
    STREAM_NOT_FOUND); `code`: the DIS code (e.g. DIS.4301, "" if none); `status`: the gRPC status."""

    def __init__(self, status: grpc.StatusCode, code: str, message: str, reason: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason or status.name
        super().__init__(f"{self.reason} ({code}): {message}" if code else f"{self.reason}: {message}")

    @property
    def retriable(self) -> bool:
        return is_retriable(self.reason)


class NotFound(SluiceError):
    """The stream, partition or app does not exist."""


class StreamNotFound(NotFound):
    pass


class AlreadyExists(SluiceError):
    """A stream or app of that name exists already."""


class InvalidRequest(SluiceError):
    """The request was wrong; sending it again unchanged fails again."""


class CursorInvalid(InvalidRequest):
    """The cursor expired or is not valid (any more): get a new one at the same position."""


class PositionGone(InvalidRequest):
    """The sequence number asked for is outside the retained records (trimmed, or not written yet)."""


class Unauthenticated(SluiceError):
    """The broker wants a valid API key (`api_key=`), and got none or an unknown one."""


class PermissionDenied(SluiceError):
    """The key is valid but bound to another project, or its role does not allow the call."""


class Throttled(SluiceError):
    """A write limit of the partition or of this client was reached: retry after a short wait."""


class BrokerUnavailable(SluiceError):
    """The broker could not be reached, is shutting down or cannot take the request now;
    retrying later may succeed."""


# reason -> (exception class, retriable). Every row of the broker's catalogue has an entry
# (tests/test_client_lib.py checks it).
ERRORS: dict[str, tuple[type[SluiceError], bool]] = {
    "INVALID_REQUEST": (InvalidRequest, False),
    "INVALID_PARTITION_ID": (InvalidRequest, False),
    "EMPTY_REQUEST": (InvalidRequest, False),
    "INVALID_CURSOR_TYPE": (InvalidRequest, False),
    "INVALID_METRICS_PERIOD": (InvalidRequest, False),
    "METRICS_PERIOD_TOO_LONG": (InvalidRequest, False),
    "INVALID_METRICS_LABEL": (InvalidRequest, False),
    "UNKNOWN_METRIC": (NotFound, False),
    "INVALID_SEQUENCE": (InvalidRequest, False),
    "INVALID_CURSOR": (CursorInvalid, False),
    "SEQUENCE_OUT_OF_RANGE": (PositionGone, False),
    "CURSOR_EXPIRED": (CursorInvalid, False),
    "CURSOR_RECORD_EXPIRED": (PositionGone, False),
    "PUT_NO_CONTENT": (InvalidRequest, False),
    "PUT_BAD_JSON": (InvalidRequest, False),
    "PUT_NO_POINTS": (InvalidRequest, False),
    "BAD_BODY": (InvalidRequest, False),
    "TIMESTAMP_EXPIRED": (InvalidRequest, False),
    "STREAM_NOT_FOUND": (StreamNotFound, False),
    "PARTITION_NOT_FOUND": (NotFound, False),
    "PARTITION_NOT_WRITABLE": (InvalidRequest, False),
    "STREAM_EXISTS": (AlreadyExists, False),
    "QUOTA_EXCEEDED": (SluiceError, False),
    "APP_QUOTA_EXCEEDED": (SluiceError, False),
    "APP_EXISTS": (AlreadyExists, False),
    "APP_NOT_FOUND": (NotFound, False),
    "APP_NO_CHECKPOINT": (SluiceError, False),
    "BAD_ROW": (InvalidRequest, False),
    "SQL_SYNTAX": (InvalidRequest, False),
    "UNKNOWN_COLUMN": (InvalidRequest, False),
    "UNKNOWN_FUNCTION": (InvalidRequest, False),
    "TYPE_MISMATCH": (InvalidRequest, False),
    "UNSUPPORTED_SQL": (InvalidRequest, False),
    "ILLEGAL_DIVISION": (InvalidRequest, False),
    "QUERY_NOT_FOUND": (NotFound, False),
    "TOO_MANY_QUERIES": (SluiceError, False),
    "BAD_SOURCE": (InvalidRequest, False),
    "SOURCE_NOT_FOUND": (NotFound, False),
    "SOURCE_EXISTS": (AlreadyExists, False),
    "SOURCE_RUNNING": (SluiceError, False),
    "AUTH_BAD_SIGNATURE": (Unauthenticated, False),
    "AUTH_MISSING": (Unauthenticated, False),
    "AUTH_MALFORMED": (Unauthenticated, False),
    "AUTH_DATE_MISSING": (Unauthenticated, False),
    "AUTH_DATE_MALFORMED": (Unauthenticated, False),
    "AUTH_DATE_SKEW": (Unauthenticated, False),
    "AUTH_UNKNOWN_KEY": (Unauthenticated, False),
    "AUTH_PROJECT_MISMATCH": (Unauthenticated, False),
    "PERMISSION_DENIED": (PermissionDenied, False),
    "HOST_NOT_ALLOWED": (PermissionDenied, False),   # an HTTP port's (api/hosts.py); gRPC never sends it
    "THROTTLED": (Throttled, True),
    "TOO_MANY_REQUESTS": (Throttled, True),
    "TOO_MANY_TAGS": (InvalidRequest, False),
    "REQUEST_TOO_LARGE": (InvalidRequest, False),
    "UNKNOWN_ROUTE": (SluiceError, False),
    "METHOD_NOT_ALLOWED": (SluiceError, False),
    "REQUEST_TIMEOUT": (BrokerUnavailable, True),
    "UNAVAILABLE": (BrokerUnavailable, True),
    "STORAGE_FULL": (SluiceError, True),
    "INTERNAL": (SluiceError, True),
    # no answer from the broker: the gRPC status name is the reason (UNAUTHENTICATED when an
    # interceptor refused the call before any handler ran and sent no ErrorInfo)
    "UNAUTHENTICATED": (Unauthenticated, False),
    "DEADLINE_EXCEEDED": (BrokerUnavailable, True),
    # the broker cancelled the call: grpc core does so to calls it had not yet handed to the
    # broker when a stop's grace ran out. A subscription the caller cancels ends quietly, not
    # with this error; so it is the broker going away: retry as for UNAVAILABLE. (Closing a
    # Client under a running call lands here too; a retry then fails on the closed channel.)
    "CANCELLED": (BrokerUnavailable, True),
}

# Reasons the consumers act on (their class in ERRORS says the same; named here for readability).
CURSOR_GONE = frozenset(r for r, (cls, _) in ERRORS.items() if cls is CursorInvalid)
POSITION_GONE = frozenset(r for r, (cls, _) in ERRORS.items() if cls is PositionGone)


def is_retriable(reason: str) -> bool:
    """May the same request succeed later? Unknown reasons: no."""
    return ERRORS.get(reason, (SluiceError, False))[1]


def make_error(status: grpc.StatusCode, reason: str, message: str, code: str = "") -> SluiceError:
    """The exception for a reason, by the table; unknown reasons by status."""
    cls = ERRORS.get(reason, (None, False))[0]
    if cls is None:
        cls = BrokerUnavailable if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
            else SluiceError
    return cls(status, code, message, reason)


def _error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                return info
    return None


def from_rpc_error(exc: grpc.RpcError) -> SluiceError:
    """The one translation of a failed call."""
    status = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    info = _error_info(exc)
    if info is None:   # not the broker's refusal: the transport's (or a proxy's)
        return make_error(status, status.name, details or status.name.lower().replace("_", " "))
    return make_error(status, info.reason, details, info.metadata.get("dis_code", ""))
