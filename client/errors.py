"""Client exceptions. gRPC status -> exception is mapped here, once."""
from __future__ import annotations

import grpc


class SluiceError(Exception):
    """A request the broker refused. `code` is the DIS code (e.g. DIS.4301), `status` the gRPC status."""

    def __init__(self, status: grpc.StatusCode, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.status = status
        self.code = code
        self.message = message


class StreamNotFound(SluiceError):
    pass


class BrokerUnavailable(SluiceError):
    """The broker could not be reached or is shutting down; retrying later may succeed."""


def from_rpc_error(exc: grpc.RpcError) -> SluiceError:
    status = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    code = str(trailers.get("dis-error-code", ""))
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return BrokerUnavailable(status, code, details or "broker unavailable")
    if code == "DIS.4301":
        return StreamNotFound(status, code, details)
    return SluiceError(status, code, details)
