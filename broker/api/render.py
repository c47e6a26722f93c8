"""BrokerError -> wire errors. The only place that reads the catalogue's protocol columns."""
from __future__ import annotations

from typing import Any

import grpc

from broker.errors import BrokerError


def dis_error_body(error: BrokerError) -> dict[str, Any]:
    """All four keys: the v3 Python SDK reads error_code/error_msg, the Java SDK and real DIS
    use errorCode/message (shared/spec/dis-api.md section 1)."""
    code = error.code.dis_code
    return {"error_code": code, "error_msg": error.message, "errorCode": code, "message": error.message}


def http_status(error: BrokerError) -> int:
    return error.code.http_status


def grpc_status(error: BrokerError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code.grpc_status]


def grpc_trailers(error: BrokerError) -> tuple[tuple[str, str], ...]:
    return (("dis-error-code", error.code.dis_code),)
