"""The gRPC door's renderer over every row of the error catalogue (table-driven): each row becomes
a real status (never OK or UNKNOWN), a google.rpc.Status whose ErrorInfo says the row's name
(reason), domain "sluice" and the DIS code, decoded the way a standard client decodes it
(grpcio-status's `rpc_status.from_call`), and the same reason on a per-record failure.
The client library's error table knows every row too."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.api.grpc_render import DETAILS_KEY, DIS_CODE_KEY, reason, record_failure, rich_status, status_code, trailers
from broker.errors import BrokerError, ErrorCode
from client.errors import ERRORS, BrokerUnavailable, make_error

ROWS = list(ErrorCode)


class _Refused:
    """What a grpc client holds after a refused call: code, details, trailing metadata."""

    def __init__(self, error: BrokerError) -> None:
        self._code = status_code(error)
        self._details = error.message
        self._trailers = trailers(error)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers


def _error(row: ErrorCode) -> BrokerError:
    return BrokerError(row, detail="why", stream="s", app="a", partition_id="9", cursor_type="X", value="v",
                       given=1, earliest=0, latest=0, seq=1, method="GET", path="/x", request_id="r1")


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_every_row_renders_as_a_rich_grpc_status(row: ErrorCode) -> None:
    error = _error(row)
    code = status_code(error)
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)
    keys = [k for k, _ in trailers(error)]
    assert keys.count(DETAILS_KEY) == 1 and keys.count(DIS_CODE_KEY) == 1
    assert dict(trailers(error))[DIS_CODE_KEY] == row.dis_code

    status = rpc_status.from_call(_Refused(error))   # raises if code or message disagree with the call's
    assert isinstance(status, status_pb2.Status)
    assert status.code == code.value[0] and status.message == error.message
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert info.reason == row.name == reason(row)
    assert info.domain == "sluice"
    assert dict(info.metadata) == {"dis_code": row.dis_code}
    assert rich_status(error) == status


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_every_row_renders_as_a_record_failure(row: ErrorCode) -> None:
    failure = record_failure(7, _error(row))
    assert (failure.index, failure.reason, failure.dis_code) == (7, row.name, row.dis_code)
    assert failure.message


def test_reasons_are_unique_so_every_row_is_distinguishable() -> None:
    assert len({reason(row) for row in ROWS}) == len(ROWS)
    # the pair the issue names: same DIS code, told apart by reason
    assert ErrorCode.STORAGE_FULL.dis_code == ErrorCode.UNAVAILABLE.dis_code
    assert reason(ErrorCode.STORAGE_FULL) != reason(ErrorCode.UNAVAILABLE)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_the_client_table_knows_every_row(row: ErrorCode) -> None:
    assert row.name in ERRORS
    error = make_error(status_code(_error(row)), row.name, "m", row.dis_code)
    assert (error.reason, error.code) == (row.name, row.dis_code)
    # a row the broker counts as its own fault is worth retrying; a client error is not
    retriable = {ErrorCode.REQUEST_TIMEOUT, ErrorCode.THROTTLED, ErrorCode.TOO_MANY_REQUESTS}
    assert error.retriable == (row.http_status >= 500 or row in retriable), row
    if row is ErrorCode.UNAVAILABLE:
        assert isinstance(error, BrokerUnavailable)
