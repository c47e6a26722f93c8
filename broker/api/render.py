"""BrokerError -> DIS wire errors. The only place the HTTP doors read the catalogue's protocol
columns (the gRPC door's renderer is api/grpc_render.py)."""
from __future__ import annotations

from typing import Any

from broker.errors import BrokerError


def dis_error_body(error: BrokerError) -> dict[str, Any]:
    """All four keys: the v3 Python SDK reads error_code/error_msg, the Java SDK and real DIS
    use errorCode/message (shared/spec/dis-api.md section 1)."""
    code = error.code.dis_code
    return {"error_code": code, "error_msg": error.message, "errorCode": code, "message": error.message}


def http_status(error: BrokerError) -> int:
    return error.code.http_status

