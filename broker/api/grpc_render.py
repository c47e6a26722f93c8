"""BrokerError -> gRPC errors: the gRPC door's renderer, the only place it reads the catalogue's
protocol columns (`grpc_status`, `dis_code`).

A refused call ends with the status code of the catalogue row, its message, and the standard rich
error model: a `google.rpc.Status` (same code and message) whose one detail is a
`google.rpc.ErrorInfo` - reason = the row's stable name (`ErrorCode.reason`, e.g. STORAGE_FULL),
domain "sluice", metadata {"dis_code": the row's DIS code} - serialized into the
`grpc-status-details-bin` trailer, where grpcio-status's `rpc_status.from_call()` (and every other
gRPC library's equivalent) finds it. The DIS code is also sent as the plain trailer
"dis-error-code", as before. Per-record PutRecords failures carry the same reason and DIS code.
"""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from broker.errors import BrokerError, ErrorCode
from client._pb.sluice.v1 import sluice_pb2 as pb

DOMAIN = "sluice"
DETAILS_KEY = "grpc-status-details-bin"
DIS_CODE_KEY = "dis-error-code"


def reason(code: ErrorCode) -> str:
    """The stable machine-readable reason of a row (its name; `ErrorCode.reason` once the core has it)."""
    return str(getattr(code, "reason", code.name))


def status_code(error: BrokerError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code.grpc_status]


def rich_status(error: BrokerError) -> status_pb2.Status:
    """The google.rpc.Status of `error`: code, message and one ErrorInfo."""
    info = error_details_pb2.ErrorInfo(reason=reason(error.code), domain=DOMAIN,
                                       metadata={"dis_code": error.code.dis_code})
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=status_code(error).value[0], message=error.message, details=[detail])


def trailers(error: BrokerError) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata of a call refused with `error`."""
    return ((DETAILS_KEY, rich_status(error).SerializeToString()), (DIS_CODE_KEY, error.code.dis_code))


def record_failure(index: int, error: BrokerError) -> pb.RecordFailure:
    """One failed record of a PutRecords batch."""
    return pb.RecordFailure(index=index, reason=reason(error.code), message=error.message,
                            dis_code=error.code.dis_code)


def batch_error(error: BrokerError) -> pb.BatchError:
    """A PutRecordsStream batch refused as a whole: the row as a failed PutRecords call would end."""
    return pb.BatchError(code=status_code(error).value[0], reason=reason(error.code), message=error.message,
                         dis_code=error.code.dis_code)
